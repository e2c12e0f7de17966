"""Data pipeline: tokenized tar shards + manifest (format.py, writer.py), the packed resumable reader
(reader.py), blending (blend.py) and tokenizer handling (tokenizer.py). The format is docs/DATA.md."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

__all__ = ["build_pretraining_data"]


def build_pretraining_data(data_path: list[str], seq_length: int, global_batch_size: int, dp_rank: int,
                           dp_size: int, seed: int, vocab_size: int | None = None, tokenizer_dir: str | None = None,
                           num_workers: int = 0, skip_bad_shards: bool = False, num_streams: int | None = None,
                           rampup_batch_size: list[int] | None = None, allow_pipe: bool = False):
    """The trainer's entry point: a PretrainingLoader over the manifests of `data_path` (Megatron syntax).

    Checks before reading anything: the manifests are well formed, all datasets share one tokenizer and EOD
    id, the tokenizer in `tokenizer_dir` (if given) is the one they were made with, and no shard records a
    token id >= vocab_size. Token ids are checked again as chunks are read. Shard locations that would run a
    command (`pipe:`) are refused unless `allow_pipe` (data/format.py, check_shard_locations).
    """
    from data.blend import parse_data_path
    from data.format import load_manifest
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
