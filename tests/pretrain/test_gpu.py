"""What only a GPU shows: Transformer Engine (bf16 and each FP8 recipe), the local backend on CUDA,
resume with TE's fused Adam and the distributed optimizer, checkpoints across backends (HF import ->
TE run), recompute and grouped GEMM with TE, export --verify with the model on CUDA, the benchmark.

All marked `gpu` and skipped without CUDA; `bash launch/gpu_check.sh` installs TE when missing and
runs them (one GPU, under 8 minutes). Each test is a real torchrun of launch/pretrain.py (or of the
tool), as users run them.
"""

import json
import subprocess
import sys

import pytest
import torch

from model.presets import get_preset
from tests import grad_check
from tests.helpers import ROOT, child_env, read_scalars, torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TE = ["--transformer-impl", "transformer_engine"]
# The tiny model with every FP8 GEMM dimension a multiple of 16 (TE's FP8 requirement): kv latent +
# rope, the indexer's heads and head dim.
FP8_TINY = get_preset("tiny").replace(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                      qk_rope_head_dim=16, index_n_heads=16, index_head_dim=32)
ITERS = 50


def _run(tmp_path, name: str, args: list[str]) -> tuple[str, dict]:
    tb = tmp_path / name / "tb"
    proc = torchrun(1, [*args, "--tensorboard-dir", str(tb)], timeout=300)
    return proc.stdout, read_scalars(tb)


@pytest.fixture(scope="module")
def fp8_tiny_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_tiny")
    FP8_TINY.save_hf_json(d / "config.json")
    return d / "config.json"


def _tiny_train(config) -> list[str]:
    return ["--model-config", str(config), "--mock-data", "--seq-length", "128", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--lr", "3e-3", "--lr-warmup-iters", "5", "--train-iters", str(ITERS),
            "--bf16", "--seed", "1234"]


@pytest.fixture(scope="module")
def te_bf16(tmp_path_factory, fp8_tiny_config):
    return _run(tmp_path_factory.mktemp("te_bf16"), "bf16", [*_tiny_train(fp8_tiny_config), *TE])


def _falls(lm: dict, name: str) -> None:
    assert all(torch.isfinite(torch.tensor(v)) for v in lm.values()), name
    assert lm[ITERS] < lm[1] - 0.5, f"{name}: {lm[1]} -> {lm[ITERS]}"


def test_te_bf16_trains(te_bf16):
    stdout, scalars = te_bf16
    assert "linear: TE" in stdout, stdout[-2000:]  # the implementation report
    _falls(scalars["lm loss"], "TE bf16")


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_recipe_trains_like_bf16(recipe, te_bf16, tmp_path, fp8_tiny_config):
    _, scalars = _run(tmp_path, recipe, [*_tiny_train(fp8_tiny_config), *TE, "--fp8-recipe", recipe])
    lm, ref = scalars["lm loss"], te_bf16[1]["lm loss"]
    _falls(lm, recipe)
    assert lm[ITERS] == pytest.approx(ref[ITERS], rel=0.02), f"{recipe}: {lm[ITERS]} vs bf16 {ref[ITERS]}"


def test_an_fp8_checkpoint_resumes_its_fp8_state_passing_the_allowlist(tmp_path, fp8_tiny_config):
    """TE's FP8 extra state is a pickled byte tensor; a load unpickles it first with megatron-core's allowlist
    (pretrain/checkpoint/extra_state.py) and refuses anything else: a real FP8 run's state must pass."""
    common = [*_tiny_train(fp8_tiny_config), *TE, "--fp8-recipe", "delayed", "--train-iters", "3"]  # last wins
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "first", [*common, "--save", str(ckpt), "--save-interval", "2", "--exit-interval", "2"])
    stdout, resumed = _run(tmp_path, "resumed", [*common, "--load", str(ckpt)])
    assert "loaded checkpoint" in stdout and sorted(resumed["lm loss"]) == [3]


