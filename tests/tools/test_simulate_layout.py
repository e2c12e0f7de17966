"""tools/simulate_layout.py: a 64-GPU layout built rank by rank on the meta device, in one process.

Each simulated rank must hold exactly the one-process model's parameters divided by the layout (its
pipeline stage's layers, its TP shard of each sharded tensor, its EP share of the experts), and
model/accounting.py must agree with the memory the wrapped model holds.
"""

import json
import re
import subprocess
import sys

import pytest

from model.presets import get_preset
from tests.fixtures_dist import single_process_group  # noqa: F401 (fixture)
from tests.helpers import ROOT

# GLM-5's structure (MLA + DSA, dense first layer, shared + 16 routed experts, MTP) at test size.
SMALL = get_preset("tiny").replace(n_routed_experts=16, num_hidden_layers=8)
TP, PP, EP, WORLD = 2, 4, 8, 64
RANKS = [0, 21, 42, 63]  # one per pipeline stage (megatron's order puts PP outermost: 16 ranks a stage)
# uneven stages from --hybrid-layer-pattern (each GLM layer 'D' + '-'/'E'), two of them cutting a GLM layer between
# its attention and its MoE: layers 0, 1's attention | 1's MoE, 2-3, 4's attention | 4's MoE, 5-6 | 7 + MTP
PATTERN = "D-D|EDEDED|EDEDE|DE/DE"
STAGES = [range(0, 3), range(3, 9), range(9, 14), range(14, 16)]  # each stage's hybrid layers (0-based)


def _simulate(config, ranks: list[int], *extra: str) -> list[dict]:
    flags = ["--world-size", str(WORLD), "--model-config", str(config), "--mock-data",
             "--tensor-model-parallel-size", str(TP), "--sequence-parallel", "--pipeline-model-parallel-size", str(PP),
             "--expert-model-parallel-size", str(EP), "--expert-tensor-parallel-size", "1",
             "--use-distributed-optimizer", "--bf16", "--global-batch-size", "32", "--ranks", ",".join(map(str, ranks)),
             *extra]
    proc = subprocess.run([sys.executable, "tools/simulate_layout.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    config = tmp_path_factory.mktemp("small") / "config.json"
    SMALL.save_hf_json(config)
    return config


@pytest.fixture(scope="module")
def simulated(small_config):
    return _simulate(small_config, RANKS, "--hybrid-layer-pattern", PATTERN)


def _expected_params(model, pp_stage: int) -> int:
    """The one-process model's parameters that `pp_stage` holds, each divided by its TP / EP split."""
    total = 0
    for name, p in model.named_parameters():
        layer = re.match(r"decoder\.layers\.(\d+)\.", name)
        if layer:
            # HybridModel's layers: two per GLM layer (model/layer_pattern.py)
            on_stage = int(layer.group(1)) in STAGES[pp_stage]
        elif name.startswith("embedding."):  # the first stage's input, and the MTP layer's on the last
            on_stage = pp_stage in (0, PP - 1)
        else:  # output head, final norm, MTP layer
            on_stage = pp_stage == PP - 1
        expert = re.search(r"\.experts\.local_experts\.(\d+)\.", name)
        if not on_stage or (expert and int(expert.group(1)) >= SMALL.n_routed_experts // EP):
            continue  # another stage's, or another EP rank's expert
        sharded = getattr(p, "tensor_model_parallel", False) and not expert  # experts: ETP 1
        total += p.numel() // (TP if sharded else 1)
    return total


@pytest.mark.integration
def test_each_rank_holds_the_one_process_model_divided_by_the_layout(simulated, single_process_group):
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config

    model = build_model(SMALL, to_transformer_config(SMALL, ModelOptions()), use_te=False)[0]
    assert [r["pp_stage"] for r in simulated] == [0, 1, 2, 3]
    for r in simulated:
        assert r["params"] == _expected_params(model, r["pp_stage"]), r
        assert r["params"] == r["params_estimate"], r  # the accounting counts the same, exactly


@pytest.mark.integration
def test_built_memory_agrees_with_the_accounting(simulated):
    for r in simulated:
        for key in ("weight_gb", "grad_gb", "optimizer_gb"):
            assert r[f"{key}_ratio"] == pytest.approx(1.0, abs=0.02), (key, r)
    # the distributed optimizer shards over DP: 12 bytes per parameter / DP (dense) or / expert-DP
    dense_dp, expert_dp = WORLD // (TP * PP), WORLD // (PP * EP)
    assert all(r["optimizer_gb"] < 12 * r["params"] / min(dense_dp, expert_dp) / 2**30 for r in simulated)


@pytest.mark.integration
def test_muon_state_of_a_data_parallel_group_sums_to_the_accounting(small_config):
    """--optimizer muon: megatron-core's layer-wise distributed optimizer gives each data-parallel rank whole
    parameters (at this size the embedding alone makes one rank's share 1.6x the mean), so the accounting's
    per-rank figure is the group's mean: the last stage's eight DP ranks (TP rank 0) hold exactly eight times it."""
    dp_group = [(PP - 1) * WORLD // PP + TP * i for i in range(WORLD // (TP * PP))]
    ranks = _simulate(small_config, dp_group, "--optimizer", "muon")
    assert len(ranks) == len(dp_group)
    built, estimate = sum(r["optimizer_gb"] for r in ranks), sum(r["optimizer_gb_estimate"] for r in ranks)
    assert built == pytest.approx(estimate, rel=1e-3)
    assert max(r["optimizer_gb_ratio"] for r in ranks) > 1.2  # whole parameters: not an even cut


def test_impossible_full_scale_layout_is_refused_before_any_work(capsys):
    from tools.simulate_layout import parse

    for flags, message in [
        (["--expert-model-parallel-size", "48"], "n_routed_experts 256 is not divisible by --expert-model-parallel-size 48"),
        (["--tensor-model-parallel-size", "3"], "num_attention_heads 64 is not divisible by --tensor-model-parallel-size 3"),
        (["--pipeline-model-parallel-size", "9"], "num_hidden_layers 78 is not divisible by --pipeline-model-parallel-size 9"),
        (["--num-layers-per-virtual-pipeline-stage", "0"], "--num-layers-per-virtual-pipeline-stage 0 must be >= 1"),
        (["--ranks", "576"], "--ranks 576: [576] outside the world of 576"),
    ]:
        with pytest.raises(SystemExit):
            parse(["--recipe", "launch/recipes/glm5-576xh100.args", *flags])
        assert message in capsys.readouterr().err
