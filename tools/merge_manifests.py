"""Join the part manifests of a split preprocessing run into one manifest (docs/DATA.md, "At scale").

    python tools/merge_manifests.py OUTPUT_DIR --output OUTPUT_DIR/manifest.json [--verify --workers 16]
    python tools/merge_manifests.py a/part-00000-of-00002.manifest.json b/... --output merged.json

Given the directory the tasks wrote into, it takes every `part-IIIII-of-NNNNN.manifest.json` there, and the
held-out `part-...valid-manifest.json` parts (if any) go to `valid-manifest.json` beside --output
(--valid-output). Explicit manifest files are merged as given. Refused, naming the part: a part missing
from 0..N-1 (its task did not finish) or given twice, parts made with different tokenizers, vocabularies, EOD
ids, dtypes or chunk sizes, a shard listed twice. --verify re-reads every shard in --workers processes
(size, sha256, tar structure, counts: what tools/inspect_shards.py --verify checks). The manifest is written
atomically, with exact totals; shard paths are made relative to it where they are local files below it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.errors import ManifestError  # noqa: E402
from data.locations import is_remote  # noqa: E402
from data.manifest_io import load_manifest, write_manifest  # noqa: E402
from data.schema import MANIFEST_NAME, Manifest, ShardInfo  # noqa: E402
from data.verify import verify_shard  # noqa: E402

PART = re.compile(r"^part-(\d{5})-of-(\d{5})\.(valid-)?" + re.escape(MANIFEST_NAME) + "$")
VALID_NAME = "valid-" + MANIFEST_NAME
SAME = ("dtype", "eod_id", "chunk_tokens")  # besides the tokenizer, what every part must share


def find_parts(directory: str) -> tuple[list[str], list[str]]:
    """(training parts, held-out parts) in a directory, by name."""
    names = sorted(os.listdir(directory))
    train = [os.path.join(directory, n) for n in names if (m := PART.match(n)) and not m.group(3)]
    valid = [os.path.join(directory, n) for n in names if (m := PART.match(n)) and m.group(3)]
    if not train:
        raise ManifestError(f"{directory}: no part-IIIII-of-NNNNN.{MANIFEST_NAME} files (did the array run?)")
    return train, valid


def _check_complete(parts: list[Manifest]) -> None:
    """Parts of a split run: one per task 0..N-1, nothing missing, nothing twice."""
    split = [p for p in parts if p.part is not None]
    if not split:
        return
    counts = {p.part["count"] for p in split}
    if len(counts) > 1 or len(split) != len(parts):
        raise ManifestError(f"parts of different runs: task counts {sorted(counts)}"
                            + ("" if len(split) == len(parts) else " and manifests that are not parts"))
    count, seen = counts.pop(), {}
    for p in split:
        index = p.part["index"]
        if index in seen:
            raise ManifestError(f"part {index} of {count} is given twice: {seen[index]} and {p.location}")
        seen[index] = p.location
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ManifestError(f"missing part(s) {shown} of {count} (tasks that did not finish: resubmit the array "
                            "with --resume, which redoes only those)")


def _check_same(parts: list[Manifest]) -> None:
    first = parts[0]
    for p in parts[1:]:
        if (p.tokenizer.get("sha256"), p.tokenizer.get("vocab_size")) != (first.tokenizer.get("sha256"),
                                                                          first.tokenizer.get("vocab_size")):
            raise ManifestError(f"{p.location} was made with tokenizer {p.tokenizer.get('name')} (sha256 "
                                f"{str(p.tokenizer.get('sha256'))[:12]}, vocab {p.tokenizer.get('vocab_size')}), "
                                f"{first.location} with {first.tokenizer.get('name')} (sha256 "
                                f"{str(first.tokenizer.get('sha256'))[:12]}, vocab {first.tokenizer.get('vocab_size')})")
        for field in SAME:
            if getattr(p, field) != getattr(first, field):
                raise ManifestError(f"{p.location} has {field} {getattr(p, field)!r}, {first.location} "
                                    f"{getattr(first, field)!r}")


def _relocate(location: str, output: str) -> str:
    """A shard location as the merged manifest at `output` should write it."""
    if is_remote(location):
        return location
    base = os.path.dirname(os.path.abspath(output))
    path = os.path.abspath(location)
    return os.path.relpath(path, base) if path.startswith(base + os.sep) else path


def merge(paths: list[str], output: str) -> Manifest:
    """The merged manifest of the parts at `paths` (not written)."""
    parts = [load_manifest(p) for p in paths]
    _check_complete(parts)
    _check_same(parts)
    parts.sort(key=lambda p: p.part["index"] if p.part else 0)  # task order (explicit files: as given)
    shards, listed = [], {}
    for p in parts:
        for i, info in enumerate(p.shards):
            location = p.shard_url(i)
            key = location if is_remote(location) else os.path.realpath(location)
            if key in listed:
                raise ManifestError(f"shard {location} is listed twice: in {listed[key]} and {p.location}")
            listed[key] = p.location
            shards.append(ShardInfo(**{**info.__dict__, "path": _relocate(location, output)}))
    first = parts[0]
    return Manifest(tokenizer=first.tokenizer, dtype=first.dtype, eod_id=first.eod_id, shards=shards,
                    total_docs=sum(s.docs for s in shards), total_tokens=sum(s.tokens for s in shards),
                    chunk_tokens=first.chunk_tokens, location=output)


def verify(manifest: Manifest, workers: int) -> list[str]:
    """Errors (each naming its shard) from re-reading every shard, in parallel; one small job per shard."""
    base = os.path.dirname(manifest.location)
    jobs = [(Manifest(tokenizer=manifest.tokenizer, dtype=manifest.dtype, eod_id=manifest.eod_id, shards=[s],
                      total_docs=s.docs, total_tokens=s.tokens, location=os.path.join(base, MANIFEST_NAME)), 0, None)
            for s in manifest.shards]
    if workers <= 1:
        return [e for e in map(verify_shard, jobs) if e]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return [e for e in pool.imap(verify_shard, jobs, chunksize=16) if e]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_PART", help="the run's output directory, or part manifests")
    p.add_argument("--output", required=True, help="the merged manifest to write")
    p.add_argument("--valid-output", default=None,
                   help=f"the merged held-out manifest (default: {VALID_NAME} beside --output; directory input only)")
    p.add_argument("--verify", action="store_true", help="re-read every shard (size, sha256, structure, counts)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for --verify")
    args = p.parse_args(argv)
    jobs = []  # (part manifests, output)
    try:
        if len(args.inputs) == 1 and os.path.isdir(args.inputs[0]):
            train, valid = find_parts(args.inputs[0])
            jobs.append((train, args.output))
            if valid:
                jobs.append((valid, args.valid_output or os.path.join(os.path.dirname(args.output) or ".",
                                                                      VALID_NAME)))
        else:
            jobs.append((args.inputs, args.output))
        for paths, out in jobs:  # never overwrite a part it merges
            if os.path.abspath(out) in {os.path.abspath(path) for path in paths}:
                raise ManifestError(f"--output {out} is one of the part manifests it merges: choose another file")
        merged = [merge(paths, out) for paths, out in jobs]
        for m in merged:
            errors = verify(m, args.workers) if args.verify else []
            if errors:
                for e in errors:
                    print(f"bad shard: {e}", file=sys.stderr)
                raise ManifestError(f"{len(errors)} of {len(m.shards)} shards failed --verify; nothing written")
    except (ManifestError, OSError) as e:
        print(f"merge_manifests: error: {e}", file=sys.stderr)
        return 1
    summary = []
    for (paths, out), m in zip(jobs, merged):
        if not m.shards:  # a held-out split that caught no document
            summary.append({"output": None, "parts": len(paths), "docs": 0, "tokens": 0})
            continue
        write_manifest(m, out)
        summary.append({"output": out, "parts": len(paths), "shards": len(m.shards), "docs": m.total_docs,
                        "tokens": m.total_tokens, "verified": args.verify})
    print(json.dumps(summary[0] if len(summary) == 1 else {"train": summary[0], "valid": summary[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
