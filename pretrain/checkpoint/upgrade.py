"""Checkpoints of an older format load into the model this code builds: their tensors are converted as
they load.

Format 1 (run_state.json's format_version) keeps each DSA indexer head as [nope | rope]; format 2, the
one written, is [rope | nope], transformers' and megatron-core 0.19.2's (model/hf_mapping.py
LEGACY_INDEXER). A load request's tensors with those names -- the weights and any optimizer state kept
per parameter, e.g. Adam's moments, whose keys end in the parameter's name -- are wrapped in a
dist_checkpointing factory whose merge applies the conversion after the read. The indexer is replicated
over TP, so every rank reads whole tensors; a flattened slice (the distributed optimizer's) is read
whole, converted, then sliced.

Key layout: this code builds a HybridModel; a checkpoint written by megatron-core's GPTModel (this
project's GPTModel builds, the 0.16 fixture, Megatron-Bridge 0.6.2's GLM-5) names a GLM layer's tensors
as one layer (model/key_layout.py). It is recognized by its keys, and a load request's keys -- the
weights' and every per-parameter optimizer state's -- are renamed to the checkpoint's before the read:
the tensors are the same, only their names differ.
"""

from __future__ import annotations

import dataclasses

from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import FileSystemReader

from model import hf_mapping, key_layout


def stored_key_layout(directory) -> str | None:
    """key_layout.GPT or HYBRID: the layout of the checkpoint in `directory`, read from its keys."""
    return key_layout.layout_of(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def rename_keys(sharded_state_dict: dict, layout: str) -> dict:
    """`sharded_state_dict`'s keys in key_layout `layout` (GPT or HYBRID), where its own differ (in place;
    returned): to load a checkpoint of the other layout, or to save one in it (e.g. GPTModel's keys
    for Megatron-Bridge)."""
    ours = key_layout.layout_of(v.key for v in nested_values(sharded_state_dict) if isinstance(v, ShardedBase))
    if ours is not None and ours != layout:
        rename = key_layout.to_gpt if layout == key_layout.GPT else key_layout.to_hybrid

        def renamed(v):
            if isinstance(v, ShardedBase):
                v.key = rename(v.key)
            return v

        dict_list_map_inplace(renamed, sharded_state_dict)
    return sharded_state_dict


def upgrade_request(request: dict, checkpoint_format: int | None, dims: hf_mapping.Dims,
                    stored_layout: str | None = None) -> dict:
    """`request` (a sharded state dict to load) with the tensors a checkpoint of `checkpoint_format`
    stores in an older layout converted on load, and its keys renamed to the checkpoint's key layout
    `stored_layout` (stored_key_layout) where the request's differs: GPTModel's into a HybridModel,
    or HybridModel's into a GPTModel (in place; returned for convenience)."""
    if stored_layout is not None:
        rename_keys(request, stored_layout)

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
