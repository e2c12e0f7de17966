"""Reader throughput against raw sequential reads of the same shards, in one run, on one core.

    python tools/bench_data.py                        # synthetic: 256M uint32 tokens, realistic doc lengths
    python tools/bench_data.py --manifest out/web/manifest.json --seq-length 4096 --global-batch-size 32

Measured (best of --repeats, page cache warm), as tokens per second of wall clock and per CPU-second of
this process (the same on an idle machine; the second is robust when other jobs share the cores):
  raw_bytes    read the shard files sequentially into a buffer (no parsing): the I/O ceiling;
  raw_wds      iterate the tar members with webdataset's tar_file_iterator, tokens as numpy arrays;
  raw_format   data.chunks.iter_chunks: the reader's own sequential read (memory-mapped), with its checks
               (lengths, EOD, every id < vocab size), no shuffle or packing;
  reader       the full path to packed batches: build_pretraining_data(dp_size=1, num_workers=0) ->
               int64 tokens [global_batch_size, seq_length + 1], one epoch's worth of
               steps after a quarter epoch of warm-up (a training run is in steady state for days).
Also bytes per token on disk. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.benchmarking import cpu_model  # noqa: E402
from data.chunks import iter_chunks  # noqa: E402
from data.manifest_io import load_manifest  # noqa: E402
from data.writer import ShardWriter  # noqa: E402


def synthesize(out_dir: str, tokens: int, vocab: int, shard_size: int, seed: int = 0) -> str:
    """Random tokens with log-normal document lengths (median ~400, mean ~800 tokens, like web text)."""
    rng = np.random.default_rng(seed)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    with ShardWriter(out_dir, tokenizer={"name": "synthetic", "sha256": "0" * 64, "vocab_size": vocab},
                     eod_id=0, dtype=dtype, shard_size=shard_size) as writer:
        written = 0
        while written < tokens:
            lengths = np.maximum(2, rng.lognormal(6.0, 1.2, size=4096).astype(np.int64))
            lengths = lengths[np.cumsum(lengths) <= max(tokens - written, lengths[0])]
            docs = rng.integers(1, vocab, size=int(lengths.sum()), dtype=np.uint32)
            docs[np.cumsum(lengths) - 1] = 0  # EOD
            writer.add_documents(docs, lengths)
            written += docs.size
    return os.path.join(out_dir, "manifest.json")


def best_rates(fn, repeats: int) -> tuple[float, float]:
    """Best tokens/s over repeats, by wall clock and by this process's CPU time (robust on a shared machine)."""
    wall = cpu = 0.0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        n = fn()
        wall = max(wall, n / (time.perf_counter() - start))
        cpu = max(cpu, n / (time.process_time() - start_cpu))
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=None, help="bench this dataset (default: synthesize one)")
    p.add_argument("--tokens", type=float, default=256e6, help="synthetic dataset size in tokens")
    p.add_argument("--vocab-size", type=int, default=154880)
    p.add_argument("--shard-size", type=int, default=32 << 20, help="synthetic shard size in bytes")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where to write synthetic shards (default: a temp dir)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = args.manifest or synthesize(os.path.join(tmp, "synthetic"), int(args.tokens), args.vocab_size,
                                           args.shard_size)
        manifest = load_manifest(path)
        urls = [manifest.shard_url(i) for i in range(len(manifest.shards))]
        total = manifest.total_tokens

        def raw_bytes() -> int:
            buf = bytearray(4 << 20)
            for url in urls:
                with open(url, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            return total

        def raw_wds() -> int:
            from webdataset.tariterators import tar_file_iterator

            n = 0
            for url in urls:
                with open(url, "rb") as f:
                    for member in tar_file_iterator(f):
                        if member["fname"].endswith(".tokens"):
                            n += np.frombuffer(member["data"], manifest.np_dtype).size
            return n

        def raw_format() -> int:
            n = 0
            for i, url in enumerate(urls):
                for _, tok, _ in iter_chunks(url, manifest.shards[i], manifest, vocab_size=args.vocab_size):
                    n += tok.size
            return n

        from data import build_pretraining_data

        loader = build_pretraining_data([path], args.seq_length, args.global_batch_size, 0, 1, seed=1,
                                        vocab_size=args.vocab_size)
        per_step = args.global_batch_size * args.seq_length  # tokens delivered (windows overlap by one)
        steps = max(1, total // per_step)

        def reader() -> int:  # one epoch's worth of steps
            for _ in range(steps):
                next(loader)
            return steps * per_step

        raw_bytes()  # warm the page cache
        for _ in range(max(1, steps // 4)):  # warm the reader: every stream has opened a shard and its buffers
            next(loader)
        rates = {name: best_rates(fn, args.repeats) for name, fn in
                 [("raw_bytes", raw_bytes), ("raw_wds", raw_wds), ("raw_format", raw_format), ("reader", reader)]}
        disk = sum(s.bytes for s in manifest.shards)
        result = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, numpy {np.__version__}",
            "dataset": "synthetic" if args.manifest is None else path, "shards": len(urls), "tokens": total,
            "dtype": manifest.dtype, "seq_length": args.seq_length, "global_batch_size": args.global_batch_size,
            "bytes_per_token": round(disk / total, 4),
            "overhead_pct": round(100 * (disk / (total * manifest.np_dtype.itemsize) - 1), 3),
            "Mtok_per_s_wall": {k: round(v[0] / 1e6, 1) for k, v in rates.items()},
            "Mtok_per_cpu_s": {k: round(v[1] / 1e6, 1) for k, v in rates.items()},
            "reader_vs_raw_per_cpu_s": {k: round(rates["reader"][1] / rates[k][1], 3)
                                        for k in ("raw_bytes", "raw_wds", "raw_format")},
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
