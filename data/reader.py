"""The packed, resumable, rank-split reader (the design is in docs/DATA.md, "Reading").

Global batch row j of step t comes from logical stream j // (B_t / num_streams), B_t being the step's global
batch size: fixed, or growing by Megatron-LM's --rampup-batch-size rule (data/batch_ramp.py). By default
num_streams == global_batch_size, one stream per row; under a ramp, the largest number dividing every
batch size of it (so a stream gives 1, 2, ... rows per step as the batch grows). Each stream has, per dataset, a SubStream
that walks its own share of that dataset's shards (items stream, stream + S, stream + 2S, ... of the
infinite sequence perm(epoch 0) ++ perm(epoch 1) ++ ..., each perm seeded by (seed, dataset, epoch)),
shuffles the documents of each chunk (seeded by (seed, dataset, epoch, shard, chunk)), and cuts the
resulting token stream into seq_length + 1 windows that overlap by one token, as Megatron's GPTDataset does.

So the global batch sequence depends only on (datasets, weights, seed, seq_length, global_batch_size,
ramp, num_streams); a DP rank reads only the streams of its rows, and dataloader workers split those streams. A
stream's position is three integers per dataset (shard item, chunk, token offset): the checkpoint state is
O(streams), whatever the number of shards, and resuming re-opens one shard per stream and seeks to its chunk.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.batch_ramp import BatchRamp
from data.blend import BlendSchedule
from data.chunks import iter_chunks
from data.errors import ShardError
from data.schema import Manifest

log = logging.getLogger(__name__)
STATE_FORMAT = "glm5-data-state"
STATE_VERSION = 1
_SHARD_TAG, _DOC_TAG = 0x5A4D, 0xD0C5


class ShardOrder:
    """Item g of a dataset's infinite shard sequence -> (epoch, shard index)."""

    def __init__(self, num_shards: int, seed: int, dataset: int):
        self.num_shards, self.seed, self.dataset = num_shards, seed, dataset
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, item: int) -> tuple[int, int]:
        epoch, pos = divmod(item, self.num_shards)
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.dataset, epoch, _SHARD_TAG]))
            perm = rng.permutation(self.num_shards)
            if len(self._perms) >= 4:  # a small cache: a permutation is recomputed in ~1 ms at 100k shards
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return epoch, int(perm[pos])


