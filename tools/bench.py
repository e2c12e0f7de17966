"""Training throughput benchmark: one JSON line with tokens/s, model TFLOP/s per GPU, MFU and peak memory.

    torchrun --nproc_per_node 1 tools/bench.py --preset glm5-proxy --fp8-recipe blockwise --iters 20
    python tools/bench.py --preset tiny --iters 5            # CPU

Takes every launch/pretrain.py flag (layout, precision, batch, --timing-log-level; --log-interval N prints the log
lines and gathers the timers every N iterations, as training does); trains on mock data and reports the
steady state (the first `--warmup` iterations are excluded). MFU is against the device's dense bf16
peak (989 TFLOP/s for an H100 SXM); FLOPs are model FLOPs from model/accounting.py.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from parallel import runtime as rt  # noqa: E402
from pretrain.config.arguments import build_parser, config_from_args  # noqa: E402
from pretrain.metrics.run_stats import memory_gb  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> None:
    parser = build_parser()
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv + (["--mock-data"] if "--mock-data" not in argv else []))
    args.train_iters = args.iters + args.warmup
    if "--log-interval" not in argv:  # no log lines unless asked for (timers gather at each one)
        args.log_interval = 10**9
    try:
        cfg = config_from_args(args, rt.world_size_from_env())
    except ValueError as e:
        parser.error(str(e))
    runtime = rt.init_distributed(cfg.distributed_timeout_s)
    try:
        trainer = Trainer(cfg, runtime)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        history = trainer.train()[args.warmup:]
        tokens = statistics.median(h["throughput/tokens-per-sec"] for h in history)
        tflops = statistics.median(h["throughput/tflops-per-gpu"] for h in history)
        name, peak = device_peak()
        (memory,) = memory_gb().values()  # this rank's peak as the trainer logs it (CUDA: since the reset)
        if runtime.rank == runtime.world_size - 1:
            print(json.dumps({
                "preset": cfg.preset, "device": name, "world_size": runtime.world_size,
                "layout": cfg.dims.describe(), "seq_length": cfg.seq_length,
                "global_batch_size": cfg.global_batch_size, "fp8_recipe": cfg.model_options.fp8_recipe,
                "bf16": cfg.model_options.bf16, "iters": args.iters,
                "timing_log_level": cfg.observability.timing_log_level,
                "tokens_per_sec": tokens, "tflops_per_gpu": tflops,
                "mfu": tflops / peak if peak else None,
                "peak_memory_gb": memory,
                "lm_loss": history[-1].get("lm loss"),
            }), flush=True)
        trainer.close()
    finally:
        rt.shutdown()


if __name__ == "__main__":
    main()
