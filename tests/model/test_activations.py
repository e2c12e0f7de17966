"""model/accounting.py's activation term against what a GLM-5 layer at its real widths keeps for backward
(tools/measure_activations.py; the seq-4096 table is in docs/MEMORY.md).

On CPU the tool runs at a scaled token count (the widths stay GLM-5's: only the sequence is short) and
every case must be within 10%. On a GPU (`python -m pytest -q -m gpu tests/model/test_activations.py`) the
saved-tensor count itself is held to what the CUDA allocator shows: the peak of a forward grows by
exactly one layer's kept bytes each time the layer is applied once more.
"""

import json

import pytest
import torch

import tools.measure_activations as tool
from model.accounting import layer_activation_bytes
from model.presets import get_preset

SCALED = ["--seq-length", "64", "--tensor-model-parallel-size", "2", "--recompute-granularity", "none", "selective",
          "full", "--recompute-modules", "core_attn", "layernorm", "mlp", "moe"]


@pytest.mark.integration
def test_estimate_within_ten_percent_of_the_measurement(tmp_path, capsys):
    """TP 2 with sequence parallel (the recipe's), dense and MoE, no / selective / full recompute."""
    out = tmp_path / "cases.json"
    assert tool.main([*SCALED, "--json", str(out)]) == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["layer"], r["recompute"]) for r in rows] == [
        (layer, mode) for layer, last in (("dense", "mlp"), ("moe", "moe"))
        for mode in ("none", "selective:core_attn", "selective:layernorm", f"selective:{last}", "full")]
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=0.10), r
    none, core = rows[5], rows[6]
    assert none["measured_parts"]["experts"] > 0 and "experts" in none["estimated_parts"]
    assert core["measured_bytes"] < none["measured_bytes"]  # recomputing the DSA core attention saves memory


@pytest.mark.integration
def test_one_process_layer_at_tp1(tmp_path, capsys):
    out = tmp_path / "cases.json"
    assert tool.main(["--seq-length", "64", "--tensor-model-parallel-size", "1", "--layers", "moe",
                      "--recompute-granularity", "none", "--json", str(out)]) == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())
    assert row["ratio"] == pytest.approx(1.0, abs=0.10), row


@pytest.mark.integration
def test_a_wrong_estimate_fails(monkeypatch, capsys):
    """A formula that forgets the routed experts' intermediates must fail the check, naming the case."""
    def forgetful(*args, **kwargs):
        parts = layer_activation_bytes(*args, **kwargs)
        parts.pop("experts", None)
        return parts

    monkeypatch.setattr(tool, "layer_activation_bytes", forgetful)
    assert tool.main(["--seq-length", "64", "--tensor-model-parallel-size", "2", "--layers", "moe",
                      "--recompute-granularity", "none"]) == 1
    captured = capsys.readouterr()
    assert "OFF" in captured.out and "moe TP 2 none" in captured.err


def test_kept_bytes_grow_linearly_with_tokens_once_the_sequence_exceeds_top_k():
    """Past top-k (2048) every query keeps the same number of indices: bytes per token are constant."""
    c = get_preset("glm5")
    for kw in ({"tp": 1, "moe": True}, {"tp": 2, "moe": False}, {"tp": 2, "moe": True, "recompute_granularity": "full"}):
        at = {s: sum(layer_activation_bytes(c, seq_length=s, **kw).values()) for s in (2048, 4096, 8192)}
        assert at[4096] == pytest.approx(2 * at[2048]) and at[8192] == pytest.approx(2 * at[4096])


