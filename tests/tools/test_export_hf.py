"""HF export: a real torchrun checkpoint -> safetensors that real transformers loads, with the same
logits; shard/index consistency; the FP8 format; all-or-nothing output; refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model import fp8_blocks
from model.presets import get_preset
from tests.helpers import ROOT, child_env, torchrun
from tests.pretrain.checkpoint.test_upgrade import MCORE016
from tools import export_hf

TINY = get_preset("tiny")


def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real 2-iteration training checkpoint of the tiny preset, made once per pytest session
    (tests/tools/test_import_hf.py uses it too)."""
    d = tmp_path_factory.getbasetemp() / "hf-tiny-checkpoint"
    if not (d / "latest_checkpointed_iteration.txt").exists():
        torchrun(1, ["--preset", "tiny", "--mock-data", "--train-iters", "2", "--save", str(d)])
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(d)
    return d


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), *map(str, args)], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=600)


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
@pytest.mark.integration
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, ckpt, tokenizer_dir, dtype):
    out = tmp_path / "hf"
    proc = run_cli("--load", ckpt, "--output", out, "--dtype", dtype, "--verify", "--tokenizer", tokenizer_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    check = summary["verify"]
    # 48 tokens > index_topk=16: the DSA indexer really selects keys, so its half swap is checked.
    assert check["tokens"] > TINY.index_topk and check["max_abs_logit_diff"] <= 1e-4, check
    if dtype != "fp32":  # verify compared with our model rounded the same way: the rounding really happened
        assert check["rounding_max_abs_logit_change"] > 1e-4, check
    assert sorted(p.name for p in out.iterdir() if "tokenizer" in p.name)  # copied
    if dtype == "fp8":
        return  # transformers' own FP8 loader needs accelerate; verify loaded a dequantized copy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    assert not info["missing_keys"]
    mtp = f"model.layers.{TINY.num_hidden_layers}."
    assert all(k.startswith(mtp) for k in info["unexpected_keys"])  # only the MTP layer, which HF does not run
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"
    if dtype == "bf16":  # as it is usually run: transformers computing in bf16, the router kept in fp32
        bf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        gate = bf16.model.layers[1].mlp.gate
        assert gate.e_score_correction_bias.dtype == gate.weight.dtype == torch.float32
        tokens = torch.randint(0, TINY.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, have = model(input_ids=tokens).logits, bf16(input_ids=tokens).logits.float()
        # bf16 activations over 4 layers: ~2.5% of the logits' norm measured; a mapping error is O(1)
        assert (have - want).norm() <= 0.06 * want.norm()


@pytest.mark.integration
def test_shards_index_and_tensor_formats(tmp_path, ckpt):
    out = tmp_path / "hf"
    limit = 100_000
    summary = export_hf.export(str(ckpt), str(out), dtype="bf16", max_shard_size=limit, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n == summary["shards"] > 4
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    total = 0
    for name in files:
        with safe_open(str(out / name), "pt") as f:
            keys = list(f.keys())
            assert sorted(keys) == sorted(k for k, v in index["weight_map"].items() if v == name)
            sizes = [f.get_tensor(k).nbytes for k in keys]
        total += sum(sizes)
        assert sum(sizes) <= limit or len(keys) == 1, (name, sum(sizes))
    assert index["metadata"]["total_size"] == total

    t = read_all(out)
    mtp = TINY.num_hidden_layers
    for k in ["enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "mlp.experts.7.up_proj.weight", "self_attn.indexer.wq_b.weight"]:
        assert f"model.layers.{mtp}.{k}" in t, k
    assert t["model.embed_tokens.weight"].shape == t["lm_head.weight"].shape == (TINY.vocab_size, TINY.hidden_size)
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (TINY.intermediate_size, TINY.hidden_size)
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight"].shape == (TINY.moe_intermediate_size, TINY.hidden_size)
    for k, v in t.items():
        expected = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
        assert v.dtype == expected, k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "glm_moe_dsa" and config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["GlmMoeDsaForCausalLM"] and "quantization_config" not in config


@pytest.mark.integration
def test_fp8_blocks_are_within_e4m3_error_of_the_source(tmp_path, ckpt):
    export_hf.export(str(ckpt), str(tmp_path / "fp32"), dtype="fp32", progress=False)
    export_hf.export(str(ckpt), str(tmp_path / "fp8"), dtype="fp8", progress=False)
    src, q = read_all(tmp_path / "fp32"), read_all(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    unquantized = ("model.embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight")
    quantized = 0
    for name, w in src.items():
        scale = name[: -len("weight")] + "weight_scale_inv"
        if w.dim() == 1 or name.endswith(unquantized):
            assert scale not in q, name
            expected = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            assert q[name].dtype == expected, name
            continue
        quantized += 1
        assert q[name].dtype == torch.float8_e4m3fn and q[scale].dtype == torch.float32, name
        assert tuple(q[scale].shape) == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), name
        err = (fp8_blocks.dequantize(q[name], q[scale]) - w).abs()
        for bi in range(q[scale].shape[0]):
            for bj in range(q[scale].shape[1]):
                block = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
                amax = w[block].abs().max()
                # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value, at most 2^-4 * amax
                assert err[block].max() <= amax * 2**-4 * (1 + 1e-6), name
                assert err[block].norm() <= 2**-3 * w[block].norm(), name
                assert q[scale][bi, bj] == pytest.approx(float(amax) / 448, rel=1e-6), name
    assert quantized > 10


def test_fp8_quantize_handles_ragged_and_zero_blocks():
    w = torch.randn(300, 130) * torch.logspace(-3, 2, 130)
    w[:128, :128] = 0
    q, s = fp8_blocks.quantize(w)
    assert q.shape == w.shape and s.shape == (3, 2)
    back = fp8_blocks.dequantize(q, s)
    assert back[:128, :128].abs().max() == 0
    assert (back - w).abs().max() <= w.abs().max() * 2**-4


@pytest.mark.integration
def test_interrupted_export_leaves_nothing_complete_looking(tmp_path, ckpt):
    out = tmp_path / "hf"
    # A hard kill (no cleanup runs) after the first shard is written.
    script = (f"import os, sys; sys.argv = ['export_hf']; sys.path.insert(0, {str(ROOT)!r})\n"
              "from tools import export_hf\n"
              "real = export_hf.write_shard\n"
              "def write_then_die(*a):\n    real(*a)\n    os._exit(9)\n"
              "export_hf.write_shard = write_then_die\n"
              f"export_hf.export({str(ckpt)!r}, {str(out)!r}, max_shard_size=100_000, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not out.exists()
    (leftover,) = tmp_path.glob("hf.partial-*")
    assert list(leftover.glob("*.safetensors")) and not (leftover / "config.json").exists()

    # An exception (Ctrl-C) cleans up after itself.
    def fail(*a):
        raise KeyboardInterrupt

    real = export_hf.write_shard
    export_hf.write_shard = fail
    try:
        with pytest.raises(KeyboardInterrupt):
            export_hf.export(str(ckpt), str(tmp_path / "hf2"), progress=False)
    finally:
        export_hf.write_shard = real
    assert not (tmp_path / "hf2").exists() and not list(tmp_path.glob("hf2.partial-*"))

    # And a later export succeeds next to the leftover.
    export_hf.export(str(ckpt), str(out), progress=False)
    assert (out / "config.json").exists()


@pytest.mark.integration
def test_refusals_name_the_path(tmp_path, ckpt, capsys):
    def error(*args) -> str:
        assert export_hf.main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    out = tmp_path / "out"
    assert str(tmp_path / "none") in error("--load", tmp_path / "none", "--output", out)
    assert "iter_0000007" in error("--load", ckpt, "--iteration", "7", "--output", out)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "latest_checkpointed_iteration.txt").write_text("2\n")
    (broken / "iter_0000002").mkdir()
    (broken / "iter_0000002" / "run_state.json").write_text((ckpt / "iter_0000002" / "run_state.json").read_text())
    msg = error("--load", broken, "--output", out)
    assert "iter_0000002" in msg and "incomplete" in msg

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = error("--load", ckpt, "--output", out)
    assert str(out) in msg and "--force" in msg and (out / "keep.txt").exists()
    assert export_hf.main(["--load", str(ckpt), "--output", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_megatron_core_016_checkpoint_exports_to_the_same_logits(tmp_path):
    """The 0.16.1 checkpoint is in GPTModel's key layout (model/key_layout.py): tools/export_hf.py reads it by
    its keys, and transformers' model of the export computes the fixture's logits."""
    from tools.lib.hf_verify import load_hf
    from tools import export_hf

    want = torch.load(MCORE016 / "logits.pt", weights_only=True)
    export_hf.export(str(MCORE016 / "checkpoint"), str(tmp_path / "hf"), dtype="fp32", progress=False)
    hf, _ = load_hf(str(tmp_path / "hf"))
    with torch.no_grad():
        got = hf(input_ids=want["tokens"]).logits.float()
    assert torch.allclose(got, want["logits"], rtol=0, atol=1e-4), (got - want["logits"]).abs().max()
