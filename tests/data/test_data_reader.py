"""The packed reader: determinism, packing and boundaries, rank x worker splitting, epochs, exact resume."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from data import build_pretraining_data
from data.manifest_io import load_manifest
from data.reader import merge_state_dicts
from tests.conftest import DOC_ID_BASE

SEQ, GBS = 64, 8


def loader(path, dp_rank=0, dp_size=1, seed=1234, **kw):
    data_path = path if isinstance(path, list) else [path]
    return build_pretraining_data(data_path, SEQ, kw.pop("global_batch_size", GBS), dp_rank, dp_size, seed, **kw)


def global_batches(path, steps, dp_size=1, num_workers=0, **kw):
    """The global batches of `steps` steps: per-rank batches concatenated in rank order."""
    ranks = [loader(path, r, dp_size, num_workers=num_workers, **kw) for r in range(dp_size)]
    out = []
    for _ in range(steps):
        parts = [next(r) for r in ranks]
        out.append({"tokens": torch.cat([p["tokens"] for p in parts])})
    return out


def stream_sequence(batches, row):
    """The token stream of one row across steps (windows overlap by one token)."""
    rows = [b["tokens"][row].numpy() for b in batches]
    return np.concatenate([rows[0]] + [r[1:] for r in rows[1:]])


def complete_docs(seq, eod=0):
    """Split a stream at EOD; the trailing partial document is dropped."""
    ends = np.flatnonzero(seq == eod)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [seq[a:b + 1] for a, b in zip(starts, ends)]


def test_batch_shape_and_same_order_from_same_seed(data_synthetic):
    path, _ = data_synthetic()
    a, b = global_batches(path, 5), global_batches(path, 5)
    assert a[0]["tokens"].shape == (GBS, SEQ + 1) and a[0]["tokens"].dtype == torch.int64
    assert set(a[0]) == {"tokens"}  # no per-token document ids: nothing uses them
    for x, y in zip(a, b):
        assert torch.equal(x["tokens"], y["tokens"])
    c = global_batches(path, 5, seed=99)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_windows_overlap_by_one_and_documents_start_after_eod(data_synthetic):
    path, _ = data_synthetic()
    batches = global_batches(path, 20)
    for prev, cur in zip(batches, batches[1:]):
        assert torch.equal(prev["tokens"][:, -1], cur["tokens"][:, 0])
    for b in batches:
        tokens = b["tokens"]
        # a synthetic document's first token (>= DOC_ID_BASE) follows each EOD, and nothing else does
        starts = tokens[:, 1:] >= DOC_ID_BASE
        assert torch.equal(starts, tokens[:, :-1] == 0)


def test_every_document_arrives_whole_and_once_per_epoch(data_synthetic):
    path, docs = data_synthetic(num_docs=300, max_len=60, shard_size=4 << 10, chunk_tokens=512)
    manifest = load_manifest(path)
    n_shards = len(manifest.shards)
    assert n_shards > GBS  # some streams read two shards in epoch 0
    steps = 3 * manifest.total_tokens // (GBS * SEQ) + 10
    batches = global_batches(path, steps)
    by_id = {int(d[0]): d for d in docs}
    shard_of = {}  # doc id -> shard index, read back in manifest order
    from data.chunks import iter_documents

    shard_docs, i = [[] for _ in manifest.shards], 0
    for s, info in enumerate(manifest.shards):
        for _ in range(info.docs):
            shard_docs[s].append(i)
            shard_of[int(docs[i][0])] = s
            i += 1
    assert i == len(list(iter_documents(manifest)))
    visits = {}  # stream -> shards in the order it read them
    shuffled = False
    for row in range(GBS):
        got = complete_docs(stream_sequence(batches, row))
        for d in got:  # every token of every document exactly as written
            np.testing.assert_array_equal(d[:-1], by_id[int(d[0])])
        order, k = [], 0
        while k < len(got):  # consecutive documents group into whole shards
            shard = shard_of[int(got[k][0])]
            members = {int(d[0]) for d in got[k:k + len(shard_docs[shard])]}
            if len(members) < len(shard_docs[shard]):
                break  # this stream's last, partly read shard
            assert members == {int(docs[j][0]) for j in shard_docs[shard]}
            shuffled |= [int(d[0]) for d in got[k:k + len(members)]] != sorted(members)
            order.append(shard)
            k += len(members)
        visits[row] = order
    assert shuffled, "documents should be shuffled within their chunk"
    # items row, row + S, row + 2S, ... of the shard sequence; epoch 0 = items < n_shards: each shard once
    epoch0 = [v for row, order in visits.items() for k, v in enumerate(order) if row + k * GBS < n_shards]
    assert sorted(epoch0) == list(range(n_shards))
    epoch1 = {row + k * GBS - n_shards: v for row, order in visits.items() for k, v in enumerate(order)
              if n_shards <= row + k * GBS < 2 * n_shards}
    assert len(epoch1) > n_shards // 2 and len(set(epoch1.values())) == len(epoch1)
    epoch0_by_item = {row + k * GBS: v for row, order in visits.items() for k, v in enumerate(order)
                      if row + k * GBS < n_shards}
    assert any(epoch0_by_item[i] != v for i, v in epoch1.items()), "epoch 1 should use a new shard order"


@pytest.mark.parametrize("dp_size,num_workers", [(2, 0), (4, 0), (8, 0), (1, 3), (2, 2)])
def test_global_batch_independent_of_ranks_and_workers(data_synthetic, dp_size, num_workers):
    path, _ = data_synthetic()
    ref = global_batches(path, 25)
    got = global_batches(path, 25, dp_size=dp_size, num_workers=num_workers)
    for x, y in zip(ref, got):
        assert torch.equal(x["tokens"], y["tokens"])


def test_each_rank_reads_only_its_own_shards(data_synthetic, monkeypatch):
    path, _ = data_synthetic(num_docs=800)
    import data.reader as reader

    opened, real = {}, reader.iter_chunks

    def spy(url, *args, **kw):
        opened.setdefault(spy.rank, set()).add(url)
        return real(url, *args, **kw)

    monkeypatch.setattr(reader, "iter_chunks", spy)
    for rank in range(4):
        spy.rank = rank
        it = loader(path, rank, 4)
        for _ in range(30):
            next(it)
    sets = list(opened.values())
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert sum(map(len, sets)) == len(set().union(*sets))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_identical_batches(data_synthetic, num_workers):
    path, _ = data_synthetic()
    ref = loader(path, num_workers=num_workers)
    for _ in range(13):
        next(ref)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    expected = [next(ref) for _ in range(40)]  # crosses shard and epoch boundaries
    resumed = loader(path, num_workers=num_workers)
    resumed.load_state_dict(state)
    for x in expected:
        y = next(resumed)
        assert torch.equal(x["tokens"], y["tokens"])


def test_resume_with_a_different_dp_size_via_merged_states(data_synthetic):
    path, _ = data_synthetic()
    old = [loader(path, r, 2) for r in range(2)]
    for _ in range(17):
        for it in old:
            next(it)
    merged = merge_state_dicts([it.state_dict() for it in old])
    expected = [torch.cat([next(it)["tokens"] for it in old]) for _ in range(10)]
    new = [loader(path, r, 4) for r in range(4)]
    for it in new:
        with pytest.raises(ValueError, match="merge_state_dicts"):
            it.load_state_dict(old[0].state_dict() if it.dp_rank >= 2 else old[1].state_dict())
        it.load_state_dict(merged)
    for x in expected:
        assert torch.equal(x, torch.cat([next(it)["tokens"] for it in new]))


def test_state_is_small_and_checked(data_synthetic):
    path, _ = data_synthetic(num_docs=2000, shard_size=2 << 10)
    assert len(load_manifest(path).shards) > 100
    it = loader(path)
    for _ in range(50):
        next(it)
    state = it.state_dict()
    assert len(json.dumps(state)) < 2000  # O(streams), not O(shards)
    other = loader(path, seed=7)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        loader(path, global_batch_size=16).load_state_dict(state)


def test_bad_layouts_are_rejected(data_synthetic):
    path, _ = data_synthetic(num_docs=50)
    with pytest.raises(ValueError, match="divisible by dp_size"):
        loader(path, 0, 3)
    with pytest.raises(ValueError, match="num_streams"):
        loader(path, 0, 4, num_streams=2)
    with pytest.raises(ValueError, match="num_streams"):
        loader(path, num_streams=3)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http(s) with curl")
def test_manifest_and_shards_over_http_match_local(data_synthetic):
    path, _ = data_synthetic(num_docs=200)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        assert load_manifest(url).shard_url(0).startswith("http://127.0.0.1")
        remote, local = global_batches(url, 12), global_batches(path, 12)
        assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(remote, local))
    finally:
        server.shutdown()


def _gather_worker(rank, path, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    it = loader(path, rank, 2)
    for _ in range(9):
        next(it)
    merged = it.global_state_dict()
    with open(f"{out_dir}/state{rank}.json", "w") as f:
        json.dump(merged, f)
    dist.destroy_process_group()


@pytest.mark.integration
def test_global_state_dict_gathers_every_rank(data_synthetic, tmp_path):
    path, _ = data_synthetic()
    torch.multiprocessing.spawn(_gather_worker, args=(path, str(tmp_path)), nprocs=2)
    merged = [json.loads((tmp_path / f"state{r}.json").read_text()) for r in range(2)]
    assert merged[0] == merged[1] and sorted(map(int, merged[0]["streams"])) == list(range(GBS))
    ref = loader(path)
    for _ in range(9):
        next(ref)
    assert merged[0] == ref.state_dict()


def test_batch_ramp_is_megatrons_schedule():
    """BatchRamp and the calculator the trainer steps (megatron-core's step schedule made by
    data/batch_ramp.step_schedule, initialised as pretrain/trainer.py does) both follow Megatron-LM's rule."""
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        get_current_global_batch_size,
        init_num_microbatches_calculator,
        update_num_microbatches,
    )

    from data.batch_ramp import BatchRamp, step_schedule
    from tests.helpers import megatron_lm_ramp

    for start, inc, samples, gbs in [(4, 2, 12, 8), (3072, 1536, 114501953, 15360), (16, 16, 1000, 256),
                                     (2, 2, 3, 12)]:  # fewer samples than increments: steps share thresholds
        ramp = BatchRamp(start, inc, samples, gbs)
        init_num_microbatches_calculator(0, global_batch_size=gbs, micro_batch_size=1, data_parallel_size=1,
                                         step_batch_size_schedule=step_schedule(start, inc, samples, gbs))
        try:
            consumed = 0
            for step in range(200_000):
                update_num_microbatches(consumed, consistency_check=False)
                want = megatron_lm_ramp(consumed, start, inc, samples, gbs)
                assert ramp.consumed_before(step) == consumed and ramp.size(step) == want
                assert get_current_global_batch_size() == want
                consumed += want
                if want == gbs and step > 3:
                    break
            assert ramp.size(step) == gbs
        finally:
            destroy_num_microbatches_calculator()


