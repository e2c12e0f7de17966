"""Deterministic synthetic batches for tests and smoke runs.

Sequences come from a seeded Markov chain (each token has a preferred successor 80% of the time),
so a model can learn them and the loss really falls. Global batch i depends only on (seed, i):
every parallel layout sees the same global batch, each DP rank its contiguous slice of it.
"""

from __future__ import annotations

import torch


class MockData:
    def __init__(self, vocab_size: int, seq_length: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, follow_prob: float = 0.8):
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size
        self.seed, self.follow_prob = seed, follow_prob
        self.successor = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.step = 0

    def global_batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n, s = self.global_batch_size, self.seq_length + 1
        tokens = torch.empty(n, s, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (n,), generator=g)
        follow = torch.rand(n, s, generator=g) < self.follow_prob
        noise = torch.randint(self.vocab_size, (n, s), generator=g)
        for t in range(1, s):
            tokens[:, t] = torch.where(follow[:, t], self.successor[tokens[:, t - 1]], noise[:, t])
        return tokens

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        per_rank = self.global_batch_size // self.dp_size
        tokens = self.global_batch(self.step)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        self.step += 1
        return {"tokens": tokens}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
