"""megatron-core 0.19.2's MTP loss weighting made the same under context parallelism (listed in
parallel/compat/__init__.py).

Since 0.17, with `calculate_per_token_loss`, `multi_token_prediction.process_mtp_loss` weighs depth k's
summed loss by `original_num_tokens / num_tokens`: the tokens of the micro-batch (before any roll) over
those depth k predicts (the last k have no k-th next token), so the MTP loss counts per predicted token
as it is logged (0.16 weighed the sum by 1). Both counts are this rank's: under context parallelism the
rank that holds the sequence's last chunk weighs its tokens by 64/63 where one process weighs all by
128/127, and the gradients depend on the CP degree.

Two names are wrapped (wrappers only; upstream's code runs unchanged):
  - `process_mtp_loss`, in `multi_token_prediction` and where `models/hybrid/hybrid_model.py` (the
    model this project builds) and `models/gpt/gpt_model.py` imported it:
    records, for the duration of the call, this rank's token count before any roll (the loss mask's
    sum, as upstream takes `original_num_tokens`) and its CP group's;
  - `roll_tensor` (the module's name, which process_mtp_loss calls for the counts): inside such a call
    under CP it returns `count' = orig_local * count_group / orig_group`, so that upstream's ratio
    `orig_local / count'` is the CP group's `orig_group / count_group` at every depth (GLM-5's recipe
    runs three, `--mtp-num-layers 3 --mtp-use-repeated-layer`). Outside process_mtp_loss (the MTP
    layer rolling its input ids and positions, whose count is discarded), and without CP, the count is
    upstream's.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist

_PATCHED = False
_ORIGINAL_COUNTS: list[torch.Tensor] = []  # this rank's pre-roll token count, per process_mtp_loss in flight


def cp_consistent_mtp_counts() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.models.gpt import gpt_model
    from megatron.core.models.hybrid import hybrid_model
    from megatron.core.transformer import multi_token_prediction as mtp

    roll_tensor = mtp.roll_tensor
    process_mtp_loss = mtp.process_mtp_loss
    signature = inspect.signature(process_mtp_loss)

    @functools.wraps(process_mtp_loss)  # __wrapped__: inspect.getsource still reads upstream's (tests/parallel/test_compat.py)
    def process_recording_original_counts(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        cp_group, loss_mask = bound.get("cp_group"), bound.get("loss_mask")
        if cp_group is None or cp_group.size() == 1 or bound.get("labels") is None:
            return process_mtp_loss(*args, **kwargs)
        local = loss_mask.sum() if loss_mask is not None else torch.tensor(float(bound["labels"].numel()))
        _ORIGINAL_COUNTS.append(local)
        try:
            return process_mtp_loss(*args, **kwargs)
        finally:
            _ORIGINAL_COUNTS.pop()

    @functools.wraps(roll_tensor)
    def roll_with_group_ratio(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        rolled, count = roll_tensor(tensor, shifts=shifts, dims=dims, cp_group=cp_group,
                                    packed_seq_params=packed_seq_params)
        if not _ORIGINAL_COUNTS or cp_group is None or cp_group.size() == 1:
            return rolled, count
        local_in = _ORIGINAL_COUNTS[-1].to(device=count.device, dtype=torch.float64)
        totals = torch.stack([local_in, count.to(torch.float64)])
        dist.all_reduce(totals, group=cp_group)  # [orig_group, count_group]
        return rolled, (local_in * totals[1] / totals[0]).to(count.dtype)

    mtp.roll_tensor = roll_with_group_ratio
    mtp.process_mtp_loss = process_recording_original_counts
    gpt_model.process_mtp_loss = process_recording_original_counts
    hybrid_model.process_mtp_loss = process_recording_original_counts
    _PATCHED = True


_OBJECTIVE_PATCHED = False


def mtp_loss_types() -> None:
    """`--mtp-loss-type` and the acceptance log (model/modules/mtp_objective.py): megatron-core 0.19.2's
    `process_mtp_loss`, where `gpt_model` and `hybrid_model` imported it, becomes a wrapper that runs
    upstream's (the CP-consistent one above) for cross-entropy, tapping the logits it computes, and the
    end-to-end TV objective for `e2e_tv`. The module's own name stays the CP wrapper."""
    global _OBJECTIVE_PATCHED
    if _OBJECTIVE_PATCHED:
        return
    cp_consistent_mtp_counts()
    from megatron.core.models.gpt import gpt_model
    from megatron.core.models.hybrid import hybrid_model
    from megatron.core.transformer import multi_token_prediction as mtp

    from model.modules import mtp_objective

    upstream = mtp.process_mtp_loss

    @functools.wraps(upstream)
    def process_mtp_loss_by_type(*args, **kwargs):
        bound = inspect.signature(upstream).bind(*args, **kwargs).arguments
        return mtp_objective.process_mtp_loss(upstream, **bound)

    gpt_model.process_mtp_loss = process_mtp_loss_by_type
    hybrid_model.process_mtp_loss = process_mtp_loss_by_type
    _OBJECTIVE_PATCHED = True
