"""Layout-invariant weight initialization.

Every parameter is drawn from a generator seeded by (seed, its *global* name) on its *global*
shape, then this rank's shard is cut out. The initial model is therefore the same for any
TP/PP/VPP/EP/DP layout, which is what lets tests compare a parallel run with a single-process
run step for step (TorchTitan needs a seed checkpoint for this; we need nothing).

Names are GPTModel's (model/key_layout.py): a HybridModel starts from the weights the GPTModel build
of this project drew, whatever the layout.

Cost: each rank draws the full tensor of each parameter it holds a shard of (TP x its share).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state

from model import key_layout

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")
# TE's grouped experts (--moe-grouped-gemm) hold local expert i's weight as `experts.linear_fc1.weight{i}`.
_GROUPED_EXPERT = re.compile(r"^(.*\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _global_name(name: str, chunk) -> str:
    """The name one process gives this parameter in GPTModel's layout: global layer and expert numbers,
    and a grouped expert's weight named like SequentialMLP's (so both draw the same values)."""
    m = _GROUPED_EXPERT.match(name)
    if m:
        name = f"{m.group(1)}local_experts.{m.group(4)}.{m.group(2)}.{m.group(3)}"
    m = _LAYER.match(name)
    if m:
        layer = chunk.decoder.layers[int(m.group(2))]
        name = f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"
    name = key_layout.to_gpt(name)  # the MTP layer's as GPTModel's checkpoints (and megatron-core 0.16) name it
    m = _EXPERT.match(name)
    if m:
        local = int(m.group(2))
        n_local = chunk.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        name = f"{m.group(1)}{parallel_state.get_expert_model_parallel_rank() * n_local + local}{m.group(3)}"
    return name


def _is_expert(name: str) -> bool:
    return ".experts." in name and ".shared_experts." not in name


def _tp(name: str) -> tuple[int, int]:
    if _is_expert(name):
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _std(name: str, config) -> float:
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        # per GLM layer (HybridModel's num_layers counts two per GLM layer)
        return config.init_method_std / math.sqrt(2.0 * getattr(config, "glm_num_layers", config.num_layers))
    return config.init_method_std


def _full_value(name: str, global_shape: list[int], config, vocab_size: int, seed: int) -> torch.Tensor:
    if len(global_shape) == 1:  # norm weights and biases
        fill = 0.0 if name.endswith(".bias") else 1.0
        return torch.full(global_shape, fill)
    g = _generator(seed, name)
    if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
        # Draw only the real vocabulary, so the values do not depend on TP's padding.
        real = torch.normal(0.0, config.init_method_std, (vocab_size, global_shape[1]), generator=g)
        return torch.cat([real, real.new_zeros(global_shape[0] - vocab_size, global_shape[1])])
    return torch.normal(0.0, _std(name, config), global_shape, generator=g)


@torch.no_grad()
def init_weights(chunks, vocab_size: int, seed: int) -> None:
    """Initialize all parameters of this rank's model chunks; buffers (expert bias) stay zero."""
    for chunk in chunks:
        config = chunk.config
        for local_name, p in chunk.named_parameters():
            name = _global_name(local_name, chunk)
            tp_rank, tp_size = _tp(name)
            sharded = getattr(p, "tensor_model_parallel", False) and tp_size > 1
            dim = getattr(p, "partition_dim", 0)
            shape = list(p.shape)
            if sharded:
                shape[dim] *= tp_size
            full = _full_value(name, shape, config, vocab_size, seed)
            if sharded:
                glu = name.endswith("linear_fc1.weight") and config.gated_linear_unit
                # A GLU fc1 shard is [gate_r; up_r], not a contiguous block of [gate; up].
                parts = full.chunk(2, dim=0) if glu else [full]
                full = torch.cat([part.chunk(tp_size, dim=dim)[tp_rank] for part in parts], dim=dim)
            p.copy_(full.to(p.dtype))
        if getattr(config, "flash", None) is not None:  # GLM-5.3-Flash's KDA, mHC and pooled indexer
            from model.initialization_flash import init_flash_modules

            init_flash_modules(chunk, seed, _global_name)
