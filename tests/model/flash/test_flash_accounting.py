"""GLM-5.3-Flash's parameter counts (model/accounting_flash.py) equal what transformers builds (on the
meta device: nothing allocated), total and active; its FLOPs count KDA layers as linear."""

from __future__ import annotations

import pytest
import torch

from model.accounting_flash import count_parameters, flops_per_token
from model.presets import FLASH_PRESETS
from tests.flash_reference import hf_text_config


@pytest.mark.parametrize("name", ["glm5.3-flash-tiny", "glm5.3-flash"])
def test_counts_equal_transformers_build(name):
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextExperts, Glm5NextTextModel

    cfg = FLASH_PRESETS[name]
    with torch.device("meta"):
        model = Glm5NextTextModel(hf_text_config(cfg))
    ours = count_parameters(cfg)
    assert ours["params_text_model"] == sum(p.numel() for p in model.parameters())
    # active: each token runs num_experts_per_tok of the routed experts
    experts = [m for m in model.modules() if isinstance(m, Glm5NextTextExperts)]
    per_expert = sum(p[0].numel() for p in experts[0].parameters())
    idle = len(experts) * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    head = cfg.vocab_size * cfg.hidden_size
    assert ours["params_total"] == ours["params_text_model"] + head
    assert ours["params_active"] == ours["params_total"] - idle * per_expert
    if name == "glm5.3-flash":  # the "about 320B parameters, 18B active"
        assert 300e9 < ours["params_total"] < 340e9 and 15e9 < ours["params_active"] < 21e9


def test_linear_attention_counts_as_linear():
    cfg = FLASH_PRESETS["glm5.3-flash"]
    all_kda = cfg.replace(layer_types=("linear_attention",) * cfg.num_hidden_layers)
    assert flops_per_token(all_kda, 4096) == flops_per_token(all_kda, 1 << 20)
    # with DSA layers, only their attention grows (top-k caps the keys, the indexer's pools grow)
    assert flops_per_token(cfg, 1 << 20) > flops_per_token(cfg, 4096) > flops_per_token(all_kda, 4096)


def test_model_info_tool_reads_a_glm5_next_config(tmp_path, capsys):
    import json

    import tools.model_info as tool

    cfg = FLASH_PRESETS["glm5.3-flash-tiny"]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    tool.main(["--model-config", str(tmp_path), "--seq-length", "64"])
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] == count_parameters(cfg)["params_total"] and info["seq_length"] == 64
