"""Deterministic synthetic sequences for tests and smoke runs.

Sequences come from a seeded Markov chain (each token has a preferred successor 80% of the time),
so a model can learn them and the loss really falls. Sequence i depends only on (seed, i) and a
step takes the next `global_batch_size` sequences: every parallel layout and every batch-size ramp
sees the same global stream, each DP rank its contiguous slice of the step's batch. The validation
stream is the same chain from sequence HELD_OUT on. MockData is a data.loader.PretrainingData, as the
shard reader is; data/loader.py builds it for --mock-data.
"""

from __future__ import annotations

import torch

HELD_OUT = 1 << 40  # the validation stream's first sequence: no training run reaches it


class MockData:
    def __init__(self, vocab_size: int, seq_length: int, dp_rank: int, dp_size: int, seed: int, *, eod_id: int,
                 follow_prob: float = 0.8, first_sample: int = 0):
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.eod_id = eod_id  # no tokenizer: the model's EOS id stands for its EOD (masked with --eod-mask-loss)
        self.first_sample = first_sample  # where the stream starts: HELD_OUT for the validation stream
        self.dp_rank, self.dp_size, self.seed, self.follow_prob = dp_rank, dp_size, seed, follow_prob
        self.successor = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.consumed_samples = 0

    def sequences(self, first: int, count: int) -> torch.Tensor:
        s = self.seq_length + 1
        start = torch.empty(count, dtype=torch.long)
        follow = torch.empty(count, s, dtype=torch.bool)
        noise = torch.empty(count, s, dtype=torch.long)
        for row in range(count):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + first + row)
            start[row] = torch.randint(self.vocab_size, (1,), generator=g)
            follow[row] = torch.rand(s, generator=g) < self.follow_prob
            noise[row] = torch.randint(self.vocab_size, (s,), generator=g)
        tokens = torch.empty(count, s, dtype=torch.long)
        tokens[:, 0] = start
        for t in range(1, s):
            tokens[:, t] = torch.where(follow[:, t], self.successor[tokens[:, t - 1]], noise[:, t])
        return tokens

    def next_batch(self, global_batch_size: int) -> dict:
        per_rank = global_batch_size // self.dp_size
        first = self.first_sample + self.consumed_samples + self.dp_rank * per_rank
        self.consumed_samples += global_batch_size
        return {"tokens": self.sequences(first, per_rank)}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])

    def global_state_dict(self, group=None) -> dict:
        return self.state_dict()  # the same on every rank: nothing to gather

    def close(self) -> None:
        pass
