"""GLM-5.3-Flash's parameter counts (model/accounting_flash.py) equal what transformers builds (on the
meta device: nothing allocated), total and active; its FLOPs count KDA layers as linear."""

from __future__ import annotations

import pytest
import torch

from model.accounting_flash import count_parameters, flops_per_token
from model.presets import FLASH_PRESETS
from tests.flash_reference import hf_text_config


@pytest.mark.parametrize("name", ["glm5.3-flash-tiny", "glm5.3-flash"])
def test_counts_equal_transformers_build(name):
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextExperts, Glm5NextTextModel

    cfg = FLASH_PRESETS[name]
    with torch.device("meta"):
        model = Glm5NextTextModel(hf_text_config(cfg))
    ours = count_parameters(cfg)
    assert ours["params_text_model"] == sum(p.numel() for p in model.parameters())
    # active: each token runs num_experts_per_tok of the routed experts
    experts = [m for m in model.modules() if isinstance(m, Glm5NextTextExperts)]
    per_expert = sum(p[0].numel() for p in experts[0].parameters())
    idle = len(experts) * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    head = cfg.vocab_size * cfg.hidden_size
    assert ours["params_total"] == ours["params_text_model"] + head
    assert ours["params_active"] == ours["params_total"] - idle * per_expert
    if name == "glm5.3-flash":  # the "about 320B parameters, 18B active"
        assert 300e9 < ours["params_total"] < 340e9 and 15e9 < ours["params_active"] < 21e9


def test_linear_attention_counts_as_linear():
    cfg = FLASH_PRESETS["glm5.3-flash"]
    all_kda = cfg.replace(layer_types=("linear_attention",) * cfg.num_hidden_layers)
    assert flops_per_token(all_kda, 4096) == flops_per_token(all_kda, 1 << 20)
    # with DSA layers, only their attention grows (top-k caps the keys, the indexer's pools grow)
    assert flops_per_token(cfg, 1 << 20) > flops_per_token(cfg, 4096) > flops_per_token(all_kda, 4096)


def test_model_info_tool_reads_a_glm5_next_config(tmp_path, capsys):
    import json

    import tools.model_info as tool

    cfg = FLASH_PRESETS["glm5.3-flash-tiny"]
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    tool.main(["--model-config", str(tmp_path), "--seq-length", "64"])
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] == count_parameters(cfg)["params_total"] and info["seq_length"] == 64


# --- the memory plan (model/accounting_flash.py memory_per_gpu), its pieces by hand on the tiny config ---------

TINY = FLASH_PRESETS["glm5.3-flash-tiny"]  # hidden 52, hc_mult 3, KDA 3 heads x 10, indexer 2 heads, kpool 4, top-k 8


def test_kda_state_and_chunk_states_by_hand():
    from model.accounting_flash import kda_activation_bytes, kda_state_bytes

    assert kda_state_bytes(TINY) == 4 * 3 * 10 * 10  # fp32 [heads, d_k, d_v] per sequence
    assert kda_state_bytes(TINY, sequences=2) == 2 * 1200
    # one state at each 64-token chunk boundary: 130 tokens are 3 chunks
    assert kda_activation_bytes(TINY, 130)["kda_chunk_states"] == 3 * 1200
    # in_proj's output [q | k | v | beta] in bf16: 2 x (3 x 30 + 3) per token
    assert kda_activation_bytes(TINY, 64, micro_batch_size=2)["kda_in_proj"] == 128 * 2 * 93


def test_kda_is_linear_in_the_sequence():
    from model.accounting_flash import kda_activation_bytes

    cfg = FLASH_PRESETS["glm5.3-flash"]
    for seq in (1 << 17, 1 << 18, 1 << 19):
        short, long = kda_activation_bytes(cfg, seq), kda_activation_bytes(cfg, 2 * seq)
        assert all(long[k] == 2 * short[k] for k in short)


