"""Activation memory per rank, to compare context-parallel layouts (docs/CONTEXT_PARALLEL.md).

    torchrun --nproc_per_node N tools/bench_cp_memory.py [launch/pretrain.py flags] [--top K]

Builds this rank's model exactly as training does (pretrain.trainer.Trainer), runs the forward of one
micro-batch in training mode and counts the bytes autograd keeps for the backward
(`torch.autograd.graph.saved_tensors_hooks`; each storage counted once, parameters excluded): the
activation memory of that micro-batch, on CPU or GPU alike. On a GPU it also reports the peak of
`torch.cuda.memory_allocated` during the forward above what was allocated before it. Rank 0 prints
one JSON line with every rank's figures and, with --top K, rank 0's K largest saved tensors.

Example (the figure in the docs):
    for cp in 1 2; do torchrun --nproc_per_node $cp tools/bench_cp_memory.py --preset tiny --mock-data \\
        --seq-length 2048 --dsa-indexer-topk 256 --context-parallel-size $cp; done
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel import runtime as rt  # noqa: E402
from pretrain.config.arguments import parse_args  # noqa: E402
from pretrain.step import loss_func, split_microbatches  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def saved_activation_bytes(model, batch: dict, top: int = 0) -> dict:
    """Forward one micro-batch; bytes of the storages autograd saves for backward (no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, tuple, str]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (storage.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""))
        return t

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(batch["input_ids"], batch["position_ids"], attention_mask=None,
                       labels=batch["labels"], loss_mask=batch["loss_mask"])
        loss, _, _ = loss_func(batch["loss_mask"], output)
    result = {"saved_bytes": sum(v[0] for v in seen.values()), "saved_tensors": len(seen)}
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    if top:
        largest = sorted(seen.values(), reverse=True)[:top]
        result["largest"] = [{"bytes": b, "shape": list(s), "dtype": d} for b, s, d in largest]
    del loss, output
    return result


def main(argv: list[str]) -> None:
    top = 0
    if "--top" in argv:
        i = argv.index("--top")
        top, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    cfg = parse_args(argv, world_size=rt.world_size_from_env())
    runtime = rt.init_distributed(cfg.distributed_timeout_s)
    try:
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, runtime)
        if cfg.dims.pp != 1:
            raise SystemExit("bench_cp_memory measures one model chunk: use --pipeline-model-parallel-size 1")
        gen = torch.Generator().manual_seed(cfg.seed)
        tokens = torch.randint(cfg.model.vocab_size, (cfg.micro_batch_size, cfg.seq_length + 1), generator=gen)
        batch = {k: v.to(runtime.device) for k, v in split_microbatches(tokens, cfg.micro_batch_size)[0].items()}
        mine = saved_activation_bytes(trainer.model[0], batch, top if runtime.rank == 0 else 0)
        mine["rank"] = runtime.rank
        ranks = [None] * runtime.world_size
        dist.all_gather_object(ranks, mine)
        if runtime.rank == 0:
            print(json.dumps({
                "layout": cfg.dims.describe(), "preset": cfg.preset, "seq_length": cfg.seq_length,
                "micro_batch_size": cfg.micro_batch_size, "tokens_per_rank": batch["input_ids"].numel(),
                "max_saved_bytes": max(r["saved_bytes"] for r in ranks),
                "ranks": ranks,
            }), flush=True)
        trainer.close()
    finally:
        rt.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
