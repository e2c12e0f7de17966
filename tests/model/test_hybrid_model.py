"""GLM-5 on megatron-core's HybridModel (model/layer_pattern.py, model/specs.py hybrid_stack_spec) against
the GPTModel build on the same weights: the loss, the MTP and indexer losses and every weight's gradient
are equal; and the GPT <-> hybrid key map (model/key_layout.py) and the pattern checks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import one_rank_gloo_world


def _step(model, tokens, device="cpu"):
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from pretrain.step import reset_loss_trackers

    reset_loss_trackers()
    model.train()
    model.zero_grad()
    b, s = tokens.shape
    loss = model(input_ids=tokens, position_ids=torch.arange(s, device=device)[None].expand(b, -1),
                 attention_mask=None, labels=tokens, loss_mask=torch.ones(b, s, device=device))
    loss.sum().backward()
    mtp = MTPLossLoggingHelper.tracker.get("values")
    indexer = DSAIndexerLossLoggingHelper.tracker.get("values")
    aux = get_moe_metrics_tracker().metrics.get("seq_load_balancing_loss")
    return (loss.detach(), None if mtp is None else mtp.clone(), None if indexer is None else indexer.sum(),
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            None if aux is None else aux.values.clone())


@pytest.mark.parametrize("preset, options, use_te", [
    # ours (blockwise), the indexer loss on, the aux loss (one MTP depth: its router's slot is the tracker's last)
    ("tiny", dict(dsa_indexer_loss_coeff=0.5, moe_aux_loss_coeff=1e-2), False),
    ("tiny-shared", dict(dsa_kernel_backend="none"), False),  # megatron-core's DSA, IndexShare by topk_freq/offset
    # IndexShare, 3 shared depths, the aux loss (a repeated MTP layer's is scaled by 1/3 where marked is_mtp_layer)
    ("tiny-shared", dict(mtp_num_layers=3, mtp_use_repeated_layer=True, moe_aux_loss_coeff=1e-2), False),
    pytest.param("tiny-shared", dict(dsa_kernel_backend="none", mtp_num_layers=3, mtp_use_repeated_layer=True,
                                     dsa_indexer_loss_coeff=0.5), True, marks=pytest.mark.gpu),  # the TE spec
])
def test_hybrid_build_equals_gpt_build_per_weight(preset, options, use_te):
    from megatron.core import parallel_state

    from model import key_layout
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config
    from model.presets import get_preset
    from parallel import runtime as rt
    from parallel.dims import ParallelDims
    from tests.gpt_reference import build_gpt_model, gpt_config

    if use_te and not torch.cuda.is_available():
        pytest.skip("Transformer Engine's spec needs a GPU")
    device = "cuda" if use_te else "cpu"
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cfg = get_preset(preset)
    aux_scale = MoEAuxLossAutoScaler.main_loss_backward_scale  # process-global: the aux loss's backward sets it
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, 0)
        try:
            tconfig = to_transformer_config(cfg, ModelOptions(use_te=use_te, **options))
            gpt = build_gpt_model(cfg, gpt_config(tconfig, cfg), use_te=use_te)
            (hybrid,) = build_model(cfg, tconfig, use_te=use_te)
            gpt, hybrid = gpt.to(device), hybrid.to(device)
            with torch.no_grad():
                for name, p in gpt.named_parameters():  # non-trivial norms too
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))).to(p) * 0.02)
            theirs = {key_layout.to_hybrid(k): v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
            ours = {k for k in hybrid.state_dict() if not k.endswith("_extra_state")}
            assert set(theirs) == ours, set(theirs) ^ ours
            hybrid.load_state_dict(theirs, strict=False)
            want, got = _step(gpt, tokens, device), _step(hybrid, tokens, device)
        finally:
            parallel_state.destroy_model_parallel()
            MoEAuxLossAutoScaler.main_loss_backward_scale = aux_scale
    assert torch.equal(want[0], got[0])
    if want[1] is not None:
        assert torch.equal(want[1], got[1]), (want[1], got[1])  # MTP loss per depth
    if options.get("dsa_indexer_loss_coeff"):
        assert want[2] > 0 and torch.equal(want[2], got[2])
    if options.get("moe_aux_loss_coeff"):  # per MoE layer, GLM layer i at hybrid 2i + 1, the MTP layer's last
        n = cfg.num_hidden_layers
        moe = [i for i in range(n) if cfg.is_moe_layer(i)]
        assert torch.equal(want[4][moe], got[4][[2 * i + 1 for i in moe]]) and torch.equal(want[4][n:], got[4][2 * n:])
    grads = {key_layout.to_hybrid(n): g for n, g in want[3].items()}
    assert set(grads) == set(got[3])
    unequal = [n for n in grads if not torch.equal(grads[n], got[3][n])]
    assert not unequal, unequal


def test_key_layout_round_trip_and_detection():
    from model import key_layout

    cases = {
        "decoder.layers.3.input_layernorm.weight": "decoder.layers.6.input_layernorm.weight",
        "decoder.layers.3.self_attention.core_attention.indexer.linear_wk.weight":
            "decoder.layers.6.self_attention.core_attention.indexer.linear_wk.weight",
        "decoder.layers.3.pre_mlp_layernorm.weight": "decoder.layers.7.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.weight": "decoder.layers.1.mlp.linear_fc1.weight",
        "decoder.layers.12.mlp.experts.experts.linear_fc2.weight": "decoder.layers.25.mlp.experts.experts.linear_fc2.weight",
        "decoder.final_layernorm.weight": "decoder.final_norm.weight",
        "mtp.layers.0.transformer_layer.self_attention.linear_proj.weight":
            "mtp.layers.0.mtp_model_layer.layers.0.self_attention.linear_proj.weight",
        "mtp.layers.2.transformer_layer.mlp.router.expert_bias": "mtp.layers.2.mtp_model_layer.layers.1.mlp.router.expert_bias",
        "mtp.layers.0.eh_proj.weight": "mtp.layers.0.eh_proj.weight",
        "mtp.layers.0.final_layernorm.weight": "mtp.layers.0.final_layernorm.weight",
        "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
        # an optimizer-state key ends in the parameter's
        "optimizer.state.exp_avg.decoder.layers.1.mlp.linear_fc2.weight":
            "optimizer.state.exp_avg.decoder.layers.3.mlp.linear_fc2.weight",
    }
    for gpt, hybrid in cases.items():
        assert key_layout.to_hybrid(gpt) == hybrid
        assert key_layout.to_gpt(hybrid) == gpt
    assert key_layout.to_gpt("mtp.layers.0.mtp_model_layer.layers.1.mlp.router.weight", "mtp_model_layer") == \
        "mtp.layers.0.mtp_model_layer.mlp.router.weight"
    with pytest.raises(ValueError, match="hybrid layer 2 holds mlp"):
        key_layout.to_gpt("decoder.layers.2.mlp.linear_fc1.weight")
    assert key_layout.layout_of(cases) == key_layout.GPT
    assert key_layout.layout_of(cases.values()) == key_layout.HYBRID
    assert key_layout.layout_of(["embedding.word_embeddings.weight"]) is None


def test_pattern_from_the_config_and_its_checks():
    from model import layer_pattern
    from model.presets import get_preset

    glm5 = get_preset("glm5")
    assert layer_pattern.derive(glm5, 1).startswith("D-D-D-DEDE") and layer_pattern.derive(glm5, 1).endswith("DE/DE")
    tiny = get_preset("tiny")
    assert layer_pattern.derive(tiny, 3) == "D-DEDEDE/DE/DE/DE"
    assert layer_pattern.derive(tiny, 1, [[0, 1], [2], [3]]) == "D-DE|DE|DE/DE"
    assert layer_pattern.check("D-DE|DEDE/DE", tiny, 1, pp=2) == [[0, 1], [2, 3]]
    # a '|' may cut a GLM layer between its attention and its MoE: its stage is its attention's
    assert layer_pattern.check("D-D|EDEDE/DE", tiny, 1, pp=2) == [[0, 1], [2, 3]]
    assert layer_pattern.segment_halves("D-D|EDEDE/DE") == [([0, 1], [0]), ([2, 3], [1, 2, 3])]
    for pattern, pp, depths, error in [
        ("D-DEDE/DE", 1, 1, "the config's 4 layers"),  # a layer short
        ("DEDEDEDE/DE", 1, 1, "1 dense first"),  # the dense layer as MoE
        ("D-DEDEDE/DE/DE/DE", 1, 1, "1 MTP depth"),  # three depths built, one trained: refused
        ("D-DEDEDE/D-", 1, 1, "1 MTP depth"),
        ("D-DEDEDE/DE", 2, 1, "1 pipeline segment"),
        ("D-DE|DE|DE/DE", 2, 1, "3 pipeline segment"),
        ("D-DEDEDX/DE", 1, 1, "not a valid layer symbol"),
    ]:
        with pytest.raises(ValueError, match=error):
            layer_pattern.check(pattern, tiny, depths, pp)


def test_index_share_schedule_counts_hybrid_layers():
    """megatron-core's DSAttention counts dsa_indexer_topk_freq/skip_topk_offset in the layers it is built
    in: GLM-5.2's (4, 3) over GLM layers is (8, 5) over hybrid layers -- the same 21 indexers, not 40."""
    from megatron.core.transformer.experimental_attention_variant.dsa import is_dsa_skip_topk_layer

    from model import index_share, layer_pattern
    from model.presets import get_preset

    types = get_preset("glm5.2").layer_indexer_types
    freq, offset = index_share.megatron_core_schedule(types)
    hfreq, hoffset = layer_pattern.hybrid_topk_schedule(freq, offset)
    assert (freq, offset, hfreq, hoffset) == (4, 3, 8, 5)
    built = [not is_dsa_skip_topk_layer(layer_pattern.hybrid_layer_number(i), hoffset, hfreq) for i in range(78)]
    assert built == [t == index_share.FULL for t in types] and sum(built) == 21
    assert layer_pattern.hybrid_topk_schedule(1, 0) == (1, 0)


