"""GLM-5.3-Flash through the HF tools: a transformers-made tiny Glm5NextForConditionalGeneration (odd sizes,
random weights, saved by save_pretrained) imports with tools/import_hf.py (the vision tower left out, said so),
trains from the import (--model-config the HF directory's config.json, --load the checkpoint), exports with
tools/export_hf.py --verify (transformers loads it in Glm5NextForConditionalGeneration and its logits equal our
model's), and the exported text tensors are the original ones bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.flash_reference import TINY
from tests.helpers import ROOT, child_env

TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=TINY.hidden_size,
                   projection_intermediate_size=20, patch_size=4, image_size=16, temporal_patch_size=1)


def transformers_checkpoint(path):
    from transformers import Glm5NextConfig, Glm5NextForConditionalGeneration

    config = Glm5NextConfig(text_config=TINY.to_hf_text_dict(), vision_config=TINY_VISION, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Glm5NextForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # transformers' init leaves some norms at 1 and biases at 0: every tensor drawn anew
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(path)
    return model


def run(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_flash_import_export_verify(tmp_path):
    from safetensors.torch import load_file

    transformers_checkpoint(tmp_path / "hf")
    imported = run("import_hf.py", "--hf", tmp_path / "hf", "--save", tmp_path / "ck")
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "vision tower (model.visual.*) is not trained here" in imported.stderr
    # the imported checkpoint is what training starts from (its config: the HF directory's)
    from tests.inprocess import train_here

    lm = train_here(["--model-config", str(tmp_path / "hf" / "config.json"), "--load", str(tmp_path / "ck"),
                     "--mock-data", "--seq-length", "32", "--train-iters", "2", "--global-batch-size", "2",
                     "--micro-batch-size", "1", "--lr", "1e-3"])["lm loss"]
    assert sorted(lm) == [1, 2] and all(v == v for v in lm.values())
    exported = run("export_hf.py", "--load", tmp_path / "ck", "--output", tmp_path / "out", "--dtype", "fp32",
                   "--verify")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "vision tower (model.visual.*) is not trained here" in exported.stderr
    summary = json.loads(exported.stdout.strip().splitlines()[-1])
    assert summary["verify"]["max_abs_diff"] <= 1e-4 * max(summary["verify"]["logit_scale"], 1.0)
    original, back = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    text = {k: v for k, v in original.items() if not k.startswith("model.visual.")}
    assert sorted(back) == sorted(text)
    for k, v in text.items():
        assert torch.equal(back[k], v), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]["depth"] == 1
