"""IndexShare (GLM-5.1/5.2): the config reads transformers' three spellings and writes `indexer_types`;
shared layers build no indexer (the same parameters as transformers' own build); both DSA families
compute the same thing; under recompute a shared layer attends with its own micro-batch's top-k (the
test fails when the replay is switched off); a pipeline layout that splits a sharing group is
refused before any work, naming a layout that works. HF import/export: tests/tools/test_import_hf.py;
parallel layouts: tests/parallel/test_parallel_equivalence.py (`shared-pp2-vpp-tp2-cp2-ep2`)."""

from __future__ import annotations

import pytest
import torch

from model import index_share
from model.config import GLM5Config
from model.presets import get_preset
from tests.parallel.test_mcore_exchange import SEQ, randomize, world  # noqa: F401 (fixture)

F, S = "full", "shared"


def shared_tiny():
    return get_preset("tiny-shared").replace(index_n_heads=8)  # 8 heads: no top-k ties (test_mcore_exchange)


def hf_dict(**fields):
    d = get_preset("tiny").to_hf_dict()
    d.pop("indexer_types")
    return {**d, **fields}


def test_the_three_spellings_are_read_as_transformers_reads_them():
    from transformers import GlmMoeDsaConfig

    for fields in [dict(index_topk_freq=2), dict(index_topk_freq=2, index_skip_topk_offset=1),
                   dict(index_topk_pattern="FSFF"), dict(indexer_types=[F, F, S, S])]:
        want = GlmMoeDsaConfig(**hf_dict(**fields)).indexer_types
        cfg = GLM5Config.from_hf_dict(hf_dict(**fields))
        assert cfg.layer_indexer_types == want, fields
        assert GLM5Config.from_hf_dict(cfg.to_hf_dict()) == cfg  # written as indexer_types, read back
    assert GLM5Config.from_hf_dict(hf_dict()).indexer_types is None  # GLM-5: every layer full
    # offset 0 (megatron-core raises it to 1; transformers does not): layer 0 would be shared
    with pytest.raises(ValueError, match=r"index_topk_freq=2, index_skip_topk_offset=0 .*indexer_types\[0\]"):
        GLM5Config.from_hf_dict(hf_dict(index_topk_freq=2, index_skip_topk_offset=0))
    with pytest.raises(ValueError, match="index_topk_pattern='FSX'"):
        GLM5Config.from_hf_dict(hf_dict(index_topk_pattern="FSX"))
    with pytest.raises(ValueError, match="index_share_for_mtp_iteration"):
        GLM5Config.from_hf_dict(hf_dict(index_topk_freq=2, index_share_for_mtp_iteration=True))


def test_presets_and_megatron_core_schedules():
    types = get_preset("glm5.2").layer_indexer_types
    assert [i for i, t in enumerate(types) if t == F] == [0, 1, 2] + list(range(6, 78, 4))
    assert index_share.megatron_core_schedule(types) == (4, 3)
    assert get_preset("glm5.1") == get_preset("glm5")
    # the two conventions agree for offset >= 1: the schedule found rebuilds the list megatron-core's way
    from megatron.core.transformer.experimental_attention_variant.dsa import is_dsa_skip_topk_layer

    for freq, offset in [(2, 1), (3, 2), (4, 3), (2, 5)]:
        hf = index_share.from_schedule(12, freq, offset)
        assert [not is_dsa_skip_topk_layer(i + 1, offset, freq) for i in range(12)] == [t == F for t in hf]
        assert index_share.megatron_core_schedule(hf) is not None
    assert index_share.megatron_core_schedule([F, S, F, F, S, S]) is None


def test_a_pattern_megatron_core_cannot_express_is_refused_by_name():
    from model.mcore_config import ModelOptions, to_transformer_config

    cfg = get_preset("tiny").replace(indexer_types=(F, S, F, F))
    with pytest.raises(ValueError, match=r"--dsa-kernel-backend none: .*indexer_types \(FSFF\)"):
        to_transformer_config(cfg, ModelOptions(dsa_kernel_backend="none"))
    assert to_transformer_config(cfg, ModelOptions(dsa_kernel_backend="blockwise")).glm_indexer_types == cfg.indexer_types