def test_muon_with_the_layer_wise_distributed_optimizer_trains_in_bf16_with_te(tmp_path, fp8_tiny_config):
    """`--optimizer muon --use-distributed-optimizer` under bf16 and TE: megatron-core's layer-wise optimizer wraps
    its optimizers itself there (the CPU suite proves the fp32 path per weight)."""
    _, scalars = _run(tmp_path, "muon", [*_tiny_train(fp8_tiny_config), *TE, "--optimizer", "muon",
                                         "--use-distributed-optimizer"])
    _falls(scalars["lm loss"], "muon + distributed optimizer")


def test_resume_is_exact_with_te_fused_adam_and_the_distributed_optimizer(tmp_path):
    common = [*grad_check.RUN, *TE, "--bf16", "--use-distributed-optimizer", "--train-iters", "6"]  # last wins
    stdout, whole = _run(tmp_path, "whole", common)
    assert "TE FusedAdam" in stdout, stdout[-2000:]
    ckpt = tmp_path / "ckpt"
    _run(tmp_path, "first", [*common, "--save", str(ckpt), "--save-interval", "3", "--exit-interval", "3"])
    _, resumed = _run(tmp_path, "resumed", [*common, "--load", str(ckpt)])
    for it in range(4, 7):  # GPU atomics (MoE scatter-add) leave last-bit differences only
        assert resumed["lm loss"][it] == pytest.approx(whole["lm loss"][it], rel=1e-4), it


def _cli(*args) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_local_backend_export_verify_and_hf_import_into_a_te_run_and_back(tmp_path):
    """The local backend on CUDA -> export --verify (model on CUDA) -> import_hf (local backend) -> TE
    run from it -> its checkpoint resumed by the local backend: weights move across backends both ways."""
    run = ["--preset", "tiny", "--mock-data", "--global-batch-size", "4", "--seed", "1234"]
    local = tmp_path / "local"
    stdout, scalars = _run(tmp_path, "local", [*run, "--transformer-impl", "local", "--train-iters", "3",
                                               "--save", str(local)])
    assert "linear: torch" in stdout, stdout[-2000:]
    assert scalars["lm loss"][3] < scalars["lm loss"][1]
    hf = tmp_path / "hf"
    out = _cli("tools/export_hf.py", "--load", local, "--output", hf, "--dtype", "fp32", "--verify")
    assert "max_abs_logit_diff" in out, out
    imported = tmp_path / "imported"
    _cli("tools/import_hf.py", "--hf", hf, "--save", imported)
    from_hf = ["--model-config", str(hf / "config.json"), "--mock-data", "--global-batch-size", "4", "--seed", "1234"]
    te_ckpt = tmp_path / "te_ckpt"
    first = ["--train-iters", "2", "--exit-interval", "1", "--load", str(imported)]  # the schedule of "back"
    _, te = _run(tmp_path, "te", [*from_hf, *TE, *first, "--save", str(te_ckpt)])
    _, ref = _run(tmp_path, "ref", [*from_hf, "--transformer-impl", "local", *first])
    # the same weights give the same first loss on either backend (fp32; TE's GEMMs may use TF32)
    assert te["lm loss"][1] == pytest.approx(ref["lm loss"][1], rel=2e-3)
    _, back = _run(tmp_path, "back", [*from_hf, "--transformer-impl", "local", "--train-iters", "2",
                                      "--load", str(te_ckpt)])
    assert torch.isfinite(torch.tensor(back["lm loss"][2]))


@pytest.fixture(scope="module")
def te_reference(tmp_path_factory):
    return grad_check.train(tmp_path_factory.mktemp("te_ref"), 1, [*grad_check.RUN, *TE])


@pytest.mark.parametrize("variant", ["selective", "full-uniform"])
def test_recompute_with_te_matches_no_recompute(variant, te_reference, tmp_path):
    from tests.model.test_recompute import VARIANTS

    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, *VARIANTS[variant]])
    grad_check.assert_same_scalars(variant, te_reference[0], scalars)
    grad_check.assert_same_gradients(variant, te_reference[1][0], ranks, tol=1e-3)


def test_grouped_gemm_starts_from_the_same_model_as_sequential_experts(te_reference, tmp_path):
    """Same initial weights (model/initialization.py names TE's weight0..N like local_experts.i), so the same
    step-1 loss and per-expert gradients."""
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, "--moe-grouped-gemm"])
    grad_check.assert_same_scalars("grouped gemm", te_reference[0], scalars, tags=("lm loss", "mtp loss"))
    grad_check.assert_same_gradients("grouped gemm", te_reference[1][0], ranks, tol=1e-3)


