"""GLM-5.3-Flash at parallel layouts, per weight against one process (tests/grad_check.py's harness: real
torchrun workers of the Trainer, every rank's gradient of every weight after step 1, the losses and grad norm):
EP 2 (the routed experts of its mHC-wrapped MoE layers split over two ranks, with DP 2 and the distributed
optimizer for the rest), PP 2 (the [s, b, hc_mult x hidden] streams sent between stages) and full recompute."""

from __future__ import annotations

import pytest

from tests import grad_check

RUN = ["--preset", "glm5.3-flash-tiny", "--mock-data", "--seq-length", "48", "--global-batch-size", "4",
       "--micro-batch-size", "1", "--seed", "1234", "--lr", "3e-3", "--train-iters", "2"]
TAGS = ("lm loss", "grad-norm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    scalars, (grads,) = grad_check.train(tmp_path_factory.mktemp("flash_reference"), 1, RUN)
    return scalars, grads


@pytest.mark.integration
@pytest.mark.parametrize("name, nproc, extra", [
    # DP 2 for the dense weights with the distributed optimizer, EP 2 for the routed experts
    ("ep2-distopt", 2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"]),
    # two stages cut at a GLM layer's end (the tiny model's 5 layers: 3 + 2); the mHC streams cross between them
    ("pp2", 2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "G-GEGE|DEGE"]),
    # full recompute of every hybrid layer (megatron-core's checkpointed_forward over FlashLayers), in this process
    ("recompute-full", 1, ["--recompute-granularity", "full"]),
])
def test_flash_layout_matches_single_process(name, nproc, extra, reference, tmp_path):
    want, want_grads = reference
    got, got_grads = grad_check.train(tmp_path, nproc, [*RUN, *extra])
    grad_check.assert_same_scalars(name, want, got, tags=TAGS)
    grad_check.assert_same_gradients(name, want_grads, got_grads)
    # Not the first Adam step's update per weight (assert_same_updates): some entries of an mHC map's gradient
    # cancel to ~1e-12 (Sinkhorn's doubly stochastic output ignores those directions), where Adam's g / sqrt(v)
    # turns fp32 summation-order noise into a full-size step (measured: ep2's layer-1 mHC weight, 2e-4 relative,
    # while every gradient agrees to 3e-6). The gradients are what the layout computes; the optimizer is
    # megatron-core's, checked per weight on GLM-5's layouts (tests/parallel/test_parallel_equivalence.py).
