"""Per-weight gradient check: every rank's copy of every weight after step 1, against one process.

API (used by tests/parallel/test_parallel_equivalence.py and tests/parallel/test_context_parallel.py):

    scalars, ranks = train(out_dir, nproc, args)   # a real torchrun of launch/pretrain.py's Trainer
        scalars: TensorBoard scalars {tag: {iteration: value}}
        ranks:   one dump per rank: {"grads": {global name: fp32 gradient},
                                     "shards": {global name: (tp_rank, tp_size, dim, glu)},  (TP-sharded only)
                                     "updates": {global name: the first optimizer step's change of the weight}}
    assert_same_gradients(name, want, ranks)       # want: the dump of a 1-process run (ranks[0] of it)
    assert_same_scalars(name, want, got)           # TensorBoard scalars: TAGS at every logged iteration
    assert_same_updates(name, want, ranks)         # the first step's update of every weight (the optimizer)
    check_layout(name, nproc, extra, reference, out_dir)  # all of the above for one layout

Gradients are taken right before the first optimizer step, when they are final: reduced over
DP x CP (the distributed optimizer's reduce-scattered shards are all-gathered back for the dump),
over TP for sequence-parallel weights, per-token scaled. Names are global layer and expert numbers
(model/initialization.py), so a pipeline stage's or expert rank's weights are named as one process names them;
a TP shard is compared with the matching slice of the full gradient. Every rank is checked (replicas
too), and together the ranks must cover every weight of the model.

RUN is the flag set all layouts share (the single-process reference of tests/conftest.py uses it):
DSA top-16 of 128 keys (really sparse) and the indexer's KL loss on, so the indexer is trained
through every layout's gather/scatter bookkeeping; and an evaluation at the last step, so every layout's
forward-only schedule is checked too (`lm loss validation`, `mtp loss validation`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script, sys.path[0] is tests/, whose folders would shadow the packages they mirror
    sys.path[0] = str(ROOT)

from tests.helpers import child_env, free_port, launcher, read_scalars  # noqa: E402

RUN = ["--preset", "tiny", "--mock-data", "--seq-length", "128", "--dsa-indexer-topk", "16",
       "--dsa-indexer-loss-coeff", "1.0", "--global-batch-size", "4", "--micro-batch-size", "1",
       "--seed", "1234", "--lr", "3e-3", "--train-iters", "2", "--eval-interval", "2", "--eval-iters", "1"]
TOL = 2e-3  # losses and grad norm, relative (the bar)
TAGS = ("lm loss", "mtp loss", "dsa/indexer-loss", "grad-norm", "lm loss validation", "mtp loss validation")
GRAD_TOL = 1e-4  # every gradient after step 1, relative to its norm (fp32 noise is ~1e-6 here)


def train(out: Path, nproc: int, args: list[str], timeout: float = 900) -> tuple[dict, list[dict]]:
    """Run this file as a torchrun worker (tests/warm_torchrun.py; one process: in this one, which needs no
    launch); returns (TensorBoard scalars, per-rank step-1 gradient dumps)."""
    tb, dump = out / "tb", out / "grads"
    dump.mkdir(parents=True)
    if nproc == 1:
        from tests.inprocess import train_here

        scalars = train_here(args, prepare=lambda t: _dump_at_first_step(t, dump / "rank0.pt"))
        return scalars, [torch.load(dump / "rank0.pt")]
    cmd = [*launcher(), "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
           "--dump-grads", str(dump), *args, "--tensorboard-dir", str(tb)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return read_scalars(tb), [torch.load(dump / f"rank{r}.pt") for r in range(nproc)]


def assert_same_scalars(name: str, want: dict, got: dict, tags=TAGS, tol: float = TOL) -> None:
    for tag in tags:
        assert want.get(tag), f"the reference logged no {tag!r}"
        for it, value in want[tag].items():
            assert got[tag][it] == pytest.approx(value, rel=tol), \
                f"{name}: {tag} at iteration {it}: {got[tag][it]} vs {value}"


def _expected_shard(full: torch.Tensor, shard: tuple[int, int, int, bool]) -> torch.Tensor:
    tp_rank, tp_size, dim, glu = shard
    parts = full.chunk(2, dim) if glu else [full]  # a SwiGLU fc1 shard is [gate_r; up_r]
    return torch.cat([p.chunk(tp_size, dim)[tp_rank] for p in parts], dim)


def assert_same_gradients(name: str, want: dict, ranks: list[dict], tol: float = GRAD_TOL) -> None:
    """Every rank's gradient of every weight it holds equals the reference's (its TP slice), within
    `tol` relative to that weight's gradient norm; the ranks together hold every weight."""
    ref = want["grads"]
    scale = torch.stack([g.norm() for g in ref.values()]).norm()
    for r, dump in enumerate(ranks):
        for key, have in dump["grads"].items():
            expected = ref[key]
            if key in dump["shards"]:
                expected = _expected_shard(expected, dump["shards"][key])
            assert have.shape == expected.shape, f"{name}: rank {r}: {key} is {tuple(have.shape)}, " \
                                                 f"expected {tuple(expected.shape)}"
            err = float((have - expected).norm() / max(expected.norm(), 1e-6 * scale))
            assert err < tol, f"{name}: rank {r}: gradient of {key} off by {err:.2e} (relative)"
    covered = set().union(*(d["grads"] for d in ranks))
    assert covered == set(ref), f"{name}: not covered: {sorted(set(ref) - covered)[:5]}"
    assert len(ref) > 50


