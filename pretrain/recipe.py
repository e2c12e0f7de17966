"""The GLM-5 / DeepSeek-V3 training recipe, applied step by step from outside the model:

- MTP loss weight by consumed tokens (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1);
- the aux-loss-free expert-bias update rate by consumed tokens (1e-3, then 0 for the last tokens);
- DSA stages: a dense warm-up in which only the indexer trains (KL to the main attention), then
  sparse training of everything with top-k selection and the indexer loss on selected keys;
- the batch-size ramp (megatron-core's num_microbatches_calculator, Megatron-LM's flag).

Schedules are written `VALUE[,TOKENS:VALUE...]`, tokens with K/M/B/T suffixes: "0.3,10T:0.1".
Each step's values are a function of (iteration, consumed tokens) alone (`step_settings`), so a
resumed run reproduces them; `apply_step_settings` is the one place they are written into the model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from model.modules import topk_share
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

    def in_dsa_warmup(self, iteration: int) -> bool:
        return iteration < self.dsa_warmup_iters


def is_indexer_param(name: str) -> bool:
    return ".indexer." in name


DENSE_TOPK = 1 << 62  # "every key": the indexer's top-k in the DSA warm-up (dense attention)


@dataclass(frozen=True)
class StepSettings:
    """The recipe's values for one step: `step_settings` makes them, `apply_step_settings` hands
    them to the objects that read them while the step runs."""

    mtp_loss_scaling_factor: float
    moe_router_bias_update_rate: float
    dsa_warmup: bool  # stage 0: dense attention, only the indexer trains on the dense KL
    indexer_topk: int  # keys each query attends to (every key in the warm-up)
    dsa_indexer_use_sparse_loss: bool  # the indexer's KL on the selected keys only

    def scalars(self) -> dict[str, float]:
        """What the trainer logs of them."""
        return {"mtp-loss-scaling-factor": self.mtp_loss_scaling_factor,
                "moe/bias-update-rate": self.moe_router_bias_update_rate,
                "dsa/stage": 0.0 if self.dsa_warmup else 1.0}


def step_settings(rc: RecipeConfig, sparse_topk: int, iteration: int, consumed_tokens: int) -> StepSettings:
    """The settings of step `iteration` (0-based, the step about to run) after `consumed_tokens`:
    a function of these alone, so a resumed run reproduces them. Warm-up: dense attention (top-k =
    every key), the dense KL and no expert-bias updates; then sparse."""
    warmup = rc.in_dsa_warmup(iteration)
    return StepSettings(
        mtp_loss_scaling_factor=rc.mtp_loss_scaling(consumed_tokens),
        moe_router_bias_update_rate=0.0 if warmup else rc.bias_update_rate(consumed_tokens),
        dsa_warmup=warmup,
        indexer_topk=DENSE_TOPK if warmup else sparse_topk,
        dsa_indexer_use_sparse_loss=(not warmup) and rc.dsa_sparse_loss,
    )


def apply_step_settings(settings: StepSettings, tconfig, indexers) -> None:
    """The one place a step's settings are written into the model's run-time state. megatron-core
    reads these from the shared TransformerConfig while the step runs, so the config is written:
    `mtp_loss_scaling_factor` (HybridModel's forward weighs the MTP loss with it) and
    `moe_router_bias_update_rate` (finalize_model_grads updates the expert bias with it); our DSA
    core attention (model/modules/dsa.py) reads `dsa_indexer_use_sparse_loss` there too, as
    megatron's DSA does, and its indexer's `topk`."""
    tconfig.mtp_loss_scaling_factor = settings.mtp_loss_scaling_factor
    tconfig.moe_router_bias_update_rate = settings.moe_router_bias_update_rate
    tconfig.dsa_indexer_use_sparse_loss = settings.dsa_indexer_use_sparse_loss
    for core_attention in indexers:  # ours and megatron-core's DSAttention read `index_topk`
        core_attention.index_topk = settings.indexer_topk


class Recipe:
    """Applies the schedules to megatron-core's config and the optimizer before each step."""

    def __init__(self, rc: RecipeConfig, tconfig, chunks, indexer_loss_coeff: float, tokens_per_microbatch: int):
        self.rc, self.tconfig, self.chunks = rc, tconfig, chunks
        self.indexer_loss_coeff = indexer_loss_coeff
        self.indexers = [m for c in chunks for n, m in c.named_modules()
                         if n.endswith("self_attention.core_attention") and hasattr(m, "index_topk")]
        self.sparse_topk = tconfig.dsa_indexer_topk
        self.settings: StepSettings | None = None  # the step's; read by the hooks of zero_grads_as_produced
        self._warmup_hooks = []  # removed when the warm-up is over: no per-gradient call for the rest of the run
        self.tokens_per_microbatch = tokens_per_microbatch
        # megatron-core's DSAttention (--dsa-kernel-backend none/tilelang/cudnn) sums its KL over the
        # rank's queries under calculate_per_token_loss, already a token sum: weight 1. Ours is a mean.
        from model.mcore_config import UPSTREAM_DSA_BACKENDS

        upstream = tconfig.dsa_kernel_backend in UPSTREAM_DSA_BACKENDS
        self.indexer_loss_tokens = 1 if upstream else tokens_per_microbatch
        # what divides the logged value into a per-token mean (upstream sums over CP ranks too)
        self.indexer_loss_rows = tokens_per_microbatch * tconfig.context_parallel_size if upstream else 1
        # the layers with an indexer (IndexShare's shared layers have none): the logged loss is their mean
        types = getattr(tconfig, "glm_indexer_types", None) or ("full",) * tconfig.glm_num_layers
        self.indexer_layers = sum(t == "full" for t in types) + (tconfig.mtp_num_layers or 0)
        # megatron-core 0.19.2's schedule sets the indexer loss's scale on every micro-batch (to
        # grad_scale_func(1), a per-token weight) unless the config names who does: this recipe does,
        # in scale_indexer_loss (tests/pretrain/test_recipe.py checks the schedule still asks this hook).
        tconfig.experimental_attention_variant_loss_scale_func = self.keep_indexer_loss_scale

    def scale_indexer_loss(self, grad_scale_func, device: torch.device) -> None:
        """Before each forward-backward. megatron scales the indexer's KL (a per-micro-batch mean) by
        1, while the main loss is a token sum that the engine normalizes by the global token count
        (megatron's after the backward, DeepSpeed's before it, in grad_scale_func): weigh the KL by
        its tokens and pass it through the same grad_scale_func, as megatron-core's schedule does
        for the MoE and MTP auxiliary losses (a class-wide scale: megatron-core's API)."""
        tokens = torch.tensor(float(self.indexer_loss_tokens), device=device)
        DSAIndexerLossAutoScaler.set_loss_scale(grad_scale_func(tokens).reshape(()))

    @staticmethod
    def keep_indexer_loss_scale(megatron_scale) -> None:
        """megatron's per-micro-batch call: the scale set by scale_indexer_loss stands."""

    def in_dsa_warmup(self, iteration: int) -> bool:
        return self.rc.in_dsa_warmup(iteration)

    def zero_grads_as_produced(self) -> None:
        """In the warm-up, every non-indexer gradient is zero as autograd produces it, for every engine:
        one that reduces gradients during backward (DeepSpeed ZeRO-2) has already sent them when
        `before_optimizer_step` runs. With zero Adam moments at the start and no weight decay, those
        weights stay. The hooks are removed by the first `before_step` after the warm-up."""
        def zero_in_warmup(g):
            return torch.zeros_like(g) if self.settings is not None and self.settings.dsa_warmup else g

        self._warmup_hooks = [p.register_hook(zero_in_warmup) for chunk in self.chunks
                              for name, p in chunk.named_parameters()
                              if p.requires_grad and not is_indexer_param(name)]

    def before_step(self, iteration: int, consumed_tokens: int) -> dict[str, float]:
        """`iteration` is the 0-based index of the step about to run. Returns the scalars to log."""
        self.settings = step_settings(self.rc, self.sparse_topk, iteration, consumed_tokens)
        apply_step_settings(self.settings, self.tconfig, self.indexers)
        topk_share.clear(self.indexers)  # IndexShare: no top-k of an earlier step is replayed
        if not self.settings.dsa_warmup:
            for hook in self._warmup_hooks:
                hook.remove()
            self._warmup_hooks = []
        return self.settings.scalars()

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
