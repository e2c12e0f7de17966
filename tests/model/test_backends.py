"""The GPU paths that a CPU can check: backend choice and megatron-core's TE stand-ins (keyed on TE's
absence, not on CUDA), FP8 token padding for MoE, grouped-expert init, checkpoints across backends,
the implementation report. What only a GPU shows (`gpu`-marked, at the end): TE trains in bf16 and each FP8
recipe like bf16, grouped GEMM and TE's permute fusion start from the same model per weight."""

import math
import types

import pytest
import torch

from tests import grad_check
from tests.conftest import gpu_only
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.helpers import GPU_ITERS, TE, assert_loss_falls, gpu_tiny_args, run_logged


# --- defect 3: a GPU without TE ------------------------------------------------------------------
def test_te_stand_ins_are_repaired_when_te_is_absent_even_with_a_gpu(monkeypatch):
    import megatron.core.tensor_parallel.random as mc_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    from model import transformer_impl
    from parallel.compat import megatron_without_te, patch_megatron

    # megatron-core 0.19.2 itself says "no TE" to MLA and defines the router's TE GEMM as None (0.16.1
    # needed both repaired): only selective recompute's FP8 names are left undefined
    if not transformer_impl.te_available():
        assert mla.HAVE_TE is False and moe_utils.te_general_gemm is None
    # What megatron-core leaves without TE, on a machine that has CUDA: the CPU runtime (which is inert
    # there) must not be what repairs it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(mc_random, "FP8GlobalStateManager", raising=False)
    monkeypatch.setattr(transformer_impl, "te_available", lambda: False)
    patch_megatron()  # what every model build goes through (parallel.runtime.init_model_parallel)
    assert mc_random.FP8GlobalStateManager.is_fp8_enabled() is False

    monkeypatch.delattr(mc_random, "FP8GlobalStateManager")
    assert megatron_without_te.repair_te_stand_ins(te_present=True) is False  # TE there: nothing touched
    assert not hasattr(mc_random, "FP8GlobalStateManager")


def test_transformer_impl_choice():
    from model.transformer_impl import resolve

    assert resolve(None, cuda=True, te=True) == "transformer_engine"  # Megatron-LM's default where TE runs
    assert resolve(None, cuda=True, te=False) == "local"
    assert resolve(None, cuda=False, te=True) == "local"
    assert resolve("local", cuda=True, te=True) == "local"
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine needs a GPU with Transformer "
                                         "Engine; Transformer Engine is not installed"):
        resolve("transformer_engine", cuda=True, te=False)


@pytest.mark.parametrize("argv,message", [
    (["--transformer-impl", "transformer_engine"], "--transformer-impl transformer_engine needs a GPU"),
    (["--moe-grouped-gemm"], "--moe-grouped-gemm needs --transformer-impl transformer_engine"),
])
def test_te_only_flags_are_refused_without_te(argv, message, capsys):
    from pretrain.config.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", *argv], world_size=1)
    assert message in capsys.readouterr().err


# --- defect 6: FP8 with MoE pads each expert's tokens -----------------------------------------------
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8", None])
def test_fp8_pads_tokens_per_expert(recipe, monkeypatch):
    import megatron.core.transformer.transformer_config as tc

    from model.mcore_config import ModelOptions, to_transformer_config
    from model.presets import get_preset

    monkeypatch.setattr(tc, "is_te_min_version", lambda *a, **k: True)  # megatron asks TE's version for FP8
    config = to_transformer_config(get_preset("tiny"), ModelOptions(fp8_recipe=recipe))
    assert config.moe_router_padding_for_quantization is (recipe is not None)


