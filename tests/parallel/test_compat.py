"""The move to megatron-core 0.19.2: checkpoints of the 0.16.1 stack still load, and every upstream behaviour
that a patch of parallel/compat/ or a workaround relies on (docs/COMPAT.md) is held here, so that the next
upgrade fails a test instead of changing training silently."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from tests.inprocess import train_here

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "mcore016"  # tests/fixtures/make_mcore016_checkpoint.py
TINY = ["--preset", "tiny", "--mock-data", "--global-batch-size", "2", "--micro-batch-size", "1",
        "--seq-length", "64", "--lr", "3e-3"]


def test_megatron_core_016_checkpoint_gives_the_same_logits():
    """Weights saved by the 0.16.1 stack (commit 5a77f20): the main logits on the same tokens are unchanged."""
    from megatron.core import parallel_state

    from tools.lib.hf_verify import build_our_model, main_logits
    from tests.helpers import one_rank_gloo_world

    want = torch.load(FIXTURE / "logits.pt", weights_only=True)
    with one_rank_gloo_world():
        try:
            chunk, cfg = build_our_model(str(FIXTURE / "checkpoint"), None)
            with torch.no_grad():
                got = main_logits(chunk, want["tokens"])[..., : cfg.vocab_size]
        finally:
            parallel_state.destroy_model_parallel()
    assert torch.allclose(got, want["logits"], rtol=0, atol=1e-5), (got - want["logits"]).abs().max()


def test_megatron_core_016_checkpoint_exports_to_the_same_logits(tmp_path):
    """The 0.16.1 checkpoint is in GPTModel's key layout (model/key_layout.py): tools/export_hf.py reads it by
    its keys, and transformers' model of the export computes the fixture's logits."""
    from tools.lib.hf_verify import load_hf
    from tools import export_hf

    want = torch.load(FIXTURE / "logits.pt", weights_only=True)
    export_hf.export(str(FIXTURE / "checkpoint"), str(tmp_path / "hf"), dtype="fp32", progress=False)
    hf, _ = load_hf(str(tmp_path / "hf"))
    with torch.no_grad():
        got = hf(input_ids=want["tokens"]).logits.float()
    assert torch.allclose(got, want["logits"], rtol=0, atol=1e-4), (got - want["logits"]).abs().max()


def test_megatron_core_016_checkpoint_resumes_training():
    """Optimizer state, data position and RNG of the 0.16.1 checkpoint: the resumed step 3 computes the
    0.16.1 run's losses (its forward only reads what was loaded); step 4 follows 0.19.2's MTP weighting
    (64/63 on the MTP gradients at sequence 64, docs/COMPAT.md), so it agrees to 1e-3."""
    want = json.loads((FIXTURE / "resumed.json").read_text())
    got = train_here([*TINY, "--train-iters", "4", "--load", str(FIXTURE / "checkpoint"),
                      "--override-opt_param-scheduler"])
    for tag in ("lm loss", "mtp loss"):
        assert got[tag][3] == pytest.approx(want[tag]["3"], rel=1e-5), tag
        assert got[tag][4] == pytest.approx(want[tag]["4"], rel=1e-3), tag


def test_indexer_loss_keeps_the_recipes_scale():
    """0.19.2's schedule sets DSAIndexerLossAutoScaler's scale on every micro-batch (to grad_scale_func(1))
    unless `experimental_attention_variant_loss_scale_func` says who does: the recipe's token weight stands."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    train_here([*TINY, "--train-iters", "1", "--dsa-indexer-loss-coeff", "1.0"])
    assert float(DSAIndexerLossAutoScaler.main_loss_backward_scale) == 64.0  # tokens per micro-batch


def test_mla_rope_rotates_interleaved_pairs():
    """0.19's apply_rotary_pos_emb rotates halves unless `mla_rotary_interleaved=True` (0.16 took it from
    config.multi_latent_attention): ours passes it, and equals HF's interleaved RoPE."""
    from megatron.core.models.common.embeddings import apply_rotary_pos_emb

    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.rope import apply_mla_rope
    from model.presets import get_preset
    from tests.helpers import one_rank_gloo_world

    config = to_transformer_config(get_preset("tiny"), ModelOptions())
    s, d = 6, 8
    t = torch.randn(s, 1, 2, d)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(s).float()[:, None] * inv[None]  # [s, d/2]
    freqs = torch.cat([angles, angles], -1).view(s, 1, 1, d)
    x1, x2 = t[..., 0::2], t[..., 1::2]  # HF's apply_rotary_pos_emb_interleave: pairs (0,1), (2,3), ...
    cos, sin = angles.cos().view(s, 1, 1, -1), angles.sin().view(s, 1, 1, -1)
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
    with one_rank_gloo_world():
        group = torch.distributed.group.WORLD
        assert torch.allclose(apply_mla_rope(t, freqs, config, group), want, atol=1e-6)
        assert not torch.allclose(apply_rotary_pos_emb(t, freqs, config=config, cp_group=group), want, atol=1e-3)


