"""Preprocessing at scale: tokenization throughput per core, and start-up on a manifest of 100k+ shards.

    python tools/bench_preprocess.py throughput --tokenizer DIR [--tokenizer DIR2 ...] [--input FILES]
    python tools/bench_preprocess.py startup [--shards 120000]

throughput: tools/preprocess_data.py's worker path (data/documents.py: read jsonl, parse, hash for the
  held-out split, tokenize, pack with EOD) in this one process, TOKENIZERS_PARALLELISM=false, over jsonl made
  from the stdlib sources (one document per module, or --input). Tokens per CPU-second of this process (robust
  when other jobs share the machine) and per wall second, then the plan for --target-tokens (default
  GLM-5's 28.5T): core-hours, array tasks of --cores-per-task cores for --task-hours, shards, manifest size.
startup: a manifest of --shards entries (symlinks to one real shard, so every entry opens), written with
  data.manifest_io.write_manifest, then on one rank: load_manifest, build_pretraining_data (GLM-5's global
  batch 1536 over dp 64: 24 streams a rank, 2 dataloader workers) and its first batch.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data import documents  # noqa: E402
from data.benchmarking import cpu_model  # noqa: E402
from data.manifest_io import load_manifest, write_manifest  # noqa: E402
from data.writer import ShardWriter  # noqa: E402

GLM5_TOKENS = 28.5e12


def stdlib_jsonl(path: str, limit_bytes: int) -> str:
    """The stdlib's modules (recursively, sorted) as jsonl, one document each, up to limit_bytes of text."""
    size = 0
    with open(path, "w") as f:
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
            if size >= limit_bytes:
                break
    return path


def throughput(tokenizer: str, inputs: list[str], repeats: int) -> dict:
    documents.init_worker(tokenizer, None, "uint32", "text", False, 0.001)
    batches = list(documents.read_batches(inputs, "text"))
    text_bytes = sum(len(line) for b in batches for line in b[3])
    best_cpu = best_wall = 0.0
    for _ in range(repeats):
        start, start_cpu, tokens = time.perf_counter(), time.process_time(), 0
        for batch in batches:
            train, _, valid, _, _ = documents.encode_batch(batch)
            tokens += train.size + valid.size
        best_cpu = max(best_cpu, tokens / (time.process_time() - start_cpu))
        best_wall = max(best_wall, tokens / (time.perf_counter() - start))
    vocab = documents.worker_tokenizer().identity["vocab_size"]
    return {"tokenizer": os.path.basename(os.path.normpath(tokenizer)), "vocab_size": vocab, "tokens": tokens,
            "input_bytes": text_bytes, "bytes_per_token": round(text_bytes / tokens, 3),
            "tok_per_cpu_s": round(best_cpu), "tok_per_s_wall": round(best_wall),
            "MB_per_cpu_s": round(best_cpu * text_bytes / tokens / 1e6, 2)}


def plan(tok_per_core_s: float, target: float, cores_per_task: int, task_hours: float,
         shard_bytes: int = 1 << 30, itemsize: int = 4, manifest_bytes_per_shard: int = 0) -> dict:
    core_hours = target / tok_per_core_s / 3600
    tokens_per_task = tok_per_core_s * cores_per_task * task_hours * 3600
    shards = target * itemsize * 1.002 / shard_bytes  # +0.2%: tar headers and padding (docs/DATA.md)
    return {"target_tokens": target, "core_hours": round(core_hours), "cores_per_task": cores_per_task,
            "task_hours": task_hours, "array_tasks": int(np.ceil(target / tokens_per_task)),
            "shards": int(np.ceil(shards)), "terabytes": round(target * itemsize * 1.002 / 1e12, 1),
            "manifest_MB": round(shards * manifest_bytes_per_shard / 1e6, 1) if manifest_bytes_per_shard else None}


