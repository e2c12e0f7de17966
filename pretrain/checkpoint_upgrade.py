"""Checkpoints of an older format load into today's model: their tensors are converted as they load.

Format 1 (this project before it adopted megatron-core 0.19.2's DSA indexer layout) kept each indexer
head as [nope | rope]; today's (format 2) is [rope | nope], transformers' and megatron-core's
(model/hf_mapping.py LEGACY_INDEXER). A load request's tensors with those names -- the weights and
any optimizer state kept per parameter, e.g. Adam's moments, whose keys end in the parameter's
name -- are wrapped in a dist_checkpointing factory whose merge applies the conversion after the
read. The indexer is replicated over TP, so every rank reads whole tensors; a flattened slice (the
distributed optimizer's) is read whole, converted, then sliced.
"""

from __future__ import annotations

import dataclasses

from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from model import hf_mapping


def upgrade_request(request: dict, checkpoint_format: int | None, dims: hf_mapping.Dims) -> dict:
    """`request` (a sharded state dict to load) with the tensors a checkpoint of `checkpoint_format`
    stores in an older layout converted on load (in place; returned for convenience)."""

    def wrap(v):
        if not isinstance(v, ShardedTensor):
            return v
        transform = hf_mapping.legacy_indexer_transform(v.key, checkpoint_format)
        if transform is None:
            return v
        flat = v.flattened_range
        whole = dataclasses.replace(v, data=v.data.new_empty(v.local_shape), flattened_range=None) if flat else v

        def merge(loaded, transform=transform, flat=flat):
            t = transform.to_hf(loaded, dims)[0]
            return t.flatten()[flat] if flat is not None else t

        return ShardedTensorFactory(v.key, v.data, lambda *_, whole=whole: whole, merge, v.replica_id)

    dict_list_map_inplace(wrap, request)
    return request
