"""GLM-5's MTP recipe: `--mtp-num-layers 3 --mtp-use-repeated-layer`, one MTP layer's parameters applied at
three depths. One set of parameters is built (the checkpoint and the HF export hold one layer), each depth's
loss is logged under Megatron-LM's tag (`mtp_1 loss`, ...) with `mtp loss` their mean, and the layouts that
move the MTP layer's work (pipeline: MTP on the last stage; context parallelism: every depth's token count,
parallel/compat/megatron_mtp.py) match one process per weight (tests/grad_check.py). GLM-5.2's objective
(`--mtp-loss-type e2e_tv`, model/modules/mtp_objective.py) on packed documents matches one process per weight
in one layout that moves all of its work: the vocabulary sharded over TP 2 (+ SP), CP 2 (every depth's p,
mask and document starts rolled across the chunks), PP 2 (MTP on the last stage) and EP 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from model.presets import get_preset
from tests import grad_check
from tests.helpers import ROOT, child_env, torchrun

MTP3 = ["--mtp-num-layers", "3", "--mtp-use-repeated-layer"]
DEPTH_TAGS = ("mtp_1 loss", "mtp_2 loss", "mtp_3 loss")
ACCEPTANCE = ("mtp_1_acceptance_alpha", "mtp_2_acceptance_alpha", "mtp_3_acceptance_alpha",
              "mtp_expected_acceptance_length")  # cross-entropy runs log the draft's acceptance too
TAGS = (*grad_check.TAGS, *DEPTH_TAGS, *ACCEPTANCE, *(f"{t} validation" for t in (*DEPTH_TAGS, *ACCEPTANCE)))

LAYOUTS = {
    # MTP (all three depths) on the last pipeline stage, beside the loss
    "pp2-mtp3": (2, ["--pipeline-model-parallel-size", "2", *MTP3]),
    # every depth rolls its labels across the CP ranks' chunks: each depth's count is the group's
    "cp2-mtp3": (2, ["--context-parallel-size", "2", *MTP3]),
}


@pytest.fixture(scope="module")
def mtp3_reference(tmp_path_factory) -> tuple[dict, dict]:
    scalars, (grads,) = grad_check.train(tmp_path_factory.mktemp("mtp3_reference"), 1, [*grad_check.RUN, *MTP3])
    return scalars, grads


@pytest.mark.integration
def test_one_layer_of_parameters_and_a_loss_per_depth(mtp3_reference):
    scalars, grads = mtp3_reference
    mtp = sorted(k for k in grads["grads"] if k.startswith("mtp."))
    assert mtp and all(k.startswith("mtp.layers.0.") for k in mtp), mtp[-3:]
    for it, mean in scalars["mtp loss"].items():
        depths = [scalars[t][it] for t in DEPTH_TAGS]
        assert mean == pytest.approx(sum(depths) / 3, rel=1e-6)
        assert len(set(depths)) == 3  # three different predictions, not one loss logged thrice
    assert scalars["mtp loss validation"][2] == pytest.approx(
        sum(scalars[f"{t} validation"][2] for t in DEPTH_TAGS) / 3, rel=1e-6)


def test_refusals_name_the_flag():
    from pretrain.config.arguments import build_parser, config_from_args

    def error(*argv, world_size=1) -> str:
        with pytest.raises(ValueError) as e:
            config_from_args(build_parser().parse_args(["--mock-data", *argv]), world_size)
        return str(e.value)

    assert "--mtp-use-repeated-layer" in error("--mtp-num-layers", "3")
    assert "--mtp-num-layers 0" in error("--mtp-num-layers", "0")
    # a layout counts one 'm' per depth (megatron-core's rule)
    assert "MTP depth" in error("--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout",
                                "Ett|ttmL", *MTP3, world_size=2)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, mtp3_reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    want, want_grads = mtp3_reference
    got, got_grads = grad_check.train(tmp_path, nproc, [*grad_check.RUN, *extra])
    grad_check.assert_same_scalars(name, want, got, tags=TAGS)
    grad_check.assert_same_gradients(name, want_grads, got_grads)


E2E = [*MTP3, "--mtp-loss-type", "e2e_tv"]
E2E_LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
              "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
              "--expert-tensor-parallel-size", "1"]


@pytest.mark.integration
def test_e2e_tv_on_packed_documents_matches_single_process(tmp_path):
    """TP 2 + SP x CP 2 x PP 2 x EP 2 (8 ranks) against one process, documents crossing the CP chunks."""
    from tests.data.test_packed_documents import packed_run_args

    run = [*packed_run_args(tmp_path), *E2E]
    want, (want_grads,) = grad_check.train(tmp_path / "one", 1, run)
    assert want["mtp loss"][1] < 1  # e2e_tv's value, not cross-entropy's
    got, got_grads = grad_check.train(tmp_path / "eight", 8, [*run, *E2E_LAYOUT])
    grad_check.assert_same_scalars("e2e-tv-tp2-cp2-pp2-ep2", want, got, tags=TAGS)
    grad_check.assert_same_gradients("e2e-tv-tp2-cp2-pp2-ep2", want_grads, got_grads)


@pytest.mark.integration
def test_trains_and_exports_one_mtp_layer(tmp_path):
    tiny = get_preset("tiny")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    torchrun(1, ["--preset", "tiny", "--mock-data", "--train-iters", "2", "--save", str(ckpt), *MTP3])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), "--load", str(ckpt),
                           "--output", str(out), "--verify"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads(proc.stdout.strip().splitlines()[-1])["verify"]
    assert check["max_abs_logit_diff"] <= 1e-4, check
    config = json.loads((out / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM" and not info["missing_keys"]
    mtp = f"model.layers.{tiny.num_hidden_layers}."
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
