"""Megatron-Bridge <-> this project: a distributed checkpoint written by megatron-core 0.19.2's own GLM-5
model (its stock DSA spec, configured as Megatron-Bridge's GLM5Bridge configures it: tests/upstream_glm5.py)
loads into ours and gives the same logits, and one written by ours loads there -- for each of our
--dsa-kernel-backend families (ours: blockwise; megatron-core's modules: none).

Both sides write the same tensor layouts; megatron-core's GPTModel names a GLM layer as one layer where
ours (HybridModel) names its two halves, so the keys are renamed on load (model/key_layout.py), in
both directions. The logits agree to ~1e-4, not
bit for bit: megatron-core's stock spec normalizes the q/kv latents with the one `layernorm_epsilon`
(1e-5) where ours follows transformers (1e-6; docs/HF_MAPPING.md, D2). A conversion that should not be
there (the format-1 indexer roll) moves them by whole units: the test can fail.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import one_rank_gloo_world

SEQ = 48  # > index_topk (16): the indexer's choice matters


def tiny():
    from model.presets import get_preset

    # 8 indexer heads: a key scores exactly 0 (every head's ReLU off) with probability 2^-8, so the
    # top-k has no exact ties at its boundary, which either side may break its own way.
    return get_preset("tiny").replace(index_n_heads=8)


@pytest.fixture
def world():
    from megatron.core import parallel_state

    from parallel import runtime as rt
    from parallel.dims import ParallelDims

    with one_rank_gloo_world():
        rt.init_model_parallel(ParallelDims(world_size=1), tiny().num_hidden_layers, 0)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()


def ours(backend: str):
    from model.builder import build_model
    from model.mcore_config import ModelOptions, to_transformer_config

    cfg = tiny()
    (chunk,) = build_model(cfg, to_transformer_config(cfg, ModelOptions(dsa_kernel_backend=backend)), use_te=False)
    return chunk


def upstream():
    from model.mcore_config import ModelOptions, to_transformer_config
    from tests.gpt_reference import gpt_config
    from tests.upstream_glm5 import bridge_config, build_upstream_model

    cfg = tiny()
    return build_upstream_model(cfg, bridge_config(gpt_config(to_transformer_config(cfg, ModelOptions()), cfg)))


@torch.no_grad()
def randomize(model, seed=0):
    """Weights of a trained model's scale (init's 0.02 leaves the indexer's scores near ties), norms
    near 1, and a non-zero expert bias (a buffer: it must travel too)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if "norm.weight" in name else 0.0))


def logits(model):
    from tools.lib.hf_verify import main_logits

    tokens = torch.randint(0, tiny().vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return main_logits(model.eval(), tokens)


def exchange(src, dst, path, checkpoint_format=None, save_layout=None):
    """src saves a dist checkpoint (its keys in `save_layout`, model/key_layout.py, when given), dst loads it
    as this project loads one (checkpoint_format: of src's files)."""
    from megatron.core import dist_checkpointing

    from model import hf_mapping
    from pretrain.checkpoint import extra_state
    from pretrain.checkpoint.upgrade import rename_keys, stored_key_layout, upgrade_request

    path.mkdir()
    saved = src.sharded_state_dict()
    if save_layout is not None:
        rename_keys(saved, save_layout)
    dist_checkpointing.save(saved, str(path), async_sharded_save=False, async_strategy="mcore")
    assert save_layout is None or stored_key_layout(path) == save_layout
    # megatron-core's GLM-5 is a GPTModel (GPTModel's keys), ours a HybridModel: the keys are renamed
    request = upgrade_request(dst.sharded_state_dict(), checkpoint_format, hf_mapping.Dims.of(tiny(), 0),
                              stored_layout=stored_key_layout(path))
    dst.load_state_dict(extra_state.load(request, path))


@pytest.mark.parametrize("backend", ["blockwise", "none"])
def test_megatron_core_checkpoint_loads_here(world, backend, tmp_path):
    theirs = upstream()
    randomize(theirs)
    want = logits(theirs)
    mine = ours(backend)
    exchange(theirs, mine, tmp_path / "ckpt")
    got = logits(mine)
    assert (got - want).abs().max() < 1e-3, (got - want).abs().max()


@pytest.mark.parametrize("backend", ["blockwise", "none"])
def test_our_checkpoint_loads_in_megatron_core(world, backend, tmp_path):
    mine = ours(backend)
    randomize(mine, seed=1)
    want = logits(mine)
    theirs = upstream()
    # megatron-core renames our keys as it loads (blockwise), or ours are written in GPTModel's layout (none)
    from model import key_layout

    exchange(mine, theirs, tmp_path / "ckpt", save_layout=key_layout.GPT if backend == "none" else None)
    got = logits(theirs)
    assert (got - want).abs().max() < 1e-3, (got - want).abs().max()


def test_a_wrong_conversion_fails_the_exchange(world, tmp_path):
    """Loading megatron-core's checkpoint as if it were in this project's format 1 (indexer RoPE dims
    last: rolled on load) changes the indexer's top-k and the logits by whole units."""
    theirs = upstream()
    randomize(theirs)
    want = logits(theirs)
    mine = ours("blockwise")
    exchange(theirs, mine, tmp_path / "ckpt", checkpoint_format=1)
    assert (logits(mine) - want).abs().max() > 0.1
