"""Named GLM-5 configurations (a flavor dict, like TorchTitan's `deepseekv3_configs`).

- `glm5`: exactly the released GLM-5 config (744B total, 40B active).
- `glm5.1`: GLM-5.1, the same architecture; every layer runs its indexer (Megatron-Bridge's GLM-5.1
  recipes read `dsa_indexer_topk_freq` 1 from its config).
- `glm5.2`: GLM-5.2's IndexShare layout: `index_topk_freq` 4, `index_skip_topk_offset` 3, i.e. layers
  0, 1, 2, 6, 10, ..., 74 full and the rest shared (21 indexers instead of 78). Inferred from
  Megatron-Bridge's GLM-5.2 recipes (freq 4, offset 3, sharing groups {0}, {1}, {2-5}, ..., {74-77}
  in its pipeline layout); the rest of GLM-5.2's config.json (its RoPE theta, context length) is
  not verified here and kept as GLM-5's (docs/MODEL.md, "IndexShare"). Its MTP training (7 recurrent depths
  of its one MTP layer, the end-to-end TV objective) is run flags, not architecture: the recipe
  launch/recipes/glm5.2-bridge-416xh100.args sets them (docs/MODEL.md, "GLM-5.2's MTP objective").
- `glm5-proxy`: a one-GPU benchmark model with GLM-5's head dimensions, DSA and MTP.
- `glm5.3-flash`, `glm5.3-flash-tiny` (FLASH_PRESETS, model/config_flash.py): GLM-5.3-Flash's released
  text config (transformers' `Glm5NextTextConfig` defaults) and a tiny one with odd dimensions, built by
  model/specs_flash.py (model/mcore_config_flash.py refuses by name the layouts not built yet).
- `tiny`: every feature (MLA, DSA with top-k < sequence, dense first layer, shared + sigmoid-routed
  experts with bias, MTP) at sizes that train in seconds on a CPU; the test model.
"""

from __future__ import annotations

from model import index_share
from model.config import GLM5Config
from model.config_flash import GLM5FlashConfig

PRESETS: dict[str, GLM5Config] = {
    "glm5": GLM5Config(),
    "glm5.1": GLM5Config(),
    "glm5.2": GLM5Config(indexer_types=tuple(index_share.from_schedule(78, freq=4, offset=3))),
    "glm5-proxy": GLM5Config(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
        num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=8192,
        n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=2048,
        index_n_heads=32, index_head_dim=128, index_topk=2048,
        num_nextn_predict_layers=1, vocab_size=154880,
    ),
    "tiny": GLM5Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        index_n_heads=2, index_head_dim=16, index_topk=16,
        num_nextn_predict_layers=1, max_position_embeddings=4096,
        eos_token_id=[0], pad_token_id=0, bos_token_id=None,
    ),
}
# `tiny` with IndexShare: layers 0 and 2 full, 1 and 3 shared (the parallel and HF tests' model)
PRESETS["tiny-shared"] = PRESETS["tiny"].replace(indexer_types=("full", "shared", "full", "shared"))

# The sequence length each preset is meant to train at (a default for --seq-length).
DEFAULT_SEQ_LENGTH = {"glm5": 4096, "glm5.1": 4096, "glm5.2": 4096, "glm5-proxy": 4096, "tiny": 64,
                      "tiny-shared": 64}


FLASH_PRESETS: dict[str, GLM5FlashConfig] = {
    "glm5.3-flash": GLM5FlashConfig(),
    # odd sizes everywhere; layers KDA, KDA, KDA, DSA, KDA (transformers' schedule), one dense MLP first
    "glm5.3-flash-tiny": GLM5FlashConfig(
        vocab_size=157, hidden_size=52, intermediate_size=68, moe_intermediate_size=20,
        num_hidden_layers=5, mlp_layer_types=("dense", "sparse", "sparse", "sparse", "sparse"),
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=24, kv_lora_rank=20,
        qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1,
        index_n_heads=2, index_head_dim=12, index_topk=8, index_kpool=4,
        linear_num_heads=3, linear_head_dim=10, linear_conv_kernel_dim=4, hc_mult=3, hc_sinkhorn_iters=7,
        max_position_embeddings=4096, eos_token_id=[0], pad_token_id=0,
    ),
}


def get_preset(name: str) -> GLM5Config:
    if name in FLASH_PRESETS:  # GLM-5.3-Flash (model/mcore_config_flash.py refuses what is not built yet)
        return FLASH_PRESETS[name]
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--preset {name!r} is unknown; choose one of {sorted(PRESETS)}") from None
