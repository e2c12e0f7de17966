"""GLM-5.3-Flash built on megatron-core's HybridModel (model/specs_flash.py: KDA, megatron's NoPE MLA over the
pooled-key DSA indexer, megatron's MLP / MoE with the clamped SwiGLU, mHC streams carried as [s, b, N x hidden])
gives transformers' Glm5NextForCausalLM logits and every weight's gradient on the tiny config (odd sizes), the
weights copied across by model/flash_hf_mapping.py's whole-model map (the importer's); and the layouts not built
yet are refused by name."""

from __future__ import annotations

import pytest
import torch

from tests.flash_reference import TINY, assert_fp32_close, hf_text_config, randomized
from tests.helpers import one_rank_gloo_world


def build_tiny_flash(cfg=TINY, **options):
    from model.mcore_config import ModelOptions
    from model.mcore_config_flash import to_flash_transformer_config
    from model.builder_flash import build_flash_model
    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    rt.init_model_parallel(ParallelDims(world_size=1), cfg.num_hidden_layers, 0)
    tconfig = to_flash_transformer_config(cfg, ModelOptions(params_dtype=torch.float64, **options))
    tconfig.kda_backend = "torch"
    return build_flash_model(cfg, tconfig), tconfig


def hf_causal_lm(cfg, seed: int):
    """transformers' text model with its head: Glm5NextTextModel + lm_head, random fp64 weights."""
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextModel

    torch.manual_seed(seed)
    text = randomized(Glm5NextTextModel(hf_text_config(cfg)), seed=seed, scale=0.2)
    head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False).double()
    torch.nn.init.normal_(head.weight, std=0.2, generator=torch.Generator().manual_seed(seed + 1))
    return text, head


def test_hybrid_flash_equals_transformers_per_weight():
    from megatron.core import parallel_state

    from model.flash_hf_mapping import hybrid_from_hf, hybrid_to_hf

    c = TINY
    text, head = hf_causal_lm(c, seed=41)
    with torch.no_grad():  # megatron keeps the router's expert bias in fp32: values it holds exactly
        for name, t in text.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(t.float())
    theirs = {**text.state_dict(), "lm_head.weight": head.weight}
    # not the pad token: transformers' embedding (padding_idx) gives its row no gradient, megatron's does
    tokens = torch.randint(0, c.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    tokens[tokens == c.pad_token_id] = (c.pad_token_id + 1) % c.vocab_size
    with one_rank_gloo_world():
        try:
            model, _ = build_tiny_flash()
            padded = model.embedding.word_embeddings.weight.shape[0]
            mapped = hybrid_from_hf(theirs, c, padded)
            ours_keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
            assert set(mapped) == {k for k in ours_keys if "local_tokens_per_expert" not in k}, set(mapped) ^ ours_keys
            model.load_state_dict(mapped, strict=False)
            # the map back is the exporter's: it gives transformers' tensors again
            back = hybrid_to_hf({k: v for k, v in model.state_dict().items() if k in mapped}, c)
            assert set(back) == set(theirs)
            for k, v in theirs.items():
                torch.testing.assert_close(back[k], v, rtol=0, atol=0, check_dtype=False, msg=k)
            model.train()
            b, s = tokens.shape
            logits = model(input_ids=tokens, position_ids=torch.arange(s)[None].expand(b, -1), attention_mask=None)
            logits = logits[..., :c.vocab_size]
            want = head(text(tokens).last_hidden_state)
            assert_fp32_close(logits, want, "logits")
            weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=want.dtype)
            (logits * weights).sum().backward()
            (want * weights).sum().backward()
            ours_g = {n: p.grad for n, p in model.named_parameters()}
            params = dict(text.named_parameters())
            hf_grads = {n: params[n].grad if n in params and params[n].grad is not None else torch.zeros_like(t)
                        for n, t in text.state_dict().items()}  # no gradient: the indexer, buffers
            theirs_g = hybrid_from_hf({**hf_grads, "lm_head.weight": head.weight.grad}, c, padded)
            checked = 0
            for name, g in ours_g.items():
                if ".indexer." in name or name.endswith("expert_bias"):
                    assert g is None or not g.any(), name  # no gradient on either side (no indexer loss yet)
                    continue
                assert g is not None, name
                assert_fp32_close(g, theirs_g[name], name)
                checked += 1
            assert checked > 50
        finally:
            parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("layout, options, flag", [
    (dict(tp=2), {}, "--tensor-model-parallel-size 2"),
    (dict(pp=2, layers_per_virtual_stage=1), {}, "--num-layers-per-virtual-pipeline-stage"),
    (dict(cp=2), {}, "--context-parallel-size 2"),
    ({}, dict(dsa_indexer_loss_coeff=0.1), "--dsa-indexer-loss-coeff 0.1"),
])
def test_unbuilt_layouts_refused_by_name(layout, options, flag):
    from model.mcore_config import ModelOptions
    from model.mcore_config_flash import check_flash_options
    from parallel.dims import ParallelDims

    dims = ParallelDims(world_size=8, **layout)
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        check_flash_options(TINY, ModelOptions(**options), dims)


def test_packed_documents_equal_each_document_alone():
    """--reset-attention-mask: two documents packed in one row give the logits each gives alone (KDA's state and
    convolution, the pooled indexer's selection and so the attention stay inside each document)."""
    from megatron.core import parallel_state

    from model.modules.documents import document_layout

    eod = 0
    gen = torch.Generator().manual_seed(11)
    first = torch.randint(1, TINY.vocab_size, (1, 13), generator=gen)
    second = torch.randint(1, TINY.vocab_size, (1, 10), generator=gen)
    first[0, -1] = eod  # the first document ends with its EOD
    packed = torch.cat([first, second], dim=1)
    with one_rank_gloo_world():
        try:
            model, _ = build_tiny_flash()
            with torch.no_grad():
                for p in model.parameters():  # non-trivial norms and maps
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
            model.eval()

            def logits(tokens, mask=None):
                positions = torch.arange(tokens.shape[1])[None]
                return model(input_ids=tokens, position_ids=positions, attention_mask=mask)

            together = logits(packed, document_layout(packed, eod, True, True))
            alone = torch.cat([logits(first), logits(second)], dim=1)
            assert_fp32_close(together, alone, "packed")  # the router's scores are fp32 (moe_router_dtype)
            assert not torch.allclose(logits(packed)[:, 13:], alone[:, 13:])  # without the mask they differ
        finally:
            parallel_state.destroy_model_parallel()


def test_the_trainer_refuses_before_any_work(capsys):
    """launch/pretrain.py's argument check names what GLM-5.3-Flash does not run yet, before anything is built."""
    from pretrain.config.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--preset", "glm5.3-flash-tiny", "--mock-data", "--context-parallel-size", "2"], world_size=2)
    assert "GLM-5.3-Flash: --context-parallel-size 2 is not supported yet" in capsys.readouterr().err
