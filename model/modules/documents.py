"""Documents packed into one sequence: where each token's document starts, and its RoPE position
(Megatron-LM's --reset-attention-mask and --reset-position-ids, docs/STAGES.md "Packed documents").

Megatron-LM's rule (`get_ltor_masks_and_position_ids`): an EOD token ends its document and belongs to it;
the token after it starts the next one. With --reset-attention-mask a query at row t attends to the keys
of rows start(t)..t only (its document's, causally); with --reset-position-ids its RoPE position is
t - start(t). Both are per token, O(S): at 128K a [S, S] mask would not fit.

What the model receives (pretrain/step.py builds it, model/modules/cp_attention.py reads it): megatron's
`attention_mask` argument, which megatron-core hands unchanged to every layer's attention (MTP's too)
and through its checkpoints, holding one int64 tensor [2, b, s] for this CP rank's tokens:
[0] the global row where each token's document starts (0 everywhere without --reset-attention-mask),
[1] each token's RoPE position (its global row without --reset-position-ids). None: one document, rows
0..S-1 as positions.
"""

from __future__ import annotations

import torch


def document_starts(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] input tokens -> [b, s] int64: the row where each token's document starts."""
    b, s = tokens.shape
    rows = torch.arange(s, device=tokens.device).expand(b, s)
    # a row after an EOD starts a document: the running maximum of those rows is each token's start
    after_eod = torch.zeros_like(rows)
    after_eod[:, 1:] = torch.where(tokens[:, :-1] == eod_id, rows[:, 1:], 0)
    return after_eod.cummax(dim=1).values


def document_layout(tokens: torch.Tensor, eod_id: int, reset_attention_mask: bool,
                    reset_position_ids: bool) -> torch.Tensor:
    """The model's `attention_mask` [2, b, s] for input tokens [b, s] (module docstring), before any
    context-parallel split (split it along dim 2)."""
    starts = document_starts(tokens, eod_id)
    rows = torch.arange(tokens.shape[1], device=tokens.device).expand_as(starts)
    positions = rows - starts if reset_position_ids else rows
    return torch.stack([starts if reset_attention_mask else torch.zeros_like(starts), positions.contiguous()])


def unpack(attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(document starts [b, s], RoPE positions [b, s]) from the model's `attention_mask`, or (None, None)."""
    if attention_mask is None:
        return None, None
    if attention_mask.dtype != torch.int64 or attention_mask.dim() != 3 or attention_mask.shape[0] != 2:
        raise ValueError("MLA+DSA takes its attention_mask as model/modules/documents.py's int64 [2, b, s] "
                         f"(document starts, positions), got {attention_mask.dtype} {tuple(attention_mask.shape)}")
    return attention_mask[0], attention_mask[1]


def rope_freqs(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE angles at `positions` from megatron's table [S, 1, 1, d]: [s] -> [s, 1, 1, d] (shared by the
    batch), [b, s] -> [s, b, 1, d] (each sequence its own, broadcast over heads)."""
    if positions.dim() == 1:
        return table[positions]
    return table[:, 0][positions.t()]


def document_mask(q_positions: torch.Tensor, q_starts: torch.Tensor | None, num_keys: int) -> torch.Tensor:
    """Bool [s_q, num_keys] or [b, s_q, num_keys]: True where a query (global row q_positions, its document
    starting at q_starts [b, s_q]) must not see the key -- after it, or in an earlier document."""
    keys = torch.arange(num_keys, device=q_positions.device)
    masked = keys.view(1, -1) > q_positions.view(-1, 1)
    if q_starts is None:
        return masked
    return masked.unsqueeze(0) | (keys.view(1, 1, -1) < q_starts.unsqueeze(-1))


def document_offsets(doc_starts: torch.Tensor) -> torch.Tensor:
    """[b, s] rows where each token's document starts -> where each document begins in the flattened
    b * s tokens, then b * s (flash-linear-attention's `cu_seqlens`; a row's first token always begins one)."""
    b, s = doc_starts.shape
    begins = (doc_starts == torch.arange(s, device=doc_starts.device)).flatten().nonzero().flatten()
    return torch.cat([begins, begins.new_tensor([b * s])])
