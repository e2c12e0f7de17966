"""Packed documents with DSA (--reset-attention-mask, --reset-position-ids; model/modules/documents.py).

- the layout follows Megatron-LM's rule (an EOD ends its document, the next token starts one), CP-split;
- the core attention on a packed sequence equals each document run on its own -- output, indexer loss
  and every input's gradient -- on the torch blockwise path, megatron-core's dense reference and a
  context-parallel rank's queries, and no top-k index leaves its query's document; the same check run
  with the document mask broken fails (so it can);
- the Triton indexer kernel masks by document as the torch path (TRITON_INTERPRET=1);
- the packed model's logits equal transformers' logits of each document run on its own
  (a transformers-made tiny model, imported with tools/import_hf.py);
- per weight against one process at CP 2 and TP 2 + SP, with documents crossing CP chunks;
- the combinations not supported are refused naming their flags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.modules import dsa_blockwise  # noqa: E402
from model.modules.cp_attention import context_parallel_positions, split_for_context_parallel  # noqa: E402
from model.modules.documents import document_layout  # noqa: E402
from model.modules.dsa import GLMSparseAttention, LatentAttentionInputs  # noqa: E402
from pretrain.step import DocumentOptions, split_microbatches  # noqa: E402
from tests.model.dsa.test_dsa_blockwise import SEQ, OneRank, core_attention, make_inputs  # noqa: E402

EOD = 0
DOCS = [[20, 12, 16], [7, 41]]  # per sequence of the batch: document lengths (EOD included), SEQ = 48 each


def packed_tokens(lengths_per_row, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            row += torch.randint(1, 500, (n - 1,), generator=g).tolist() + [EOD]
        rows.append(row)
    return torch.tensor(rows)


# --- the layout ---------------------------------------------------------------------------------
def test_layout_follows_megatron_lms_rule_and_splits_for_cp():
    tokens = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9]])
    starts, positions = document_layout(tokens, EOD, True, True)
    assert starts.tolist() == [[0, 0, 0, 3, 3, 5, 6, 6]]  # the EOD belongs to the document it ends
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    starts, positions = document_layout(tokens, EOD, False, True)
    assert starts.tolist() == [[0] * 8] and positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    starts, positions = document_layout(tokens, EOD, True, False)
    assert positions.tolist() == [list(range(8))]
    # made over the whole sequence before the CP split: each rank holds its chunks' starts (global rows)
    seq = torch.cat([tokens, tokens[:, :1]], dim=1)  # + the last label
    for r in range(2):
        (mb,) = split_microbatches(seq, 1, cp_size=2, cp_rank=r, documents=DocumentOptions(EOD, True, True))
        rows = context_parallel_positions(8, 2, r)
        assert mb["document_starts"][0].tolist() == [[0, 0, 0, 3, 3, 5, 6, 6][i] for i in rows]
        assert mb["position_ids"][0].tolist() == [[0, 1, 2, 0, 1, 0, 0, 1][i] for i in rows]
    (mb,) = split_microbatches(seq, 1, cp_size=1, cp_rank=0)
    assert "document_starts" not in mb


def test_the_trainer_hands_the_documents_to_the_model():
    """forward_step passes [starts; positions] as megatron's attention_mask (None without the flags)."""
    from pretrain.step import make_forward_step

    seen = []

    def model(input_ids, position_ids, attention_mask, labels, loss_mask):
        seen.append(attention_mask)
        return torch.zeros(labels.shape)

    tokens = torch.cat([packed_tokens([[5, 4]]), torch.tensor([[1]])], dim=1)
    for documents in (DocumentOptions(EOD, True, True), None):
        batches = split_microbatches(tokens, 1, cp_size=1, cp_rank=0, documents=documents)
        make_forward_step(torch.device("cpu"))(iter(batches), model)
    assert seen[0].tolist() == [[[0, 0, 0, 0, 0, 5, 5, 5, 5]], [[0, 1, 2, 3, 4, 0, 1, 2, 3]]]
    assert seen[1] is None


