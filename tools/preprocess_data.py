r"""Tokenize jsonl / parquet / plain-text files into tar shards + manifest.json (the format: docs/DATA.md).

    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --tokenizer path/to/hf_tokenizer \
        --output-dir out/web [--shard-size 1GiB] [--workers 16] [--json-key text] [--valid-fraction 0.001]

Inputs, by file name: *.jsonl / *.json / *.ndjson (optionally .gz): one JSON object per line, text under
--json-key; *.parquet: the --json-key column; anything else: plain text, the whole file is one document.
--input takes files and (quoted) glob patterns. Empty documents are dropped. Workers tokenize batches;
results are written in input order by this process, so the output bytes depend only on the inputs and the
flags, never on --workers.

Split runs (SLURM arrays, docs/DATA.md "At scale"): with --task-index I --num-tasks N (default: from
SLURM_ARRAY_TASK_ID / _MIN / _STEP / _COUNT) this process tokenizes its share of the input files (whole
files, balanced by size, the same share for the same inputs and N) into part-IIIII-of-NNNNN.shard_*.tar and
writes part-IIIII-of-NNNNN.manifest.json last; tools/merge_manifests.py joins the parts. --resume skips a
finished part and redoes an unfinished one from scratch (its leftovers are deleted first). Every run records
its settings (tokenizer, flags, input list) in OUTPUT_DIR/preprocess-settings.json; a run or task whose
settings differ from those is refused, naming the difference.

--valid-fraction F holds out the documents whose content hash falls below F (blake2b of the UTF-8 text), so
the split depends on nothing but the text: not on --workers, order, task split or reruns. They go to
[part-...]valid-shard_*.tar and [part-...]valid-manifest.json beside the training ones.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import heapq
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.documents import encode_batch, init_worker, read_batches  # noqa: E402
from data.manifest_io import load_manifest  # noqa: E402
from data.schema import MANIFEST_NAME, TOKEN_DTYPES  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from data.writer import ShardWriter  # noqa: E402

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
VALID_PREFIX = "valid-"  # validation files: valid-manifest.json, valid-shard_NNNNNN.tar
SETTINGS_NAME = "preprocess-settings.json"  # the run's settings, written by its first task


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '1G' (binary), '1GB' (decimal), '65536' -> int."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GiB, 256MiB, 1048576)")
    number, unit, binary = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    decimal = unit and not binary and text.strip().lower().endswith("b")
    return int(float(number) * (1000 if decimal else 1024) ** power)


def part_prefix(index: int, count: int) -> str:
    """File name prefix of task `index` of `count`: part-00001-of-00003.manifest.json, ...shard_000000.tar."""
    return f"part-{index:05d}-of-{count:05d}."


# --- the work split and its settings ---------------------------------------------------------------
def expand_inputs(patterns: list[str]) -> list[str]:
    """Files as given; a pattern with glob characters -> its matches, sorted (quoted, it keeps sbatch's
    command line short)."""
    files = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"--input {pattern}: matches no file")
            files.extend(matches)
        elif not os.path.isfile(pattern):
            raise ValueError(f"--input {pattern}: not a file")
        else:
            files.append(pattern)
    return files


def task_of(args: argparse.Namespace) -> tuple[int, int] | None:
    """(index, count) of this task from the flags, else from a SLURM array's environment; None: one process."""
    index, count, env = args.task_index, args.num_tasks, os.environ
    if index is None and count is None and "SLURM_ARRAY_TASK_ID" in env:
        task_id, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step, count = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1), int(env["SLURM_ARRAY_TASK_COUNT"])
        index, rest = divmod(task_id - first, step)
        if rest or index >= count:
            raise ValueError(f"SLURM array task {task_id} (min {first}, step {step}, count {count}): the array is "
                             "not a range like --array=0-99; pass --task-index and --num-tasks")
    if (index is None) != (count is None):
        raise ValueError("--task-index and --num-tasks go together")
    if count is None:
        return None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--task-index {index} must be in [0, --num-tasks {count})")
    return index, count


def split_files(files: list[str], sizes: list[int], count: int) -> list[list[str]]:
    """Whole files to `count` tasks, balanced by bytes: largest first to the least loaded task (ties: the lower
    index); each task keeps its files in input order. Deterministic for the same inputs and count."""
    heap = [(0, task) for task in range(count)]
    owner = [0] * len(files)
    for i in sorted(range(len(files)), key=lambda i: (-sizes[i], i)):
        load, task = heapq.heappop(heap)
        owner[i] = task
        heapq.heappush(heap, (load + sizes[i], task))
    return [[f for f, o in zip(files, owner) if o == task] for task in range(count)]


