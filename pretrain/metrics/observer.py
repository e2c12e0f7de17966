"""What the trainer calls around each step: the throughput and memory every run logs, --timing-*,
--log-* (besides the losses), --profile and the expert-load picture (docs/OBSERVABILITY.md); the trainer
hands the results to the one sink, pretrain/metrics/sink.py."""

from __future__ import annotations

import dataclasses

import numpy as np

from pretrain.metrics.heatmap import render
from pretrain.metrics.profiling import StepProfiler
from pretrain.metrics.run_stats import memory_gb, memory_scalars, params_norm
from pretrain.metrics.throughput import step_throughput, tflops_per_gpu
from pretrain.metrics.timing import SAVE, Timing


@dataclasses.dataclass
class StepReport:
    scalars: dict[str, float]
    line: tuple[str, ...] = ()  # "label: value" parts of the log line
    timers_text: str | None = None  # the timers' block under the log line
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # tag -> HxWx3 uint8


class Observer:
    def __init__(self, cfg, runtime, moe_stats, flops_per_token: float):
        self.cfg, self.obs = cfg, cfg.observability
        self.device, self.world_size = runtime.device, runtime.world_size
        self.logging_rank = runtime.rank == runtime.world_size - 1
        self.moe_stats, self.flops_per_token = moe_stats, flops_per_token
        self.timing = Timing(self.obs.timing_log_level, self.obs.timing_log_option, self.obs.barrier_with_l1_time,
                             self.obs.log_timers_to_tensorboard)
        self.profiler = StepProfiler(self.obs, runtime.rank, cfg.tensorboard_dir)
        self._interval = (0, 0.0, 0)  # iterations, seconds, tokens since the last log line
        self._log_lines = 0

    def before_step(self, done: int) -> None:
        self.profiler.before_step(done)

    def after_step(self, model, iteration: int, elapsed: float, tokens: int) -> StepReport:
        """What to log after `iteration`, which took `elapsed` seconds over `tokens` tokens (the global
        batch); collectives where asked for (every rank calls it)."""
        scalars = {**step_throughput(self.flops_per_token, tokens, elapsed, self.world_size), **memory_gb()}
        self.profiler.after_step(iteration)  # after the peak is read: a trace's export is not the step's
        if self.obs.log_params_norm:
            scalars["params-norm"] = params_norm(model, self.device)
        if self.obs.log_memory_to_tensorboard:
            scalars.update(memory_scalars(self.device))
        n, seconds, interval_tokens = (a + b for a, b in zip(self._interval, (1, elapsed, tokens)))
        self._interval = (n, seconds, interval_tokens)
        if iteration % self.cfg.log_interval:
            return StepReport(scalars)
        self._interval = (0, 0.0, 0)
        line = [f"elapsed time per iteration (ms): {1000 * seconds / n:.1f}"]
        if self.obs.log_timers_to_tensorboard:
            scalars["iteration-time"] = seconds / n  # Megatron-LM's: seconds, averaged over the log interval
        if self.obs.log_throughput:
            tflops = tflops_per_gpu(self.flops_per_token, interval_tokens, seconds, self.world_size)
            scalars["throughput"] = tflops
            line.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
        timer_scalars, text = self.timing.collect(iterations=n)
        scalars.update(timer_scalars)
        self._log_lines += 1
        every, images = self.obs.moe_load_heatmap_interval, {}
        if every and self._log_lines % every == 0 and self.logging_rank and self.moe_stats.per_layer:
            images["moe/expert-load"] = render(self.moe_stats.load())[0]
        return StepReport(scalars, tuple(line), text, images)

    def timed_save(self, save) -> tuple[dict[str, float], str | None]:
        """Run `save()` under the save-checkpoint timer (level 0: on in every run); (scalars, log block)."""
        with self.timing.timed(SAVE, 0, barrier=True):
            save()
        return self.timing.collect([SAVE])

    def close(self) -> None:
        self.profiler.stop()
