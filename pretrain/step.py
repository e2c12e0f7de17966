"""The forward_step / loss_func contract of megatron-core's pipeline schedules.

Losses are summed per micro-batch and returned with their token count
(`calculate_per_token_loss`), so the schedule and finalize_model_grads normalize by the global
token count: the loss and gradients are the same whatever the DP / CP / micro-batch split.

Under context parallelism every tensor of a micro-batch (input ids, labels, loss mask, positions)
is cut the same way, after the labels are shifted: rank r keeps chunks r and 2*CP-1-r of 2*CP
(model/modules/cp_attention.py). The MTP layer and its loss roll these local pieces with
megatron-core's `roll_tensor(cp_group=...)`, which assumes exactly this layout.

Packed documents (--reset-attention-mask, --reset-position-ids): `document_starts` (the row where each
token's document starts) and reset `position_ids` are made before the split, over the whole sequence,
and handed to the model as its `attention_mask` (model/modules/documents.py).
"""

from __future__ import annotations

from functools import partial

import torch

from model.modules.cp_attention import split_for_context_parallel
from model.modules import mtp_objective
from model.modules.documents import document_layout


def _context_parallel_layout(cp_size: int | None, cp_rank: int | None) -> tuple[int, int]:
    if cp_size is not None:
        return cp_size, cp_rank or 0
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1, 0
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def split_microbatches(tokens: torch.Tensor, micro_batch_size: int, cp_size: int | None = None,
                       cp_rank: int | None = None, eod_id: int | None = None, documents=None) -> list[dict]:
    """[n, seq+1] tokens of this DP rank -> model inputs per micro-batch, this CP rank's part of the
    sequence (CP size and rank default to megatron's parallel state, or 1 without it).
    With `eod_id` (--eod-mask-loss), positions whose input is EOD carry no loss: Megatron-LM's rule
    (the token after EOD starts another document and cannot be predicted).
    `documents` (DocumentOptions or None): per-document attention and/or positions."""
    cp_size, cp_rank = _context_parallel_layout(cp_size, cp_rank)
    out = []
    for mb in tokens.split(micro_batch_size):
        seq = mb.shape[1] - 1
        batch = {
            "input_ids": mb[:, :-1].contiguous(),
            "labels": mb[:, 1:].contiguous(),
            "loss_mask": (torch.ones(mb.shape[0], seq, dtype=torch.float32) if eod_id is None
                          else (mb[:, :-1] != eod_id).float()),
            "position_ids": torch.arange(seq).expand(mb.shape[0], seq).contiguous(),
        }
        if documents is not None and documents.active:
            batch["document_starts"], batch["position_ids"] = document_layout(
                mb[:, :-1], documents.eod_id, documents.reset_attention_mask, documents.reset_position_ids)
        if cp_size > 1:
            batch = {k: split_for_context_parallel(v, cp_size, cp_rank, dim=1) for k, v in batch.items()}
        out.append(batch)
    return out


class DocumentOptions:
    """--reset-attention-mask / --reset-position-ids and the data's EOD id."""

    def __init__(self, eod_id: int | None, reset_attention_mask: bool = False, reset_position_ids: bool = False):
        self.eod_id, self.reset_attention_mask, self.reset_position_ids = eod_id, reset_attention_mask, reset_position_ids
        self.active = reset_attention_mask or reset_position_ids
        if self.active and eod_id is None:
            raise ValueError("--reset-attention-mask / --reset-position-ids need the data's EOD id")


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm loss": report}


def make_forward_step(device: torch.device):
    def forward_step(data_iterator, model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        # packed documents: their starts and positions, as model/modules/documents.py describes
        documents = (torch.stack([batch["document_starts"], batch["position_ids"]])
                     if "document_starts" in batch else None)
        with mtp_objective.documents(batch.get("document_starts")):  # MTP chains stay in their document
            output = model(batch["input_ids"], batch["position_ids"], attention_mask=documents,
                           labels=batch["labels"], loss_mask=batch["loss_mask"])
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def reset_loss_trackers() -> None:
    """Empty megatron-core's process-global loss trackers (MTP depths, DSA indexer loss, MoE statistics).
    They are sized by the first model that writes to them and summed into until a step reads them: a
    model run earlier in the process (a tool, a test, a previous Trainer) would otherwise leave its
    values in this run's first step."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.tracker.clear()
    mtp_objective.clear_tracker()
    DSAIndexerLossLoggingHelper.tracker.clear()
    get_moe_metrics_tracker().metrics.clear()  # (get_moe_layer_wise_logging_tracker() returns a copy)


def take_mtp_loss(num_microbatches: int, suffix: str = "") -> dict[str, float]:
    """The MTP losses of the step that just ran, read from and cleared in megatron-core's tracker,
    reduced over its groups (a collective: every rank of the stage holding the MTP layer calls it):
    `mtp loss` (the mean over MTP depths, per micro-batch) and, with more than one depth, each depth's
    under Megatron-LM's tag (`mtp_1 loss`, `mtp_2 loss`, ...: MTPLossLoggingHelper.track_mtp_metrics).
    `suffix` follows each name (" validation"). With them the draft's acceptance, for any --mtp-loss-type:
    `mtp_i_acceptance_alpha` per depth and `mtp_expected_acceptance_length` (model/modules/mtp_objective.py)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    MTPLossLoggingHelper.reduce_metrics_in_tracker()
    per_depth = MTPLossLoggingHelper.tracker["loss_values"] / num_microbatches
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    out = {f"mtp loss{suffix}": float(per_depth.mean())}
    if per_depth.numel() > 1:
        out.update({f"mtp_{i + 1} loss{suffix}": float(v) for i, v in enumerate(per_depth)})
    out.update(mtp_objective.take_acceptance(parallel_state.get_data_parallel_group(with_context_parallel=True),
                                             suffix))
    return out