def startup(num_shards: int, root: str) -> dict:
    """Seconds to write, load and start reading a manifest of num_shards entries."""
    from data import build_pretraining_data
    import data.reader  # noqa: F401  (imports torch, as the trainer has by then: not part of the start-up)

    rng = np.random.default_rng(0)
    with ShardWriter(os.path.join(root, "one"), tokenizer={"name": "synthetic", "sha256": "0" * 64,
                                                           "vocab_size": 154880},
                     eod_id=0, dtype="uint32", chunk_tokens=1 << 16) as w:
        for _ in range(200):  # ~130k tokens: every stream's first window comes from its first shard
            w.add_document(rng.integers(1, 154880, size=int(rng.integers(200, 1100))))
    one = load_manifest(os.path.join(root, "one", "manifest.json"))
    info, src = one.shards[0], one.shard_url(0)
    big_dir = os.path.join(root, "big")
    os.makedirs(big_dir)
    start = time.perf_counter()
    names = [f"part-{i // 1000:05d}-of-00120.shard_{i % 1000:06d}.tar" for i in range(num_shards)]
    for name in names:
        os.symlink(src, os.path.join(big_dir, name))
    link_s = time.perf_counter() - start
    big = type(one)(tokenizer=one.tokenizer, dtype=one.dtype, eod_id=one.eod_id, chunk_tokens=one.chunk_tokens,
                    shards=[type(info)(**{**info.__dict__, "path": n, "sha256": f"{i:064x}"}) for i, n in enumerate(names)],
                    total_docs=info.docs * num_shards, total_tokens=info.tokens * num_shards)
    path = os.path.join(big_dir, "manifest.json")
    timings = {}

    def timed(name: str, fn, since=None):
        """Seconds of wall clock and of this process's CPU (robust on a shared machine) from `since`."""
        start = since or (time.perf_counter(), time.process_time())
        result = fn()
        timings[name] = {"wall_s": round(time.perf_counter() - start[0], 2),
                         "cpu_s": round(time.process_time() - start[1], 2)}
        return result

    timed("write_manifest", lambda: write_manifest(big, path))
    timed("load_manifest", lambda: load_manifest(path))
    start = (time.perf_counter(), time.process_time())
    loader = timed("build_pretraining_data", lambda: build_pretraining_data(  # includes its own load_manifest
        [path], 4096, 1536, dp_rank=0, dp_size=64, seed=1, vocab_size=154880, num_workers=2))
    batch = timed("to_first_batch", lambda: next(loader), since=start)  # workers' CPU not counted in cpu_s
    loader.close()
    assert batch["tokens"].shape == (24, 4097)
    return {"shards": num_shards, "manifest_bytes": os.path.getsize(path),
            "manifest_bytes_per_shard": round(os.path.getsize(path) / num_shards), "symlinks_s": round(link_s, 2),
            **timings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--tokenizer", action="append", required=True, help="HF tokenizer directory (repeatable)")
    t.add_argument("--input", nargs="+", default=None, help="jsonl/text files (default: stdlib sources as jsonl)")
    t.add_argument("--input-bytes", type=int, default=8 << 20, help="size of the default input")
    t.add_argument("--repeats", type=int, default=2)
    t.add_argument("--target-tokens", type=float, default=GLM5_TOKENS)
    t.add_argument("--cores-per-task", type=int, default=32)
    t.add_argument("--task-hours", type=float, default=4.0)
    t.add_argument("--manifest-bytes-per-shard", type=int, default=0, help="from `startup`, for the plan")
    s = sub.add_parser("startup")
    s.add_argument("--shards", type=int, default=120_000)
    args = p.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, "
              f"{platform.system()} {platform.release()}, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as root:
        if args.what == "throughput":
            inputs = args.input or [stdlib_jsonl(os.path.join(root, "stdlib.jsonl"), args.input_bytes)]
            result["tokenizers"] = [throughput(tok, inputs, args.repeats) for tok in args.tokenizer]
            result["plans"] = {r["tokenizer"]: plan(r["tok_per_cpu_s"], args.target_tokens, args.cores_per_task,
                                                    args.task_hours,
                                                    manifest_bytes_per_shard=args.manifest_bytes_per_shard)
                               for r in result["tokenizers"]}
        else:
            result["startup"] = startup(args.shards, root)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