def test_plan_holds_each_in_flight_microbatch_of_a_stage():
    """memory_per_gpu: 1F1B keeps PP - rank micro-batches on a stage, the interleaved schedule
    megatron-core's warm-up count; activations = in flight x the stage's layers + the running layer's working
    set (+ with full recompute one layer's whole set, which the selective case has not)."""
    from model.accounting import dsa_buffer_bytes, memory_per_gpu

    c = get_preset("glm5")
    kw = dict(tp=2, pp=6, ep=32, etp=1, dp=48, seq_length=4096, micro_batch_size=1, distributed_optimizer=True,
              num_microbatches=320, mtp_depths=3)
    working = dsa_buffer_bytes(c, 4096, 4096, 2, "triton")["working"] / 2**30
    for stage, in_flight in ((0, 6), (3, 3)):
        sel = memory_per_gpu(c, pp_rank=stage, recompute_granularity="selective", **kw)
        assert sel["in_flight_microbatches"] == in_flight
        assert sel["activations_gb_estimate"] == pytest.approx(in_flight * sel["activation_gb_per_microbatch"] + working)
        full = memory_per_gpu(c, pp_rank=stage, recompute_granularity="full", **kw)
        assert full["activation_gb_per_microbatch"] < sel["activation_gb_per_microbatch"] / 20
    bridge = memory_per_gpu(c, tp=1, pp=13, ep=32, etp=1, dp=32, seq_length=4096, micro_batch_size=1, vpp=2,
                            distributed_optimizer=True, num_microbatches=32, microbatch_group_size=16, pp_rank=0,
                            recompute_granularity="full")
    assert bridge["in_flight_microbatches"] == (2 * 12 + 16 + 1) / 2


@pytest.mark.parametrize("argv,message", [
    (["--recompute-granularity", "partial"], "argument --recompute-granularity: invalid choice: 'partial'"),
    (["--seq-length", "4095"], "--seq-length 4095 must be a positive multiple of 2 x --tensor-model-parallel-size"),
    (["--seq-length", "4098", "--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 = 4"),
    (["--recompute-modules", "attn"], "--recompute-modules attn: choose from"),
    (["--recompute-modules", "moe_act"], "moe_act needs --moe-grouped-gemm"),
    (["--recompute-granularity", "full", "--recompute-modules", "mlp"], "--recompute-modules needs"),
    (["--num-experts", "4"], "--num-experts 4 must be >= GLM-5's top-8"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size [3]"),
])
def test_bad_input_is_refused_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tool.parse(argv)
    assert e.value.code != 0 and message in capsys.readouterr().err


# --- GPU: the saved-tensor count against the CUDA allocator ---------------------------------------
GPU_CASES = [("dense", 1, "none", None), ("moe", 1, "none", None), ("moe", 1, "selective", ["core_attn"]),
             ("moe", 1, "full", None), ("moe", 2, "none", None)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layer,tp,granularity,modules", GPU_CASES)
def test_saved_tensor_count_matches_cuda_memory(layer, tp, granularity, modules):
    """seq 4096, bf16, the local backend on CUDA (no Transformer Engine): the growth of
    torch.cuda.max_memory_allocated per application of the layer equals the saved-tensor count."""
    from parallel import runtime as rt
    from tools.simulate_layout import fake_world

    seq, device = 4096, torch.device("cuda")
    cfg = tool.glm5_layer_config(layer == "moe", 8)
    torch.manual_seed(0)
    with fake_world(0, tp):
        rt.init_model_parallel(tool.layer_dims(tp), 1, 1234, gloo_groups=False)
        block = tool.build_layer(cfg, tp, granularity, modules, device)
        counted = sum(tool.measure(block, seq, 1, tp, device).values())
        grown = tool.cuda_growth_per_layer(block, seq, 1, tp, device)
        est = sum(layer_activation_bytes(cfg, seq_length=seq, tp=tp, moe=layer == "moe",
                                         recompute_granularity=None if granularity == "none" else granularity,
                                         recompute_modules=modules, norm=tool.norm_kind(device),
                                         dsa_path=tool.block_dsa_path(device)).values())
        del block
    print(f"{layer} TP {tp} {granularity} {modules}: counted {counted / 2**20:.1f} MiB, CUDA {grown / 2**20:.1f} MiB, "
          f"estimate {est / 2**20:.1f} MiB ({est / counted:.3f} of counted)")
    assert grown == pytest.approx(counted, rel=0.10)