def test_moe_permute_fusion_matches_unfused(te_reference, tmp_path):
    """--moe-permute-fusion (TE's fused token permutation, megatron-core 0.19.2): same step, same gradients."""
    scalars, ranks = grad_check.train(tmp_path, 1, [*grad_check.RUN, *TE, "--moe-permute-fusion"])
    grad_check.assert_same_scalars("permute fusion", te_reference[0], scalars)
    grad_check.assert_same_gradients("permute fusion", te_reference[1][0], ranks, tol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the flex dispatcher needs TP x EP > 1: two GPUs")
@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_flex_dispatcher_matches_one_process(backend, te_reference, tmp_path):
    """--moe-token-dispatcher-type flex (DeepEP / HybridEP, the deep_ep package) at EP 2, per weight."""
    pytest.importorskip("deep_ep")
    scalars, ranks = grad_check.train(tmp_path, 2, [*grad_check.RUN, *TE, "--expert-model-parallel-size", "2",
                                                    "--moe-token-dispatcher-type", "flex",
                                                    "--moe-flex-dispatcher-backend", backend])
    grad_check.assert_same_scalars(backend, te_reference[0], scalars)
    grad_check.assert_same_gradients(backend, te_reference[1][0], ranks, tol=1e-3)


def test_cuda_memory_tags_and_level_2_timers(tmp_path):
    """--log-memory-to-tensorboard on CUDA: Megatron-LM's mem-* tags from torch.cuda.memory_stats (not the
    CPU's resident-set tags), and level-2 timers with the device synchronised at each start and stop."""
    _, s = _run(tmp_path, "memory", ["--preset", "tiny", "--mock-data", "--train-iters", "3", "--global-batch-size",
                                     "4", "--log-memory-to-tensorboard", "--timing-log-level", "2",
                                     "--log-timers-to-tensorboard"])
    assert not [tag for tag in s if tag.startswith("mem-cpu")]
    for it in (1, 2, 3):
        allocated = s["mem-allocated-bytes"][it]
        assert 1e6 < allocated <= s["mem-max-allocated-bytes"][it] and allocated <= s["mem-reserved-bytes"][it]
        assert s["mem-allocated-count"][it] > 0
        assert s["mem-peak-max-over-ranks-bytes"][it] == s["mem-max-allocated-bytes"][it]
        assert 0 < s["forward-backward-time"][it] < s["iteration-time"][it]


def test_nsys_ranges_start_before_and_stop_after_the_profiled_iterations(monkeypatch):
    """--profile without --use-pytorch-profiler: cudaProfilerStart before iteration start+1 and cudaProfilerStop
    after iteration end (Megatron-LM's nsys range), with NVTX ranges between, on the chosen rank only."""
    from pretrain.metrics.config import ObservabilityConfig
    from pretrain.metrics.profiling import StepProfiler

    calls = []
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append(("start", done)))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append(("stop", done)))
    obs = ObservabilityConfig(profile=True, profile_step_start=2, profile_step_end=4, profile_ranks=(1,))
    chosen, other = StepProfiler(obs, 1, None), StepProfiler(obs, 0, None)
    for done in range(6):
        for profiler in (chosen, other):
            profiler.before_step(done)
        nvtx = chosen._nvtx is not None
        assert nvtx == (2 <= done < 4), done
        torch.ones(4, device="cuda").sum()  # an operator inside or outside the range
        done += 1
        for profiler in (chosen, other):
            profiler.after_step(done)
    assert calls == [("start", 2), ("stop", 4)]


@pytest.mark.parametrize("precision", [["--bf16"], ["--bf16", "--fp8-recipe", "blockwise"]], ids=["bf16", "fp8"])
def test_bench_glm5_proxy(precision):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "tools/bench.py",
         "--preset", "glm5-proxy", "--seq-length", "4096", "--global-batch-size", "2", "--iters", "3",
         "--warmup", "1", *precision], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert result["tokens_per_sec"] > 0
    out = ROOT / "runs" / "gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-glm5-proxy-{'fp8' if len(precision) > 1 else 'bf16'}.json").write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