def test_indexer_scores_and_sparse_attention_by_hand():
    from model.accounting_flash import dense_attention_extra_bytes, dsa_activation_bytes, indexer_working_bytes

    seq = 64
    idx = indexer_working_bytes(TINY, seq)
    assert idx["scores_whole"] == 4 * 2 * seq * (seq // 4)  # fp32 [index heads, seq, seq / kpool]
    assert idx["scores_blockwise"] == idx["scores_whole"]  # under the block budget at this size
    big = indexer_working_bytes(FLASH_PRESETS["glm5.3-flash"], 1 << 17)  # quadratic / kpool: 32 x 128K x 8K x 4
    assert big["scores_whole"] == 4 * 32 * (1 << 17) * (1 << 13) and big["scores_blockwise"] < big["scores_whole"]
    # per token: the query (3 heads x 12), top-k + the open pool's 3 tail indices (int64), the log-sum-exp;
    # per key: its per-head key (12) and value (10)
    sparse = dsa_activation_bytes(TINY, seq)["sparse_attention"]
    assert sparse == seq * (2 * 3 * 12 + 8 * (8 + 3) + 4 * 3) + seq * 2 * 3 * (12 + 10)
    assert dsa_activation_bytes(TINY, seq, absorbed=True)["sparse_attention"] == sparse - seq * 2 * (66 - 20)
    # the dense torch path: fp32 + bf16 softmax per head and the bool mask, O(s^2)
    assert dense_attention_extra_bytes(TINY, seq)["kept"] == seq * seq * (6 * 3 + 1)


def test_mhc_streams_multiply_the_residual_by_n():
    from model.accounting_flash import GIB, hc_activation_bytes, memory_per_gpu

    seq = 32
    assert hc_activation_bytes(TINY, seq)["hc_streams"] == TINY.hc_mult * (2 * 52 * seq)
    # full recompute, one hybrid layer per checkpoint: each of the 10 hybrid layers keeps its N streams
    m = memory_per_gpu(TINY, pp=1, ep=1, dp=1, seq_length=seq, full_recompute=True)
    assert m["activation_gb_per_microbatch"] * GIB == 10 * 3 * 2 * 52 * seq
    grouped = memory_per_gpu(TINY, pp=1, ep=1, dp=1, seq_length=seq, full_recompute=True, recompute_num_layers=4)
    assert grouped["activation_gb_per_microbatch"] * GIB == 3 * 3 * 2 * 52 * seq  # 10 layers in 3 groups


def test_stages_hold_every_parameter_once():
    from model.accounting_flash import local_parameters
    from model.config import DEFAULT_VOCAB_DIVISIBLE_BY, padded_vocab_size

    pattern = "G-GE|GEDEGE"  # the stages as --hybrid-layer-pattern gives them
    stages = [local_parameters(TINY, pp=2, ep=2, pp_rank=r, layout=pattern) for r in range(2)]
    padding = 2 * (padded_vocab_size(157, divisible_by=DEFAULT_VOCAB_DIVISIBLE_BY, tp=1) - 157) * 52
    assert sum(s["dense"] + 2 * s["experts"] for s in stages) == count_parameters(TINY)["params_total"] + padding
    assert [s["hybrid_layers"] for s in stages] == ["G-GE", "GEDEGE"]


def test_plan_grows_with_the_sequence_and_refuses_what_flash_does_not_run():
    from model.accounting_flash import memory_per_gpu, memory_plan

    cfg = FLASH_PRESETS["glm5.3-flash"]
    layout = dict(pp=9, ep=32, dp=32, cp=8, full_recompute=True)
    totals = [memory_plan(cfg, seq_length=(1 << k) // 8, **layout)["memory_gb_total_estimate"] for k in (17, 18, 19, 20)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    for recompute in (True, False):
        small, large = (memory_per_gpu(TINY, pp=1, ep=1, dp=1, seq_length=s, full_recompute=recompute) for s in (64, 128))
        assert small["activations_gb_estimate"] < large["activations_gb_estimate"]
    for bad, flag in ((dict(tp=2), "tensor parallel"), (dict(ep=2, dp=3), "expert-model-parallel"),
                      (dict(pp=2), "do not split evenly")):
        with pytest.raises(ValueError, match=flag):
            memory_per_gpu(TINY, **{"pp": 1, "ep": 1, "dp": 1, "seq_length": 64, **bad})


def test_model_info_prints_the_flash_plan(capsys):
    import json

    import tools.model_info as tool
    from model.accounting_flash import memory_plan

    tool.main(["--preset", "glm5.3-flash-tiny", "--seq-length", "64", "--world-size", "4",
               "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
               "--hybrid-layer-pattern", "G-GE|GEDEGE", "--recompute-granularity", "full",
               "--use-distributed-optimizer"])
    info = json.loads(capsys.readouterr().out)
    want = memory_plan(TINY, pp=2, ep=2, dp=2, seq_length=64, full_recompute=True, layout="G-GE|GEDEGE")
    assert info["layout"]["dp"] == 2 and info["memory_gb_total_estimate"] == want["memory_gb_total_estimate"]


def _saved_bytes(fn, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward running `fn` (the inputs' own apart)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    for x in inputs:
        seen.pop(x.untyped_storage().data_ptr(), None)
    return sum(seen.values())


def test_counts_match_what_autograd_saves_on_the_tiny_modules():
    """The torch modules' saved tensors, measured: mHC within 10% of hc_activation_bytes; the torch KDA mixer
    within 20% of the plan's tensors plus the reference rule's [C, C, d_k] ones."""
    from model.accounting_flash import hc_activation_bytes, kda_activation_bytes, kda_torch_extra_bytes
    from model.modules.hyper_connection import HyperConnection
    from model.modules.kda import KimiDeltaAttention

    torch.manual_seed(0)
    seq = 128
    kda = KimiDeltaAttention(TINY, backend="torch").to(torch.bfloat16)
    x = torch.randn(seq, 1, TINY.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    counted = sum(kda_activation_bytes(TINY, seq).values()) + kda_torch_extra_bytes(TINY, seq)
    assert 0.8 < _saved_bytes(kda, x) / counted < 1.2
    hc = HyperConnection.of(TINY).to(torch.bfloat16)
    streams = torch.randn(seq, 1, TINY.hc_mult, TINY.hidden_size, dtype=torch.bfloat16, requires_grad=True)

    def layer(s):
        block_input, post, comb = hc(s)
        return HyperConnection.merge(2 * block_input, s, post, comb)

    assert 0.9 < _saved_bytes(layer, streams) / sum(hc_activation_bytes(TINY, seq).values()) < 1.1
