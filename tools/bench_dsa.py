"""Peak memory and time of one layer's DSA core attention: megatron-core's DSAttention beside ours.

    python tools/bench_dsa.py --seq-lengths 1024,2048,4096 --topk 256 --heads 4 [--paths none,blockwise]

What runs: the core attention of one GLM-5 attention layer, forward + backward with the indexer's KL
loss (sparse stage, as after the warm-up), at GLM-5's dimensions (hidden 6144, q_lora 2048, kv_lora 512,
nope 192, rope 64, v 256, 32 indexer heads of 128; `--heads` query heads: a TP rank's share), batch 1.
Both implementations are built as modules from one megatron-core config and start from what the MLA
layer hands its core attention: the query heads [S, 1, heads, 256], the latent rows [S, 1, 576], this
rank's key/value up-projection weight, the layer input x [S, 1, 6144] and the normalized query latent
qr [S, 1, 2048]. Each includes its indexer (projections, RoPE, scores, top-k), the attention, the value
up-projection and the KL loss; the MLA projections before it are the same for both and not measured.

Paths, named as `--dsa-kernel-backend` names them:
  megatron-core 0.19.2's `DSAttention` + `DSAIndexer` (experimental_attention_variant/dsa.py), its
  `dsa_kernel_backend`:  `none` (torch, dense [b, S, S] index scores and attention),
                         `tilelang`, `cudnn` (fused kernels; CUDA, where the package imports);
  ours (model/modules/dsa.py `GLMSparseAttention`):  `dense` (the unfused reference of the tests),
                         `blockwise` (torch, O(S·k) memory; the CPU default), `triton` (kernels; CUDA).
Default: `none` plus the path our layer picks on this device.

peak_memory_gb: the highest memory held above what was allocated before the step (inputs and module
weights), over forward + backward, gradients included. On CUDA torch.cuda.max_memory_allocated; on CPU
the running sum of every allocation and free the torch profiler records (`profile_memory=True`; the
same allocator events, in order). seconds: wall time of one forward + backward, best of `--repeats`
runs outside the profiler (with `--repeats 0`, the profiled run's); cpu_seconds_profiled_run: CPU time
this process spent in the profiled run (on a shared CPU machine, what the wall time would be without
waiting for a core). A dense path (`none`, `dense`) is skipped (`"skipped"`) once its estimated
[heads, S, S] fp32 buffers pass `--dense-limit-gb` (16 by default); a backend that cannot run here is
reported as `"unavailable"` with the reason. One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DIMS = dict(hidden_size=6144, q_lora_rank=2048, kv_lora_rank=512, qk_head_dim=192, qk_pos_emb_head_dim=64,
            v_head_dim=256)
INDEX_HEADS, INDEX_DIM = 32, 128
UPSTREAM = ("none", "tilelang", "cudnn")  # megatron-core's dsa_kernel_backend values
OURS = ("dense", "blockwise", "triton")
DENSE = ("none", "dense")


def config(heads: int, index_heads: int, topk: int, backend: str, dtype):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(
        num_layers=1, num_attention_heads=heads, **DIMS, add_bias_linear=False, normalization="RMSNorm",
        multi_latent_attention=True, experimental_attention_variant="dsa", dsa_indexer_n_heads=index_heads,
        dsa_indexer_head_dim=INDEX_DIM, dsa_indexer_topk=topk, dsa_indexer_loss_coeff=1.0,
        dsa_indexer_use_sparse_loss=True,
        # the Hadamard rotation needs the fast_hadamard_transform package; q.k is invariant under it
        dsa_indexer_rotate_activation=False,
        dsa_kernel_backend=backend if backend in UPSTREAM else "none", rope_type="rope",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True)


def build(path: str, heads: int, index_heads: int, topk: int, device, dtype) -> torch.nn.Module:
    """The core attention of one layer as the model builds it (model/specs.py), on `device`, in training mode."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from model.specs import LocalBackend, attention_spec

    cfg = config(heads, index_heads, topk, path, dtype)
    if path in OURS:  # megatron-core validates its own values only; ours is set after (model/mcore_config.py)
        cfg.dsa_kernel_backend = "blockwise" if path == "dense" else path
    core = attention_spec(LocalBackend(), cfg).submodules.core_attention
    module = build_module(core, config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                          attention_type="self", softmax_scale=(DIMS["qk_head_dim"] + DIMS["qk_pos_emb_head_dim"]) ** -0.5,
                          pg_collection=ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"]))
    if path in OURS:
        module.dsa_path = path
    return module.to(device=device, dtype=dtype).train()


def make_inputs(seq: int, heads: int, device, dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    d = DIMS

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_()

    return {
        "query": randn(seq, 1, heads, d["qk_head_dim"] + d["qk_pos_emb_head_dim"]),
        "latent": randn(seq, 1, d["kv_lora_rank"] + d["qk_pos_emb_head_dim"]),
        "kv_up_weight": randn(heads * (d["qk_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"], scale=0.05),
        "x": randn(seq, 1, d["hidden_size"]),
        "qr": randn(seq, 1, d["q_lora_rank"]),
    }


def step(path: str, module, x: dict) -> None:
    """Forward + backward of the core attention; the indexer loss rides on the output's backward."""
    from megatron.core.transformer.enums import AttnMaskType

    from model.modules.dsa import LatentAttentionInputs

    seq, heads = x["query"].shape[0], x["query"].shape[2]
    if path in UPSTREAM:  # upstream's absorbed MLA hands DSAttention q.W_uk and the single-head latent
        w_kv = x["kv_up_weight"].view(heads, DIMS["qk_head_dim"] + DIMS["v_head_dim"], DIMS["kv_lora_rank"])
        w_uk, w_uv = torch.split(w_kv, [DIMS["qk_head_dim"], DIMS["v_head_dim"]], dim=1)
        q_nope, q_pe = torch.split(x["query"], [DIMS["qk_head_dim"], DIMS["qk_pos_emb_head_dim"]], dim=-1)
        query = torch.cat([torch.einsum("sbhd,hdc->sbhc", q_nope, w_uk), q_pe], dim=-1)
        out = module(query, x["latent"].unsqueeze(2), None, None, x=x["x"], qr=x["qr"],
                     attn_mask_type=AttnMaskType.causal, up_v_weight=w_uv)
    else:  # ours takes the query heads, the latent rows and the indexer keys made where the tokens live
        positions = torch.arange(seq, device=x["x"].device)
        inputs = LatentAttentionInputs(q_positions=positions, kv_up_weight=x["kv_up_weight"],
                                       index_keys=module.indexer.index_keys(x["x"], positions, seq))
        out = module(x["query"], x["latent"], inputs, None, x=x["x"], qr=x["qr"])
    out.float().square().mean().backward()


def unavailable(path: str, device) -> str | None:
    """Why `path` cannot run here, or None."""
    if path in ("tilelang", "cudnn", "triton") and device.type != "cuda":
        return f"{path} needs a CUDA device"
    if path == "triton":
        from model.kernels import triton_usable

        return None if triton_usable(device) else "Triton does not import"
    if path in ("tilelang", "cudnn"):
        import importlib

        from megatron.core.transformer.experimental_attention_variant import dsa_kernels

        try:  # what megatron-core's backend module imports lazily: tilelang; cudnn's DSA and FlashMLA
            module = importlib.import_module(dsa_kernels._BACKEND_MODULE_NAME_BY_BACKEND[path])
            if path == "cudnn":
                module._ensure_dsa_namespace()
                module._ensure_flash_mla()
            else:
                from megatron.core.transformer.experimental_attention_variant.ops import tilelang_utils

                if not tilelang_utils.HAVE_TILELANG:
                    return "the tilelang package does not import"
        except Exception as e:  # noqa: BLE001 -- reported, not raised: the other paths still run
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


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


def measure(path: str, module, seq: int, topk: int, heads: int, index_heads: int, device, dtype,
            repeats: int) -> dict:
    x = make_inputs(seq, heads, device, dtype)

    def run():
        for t in [*x.values(), *module.parameters()]:
            t.grad = None
        step(path, module, x)

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
    return {"path": path, "implementation": "megatron-core" if path in UPSTREAM else "ours",
            "seq_length": seq, "topk": topk, "heads": heads, "index_heads": index_heads,
            "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "peak_memory_gb": round(peak / 2**30, 4),
            "seconds": round(best, 4), "cpu_seconds_profiled_run": round(cpu_seconds, 4)}


def measure_path(path: str, seqs: list[int], args, device, dtype) -> None:
    module = build(path, args.heads, args.index_heads, args.topk, device, dtype)
    for seq in seqs:
        # a dense path holds about 6 fp32 [heads, S, S] buffers at once (scores, masks, softmax)
        dense_gb = 6 * 4 * (args.heads + 1) * seq * seq / 2**30
        if path in DENSE and dense_gb > args.dense_limit_gb:
            print(json.dumps({"path": path, "seq_length": seq, "topk": args.topk, "heads": args.heads,
                              "skipped": f"estimated {dense_gb:.0f} GB > --dense-limit-gb"}), flush=True)
            continue
        print(json.dumps(measure(path, module, seq, args.topk, args.heads, args.index_heads, device, dtype,
                                 args.repeats)), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lengths", default="1024,2048,4096")
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--paths", default=None,
                   help=f"comma-separated, of {', '.join(UPSTREAM + OURS)}; 'all' for every one")
    p.add_argument("--index-heads", type=int, default=INDEX_HEADS,
                   help="indexer heads (GLM-5: 32); fewer makes long CPU runs affordable")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs after the profiled one (0: time the profiled run itself)")
    p.add_argument("--dense-limit-gb", type=float, default=16.0)
    p.add_argument("--bf16", action="store_true", help="bf16 inputs and weights (default fp32)")
    args = p.parse_args(argv)
    if args.paths == "all":
        paths = list(UPSTREAM + OURS)
    elif args.paths:
        paths = args.paths.split(",")
        for bad in [q for q in paths if q not in UPSTREAM + OURS]:
            p.error(f"--paths: unknown path {bad!r} (one of {', '.join(UPSTREAM + OURS)}, or all)")
    else:
        paths = None
    try:
        seqs = [int(s) for s in args.seq_lengths.split(",")]
    except ValueError:
        p.error(f"--seq-lengths: expected comma-separated integers, got {args.seq_lengths!r}")
    if args.topk < 1 or args.heads < 1 or args.index_heads < 1:
        p.error("--topk, --heads and --index-heads must be positive")

    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    runtime = rt.init_distributed()
    try:
        rt.init_model_parallel(ParallelDims(world_size=1), num_layers=1, seed=1234)
        device, dtype = runtime.device, torch.bfloat16 if args.bf16 else torch.float32
        if paths is None:
            from model.kernels import triton_usable

            paths = ["none", "triton" if triton_usable(device) else "blockwise"]
        failed = []
        for path in paths:
            why = unavailable(path, device)
            if why:
                print(json.dumps({"path": path, "unavailable": why}), flush=True)
                continue
            try:  # one path's failure is reported; the others are still measured
                measure_path(path, seqs, args, device, dtype)
            except Exception as e:  # noqa: BLE001
                failed.append(path)
                print(json.dumps({"path": path, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}),
                      flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if failed:
            raise SystemExit(f"bench_dsa: {', '.join(failed)} failed")
    finally:
        rt.shutdown()


if __name__ == "__main__":
    main()
