"""Build any rank of a large layout on one CPU and compare its memory with model/accounting.py.

    python tools/simulate_layout.py --recipe launch/recipes/glm5-576xh100.args --ranks 0,100,575
    python tools/simulate_layout.py --world-size 64 --preset tiny --tensor-model-parallel-size 2 ... --ranks 0

For each rank asked, in this one process: a fake process group of the recipe's world size (its
collectives do nothing), megatron-core's process groups for that rank (parallel/runtime.py), that
rank's model chunks built by model/builder.py on the meta device (tensors without storage), wrapped
as the trainer wraps them (pretrain/engine/optimizer.py: Float16Module, megatron DDP with its gradient buffers,
the optimizer -- the distributed optimizer builds its fp32 shard of the main params from DDP's
buffer layout). One JSON line per rank: what was built, the accounting's estimate, and their ratio.

Flags are launch/pretrain.py's (after --recipe's, overriding them). What cannot be simulated here:
--fp8-recipe needs Transformer Engine (the weights, gradients and optimizer state are the same bf16 /
fp32 tensors without it; TE's transient FP8 copies are not counted), and the layer specs are the
local backend's (see docs/MODEL.md); activations are the accounting's per-module formula, which
tools/measure_activations.py checks against real GLM-5-width layers (docs/MEMORY.md): megatron-core's
MoE dispatch cannot run on meta tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.accounting import memory_per_gpu  # noqa: E402
from parallel import runtime as rt  # noqa: E402
from parallel.compat import megatron_cpu  # noqa: E402
from parallel.compat.megatron_meta import on_meta  # noqa: E402

GIB = 2**30


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """torch.distributed as rank `rank` of `world_size`, without any other process."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers the "fake" backend)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        rt.shutdown()


def build_rank(cfg, rank: int, world_size: int) -> dict:
    """Build and wrap `rank`'s model chunks as the trainer does; measure what they hold (bytes)."""
    from megatron.core import parallel_state

    from model.builder import build_model
    from model.mcore_config import to_transformer_config
    from pretrain.engine.optimizer import build_optimizer, wrap_ddp, wrap_precision

    with fake_world(rank, world_size):
        rt.init_model_parallel(cfg.dims, cfg.model.num_hidden_layers, cfg.seed, gloo_groups=False)
        tconfig = to_transformer_config(cfg.model, cfg.model_options, cfg.dims)
        with on_meta():
            chunks = build_model(cfg.model, tconfig, cfg.model_options.use_te)
            params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
            model = wrap_ddp(wrap_precision(chunks, tconfig), tconfig, cfg)
            optimizer = build_optimizer(model, cfg, gloo_groups=False)
        return {"rank": rank, "pp_stage": parallel_state.get_pipeline_model_parallel_rank(),
                "params": params, **_measure(model, optimizer, cfg.model_options.bf16)}


def _measure(model, optimizer, bf16: bool) -> dict:
    weights = grads = 0
    for ddp in model:
        buffers = ddp.buffers + ddp.expert_parallel_buffers
        in_buffers = {id(p) for b in buffers for p in b.params}
        for b in buffers:
            grads += b.grad_data.numel() * b.grad_data.element_size()
            if b.param_data is not None:  # the distributed optimizer's contiguous weight buffer
                weights += b.param_data.numel() * b.param_data.element_size()
            else:
                weights += sum(p.numel() * p.element_size() for p in b.params)
        weights += sum(p.numel() * p.element_size() for p in ddp.parameters() if id(p) not in in_buffers)
        weights += sum(t.numel() * t.element_size() for name, t in ddp.named_buffers() if name.endswith("expert_bias"))
    # The optimizer's fp32 parameters (its shard under the distributed optimizer): copies of bf16
    # weights, views of fp32 ones. Adam creates its two moments like them at the first step, Muon
    # (--optimizer muon, its matrices) one momentum.
    optimizer_bytes = 0
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        main = sum(p.numel() for g in o.optimizer.param_groups for p in g["params"])
        optimizer_bytes += ((4 if bf16 else 0) + 4 * _moments(o.optimizer)) * main
    return {"weight_gb": weights / GIB, "grad_gb": grads / GIB, "optimizer_gb": optimizer_bytes / GIB}


