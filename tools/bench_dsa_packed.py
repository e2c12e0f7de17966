"""Peak memory and time of one GLM-5 attention layer (MLA + DSA) on packed documents, under context parallelism.

    torchrun --nproc_per_node 2 tools/bench_dsa_packed.py --seq-length 32768 --context-parallel-size 2 \\
        [--heads 4] [--index-heads 32] [--topk 2048] [--mean-document 4096] [--one-document]

What runs on each CP rank: the whole attention layer as the model builds it (model/specs.py: MLA projections,
the one all-gather of [latent | k_pe | k_I] over CP, RoPE at per-document positions, the indexer's top-k
inside each document, sparse attention, the indexer's sparse KL loss), forward + backward, at GLM-5's
dimensions (hidden 6144, q_lora 2048, kv_lora 512, nope 192, rope 64, v 256, indexer heads of 128) with
`--heads` query heads (a TP rank's share), batch 1, fp32, the torch blockwise path (--dsa-kernel-backend
blockwise). The sequence is packed from documents of uniformly distributed lengths (mean
`--mean-document`, 1/4 to 7/4 of it, fixed seed), so documents cross the CP chunks; `--one-document` runs the same layer with
one document over the whole sequence (every earlier key a candidate), for comparison.

peak_memory_gb: as tools/bench_dsa.py measures it (on CPU the running sum of the allocations and frees the
torch profiler records, from before the forward: layer input and weights excluded). seconds: wall time of
the profiled forward + backward; cpu_seconds: CPU time this process spent in it. Rank 0 prints one JSON line
with every rank's figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def documents(seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    """Input tokens [1, seq] of packed documents: EOD (0) ends each one, other tokens are 1."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.ones(1, seq, dtype=torch.long)
    pos = 0
    while True:
        pos += int(torch.randint(mean // 4, 7 * mean // 4 + 1, (1,), generator=g))
        if pos >= seq:
            return tokens
        tokens[0, pos - 1] = 0


def build(args, tconfig):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from model.specs import LocalBackend, attention_spec

    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp", "tp_cp"])
    layer = build_module(attention_spec(LocalBackend(), tconfig), config=tconfig, layer_number=1, pg_collection=pgs)
    return layer.train()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--context-parallel-size", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="query heads (a TP rank's share of GLM-5's 64)")
    p.add_argument("--index-heads", type=int, default=32)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--mean-document", type=int, default=4096)
    p.add_argument("--one-document", action="store_true")
    args = p.parse_args(argv)

    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.cp_attention import split_for_context_parallel
    from model.modules.documents import document_layout
    from model.presets import get_preset
    from parallel import runtime as rt
    from parallel.dims import ParallelDims
    from tools.bench_dsa import peak_bytes

    cp, seq = args.context_parallel_size, args.seq_length
    cfg = get_preset("glm5").replace(num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                     index_n_heads=args.index_heads, num_hidden_layers=1, first_k_dense_replace=1,
                                     num_nextn_predict_layers=0)
    runtime = rt.init_distributed()
    try:
        dims = ParallelDims(world_size=runtime.world_size, cp=cp)
        rt.init_model_parallel(dims, 1, seed=1234)
        tconfig = to_transformer_config(cfg, ModelOptions(
            dsa_indexer_topk=args.topk, dsa_indexer_loss_coeff=1.0,
            dsa_indexer_use_sparse_loss=True, dsa_kernel_backend="blockwise"), dims)
        layer = build(args, tconfig)
        rank = dist.get_rank()
        tokens = documents(seq, args.mean_document)
        mask = None if args.one_document else split_for_context_parallel(
            document_layout(tokens, 0, True, True), cp, rank, dim=2)
        g = torch.Generator().manual_seed(rank)
        hidden = torch.randn(seq // cp, 1, cfg.hidden_size, generator=g).requires_grad_()

        def step():
            out, _ = layer(hidden, attention_mask=mask)
            out.square().mean().backward()

        start, cpu_start = time.perf_counter(), time.process_time()
        peak = peak_bytes(step, torch.device("cpu"))
        mine = {"rank": rank, "peak_memory_gb": round(peak / 2**30, 3),
                "seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(time.process_time() - cpu_start, 1)}
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if rank == 0:
            n_docs = int((tokens == 0).sum()) + 1
            print(json.dumps({"seq_length": seq, "context_parallel_size": cp, "heads": args.heads,
                              "index_heads": args.index_heads, "topk": args.topk,
                              "documents": 1 if args.one_document else n_docs,
                              "mean_document": seq if args.one_document else args.mean_document,
                              "ranks": ranks}), flush=True)
    finally:
        rt.shutdown()


if __name__ == "__main__":
    main()
