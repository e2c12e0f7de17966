import json

import pytest

from model.accounting import count_parameters
from model.config import GLM5Config
from model.presets import PRESETS, get_preset


def test_glm5_preset_is_the_released_config():
    c = get_preset("glm5")
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (6144, 78, 256, 8)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        2048, 512, 192, 64, 256)
    assert (c.index_topk, c.index_head_dim, c.index_n_heads) == (2048, 128, 32)
    assert c.vocab_size == 154880 and c.first_k_dense_replace == 3 and c.routed_scaling_factor == 2.5
    assert c.rope_theta == 1e6 and c.num_nextn_predict_layers == 1 and not c.tie_word_embeddings


def test_tiny_keeps_every_feature():
    c = get_preset("tiny")
    assert c.q_lora_rank and c.kv_lora_rank  # MLA
    assert c.index_topk < 64  # DSA really sparse at the default tiny sequence length
    assert 0 < c.first_k_dense_replace < c.num_hidden_layers  # dense first layer, then MoE
    assert c.n_shared_experts == 1 and c.n_routed_experts > c.num_experts_per_tok
    assert c.scoring_func == "sigmoid" and c.num_nextn_predict_layers == 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name, tmp_path):
    c = get_preset(name)
    c.save_hf_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "glm_moe_dsa" and d["architectures"] == ["GlmMoeDsaForCausalLM"]
    assert GLM5Config.load_hf_json(tmp_path) == c


def test_hf_config_loads_in_transformers(tmp_path):
    from transformers import AutoConfig

    get_preset("glm5").save_hf_json(tmp_path / "config.json")
    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "GlmMoeDsaConfig"
    assert hf.n_routed_experts == 256 and hf.index_topk == 2048 and hf.qk_head_dim == 256


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        GLM5Config(n_routed_experts=4, num_experts_per_tok=8)
    with pytest.raises(ValueError, match="--preset 'nope' is unknown"):
        get_preset("nope")


def test_glm5_parameter_counts_match_the_checkpoint_shapes():
    p = count_parameters(get_preset("glm5"))
    # docs/HF_MAPPING.md (section 1): attention+indexer 174.4M per layer, MoE layer 9.703B, expert 37.75M,
    # embedding 951.6M
    assert p["params_attention_per_layer"] - 2 * 6144 == pytest.approx(174.4e6, rel=1e-3)
    assert p["params_moe_layer"] == pytest.approx(9.703e9, rel=1e-3)
    assert p["params_expert"] == pytest.approx(37.75e6, rel=1e-3)
    assert p["params_embedding"] == pytest.approx(951.6e6, rel=1e-3)
    assert p["params_total"] == pytest.approx(743.9e9, rel=3e-3)
    assert p["params_total_with_mtp"] == pytest.approx(753.9e9, rel=3e-3)
    assert 40e9 <= p["params_active"] <= 42e9


@pytest.mark.parametrize("field,value", [
    ("norm_topk_prob", False), ("topk_method", "greedy"), ("rope_interleave", False),
    ("indexer_rope_interleave", False), ("attention_bias", True),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
])
def test_hf_config_the_model_does_not_implement_is_refused(field, value):
    """Fields the model implements one way only are checked, not parsed and ignored: the error names
    the field and its value."""
    d = get_preset("tiny").to_hf_dict()
    d[field] = value
    with pytest.raises(ValueError, match=f"{field}={value!r}".replace("(", r"\(").replace("[", r"\[")
                       .replace("{", r"\{").replace(".", r"\.")):
        GLM5Config.from_hf_dict(d)


def test_hf_config_written_by_transformers_loads(tmp_path):
    """transformers' own config (None for the fields it hard-codes, RoPE in rope_parameters) is accepted."""
    from transformers import AutoConfig

    get_preset("tiny").replace(rope_theta=5e5).save_hf_json(tmp_path / "config.json")
    AutoConfig.from_pretrained(tmp_path).save_pretrained(tmp_path / "hf")
    c = GLM5Config.load_hf_json(tmp_path / "hf")
    assert c == get_preset("tiny").replace(rope_theta=5e5)


@pytest.mark.parametrize("flags, tp, rows", [
    (["--make-vocab-size-divisible-by", "64"], 1, 1088),
    (["--make-vocab-size-divisible-by", "64"], 2, 1152),  # a multiple of 64 x TP 2
    ([], 2, 1280),  # the default 128 x TP: the rows every earlier run (and its checkpoint) has
])
def test_vocab_rows_are_padded_to_make_vocab_size_divisible_by_times_tp(flags, tp, rows):
    """Megatron-LM's rule, once (model/config.py's padded_vocab_size): the config, the built embedding and
    the output layer hold --vocab-size padded to a multiple of --make-vocab-size-divisible-by x TP."""
    from model.builder import build_model
    from model.mcore_config import to_transformer_config
    from parallel import runtime as rt
    from parallel.compat import megatron_cpu
    from parallel.compat.megatron_meta import on_meta
    from pretrain.config.arguments import build_parser, config_from_args
    from tools.simulate_layout import fake_world

    megatron_cpu.activate()  # as every in-process world of the tests (tests/helpers.py)
    args = build_parser().parse_args(["--preset", "tiny", "--mock-data", "--vocab-size", "1050", *flags,
                                      "--tensor-model-parallel-size", str(tp), "--sequence-parallel"][:-1 if tp == 1 else None])
    cfg = config_from_args(args, world_size=tp)
    assert cfg.model.vocab_size == rows
    with fake_world(0, tp):
        rt.init_model_parallel(cfg.dims, cfg.model.num_hidden_layers, cfg.seed, gloo_groups=False)
        with on_meta():
            (chunk,) = build_model(cfg.model, to_transformer_config(cfg.model, cfg.model_options, cfg.dims), False)
    assert chunk.embedding.word_embeddings.weight.shape[0] * tp == rows
    assert chunk.output_layer.weight.shape[0] * tp == rows