def settings_of(args, files: list[str], sizes: list[int], identity: dict, eod_id: int, dtype: str,
                task: tuple[int, int] | None) -> dict:
    """What must be identical for parts (and reruns) to belong together."""
    listing = "".join(f"{os.path.abspath(f)}\t{n}\n" for f, n in zip(files, sizes))
    return {"tokenizer": identity, "eod_id": eod_id, "dtype": dtype, "chunk_tokens": args.chunk_tokens,
            "shard_size": args.shard_size, "json_key": args.json_key, "valid_fraction": args.valid_fraction,
            "num_tasks": task[1] if task else 1,
            "inputs": {"files": len(files), "bytes": sum(sizes),
                       "sha256": hashlib.sha256(listing.encode("utf-8", "surrogatepass")).hexdigest()}}


def settings_difference(old: dict | None, new: dict) -> str | None:
    """None if equal, else what differs, in words."""
    if old is None:
        return "the existing output records no preprocessing settings"
    for key in new:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if key == "tokenizer" and isinstance(a, dict):
            a, b = (f"{t.get('name')} (sha256 {str(t.get('sha256'))[:12]}, vocab {t.get('vocab_size')})" for t in (a, b))
        elif key == "inputs" and isinstance(a, dict):
            a, b = (f"{t.get('files')} files / {t.get('bytes')} bytes (list sha256 {str(t.get('sha256'))[:12]})"
                    for t in (a, b))
        return f"{key}: {a} before, {b} now"
    return None


def check_run_settings(output_dir: str, settings: dict) -> None:
    """The first task (or the only process) records the run's settings; every task and rerun must match."""
    path = os.path.join(output_dir, SETTINGS_NAME)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1)
        try:
            os.link(tmp, path)  # atomic create-if-absent: one task's file wins
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(path) as f:
        recorded = json.load(f)
    diff = settings_difference(recorded, settings)
    if diff and not _holds_output(output_dir):  # a run that failed before writing any data: try again anew
        _log(f"{path}: replacing the settings of a run that wrote nothing ({diff})")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(tmp, path)
        diff = None
    if diff:
        raise ValueError(f"{output_dir} holds a run with other settings ({path}): {diff}; use another "
                         "--output-dir, or delete that run")


def _holds_output(output_dir: str) -> bool:
    """Any file besides the settings (and temporary files): shards or manifests of a run."""
    return any(n != SETTINGS_NAME and not n.endswith(".tmp") for n in os.listdir(output_dir))


def _own_files(output_dir: str, prefix: str, task: tuple[int, int] | None) -> list[str]:
    """This task's files (complete or not): what an unfinished run left behind."""
    names = (prefix + "shard_", prefix + VALID_PREFIX) if task is None else (prefix,)
    return sorted(n for n in os.listdir(output_dir) if n.startswith(names) or n == prefix + MANIFEST_NAME)


