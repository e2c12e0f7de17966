"""One metrics sink: Megatron-style stdout lines, and the same scalars to TensorBoard and (with
--wandb-project) Weights & Biases, from the logging rank.

The logging rank is the last rank (it is on the last pipeline stage, where losses exist).
"""

from __future__ import annotations

import sys

# (tag, label in the log line, format): Megatron-LM's labels where it prints the value
LOG_LINE = (("lm loss", "lm loss", ".6E"), ("mtp loss", "mtp loss", ".6E"),
            ("mtp_expected_acceptance_length", "mtp acceptance length", ".3f"),
            ("learning-rate", "learning-rate", ".6E"),
            ("grad-norm", "grad-norm", ".3f"), ("num-zeros", "num zeros", ".1f"), ("params-norm", "params norm", ".3f"),
            ("throughput/tokens-per-sec", "throughput/tokens-per-sec", ".3f"),
            ("throughput/tflops-per-gpu", "throughput/tflops-per-gpu", ".3f"),
            ("moe/load-imbalance", "moe/load-imbalance", ".3f"), ("skipped-iterations", "skipped-iterations", ".3f"))


def acceptance_part(scalars: dict[str, float], suffix: str = "") -> list[str]:
    """Each MTP depth's mean acceptance alpha_i in one log-line part, depth 1 first."""
    alphas, depth = [], 1
    while f"mtp_{depth}_acceptance_alpha{suffix}" in scalars:
        alphas.append(f"{scalars[f'mtp_{depth}_acceptance_alpha{suffix}']:.3f}")
        depth += 1
    return [f"mtp acceptance alpha: {'/'.join(alphas)}"] if alphas else []


class TensorBoardSink:
    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=directory, max_queue=10, flush_secs=5)

    def scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, iteration)

    def image(self, tag: str, image, iteration: int) -> None:
        self.writer.add_image(tag, image, iteration, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Metrics:
    def __init__(self, is_logging_rank: bool, cfg):
        self.enabled = is_logging_rank
        self.log_interval = cfg.log_interval
        self.ppl_to_sinks = cfg.observability.log_validation_ppl_to_tensorboard
        self.tensorboard = TensorBoardSink(cfg.tensorboard_dir) if self.enabled and cfg.tensorboard_dir else None
        self.sinks = [self.tensorboard] if self.tensorboard else []
        if self.enabled and cfg.observability.wandb_project:
            from pretrain.metrics.wandb_sink import WandbSink  # an optional extra

            self.sinks.append(WandbSink(cfg))

    def _write(self, iteration: int, scalars: dict[str, float], flush: bool) -> None:
        for sink in self.sinks:
            sink.scalars(iteration, scalars)
            if flush:
                sink.flush()

    def log(self, iteration: int, train_iters: int, scalars: dict[str, float], line: tuple[str, ...] = (),
            timers_text: str | None = None) -> None:
        """Every iteration's scalars; at log intervals the log line (with `line`'s "label: value" parts
        after the iteration) and the timers' block."""
        if not self.enabled:
            return
        logged = iteration % self.log_interval == 0
        self._write(iteration, scalars, flush=logged)
        if logged:
            parts = [f" iteration {iteration:8d}/{train_iters:8d}", *line]
            parts += [f"{label}: {scalars[name]:{fmt}}" for name, label, fmt in LOG_LINE if name in scalars]
            parts += acceptance_part(scalars)
            print(" | ".join(parts), flush=True, file=sys.stdout)
            self.text(timers_text)

    def log_timers(self, iteration: int, scalars: dict[str, float], text: str | None) -> None:
        """Timers read outside the step (a checkpoint save): their scalars and their block."""
        if self.enabled:
            self._write(iteration, scalars, flush=True)
            self.text(text)

    def text(self, text: str | None) -> None:
        if self.enabled and text:
            print(text, flush=True, file=sys.stdout)

    def image(self, tag: str, image, iteration: int) -> None:
        """An HxWx3 uint8 picture, to TensorBoard."""
        if self.enabled and self.tensorboard is not None:
            self.tensorboard.image(tag, image, iteration)

    def log_validation(self, iteration: int, scalars: dict[str, float]) -> None:
        """One evaluation: Megatron-LM's TensorBoard tags (the ppl with --log-validation-ppl-to-tensorboard),
        and one stdout line."""
        if not self.enabled:
            return
        self._write(iteration, {k: v for k, v in scalars.items() if self.ppl_to_sinks or not k.endswith(" ppl")},
                    flush=True)
        parts = [f" validation loss at iteration {iteration:8d}",
                 f"lm loss value: {scalars['lm loss validation']:.6E}",
                 f"lm loss PPL: {scalars['lm loss validation ppl']:.6E}"]
        if "mtp loss validation" in scalars:
            parts.append(f"mtp loss value: {scalars['mtp loss validation']:.6E}")
        if "mtp_expected_acceptance_length validation" in scalars:
            parts.append(f"mtp acceptance length: {scalars['mtp_expected_acceptance_length validation']:.3f}")
            parts += acceptance_part(scalars, " validation")
        print(" | ".join(parts), flush=True, file=sys.stdout)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