def test_mtp_layer_numbering_and_checkpoint_names(caplog):
    """0.19.2's HybridModel numbers GLM layer i's two hybrid layers 2i + 1 and 2i + 2, the MTP layer's inner
    layers 1 and 2 (`is_mtp_layer`), and keeps the MTP inner stack's name `mtp_model_layer` in checkpoints:
    our MoE statistics and indexer-loss tracker count the MTP layer after the decoder's GLM layers, and the
    sharded keys are the module names (model/hf_mapping.py's logical names)."""
    from megatron.core import parallel_state

    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config
    from model.modules.dsa import GLMSparseAttention
    from model.presets import get_preset
    from parallel import runtime as rt
    from parallel.dims import ParallelDims
    from pretrain.checkpoint.checkpointer import SHARDING_METADATA
    from pretrain.metrics.moe_stats import routers
    from tests.helpers import one_rank_gloo_world

    cfg = get_preset("tiny")
    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, 0)
        try:
            with caplog.at_level("WARNING"):
                (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions()), use_te=False)
            assert type(chunk).__name__ == "HybridModel" and "IS DEPRECATED" not in caplog.text, caplog.text
            inner = chunk.mtp.layers[0].mtp_model_layer.layers
            assert [(m.is_mtp_layer, m.layer_number) for m in inner] == [(True, 1), (True, 2)]
            assert [i for i, _ in routers([chunk])] == [1, 2, 3, 4]
            numbers = [m.layer_number for m in chunk.modules() if isinstance(m, GLMSparseAttention)]
            assert numbers == [1, 3, 5, 7, 2 * cfg.num_hidden_layers + 1]
            sharded = chunk.sharded_state_dict(metadata=SHARDING_METADATA)
            for name, _ in chunk.named_parameters():
                if name.startswith("mtp.") and ".experts." not in name:
                    assert sharded[name].key == name
        finally:
            parallel_state.destroy_model_parallel()
