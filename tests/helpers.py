"""Shared test helpers: real torchrun launches and TensorBoard read-back."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_gloo_world():
    """A one-rank gloo world in this process (the CPU runtime active), torn down on exit."""
    import torch.distributed as dist

    from parallel.compat import megatron_cpu

    megatron_cpu.activate()
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():  # later child processes must not inherit this world's port
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def child_env() -> dict:
    # not this test process's own rendezvous (an in-process gloo world may hold that port)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def launcher(warm: bool = True) -> list[str]:
    """The torchrun command: `python -m torch.distributed.run`, or tests/warm_torchrun.py (the same launcher with
    the workers forked from a process that has imported the trainer: seconds of imports less per rank).
    GLM5_TESTS_REAL_TORCHRUN=1 makes every launch the real command."""
    if warm and not os.environ.get("GLM5_TESTS_REAL_TORCHRUN"):
        return [sys.executable, str(ROOT / "tests" / "warm_torchrun.py")]
    return [sys.executable, "-m", "torch.distributed.run"]


def torchrun(nproc: int, args: list[str], timeout: float = 600, check: bool = True,
             env: dict | None = None, script: str | None = None, warm: bool = True) -> subprocess.CompletedProcess:
    """A torchrun of launch/pretrain.py (or `script`). `warm=False` for a test of the launch itself (signals, a
    rank's death, start-up errors): the real `python -m torch.distributed.run` and an interpreter per rank."""
    env = {**child_env(), **(env or {})}
    cmd = [*launcher(warm), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), script or str(ROOT / "launch" / "pretrain.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_scalars(logdir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the event files under `logdir`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def megatron_lm_ramp(consumed: int, start: int, increment: int, ramp_samples: int, global_batch_size: int) -> int:
    """Megatron-LM's --rampup-batch-size rule, written out (megatron-core <= 0.16's
    RampupBatchsizeNumMicroBatchesCalculator.update): the reference the step schedule must reproduce."""
    if consumed > ramp_samples:
        return global_batch_size
    per_increment = ramp_samples / ((global_batch_size - start) // increment)
    return start + int(consumed / per_increment) * increment


def read_wandb_history(save_dir: str | Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of the one W&B offline run under `save_dir` (its `wandb/offline-run-*/run-*.wandb`):
    the run file is a LevelDB-style log (32 KiB blocks, 7-byte record headers) after a 7-byte W&B header,
    each record one `wandb_internal_pb2.Record`; history records hold the logged values as JSON."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(save_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    history: dict[str, dict[int, float]] = {}
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind == 2 else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history


# --- GPU runs (tests marked `gpu`, which launch/gpu_check.sh runs) -------------------------------------
TE = ["--transformer-impl", "transformer_engine"]
GPU_ITERS = 50  # the tiny GPU runs' length: long enough for a clear fall of the loss


def fp8_tiny():
    """The tiny model with every FP8 GEMM dimension a multiple of 16 (TE's FP8 requirement): kv latent +
    rope, the indexer's heads and head dim."""
    from model.presets import get_preset

    return get_preset("tiny").replace(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                                      qk_rope_head_dim=16, index_n_heads=16, index_head_dim=32)


def gpu_tiny_args(config) -> list[str]:
    """A bf16 run of the model of `config` (an HF config.json) for GPU_ITERS iterations."""
    return ["--model-config", str(config), "--mock-data", "--seq-length", "128", "--global-batch-size", "8",
            "--micro-batch-size", "2", "--lr", "3e-3", "--lr-warmup-iters", "5", "--train-iters", str(GPU_ITERS),
            "--bf16", "--seed", "1234"]


def run_logged(tmp_path, name: str, args: list[str]) -> tuple[str, dict]:
    """(stdout, TensorBoard scalars) of a one-process torchrun of launch/pretrain.py."""
    tb = Path(tmp_path) / name / "tb"
    proc = torchrun(1, [*args, "--tensorboard-dir", str(tb)], timeout=300)
    return proc.stdout, read_scalars(tb)


def assert_loss_falls(lm: dict, name: str) -> None:
    import math

    assert all(math.isfinite(v) for v in lm.values()), name
    assert lm[GPU_ITERS] < lm[1] - 0.5, f"{name}: {lm[1]} -> {lm[GPU_ITERS]}"


def run_tool(*args) -> str:
    """stdout of `python ARGS...` (a tool) run from the repository root; it must succeed."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
