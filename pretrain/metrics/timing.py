"""Per-phase timers: megatron-core's `Timers`, at --timing-log-level, the same object megatron-core's
schedules, DDP and optimizer time themselves with (`config.timers`), and the trainer's own phases.

Levels (Megatron-LM's): a timer above the run's level is megatron's DummyTimer, which does nothing.
Level 0 times only checkpoint saves; the iteration time comes from the host clock, so level 0 adds
no device synchronisation, barrier or collective to a training step. Levels 1 and 2 synchronise the
device at each timer start and stop (and barrier before level-1 timers unless
--no-barrier-with-level-1-timing), and gather every rank's times at each log interval.
"""

from __future__ import annotations

import contextlib

from megatron.core.timers import Timers

# Megatron-LM's training_log list, with megatron-core 0.19.2's gradient-reduction names
# (tests/pretrain/metrics/test_observability.py checks that every timer megatron-core starts is here).
TIMERS_TO_LOG = (
    "forward-backward", "forward-compute", "backward-compute", "batch-generator",
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
    "non-tensor-parallel-grads-all-reduce", "conditional-embedder-grads-all-reduce", "embedding-grads-all-reduce",
    "all-grads-sync", "params-all-gather",
    "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf", "optimizer-clip-main-grad",
    "optimizer-count-zeros", "optimizer-inner-step", "optimizer-copy-main-to-model-params", "optimizer",
)
SAVE = "save-checkpoint"


class Timing:
    def __init__(self, level: int, option: str, barrier_with_l1_time: bool, to_tensorboard: bool):
        self.level, self.option, self.to_tensorboard = level, option, to_tensorboard
        self.barrier_with_l1_time = barrier_with_l1_time
        self.timers = Timers(level, option)

    def attach(self, tconfig) -> None:
        """Give megatron-core's schedules and gradient reduction the timers (the optimizer gets them
        through its OptimizerConfig: pretrain/engine/optimizer.py)."""
        tconfig.timers = self.timers
        tconfig.barrier_with_L1_time = self.barrier_with_l1_time

    @contextlib.contextmanager
    def paused(self, tconfig):
        """megatron-core's schedule without the timers (an evaluation is no training phase: its forward
        passes must not count as the next log interval's forward-backward)."""
        tconfig.timers = None
        try:
            yield
        finally:
            tconfig.timers = self.timers

    @contextlib.contextmanager
    def timed(self, name: str, level: int, barrier: bool = False):
        """Time the block under `name` if `level` is on (else megatron's DummyTimer: nothing happens). A
        block that raises leaves its timer running: no barrier on the way out of a failure."""
        self.timers(name, log_level=level).start(barrier=barrier)
        yield
        self.timers(name, log_level=level).stop(barrier=barrier)

    def phase(self, name: str):
        """A level-1 phase, timed as megatron-core times its own (barrier_with_L1_time)."""
        return self.timed(name, 1, barrier=self.barrier_with_l1_time)

    def collect(self, names=TIMERS_TO_LOG, iterations: int = 1) -> tuple[dict[str, float], str | None]:
        """(scalars, log block) of the timers in `names`, per iteration over the last `iterations`, then
        reset. A collective (every rank calls it, the same names) when any of them is on; nothing
        happens when none is (level 0 on the hot path)."""
        names = [n for n in names if n == SAVE or self.level > 0]
        if not names:
            return {}, None
        text = self.timers.get_all_timers_string(names, normalizer=iterations, reset=False)
        # megatron-core's min/max over ranks (Timers.write uses it for TensorBoard: the max as '<name>-time')
        minmax = self.timers._get_global_min_max_time(names, reset=True, barrier=False, normalizer=iterations)
        scalars = {}
        if self.to_tensorboard:
            for name, (low, high) in minmax.items():
                scalars[f"{name}-time"] = high
                if self.option != "max":
                    scalars[f"{name}-time-min"] = low
        return scalars, text
