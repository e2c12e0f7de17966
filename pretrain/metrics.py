"""One metrics sink: Megatron-style stdout lines and TensorBoard scalars, from the logging rank.

The logging rank is the last rank (it is on the last pipeline stage, where losses exist).
"""

from __future__ import annotations

import resource
import sys
import time

import torch


def memory_gb() -> dict:
    if torch.cuda.is_available():
        return {"memory/max-allocated-gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"memory/max-rss-gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Metrics:
    def __init__(self, is_logging_rank: bool, tensorboard_dir: str | None, log_interval: int):
        self.enabled = is_logging_rank
        self.log_interval = log_interval
        self.writer = None
        if self.enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=10, flush_secs=5)
        self.last_time = time.perf_counter()

    def log(self, iteration: int, train_iters: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, iteration)
            if iteration % self.log_interval == 0:
                self.writer.flush()
        if iteration % self.log_interval == 0:
            parts = [f" iteration {iteration:8d}/{train_iters:8d}"]
            for name in ("lm loss", "mtp loss", "learning-rate", "grad-norm", "throughput/tokens-per-sec",
                         "throughput/tflops-per-gpu", "moe/load-imbalance", "skipped-iterations"):
                if name in scalars:
                    parts.append(f"{name}: {scalars[name]:.6E}" if "loss" in name or name == "learning-rate"
                                 else f"{name}: {scalars[name]:.3f}")
            print(" | ".join(parts), flush=True, file=sys.stdout)

    def log_validation(self, iteration: int, scalars: dict[str, float]) -> None:
        """One evaluation: Megatron-LM's TensorBoard tags, and one stdout line."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()
        parts = [f" validation loss at iteration {iteration:8d}",
                 f"lm loss value: {scalars['lm loss validation']:.6E}",
                 f"lm loss PPL: {scalars['lm loss validation ppl']:.6E}"]
        if "mtp loss validation" in scalars:
            parts.append(f"mtp loss value: {scalars['mtp loss validation']:.6E}")
        print(" | ".join(parts), flush=True, file=sys.stdout)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
