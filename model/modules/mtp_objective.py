"""The MTP draft's acceptance and GLM-5.2's end-to-end total-variation objective (`--mtp-loss-type e2e_tv`).

Speculative decoding accepts the draft token of depth i with probability alpha_i = sum_v min(p_i(v), q_i(v))
(rejection sampling; p the main model's distribution, q the draft's). Bebop (arXiv 2606.12370, Eq. 13),
which GLM-5.2 trains its recurrent MTP layer with, maximises the expected accepted length directly:

    L_e2e = 1 - (1/gamma) * sum_{j=1..gamma} prod_{i=1..j} alpha_i,     p detached (no gradient).

Which p belongs to depth i. Depth i at row t (megatron-core's MTP chain: its labels are rolled i times)
predicts token x_{t+i+1}; the main model's distribution for that token, given the true prefix, is its
next-token distribution at row t+i. So p_i = the main head's softmax rolled i rows back, with the same
`roll_tensor` (CP-aware) that rolls the labels: the two stay aligned under every layout by construction.

Which rows count. The chain of length j at row t is valid when every label it predicts is (the loss mask
rolled 1..j times: the sequence end rolls in zeros, --eod-mask-loss zeros the label after an EOD) and,
with --reset-attention-mask, rows t..t+j lie in one document (their document starts, rolled alike, are
equal): m_j = m_{j-1} * mask_j * same_document_j, cumulative because a draft chain cannot continue past
a token it could not draft. Term j is then averaged over its own valid rows, as megatron-core averages
each cross-entropy depth over its own tokens:

    L_e2e = (1/gamma) * sum_j [ sum_t m_j(t) (1 - prod_{i<=j} alpha_i(t)) / sum_t m_j(t) ]

so `mtp_j loss` is term j, `mtp loss` their mean, and the scaling factor, its schedule and the per-token
normalization apply exactly as to cross-entropy (factor / gamma per depth, megatron's MTPLossAutoScaler,
the token count made the context-parallel group's).

Vocabulary sharded over TP: softmax with the all-reduced max and sum of exponentials (as megatron-core's
vocab_parallel_cross_entropy), then alpha = the all-reduced sum of each shard's sum of min(p, q); the
backward is analytic, d alpha / d l_u = q_u (1[q_u < p_u] - sum_v 1[q_v < p_v] q_v), one more all-reduce
of [s, b]. No full-vocabulary gather. Saved for the backward per depth: the draft's logits (the dtype the
head gives), the indicator q < p (1 byte) and two [s, b] floats; megatron's cross-entropy saves its fp32
softmax. The main head runs once more under no_grad for p (GPTModel computes its logits after the MTP loss);
its logits are kept in the head's dtype and rolled, each depth's fp32 p made only while its alpha is computed.

Acceptance is logged for any loss type (cross-entropy runs reuse the logits megatron-core computes, with
no gradient): `mtp_i_acceptance_alpha` (the mean alpha_i over valid rows) and
`mtp_expected_acceptance_length` = 1 + sum_j mean(prod_{i<=j} alpha_i).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.distributed as dist

MTP_LOSS_TYPES = ("ce", "e2e_tv")

# this micro-batch's document starts [b, s] (--reset-attention-mask), set around the model's forward
_DOCUMENT_STARTS: contextvars.ContextVar = contextvars.ContextVar("mtp_document_starts", default=None)
# summed over micro-batches until read: [3, depths] rows (alpha * m, chain * m, m)
_TRACKER: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def documents(starts: torch.Tensor | None):
    """Hand the MTP objective this micro-batch's document starts (model/modules/documents.py)."""
    token = _DOCUMENT_STARTS.set(starts)
    try:
        yield
    finally:
        _DOCUMENT_STARTS.reset(token)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """The logits in fp32 at least (bf16 heads), as megatron's cross-entropy computes."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


ROWS = 256  # sequence rows per block: the fp32 working tensors are [ROWS, b, V/TP], not [s, b, V/TP]


def _row_blocks(n: int):
    return (slice(r, min(r + ROWS, n)) for r in range(0, n, ROWS))


def _softmax_parts(logits: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(l - max)) over the whole vocabulary of logits [s, b, V/TP] sharded over `group`."""
    logits = logits.detach()
    peak = _all_reduce(torch.cat([_wide(logits[r]).amax(-1) for r in _row_blocks(len(logits))]), group,
                       dist.ReduceOp.MAX)
    total = torch.cat([(_wide(logits[r]) - peak[r].unsqueeze(-1)).exp_().sum(-1) for r in _row_blocks(len(logits))])
    return peak, _all_reduce(total, group)


