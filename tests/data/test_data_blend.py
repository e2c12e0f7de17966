"""Blending: Megatron --data-path syntax, proportions, and that blends keep the reader's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import build_pretraining_data
from data.blend import BlendSchedule, parse_data_path

OFFSET = 1 << 19  # dataset "b" uses token ids >= OFFSET, so each row tells which dataset it came from
SEQ, GBS = 32, 16


def test_parse_data_path():
    assert parse_data_path(["web/manifest.json"]) == ([1.0], ["web/manifest.json"])
    assert parse_data_path(["0.7", "a.json", "0.3", "b.json"]) == ([0.7, 0.3], ["a.json", "b.json"])
    assert parse_data_path(["a.json", "b.json"]) == (None, ["a.json", "b.json"])
    assert parse_data_path(["pipe:aws s3 cp s3://b/m.json -"]) == ([1.0], ["pipe:aws s3 cp s3://b/m.json -"])
    for bad in (["0.7", "a.json", "b.json"], ["0.7", "a.json", "x", "b.json"], ["-1", "a", "1", "b"], []):
        with pytest.raises(ValueError, match="data-path"):
            parse_data_path(bad)


def test_schedule_proportions_are_tight_everywhere():
    weights = np.array([0.5, 0.3, 0.2])
    choice = BlendSchedule(list(weights), seed=5).choose(np.arange(200_000))
    counts = np.bincount(choice, minlength=3)
    assert np.abs(counts - 200_000 * weights).max() < 20
    for start in range(0, 199_000, 9_973):  # windows of 1000 consecutive rows anywhere
        window = np.bincount(choice[start:start + 1000], minlength=3)
        assert np.abs(window - 1000 * weights).max() <= 10
    other = BlendSchedule(list(weights), seed=6).choose(np.arange(1000))
    assert not np.array_equal(other, choice[:1000])


@pytest.fixture
def two_datasets(data_synthetic):
    a, _ = data_synthetic("a", num_docs=500)
    b, _ = data_synthetic("b", num_docs=300, seed=1, token_offset=OFFSET)
    return a, b


def source_of_rows(tokens: torch.Tensor) -> np.ndarray:
    """1 where a row comes from dataset b; rows never mix datasets."""
    nonzero = tokens != 0  # EOD is shared
    from_b = ((tokens >= OFFSET) | ~nonzero).all(1)
    from_a = ((tokens < OFFSET) | ~nonzero).all(1)
    assert bool((from_a ^ from_b).all())
    return from_b.numpy().astype(int)


def test_blend_proportions_in_batches(two_datasets):
    a, b = two_datasets
    loader = build_pretraining_data(["0.7", a, "0.3", b], SEQ, GBS, 0, 1, seed=11)
    per_step = np.array([source_of_rows(next(loader)["tokens"]).sum() for _ in range(80)])
    assert abs(per_step.mean() / GBS - 0.3) < 0.01
    assert np.abs(per_step - 0.3 * GBS).max() <= 2


def test_blend_across_ranks_workers_and_resume(two_datasets):
    a, b = two_datasets
    path = ["0.6", a, "0.4", b]

    def run(dp, workers, steps, state=None):
        ranks = [build_pretraining_data(path, SEQ, GBS, r, dp, seed=2, num_workers=workers) for r in range(dp)]
        if state is not None:
            for it in ranks:
                it.load_state_dict(state)
        return [torch.cat([next(it)["tokens"] for it in ranks]) for _ in range(steps)], ranks

    ref, _ = run(1, 0, 30)
    got, _ = run(4, 1, 30)
    assert all(torch.equal(x, y) for x, y in zip(ref, got))
    _, (it,) = run(1, 0, 12)
    resumed, _ = run(1, 2, 18, state=it.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(ref[12:], resumed))


def test_unweighted_paths_blend_by_size(two_datasets):
    from data.manifest_io import load_manifest

    a, b = two_datasets
    loader = build_pretraining_data([a, b], SEQ, GBS, 0, 1, seed=0)
    ta, tb = load_manifest(a).total_tokens, load_manifest(b).total_tokens
    np.testing.assert_allclose(loader.plan.blend.weights, [ta / (ta + tb), tb / (ta + tb)])


def test_datasets_from_different_tokenizers_do_not_blend(data_synthetic):
    a, _ = data_synthetic("a", num_docs=50)
    b, _ = data_synthetic("b", num_docs=50, tokenizer_sha="1" * 64)
    with pytest.raises(ValueError, match="different tokenizers"):
        build_pretraining_data(["0.5", a, "0.5", b], SEQ, GBS, 0, 1, seed=0)
