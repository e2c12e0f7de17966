"""IndexShare at the HF boundary: a GLM-5.1-style model made by transformers itself (shared layers with no
indexer weights, odd dimensions) imports, exports back bit for bit, trains, and its export gives
transformers' logits with no missing or unexpected keys. A field the model cannot honour is refused
by name before the file is blamed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain.checkpoint import checkpointer as checkpointing
from tests.helpers import ROOT, child_env
from tests.inprocess import train_here
from tests.tools.test_export_hf import read_all
from tests.tools.test_import_hf import import_hf
from tools import export_hf
from tools import import_hf as tools_import_hf

# odd sizes everywhere; index_topk_freq 2 with transformers' default offset 2: layers F F S F S
HF_FIELDS = dict(
    vocab_size=301, hidden_size=40, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=5,
    first_k_dense_replace=1, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=24, kv_lora_rank=20,
    qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=6, num_experts_per_tok=2,
    n_shared_experts=1, index_n_heads=5, index_head_dim=12, index_topk=16, index_topk_freq=2,
    max_position_embeddings=512, eos_token_id=0, pad_token_id=0, bos_token_id=None,
    num_nextn_predict_layers=0,  # transformers builds and saves no MTP layer
)


def transformers_model(path):
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    config = GlmMoeDsaConfig(**HF_FIELDS)
    assert config.indexer_types == ["full", "full", "shared", "full", "shared"]
    torch.manual_seed(0)
    model = GlmMoeDsaForCausalLM(config).float()
    with torch.no_grad():  # a trained model's scale: init's 0.02 leaves the index scores near ties
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm.weight" in name else 0.0))
    model.save_pretrained(path)
    return json.loads((path / "config.json").read_text())


@pytest.mark.integration
def test_transformers_model_with_shared_layers_round_trips_and_trains(tmp_path, capsys):
    hf = tmp_path / "hf"
    written = transformers_model(hf)
    assert "model.layers.2.self_attn.indexer.wk.weight" not in read_all_single(hf)

    import_hf(hf, tmp_path / "ck")
    export_hf.export(str(tmp_path / "ck"), str(tmp_path / "back"), dtype="fp32", progress=False)
    want, got = read_all_single(hf), read_all(tmp_path / "back")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["indexer_types"] == written["indexer_types"]

    train_here(["--model-config", str(hf / "config.json"), "--load", str(tmp_path / "ck"), "--save",
                str(tmp_path / "trained"), "--mock-data", "--seq-length", "48", "--train-iters", "1",
                "--global-batch-size", "2", "--dsa-indexer-loss-coeff", "0.1"])
    assert checkpointing.latest_iteration(tmp_path / "trained") == 1
    # the trained model: transformers loads it with no missing or unexpected key and gives our logits
    # over 48 tokens > index_topk 16 (shared layers really reuse a sparse top-k)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), "--load", str(tmp_path / "trained"),
                           "--output", str(tmp_path / "out"), "--dtype", "fp32", "--verify"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout.strip().splitlines()[-1])["verify"]
    assert check["tokens"] > HF_FIELDS["index_topk"] and check["max_abs_logit_diff"] <= 1e-4, check

    # a field the model cannot honour is named, not reported as missing tensors
    config = dict(written, index_share_for_mtp_iteration=True)
    (hf / "config.json").write_text(json.dumps(config))
    assert tools_import_hf.main(["--hf", str(hf), "--save", str(tmp_path / "refused")]) == 2
    assert "index_share_for_mtp_iteration" in capsys.readouterr().err


def read_all_single(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