def check_layout(name: str, nproc: int, extra: list[str], reference: tuple[dict, dict], out: Path) -> None:
    """Train RUN + extra at nproc ranks; its scalars and every rank's gradients must equal `reference`
    (the (scalars, gradients) of the one-process run: tests/conftest.py's grad_reference)."""
    want, want_grads = reference
    got, got_grads = train(out, nproc, [*RUN, *extra])
    assert_same_scalars(name, want, got)
    assert_same_gradients(name, want_grads, got_grads)


# --- torchrun worker: train like launch/pretrain.py, dump every rank's grads at step 1 -----------
def _gather_distributed_optimizer_shards(model) -> None:
    """The distributed optimizer reduce-scatters: each rank's grad buffer is final only in its own
    shard. All-gather the shards so every main_grad is final (the optimizer reads only its shard)."""
    import torch.distributed as dist
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in model:
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            size = group.intra_distributed_optimizer_instance_size
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, size)
                mine = shards[group.intra_distributed_optimizer_instance_rank].clone()
                dist.all_gather(list(shards), mine, group=group.intra_distributed_optimizer_instance_group)


def _named_params(trainer):
    """(global name, parameter, TP shard or None) of every parameter with a gradient buffer."""
    from model.initialization import _global_name, _tp

    for chunk in trainer.model:
        while not hasattr(chunk, "decoder"):  # DDP (and Float16Module) -> the GPT model init_weights names
            chunk = chunk.module
        glu = chunk.config.gated_linear_unit
        for local, p in chunk.named_parameters():
            if getattr(p, "main_grad", None) is None:
                continue
            key = _global_name(local, chunk)
            tp_rank, tp_size = _tp(key)
            shard = None
            if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
                shard = (tp_rank, tp_size, getattr(p, "partition_dim", 0), glu and key.endswith("linear_fc1.weight"))
            yield key, p, shard


def _dump(trainer) -> dict:
    if trainer.model[0].ddp_config.use_distributed_optimizer:  # reduce-scattered (not Muon's layer-wise)
        _gather_distributed_optimizer_shards(trainer.model)
    grads, shards = {}, {}
    for key, p, shard in _named_params(trainer):
        grads[key] = p.main_grad.detach().float().clone()
        if shard is not None:
            shards[key] = shard
    return {"grads": grads, "shards": shards}


def _dump_at_first_step(trainer, path: Path) -> None:
    """Dump the gradients when the first optimizer step is about to run, and the step's update of every
    weight ("updates": after - before) once it has run."""
    step, dumped = trainer.optimizer.step, []

    def step_and_dump():
        if dumped:
            return step()
        dump = _dump(trainer)
        before = {key: p.detach().float().clone() for key, p, _ in _named_params(trainer)}
        result = step()
        dump["updates"] = {key: p.detach().float() - before[key] for key, p, _ in _named_params(trainer)}
        torch.save(dump, path)
        dumped.append(True)
        return result

    trainer.optimizer.step = step_and_dump


def assert_same_updates(name: str, want: dict, ranks: list[dict], tol: float = GRAD_TOL) -> None:
    """Every rank's first-step update of every weight equals the reference's (the optimizer, per weight)."""
    assert_same_gradients(name, {"grads": want["updates"]},
                          [{"grads": d["updates"], "shards": d["shards"]} for d in ranks], tol)


def _worker(argv: list[str]) -> None:
    i = argv.index("--dump-grads")
    dump, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    from parallel import runtime as rt
    from pretrain.config.arguments import parse_args
    from pretrain.trainer import Trainer

    cfg = parse_args(argv, world_size=rt.world_size_from_env())
    runtime = rt.init_distributed(cfg.distributed_timeout_s)
    trainer = None
    try:
        torch.manual_seed(cfg.seed)
        trainer = Trainer(cfg, runtime)
        _dump_at_first_step(trainer, dump / f"rank{runtime.rank}.pt")
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        rt.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1:])
