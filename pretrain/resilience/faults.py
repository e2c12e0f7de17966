"""Fault handling (non-finite steps, loss spikes, collective timeouts) and fault *injection*.

Injection exists so the test suite can prove each guarantee with a real fault: set
`GLM5_INJECT_FAULT` to a comma-separated list of `KIND@WHERE`, for example
`nan-loss@3` (iteration 3's loss becomes NaN), `hang@2:rank1` (rank 1 stops answering at
iteration 2), `kill@save-shards` (SIGKILL after the shards of a checkpoint are written, before it
is committed), `enospc@save-shards` (the disk is full there). Unset, it costs nothing.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from parallel.runtime import every_rank

ENV = "GLM5_INJECT_FAULT"


def _faults() -> list[tuple[str, str]]:
    spec = os.environ.get(ENV, "")
    return [tuple(item.split("@", 1)) for item in spec.split(",") if "@" in item]


def _matches(where: str, point: str) -> bool:
    place, _, rank = where.partition(":rank")
    return place == point and (not rank or int(rank) == dist.get_rank())


def inject(point: str) -> None:
    """Called at named points (`save-shards`, or an iteration number); acts only when asked to."""
    for kind, where in _faults():
        if not _matches(where, point):
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if kind == "hang":
            while True:
                time.sleep(3600)


def inject_loss_fault(iteration: int, loss: torch.Tensor) -> torch.Tensor:
    for kind, where in _faults():
        if kind == "nan-loss" and _matches(where, str(iteration)):
            return loss * float("nan")
    return loss


class TrainingDiverged(RuntimeError):
    pass


class StepGuard:
    """Skips optimizer steps whose gradients are not finite (every rank agrees), counts them, and
    stops the run after `max_consecutive` in a row, before anything is saved from the bad state.
    Also flags loss spikes: a loss above `spike_factor` x the running mean of recent good steps."""

    def __init__(self, max_consecutive: int, spike_factor: float | None, skip_spikes: bool):
        self.max_consecutive, self.spike_factor, self.skip_spikes = max_consecutive, spike_factor, skip_spikes
        self.consecutive = 0
        self.total_skipped = 0
        self.mean_loss: float | None = None

    @staticmethod
    def grads_finite(chunks, device: torch.device) -> bool:
        """Every rank's gradients are finite (a collective; `device`: the runtime's, where NCCL reduces)."""
        finite = True
        for chunk in chunks:
            grads = [p.main_grad for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
            if grads and not all(torch.isfinite(n) for n in torch._foreach_norm(grads)):
                finite = False
                break
        return every_rank(finite, device)

    def is_spike(self, loss: float | None) -> bool:
        return (loss is not None and self.spike_factor is not None and self.mean_loss is not None
                and loss > self.spike_factor * self.mean_loss)

    def record(self, skipped: bool, loss: float | None, iteration: int) -> None:
        if skipped:
            self.consecutive += 1
            self.total_skipped += 1
            if self.consecutive >= self.max_consecutive:
                raise TrainingDiverged(
                    f"{self.consecutive} consecutive iterations (up to {iteration}) had non-finite gradients or "
                    f"skipped loss spikes (--max-consecutive-skipped-iters {self.max_consecutive}); stopping "
                    "without saving: resume from the last checkpoint with a lower --lr or other data")
            return
        self.consecutive = 0
        if loss is not None and math.isfinite(loss):
            self.mean_loss = loss if self.mean_loss is None else 0.9 * self.mean_loss + 0.1 * loss


def explain_timeout(error: Exception, phase: str, iteration: int, timeout_s: float) -> Exception:
    text = str(error)
    if "timed out" in text.lower() or "timeout" in text.lower():
        return TimeoutError(
            f"rank {dist.get_rank()}: a collective in {phase} (iteration {iteration}) timed out after "
            f"{timeout_s:.0f}s (--distributed-timeout-minutes): another rank stopped answering. "
            f"Underlying error: {text.splitlines()[0] if text else type(error).__name__}")
    return error
