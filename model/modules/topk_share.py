"""IndexShare at run time: a full layer hands its top-k indices to the shared layers after it
(model/index_share.py says which), for both DSA families (ours in dsa.py, megatron-core's
`DSAttention` through `GLMDSAttention` below).

Within one forward of a model chunk the source layer runs right before its sharers, and a sharing
group never crosses a pipeline stage or virtual chunk (parallel/dims.py refuses such a layout), so
one holder per chunk of "this forward's top-k by source layer" (`IndexShareState.published`) is
exact. Recompute is what breaks that: a checkpointed region is re-run in the backward, after later
micro-batches' forwards have refilled the holder (1F1B runs the forwards of micro-batches k+1..
before the backward of k). megatron-core keeps its holder on the config object (or on the attention
mask, whose attributes the checkpoint's detach drops), so its recomputed shared layer would attend
to another micro-batch's keys. Here a shared layer remembers what it read in the first pass of a
checkpointed region, and its recompute takes that back: each model chunk runs its backwards in the
order of its forwards (every megatron schedule), so a FIFO per layer (`IndexShareState.replays`)
pairs them; `clear` drops what a step left behind.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.experimental_attention_variant.dsa import DSAttention

from model import index_share


@dataclass
class IndexShareState:
    """IndexShare of one model chunk: who shares (fixed when the chunk's specs are made) and the top-k
    in flight (run time). One object, handed to every core attention of the chunk by its spec (a
    sharing group never crosses a chunk); a core attention built without one gets its own, empty."""

    roles: dict[int, index_share.ShareRole] = field(default_factory=dict)  # by layer number (ours only)
    # this forward's top-k by source layer number (ours: the indices; megatron-core's: (indices, lengths))
    published: dict[int, Any] = field(default_factory=dict)
    # by sharer layer number: what it read in the first passes of checkpointed regions, for their recomputes
    replays: dict[int, deque] = field(default_factory=dict)

    @classmethod
    def for_config(cls, tconfig, number=lambda i: i + 1) -> "IndexShareState":
        """The state for decoder layers numbered `number(i)` (index_share.roles) of a TransformerConfig
        from model/mcore_config.py (`glm_indexer_types`; a config without it: no sharing)."""
        return cls(roles=index_share.roles(getattr(tconfig, "glm_indexer_types", None) or (), number))

    def clear(self) -> None:
        self.published.clear()
        self.replays.clear()


def publish(module, value) -> None:
    module.index_share_state.published[module.layer_number] = value


def take(module, source: int, value=None, last: bool = False):
    """What `source` published for the micro-batch whose forward (or recompute) this is.
    `value`: the published entry (looked up here when None); `last`: the group's last sharer drops
    the state's reference once read outside a recompute (its memory is the group's S x k indices)."""
    state = module.index_share_state
    replay = state.replays.setdefault(module.layer_number, deque())
    if is_checkpointing() and torch.is_grad_enabled():  # the backward's recompute of a region
        if not replay:
            raise RuntimeError(f"IndexShare: layer {module.layer_number} is recomputed without a first pass "
                               "that read its top-k (a backward without its forward?)")
        return replay.popleft()
    if value is None:
        if source not in state.published:
            raise RuntimeError(f"IndexShare: layer {module.layer_number} needs the top-k of layer {source}, "
                               "which did not run before it in this forward (a sharing group split across "
                               "pipeline stages?)")
        value = state.published[source]
    if is_checkpointing():  # the first pass of a checkpointed region: keep it for the recompute
        replay.append(value)
    if last and not is_checkpointing():
        state.published.pop(source, None)
    return value


def clear(modules) -> None:
    """Before a training step: nothing of an earlier step is replayed (a checkpointed first pass
    whose backward never ran, as under a no_grad forward in training mode)."""
    states = {id(s): s for m in modules if (s := getattr(m, "index_share_state", None)) is not None}
    for state in states.values():
        state.clear()


class GLMDSAttention(DSAttention):
    """megatron-core's DSAttention (--dsa-kernel-backend none/tilelang/cudnn) with the shared layers'
    top-k read through `take`: exact under recompute (module docstring). Its own holder stays where
    megatron-core keeps it; only what a shared (skip) layer reads from it changes."""

    def __init__(self, *args, index_share_state: IndexShareState | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.index_share_state = index_share_state or IndexShareState()

    def _get_index_share_topk_holder(self, packed_seq_params, attention_mask=None):
        h = super()._get_index_share_topk_holder(packed_seq_params, attention_mask)
        if not self.skip_topk:
            return h
        src = self.source_layer
        if not (is_checkpointing() and torch.is_grad_enabled()):
            if src not in h:
                return h  # megatron-core raises its own error naming the split
            lengths = super()._get_index_share_topk_length_holder(packed_seq_params, attention_mask)
            self._taken = take(self, src, (h[src], lengths.get(src)))
        else:
            self._taken = take(self, src)
        return {src: self._taken[0]}

    def _get_index_share_topk_length_holder(self, packed_seq_params, attention_mask=None):
        if not self.skip_topk:
            return super()._get_index_share_topk_length_holder(packed_seq_params, attention_mask)
        taken = getattr(self, "_taken", (None, None))
        return {} if taken[1] is None else {self.source_layer: taken[1]}
