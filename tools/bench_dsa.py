"""Peak memory and time of one layer's DSA attention, today's dense path against the O(S·k) one.

    python tools/bench_dsa.py --seq-lengths 1024,2048,4096 --topk 256 --heads 4 [--paths dense,blockwise]

What runs: the core attention of one GLM-5 attention layer (model/modules/dsa.py,
GLMSparseAttention's `_dense` or `_sparse`), forward + backward with the indexer's KL loss (sparse
stage, as after the warm-up), at GLM-5's head dimensions (kv_lora 512, nope 192, rope 64, v 256,
32 indexer heads of 128; `--heads` query heads), batch 1. Its inputs are what the MLA layer hands
it: the query heads [S, 1, heads, 256], the latent rows [S, 1, 576], this rank's key/value
up-projection weight, and the indexer's queries, head weights and keys (all requiring grad). The
projections that make them are the same in both paths, linear in S, and not measured.

Paths: `dense` (today's: per-head keys and values, [b, heads, S, S] scores and masks, [S, 32, S]
indexer scores), `blockwise` (torch, the CPU path), `triton` (the kernels; CUDA only); default: the
path the layer picks on this device plus dense.

peak_memory_gb: the highest memory held above what was allocated before the step (the inputs),
over forward + backward, gradients of the inputs included. On CUDA torch.cuda.max_memory_allocated;
on CPU the running sum of every allocation and free the torch profiler records
(`profile_memory=True`; the same allocator events, in order). seconds: wall time of one forward +
backward, best of `--repeats` runs outside the profiler (with `--repeats 0`, the profiled run's);
cpu_seconds_profiled_run: CPU time this process spent in the profiled run (on a shared CPU machine
it is what the wall time would be without waiting for a core). A dense run is skipped (`"skipped"`) once
its estimated [heads, S, S] fp32 buffers pass `--dense-limit-gb` (16 by default). One JSON line per
measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.modules.dsa import GLMSparseAttention, LatentAttentionInputs  # noqa: E402

DIMS = dict(kv_lora_rank=512, qk_head_dim=192, qk_pos_emb_head_dim=64, v_head_dim=256)
INDEX_HEADS, INDEX_DIM = 32, 128


class OneRank:
    def size(self):
        return 1


def core_attention(path: str, topk: int):
    """GLMSparseAttention's state, without megatron's construction (its methods only read these)."""
    cfg = SimpleNamespace(**DIMS, dsa_indexer_use_sparse_loss=True)
    attn = SimpleNamespace(config=cfg, softmax_scale=(DIMS["qk_head_dim"] + DIMS["qk_pos_emb_head_dim"]) ** -0.5,
                           indexer=SimpleNamespace(topk=topk))
    attn._split_weight = lambda inputs, heads: GLMSparseAttention._split_weight(attn, inputs, heads)
    return attn


def make_inputs(seq: int, heads: int, device, dtype, index_heads: int = INDEX_HEADS):
    g = torch.Generator(device=device).manual_seed(0)
    d = DIMS

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_()

    return {
        "query": randn(seq, 1, heads, d["qk_head_dim"] + d["qk_pos_emb_head_dim"]),
        "latent": randn(seq, 1, d["kv_lora_rank"] + d["qk_pos_emb_head_dim"]),
        "kv_up_weight": randn(heads * (d["qk_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"], scale=0.05),
        "q_i": randn(seq, 1, index_heads, INDEX_DIM),
        "w": randn(seq, 1, index_heads),
        "k_i": randn(seq, 1, INDEX_DIM),
    }


def step(path: str, topk: int, x: dict) -> None:
    attn = core_attention(path, topk)
    seq = x["latent"].shape[0]
    inputs = LatentAttentionInputs(q_positions=torch.arange(seq, device=x["latent"].device),
                                   index_keys=x["k_i"], kv_up_weight=x["kv_up_weight"])
    args = (x["query"], x["latent"], inputs, x["q_i"], x["w"], 1.0, OneRank())
    if path == "dense":
        out, loss = GLMSparseAttention._dense(attn, *args)
    else:
        out, loss = GLMSparseAttention._sparse(attn, *args, path)
    (out.float().square().mean() + loss).backward()


def peak_bytes(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(path: str, seq: int, topk: int, heads: int, index_heads: int, device, dtype, repeats: int) -> dict:
    x = make_inputs(seq, heads, device, dtype, index_heads)

    def run():
        for t in x.values():
            t.grad = None
        step(path, topk, x)

    start, cpu_start = time.perf_counter(), time.process_time()
    peak = peak_bytes(run, device)
    profiled, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    best = float("inf") if repeats else profiled
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"path": path, "seq_length": seq, "topk": topk, "heads": heads, "index_heads": index_heads,
            "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "peak_memory_gb": round(peak / 2**30, 4),
            "seconds": round(best, 4), "cpu_seconds_profiled_run": round(cpu_seconds, 4)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lengths", default="1024,2048,4096")
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--paths", default=None, help="comma-separated: dense, blockwise, triton")
    p.add_argument("--index-heads", type=int, default=INDEX_HEADS,
                   help="indexer heads (GLM-5: 32); fewer makes long CPU runs affordable")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs after the profiled one (0: time the profiled run itself)")
    p.add_argument("--dense-limit-gb", type=float, default=16.0)
    p.add_argument("--bf16", action="store_true", help="bf16 inputs (default fp32)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.paths:
        paths = args.paths.split(",")
    else:
        from model.kernels import triton_usable

        paths = ["dense", "triton" if triton_usable(device) else "blockwise"]
    for bad in set(paths) - {"dense", "blockwise", "triton"}:
        raise SystemExit(f"--paths: unknown path {bad!r} (dense, blockwise, triton)")
    try:
        seqs = [int(s) for s in args.seq_lengths.split(",")]
    except ValueError:
        raise SystemExit(f"--seq-lengths: expected comma-separated integers, got {args.seq_lengths!r}")
    for seq in seqs:
        for path in paths:
            # today's path holds about 6 fp32 [heads, S, S] buffers at once (scores, masks, softmax)
            dense_gb = 6 * 4 * (args.heads + 1) * seq * seq / 2**30
            if path == "dense" and dense_gb > args.dense_limit_gb:
                print(json.dumps({"path": path, "seq_length": seq, "topk": args.topk, "heads": args.heads,
                                  "skipped": f"estimated {dense_gb:.0f} GB > --dense-limit-gb"}), flush=True)
                continue
            print(json.dumps(measure(path, seq, args.topk, args.heads, args.index_heads, device, dtype,
                                     args.repeats)), flush=True)


if __name__ == "__main__":
    main()
