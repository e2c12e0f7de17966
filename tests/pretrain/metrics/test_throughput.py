"""The one definition of throughput and of this rank's peak memory (pretrain/metrics/throughput.py,
run_stats.py), pinned by numbers; tests/pretrain/metrics/test_observability.py reads what a run logs from them."""

from __future__ import annotations

import resource

import pytest
import torch

from pretrain.metrics.run_stats import memory_gb
from pretrain.metrics.throughput import step_throughput, tflops_per_gpu


def test_tflops_per_gpu_is_the_model_flops_over_the_time_and_the_ranks():
    # 2 GFLOP per token x 4096 tokens in 0.5 s: 16.384 TFLOP/s over 8 GPUs
    assert tflops_per_gpu(2e9, 4096, 0.5, 8) == pytest.approx(2.048, rel=1e-12)
    assert step_throughput(2e9, 4096, 0.5, 8) == {"throughput/tokens-per-sec": 8192.0,
                                                  "throughput/tflops-per-gpu": tflops_per_gpu(2e9, 4096, 0.5, 8)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU reading (CUDA's: tests/pretrain/test_gpu.py)")
def test_cpu_peak_memory_is_the_resident_sets_high_water_mark_in_gib():
    ((tag, gib),) = memory_gb().items()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    assert tag == "memory/max-rss-gb" and 0.01 < gib == pytest.approx(kib / 2**20, rel=1e-3)