def _moments(torch_optimizer) -> int:
    """fp32 state tensors per parameter: Muon's momentum, or Adam's two moments."""
    from emerging_optimizers.orthogonalized_optimizers import OrthogonalizedOptimizer  # a dependency (setup.cfg)

    return 1 if isinstance(torch_optimizer, OrthogonalizedOptimizer) else 2


def estimate(cfg, pp_rank: int) -> dict:
    d = cfg.dims
    return memory_per_gpu(
        cfg.model, tp=d.tp, pp=d.pp, ep=d.ep, etp=d.expert_tp, dp=d.dp, cp=d.cp,
        seq_length=cfg.seq_length // d.cp, micro_batch_size=cfg.micro_batch_size,
        distributed_optimizer=cfg.use_distributed_optimizer,
        recompute_granularity=cfg.model_options.recompute_granularity,
        recompute_modules=cfg.model_options.recompute_modules, pp_rank=pp_rank,
        vpp=d.vpp(cfg.model.num_hidden_layers), bf16=cfg.model_options.bf16,
        replicated_down_projection=cfg.model_options.use_te, num_microbatches=cfg.num_microbatches,
        microbatch_group_size=d.microbatch_group_size, layout=d.hybrid_pattern or d.pipeline_layout,
        mtp_depths=cfg.model_options.mtp_num_layers, optimizer=cfg.optimizer,
        mtp_loss_type=cfg.model_options.mtp_loss_type,
        make_vocab_size_divisible_by=cfg.model_options.make_vocab_size_divisible_by)


def simulate(cfg, rank: int, world_size: int) -> dict:
    built = build_rank(cfg, rank, world_size)
    est = estimate(cfg, built["pp_stage"])
    out = dict(built)
    for key, est_key in (("weight_gb", "weights_gb"), ("grad_gb", "grads_gb"), ("optimizer_gb", "optimizer_gb")):
        out[f"{key}_estimate"] = est[est_key]
        out[f"{key}_ratio"] = built[key] / est[est_key] if est[est_key] else None
    out["params_estimate"] = est["params_per_gpu"]
    out["activation_gb_estimate"] = est["activations_gb_estimate"]
    return out


def parse(argv=None):
    from pretrain.config.arguments import build_parser, config_from_args
    from tools.lib.recipe_file import RecipeError, read_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="a flags file with a '# world-size: N' line")
    p.add_argument("--world-size", type=int, default=None, help="without --recipe (or to override its)")
    p.add_argument("--ranks", default="0", help="comma-separated global ranks, e.g. 0,100,575")
    args, flags = p.parse_known_args(argv)
    world = args.world_size
    if args.recipe:
        try:
            recipe_flags, recipe_world = read_recipe(args.recipe)
        except RecipeError as e:
            p.error(str(e))
        flags, world = [*recipe_flags, *flags], world or recipe_world
    if not world:
        p.error("give --recipe FILE or --world-size N")
    train_args = build_parser().parse_args(flags)
    notes = []
    if train_args.fp8_recipe and not cpu_has_te():
        notes.append(f"--fp8-recipe {train_args.fp8_recipe} not simulated (no Transformer Engine): "
                     "bf16 weights, fp32 grads and optimizer state are the same without it")
        train_args.fp8_recipe = None
    if train_args.dp_engine != "megatron":
        p.error("--dp-engine deepspeed: DeepSpeed allocates its ZeRO partitions on a real device; "
                "tools/simulate_layout.py simulates --dp-engine megatron (tools/model_info.py estimates ZeRO)")
    try:
        cfg = config_from_args(train_args, world)  # the trainer's validation, before any work
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError as e:
        p.error(str(e))
    bad = [r for r in ranks if not 0 <= r < world]
    if bad:
        p.error(f"--ranks {args.ranks}: {bad} outside the world of {world}")
    return cfg, ranks, world, notes


def cpu_has_te() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def main(argv=None) -> None:
    cfg, ranks, world, notes = parse(argv)
    megatron_cpu.activate()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for rank in ranks:
        print(json.dumps(simulate(cfg, rank, world)), flush=True)


if __name__ == "__main__":
    main()
