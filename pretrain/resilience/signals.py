"""Stop on a signal at the next iteration boundary, with every rank agreeing.

SLURM warns a job before its time limit or preemption with a signal (`#SBATCH --signal=B:USR1@120` in
launch/slurm/pretrain.sbatch, whose trap passes SIGUSR1 on to torchrun, which passes it on to its
workers); `scancel` and most schedulers' preemption send SIGTERM. The handler only records the signal.
The loop asks `requested()` once per iteration: a MAX all-reduce of the recorded signal number, so all
ranks see the same answer at the same iteration even when the signal reached only some of them, and
then saves a checkpoint and leaves the loop normally (exit status 0).

    stop = StopSignal()                  # early, in the main thread: installs the handlers
    ...
    if stop.requested(device):           # after each iteration (a collective: every rank calls it)
        break                            # the loop's end saves the checkpoint
    stop.close()                         # restores the previous handlers
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from parallel.runtime import agree

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: signal.Signals | None = None  # the first signal this process got
        self.agreed: signal.Signals | None = None    # the signal all ranks agreed to stop on
        self._previous: dict[signal.Signals, object] = {}
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal must be created in the main thread (Python runs handlers there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        # Only record it: the step in progress (maybe inside a collective) finishes undisturbed.
        # A repeated signal (torchrun forwards what SLURM may already have delivered) changes nothing.
        if self.received is None:
            self.received = signal.Signals(signum)

    def requested(self, device: torch.device | str = "cpu", group=None) -> bool:
        """True on every rank once any rank got a signal. Collective over `group` (default: the world);
        `device` is where the backend reduces (CPU for gloo, the rank's GPU for NCCL)."""
        local = int(self.received) if self.received is not None else 0
        if dist.is_available() and dist.is_initialized():
            local = agree(local, dist.ReduceOp.MAX, device, group)
        if local and self.agreed is None:
            self.agreed = signal.Signals(local)
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"received {self.agreed.name}: saving a checkpoint and stopping", flush=True)
        return bool(local)

    def close(self) -> None:
        """Put back the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
