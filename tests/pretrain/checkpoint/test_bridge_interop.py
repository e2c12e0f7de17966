"""Megatron-Bridge checkpoints both ways, on checkpoints Bridge 0.6.2 itself wrote
(tests/fixtures/bridge-0.6.2-glm5-tiny/, its README says how): one with the MTP layer, one with
GLM5Bridge's default (none), and the transformers model both came from (hf/).

Bridge -> here: tools/export_hf.py writes hf/'s tensors bit for bit, tools/verify_hf.py agrees with
transformers, `--load ... --finetune` trains from the weights (the model config from run_config.yaml,
or an HF config.json whose MTP layer the checkpoint lacks: fresh, with a note).
Here -> Bridge: tools/export_bridge.py writes run_config.yaml / train_state.pt in the schema of the
ones Bridge wrote; megatron-core's own GLM-5 configured from that run_config.yaml loads the files as
Bridge's loader does and computes our logits; and the result reads back here to the same tensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from model import key_layout
from model.presets import get_preset
from pretrain.checkpoint import bridge_format
from pretrain.checkpoint.run_state import CheckpointError, latest_iteration, read_run_state
from tests.inprocess import train_here

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "bridge-0.6.2-glm5-tiny"
HF = FIXTURES / "hf"
WITH_MTP, NO_MTP = FIXTURES / "bridge-with-mtp", FIXTURES / "bridge-default-no-mtp"
MTP_LAYER = "model.layers.4."  # the HF name prefix of the MTP layer (num_hidden_layers 4)
RUN = ["--mock-data", "--seq-length", "64", "--global-batch-size", "4", "--micro-batch-size", "4",
       "--lr", "3e-3", "--min-lr", "3e-3", "--train-iters", "20"]


def _export(load: Path, out: Path) -> dict:
    from tools.export_hf import export

    export(str(load), str(out), dtype="fp32", progress=False)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("ckpt", [WITH_MTP, NO_MTP], ids=["with-mtp", "no-mtp"])
def test_bridge_checkpoint_exports_hf_tensor_for_tensor(ckpt, tmp_path):
    assert latest_iteration(ckpt) == 0  # was: "points at iteration 0, but iter_0000000 is missing or incomplete"
    got, want = _export(ckpt, tmp_path / "hf"), load_file(HF / "model.safetensors")
    if ckpt == NO_MTP:
        want = {k: v for k, v in want.items() if not k.startswith(MTP_LAYER)}
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    # the model config came from run_config.yaml: hf/'s, but for what it does not hold
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", HF))
    assert ours["num_nextn_predict_layers"] == (1 if ckpt == WITH_MTP else 0)
    for key in bridge_format.KNOWN_FIELDS | {"max_position_embeddings", "initializer_range", "attention_dropout"}:
        if key not in ("num_nextn_predict_layers", "topk_method", "scoring_func", "rope_theta"):  # not in hf/'s
            assert ours[key] == theirs[key], key


def test_verify_hf_agrees_with_transformers_on_a_bridge_checkpoint(monkeypatch):
    from parallel import runtime as rt
    from tools.verify_hf import main

    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):  # its one-process world: set, then restored
        monkeypatch.delenv(var, raising=False)
    try:
        # 64 tokens: with 40 or 48 of them this random model has indexer scores tied at exactly 0 (ReLU) at the
        # top-k boundary, which transformers and megatron-core break differently (tools/import_hf.py's import of
        # hf/ fails there the same way)
        assert main(["--load", str(WITH_MTP), "--hf", str(HF), "--tokens", "64"]) == 0
    finally:
        rt.shutdown()


def _hf_weights_loaded(names: list[str]):
    """A `prepare` hook: the built Trainer's weights are hf/'s (before any step)."""
    hf = load_file(HF / "model.safetensors")

    def check(t):
        state = t.model[0].module.state_dict() if hasattr(t.model[0], "module") else t.model[0].state_dict()
        for megatron, name in names:  # megatron: GPTModel's name (Bridge's), ours is HybridModel's
            assert torch.equal(state[key_layout.to_hybrid(megatron)].float(), hf[name]), megatron
    return check


LOADED = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
          ("decoder.layers.1.self_attention.linear_kv_up_proj.weight", "model.layers.1.self_attn.kv_b_proj.weight")]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """--load the Bridge checkpoint with MTP, --finetune, no --model-config: (saved root, scalars, stdout)."""
    save = tmp_path_factory.mktemp("finetuned") / "ours"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scalars = train_here([*RUN, "--load", str(WITH_MTP), "--finetune", "--save", str(save)],
                             prepare=_hf_weights_loaded([*LOADED, ("mtp.layers.0.eh_proj.weight",
                                                                   "model.layers.4.eh_proj.weight")]))
    return save, scalars, out.getvalue()


@pytest.mark.integration
def test_finetune_from_bridge_takes_the_model_config_from_run_config(finetuned):
    save, scalars, out = finetuned
    assert f"loaded checkpoint {WITH_MTP} at iteration 0" in out
    assert "Megatron-Bridge checkpoint" in out and "not taken over" in out, out
    lm, mtp = scalars["lm loss"], scalars["mtp loss"]
    assert all(torch.isfinite(torch.tensor(v)) for v in [*lm.values(), *mtp.values()]), scalars
    # these random weights of a trained model's scale start above uniform (ln 384 = 5.95): measured 6.06 over
    # the first 4 steps, 5.92 over the last 4
    first, last = (sum(lm[i] for i in its) / 4 for its in (range(1, 5), range(17, 21)))
    assert last < first - 0.05, lm
    _, saved = read_run_state(str(save))
    assert saved["model_config"]["num_nextn_predict_layers"] == 1  # run_config.yaml's mtp_num_layers


@pytest.mark.integration
def test_glm5_config_on_a_bridge_checkpoint_without_mtp_starts_mtp_fresh(capsys):
    """GLM5Bridge leaves MTP out by default; with GLM-5's config (one MTP layer) the layer starts fresh and
    the load says so (it was a raw KeyError: mtp.layers.0.enorm.weight from model not in state dict).
    A plain --load (no --finetune) of a Bridge checkpoint is a weights-only load too."""
    loss = train_here([*RUN, "--train-iters", "2", "--model-config", str(HF / "config.json"), "--load", str(NO_MTP)],
                      prepare=_hf_weights_loaded(LOADED))
    out = capsys.readouterr().out
    assert "the checkpoint has no MTP layer" in out and "starts from fresh weights" in out, out
    assert "Megatron-Bridge checkpoint" in out and "from iteration 0" in out, out
    assert all(torch.isfinite(torch.tensor(v)) for v in loss["mtp loss"].values()), loss


def test_bridge_config_refusals_name_the_field(tmp_path):
    ckpt = tmp_path / "bridge"
    shutil.copytree(NO_MTP, ckpt)
    config = ckpt / "iter_0000000" / bridge_format.RUN_CONFIG
    text = config.read_text()
    config.write_text(text.replace("normalization: RMSNorm", "normalization: LayerNorm"))
    with pytest.raises(CheckpointError, match="model.normalization='LayerNorm'"):
        read_run_state(str(ckpt))
    config.write_text(text.replace("  - 0\n  - 1\n  - 1\n  - 1\n", "  - 1\n  - 0\n  - 1\n  - 1\n"))
    with pytest.raises(CheckpointError, match="model.moe_layer_freq"):
        read_run_state(str(ckpt))
    config.write_text(text.replace("  dsa_indexer_topk: 12\n", ""))
    with pytest.raises(CheckpointError, match="lacks \\['dsa_indexer_topk'\\]"):
        read_run_state(str(ckpt))
    config.write_text("model: !!python/object/apply:os.system ['echo hi']\n")  # data only: never executed
    with pytest.raises(CheckpointError, match="not readable YAML"):
        read_run_state(str(ckpt))
    config.write_text(text)
    (ckpt / "iter_0000000" / bridge_format.TRAIN_STATE).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="train_state.pt: not a readable train state"):
        read_run_state(str(ckpt))
    shutil.copy(NO_MTP / "iter_0000000" / bridge_format.TRAIN_STATE, ckpt / "iter_0000000")
    with pytest.raises(bridge_format.BridgeFormatError, match="IndexShare"):  # GLM-5.2's shared top-k: no form
        bridge_format.run_config_for(get_preset("glm5.2"), {})
    # the iteration directory (the path Bridge's load_megatron_model takes) is not a --load: said before any work
    from pretrain.config.arguments import build_parser, config_from_args

    with pytest.raises(ValueError, match="is one iteration of a checkpoint: give the directory above it"):
        config_from_args(build_parser().parse_args([*RUN, "--load", str(NO_MTP / "iter_0000000")]), 1)
    # a model config that differs where run_config.yaml speaks is refused by name, as for our checkpoints
    _, saved = read_run_state(str(ckpt))
    ours = {**saved["model_config"], "hidden_size": 128, "eos_token_id": [7], "max_position_embeddings": 202752}
    assert bridge_format.config_differences(saved, ours)[0] == ["hidden_size"]
    # the MTP layer may differ either way, with a note
    _, with_mtp = read_run_state(str(WITH_MTP))
    no_mtp = {**with_mtp["model_config"], "num_nextn_predict_layers": 0}
    assert bridge_format.config_differences(with_mtp, no_mtp) == ([], [
        "the checkpoint's MTP layer is not used (this run's model config has none)"])
    assert bridge_format.fresh_prefixes(with_mtp, no_mtp) == ()
    assert bridge_format.fresh_prefixes(saved, with_mtp["model_config"]) == ("mtp.",)


@pytest.fixture(scope="module")
def bridge_copy(finetuned, tmp_path_factory):
    """tools/export_bridge.py of the checkpoint trained here: (our root, its Bridge copy, the iteration dir)."""
    from tools.export_bridge import export

    out = tmp_path_factory.mktemp("bridge_copy") / "bridge"
    summary = export(str(finetuned[0]), str(out))
    return finetuned[0], out, Path(summary["checkpoint"])


def test_export_bridge_writes_bridge_schema_and_reads_back(bridge_copy, tmp_path):
    """Our checkpoint (trained here from the Bridge one) -> Bridge's layout: run_config.yaml's
    model section holds only fields Bridge's own has, with its values for this model (but the portable MoE
    choices and the block spec); train_state.pt is Bridge's; and the result reads back here to the same tensors."""
    from megatron.core import dist_checkpointing

    from tools.export_bridge import export

    ours, bridge, written = bridge_copy
    assert (bridge / "latest_checkpointed_iteration.txt").read_text() == str(int(written.name[len("iter_"):]))
    mine = yaml.safe_load((written / bridge_format.RUN_CONFIG).read_text())
    theirs = yaml.safe_load((WITH_MTP / "iter_0000000" / bridge_format.RUN_CONFIG).read_text())
    assert mine["_target_"] == theirs["_target_"]
    for section in ("checkpoint", "model"):  # what Bridge's loaders read: its names, its types
        assert mine[section]["_target_"] == theirs[section]["_target_"], section
        assert set(mine[section]) <= set(theirs[section]), set(mine[section]) - set(theirs[section])
        for k, v in mine[section].items():
            assert v is None or theirs[section][k] is None or type(v) is type(theirs[section][k]), (section, k)
    m, t = mine["model"], theirs["model"]
    # the fixture's run needed CPU stand-ins for the block spec and the dispatcher (its README)
    ours_only = {"transformer_layer_spec", "moe_token_dispatcher_type"}
    differ = {k: (m[k], t[k]) for k in m if k not in ours_only and m[k] != t[k]}
    assert not differ, differ
    assert m["transformer_layer_spec"]["_target_"] == bridge_format.LAYER_SPEC
    train_state = torch.load(written / bridge_format.TRAIN_STATE, weights_only=True)
    bridge_state = torch.load(WITH_MTP / "iter_0000000" / bridge_format.TRAIN_STATE, weights_only=True)
    assert {k: v.dtype for k, v in train_state.items()} == {k: v.dtype for k, v in bridge_state.items()}
    assert (bridge / bridge_format.LATEST_TRAIN_STATE).exists()
    assert not (written / "run_state.json").exists()
    assert dist_checkpointing.load_common_state_dict(str(written)) is not None  # what Bridge's loader reads first
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="--save .* is not empty"):
        export(str(ours), str(busy))
    # whatever --force says: never its input (nor a parent of it), nor a directory holding a checkpoint
    for target in (ours, ours.parent, bridge):
        with pytest.raises(ValueError, match="--save .* (is or contains --load|holds a checkpoint)"):
            export(str(ours), str(target), force=True)
    assert (ours / "latest_checkpointed_iteration.txt").exists() and (written / bridge_format.RUN_CONFIG).exists()
    with pytest.raises(CheckpointError, match="already a Megatron-Bridge checkpoint"):
        export(str(WITH_MTP), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    # back here: the Bridge-layout copy exports the same tensors as our checkpoint
    a, b = _export(ours, tmp_path / "a"), _export(bridge, tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_megatron_core_model_from_our_run_config_loads_the_copy_as_bridge_does(bridge_copy):
    """What Bridge's load_megatron_model does with the copy, minus Bridge: megatron-core 0.19.2's stock GLM-5
    (tests/upstream_glm5.py) configured from run_config.yaml's model section loads every weight from the
    files as Bridge's weight loader reads them (common state, content metadata, torch_dist, strict), and
    computes our model's logits (to the ~1e-4 of the latent norms' eps: tests/parallel/test_mcore_exchange.py)."""
    import dataclasses

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from model.builder import build_model
    from model.config import GLM5Config
    from model.mcore_config import ModelOptions, to_transformer_config
    from parallel import runtime as rt
    from parallel.dims import ParallelDims
    from pretrain.checkpoint import extra_state
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA
    from tools.lib.hf_verify import main_logits
    from pretrain.checkpoint.run_state import iter_dir
    from tests.helpers import one_rank_gloo_world
    from tests.upstream_glm5 import build_upstream_model

    ours, _, written = bridge_copy
    section = yaml.safe_load((written / bridge_format.RUN_CONFIG).read_text())["model"]
    fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    # the callables by the names run_config.yaml gives (resolved here by a table, never imported from the file)
    assert section["activation_func"]["_target_"] == "torch.nn.functional.silu"
    assert section["params_dtype"]["_target_"] == "torch.float32"
    tconfig = MLATransformerConfig(
        **{k: v for k, v in section.items() if k in fields and not isinstance(v, dict)},
        activation_func=torch.nn.functional.silu, params_dtype=torch.float32, use_cpu_initialization=True,
        transformer_impl="local", dsa_kernel_backend="none")  # CPU stand-ins, as Bridge's fixture run needed
    iteration, saved = read_run_state(str(ours))
    cfg = GLM5Config.from_hf_dict(saved["model_config"])
    tokens = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, 0)
        try:
            theirs = build_upstream_model(cfg, tconfig)
            common = dist_checkpointing.load_common_state_dict(str(written))
            metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
            loaded = dist_checkpointing.load({"model": theirs.sharded_state_dict(metadata=metadata)}, str(written),
                                             strict="assume_ok_unexpected")
            missing, unexpected = theirs.load_state_dict(
                {k: v for k, v in loaded["model"].items() if "_extra_state" not in k}, strict=False)
            assert [k for k in missing if "_extra_state" not in k] == [] and unexpected == []
            (mine,) = build_model(cfg, to_transformer_config(cfg, ModelOptions(dsa_kernel_backend="none")),
                                  use_te=False)
            request = {"model": mine.sharded_state_dict(metadata=SHARDING_METADATA)}
            mine.load_state_dict(extra_state.load(request, iter_dir(ours, iteration))["model"])
            with torch.no_grad():
                diff = (main_logits(theirs.eval(), tokens) - main_logits(mine.eval(), tokens)).abs().max()
        finally:
            parallel_state.destroy_model_parallel()
    assert diff < 1e-3, diff


@pytest.mark.parametrize("preset", ["glm5", "glm5-proxy", "tiny"])
def test_run_config_model_section_reads_back_to_the_same_architecture(preset):
    """GLM-5's own sizes (3 dense layers, 256 experts, ...) through run_config.yaml's model section and back."""
    cfg = get_preset(preset)
    section = yaml.safe_load(yaml.safe_dump(bridge_format.run_config_for(cfg, {"tp": 1, "pp": 1})))
    back = bridge_format.model_config(section, "run_config.yaml").to_hf_dict()
    ours = cfg.to_hf_dict()
    assert {k: back[k] for k in bridge_format.KNOWN_FIELDS} == {k: ours[k] for k in bridge_format.KNOWN_FIELDS}
