"""transformers' GLM-5.3-Flash submodules at the tiny preset's sizes with random weights, for the
module tests (tests/test_flash_*.py): each is compared with ours after copying the weights across
by model/flash_hf_mapping.py; megatron-core's MLP and MoE layer built with the clamped SwiGLU (they
need tests/fixtures_dist.py's single_process_group) and the maps of a decoder layer's weights."""

from __future__ import annotations

import torch

from model.flash_hf_mapping import hc_from_hf, kda_from_hf
from model.modules.clamped_swiglu import glu_from_hf, mcore_settings
from model.presets import FLASH_PRESETS

TINY = FLASH_PRESETS["glm5.3-flash-tiny"]


def hf_text_config(cfg=TINY):
    from transformers import Glm5NextTextConfig

    c = Glm5NextTextConfig(**cfg.to_hf_text_dict())
    c._attn_implementation = "eager"
    c._experts_implementation = "eager"  # the grouped-GEMM default takes no fp64
    return c


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn anew (transformers leaves some uninitialised), in fp64."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Equal to what fp32 arithmetic allows, scaled to the tensor's size: transformers runs the KDA rule and
    the indexer's scores in fp32 whatever the input's dtype, and gradients sum many such terms."""
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{name}: {m}")


def mcore_mlp(ffn: int, fusion: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    cfg = TransformerConfig(num_layers=1, hidden_size=TINY.hidden_size, ffn_hidden_size=ffn, num_attention_heads=1,
                            add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float64,
                            **{**mcore_settings(TINY.swiglu_limit), "bias_activation_fusion": fusion})
    return MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def mlp_from_hf(sd: dict) -> dict:
    return {"linear_fc1.weight": glu_from_hf(sd["gate_proj.weight"], sd["up_proj.weight"]),
            "linear_fc2.weight": sd["down_proj.weight"]}


def mcore_moe():
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer import TransformerConfig

    from model.specs import get_backend

    c = TINY
    cfg = TransformerConfig(
        num_layers=1, hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size, num_attention_heads=1,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float64,
        num_moe_experts=c.n_routed_experts, moe_ffn_hidden_size=c.moe_intermediate_size,
        moe_shared_expert_intermediate_size=c.n_shared_experts * c.moe_intermediate_size,
        moe_router_topk=c.num_experts_per_tok, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=c.routed_scaling_factor, moe_router_enable_expert_bias=True,
        moe_router_dtype="fp64", moe_router_load_balancing_type="none", moe_token_dispatcher_type="alltoall",
        **mcore_settings(c.swiglu_limit))
    return get_moe_module_spec_for_backend(get_backend(False), num_experts=True, moe_grouped_gemm=False)(config=cfg)


def moe_from_hf(sd: dict) -> dict:
    ours = {"router.weight": sd["gate.weight"],
            **{f"shared_experts.{k}": v for k, v in mlp_from_hf(
                {k.removeprefix("shared_experts."): v for k, v in sd.items() if k.startswith("shared_experts.")}).items()}}
    if "gate.e_score_correction_bias" in sd:
        ours["router.expert_bias"] = sd["gate.e_score_correction_bias"]
    for e in range(TINY.n_routed_experts):
        ours[f"experts.local_experts.{e}.linear_fc1.weight"] = sd["experts.gate_up_proj"][e]  # [gate; up]
        ours[f"experts.local_experts.{e}.linear_fc2.weight"] = sd["experts.down_proj"][e]
    return ours


def layer_from_hf(sd: dict) -> dict:
    def under(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    ours = {f"attn_hc.{k}": v for k, v in hc_from_hf(under("attn_hc.")).items()}
    ours |= {f"ffn_hc.{k}": v for k, v in hc_from_hf(under("ffn_hc.")).items()}
    if "self_attn.q_proj.weight" in sd:  # a KDA layer (tests/model/flash/test_flash_model.py maps the others)
        ours |= {f"self_attention.{k}": v for k, v in kda_from_hf(under("self_attn.")).items()}
    if "mlp.gate_proj.weight" in sd:  # a dense MLP
        ours |= {f"mlp.{k}": v for k, v in mlp_from_hf(under("mlp.")).items()}
    ours |= {"input_layernorm.weight": sd["input_layernorm.weight"],
             "pre_mlp_layernorm.weight": sd["post_attention_layernorm.weight"]}
    return ours
