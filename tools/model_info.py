"""Print a GLM-5 model's sizes and training FLOPs as one JSON object.

    python tools/model_info.py --preset glm5 [--seq-length 4096]
    python tools/model_info.py --recipe launch/recipes/glm5-576xh100.args   # + memory per GPU, total tokens
    python tools/model_info.py --preset glm5.3-flash --seq-length 131072 --world-size 2304 \
        --pipeline-model-parallel-size 9 --expert-model-parallel-size 32 --context-parallel-size 8 \
        --use-distributed-optimizer --recompute-granularity full   # GLM-5.3-Flash: + its memory plan

A recipe is a file of launch/pretrain.py flags (the SLURM config format) with a `# world-size: N` line.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.accounting import flops_per_token, memory_per_gpu, model_info  # noqa: E402
from model.accounting_flash import model_info as flash_info  # noqa: E402
from model.config import GLM5Config, read_hf_json  # noqa: E402
from model.config_flash import is_flash  # noqa: E402
from model.config_flash import GLM5FlashConfig  # noqa: E402
from model.presets import DEFAULT_SEQ_LENGTH, FLASH_PRESETS, PRESETS, get_preset  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="glm5", help=f"one of {sorted(PRESETS) + sorted(FLASH_PRESETS)}")
    p.add_argument("--model-config", default=None, help="an HF config.json instead of a preset")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--mtp-num-layers", type=int, default=None,
                   help="MTP depths (GLM-5.2: 7 with --mtp-use-repeated-layer); default one per MTP layer")
    p.add_argument("--recipe", default=None, help="a flags file with a '# world-size: N' line; "
                   "training flags after it override the file's (e.g. --dp-engine deepspeed --zero-stage 2)")
    args, overrides = p.parse_known_args(argv)
    if args.recipe:
        print(json.dumps(recipe_info(args.recipe, p, overrides)))
        return
    seq = args.seq_length or DEFAULT_SEQ_LENGTH.get(args.preset, 4096)
    try:
        flash = flash_config(args)
        if flash is not None:  # GLM-5.3-Flash: its own counts (model/accounting_flash.py), its memory plan
            info = {"preset": None if args.model_config else args.preset, **flash_info(flash, seq)}
            print(json.dumps({**info, **flash_memory(flash, seq, p, overrides)}))
            return
        if overrides:
            p.error(f"unrecognized arguments: {' '.join(overrides)}")
        cfg = GLM5Config.load_hf_json(args.model_config) if args.model_config else get_preset(args.preset)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    info = {"preset": None if args.model_config else args.preset, **model_info(cfg, seq, args.mtp_num_layers)}
    print(json.dumps(info))


def flash_config(args) -> GLM5FlashConfig | None:
    """The GLM-5.3-Flash config a --preset or a glm5_next --model-config names, None for GLM-5's."""
    if args.model_config:
        d = read_hf_json(args.model_config)
        return GLM5FlashConfig.from_hf_dict(d) if is_flash(d) else None
    return FLASH_PRESETS.get(args.preset)


def flash_memory(cfg: GLM5FlashConfig, seq: int, parser, argv: list[str]) -> dict:
    """GLM-5.3-Flash's memory plan (model/accounting_flash.py memory_plan) for the layout flags in `argv`
    (Megatron-LM's names; --world-size the GPUs); {} without --world-size. --context-parallel-size is what CP
    would need: Flash refuses CP for training today."""
    from model.accounting_flash import memory_plan

    f = argparse.ArgumentParser(prog="model_info.py (GLM-5.3-Flash)")
    f.add_argument("--world-size", type=int, default=None)
    for flag in ("--pipeline-model-parallel-size", "--expert-model-parallel-size", "--context-parallel-size",
                 "--micro-batch-size", "--recompute-num-layers"):
        f.add_argument(flag, type=int, default=1)
    f.add_argument("--global-batch-size", type=int, default=None)
    f.add_argument("--hybrid-layer-pattern", default=None)
    f.add_argument("--recompute-granularity", choices=["full"], default=None)
    f.add_argument("--use-distributed-optimizer", dest="distributed_optimizer", action="store_true")
    f.add_argument("--absorbed-mla", action="store_true",
                   help="assume a sparse kernel that keeps each key's MLA latent, not per-head keys and values")
    a, rest = f.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.world_size is None:
        return {}
    pp, ep, cp, mbs = (a.pipeline_model_parallel_size, a.expert_model_parallel_size, a.context_parallel_size,
                       a.micro_batch_size)
    if a.world_size % (pp * cp) or seq % cp:
        parser.error(f"--world-size {a.world_size} / --seq-length {seq}: not divisible by PP x CP = {pp * cp} / CP {cp}")
    dp = a.world_size // (pp * cp)
    micro = a.global_batch_size // (mbs * dp) if a.global_batch_size else None
    try:
        plan = memory_plan(cfg, pp=pp, ep=ep, dp=dp, cp=cp, seq_length=seq // cp, micro_batch_size=mbs,
                           distributed_optimizer=a.distributed_optimizer, full_recompute=a.recompute_granularity == "full",
                           recompute_num_layers=a.recompute_num_layers, num_microbatches=micro,
                           layout=a.hybrid_layer_pattern, absorbed_mla=a.absorbed_mla)
    except ValueError as e:
        parser.error(str(e))
    return {"layout": {"tp": 1, "pp": pp, "cp": cp, "dp": dp, "ep": ep}, "sparse_attention_path": True, **plan,
            **({"note": "CP > 1 is refused for GLM-5.3-Flash training today (model/mcore_config_flash.py)"}
               if cp > 1 else {})}


