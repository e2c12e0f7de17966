"""GLM-5.3-Flash's config (model/config_flash.py) read and written with transformers' `glm5_next` spellings,
checked against transformers' own Glm5NextTextConfig; what cannot be built yet is refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model.config import GLM5Config
from model.config_flash import GLM5FlashConfig
from model.presets import FLASH_PRESETS, get_preset

# fields transformers derives or keeps for run time, not architecture
_HF_ONLY = {"output_router_logits", "use_cache", "head_dim", "qk_head_dim"}


def _as_transformers_reads(cfg: GLM5FlashConfig):
    from transformers import Glm5NextConfig

    return Glm5NextConfig(**json.loads(json.dumps(cfg.to_hf_dict()))).text_config


def test_released_preset_is_transformers_default():
    from transformers import Glm5NextTextConfig

    theirs, ours = Glm5NextTextConfig(), FLASH_PRESETS["glm5.3-flash"]
    for f in dataclasses.fields(GLM5FlashConfig):
        if f.name in ("num_nextn_predict_layers", "torch_dtype", "vision_config"):
            continue  # not text-config fields in transformers (the checkpoint's MTP layer, the weights' dtype)
        want = getattr(theirs, f.name)
        assert getattr(ours, f.name) == (tuple(want) if isinstance(want, list) else want), f.name
    assert (ours.num_hidden_layers, ours.layer_types.count("indexed_attention")) == (45, 11)


@pytest.mark.parametrize("name", sorted(FLASH_PRESETS))
def test_round_trip_through_transformers(name, tmp_path):
    ours = FLASH_PRESETS[name]
    theirs = _as_transformers_reads(ours)
    assert theirs.head_dim == 0 and theirs.qk_head_dim == ours.qk_head_dim
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm5_next", "text_config": theirs.to_dict()}))
    assert GLM5FlashConfig.load_hf_json(tmp_path) == ours
    # the text config alone, and the flat text-only form transformers accepts for glm5_next
    text = {k: v for k, v in theirs.to_dict().items() if k not in _HF_ONLY}
    assert GLM5FlashConfig.from_hf_dict(text) == ours
    assert GLM5FlashConfig.from_hf_dict({**text, "model_type": "glm5_next"}) == ours


def test_legacy_spellings_read_as_transformers_reads_them():
    from transformers import Glm5NextTextConfig

    legacy = {"num_hidden_layers": 8, "mlp_layer_types": ["dense"] + ["sparse"] * 7,
              "linear_attn_config": {"head_dim": 24, "num_heads": 5, "short_conv_kernel_size": 3,
                                     "gate_lower_bound": None},
              "layer_types": ["linear_attention"] * 3 + ["full_attention"] * 2 + ["linear_attention"] * 3,
              "index_topk_pattern": "FFFFSFFF"}
    theirs = Glm5NextTextConfig(**legacy)
    ours = GLM5FlashConfig.from_hf_dict({**legacy, "model_type": "glm5_next_text"})
    for name in ("linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim", "linear_lower_bound"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.layer_types) == theirs.layer_types and list(ours.indexer_types) == theirs.indexer_types
    assert ours.linear_lower_bound == -5.0  # safe_gate (default true) restores the bound


@pytest.mark.parametrize("change, message", [
    (dict(qk_rope_head_dim=64), "NoPE"),
    (dict(index_topk=10, index_kpool=4), "divisible by index_kpool"),
    (dict(layer_types=("linear_attention", "mamba")), r"layer_types\[1\] is 'mamba'"),
    (dict(indexer_types=("full", "full", "full", "full", "shared")), None),  # a KDA layer: ignored, as transformers
    (dict(num_hidden_layers=8, layer_types=None, mlp_layer_types=None,
          indexer_types=("full",) * 7 + ("shared",)), r"indexer_types\[7\] is 'shared' but layer 6"),
])
def test_refusals_name_the_field(change, message):
    base = dataclasses.asdict(FLASH_PRESETS["glm5.3-flash-tiny"])
    if "layer_types" in change and change["layer_types"] and len(change["layer_types"]) == 2:
        base["num_hidden_layers"], base["mlp_layer_types"], base["indexer_types"] = 2, None, None
    if message is None:
        GLM5FlashConfig(**{**base, **change})
        return
    with pytest.raises(ValueError, match=message):
        GLM5FlashConfig(**{**base, **change})


def test_glm5_paths_refuse_flash_by_name():
    assert get_preset("glm5.3-flash") == FLASH_PRESETS["glm5.3-flash"]  # built by model/specs_flash.py
    with pytest.raises(ValueError, match="model_type='glm5_next'.*GLM-5 path .* does not take it"):
        GLM5Config.from_hf_dict(FLASH_PRESETS["glm5.3-flash-tiny"].to_hf_dict())
