"""The batch-size ramp, Megatron-LM's `--rampup-batch-size START INCREMENT SAMPLES`: one definition for the
data reader, the trainer's learning-rate schedule (pretrain/engine/optimizer.py, samples_after) and the flag check.

Megatron-LM's rule: the global batch grows from START by INCREMENT every SAMPLES / ((GBS - START) / INCREMENT)
consumed samples, then stays at GBS. megatron-core 0.19.2 no longer has that calculator
(RampupBatchsizeNumMicroBatchesCalculator is gone, and `init_num_microbatches_calculator` ignores
`rampup_batch_size` without an error: the ramp would silently become a constant batch); it steps a
"THRESHOLD:BATCH" schedule instead (StepBatchsizeNumMicroBatchesCalculator). `step_schedule` writes the
ramp as that schedule, threshold by threshold where the old rule changes the batch, and the trainer
steps megatron-core's calculator with it. BatchRamp adds what a reader needs: the batch size and the
samples consumed before any step, with no state to carry.
"""

from __future__ import annotations

import math


def check_rampup_batch_size(rampup_batch_size: list[int], global_batch_size: int, unit: int = 1) -> None:
    """Refuse a ramp megatron-core would reject (with an assertion) or that does not split into whole
    micro-batches: START and INCREMENT positive multiples of `unit` (micro-batch size x data-parallel size),
    START below the global batch size and a whole number of INCREMENTs from it, SAMPLES positive. Errors
    name the flag: pretrain/config/arguments.py runs it before any work, BatchRamp again for direct callers."""
    start, increment, samples = rampup_batch_size
    for name, value in (("START", start), ("INCREMENT", increment)):
        if value <= 0 or value % unit:
            raise ValueError(f"--rampup-batch-size {name}={value} must be positive" + (
                f" and a multiple of --micro-batch-size x data-parallel size = {unit}" if unit > 1 else ""))
    if samples <= 0:
        raise ValueError(f"--rampup-batch-size SAMPLES={samples} must be positive")
    if start >= global_batch_size:
        raise ValueError(f"--rampup-batch-size START={start} must be below --global-batch-size {global_batch_size}")
    if (global_batch_size - start) % increment:
        raise ValueError(f"--rampup-batch-size: --global-batch-size {global_batch_size} - START {start} "
                         f"is not a multiple of INCREMENT {increment}")


def step_schedule(start: int, increment: int, ramp_samples: int, global_batch_size: int) -> str:
    """Megatron-LM's --rampup-batch-size as megatron-core's step schedule ("0:START T1:B1 ..."): at each
    threshold the batch that `int(consumed / (SAMPLES / n)) * INCREMENT + START` (n increments) gives
    from there on, and GBS once more than SAMPLES are consumed."""
    check_rampup_batch_size([start, increment, ramp_samples], global_batch_size)
    n = (global_batch_size - start) // increment
    per_increment = ramp_samples / n  # a float, as Megatron-LM computed it

    def steps(consumed: int) -> int:
        return n if consumed > ramp_samples else int(consumed / per_increment)

    entries = {0: start}
    for k in range(1, n + 1):
        t = max(1, math.ceil(k * per_increment))
        while t > 1 and steps(t - 1) >= k:  # the exact first sample count of step k under float division
            t -= 1
        while steps(t) < k:
            t += 1
        entries[t] = start + k * increment  # equal thresholds: the later (larger) batch wins, as the rule's
    return " ".join(f"{t}:{b}" for t, b in sorted(entries.items()))


class BatchRamp:
    """Step -> global batch size, and step -> samples consumed before it, under a ramp."""

    def __init__(self, start: int, increment: int, ramp_samples: int, global_batch_size: int):
        check_rampup_batch_size([start, increment, ramp_samples], global_batch_size)
        # imported here: megatron-core takes seconds to import, and only a ramp needs it
        from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator

        self.start, self.increment, self.ramp_samples, self.global_batch_size = (
            start, increment, ramp_samples, global_batch_size)
        # micro-batch size 1 and DP size 1: the rule only (divisibility is the flag check's, with the real unit)
        self.schedule = step_schedule(start, increment, ramp_samples, global_batch_size)
        self._rule = StepBatchsizeNumMicroBatchesCalculator(1, 1, False, -1, self.schedule)
        self._consumed = [0]  # samples consumed before step i, through the ramp

    def size_after(self, consumed: int) -> int:
        """The global batch size once `consumed` samples are consumed."""
        self._rule.update(consumed, consistency_check=False)
        return self._rule.get_current_global_batch_size()

    def consumed_before(self, step: int) -> int:
        while len(self._consumed) <= step and self._consumed[-1] <= self.ramp_samples:
            self._consumed.append(self._consumed[-1] + self.size_after(self._consumed[-1]))
        last = len(self._consumed) - 1
        if step <= last:
            return self._consumed[step]
        return self._consumed[last] + (step - last) * self.global_batch_size  # past the ramp

    def size(self, step: int) -> int:
        return self.size_after(self.consumed_before(step))
