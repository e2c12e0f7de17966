"""Timers, memory, norms, the profiler, Weights & Biases and the pictures (docs/OBSERVABILITY.md), each read
back from what it wrote: TensorBoard event files, the log lines, the trace file's events, the W&B offline
run's history, the PNG. The CUDA-only parts (CUDA memory, nsys ranges) are `gpu`-marked, at the end."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config.arguments import parse_args
from pretrain.metrics.heatmap import LOG2_RANGE, LUT
from pretrain.metrics.timing import TIMERS_TO_LOG
from tests import collective_devices
from tests.conftest import TINY_RUN, gpu_only
from tests.helpers import ROOT, child_env, one_rank_gloo_world, read_scalars, read_wandb_history, run_logged, torchrun
from tests.inprocess import trainer

ITERS = 4
RUN = [*TINY_RUN, "--train-iters", str(ITERS)]  # the last --train-iters wins
LOGGED = ["--timing-log-level", "2", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
          "--log-params-norm"]


def _train_in_process(argv: list[str]) -> tuple[str, dict]:
    """(stdout, {name: value measured on the model after training}) of an in-process run."""
    out, measured = io.StringIO(), {}
    with one_rank_gloo_world(), contextlib.redirect_stdout(out), trainer(argv) as t:
        t.train()
        params = [p for chunk in t.model for p in chunk.parameters()]
        measured["params-norm"] = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in params)))
        measured["num-zeros"] = float(sum(int((p.main_grad == 0).sum()) for p in params))
        measured["flops-per-token"] = t.flops_per_token
    return out.getvalue(), measured


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every flag at once, in-process: level-2 timers, memory, norms, throughput, a save, an evaluation,
    W&B offline, the torch profiler on iteration 2 and the expert-load picture at each log line."""
    d = tmp_path_factory.mktemp("observed")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(d / "wandb-config"),
           "WANDB_CACHE_DIR": str(d / "wandb-cache"), "WANDB_DATA_DIR": str(d / "wandb-data")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        stdout, measured = _train_in_process([
            *RUN, *LOGGED, "--log-interval", "2", "--tensorboard-dir", str(d / "tb"), "--log-num-zeros-in-grad",
            "--log-throughput", "--log-validation-ppl-to-tensorboard", "--eval-interval", "4", "--eval-iters", "1",
            "--save", str(d / "ck"), "--save-interval", "4", "--moe-load-heatmap-interval", "1",
            "--wandb-project", "glm5-test", "--wandb-exp-name", "observed", "--wandb-save-dir", str(d / "wandb"),
            "--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "2"])
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"dir": d, "stdout": stdout, "measured": measured, "scalars": read_scalars(d / "tb")}


def _timer_block(stdout: str, iteration: int) -> dict[str, tuple[float, float]]:
    """The (min, max) ms of each timer in the block under `iteration`'s log line."""
    block = stdout.split(f" iteration {iteration:8d}/", 1)[1].split("(min, max) time across ranks (ms):", 1)[1]
    found = {}
    for line in block.splitlines()[1:]:
        m = re.match(r"\s+(\S+) \.+: \(([\d.]+), ([\d.]+)\)$", line)
        if not m:
            break
        found[m[1]] = (float(m[2]), float(m[3]))
    return found


def test_every_timer_megatron_core_starts_is_logged():
    import megatron.core

    pattern = re.compile(r"timers\(\s*['\"]([\w-]+)['\"]")
    names = {n for f in Path(megatron.core.__file__).parent.rglob("*.py") for n in pattern.findall(f.read_text())}
    assert len(names) > 15 and names <= set(TIMERS_TO_LOG), sorted(names - set(TIMERS_TO_LOG))


@pytest.mark.integration
def test_level_2_timers_are_plausible_in_tensorboard_and_the_log(full):
    s = full["scalars"]
    for name in ("forward-backward", "forward-compute", "backward-compute", "batch-generator", "all-grads-sync",
                 "optimizer", "optimizer-inner-step"):
        assert sorted(s[f"{name}-time"]) == [2, 4], name  # at each log line, seconds per iteration
        for it, high in s[f"{name}-time"].items():
            assert 0 < s[f"{name}-time-min"][it] <= high, name  # one rank: min == max
    for it in (2, 4):
        fb = s["forward-backward-time"][it]
        assert fb < s["iteration-time"][it]
        assert s["forward-compute-time"][it] + s["backward-compute-time"][it] <= fb
        assert s["optimizer-inner-step-time"][it] <= s["optimizer-time"][it] < s["iteration-time"][it]
        assert s["all-grads-sync-time"][it] < fb
        block = _timer_block(full["stdout"], it)  # the same numbers in the log, in ms
        assert block["forward-backward"][1] == pytest.approx(1000 * fb, abs=0.01)
        assert block["optimizer"][1] == pytest.approx(1000 * s["optimizer-time"][it], abs=0.01)
    assert list(s["save-checkpoint-time"]) == [4] and s["save-checkpoint-time"][4] > 0
    assert re.search(r"save-checkpoint \.+: \([\d.]+, [\d.]+\)", full["stdout"])
    assert "elapsed time per iteration (ms):" in full["stdout"]


@pytest.mark.integration
def test_cpu_memory_is_the_resident_set_under_its_own_tags(full):
    s = full["scalars"]
    assert not [tag for tag in s if tag.startswith(("mem-allocated", "mem-reserved", "mem-max-allocated"))]
    now_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for it in range(1, ITERS + 1):
        rss, peak = s["mem-cpu-rss-bytes"][it], s["mem-cpu-max-rss-bytes"][it]
        assert 100e6 < rss <= peak * (1 + 1e-6) and peak <= now_max * (1 + 1e-6)
        # one rank: its peak is the highest and the lowest over ranks
        assert s["mem-peak-max-over-ranks-bytes"][it] == s["mem-peak-min-over-ranks-bytes"][it] == peak
        assert s["mem-peak-argmax-rank"][it] == 0
        # the always-logged peak (GiB) is the kernel's high-water mark alone, read just before: at most this
        assert 100e6 < s["memory/max-rss-gb"][it] * 2**30 <= peak * (1 + 1e-6)


@pytest.mark.integration
def test_params_norm_and_zeros_in_grad_are_the_models(full):
    s, measured = full["scalars"], full["measured"]
    assert sorted(s["params-norm"]) == list(range(1, ITERS + 1))
    assert s["params-norm"][ITERS] == pytest.approx(measured["params-norm"], rel=1e-6)
    assert s["params-norm"][1] != s["params-norm"][ITERS]  # the weights moved
    assert s["num-zeros"][ITERS] == measured["num-zeros"] > 0  # unused vocabulary rows, at least
    last = [ln for ln in full["stdout"].splitlines() if ln.startswith(f" iteration {ITERS:8d}/")][0]
    assert f"params norm: {s['params-norm'][ITERS]:.3f}" in last and "num zeros:" in last


@pytest.mark.integration
def test_throughput_and_validation_ppl(full):
    s = full["scalars"]
    tokens = 8 * 64  # global batch x sequence
    for it in (2, 4):  # TFLOP/s per GPU over the log interval, from its mean iteration time
        expected = full["measured"]["flops-per-token"] * tokens / s["iteration-time"][it] / 1e12
        assert s["throughput"][it] == pytest.approx(expected, rel=1e-5)
    assert "throughput per GPU (TFLOP/s/GPU):" in full["stdout"]
    for it in range(1, ITERS + 1):  # each iteration's, by the same definition
        per_gpu = full["measured"]["flops-per-token"] * s["throughput/tokens-per-sec"][it] / 1e12
        assert s["throughput/tflops-per-gpu"][it] == pytest.approx(per_gpu, rel=1e-5)
    assert s["lm loss validation ppl"][4] == pytest.approx(math.exp(s["lm loss validation"][4]), rel=1e-5)


@pytest.mark.integration
def test_wandb_offline_run_holds_the_tensorboard_scalars(full):
    history, tb = read_wandb_history(full["dir"] / "wandb"), full["scalars"]
    assert set(history) == set(tb)  # the same tags, from the same rank
    for tag in ("lm loss", "grad-norm", "forward-backward-time", "lm loss validation"):
        assert {it: np.float32(v) for it, v in history[tag].items()} == tb[tag], tag
    assert sorted(history["lm loss"]) == list(range(1, ITERS + 1))


@pytest.mark.integration
def test_pytorch_profiler_trace_holds_the_profiled_iteration(full):
    (trace,) = (full["dir"] / "tb" / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
    assert [e["name"] for e in steps] == ["ProfilerStep#2"]  # --profile-step-start 1 --profile-step-end 2
    start, end = steps[0]["ts"], steps[0]["ts"] + steps[0]["dur"]
    ops = [e for e in events if e.get("name", "").startswith("aten::") and start <= e.get("ts", -1) <= end]
    assert len(ops) > 1000 and {"aten::mm", "aten::add_"} & {e["name"] for e in ops}


@pytest.mark.integration
def test_expert_load_heatmap_matches_the_load_imbalance(full):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full["dir"] / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("moe/expert-load")
    assert [i.step for i in images] == [2, 4]  # every log line (--moe-load-heatmap-interval 1)
    layers, experts, cell = 5, 8, 64  # 4 decoder layers + MTP, 8 experts, cells of 512 // 8 pixels
    for img in images:
        pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB")).astype(int)
        assert pixels.shape == (layers * cell, experts * cell, 3)
        centres = pixels[cell // 2::cell, cell // 2::cell]  # one pixel per (layer, expert)
        assert (centres[0] == 0).all()  # the dense first layer: black
        index = np.abs(centres[1:, :, None, :] - LUT[None, None].astype(int)).sum(-1).argmin(-1)
        load = 2.0 ** (index / 255 * 2 * LOG2_RANGE - LOG2_RANGE)
        for layer in range(1, layers):
            imbalance = full["scalars"][f"moe/load-imbalance/layer-{layer:02d}"][img.step]
            assert load[layer - 1].max() == pytest.approx(imbalance, rel=0.02), (img.step, layer)


@pytest.fixture(scope="module")
def level_0(tmp_path_factory):
    """A run at the default level 0 with the timers to TensorBoard, every real timer start recorded."""
    from megatron.core import timers

    tb = tmp_path_factory.mktemp("level0") / "tb"
    started, original = [], timers.Timer.start

    def start(self, barrier=False):
        started.append(self.name)
        return original(self, barrier)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timers.Timer, "start", start)
        stdout, _ = _train_in_process([*RUN, "--train-iters", "3", "--tensorboard-dir", str(tb),
                                       "--log-timers-to-tensorboard", "--eval-interval", "3", "--eval-iters", "1"])
    return tb, stdout, started


@pytest.mark.integration
def test_level_0_runs_no_timer_in_a_step(level_0):
    tb, stdout, started = level_0
    assert started == []  # megatron's DummyTimer everywhere: no device sync, barrier or gather per step
    s = read_scalars(tb)
    assert sorted(s["iteration-time"]) == [1, 2, 3]
    assert [t for t in s if t.endswith("-time")] == ["iteration-time"]
    assert "time across ranks" not in stdout
    assert "lm loss validation" in s and "lm loss validation ppl" not in s  # ppl only with its flag
    assert "lm loss PPL:" in stdout


@pytest.mark.integration
def test_plot_run_overlays_two_runs(full, level_0, tmp_path):
    from PIL import Image

    png = tmp_path / "runs.png"
    subprocess.run([sys.executable, "tools/plot_run.py", str(full["dir"] / "tb"), str(level_0[0]),
                    "--labels", "full", "level-0", "--output", str(png)],
                   cwd=ROOT, env=child_env(), check=True, capture_output=True, timeout=120)
    image = Image.open(png)
    assert image.size == (1500, 800)
    colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours  # matplotlib's first two line colours: both runs drawn


def test_plot_run_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    from tools import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        plot_run.main([str(tmp_path), "--output", str(tmp_path / "x.png")])
    assert "pip install -e .[plot]" in capsys.readouterr().err


@pytest.mark.integration
def test_two_ranks_report_min_max_over_ranks_and_one_params_norm(full, tmp_path):
    proc = torchrun(2, [*RUN, "--train-iters", "3", *LOGGED, "--timing-log-option", "all",
                        "--expert-model-parallel-size", "2", "--tensorboard-dir", str(tmp_path)],
                    env=collective_devices.env())
    output = proc.stdout + proc.stderr
    assert collective_devices.violations(output) == []  # every gather on the runtime's device
    s = read_scalars(tmp_path)
    for it in (1, 2, 3):
        assert s["forward-backward-time-min"][it] <= s["forward-backward-time"][it] < s["iteration-time"][it]
        assert s["mem-peak-min-over-ranks-bytes"][it] <= s["mem-peak-max-over-ranks-bytes"][it]
        assert s["mem-peak-argmax-rank"][it] in (0.0, 1.0)
    for it in (1, 2):  # in the LR warm-up both runs train alike (later the decay differs)
        # the experts split over two ranks, the dense weights replicated: each counted once
        assert s["params-norm"][it] == pytest.approx(full["scalars"]["params-norm"][it], rel=1e-4)
    block = proc.stdout.split(f" iteration {3:8d}/", 1)[1]
    assert "times across ranks (ms):" in block and "rank  0:" in block and "rank  1:" in block


@pytest.mark.parametrize("flags, error", [
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "3",
      "--profile-step-end", "3"], "--profile-step-end 3 must be above --profile-step-start 3"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "-1"],
     "--profile-step-start -1 must be >= 0"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb"],
     "--profile-step-end 12 is beyond --train-iters 4"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "0",
      "--profile-step-end", "2", "--profile-ranks", "0", "3"], "--profile-ranks 3: this run has ranks 0..0"),
    (["--profile", "--profile-step-start", "0", "--profile-step-end", "2"], "add --use-pytorch-profiler"),
    (["--profile", "--use-pytorch-profiler", "--profile-step-start", "0", "--profile-step-end", "2"],
     "--use-pytorch-profiler writes its trace under --tensorboard-dir"),
    (["--profile-step-start", "1"], "--profile-step-start needs --profile"),
    (["--use-pytorch-profiler"], "--use-pytorch-profiler needs --profile"),
    (["--wandb-project", "p"], "--wandb-save-dir DIR (or --save DIR"),
    (["--wandb-exp-name", "e"], "--wandb-exp-name needs --wandb-project"),
    (["--moe-load-heatmap-interval", "2"], "--moe-load-heatmap-interval draws into TensorBoard"),
    (["--moe-load-heatmap-interval", "-1", "--tensorboard-dir", "tb"], "--moe-load-heatmap-interval -1 must be >= 0"),
    (["--log-memory-to-tensorboard"], "--log-memory-to-tensorboard writes to TensorBoard"),
    (["--log-num-zeros-in-grad", "--dp-engine", "deepspeed"], "--log-num-zeros-in-grad counts in megatron-core"),
    (["--timing-log-level", "3"], "--timing-log-level: invalid choice"),
])
def test_bad_flags_are_refused_by_name(flags, error, capsys):
    if "--dp-engine" in flags:
        pytest.importorskip("deepspeed")
    if "add --use-pytorch-profiler" in error and torch.cuda.is_available():
        pytest.skip("nsys ranges are allowed with CUDA")
    with pytest.raises(SystemExit):
        parse_args([*RUN, *flags], world_size=1)
    assert error in capsys.readouterr().err