def total_samples(iters: int, gbs: int, ramp: list[int] | None) -> tuple[int, int]:
    """(samples, of which during the ramp) over `iters` steps, by the trainer's own ramp (data/batch_ramp.py)."""
    if not ramp:
        return iters * gbs, 0
    from data.batch_ramp import BatchRamp

    schedule = BatchRamp(*ramp, gbs)
    ramp_steps = next(step for step in range(iters + 1)
                      if step == iters or schedule.consumed_before(step) >= schedule.ramp_samples)
    return schedule.consumed_before(iters), schedule.consumed_before(ramp_steps)


def recipe_info(path: str, parser, overrides: list[str] = ()) -> dict:
    from pretrain.config.arguments import build_parser, with_vocab_size
    from tools.lib.recipe_file import RecipeError, read_recipe

    try:
        flags, world = read_recipe(path)
    except RecipeError as e:
        parser.error(str(e))
    args = build_parser().parse_args([*flags, *overrides])
    cfg = with_vocab_size(GLM5Config.load_hf_json(args.model_config) if args.model_config else get_preset(args.preset),
                          args)
    depths = cfg.mtp_depths(args.mtp_num_layers)
    seq = args.seq_length or DEFAULT_SEQ_LENGTH.get(args.preset, 4096)
    dims = ParallelDims.from_args(args, world)
    tp, pp, cp, etp = dims.tp, dims.pp, dims.cp, dims.expert_tp
    if world % (tp * pp * cp):
        parser.error(f"--recipe {path}: world size {world} is not divisible by TP x PP x CP = {tp * pp * cp}")
    dp = dims.dp
    if dims.hybrid_pattern is not None:  # its '|' may cut a GLM layer: the plan counts each stage's halves
        try:
            dims.validate_hybrid_pattern(cfg, depths)
        except ValueError as e:
            parser.error(f"--recipe {path}: {e}")
    layout, vpp = dims.hybrid_pattern or dims.pipeline_layout, dims.vpp(cfg.num_hidden_layers)
    # Every pipeline stage (they differ: embedding first, head + MTP last); Transformer Engine's
    # layer layout (a GPU run's). tools/simulate_layout.py checks these against the built model.
    stages = [memory_per_gpu(cfg, tp=tp, pp=pp, ep=dims.ep, etp=etp, dp=dp, cp=cp,
                             seq_length=seq // cp, micro_batch_size=args.micro_batch_size,
                             distributed_optimizer=args.use_distributed_optimizer,
                             recompute_granularity=args.recompute_granularity,
                             recompute_modules=args.recompute_modules,
                             zero_stage=args.zero_stage if args.dp_engine == "deepspeed" else 0,
                             offload_optimizer=args.zero_offload_optimizer, pp_rank=stage, vpp=vpp,
                             bf16=args.bf16, num_microbatches=args.global_batch_size // (args.micro_batch_size * dp),
                             microbatch_group_size=dims.microbatch_group_size,
                             layout=layout, mtp_depths=depths, optimizer=args.optimizer,
                             mtp_loss_type=args.mtp_loss_type,
                             make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
              for stage in range(pp)]
    for m in stages:
        m["memory_gb_total_estimate"] = sum(
            v for k, v in m.items() if k.endswith(("_gb", "_estimate")) and not k.startswith("host_"))
    memory = max(stages, key=lambda m: m["memory_gb_total_estimate"])  # the stage that must fit
    samples, ramp = total_samples(args.train_iters, args.global_batch_size, args.rampup_batch_size)
    engine = "megatron" if args.dp_engine == "megatron" else (
        f"deepspeed zero-{args.zero_stage}" + ("+offload" if args.zero_offload_optimizer else ""))
    return {"recipe": path, "world_size": world, "layout": {"tp": tp, "pp": pp, "cp": cp, "dp": dp,
            "ep": dims.ep, "etp": etp}, "seq_length": seq, "dp_engine": engine,
            "optimizer": args.optimizer, "mtp_depths": depths,
            "mtp_loss_type": args.mtp_loss_type,
            "flops_per_token": flops_per_token(cfg, seq, mtp_depths=depths),
            "train_iters": args.train_iters, "total_tokens": samples * seq, "ramp_tokens": ramp * seq,
            **memory, "stages": stages}

if __name__ == "__main__":
    main()