# --- the core attention: packed == each document on its own --------------------------------------
def _core(path, attn, leaves, q_positions, starts, sparse_loss):
    inputs = LatentAttentionInputs(q_positions=q_positions, index_keys=leaves["k_i"],
                                   kv_up_weight=leaves["kv_up_weight"], q_doc_starts=starts)
    args = (leaves["query"], leaves["latent"], inputs, leaves["q_i"], leaves["w"], 1.0, OneRank())
    if path == "dense":
        return GLMSparseAttention._dense(attn, *args)
    return GLMSparseAttention._sparse(attn, *args, path)


def _grads(out, loss, leaves, probe):
    return torch.autograd.grad((out * probe).sum() + loss, list(leaves.values()), allow_unused=True)


def check_documents_are_isolated(path: str, layout: str, sparse_loss: bool) -> None:
    """Packed run vs each document alone: output rows, loss (a token sum) and every input's gradient."""
    attn = core_attention(sparse_loss)
    cp = layout == "cp-rank1-of-2"
    q_positions = context_parallel_positions(SEQ, 2, 1) if cp else torch.arange(SEQ)
    leaves = make_inputs(q_positions)
    starts_full = document_layout(packed_tokens(DOCS), EOD, True, True)[0]
    starts = starts_full[:, q_positions]
    out, loss = _core(path, attn, leaves, q_positions, starts, sparse_loss)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    n_queries = out.shape[0] * out.shape[1]  # the loss is a mean over the batch's queries: compare sums
    got = dict(zip(leaves, _grads(out, loss * n_queries, leaves, probe)))
    # the sparse attention reads only the top-k: it must never name a key outside the query's document
    b, sq = starts.shape
    topk = dsa_blockwise.indexer_topk(leaves["q_i"].detach().transpose(0, 1), leaves["w"].detach().transpose(0, 1),
                                      leaves["k_i"].detach().transpose(0, 1), q_positions, attn.index_topk,
                                      q_start=starts)
    chosen = topk >= 0
    assert (topk[chosen] >= starts.unsqueeze(-1).expand_as(topk)[chosen]).all(), "top-k crossed a document start"
    assert (topk[chosen] <= q_positions.view(1, -1, 1).expand_as(topk)[chosen]).all()

    want = {k: torch.zeros_like(v) for k, v in leaves.items()}
    want_out, want_loss = torch.zeros_like(out), 0.0
    for row, lengths in enumerate(DOCS):
        first = 0
        for n in lengths:
            keys = slice(first, first + n)
            mine = ((q_positions >= first) & (q_positions < first + n)).nonzero().view(-1)  # this rank's queries
            first += n
            if not mine.numel():
                continue
            alone = {k: (v[mine, row:row + 1] if k in ("query", "q_i", "w") else
                         v[keys, row:row + 1] if k in ("latent", "k_i") else v).detach().clone().requires_grad_()
                     for k, v in leaves.items()}
            o, l_ = _core(path, attn, alone, q_positions[mine] - keys.start, None, sparse_loss)
            want_out[mine, row:row + 1] = o.detach()
            g = _grads(o, l_ * mine.numel(), alone, probe[mine, row:row + 1])
            want_loss += float(l_) * mine.numel()
            for (k, v), gk in zip(alone.items(), g):
                if k in ("query", "q_i", "w"):
                    want[k][mine, row:row + 1] += gk
                elif k in ("latent", "k_i"):
                    want[k][keys, row:row + 1] += gk
                else:
                    want[k] += gk
    assert torch.allclose(out, want_out, atol=1e-5), f"{path}: output differs from the documents run alone"
    assert float(loss) * n_queries == pytest.approx(want_loss, rel=1e-5)
    for k, w in want.items():
        err = float((got[k] - w).norm() / w.norm())
        assert err < 1e-5, f"{path}: gradient of {k} differs from the documents run alone by {err:.1e}"


