import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, child_env


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
    from pretrain.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--fp8-recipe", "blockwise"], world_size=1)
    assert "--fp8-recipe blockwise needs a GPU" in capsys.readouterr().err