# --- defect 7: TE's grouped experts are initialized like SequentialMLP's ------------------------------
class _Chunk(torch.nn.Module):
    """Parameters named like one MoE layer of a GPTModel, with TE grouped experts or SequentialMLP."""

    def __init__(self, grouped: bool, n_local: int):
        super().__init__()
        self.config = types.SimpleNamespace(num_moe_experts=4, init_method_std=0.02, num_layers=8,
                                            gated_linear_unit=True)
        layer = torch.nn.Module()
        layer.layer_number = 2
        experts = torch.nn.Module()
        if grouped:  # TEGroupedMLP: experts.linear_fc1.weight0..N-1
            for name, shape in (("linear_fc1", (64, 16)), ("linear_fc2", (16, 32))):
                linear = torch.nn.Module()
                for i in range(n_local):
                    linear.register_parameter(f"weight{i}", torch.nn.Parameter(torch.empty(shape)))
                setattr(experts, name, linear)
        else:  # SequentialMLP: experts.local_experts.i.linear_fc1.weight
            experts.local_experts = torch.nn.ModuleList()
            for _ in range(n_local):
                mlp = torch.nn.Module()
                mlp.linear_fc1 = torch.nn.Linear(16, 64, bias=False)
                mlp.linear_fc2 = torch.nn.Linear(32, 16, bias=False)
                experts.local_experts.append(mlp)
        layer.mlp = torch.nn.Module()
        layer.mlp.experts = experts
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([layer])


def _init_as(monkeypatch, chunk, ep_rank: int, ep_size: int) -> dict:
    from megatron.core import parallel_state as ps

    from model.initialization import _global_name, init_weights

    for fn, value in (("get_expert_model_parallel_world_size", ep_size), ("get_expert_model_parallel_rank", ep_rank),
                      ("get_expert_tensor_parallel_world_size", 1), ("get_expert_tensor_parallel_rank", 0),
                      ("get_tensor_model_parallel_world_size", 1), ("get_tensor_model_parallel_rank", 0)):
        monkeypatch.setattr(ps, fn, lambda v=value: v)
    init_weights([chunk], vocab_size=32, seed=7)
    return {_global_name(n, chunk): p.detach().clone() for n, p in chunk.named_parameters()}


def test_grouped_experts_init_like_sequential_experts(monkeypatch):
    """Expert e's weights are the same values whichever module holds them and whichever EP rank."""
    sequential = _init_as(monkeypatch, _Chunk(grouped=False, n_local=4), 0, 1)
    grouped = {**_init_as(monkeypatch, _Chunk(grouped=True, n_local=2), 0, 2),
               **_init_as(monkeypatch, _Chunk(grouped=True, n_local=2), 1, 2)}
    assert sorted(grouped) == sorted(sequential)
    for name, value in sequential.items():
        assert torch.equal(grouped[name], value), name
    # hybrid layer 2 (the MoE half of GLM layer 0), drawn under its GPTModel name (model/initialization.py)
    experts = [sequential[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in range(4)]
    assert not torch.equal(experts[0], experts[2])  # EP ranks hold different experts
    fc2 = torch.cat([v.flatten() for k, v in grouped.items() if k.endswith("linear_fc2.weight")])
    assert fc2.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.1)  # the output-layer std


# --- defect 5: checkpoints move between backends (TE's _extra_state) ----------------------------------
def _tiny_chunk():
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config
    from model.presets import get_preset

    cfg = get_preset("tiny")
    (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions()), use_te=False)
    return chunk