@pytest.mark.parametrize("sparse_loss", [False, True], ids=["dense-loss", "sparse-loss"])
@pytest.mark.parametrize("layout", ["causal", "cp-rank1-of-2"])
@pytest.mark.parametrize("path", ["blockwise", "dense"])
def test_each_document_attends_as_if_alone(path, layout, sparse_loss, monkeypatch):
    monkeypatch.setattr(dsa_blockwise, "BLOCK_BUDGET", 2000)  # several query blocks
    monkeypatch.setattr(dsa_blockwise, "KEY_CHUNK", 16)  # and key chunks per block
    check_documents_are_isolated(path, layout, sparse_loss)


def test_a_broken_document_mask_is_caught(monkeypatch):
    """The check above fails when the top-k ignores document starts (attention then crosses documents)."""
    hidden = dsa_blockwise._hidden_keys
    monkeypatch.setattr(dsa_blockwise, "_hidden_keys", lambda pos, k0, n, starts: hidden(pos, k0, n, None))
    with pytest.raises(AssertionError, match="crossed a document start"):
        check_documents_are_isolated("blockwise", "causal", sparse_loss=True)


# --- the Triton indexer kernel --------------------------------------------------------------------
def interpreted_indexer_documents() -> None:
    from model.kernels.indexer import indexer_scores
    from tests.model.dsa.test_dsa_kernels import indexer_inputs

    dsa_blockwise.KEY_CHUNK = 24
    seq, rows = 48, context_parallel_positions(48, 2, 0)
    q, w, k = indexer_inputs(2, seq, 2, 16)
    q, w = q[:, rows], w[:, rows]
    starts = document_layout(packed_tokens(DOCS), EOD, True, True)[0][:, rows]
    tile = indexer_scores(q, w, k[:, 8:40], rows, 8, starts)
    want = dsa_blockwise._causal_fill(dsa_blockwise.index_scores(q, w, k[:, 8:40]), rows, 8, starts)
    assert torch.equal(tile.isinf(), want.isinf()) and want.isinf().any()
    assert torch.allclose(tile.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-5, atol=1e-5)
    got = dsa_blockwise.indexer_topk(q, w, k, rows, 6, scores_fn=indexer_scores, q_start=starts)
    assert torch.equal(got, dsa_blockwise.indexer_topk(q, w, k, rows, 6, q_start=starts))


@pytest.mark.integration
def test_indexer_kernel_masks_documents_interpreted():
    """Score tiles of a CP rank's queries in two sequences of different documents, and the top-k on them."""
    pytest.importorskip("triton")
    # Triton reads TRITON_INTERPRET when imported: a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "interpreted_indexer_documents"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --- against transformers: the packed sequence's logits are each document's, run on its own ----------
HF_DOCS = [40, 9, 30, 14, 35]  # 128 tokens
HF_TOPK = 48  # more than any document has, less than the packed sequence: only the document mask keeps
# the top-k from picking other documents' keys (ties of a random model's indexer scores, exact zeros of
# its ReLU, are broken differently by top-k over rows of different lengths: with every key of a document
# selected there is nothing to break; sparse selection inside a document is held to transformers by
# tests/tools/test_export_hf.py and to the documents run alone, tie-free, above)


