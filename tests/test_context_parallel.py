"""Context parallelism for MLA + DSA (model/modules/cp_attention.py), proven against one process.

Each layout trains the tiny GLM-5 (MTP on, DSA top-16 of 128 keys so selection is really sparse)
with real torchrun processes over gloo; the per-iteration `lm loss`, `mtp loss` and `grad-norm`
read back from TensorBoard must match the single-process run, and so must every weight's
gradient after the first step (dumped by this file run as a torchrun worker, see `_worker`),
which checks the gather/reduce-scatter bookkeeping far more tightly than the loss can.
`test_indexer_loss_gradients_under_cp_and_tp` does the same with the indexer's KL loss on. The
harness also serves one non-CP layout, interleaved PP x EP x DP, whose per-weight check the
loss-only tests of tests/test_parallel_equivalence.py lack.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.modules.cp_attention import (  # noqa: E402
    context_parallel_positions,
    split_for_context_parallel,
    to_global_order,
)
from pretrain.step import split_microbatches  # noqa: E402
from tests.helpers import child_env, free_port, read_scalars  # noqa: E402

ITERS = 2
TOL = 2e-3  # losses and grad norm, relative (the bar)
GRAD_TOL = 1e-4  # every gradient after step 1, relative to its norm (fp32 noise is ~1e-6 here)
COMMON = ["--preset", "tiny", "--mock-data", "--seq-length", "128", "--dsa-indexer-topk", "16",
          "--global-batch-size", "4", "--micro-batch-size", "1", "--seed", "1234", "--lr", "3e-3"]

LAYOUTS = {
    # TP alone first: its per-weight gradient check guards the shared-rope fix of model/modules/dsa.py
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "cp4": (4, ["--context-parallel-size", "4"]),
    "cp2xtp2": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    # Not CP: the same per-weight check for interleaved pipeline stages x experts x data parallel
    # (gradients keyed by global layer and expert names, every rank's copy checked).
    "pp2-vpp2xep2xdp2": (4, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                             "--expert-model-parallel-size", "2"]),
}
INDEXER_LOSS = ["--dsa-indexer-loss-coeff", "1.0"]


# --- the layout itself ------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_chunks_are_load_balanced_and_reassemble(cp):
    seq = 32
    x = torch.arange(seq)
    parts = [split_for_context_parallel(x.view(1, -1), cp, r, dim=1).view(-1) for r in range(cp)]
    for r, part in enumerate(parts):
        assert torch.equal(part, context_parallel_positions(seq, cp, r))
        # every rank holds one early and one late chunk: the same causal work (sum of positions)
        assert int(part.sum()) == int(x.sum()) // cp
    assert torch.equal(to_global_order(torch.cat(parts), cp), x)


def test_microbatches_split_after_the_label_shift():
    tokens = torch.arange(2 * 17).view(2, 17)  # two sequences of 16 inputs + 1
    full = split_microbatches(tokens, 1, cp_size=1, cp_rank=0)
    for r in range(2):
        local = split_microbatches(tokens, 1, cp_size=2, cp_rank=r)
        for mb_full, mb in zip(full, local):
            pos = context_parallel_positions(16, 2, r)
            assert torch.equal(mb["position_ids"][0], pos)
            for key in ("input_ids", "labels", "loss_mask"):
                assert torch.equal(mb[key][0], mb_full[key][0][pos]), key
            assert torch.equal(mb["labels"], mb["input_ids"] + 1)  # the next token, across chunk edges too


# --- equivalence with one process -------------------------------------------------------------
def train(out: Path, nproc: int, extra: list[str]) -> tuple[dict, list[dict]]:
    """Run this file as a torchrun worker; returns (TensorBoard scalars, per-rank step-1 grads)."""
    tb, dump = out / "tb", out / "grads"
    dump.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--dump-grads", str(dump), *COMMON, *extra, "--tensorboard-dir", str(tb)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    grads = [torch.load(dump / f"rank{r}.pt") for r in range(nproc)]
    return read_scalars(tb), grads


def assert_same_gradients(name: str, want: dict, ranks: list[dict], tp: int) -> None:
    """Ranks 0..tp-1 are the TP group of CP rank 0 (TP is the fastest-varying rank). Without TP,
    every rank's gradients are checked (pipeline stages and experts are spread over the ranks,
    replicas of a weight must all be right) and together they must cover the model."""
    scale = torch.stack([g.norm() for g in want.values()]).norm()
    if tp == 1:
        for r, grads in enumerate(ranks):
            for key, have in grads.items():
                err = (have - want[key]).norm() / max(want[key].norm(), 1e-6 * scale)
                assert err < GRAD_TOL, f"{name}: rank {r}: gradient of {key} off by {err:.2e} (relative)"
        covered = set().union(*ranks)
        assert covered == set(want), f"{name}: not covered: {sorted(set(want) - covered)[:5]}"
        return
    checked = 0
    for key, ref in want.items():
        shards = [r[key] for r in ranks[:tp]]
        if shards[0].shape == ref.shape:
            have = shards[0]
        else:  # a TP-sharded weight; each shard of a SwiGLU fc1 is [gate_i; up_i]
            dim = next(i for i in range(ref.dim()) if shards[0].shape[i] != ref.shape[i])
            if "linear_fc1" in key:
                halves = [s.chunk(2, dim) for s in shards]
                have = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
            else:
                have = torch.cat(shards, dim)
        err = (have - ref).norm() / max(ref.norm(), 1e-6 * scale)
        assert err < GRAD_TOL, f"{name}: gradient of {key} off by {err:.2e} (relative)"
        checked += 1
    assert checked == len(want) and checked > 50


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), 1, ["--train-iters", str(ITERS)])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    (want, want_grads), (got, got_grads) = reference, train(tmp_path, nproc, [*extra, "--train-iters", str(ITERS)])
    for tag in ("lm loss", "mtp loss", "grad-norm"):
        for it in range(1, ITERS + 1):
            assert got[tag][it] == pytest.approx(want[tag][it], rel=TOL), \
                f"{name}: {tag} at iteration {it}: {got[tag][it]} vs {want[tag][it]}"
    tp = 2 if "tp2" in name else 1  # "ep2": no TP
    assert_same_gradients(name, want_grads[0], got_grads, tp)


@pytest.mark.slow
def test_indexer_loss_gradients_under_cp_and_tp(tmp_path):
    """The KL loss trains the indexer through the gathered keys: its gradient is divided by TP
    (identical consumers) and summed over TP by finalize_model_grads (keys made on SP slices)."""
    _, want = train(tmp_path / "single", 1, [*INDEXER_LOSS, "--train-iters", "1"])
    _, got = train(tmp_path / "cp2xtp2", 4, [*LAYOUTS["cp2xtp2"][1], *INDEXER_LOSS, "--train-iters", "1"])
    indexer = {k: v for k, v in want[0].items() if ".indexer." in k}
    assert indexer and all(v.norm() > 0 for v in indexer.values())
    assert_same_gradients("cp2xtp2 + indexer loss", want[0], got, tp=2)


# --- torchrun worker: train like launch/pretrain.py, dump every rank's grads at step 1 -----------
def _worker(argv: list[str]) -> None:
    i = argv.index("--dump-grads")
    dump, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    from model.init import _global_name
    from parallel import runtime as rt
    from pretrain.arguments import parse_args
    from pretrain.trainer import Trainer

    def _unwrap(chunk):  # DDP (and Float16Module) -> the GPT model, whose names init_weights uses
        while not hasattr(chunk, "decoder"):
            chunk = chunk.module
        return chunk

    cfg = parse_args(argv, world_size=rt.world_size_from_env())
    runtime = rt.init_distributed(cfg.distributed_timeout_s)
    trainer = None
    try:
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, runtime)
        step, dumped = trainer.optimizer.step, []

        def step_and_dump():  # main grads are final here: reduced over DP x CP and TP, per-token scaled
            if not dumped:  # keyed by global layer / expert numbers (model/init.py), as one process names them
                grads = {_global_name(n, _unwrap(chunk)): p.main_grad.detach().clone() for chunk in trainer.model
                         for n, p in _unwrap(chunk).named_parameters() if getattr(p, "main_grad", None) is not None}
                torch.save(grads, dump / f"rank{runtime.rank}.pt")
                dumped.append(True)
            return step()

        trainer.optimizer.step = step_and_dump
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        rt.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1:])