class SubStream:
    """One stream's documents of one dataset, packed into windows; position = (item, chunk, offset)."""

    def __init__(self, manifest: Manifest, order: ShardOrder, stream: int, num_streams: int,
                 state=(0, 0, 0), vocab_size: int | None = None, skip_bad_shards: bool = False,
                 skipped: list | None = None):
        self.manifest, self.order, self.stream, self.num_streams = manifest, order, stream, num_streams
        self.item, self.chunk, self.pos = (int(x) for x in state)  # item = shards this stream has finished
        self.vocab_size, self.skip_bad_shards = vocab_size, skip_bad_shards
        self.skipped = skipped if skipped is not None else []
        self._chunks = None  # iterator over the current shard's chunks
        self._read_buffers: dict = {}  # for streamed (remote) shards; local ones are memory-mapped
        self._buf = np.empty(0, manifest.np_dtype)  # reused: fresh 4 MiB arrays per chunk cost page faults
        self._tok: np.ndarray | None = None  # the loaded chunk, documents shuffled (a view of _buf)
        self._bad_in_a_row = 0

    def state(self) -> list[int]:
        return [self.item, self.chunk, self.pos]

    def _load(self) -> None:
        """Load the chunk at the current position, or the next one if the current one is used up."""
        resume = self._tok is None
        if not resume:
            self.chunk, self.pos = self.chunk + 1, 0
        while True:
            epoch, shard = self.order(self.stream + self.item * self.num_streams)
            url = self.manifest.shard_url(shard)
            try:
                if self._chunks is None:
                    self._chunks = iter_chunks(url, self.manifest.shards[shard], self.manifest, start_chunk=self.chunk,
                                               vocab_size=self.vocab_size, buffers=self._read_buffers)
                chunk, tok, lens = next(self._chunks)
                break
            except StopIteration:
                pass
            except ShardError as e:
                if not self.skip_bad_shards:
                    raise
                self._skip(e)
            self._chunks, self.item, self.chunk, self.pos = None, self.item + 1, 0, 0
        self._bad_in_a_row = 0
        if chunk != self.chunk:
            raise ShardError(f"{url}: expected chunk {self.chunk} when resuming, found {chunk} "
                             "(the data changed since the checkpoint?)")
        self._shuffle(tok, lens, epoch, shard, chunk)
        if self.pos > self._tok.size:
            raise ShardError(f"{url}: resume offset {self.pos} is past the {self._tok.size} tokens of chunk {chunk}")

    def _skip(self, error: ShardError) -> None:
        self._bad_in_a_row += 1
        log.warning("skipping bad shard (--skip-bad-shards): %s", error)
        self.skipped.append(str(error))
        if self._bad_in_a_row > len(self.manifest.shards):
            raise ShardError(f"{self.manifest.location}: every shard is bad; last error: {error}")

    def _shuffle(self, tok: np.ndarray, lens: np.ndarray, epoch: int, shard: int, chunk: int) -> None:
        """Copy the chunk into _buf with its documents in a seeded order."""
        if self._buf.size < tok.size:
            self._buf = np.empty(tok.size + tok.size // 8, tok.dtype)  # chunks vary a little in size
        out = self._tok = self._buf[:tok.size]
        if lens.size == 1:
            out[:] = tok
            return
        seed = [self.order.seed, self.order.dataset, epoch, shard, chunk, _DOC_TAG]
        perm = np.random.Generator(np.random.PCG64(seed)).permutation(lens.size)
        ends = np.cumsum(lens, dtype=np.int64)
        starts, stops = (ends - lens)[perm].tolist(), ends[perm].tolist()
        np.concatenate([tok[a:b] for a, b in zip(starts, stops)], out=out)  # slices: cheaper than a gather

    def take(self, out: np.ndarray) -> None:
        """Fill one window (len(out) tokens); the next window starts at its last token."""
        size, filled = out.shape[0], 0
        while True:
            if self._tok is None or self.pos >= self._tok.size:
                self._load()
            n = min(size - filled, self._tok.size - self.pos)
            out[filled:filled + n] = self._tok[self.pos:self.pos + n]
            filled += n
            if filled == size:
                self.pos += n - 1
                return
            self.pos += n


class _Plan:
    """Everything a worker needs to produce its rows; picklable (sent to dataloader workers)."""

    def __init__(self, manifests: list[Manifest], weights: list[float], seq_length: int, global_batch_size: int,
                 num_streams: int, seed: int, vocab_size: int | None, skip_bad_shards: bool,
                 ramp: BatchRamp | None = None):
        self.manifests, self.seq_length, self.global_batch_size = manifests, seq_length, global_batch_size
        self.num_streams, self.seed, self.ramp = num_streams, seed, ramp
        self.vocab_size, self.skip_bad_shards = vocab_size, skip_bad_shards
        self.blend = BlendSchedule(weights, seed)

    def batch_size(self, step: int) -> int:
        return self.ramp.size(step) if self.ramp else self.global_batch_size

    def first_sample(self, step: int) -> int:
        """Global index of the step's first row: the blend's choice is keyed by it."""
        return self.ramp.consumed_before(step) if self.ramp else step * self.global_batch_size


class _StreamSet(IterableDataset):
    """Yields, for consecutive steps, the rows of this process's (or dataloader worker's) streams."""

    def __init__(self, plan: _Plan, worker_streams: list[list[int]], step: int, states: dict[int, list]):
        self.plan, self.worker_streams, self.step, self.states = plan, worker_streams, step, states

    def __iter__(self):
        info = get_worker_info()
        streams = self.worker_streams[info.id if info is not None else 0]
        p = self.plan
        skipped: list[str] = []
        orders = [ShardOrder(len(m.shards), p.seed, d) for d, m in enumerate(p.manifests)]
        subs = {s: [SubStream(m, orders[d], s, p.num_streams, self.states[s][d], p.vocab_size, p.skip_bad_shards,
                              skipped) for d, m in enumerate(p.manifests)] for s in streams}
        step, width, rows_per_stream = self.step, p.seq_length + 1, None
        while True:
            if p.batch_size(step) // p.num_streams != rows_per_stream:  # every step, or as the batch ramps
                rows_per_stream = p.batch_size(step) // p.num_streams
                rows = np.array([s * rows_per_stream + i for s in streams for i in range(rows_per_stream)], np.int64)
                row_subs = [subs[row // rows_per_stream] for row in rows.tolist()]
            choice = p.blend.choose(p.first_sample(step) + rows).tolist()
            tokens = np.empty((len(rows), width), np.int64)
            for i, d in enumerate(choice):
                row_subs[i][d].take(tokens[i])
            yield {"step": step, "tokens": torch.from_numpy(tokens),
                   "state": {s: [sub.state() for sub in subs[s]] for s in streams}, "skipped": skipped[:]}
            skipped.clear()
            step += 1


def _identity(x):
    return x


class PretrainingLoader:
    """Iterator of this DP rank's part of each global batch:
    {"tokens": int64 [global_batch_size // dp_size, seq_length + 1]} (documents end in eod_id).
    state_dict()/load_state_dict() save and restore the exact position (see merge_state_dicts to change dp_size).
    """

    def __init__(self, manifests: list[Manifest], weights: list[float], *, seq_length: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, num_streams: int | None = None, num_workers: int = 0,
                 vocab_size: int | None = None, skip_bad_shards: bool = False,
                 rampup_batch_size: list[int] | None = None):
        ramp = BatchRamp(*rampup_batch_size, global_batch_size) if rampup_batch_size else None
        if num_streams is None:  # one stream per row, or per row of the ramp's common divisor
            num_streams = math.gcd(ramp.start, ramp.increment, global_batch_size) if ramp else global_batch_size
        if ramp and (ramp.start % num_streams or ramp.increment % num_streams):
            raise ValueError(f"num_streams {num_streams} must divide the batch ramp's start {ramp.start} and "
                             f"increment {ramp.increment}")
        if seq_length <= 0 or global_batch_size <= 0:
            raise ValueError(f"seq_length ({seq_length}) and global_batch_size ({global_batch_size}) must be positive")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size {global_batch_size} must be divisible by dp_size {dp_size}, "
                             f"and 0 <= dp_rank ({dp_rank}) < dp_size")
        if num_streams <= 0 or global_batch_size % num_streams or num_streams % dp_size:
            raise ValueError(f"num_streams {num_streams} must divide global_batch_size {global_batch_size} and be "
                             f"divisible by dp_size {dp_size} (the default, num_streams = global_batch_size, is)")
        if seed < 0 or num_workers < 0:
            raise ValueError(f"seed ({seed}) and num_workers ({num_workers}) must be >= 0")
        if len(manifests) != len(weights):
            raise ValueError(f"{len(manifests)} datasets but {len(weights)} weights")
        self.plan = _Plan(manifests, weights, seq_length, global_batch_size, num_streams, seed, vocab_size,
                          skip_bad_shards, ramp)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        per_rank = num_streams // dp_size
        self.streams = list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))
        if num_workers > len(self.streams):
            log.warning("num_workers %d > the %d streams of this rank: using %d workers", num_workers,
                        len(self.streams), len(self.streams))
            num_workers = len(self.streams)
        self.num_workers = num_workers
        self._worker_streams = [b.tolist() for b in np.array_split(np.array(self.streams), max(1, num_workers))]
        self._step = 0
        self._states = {s: [[0, 0, 0] for _ in manifests] for s in self.streams}
        self._iter = None
        self.skipped_shards: list[str] = []

    @property
    def eod_id(self) -> int:
        return self.plan.manifests[0].eod_id

    @property
    def manifests(self) -> list[Manifest]:
        return self.plan.manifests

    def __iter__(self):
        return self

    def _start(self):
        dataset = _StreamSet(self.plan, self._worker_streams, self._step, self._states)
        if self.num_workers == 0:
            return iter(dataset)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity))

    def next_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        """The next batch (data.loader.PretrainingData), checked against the caller's batch schedule: the
        reader follows the ramp by its own step count, the trainer by megatron-core's consumed samples."""
        batch = next(self)
        if batch["tokens"].shape[0] * self.dp_size != global_batch_size:
            raise RuntimeError(f"data reader gave {batch['tokens'].shape[0]} rows per rank, megatron's batch "
                               f"schedule expects {global_batch_size} / {self.dp_size}")
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        parts = [next(self._iter) for _ in self._worker_streams]  # workers answer in turn, in order
        for part in parts:
            if part["step"] != self._step:
                raise RuntimeError(f"data worker returned step {part['step']} while step {self._step} was expected")
            self._states.update(part["state"])
            if part["skipped"]:
                self.skipped_shards.extend(part["skipped"])
                log.warning("skipped %d bad shard(s) so far on dp rank %d", len(self.skipped_shards), self.dp_rank)
        self._step += 1
        if len(parts) == 1:
            return {"tokens": parts[0]["tokens"]}
        return {"tokens": torch.cat([p["tokens"] for p in parts])}

    # --- checkpointing -----------------------------------------------------------------------------
    def _header(self) -> dict:
        p = self.plan
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "seed": p.seed, "seq_length": p.seq_length,
                "global_batch_size": p.global_batch_size, "num_streams": p.num_streams,
                "rampup_batch_size": [p.ramp.start, p.ramp.increment, p.ramp.ramp_samples] if p.ramp else None,
                "datasets": [{"shards": len(m.shards), "tokens": m.total_tokens, "weight": float(w)}
                             for m, w in zip(p.manifests, p.blend.weights)]}

    def state_dict(self) -> dict:
        """JSON-serializable; O(streams of this rank x datasets), never per shard."""
        return {**self._header(), "step": self._step,
                "streams": {str(s): [list(x) for x in self._states[s]] for s in self.streams}}

    def global_state_dict(self, group=None) -> dict:
        """The merged state of every rank in `group` (default: the world); collective, every rank must call it.
        Loadable by any rank of any dp_size: what a checkpoint should store once, e.g. in rank 0's run state."""
        import torch.distributed as dist

        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        return merge_state_dicts(states)

    def load_state_dict(self, state: dict) -> None:
        header = self._header()
        for key, value in header.items():
            if state.get(key) != value:
                raise ValueError(f"data state does not match this run: {key} is {state.get(key)!r} in the "
                                 f"checkpoint but {value!r} now")
        missing = [s for s in self.streams if str(s) not in state["streams"]]
        if missing:
            raise ValueError(f"data state lacks streams {missing[:8]}{'...' if len(missing) > 8 else ''} needed by "
                             f"dp rank {self.dp_rank}/{self.dp_size}; when dp_size changed, load "
                             "data.reader.merge_state_dicts(<the states of all old ranks>)")
        self.close()
        self._step = int(state["step"])
        self._states = {s: [list(map(int, x)) for x in state["streams"][str(s)]] for s in self.streams}

    def close(self) -> None:
        """Stop the dataloader workers (the next next() restarts from the current position)."""
        self._iter = None


def merge_state_dicts(states: list[dict]) -> dict:
    """Union of the data states of all DP ranks, loadable by any rank of any dp_size (same global batch)."""
    if not states:
        raise ValueError("merge_state_dicts needs at least one state")
    merged = {**states[0], "streams": {}}
    for st in states:
        for key in merged:
            if key != "streams" and st.get(key) != merged[key]:
                raise ValueError(f"data states disagree on {key}: {st.get(key)!r} vs {merged[key]!r}")
        merged["streams"].update(st["streams"])
    return merged