def _probabilities(logits: torch.Tensor, peak: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return (_wide(logits) - peak.unsqueeze(-1)).exp_().div_(total.unsqueeze(-1))


class _VocabParallelOverlap(torch.autograd.Function):
    """alpha = sum_v min(p(v), q(v)), q = softmax(logits), p = softmax(target) with no gradient, over a
    vocabulary sharded over `group`; `target` comes with its softmax's max and sum (_softmax_parts)."""

    @staticmethod
    def forward(ctx, logits, target, target_peak, target_total, group):
        peak, total = _softmax_parts(logits, group)
        below = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
        sums = torch.empty(2, *logits.shape[:-1], dtype=peak.dtype, device=logits.device)
        for r in _row_blocks(len(logits)):
            q = _probabilities(logits[r], peak[r], total[r])
            p = _probabilities(target[r], target_peak[r], target_total[r])
            torch.lt(q, p, out=below[r])
            sums[1, r] = (q * below[r]).sum(-1)  # sum_v 1[q<p] q: the backward's
            sums[0, r] = torch.minimum(q, p, out=q).sum(-1)
        _all_reduce(sums, group)
        ctx.save_for_backward(logits, peak, total, below, sums[1])
        return sums[0]

    @staticmethod
    def backward(ctx, grad_alpha):
        logits, peak, total, below, under = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for r in _row_blocks(len(logits)):
            q = _probabilities(logits[r], peak[r], total[r])
            q.mul_(below[r].to(q.dtype).sub_(under[r].unsqueeze(-1))).mul_(grad_alpha[r].unsqueeze(-1))
            grad[r] = q
        return grad, None, None, None, None


def overlap(logits: torch.Tensor, target: torch.Tensor, group=None, target_parts=None) -> torch.Tensor:
    """[s, b, V/TP] draft logits, [s, b, V/TP] target logits (detached) -> alpha [s, b]."""
    target = target.detach()
    peak, total = target_parts if target_parts is not None else _softmax_parts(target, group)
    return _VocabParallelOverlap.apply(logits, target, peak, total, group)


class AcceptanceChain:
    """The draft chain over the MTP depths of one micro-batch: `step(logits)` per depth, in order, gives
    (alpha_j, prod_{i<=j} alpha_i, m_j) as [b, s] (module docstring), and adds them to the log's tracker."""

    def __init__(self, main_logits, loss_mask, roll, vocab_group, depths: int, track: bool):
        # the target is kept as the main head's logits (bf16 under --bf16) and their softmax's [s, b] max and
        # sum, rolled along; p and q exist in fp32 one block of rows at a time
        self.main = main_logits.detach()
        self.peak, self.total = _softmax_parts(self.main, vocab_group)
        self.roll, self.group, self.depths, self.track = roll, vocab_group, depths, track
        self.mask = loss_mask.float()
        self.starts = _DOCUMENT_STARTS.get()
        self.rolled_starts = self.starts
        self.valid, self.chain, self.depth = None, None, 0

    def step(self, logits: torch.Tensor):
        self.main = self.roll(self.main, dims=0)
        self.peak, self.total = self.roll(self.peak, dims=0), self.roll(self.total, dims=0)
        self.mask = self.roll(self.mask, dims=-1)
        valid = self.mask if self.valid is None else self.valid * self.mask
        if self.starts is not None:
            self.rolled_starts = self.roll(self.rolled_starts, dims=-1)
            valid = valid * (self.rolled_starts == self.starts).to(valid.dtype)
        # rows rolled in past the sequence's end hold zeros (p = 1 there): masked by `valid`
        parts = (self.peak, self.total.clamp(min=torch.finfo(self.total.dtype).tiny))
        alpha = overlap(logits, self.main, self.group, parts).t()  # [s, b] -> [b, s], the loss mask's
        self.chain = alpha if self.chain is None else self.chain * alpha
        self.valid = valid
        if self.track:
            _record(self.depth, self.depths, alpha.detach(), self.chain.detach(), valid)
        self.depth += 1
        return alpha, self.chain, valid


def _record(depth: int, depths: int, alpha, chain, valid) -> None:
    sums = _TRACKER.get("sums")
    if sums is None or sums.shape[1] != depths:
        sums = _TRACKER["sums"] = torch.zeros(3, depths, dtype=torch.float64, device=valid.device)
    sums[:, depth] += torch.stack([(alpha * valid).sum(), (chain * valid).sum(), valid.sum()]).double()


def clear_tracker() -> None:
    _TRACKER.clear()


def take_acceptance(group, suffix: str = "") -> dict[str, float]:
    """The acceptance of the micro-batches since the last call, summed over `group` (DP x CP; a collective
    every rank of it makes), cleared: each depth's mean alpha and the expected acceptance length."""
    sums = _TRACKER.pop("sums", None)
    if sums is None:
        return {}
    _all_reduce(sums, group)
    count = sums[2].clamp(min=1)
    alpha, chain = sums[0] / count, sums[1] / count
    out = {f"mtp_{i + 1}_acceptance_alpha{suffix}": float(a) for i, a in enumerate(alpha)}
    out[f"mtp_expected_acceptance_length{suffix}"] = float(1 + chain.sum())
    return out


def _vocab_group(output_layer, runtime_gather_output, tp_group):
    """The group the logits' vocabulary is sharded over, or None (whole vocabulary on each rank)."""
    from megatron.core.transformer.multi_token_prediction import _mtp_logits_are_vocab_sharded

    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return None
    return tp_group if _mtp_logits_are_vocab_sharded(output_layer, runtime_gather_output) else None


def _main_logits(hidden, output_layer, output_weight, runtime_gather_output, scale_logits_fn):
    with torch.no_grad():
        logits, _ = output_layer(hidden, weight=output_weight, runtime_gather_output=runtime_gather_output)
        return scale_logits_fn(logits) if scale_logits_fn is not None else logits


def process_mtp_loss(upstream, hidden_states, labels, loss_mask, output_layer, output_weight,
                     runtime_gather_output, is_training, compute_language_model_loss, config,
                     cp_group=None, tp_group=None, packed_seq_params=None, scale_logits_fn=None, input_ids=None):
    """megatron-core 0.19.2's `process_mtp_loss` with `config.mtp_loss_type` (`upstream`: its function, run
    unchanged for cross-entropy, with the acceptance tapped from the logits it computes)."""
    from megatron.core.transformer.multi_token_prediction import roll_tensor

    kwargs = dict(hidden_states=hidden_states, labels=labels, loss_mask=loss_mask, output_layer=output_layer,
                  output_weight=output_weight, runtime_gather_output=runtime_gather_output,
                  is_training=is_training, compute_language_model_loss=compute_language_model_loss,
                  config=config, cp_group=cp_group, tp_group=tp_group, packed_seq_params=packed_seq_params,
                  scale_logits_fn=scale_logits_fn, input_ids=input_ids)
    loss_type = getattr(config, "mtp_loss_type", "ce")
    if labels is None or (loss_type == "ce" and not is_training):
        return upstream(**kwargs)  # RL's derived labels, or nothing to log
    depths = config.mtp_num_layers
    hidden = torch.chunk(hidden_states, 1 + depths, dim=0)
    if loss_mask is None:
        loss_mask = torch.ones_like(labels, dtype=torch.float32)

    def roll(t, dims):
        return roll_tensor(t, shifts=-1, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)[0]

    head_weight = output_weight
    if config.mtp_detach_heads:
        head_weight = (output_weight if output_weight is not None else output_layer.weight).detach()
    chain = AcceptanceChain(_main_logits(hidden[0], output_layer, head_weight, runtime_gather_output,
                                         scale_logits_fn),
                            loss_mask, roll, _vocab_group(output_layer, runtime_gather_output, tp_group),
                            depths, track=is_training)
    if loss_type == "ce":
        def tapped(mtp_labels, mtp_logits):  # upstream calls it once per depth, in order
            with torch.no_grad():
                chain.step(mtp_logits.detach())
            return compute_language_model_loss(mtp_labels, mtp_logits)

        return upstream(**{**kwargs, "compute_language_model_loss": tapped})
    return _e2e_tv_loss(hidden, loss_mask, chain, output_layer, head_weight, runtime_gather_output,
                        scale_logits_fn, config, cp_group, is_training)


def _e2e_tv_loss(hidden, loss_mask, chain, output_layer, head_weight, runtime_gather_output, scale_logits_fn,
                 config, cp_group, is_training):
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

    depths = config.mtp_num_layers
    terms, valids = [], []
    for depth in range(depths):
        logits, _ = output_layer(hidden[depth + 1], weight=head_weight, runtime_gather_output=runtime_gather_output)
        if scale_logits_fn is not None:
            logits = scale_logits_fn(logits)
        _, prefix, valid = chain.step(logits)
        terms.append((1 - prefix) * valid)
        valids.append(valid)
    # token counts: this micro-batch's before any roll and each depth's valid rows, the CP group's
    counts = _all_reduce(torch.stack([loss_mask.sum().float()] + [v.sum() for v in valids]).double(), cp_group)
    scale = config.mtp_loss_scaling_factor / depths
    loss = 0
    for depth, term in enumerate(terms):
        per_token = counts[0] / counts[depth + 1].clamp(min=1) if config.calculate_per_token_loss \
            else 1 / counts[depth + 1].clamp(min=1) * _cp_size(cp_group)
        loss = loss + term * (scale * per_token).to(term.dtype)
        if is_training:
            mean = term.detach().sum() / counts[depth + 1].clamp(min=1) * _cp_size(cp_group)
            MTPLossLoggingHelper.save_metrics_to_tracker(
                mean.float(), torch.zeros((), device=mean.device), torch.zeros((), device=mean.device), depth, depths,
                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return MTPLossAutoScaler.apply(hidden[0], loss)


def _cp_size(cp_group) -> int:
    return dist.get_world_size(cp_group) if cp_group is not None else 1
