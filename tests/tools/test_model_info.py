import json
import subprocess
import sys

import pytest
import torch

from model.accounting import count_parameters, flops_per_token, mean_keys_per_query
from model.presets import get_preset
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.helpers import ROOT


@pytest.mark.integration
def test_model_info_tool_prints_glm5_figures():
    out = subprocess.run([sys.executable, "tools/model_info.py", "--preset", "glm5"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    for key in ("params_total", "params_total_with_mtp", "params_active", "flops_per_token", "weights_bytes_bf16"):
        assert key in info
    assert info["params_total"] == pytest.approx(743.9e9, rel=3e-3)
    assert info["params_total_with_mtp"] == pytest.approx(753.9e9, rel=3e-3)
    assert 40e9 <= info["params_active"] <= 42e9
    assert info["weights_bytes_bf16"] == 2 * info["params_total_with_mtp"]


@pytest.mark.integration
def test_model_info_refuses_unknown_preset():
    proc = subprocess.run([sys.executable, "tools/model_info.py", "--preset", "glm6"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "glm6" in proc.stderr


def test_dsa_caps_keys_per_query():
    assert mean_keys_per_query(4096, None) == pytest.approx(2048.5)
    assert mean_keys_per_query(4096, 2048) < mean_keys_per_query(4096, None)
    assert mean_keys_per_query(100, 1000) == mean_keys_per_query(100, None)
    c = get_preset("glm5")
    assert flops_per_token(c, 131072) < flops_per_token(c, 131072, sparse=False)


@pytest.mark.parametrize("preset", ["tiny", "tiny-shared"])
def test_count_matches_the_built_tiny_model(single_process_group, preset):
    """The formula must count exactly what megatron-core builds (expert bias is a buffer); IndexShare's
    shared layers build no indexer."""
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config

    cfg = get_preset(preset)
    chunk = build_model(cfg, to_transformer_config(cfg, ModelOptions()), use_te=False)[0]
    built = sum(p.numel() for p in chunk.parameters())
    built += sum(b.numel() for n, b in chunk.named_buffers() if n.endswith("expert_bias"))
    assert built == count_parameters(cfg)["params_total_with_mtp"]


@pytest.mark.integration
def test_recipe_file_gives_memory_per_gpu_and_total_tokens():
    out = subprocess.run([sys.executable, "tools/model_info.py", "--recipe", "launch/recipes/glm5-576xh100.args"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["world_size"] == 576 and info["layout"]["dp"] == 48
    assert info["total_tokens"] == pytest.approx(28.5e12, rel=0.01)
    assert info["ramp_tokens"] == pytest.approx(469e9, rel=0.01)
    assert 20 < info["memory_gb_total_estimate"] < 80  # fits an H100 by the estimate


def test_memory_per_gpu_under_each_data_parallel_engine():
    from model.accounting import memory_per_gpu

    def mem(**engine):
        return memory_per_gpu(get_preset("glm5-proxy"), tp=1, pp=1, ep=8, etp=1, dp=8, seq_length=4096,
                              micro_batch_size=1, **engine)

    plain, distopt = mem(distributed_optimizer=False), mem(distributed_optimizer=True)
    zero1, zero2 = mem(distributed_optimizer=False, zero_stage=1), mem(distributed_optimizer=False, zero_stage=2)
    offload = mem(distributed_optimizer=False, zero_stage=2, offload_optimizer=True)
    # optimizer state: partitioned by the distributed optimizer and by ZeRO alike (8x less for dense)
    assert zero1["optimizer_gb"] == distopt["optimizer_gb"] < plain["optimizer_gb"] / 4
    # grads: megatron's full fp32 buffer > ZeRO-1's bf16 grads + fp32 partition > ZeRO-2's partition
    assert distopt["grads_gb"] > zero1["grads_gb"] > zero2["grads_gb"] and zero2["grads_gb"] < distopt["grads_gb"] / 4
    assert offload["optimizer_gb"] == 0 and offload["host_optimizer_gb"] == zero2["optimizer_gb"]


def test_muon_keeps_one_moment_for_matrices_and_adams_two_for_the_rest():
    """--optimizer muon: 8 bytes of state (fp32 main + momentum) per parameter Muon steps, 12 (Adam's two
    moments) for the embeddings, head, norms, routers and indexer head weights it leaves to Adam."""
    from model.accounting import local_parameters, memory_per_gpu

    c = get_preset("glm5")
    kw = dict(tp=1, pp=1, ep=1, etp=1, dp=1, seq_length=512, micro_batch_size=1, distributed_optimizer=False)
    adam, muon = memory_per_gpu(c, optimizer="adam", **kw), memory_per_gpu(c, optimizer="muon", **kw)
    local = local_parameters(c, tp=1, pp=1, ep=1, etp=1, pp_rank=0)
    total = local["dense"] + local["experts"]
    assert 0 < local["adam_side"] < total / 50
    gib = 1024 ** 3
    assert adam["optimizer_gb"] == pytest.approx(12 * total / gib)
    assert muon["optimizer_gb"] == pytest.approx((8 * (total - local["adam_side"]) + 12 * local["adam_side"]) / gib)
    assert {k: v for k, v in muon.items() if k != "optimizer_gb" and not k.startswith("memory")} == \
        {k: v for k, v in adam.items() if k != "optimizer_gb" and not k.startswith("memory")}


def test_recipe_memory_per_pipeline_stage():
    """Stages differ (embedding on the first; head, MTP and its embedding copy on the last): the
    recipe reports each and leads with the largest. tools/simulate_layout.py checks them against
    the built model (tests/tools/test_simulate_layout.py)."""
    from tools.model_info import recipe_info

    info = recipe_info("launch/recipes/glm5-bridge-416xh100.args", None)
    stages = info["stages"]
    assert info["layout"] == {"tp": 1, "pp": 13, "cp": 1, "dp": 32, "ep": 32, "etp": 1} and len(stages) == 13
    assert info["memory_gb_total_estimate"] == max(s["memory_gb_total_estimate"] for s in stages)
    middle = stages[6]
    assert stages[0]["params_per_gpu"] > middle["params_per_gpu"] < stages[-1]["params_per_gpu"]
    # the stages partition the whole model (at TP 1: experts x EP), plus the MTP layer's embedding copy
    from model.accounting import local_parameters

    c, whole = get_preset("glm5"), count_parameters(get_preset("glm5"))
    parts = [local_parameters(c, tp=1, pp=13, ep=32, etp=1, pp_rank=r, vpp=2) for r in range(13)]
    assert sum(p["dense"] + 32 * p["experts"] + p["expert_bias"] for p in parts) == \
        whole["params_total_with_mtp"] + whole["params_embedding"]


def test_stage_layers_follow_the_pipeline_layout():
    """--pipeline-model-parallel-layout decides each chunk's layers in the memory plan: an even layout gives
    megatron's even split, an uneven one (with an empty virtual chunk) its own."""
    from model.accounting import stage_layers
    from model.presets import get_preset

    tiny = get_preset("tiny")
    for rank in range(2):
        assert stage_layers(tiny, 2, rank, 2, "Et|t|t|tmL") == stage_layers(tiny, 2, rank, 2)
    assert stage_layers(tiny, 2, 0, 2, "Ett|t||tmL") == [[0, 1], []]
    assert stage_layers(tiny, 2, 1, 2, "Ett|t||tmL") == [[2], [3]]


def test_a_stage_holds_half_a_glm_layer_in_the_memory_plan():
    """--hybrid-layer-pattern may cut a GLM layer between its attention and its MoE: each stage counts the half
    it holds (parameters, activations), and the stages of a cut pattern hold what those of a whole one do."""
    from model.accounting import memory_per_gpu, stage_halves

    tiny = get_preset("tiny")
    cut, whole = "D-DEDED|E/DE", "D-DEDE|DE/DE"
    assert stage_halves(tiny, 2, 0, None, cut) == [([0, 1, 2, 3], [0, 1, 2])]
    assert stage_halves(tiny, 2, 1, None, cut) == [([], [3])]
    kw = dict(tp=2, pp=2, ep=2, etp=1, dp=1, seq_length=128, micro_batch_size=1, distributed_optimizer=False)
    for g in (None, "full"):
        plans = {p: [memory_per_gpu(tiny, pp_rank=r, layout=p, recompute_granularity=g, **kw) for r in range(2)]
                 for p in (cut, whole)}
        for key in ("params_per_gpu", "activation_gb_per_microbatch"):
            assert sum(m[key] for m in plans[cut]) == pytest.approx(sum(m[key] for m in plans[whole]), rel=1e-12), key
            assert plans[cut][1][key] < plans[whole][1][key], key  # layer 3's attention moved to the first stage


def test_recipe_memory_follows_a_hybrid_layer_pattern_that_cuts_a_glm_layer():
    """tools/model_info.py plans a recipe's --hybrid-layer-pattern: moving the last stage's first attention half
    to the stage before it (the '|' one place on, into GLM layer 65) moves its weights and activations there."""
    from model import layer_pattern
    from tools.model_info import recipe_info

    c, recipe = get_preset("glm5"), "launch/recipes/glm5-576xh100.args"  # PP 6, three shared MTP depths
    even = layer_pattern.derive(c, 3, [list(range(13 * s, 13 * s + 13)) for s in range(6)])
    i = even.rindex("|")
    cut = even[:i] + even[i + 1] + "|" + even[i + 2:]
    plans = {p: recipe_info(recipe, None, ["--hybrid-layer-pattern", p])["stages"] for p in (even, cut)}
    default = recipe_info(recipe, None)["stages"]  # the recipe's even split over PP 6
    assert [s["params_per_gpu"] for s in plans[even]] == [s["params_per_gpu"] for s in default]
    for key in ("params_per_gpu", "activation_gb_per_microbatch"):
        assert plans[cut][4][key] > plans[even][4][key] and plans[cut][5][key] < plans[even][5][key], key
        assert plans[cut][:4] == plans[even][:4]


def test_shared_mtp_depths_add_activations_on_the_last_stage_only():
    """--mtp-num-layers 3 --mtp-use-repeated-layer: the one MTP layer runs three times on the last stage (three
    depths' activations and logits), its parameters, gradients and optimizer state stay one layer's."""
    from model.accounting import memory_per_gpu

    c = get_preset("glm5")
    kw = dict(tp=2, pp=6, ep=32, etp=1, dp=48, seq_length=4096, micro_batch_size=1, distributed_optimizer=True,
              full_recompute=True, num_microbatches=320)
    for stage in (0, 5):
        one, three = (memory_per_gpu(c, pp_rank=stage, mtp_depths=d, **kw) for d in (1, 3))
        for key in ("weights_gb", "grads_gb", "optimizer_gb"):
            assert one[key] == three[key], key
        grew = three["activations_gb_estimate"] - one["activations_gb_estimate"]
        assert (grew > 2 * 4 * 4096 * c.vocab_size / 2 / 2**30) if stage == 5 else grew == 0


def test_shared_layers_count_no_indexer_parameters_or_flops():
    """GLM-5.2's IndexShare: only the full layers (and the MTP layer) hold an indexer and score keys."""
    from model.accounting import attention_params, indexer_layers

    full, shared = get_preset("glm5"), get_preset("glm5.2")
    n_shared = shared.num_hidden_layers - indexer_layers(shared)
    assert 0 < n_shared < shared.num_hidden_layers and indexer_layers(full) == full.num_hidden_layers
    indexer = attention_params(full) - attention_params(full, with_indexer=False)
    assert indexer == full.q_lora_rank * 32 * 128 + full.hidden_size * (128 + 32) + 2 * 128
    saved = count_parameters(full)["params_total_with_mtp"] - count_parameters(shared)["params_total_with_mtp"]
    assert saved == n_shared * indexer
    assert count_parameters(shared)["params_total"] == pytest.approx(743.38e9, rel=1e-5)
    scores = 3 * 2 * 32 * 128 * mean_keys_per_query(4096, None)  # fwd+bwd of one layer's indexer scores
    gemms = 3 * 2 * indexer
    assert flops_per_token(full, 4096) - flops_per_token(shared, 4096) == pytest.approx(n_shared * (scores + gemms))