def test_timers_and_their_barrier_option_reach_megatron_core():
    from types import SimpleNamespace

    from pretrain.engine.optimizer import optimizer_config
    from pretrain.metrics.timing import Timing

    cfg = parse_args([*RUN, "--timing-log-level", "1", "--no-barrier-with-level-1-timing", "--log-num-zeros-in-grad"])
    obs = cfg.observability
    timing = Timing(obs.timing_log_level, obs.timing_log_option, obs.barrier_with_l1_time, False)
    tconfig = SimpleNamespace(timers=None, barrier_with_L1_time=True)
    timing.attach(tconfig)
    assert tconfig.timers is timing.timers and tconfig.barrier_with_L1_time is False
    optimizer = optimizer_config(cfg, timing.timers)
    assert optimizer.timers is timing.timers and optimizer.barrier_with_L1_time is False
    assert optimizer.log_num_zeros_in_grad
    with timing.paused(tconfig):  # evaluation: megatron's schedule runs without them
        assert tconfig.timers is None
    assert tconfig.timers is timing.timers


def test_wandb_not_installed_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(SystemExit):
        parse_args([*RUN, "--wandb-project", "p", "--wandb-save-dir", "w"], world_size=1)
    assert "pip install -e .[wandb]" in capsys.readouterr().err


# --- on a GPU -------------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.integration
def test_cuda_memory_tags_and_level_2_timers(tmp_path):
    """--log-memory-to-tensorboard on CUDA: Megatron-LM's mem-* tags from torch.cuda.memory_stats (not the
    CPU's resident-set tags), and level-2 timers with the device synchronised at each start and stop."""
    _, s = run_logged(tmp_path, "memory", ["--preset", "tiny", "--mock-data", "--train-iters", "3",
                                           "--global-batch-size", "4", "--log-memory-to-tensorboard",
                                           "--timing-log-level", "2", "--log-timers-to-tensorboard"])
    assert not [tag for tag in s if tag.startswith("mem-cpu")]
    for it in (1, 2, 3):
        allocated = s["mem-allocated-bytes"][it]
        assert 1e6 < allocated <= s["mem-max-allocated-bytes"][it] and allocated <= s["mem-reserved-bytes"][it]
        assert s["mem-allocated-count"][it] > 0
        assert s["mem-peak-max-over-ranks-bytes"][it] == s["mem-max-allocated-bytes"][it]
        assert 0 < s["forward-backward-time"][it] < s["iteration-time"][it]


@gpu_only
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
