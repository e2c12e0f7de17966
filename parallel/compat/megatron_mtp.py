"""megatron-core 0.19.2's MTP loss weighting made the same under context parallelism (listed in
parallel/compat/__init__.py).

Since 0.17, with `calculate_per_token_loss`, `multi_token_prediction.process_mtp_loss` weighs a depth's
summed loss by `original_num_tokens / num_tokens`: the tokens of the micro-batch over those the depth
predicts (the last one has no next token), so the MTP loss counts per predicted token as it is logged
(0.16 weighed the sum by 1). Both counts are this rank's: under context parallelism the rank that
holds the sequence's last chunk weighs its tokens by 64/63 where one process weighs all by 128/127,
and the gradients depend on the CP degree. `roll_tensor` (the module's name, which process_mtp_loss
calls for the counts) is wrapped so that the count it returns makes the ratio the CP group's:
this rank's input count times the group's rolled count over the group's input count. Exact for the
first depth (GLM-5's one MTP layer); inactive without CP (the count is then unchanged).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_PATCHED = False


def cp_consistent_mtp_counts() -> None:
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.transformer import multi_token_prediction as mtp

    roll_tensor = mtp.roll_tensor

    def roll_with_group_ratio(tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
        rolled, count = roll_tensor(tensor, shifts=shifts, dims=dims, cp_group=cp_group,
                                    packed_seq_params=packed_seq_params)
        if cp_group is None or cp_group.size() == 1:
            return rolled, count
        local_in = tensor.sum()
        totals = torch.stack([local_in, count]).to(torch.float64)
        dist.all_reduce(totals, group=cp_group)
        return rolled, (local_in * totals[1] / totals[0]).to(count.dtype)

    mtp.roll_tensor = roll_with_group_ratio
    _PATCHED = True
