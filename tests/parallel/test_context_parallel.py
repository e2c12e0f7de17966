"""Context parallelism for MLA + DSA (model/modules/cp_attention.py), proven against one process.

Each layout trains the tiny GLM-5 (MTP on, DSA top-16 of 128 keys so selection is really sparse,
the indexer's KL loss on) with real torchrun processes over gloo, with tests/grad_check.py's
harness and the session's single-process reference (tests/conftest.py `grad_reference`, shared
with tests/parallel/test_parallel_equivalence.py, which holds the non-CP layouts): the per-iteration
losses and grad norm read back from TensorBoard must match, and so must every rank's gradient of
every weight after step 1, which checks the gather/reduce-scatter bookkeeping far more tightly
than the loss can. cp2xtp2 checks the indexer loss's gradient through the gathered keys under TP:
divided by TP (identical consumers) and summed over TP by finalize_model_grads (keys on SP slices).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.modules.cp_attention import (  # noqa: E402
    context_parallel_positions,
    split_for_context_parallel,
    to_global_order,
)
from pretrain.step import split_microbatches  # noqa: E402
from tests import grad_check  # noqa: E402

LAYOUTS = {
    "cp2": (2, ["--context-parallel-size", "2"]),
    "cp4": (4, ["--context-parallel-size", "4"]),
    "cp2xtp2": (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


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
@pytest.mark.integration
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, grad_reference, tmp_path):
    grad_check.check_layout(name, *LAYOUTS[name], grad_reference, tmp_path)


@pytest.mark.integration
def test_megatron_core_dsa_with_cp_matches_its_single_process(tmp_path):
    """--dsa-kernel-backend none (megatron-core's AbsorbedMLA + DSAttention, its all-gather CP): CP2 equals
    the same modules in one process, per weight. Against its own one-process run, not grad_reference
    (ours): at init the indexer's ReLU scores tie at exactly 0 and each path breaks ties its own way;
    ours and megatron-core's are held equal per weight on tie-free weights (tests/model/dsa/test_dsa_upstream.py)."""
    upstream = ["--dsa-kernel-backend", "none"]
    scalars, (grads,) = grad_check.train(tmp_path / "one", 1, [*grad_check.RUN, *upstream])
    grad_check.check_layout("cp2-upstream-none", 2, ["--context-parallel-size", "2", *upstream], (scalars, grads),
                            tmp_path / "cp2")