def _with_te_only_object(request: dict) -> dict:
    """A request as a TE model makes it: an extra-state object the local modules do not have
    (TE's norms carry FP8 metadata)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    request = dict(request)
    request["decoder.layers.0.input_layernorm._extra_state"] = ShardedObject(
        "decoder.layers.0.input_layernorm._extra_state", b"own fp8 meta", (1,), (0,), replica_id=0)
    return request


def test_checkpoint_loads_into_the_other_backend(single_process_group, tmp_path):  # noqa: F811
    from megatron.core import dist_checkpointing

    from pretrain.checkpoint import extra_state
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA

    chunk = _tiny_chunk()
    local = tmp_path / "local"
    local.mkdir()
    dist_checkpointing.save(chunk.sharded_state_dict(metadata=SHARDING_METADATA), str(local))

    # local (CPU, HF import) -> TE: the TE-only object is absent from the checkpoint
    te_request = _with_te_only_object(chunk.sharded_state_dict(metadata=SHARDING_METADATA))
    with pytest.raises(BaseException, match="Missing key"):  # torch's CheckpointException is a BaseException
        dist_checkpointing.load(te_request, str(local))  # what loading did before
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    stored = load_sharded_metadata(str(local))
    assert extra_state.absent_extra_state(te_request, stored) == ["decoder.layers.0.input_layernorm._extra_state"]
    loaded = extra_state.load(te_request, local)
    assert loaded["decoder.layers.0.input_layernorm._extra_state"] == b"own fp8 meta"  # the module's own
    assert torch.equal(loaded["output_layer.weight"], chunk.output_layer.weight)

    # TE -> local: the checkpoint's extra object is not asked for
    te = tmp_path / "te"
    te.mkdir()
    dist_checkpointing.save(_with_te_only_object(chunk.sharded_state_dict(metadata=SHARDING_METADATA)), str(te))
    loaded = extra_state.load(chunk.sharded_state_dict(metadata=SHARDING_METADATA), te)
    chunk.load_state_dict(loaded)


def test_mla_dsa_builds_with_linears_that_keep_an_empty_bias_as_te_does(single_process_group, monkeypatch):  # noqa: F811
    """TE's linears built without a bias keep an empty `bias` tensor where megatron's local ones keep None:
    a check on the module's attribute refused every TE build (found on an H200); the config decides."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from model import specs

    class EmptyBias(ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.bias is None:
                self.bias = torch.nn.Parameter(torch.empty(0))

    monkeypatch.setattr(specs.LocalBackend, "column_parallel_linear", lambda self: EmptyBias)
    chunk = _tiny_chunk()
    assert chunk.decoder.layers[0].self_attention.linear_kv_up_proj.bias.numel() == 0


# --- defect 12: the report says what runs -----------------------------------------------------------
def test_implementation_report_names_the_dsa_path(single_process_group):  # noqa: F811
    from pretrain.engine.implementations import core_attention, report

    chunk = _tiny_chunk()
    items = report([chunk])
    assert items["linear"] == "torch"  # megatron-core's local modules are torch code
    assert items["core attention"].startswith("DSA ") and "(torch)" in items["core attention"], items

    class Indexed(torch.nn.Module):  # a DSA core attention that cannot say which path it takes
        def __init__(self):
            super().__init__()
            self.core_attention = torch.nn.Module()
            self.core_attention.indexer = torch.nn.Linear(2, 2)

    assert core_attention([Indexed()]) == "torch (DSA)"


# --- on a GPU -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def te_bf16(tmp_path_factory, fp8_tiny_config):
    return run_logged(tmp_path_factory.mktemp("te_bf16"), "bf16", [*gpu_tiny_args(fp8_tiny_config), *TE])


@gpu_only
@pytest.mark.integration
def test_te_bf16_trains(te_bf16):
    stdout, scalars = te_bf16
    assert "linear: TE" in stdout, stdout[-2000:]  # the implementation report
    assert_loss_falls(scalars["lm loss"], "TE bf16")


@gpu_only
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
@pytest.mark.integration
def test_fp8_recipe_trains_like_bf16(recipe, te_bf16, tmp_path, fp8_tiny_config):
    _, scalars = run_logged(tmp_path, recipe, [*gpu_tiny_args(fp8_tiny_config), *TE, "--fp8-recipe", recipe])
    lm, ref = scalars["lm loss"], te_bf16[1]["lm loss"]
    assert_loss_falls(lm, recipe)
    assert lm[GPU_ITERS] == pytest.approx(ref[GPU_ITERS], rel=0.02), f"{recipe}: {lm[GPU_ITERS]} vs bf16 {ref[GPU_ITERS]}"


@gpu_only
@pytest.mark.integration
def test_grouped_gemm_starts_from_the_same_model_as_sequential_experts(te_reference, tmp_path):
    """Same initial weights (model/initialization.py names TE's weight0..N like local_experts.i), so the same
    step-1 loss and per-expert gradients."""
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, "--moe-grouped-gemm"])
    grad_check.assert_same_scalars("grouped gemm", te_reference[0], scalars, tags=("lm loss", "mtp loss"))
    grad_check.assert_same_gradients("grouped gemm", te_reference[1][0], ranks, tol=1e-3)


@gpu_only
@pytest.mark.integration
def test_moe_permute_fusion_matches_unfused(te_reference, tmp_path):
    """--moe-permute-fusion (TE's fused token permutation, megatron-core 0.19.2): same step, same gradients."""
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, "--moe-permute-fusion"])
    grad_check.assert_same_scalars("permute fusion", te_reference[0], scalars)
    grad_check.assert_same_gradients("permute fusion", te_reference[1][0], ranks, tol=1e-3)