def test_ramp_is_ignored_without_a_step_schedule():
    """0.19.2's init_num_microbatches_calculator drops rampup_batch_size silently (the trainer passes the
    ramp as a step schedule, tests/data/test_data_reader.py::test_batch_ramp_is_megatrons_schedule)."""
    from megatron.core import num_microbatches_calculator as nmc

    nmc.init_num_microbatches_calculator(0, [4, 4, 64], 16, 1, 1)
    try:
        assert nmc.get_current_global_batch_size() == 16
    finally:
        nmc.destroy_num_microbatches_calculator()


def test_ramped_batches_are_rank_independent_and_resume_exactly(data_synthetic):
    path, _ = data_synthetic()
    ramp = dict(rampup_batch_size=[4, 2, 12], global_batch_size=8)
    ref = global_batches(path, 8, **ramp)
    assert [b["tokens"].shape[0] for b in ref] == [4, 4, 6, 8, 8, 8, 8, 8]
    got = global_batches(path, 8, dp_size=2, num_workers=0, **ramp)
    for x, y in zip(ref, got):
        assert torch.equal(x["tokens"], y["tokens"])
    # rows continue their streams' documents as the batch grows (no window read twice)
    seen = [tuple(r) for b in ref for r in b["tokens"].tolist()]
    assert len(seen) == len(set(seen))

    it = loader(path, **ramp)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    resumed = loader(path, **ramp)
    resumed.load_state_dict(state)
    for x in ref[3:]:
        assert torch.equal(x["tokens"], next(resumed)["tokens"])
    with pytest.raises(ValueError, match="does not match this run"):
        loader(path, global_batch_size=8).load_state_dict(state)  # resumed without the ramp