def hf_packed_case(work: str) -> None:
    """A transformers-made tiny GLM-5 (random init), imported by tools/import_hf.py; our model runs the
    packed sequence with per-document attention and positions, transformers each document alone."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from model.presets import get_preset
    from tools.lib.hf_verify import build_our_model

    work = Path(work)
    # transformers builds no MTP layer
    cfg = get_preset("tiny").replace(num_nextn_predict_layers=0, index_topk=HF_TOPK)
    (work / "cfg").mkdir()
    (work / "cfg" / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "cfg"), dtype=torch.float32).eval()
    hf.save_pretrained(work / "hf")
    subprocess.run([sys.executable, str(ROOT / "tools" / "import_hf.py"), "--hf", str(work / "hf"), "--save",
                    str(work / "ck")], cwd=ROOT, check=True, capture_output=True)
    ours, _ = build_our_model(str(work / "ck"), None)
    tokens = packed_tokens([HF_DOCS], seed=3)
    mask = document_layout(tokens, EOD, True, True)
    with torch.no_grad():
        want = torch.cat([hf(input_ids=doc).logits for doc in tokens.split(HF_DOCS, dim=1)], dim=1)
        for path in (None, "dense"):  # ours (blockwise) and megatron-core's torch functions
            for m in ours.modules():
                if hasattr(m, "dsa_path"):
                    m.dsa_path = path
            calls = []
            hook = ours.output_layer.register_forward_hook(lambda mod, a, out: calls.append(out[0].clone()))
            ours(input_ids=tokens, position_ids=mask[1], attention_mask=mask, labels=tokens)
            hook.remove()
            got = calls[-1].transpose(0, 1)[..., :cfg.vocab_size]
            diff = float((got - want).abs().max())
            assert diff < 1e-4, f"dsa_path {path}: max |logit difference| {diff:.2e}"
            # and without the document mask the later documents' logits differ: the check can fail
            calls.clear()
            hook = ours.output_layer.register_forward_hook(lambda mod, a, out: calls.append(out[0].clone()))
            ours(input_ids=tokens, position_ids=mask[1], attention_mask=None, labels=tokens)
            hook.remove()
            assert float((calls[-1].transpose(0, 1)[..., :cfg.vocab_size] - want).abs().max()) > 1e-2
    print("max |logit difference|", diff)


@pytest.mark.integration
def test_packed_logits_equal_transformers_per_document(tmp_path):
    proc = subprocess.run([sys.executable, __file__, "hf_packed_case", str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


# --- per weight against one process, documents crossing CP chunks ----------------------------------
PACKED_LAYOUTS = {
    "cp2": (2, ["--context-parallel-size", "2"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """grad_check.RUN on short documents (5-40 tokens: several per 128-token sequence, crossing CP
    chunks), with per-document attention and positions; its one-process (scalars, gradients)."""
    from tests import grad_check

    d = tmp_path_factory.mktemp("packed")
    run = packed_run_args(d)
    scalars, (grads,) = grad_check.train(d / "one", 1, run)
    return run, (scalars, grads)


def packed_run_args(d: Path) -> list[str]:
    """grad_check.RUN on short documents written to `d` (5-40 tokens: several per 128-token sequence,
    crossing CP chunks), with per-document attention and positions, EOD's label masked."""
    import numpy as np

    from data.writer import ShardWriter
    from tests import grad_check

    rng = np.random.default_rng(0)
    with ShardWriter(str(d / "docs"), tokenizer={"name": "synthetic", "sha256": "0" * 64, "vocab_size": 512},
                     eod_id=EOD, dtype="uint32", shard_size=16 << 10, chunk_tokens=1024) as writer:
        for _ in range(400):
            writer.add_document(np.append(rng.integers(1, 512, size=int(rng.integers(4, 40))), EOD))
    manifest = str(d / "docs" / "manifest.json")
    run = [a for a in grad_check.RUN if a != "--mock-data"]
    return run + ["--data-path", manifest, "--valid-data-path", manifest, "--eod-mask-loss",
                  "--reset-attention-mask", "--reset-position-ids"]


@pytest.mark.integration
@pytest.mark.parametrize("name", list(PACKED_LAYOUTS))
def test_packed_documents_match_single_process_per_weight(name, packed_run, tmp_path):
    from tests import grad_check

    run, (want, want_grads) = packed_run
    nproc, extra = PACKED_LAYOUTS[name]
    got, got_grads = grad_check.train(tmp_path, nproc, [*run, *extra])
    grad_check.assert_same_scalars(name, want, got)
    grad_check.assert_same_gradients(name, want_grads, got_grads)


# --- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--reset-attention-mask", "--reset-position-ids"])
def test_megatron_cores_dsa_is_refused_by_name(flag):
    from pretrain.config.arguments import build_parser, config_from_args

    argv = ["--preset", "tiny", "--mock-data", flag, "--dsa-kernel-backend", "none"]
    with pytest.raises(ValueError, match=f"{flag} with --dsa-kernel-backend none"):
        config_from_args(build_parser().parse_args(argv), 1)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