def test_ramp_is_ignored_without_a_step_schedule():
    """0.19.2's init_num_microbatches_calculator drops rampup_batch_size silently (the trainer passes the
    ramp as a step schedule, tests/data/test_data_reader.py::test_batch_ramp_is_megatrons_schedule)."""
    from megatron.core import num_microbatches_calculator as nmc

    nmc.init_num_microbatches_calculator(0, [4, 4, 64], 16, 1, 1)
    try:
        assert nmc.get_current_global_batch_size() == 16
    finally:
        nmc.destroy_num_microbatches_calculator()


def test_mtp_layer_numbering_and_checkpoint_names(caplog):
    """0.19.2's HybridModel numbers GLM layer i's two hybrid layers 2i + 1 and 2i + 2, the MTP layer's inner
    layers 1 and 2 (`is_mtp_layer`), and keeps the MTP inner stack's name `mtp_model_layer` in checkpoints:
    our MoE statistics and indexer-loss tracker count the MTP layer after the decoder's GLM layers, and the
    sharded keys are the module names (model/hf_mapping.py's logical names)."""
    from megatron.core import parallel_state

    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.dsa import GLMSparseAttention
    from model.presets import get_preset
    from parallel import runtime as rt
    from parallel.dims import ParallelDims
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA
    from pretrain.metrics.moe_stats import routers
    from tests.helpers import one_rank_gloo_world

    cfg = get_preset("tiny")
    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, 0)
        try:
            with caplog.at_level("WARNING"):
                (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions()), use_te=False)
            assert type(chunk).__name__ == "HybridModel" and "IS DEPRECATED" not in caplog.text, caplog.text
            inner = chunk.mtp.layers[0].mtp_model_layer.layers
            assert [(m.is_mtp_layer, m.layer_number) for m in inner] == [(True, 1), (True, 2)]
            assert [i for i, _ in routers([chunk])] == [1, 2, 3, 4]
            numbers = [m.layer_number for m in chunk.modules() if isinstance(m, GLMSparseAttention)]
            assert numbers == [1, 3, 5, 7, 2 * cfg.num_hidden_layers + 1]
            sharded = chunk.sharded_state_dict(metadata=SHARDING_METADATA)
            for name, _ in chunk.named_parameters():
                if name.startswith("mtp.") and ".experts." not in name:
                    assert sharded[name].key == name
        finally:
            parallel_state.destroy_model_parallel()


