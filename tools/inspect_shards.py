"""Summarize a dataset's manifest as JSON; with --verify, re-read every shard and check it.

    python tools/inspect_shards.py out/web/manifest.json [--verify] [--workers 8] [--vocab-size 154880]

--verify checks, per shard: it exists and has the recorded size, its sha256, that it parses as tar with
complete .tokens/.lengths chunks, that every document ends in EOD, the chunk/doc/token counts, and (with
--vocab-size) every token id. Exit status 1 if any shard is bad; each bad shard is named on stderr and
listed under "bad_shards" in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.errors import ManifestError  # noqa: E402
from data.locations import is_remote  # noqa: E402
from data.manifest_io import load_manifest  # noqa: E402
from data.schema import MANIFEST_NAME  # noqa: E402
from data.verify import verify_shard  # noqa: E402


def summarize(manifest) -> dict:
    shards = manifest.shards
    total_bytes = sum(s.bytes for s in shards)
    itemsize = manifest.np_dtype.itemsize
    return {
        "manifest": manifest.location, "tokenizer": manifest.tokenizer, "dtype": manifest.dtype,
        "eod_id": manifest.eod_id, "chunk_tokens": manifest.chunk_tokens, "shards": len(shards),
        "total_docs": manifest.total_docs, "total_tokens": manifest.total_tokens, "total_bytes": total_bytes,
        "bytes_per_token": total_bytes / manifest.total_tokens,
        "overhead_pct": 100.0 * (total_bytes / (manifest.total_tokens * itemsize) - 1),
        "mean_doc_tokens": manifest.total_tokens / manifest.total_docs,
        "shard_bytes_min": min(s.bytes for s in shards), "shard_bytes_max": max(s.bytes for s in shards),
    }


def unlisted_files(manifest) -> list[str]:
    """Tar files next to a local manifest that no manifest there lists (a manifest from another run?): the
    writer's own outputs beside it (valid-manifest.json of --valid-fraction, a split run's part manifests)
    list theirs."""
    if is_remote(manifest.location):
        return []
    directory = os.path.dirname(manifest.location) or "."
    listed = set()
    for m in [manifest, *_sibling_manifests(directory, manifest.location)]:
        listed |= {os.path.normpath(m.shard_url(i)) for i in range(len(m.shards))}
    return sorted(name for name in os.listdir(directory)
                  if name.endswith(".tar") and os.path.normpath(os.path.join(directory, name)) not in listed)


def _sibling_manifests(directory: str, own: str) -> list:
    found = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(MANIFEST_NAME) and os.path.normpath(path) != os.path.normpath(own):
            try:
                found.append(load_manifest(path))
            except ManifestError:
                pass  # not a manifest of ours: its files stay unlisted
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="manifest.json: local path, URL or pipe: command")
    p.add_argument("--verify", action="store_true", help="re-read every shard and check it")
    p.add_argument("--workers", type=int, default=1, help="processes for --verify")
    p.add_argument("--vocab-size", type=int, default=None, help="with --verify: token ids must be below this")
    p.add_argument("--allow-pipe", action="store_true", help="accept pipe: shard locations (they run commands)")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, allow_pipe=args.allow_pipe)
    except ManifestError as e:
        print(f"inspect_shards: error: {e}", file=sys.stderr)
        return 1
    summary = summarize(manifest)
    status = 0
    if args.verify:
        jobs = [(manifest, i, args.vocab_size) for i in range(len(manifest.shards))]
        if args.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.workers) as pool:
                errors = list(pool.imap(verify_shard, jobs))
        else:
            errors = [verify_shard(job) for job in jobs]
        bad = [{"path": manifest.shards[i].path, "error": e} for i, e in enumerate(errors) if e is not None]
        summary.update(verified=True, bad_shards=bad, unlisted_files=unlisted_files(manifest))
        for entry in bad:
            print(f"bad shard: {entry['error']}", file=sys.stderr)
        if bad:
            print(f"inspect_shards: {len(bad)} of {len(jobs)} shards are bad", file=sys.stderr)
            status = 1
    print(json.dumps(summary, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
