"""The GLM-5 / DeepSeek-V3 training recipe, applied step by step from outside the model:

- MTP loss weight by consumed tokens (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1);
- the aux-loss-free expert-bias update rate by consumed tokens (1e-3, then 0 for the last tokens);
- DSA stages: a dense warm-up in which only the indexer trains (KL to the main attention), then
  sparse training of everything with top-k selection and the indexer loss on selected keys;
- the batch-size ramp (megatron-core's num_microbatches_calculator, Megatron-LM's flag).

Schedules are written `VALUE[,TOKENS:VALUE...]`, tokens with K/M/B/T suffixes: "0.3,10T:0.1".
Everything is a function of (iteration, consumed tokens), so a resumed run reproduces it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    unit = text[-1] if text and text[-1] in _UNITS else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"{text!r} is not a token count (e.g. 469B, 10T)") from None


@dataclass(frozen=True)
class TokenSchedule:
    """A piecewise-constant value by consumed tokens."""

    start: float
    points: tuple[tuple[int, float], ...] = ()

    @classmethod
    def parse(cls, text: str | float, flag: str = "schedule") -> "TokenSchedule":
        if isinstance(text, (int, float)):
            return cls(float(text))
        head, *rest = [p for p in str(text).split(",") if p.strip()]
        points = []
        try:
            for part in rest:
                tokens, value = part.split(":")
                points.append((parse_tokens(tokens), float(value)))
            start = float(head)
        except ValueError as e:
            raise ValueError(f"{flag} {text!r}: expected VALUE[,TOKENS:VALUE...] ({e})") from None
        if [p[0] for p in points] != sorted(p[0] for p in points):
            raise ValueError(f"{flag} {text!r}: token thresholds must increase")
        return cls(start, tuple(points))

    def __call__(self, consumed_tokens: int) -> float:
        i = bisect.bisect_right([p[0] for p in self.points], consumed_tokens)
        return self.start if i == 0 else self.points[i - 1][1]


@dataclass
class RecipeConfig:
    mtp_loss_scaling: TokenSchedule = TokenSchedule(0.3)
    bias_update_rate: TokenSchedule = TokenSchedule(1e-3)
    dsa_warmup_iters: int = 0
    dsa_warmup_lr: float | None = None
    dsa_sparse_loss: bool = True  # in the sparse stage, the indexer loss on the selected keys only


def is_indexer_param(name: str) -> bool:
    return ".indexer." in name


class Recipe:
    """Applies the schedules to megatron-core's config and the optimizer before each step."""

    def __init__(self, rc: RecipeConfig, tconfig, chunks, indexer_loss_coeff: float, tokens_per_microbatch: int):
        self.rc, self.tconfig, self.chunks = rc, tconfig, chunks
        self.indexer_loss_coeff = indexer_loss_coeff
        self.indexers = [m for c in chunks for n, m in c.named_modules() if n.endswith("core_attention.indexer")]
        self.sparse_topk = tconfig.dsa_indexer_topk
        self._warmup_now = False  # read by the hooks of zero_grads_as_produced
        self.tokens_per_microbatch = tokens_per_microbatch

    def scale_indexer_loss(self, grad_scale_func, device: torch.device) -> None:
        """Before each forward-backward. megatron scales the indexer's KL (a per-micro-batch mean) by
        1, while the main loss is a token sum that the engine normalizes by the global token count
        (megatron's after the backward, DeepSpeed's before it, in grad_scale_func): weigh the KL by
        its tokens and pass it through the same grad_scale_func, as megatron-core's schedule does
        for the MoE and MTP auxiliary losses."""
        tokens = torch.tensor(float(self.tokens_per_microbatch), device=device)
        DSAIndexerLossAutoScaler.set_loss_scale(grad_scale_func(tokens).reshape(()))

    def in_dsa_warmup(self, iteration: int) -> bool:
        return iteration < self.rc.dsa_warmup_iters

    def zero_grads_as_produced(self) -> None:
        """For engines that reduce gradients during backward (DeepSpeed ZeRO-2), where zeroing them
        before the step is too late: in the warm-up, every non-indexer gradient is zero as autograd
        produces it (with zero Adam moments at the start and no weight decay, those weights stay)."""
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if p.requires_grad and not is_indexer_param(name):
                    p.register_hook(lambda g: torch.zeros_like(g) if self._warmup_now else g)

    def before_step(self, iteration: int, consumed_tokens: int) -> dict[str, float]:
        """`iteration` is the 0-based index of the step about to run."""
        c = self.tconfig
        warmup = self.in_dsa_warmup(iteration)
        self._warmup_now = warmup
        c.mtp_loss_scaling_factor = self.rc.mtp_loss_scaling(consumed_tokens)
        c.moe_router_bias_update_rate = 0.0 if warmup else self.rc.bias_update_rate(consumed_tokens)
        # Warm-up: dense attention (top-k = every key) and the dense KL; then sparse.
        for indexer in self.indexers:
            indexer.topk = 1 << 62 if warmup else self.sparse_topk
        c.dsa_indexer_use_sparse_loss = (not warmup) and self.rc.dsa_sparse_loss
        return {"mtp-loss-scaling-factor": c.mtp_loss_scaling_factor,
                "moe/bias-update-rate": c.moe_router_bias_update_rate,
                "dsa/stage": 0.0 if warmup else 1.0}

    def before_optimizer_step(self, iteration: int, optimizer) -> None:
        """In the DSA warm-up only the indexer trains: zero every other gradient, no weight decay."""
        if not self.in_dsa_warmup(iteration):
            return
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if not is_indexer_param(name):
                    if getattr(p, "main_grad", None) is not None:
                        p.main_grad.zero_()
                    if p.grad is not None:
                        p.grad.zero_()
        for group in optimizer.param_groups:
            group["weight_decay"] = 0.0
            if self.rc.dsa_warmup_lr is not None:
                group["lr"] = self.rc.dsa_warmup_lr