def test_upstream_shapes_the_patches_rely_on():
    """The functions and defaults parallel/compat/ patches or works around (docs/COMPAT.md): a change here
    means re-deriving that patch."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
    from megatron.core.transformer import multi_token_prediction as mtp
    from megatron.core.transformer.moe import moe_utils

    # megatron_without_te: fp8=False still asks TE's FP8 state; the recomputed outputs go back through a
    # C++ extension built at first use
    assert CheckpointWithoutOutput(fp8=False).fp8 is True
    assert "share_storage = _get_share_storage()" in inspect.getsource(CheckpointWithoutOutput._recompute)
    # megatron_checkpoint: the async writer's queue, the default strategy we override, the per-state copy
    assert hasattr(filesystem_async, "_results_queue")
    assert inspect.signature(dist_checkpointing.save).parameters["async_strategy"].default == "nvrx"
    assert "tensors" in inspect.signature(DistributedOptimizer._set_main_param_and_optimizer_states).parameters
    # megatron_mtp: process_mtp_loss takes its counts from the module's roll_tensor
    assert "roll_tensor(" in inspect.getsource(mtp.process_mtp_loss)
    assert "original_num_tokens / num_tokens_safe" in inspect.getsource(mtp.process_mtp_loss)
    # ... which models/hybrid/hybrid_model.py (ours) and models/gpt/gpt_model.py call by their imported
    # names (wrapped there too), cp_group by keyword
    from megatron.core.models.gpt import gpt_model
    from megatron.core.models.hybrid import hybrid_model

    for module in (hybrid_model, gpt_model):
        assert "process_mtp_loss" in vars(module) and "cp_group=self.pg_collection.cp" in inspect.getsource(module)
    # --mtp-loss-type (model/modules/mtp_objective.py): HybridModel calls it by its imported name too; the
    # cross-entropy tap relies on one compute_language_model_loss call per depth, after that depth's label
    # roll; e2e_tv on the scale per depth and the autoscaler; mtp_loss_type is ours (upstream has none yet)
    from megatron.core.transformer.transformer_config import TransformerConfig

    loop = inspect.getsource(mtp.process_mtp_loss)
    assert loop.count("compute_language_model_loss(") == 1 and loop.index("mtp_labels, _ = roll_tensor(") < \
        loop.index("compute_language_model_loss(mtp_labels, mtp_logits)")
    assert "config.mtp_loss_scaling_factor / config.mtp_num_layers" in loop and "MTPLossAutoScaler.apply" in loop
    assert hasattr(mtp, "_mtp_logits_are_vocab_sharded")
    fields = TransformerConfig.__dataclass_fields__
    assert "mtp_detach_heads" in fields and "mtp_loss_type" not in fields
    # megatron_muon: the registry entry we copy, the hook we override, the orthogonalizer we call per head
    from megatron.core.optimizer import emerging_optimizers as eo

    muon = eo._EMERGING_OPTIMIZERS["muon"]
    assert muon.optimizer_cls is eo.TensorParallelMuon and muon.config_to_kwargs is eo._muon_config_to_kwargs
    assert "self.orthogonalize(p, grad" in inspect.getsource(eo.OrthogonalizedOptimizer.step)
    assert "def scaled_orthogonalize_fn(\n            grad" in inspect.getsource(eo.TensorParallelMuon.__init__)
    assert "check_config_overrides_consistency" in inspect.getsource(mcore_optimizer.get_megatron_optimizer)
    # ... and the layer-wise distributed optimizer: its constructor's arguments, bf16-only wrapping, the uneven
    # all-gather we pad over gloo, the nested state layout its checkpoint code reads
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer as LayerWise

    assert list(inspect.signature(LayerWise.__init__).parameters)[1:] == [
        "optimizers", "config", "pg_collection", "init_state_fn_list", "model_chunks"]
    assert "if config.bf16:" in inspect.getsource(LayerWise.__init__)
    assert "torch.distributed.all_gather(gather_list, src, group=group)" in inspect.getsource(LayerWise.allgather_params)
    assert "sd['optimizer']['state']" in inspect.getsource(LayerWise.sharded_state_dict)
    # megatron_cpu: the dispatcher converts only CUDA split sizes to numpy (read from the file: the CPU
    # runtime of this process has replaced the function)
    source = inspect.getsource(moe_utils)
    assert "tensor.is_cuda" in source[source.index("def maybe_move_tensor_to_cpu"):][:1200]
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import token_dispatcher

    assert "maybe_move_tensor_to_cpu" in vars(token_dispatcher)  # the imported copy megatron_cpu replaces too
    source = inspect.getsource(mc_random)
    assert "def _get_cuda_rng_state" in source and "def _set_cuda_rng_state" in source
    # torch_checkpoint: the metadata is unpickled by filesystem.py's `pickle.load`; stored objects by
    # load_bytes, whose body (weights_only=False, then set_element or state_dict) our replacement repeats
    from torch.distributed.checkpoint import default_planner, filesystem

    from parallel.compat import torch_checkpoint

    assert "pickle.load(metadata_file)" in inspect.getsource(filesystem.FileSystemReader.read_metadata)
    load_bytes = torch_checkpoint._ORIGINAL_LOAD_BYTES or default_planner.DefaultLoadPlanner.load_bytes
    body = inspect.getsource(load_bytes)
    assert body.count("torch.load(") == 2 and body.count("weights_only=False") == 2
    assert "set_element(" in body and "self.mappings[read_item.dest_index.fqn]" in body
    assert "self.state_dict[read_item.dest_index.fqn] = " in body and "self.flatten_state_dict" in body
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    assert "load_bytes" not in vars(MCoreLoadPlanner)  # megatron-core inherits torch's


def test_selective_recompute_on_cpu_builds_nothing_and_matches(monkeypatch):
    """megatron-core's output-discarding recompute on CPU tensors gives the gradients of no recompute,
    through a view of the discarded output, without JIT-building its C++ extension (a build that once
    hung CI on a lock a killed process left behind)."""
    import megatron.core.tensor_parallel.random as mc_random
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    from parallel.compat import megatron_cpu, patch_megatron

    megatron_cpu.activate()
    patch_megatron()

    def no_build(*args, **kwargs):
        raise AssertionError("the CPU runtime must not JIT-build megatron's share_storage extension")

    monkeypatch.setattr(mc_random, "load_inline", no_build)
    torch.manual_seed(0)
    x0, w0 = torch.randn(4, 8), torch.randn(8, 8)

    def grads(recompute: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        layer = lambda a: torch.nn.functional.gelu(a @ w)  # noqa: E731
        if recompute:
            ckpt = CheckpointWithoutOutput(fp8=False)
            h = ckpt.checkpoint(layer, x)
        else:
            h = layer(x)
        loss = (h.view(2, 16)[:, 3:] ** 2).sum()  # pow saves a view of h: backward reads the refilled storage
        if recompute:
            ckpt.discard_output_and_register_recompute(loss)
            assert h.untyped_storage().nbytes() == 0
        loss.backward()
        return x.grad, w.grad

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_deepspeed_param_groups_keep_megatrons_weight_decay_rule():
    """0.19 moved the "no weight decay on biases and 1-D weights" overrides out of `_get_param_groups` (None
    now means none): the DeepSpeed engine's groups must still exempt exactly the norms."""
    pytest.importorskip("deepspeed")
    from pretrain.config.arguments import parse_args
    from pretrain.engine.deepspeed_zero import _param_groups
    from tests.helpers import one_rank_gloo_world

    module = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    with one_rank_gloo_world():
        groups = _param_groups(module, parse_args([*TINY, "--weight-decay", "0.1"], world_size=1))
    decay = {id(p): g["wd_mult"] for g in groups for p in g["params"]}
    assert decay[id(module[0].weight)] == 1.0
    assert decay[id(module[0].bias)] == decay[id(module[1].weight)] == decay[id(module[1].bias)] == 0.0