# --- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="jsonl(.gz), parquet or text files, or quoted glob patterns")
    p.add_argument("--tokenizer", required=True, metavar="HF_DIR", help="local Hugging Face tokenizer directory")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="new or empty directory for shards + manifest")
    p.add_argument("--shard-size", type=parse_size, default=1 << 30, help="maximum shard size (default 1GiB)")
    p.add_argument("--chunk-tokens", type=parse_size, default=1 << 20,
                   help="tokens per tar sample (whole documents; default 1Mi)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--json-key", default="text", help="field (jsonl) or column (parquet) holding the text")
    p.add_argument("--dtype", choices=["auto", *TOKEN_DTYPES], default="auto",
                   help="token dtype; auto: uint16 when the vocab fits, else uint32")
    p.add_argument("--eod-token", default=None, help="EOD token (default: the tokenizer's eos_token)")
    p.add_argument("--valid-fraction", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of documents (by content hash) as a validation set")
    p.add_argument("--task-index", type=int, default=None, help="this task of a split run (default: SLURM array)")
    p.add_argument("--num-tasks", type=int, default=None, help="tasks of a split run (default: SLURM array)")
    p.add_argument("--resume", action="store_true",
                   help="skip if this task's output is complete, else redo it (same settings only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _log(message: str) -> None:
    print(f"preprocess_data: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    files = expand_inputs(args.input)
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction {args.valid_fraction} must be in [0, 1)")
    task = task_of(args)
    loaded = load_tokenizer(args.tokenizer, args.eod_token)
    vocab = loaded.identity["vocab_size"]
    dtype = args.dtype if args.dtype != "auto" else ("uint16" if vocab <= 1 << 16 else "uint32")
    if vocab > np.iinfo(TOKEN_DTYPES[dtype]).max + 1:
        raise ValueError(f"--dtype {dtype} cannot hold the {vocab} token ids of {args.tokenizer}")
    sizes = [os.path.getsize(f) for f in files]
    settings = settings_of(args, files, sizes, loaded.identity, loaded.eod_id, dtype, task)
    out, prefix = args.output_dir, part_prefix(*task) if task else ""
    os.makedirs(out, exist_ok=True)
    check_run_settings(out, settings)
    summary = {"output": os.path.join(out, prefix + MANIFEST_NAME), "dtype": dtype, "eod_id": loaded.eod_id,
               "task": list(task) if task else None}
    if os.path.exists(summary["output"]):
        if not args.resume:
            raise FileExistsError(f"{out} already holds a dataset ({prefix + MANIFEST_NAME}); use an empty "
                                  "directory, or --resume")
        done = load_manifest(summary["output"])
        _log(f"{summary['output']} is complete: nothing to do")
        return {**summary, "skipped": True, "shards": len(done.shards), "docs": done.total_docs,
                "tokens": done.total_tokens}
    inputs = {os.path.abspath(f) for f in files}  # never removed, whatever their names
    leftovers = [n for n in _own_files(out, prefix, task) if os.path.abspath(os.path.join(out, n)) not in inputs]
    if leftovers and not args.resume:
        raise FileExistsError(f"{out} already holds a dataset ({leftovers[0]}, from a run that did not finish?); "
                              "use an empty directory, or --resume to redo it")
    for name in leftovers:  # an unfinished run: start this task over, so nothing is written twice
        os.remove(os.path.join(out, name))
    if leftovers:
        _log(f"--resume: removed {len(leftovers)} file(s) of an unfinished run, starting {prefix or out} over")
    mine = split_files(files, sizes, task[1])[task[0]] if task else files
    if task:
        _log(f"task {task[0]} of {task[1]}: {len(mine)} of {len(files)} files, "
             f"{sum(os.path.getsize(f) for f in mine):,} of {sum(sizes):,} bytes")
    return {**summary, **_tokenize(args, mine, out, prefix, task, loaded, dtype)}


def _tokenize(args, files: list[str], out: str, prefix: str, task, loaded, dtype: str) -> dict:
    from tqdm import tqdm

    part = {"index": task[0], "count": task[1], "inputs": [os.path.abspath(f) for f in files]} if task else None
    opts = dict(tokenizer=loaded.identity, eod_id=loaded.eod_id, dtype=dtype, shard_size=args.shard_size,
                chunk_tokens=args.chunk_tokens, part=part)
    init = (args.tokenizer, args.eod_token, dtype, args.json_key, args.workers == 1, args.valid_fraction)
    tasks = read_batches(files, args.json_key)
    dropped = total = 0
    faults = os.environ.get("GLM5_INJECT_FAULT")  # tests: hang or die after a shard (pretrain/resilience/faults.py)
    with ShardWriter(out, prefix=prefix, **opts) as writer, \
            ShardWriter(out, prefix=prefix + VALID_PREFIX, **opts) as held_out:
        if args.workers == 1:
            init_worker(*init)
            results, pool = map(encode_batch, tasks), None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(args.workers, initializer=init_worker, initargs=init)
            results = pool.imap(encode_batch, tasks)  # ordered: output independent of scheduling
        try:
            with tqdm(unit="doc", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
                for tokens, lengths, valid_tokens, valid_lengths, empty in results:
                    before = writer.shards_written
                    writer.add_documents(tokens, lengths)
                    held_out.add_documents(valid_tokens, valid_lengths)
                    dropped, total = dropped + empty, total + tokens.size + valid_tokens.size
                    bar.update(lengths.size + valid_lengths.size)
                    bar.set_postfix(tokens=f"{total:,}", refresh=False)
                    if faults and writer.shards_written > before:
                        from pretrain.resilience.faults import inject

                        inject(f"preprocess-task{task[0] if task else 0}-shard{writer.shards_written}")
        finally:
            if pool is not None:
                pool.terminate()
        # Held-out documents first: the training manifest, written last, is what marks the run finished.
        keep = args.valid_fraction and (task or not held_out.is_empty)  # a part is written even if empty
        valid = held_out.close() if keep else held_out.abort()
        manifest = writer.close()
    result = {"shards": len(manifest.shards), "docs": manifest.total_docs, "tokens": manifest.total_tokens,
              "empty_docs_dropped": dropped}
    if args.valid_fraction:
        result.update(valid_output=valid.location if valid else None, valid_docs=valid.total_docs if valid else 0,
                      valid_tokens=valid.total_tokens if valid else 0)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
