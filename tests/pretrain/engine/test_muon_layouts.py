"""`--optimizer muon` at every layout AdamW runs at, proven per weight against one process (tests/grad_check.py):
every rank's gradient of every weight before the first step, and its update by the first step (Muon's
orthogonalized, per-head split update for the matrices, Adam's for the rest), and the losses of the
step after it. Under TP the head-split up-projections need no gather (a head is whole on its rank); the other
TP-sharded matrices are orthogonalized whole with `--muon-tp-mode duplicated` (blockwise, the default,
orthogonalizes each shard: another update by design, not comparable with one process)."""

from __future__ import annotations

import pytest

from tests import grad_check

pytestmark = pytest.mark.integration  # every test here runs torchrun or trains end to end

# --adam-eps 1e-6: Adam's first update of an element is lr * g / (|g| + eps), so an element below eps carries its
# gradient's absolute fp32 noise into the update multiplied by lr / eps (a k_norm bias element at g = 3e-10 moved by
# 5e-12 under TP 2 -- 7e-6 of that gradient's norm -- moved the update by 1.2e-4 of its norm at eps 1e-8); 1e-6 keeps
# that amplification below the tolerance, so the update check measures the layout, not the noise.
MUON = ["--optimizer", "muon", "--muon-fp32-matmul-prec", "high", "--adam-eps", "1e-6"]
LAYOUTS = {
    "tp2-duplicated": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--muon-tp-mode", "duplicated"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "dp2": (2, []),
    # megatron-core's layer-wise distributed optimizer: each rank steps whole matrices, then all-gathers them
    # dense parameters over 4 data-parallel ranks, experts over their 2 expert-data-parallel ranks
    "ep2-distributed-optimizer": (4, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


@pytest.fixture(scope="module")
def muon_reference(tmp_path_factory) -> tuple[dict, dict]:
    scalars, (dump,) = grad_check.train(tmp_path_factory.mktemp("muon_reference"), 1, [*grad_check.RUN, *MUON])
    return scalars, dump


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, muon_reference, tmp_path):
    nproc, extra = LAYOUTS[name]
    want, want_dump = muon_reference
    got, got_dumps = grad_check.train(tmp_path, nproc, [*grad_check.RUN, *MUON, *extra])
    grad_check.assert_same_scalars(name, want, got)
    grad_check.assert_same_gradients(name, want_dump, got_dumps)
    grad_check.assert_same_updates(name, want_dump, got_dumps)
