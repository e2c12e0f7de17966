"""The O(S·k) DSA path (model/modules/dsa_blockwise.py, absorbed MLA form) equals today's dense
path (per-head keys and values, [b, heads, s, S] scores) in fp32: output, indexer KL loss and the
gradient of every input -- query heads, latent rows, the up-projection weight and the indexer's
queries, head weights and keys -- with causal positions and with a context-parallel rank's
positions, the loss in its dense warm-up and its sparse stage. Blocks are made small so that
the running top-k and the query blocks really split the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.modules import dsa_blockwise  # noqa: E402
from model.modules.cp_attention import context_parallel_positions  # noqa: E402
from model.modules.dsa import GLMSparseAttention, LatentAttentionInputs  # noqa: E402

DIMS = dict(kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=12)
HEADS, INDEX_HEADS, INDEX_DIM, TOPK, SEQ, BATCH = 3, 2, 16, 12, 48, 2


class OneRank:
    def size(self):
        return 1


def core_attention(sparse_loss: bool):
    """A GLMSparseAttention's state without megatron's construction (its methods only read these)."""
    cfg = SimpleNamespace(**DIMS, dsa_indexer_use_sparse_loss=sparse_loss)
    attn = SimpleNamespace(config=cfg, softmax_scale=(DIMS["qk_head_dim"] + DIMS["qk_pos_emb_head_dim"]) ** -0.5,
                           index_topk=TOPK)
    attn._split_weight = lambda inputs, heads: GLMSparseAttention._split_weight(attn, inputs, heads)
    return attn


def make_inputs(q_positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    sq = q_positions.numel()
    d = DIMS
    leaves = {
        "query": torch.randn(sq, BATCH, HEADS, d["qk_head_dim"] + d["qk_pos_emb_head_dim"], generator=g),
        "latent": torch.randn(SEQ, BATCH, d["kv_lora_rank"] + d["qk_pos_emb_head_dim"], generator=g),
        "kv_up_weight": torch.randn(HEADS * (d["qk_head_dim"] + d["v_head_dim"]), d["kv_lora_rank"], generator=g) * 0.3,
        # Positive head weights and mostly positive q.k: no exact ties of relu's zeros, whose
        # order top-k may break either way.
        "q_i": torch.randn(sq, BATCH, INDEX_HEADS, INDEX_DIM, generator=g) + 1,
        "w": torch.rand(sq, BATCH, INDEX_HEADS, generator=g) + 0.1,
        "k_i": torch.randn(SEQ, BATCH, INDEX_DIM, generator=g) + 1,
    }
    return {k: v.requires_grad_() for k, v in leaves.items()}


def run(path, leaves, q_positions, sparse_loss):
    attn = core_attention(sparse_loss)
    inputs = LatentAttentionInputs(q_positions=q_positions, index_keys=leaves["k_i"],
                                   kv_up_weight=leaves["kv_up_weight"])
    args = (leaves["query"], leaves["latent"], inputs, leaves["q_i"], leaves["w"], 1.0, OneRank())
    if path == "dense":
        out, loss = GLMSparseAttention._dense(attn, *args)
    else:
        out, loss = GLMSparseAttention._sparse(attn, *args, path)
    # the output's gradient through attention, the loss's through the indexer inputs only
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * probe).sum() + loss, list(leaves.values()), allow_unused=True)
    return out.detach(), loss.detach(), dict(zip(leaves, grads))


def assert_close(name, got, want, rel=1e-5):
    err = (got - want).norm() / want.norm().clamp_min(1e-30)
    assert err < rel, f"{name}: relative error {err:.2e}"


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(dsa_blockwise, "BLOCK_BUDGET", 2000)  # a few queries per block
    monkeypatch.setattr(dsa_blockwise, "KEY_CHUNK", 16)  # running top-k over 3 key chunks


@pytest.mark.parametrize("sparse_loss", [False, True], ids=["dense-loss", "sparse-loss"])
@pytest.mark.parametrize("layout", ["causal", "cp-rank1-of-2"])
def test_blockwise_equals_dense(layout, sparse_loss, small_blocks):
    q_positions = torch.arange(SEQ) if layout == "causal" else context_parallel_positions(SEQ, 2, 1)
    leaves = make_inputs(q_positions)
    want_out, want_loss, want_grads = run("dense", leaves, q_positions, sparse_loss)
    got_out, got_loss, got_grads = run("blockwise", leaves, q_positions, sparse_loss)
    assert_close("output", got_out, want_out)
    assert_close("indexer loss", got_loss, want_loss)
    for name, want in want_grads.items():
        assert want is not None and want.norm() > 0, name
        assert_close(f"grad of {name}", got_grads[name], want)


def test_topk_matches_full_sort_and_marks_missing_keys(small_blocks):
    g = torch.Generator().manual_seed(3)
    q, w, k = (torch.randn(1, SEQ, 2, 8, generator=g) + 1, torch.rand(1, SEQ, 2, generator=g) + 0.1,
               torch.randn(1, SEQ, 8, generator=g) + 1)
    pos = torch.arange(SEQ)
    got = dsa_blockwise.indexer_topk(q, w, k, pos, TOPK)
    full = dsa_blockwise.index_scores(q, w, k).masked_fill(pos.view(1, 1, -1) > pos.view(1, -1, 1), float("-inf"))
    vals, want = full.topk(TOPK, dim=-1)
    want = want.masked_fill(vals == float("-inf"), -1)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert (got[0, 0] >= 0).sum() == 1 and (got[0, TOPK:] >= 0).all()
