"""Parallelism proven by numerical equivalence with a single-process run.

Each layout trains the tiny GLM-5 (every feature on) with real torchrun processes over gloo, from
the same layout-invariant initial weights and the same global batches; the per-iteration
`lm loss`, `mtp loss` and `grad-norm` read back from TensorBoard must match the single-process run.
Adding a layout is one entry in LAYOUTS.
"""

import pytest

from tests.conftest import TINY_RUN
from tests.helpers import read_scalars, torchrun

ITERS = 3
TOL = 2e-3
# The first iterations of the session's reference run (same LR schedule: decay over its 8 iterations)
COMMON = [*TINY_RUN, "--train-iters", str(ITERS), "--lr-decay-iters", "8"]

LAYOUTS = {
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2-1f1b": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp2-vpp2": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "dp2-distopt": (2, ["--use-distributed-optimizer"]),
    "tp2xpp2": (4, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]),
    "ep2xdp2": (4, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}



def train(tmp_path, nproc, extra):
    tb = tmp_path / "tb"
    torchrun(nproc, [*COMMON, *extra, "--tensorboard-dir", str(tb)], timeout=900)
    return read_scalars(tb)


@pytest.fixture(scope="module")
def reference(tiny_reference):
    return tiny_reference


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    got = train(tmp_path, nproc, extra)
    for tag in ("lm loss", "mtp loss", "grad-norm"):
        for it in range(1, ITERS + 1):
            want, have = reference[tag][it], got[tag][it]
            assert have == pytest.approx(want, rel=TOL), f"{name}: {tag} at iteration {it}: {have} vs {want}"
