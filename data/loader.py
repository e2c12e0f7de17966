"""What the trainer and the evaluator read batches from: one interface (PretrainingData), two kinds of data
behind it (tokenized shards: data/reader.py; synthetic sequences for --mock-data: data/mock.py), and the
builders that pick one (build_train_data, build_valid_data; build_pretraining_data for shards only).

Imports here stay light (`import data` is on the path of tools that need no torch); the readers are
imported when built.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from data.reader import PretrainingLoader

log = logging.getLogger(__name__)


class PretrainingData(Protocol):
    """A DP rank's share of each global batch, resumable."""

    @property
    def eod_id(self) -> int | None:
        """The id closing every document (the tokenizer's EOD; for mock data the model's EOS id)."""

    def next_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """{"tokens": int64 [global_batch_size // dp_size, seq_length + 1]}: this rank's rows of the next
        global batch, which has `global_batch_size` rows (a RuntimeError if the data disagrees)."""

    def state_dict(self) -> dict:
        """This rank's position (JSON-serializable)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by state_dict() or global_state_dict()."""

    def global_state_dict(self, group=None) -> dict:
        """Every rank's position merged, loadable at any data-parallel size; collective (every rank calls it)."""

    def close(self) -> None:
        """Release workers; reading again restarts them from the current position."""


def _first_eos(eos_token_id: int | list[int] | None) -> int | None:
    return eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id


def build_train_data(*, mock: bool, data_path: list[str] | None, seq_length: int, global_batch_size: int,
                     dp_rank: int, dp_size: int, seed: int, vocab_size: int,
                     eos_token_id: int | list[int] | None = None, tokenizer_dir: str | None = None,
                     num_workers: int = 0, skip_bad_shards: bool = False,
                     rampup_batch_size: list[int] | None = None, allow_pipe: bool = False) -> PretrainingData:
    """The training data: synthetic sequences with `mock` (--mock-data; their EOD is the model's EOS,
    `eos_token_id` as in its config, the first of a list), else the shards of `data_path` (--data-path).
    Checks the manifests, tokenizer and vocabulary first (build_pretraining_data)."""
    if mock:
        from data.mock import MockData

        return MockData(vocab_size, seq_length, dp_rank, dp_size, seed, eod_id=_first_eos(eos_token_id))
    return build_pretraining_data(
        data_path=data_path, seq_length=seq_length, global_batch_size=global_batch_size, dp_rank=dp_rank,
        dp_size=dp_size, seed=seed, vocab_size=vocab_size, tokenizer_dir=tokenizer_dir, num_workers=num_workers,
        skip_bad_shards=skip_bad_shards, rampup_batch_size=rampup_batch_size, allow_pipe=allow_pipe)


def build_valid_data(*, mock: bool, data_path: list[str] | None, seq_length: int, global_batch_size: int,
                     dp_rank: int, dp_size: int, seed: int, vocab_size: int,
                     eos_token_id: int | list[int] | None = None, tokenizer_dir: str | None = None,
                     allow_pipe: bool = False) -> PretrainingData:
    """The validation data, read at the full global batch size (no ramp): with `mock`, the training chain's
    held-out sequences (from data.mock.HELD_OUT on), else the shards of `data_path` (--valid-data-path)."""
    if mock:
        from data.mock import HELD_OUT, MockData

        return MockData(vocab_size, seq_length, dp_rank, dp_size, seed, eod_id=_first_eos(eos_token_id),
                        first_sample=HELD_OUT)
    return build_pretraining_data(
        data_path=data_path, seq_length=seq_length, global_batch_size=global_batch_size, dp_rank=dp_rank,
        dp_size=dp_size, seed=seed, vocab_size=vocab_size, tokenizer_dir=tokenizer_dir, allow_pipe=allow_pipe)


def build_pretraining_data(data_path: list[str], seq_length: int, global_batch_size: int, dp_rank: int,
                           dp_size: int, seed: int, vocab_size: int | None = None, tokenizer_dir: str | None = None,
                           num_workers: int = 0, skip_bad_shards: bool = False, num_streams: int | None = None,
                           rampup_batch_size: list[int] | None = None,
                           allow_pipe: bool = False) -> PretrainingLoader:
    """The trainer's entry point: a PretrainingLoader over the manifests of `data_path` (Megatron syntax).

    Checks before reading anything: the manifests are well formed, all datasets share one tokenizer and EOD
    id, the tokenizer in `tokenizer_dir` (if given) is the one they were made with, and no shard records a
    token id >= vocab_size. Token ids are checked again as chunks are read. Shard locations that would run a
    command (`pipe:`) are refused unless `allow_pipe` (data/locations.py, check_shard_locations).
    """
    from data.blend import parse_data_path
    from data.manifest_io import load_manifest
    from data.reader import PretrainingLoader

    weights, paths = parse_data_path(data_path)
    manifests = [load_manifest(p, allow_pipe=allow_pipe) for p in paths]
    if weights is None:  # unweighted list: proportional to size, as Megatron does
        weights = [float(m.total_tokens) for m in manifests]
    first = manifests[0]
    for m in manifests[1:]:
        if m.tokenizer.get("sha256") != first.tokenizer.get("sha256") or m.eod_id != first.eod_id:
            raise ValueError(f"datasets were made with different tokenizers or EOD ids: {first.location} "
                             f"({first.tokenizer.get('name')}, eod {first.eod_id}) vs {m.location} "
                             f"({m.tokenizer.get('name')}, eod {m.eod_id})")
    if tokenizer_dir is not None:
        from data.tokenizer import tokenizer_identity

        ident = tokenizer_identity(tokenizer_dir)
        if ident["sha256"] != first.tokenizer.get("sha256"):
            raise ValueError(f"--tokenizer {tokenizer_dir} (sha256 {ident['sha256'][:12]}) is not the tokenizer "
                             f"{first.location} was made with ({first.tokenizer.get('name')}, sha256 "
                             f"{str(first.tokenizer.get('sha256'))[:12]})")
    if vocab_size is not None:
        for m in manifests:
            bad = [i for i, s in enumerate(m.shards) if s.max_token_id >= vocab_size]
            if bad:
                s = m.shards[bad[0]]
                tokenizer_size = m.tokenizer.get("vocab_size") or s.max_token_id + 1
                raise ValueError(f"{m.shard_url(bad[0])}: token id {s.max_token_id} >= vocab_size {vocab_size} "
                                 f"of the model ({len(bad)} shard(s) of {m.location} have such ids): the data's "
                                 f"tokenizer ({m.tokenizer.get('name')}) has {tokenizer_size} tokens; add --vocab-size "
                                 f"{max(tokenizer_size, s.max_token_id + 1)}")
    log.info("data: %s", ", ".join(f"{w:.3g} x {m.location} ({m.total_tokens:,} tokens, {len(m.shards)} shards)"
                                   for w, m in zip(weights, manifests)))
    return PretrainingLoader(manifests, weights, seq_length=seq_length, global_batch_size=global_batch_size,
                             dp_rank=dp_rank, dp_size=dp_size, seed=seed, num_streams=num_streams,
                             num_workers=num_workers, vocab_size=vocab_size, skip_bad_shards=skip_bad_shards,
                             rampup_batch_size=rampup_batch_size)