def test_a_layout_that_splits_a_sharing_group_fails_before_any_work(capsys):
    from pretrain.config.arguments import parse_args

    run = ["--preset", "tiny-shared", "--mock-data", "--pipeline-model-parallel-size", "2"]
    with pytest.raises(SystemExit):
        parse_args([*run, "--pipeline-model-parallel-layout", "Et|tt||tmL"], world_size=2)
    err = capsys.readouterr().err
    assert "puts layer 1 in another pipeline stage than layer 0" in err and "'Ett||tt|mL'" in err, err
    parse_args([*run, "--pipeline-model-parallel-layout", "Ett||tt|mL"], world_size=2)  # the suggestion works
    with pytest.raises(SystemExit):
        parse_args([*run, "--num-layers-per-virtual-pipeline-stage", "1"], world_size=2)
    assert "--num-layers-per-virtual-pipeline-stage 1" in capsys.readouterr().err


def build(cfg, backend, **options):
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config

    (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions(dsa_kernel_backend=backend, **options)),
                           use_te=False)
    return chunk


def test_parameters_equal_transformers_build(world):  # noqa: F811
    from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

    cfg = shared_tiny().replace(num_nextn_predict_layers=0)
    hf = GlmMoeDsaForCausalLM(GlmMoeDsaConfig(**cfg.to_hf_dict()))
    assert [a.self_attn.indexer is None for a in hf.model.layers] == [False, True, False, True]
    for backend in ("blockwise", "none"):
        ours = build(cfg, backend)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()), backend
        assert not any(".layers.1." in n and "indexer" in n for n in ours.state_dict())


def microbatch_step(model, batches, order):
    """Forward-backward of several micro-batches in a schedule's order ("F0 F1 B0 B1": 1F1B's first
    stage); returns every weight's summed gradient."""
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossAutoScaler

    DSAIndexerLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    model.train()
    model.zero_grad()
    losses = {}
    for op in order.split():
        k = int(op[1:])
        if op[0] == "F":
            tokens = batches[k]
            losses[k] = model(input_ids=tokens, position_ids=torch.arange(SEQ)[None], attention_mask=None,
                              labels=tokens).sum()
        else:
            losses.pop(k).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["blockwise", "none"])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_recompute_uses_each_micro_batchs_own_top_k(world, backend, recompute, monkeypatch):  # noqa: F811
    """Gradients of F0 F1 B0 B1 with recompute equal those without it, per weight. With the replay
    switched off (the shared layer reading whatever top-k its source published last, as megatron-core's
    holder on the config would), B0's recompute attends with micro-batch 1's keys: the check fails."""
    from model.modules import topk_share

    cfg = shared_tiny()
    options = dict(dsa_indexer_loss_coeff=1.0, dsa_indexer_topk=8)
    ref = build(cfg, backend, **options)
    randomize(ref, seed=3)
    rec = build(cfg, backend, recompute_granularity=recompute, **options)
    rec.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, cfg.vocab_size, (1, SEQ), generator=g) for _ in range(2)]
    want = microbatch_step(ref, batches, "F0 B0 F1 B1")

    def worst(got):
        assert sorted(got) == sorted(want)
        return max(float((got[n] - w).norm() / w.norm().clamp_min(1e-12)) for n, w in want.items())

    assert worst(microbatch_step(rec, batches, "F0 F1 B0 B1")) < 1e-5
    # no replay: the shared layer reads whatever its source published last (megatron-core's own holder)
    if backend == "none":
        from megatron.core.transformer.experimental_attention_variant.dsa import DSAttention

        for name in ("_get_index_share_topk_holder", "_get_index_share_topk_length_holder"):
            monkeypatch.setattr(topk_share.GLMDSAttention, name, getattr(DSAttention, name))
    else:
        monkeypatch.setattr(topk_share, "take", lambda m, source, value=None, last=False:
                            m.index_share_state.published[source])
    assert worst(microbatch_step(rec, batches, "F0 F1 B0 B1")) > 1e-2
