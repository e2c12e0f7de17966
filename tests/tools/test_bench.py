import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import gpu_only
from tests.helpers import ROOT, child_env


@pytest.mark.integration
def test_bench_runs_on_cpu_and_prints_one_json_line():
    proc = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny", "--iters", "2", "--warmup", "1"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300, check=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("tokens_per_sec", "tflops_per_gpu", "mfu", "peak_memory_gb"):
        assert key in result
    assert result["tokens_per_sec"] > 0 and result["tflops_per_gpu"] > 0 and result["device"] == "cpu"


def test_fp8_without_a_gpu_is_refused_before_work(capsys):
    from pretrain.config.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--fp8-recipe", "blockwise"], world_size=1)
    assert "--fp8-recipe blockwise needs a GPU" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_dsa_runs_megatron_cores_path_beside_ours_in_one_run():
    proc = subprocess.run(
        [sys.executable, "tools/bench_dsa.py", "--seq-lengths", "256", "--topk", "32", "--heads", "2",
         "--index-heads", "2", "--paths", "none,blockwise,tilelang,triton", "--repeats", "0"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300, check=True)
    rows = {r["path"]: r for r in map(json.loads, (ln for ln in proc.stdout.splitlines() if ln.startswith("{")))}
    assert rows["none"]["implementation"] == "megatron-core" and rows["blockwise"]["implementation"] == "ours"
    for path in ("none", "blockwise"):
        assert rows[path]["peak_memory_gb"] > 0 and rows[path]["seconds"] > 0, rows[path]
    # GPU-only backends are reported, not fatal, so one command measures whatever runs on this machine
    if not torch.cuda.is_available():
        assert rows["tilelang"]["unavailable"] == "tilelang needs a CUDA device"
        assert rows["triton"]["unavailable"] == "triton needs a CUDA device"


@pytest.mark.integration
def test_bench_dsa_refuses_an_unknown_path_by_name():
    proc = subprocess.run([sys.executable, "tools/bench_dsa.py", "--paths", "none,flash"], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--paths: unknown path 'flash'" in proc.stderr


@gpu_only
@pytest.mark.parametrize("precision", [["--bf16"], ["--bf16", "--fp8-recipe", "blockwise"]], ids=["bf16", "fp8"])
@pytest.mark.integration
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
