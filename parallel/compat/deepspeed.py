"""Patches of DeepSpeed for a megatron-core model under ZeRO (--dp-engine deepspeed; written against
deepspeed 0.19.8). Listed with their reasons in parallel/compat/__init__.py."""

from __future__ import annotations

import torch.distributed as dist

EXPERT_GROUP = "megatron_ep"  # the one name megatron's expert groups are registered under


def register_expert_groups(expert_parallel_group, expert_data_parallel_group) -> None:
    """DeepSpeed reduces and partitions expert parameters over the groups in its private tables,
    filled only by its own MoE layers: register megatron's groups there, under EXPERT_GROUP."""
    from deepspeed.utils import groups

    groups._EXPERT_DATA_PARALLEL_GROUP[EXPERT_GROUP] = expert_data_parallel_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[EXPERT_GROUP] = dist.get_process_group_ranks(expert_data_parallel_group)
    groups._EXPERT_PARALLEL_GROUP[EXPERT_GROUP] = expert_parallel_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[EXPERT_GROUP] = dist.get_process_group_ranks(expert_parallel_group)


def engine_class(is_expert):
    """DeepSpeed's engine, answering "has MoE layers" from the parameters (`is_expert(param)`):
    DeepSpeed decides it by finding its own MoE layer class, which megatron's experts are not."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    class Engine(DeepSpeedEngine):
        @property
        def has_moe_layers(self):
            module = self.__dict__.get("_modules", {}).get("module")
            return module is not None and any(is_expert(p) for p in module.parameters())

        @has_moe_layers.setter
        def has_moe_layers(self, value):
            pass

    return Engine
