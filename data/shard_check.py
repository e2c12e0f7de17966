"""Start-up check of the data a run is given: every shard its manifests list (training and validation) exists
with the size the manifest records, before iteration 1 (a missing shard would otherwise surface when the
reader reaches it: days into a run at 28.5T tokens).

One `stat` per shard, spread over the ranks (rank r takes shards r, r + world, ... of the concatenated
lists), then one gather of what each rank found. Remote shards (URLs) are not checked here: the reader's
errors name them. The contents are checked as they are read, and in full by
`tools/inspect_shards.py --verify`.
"""

from __future__ import annotations

import os

from data.locations import is_remote
from data.schema import Manifest

SHOWN = 5  # problems named in the error; the count says how many more


def _problem(url: str, recorded: int) -> str | None:
    try:
        size = os.stat(url).st_size
    except FileNotFoundError:
        return f"{url} is missing"
    except OSError as e:
        return f"{url} cannot be read ({e.strerror or e})"
    if size != recorded:
        return f"{url} has {size} bytes, the manifest records {recorded}"
    return None


def local_problems(manifests: list[Manifest], rank: int = 0, world: int = 1) -> tuple[int, list[str]]:
    """(number of problems, the first SHOWN of them) among this rank's share of the listed shards."""
    count, shown, position = 0, [], 0
    for m in manifests:
        if is_remote(m.location):
            position += len(m.shards)
            continue
        n = len(m.shards)
        first = (rank - position) % world  # this rank's first index in this manifest
        for i in range(first, n, world):
            found = _problem(m.shard_url(i), m.shards[i].bytes)
            if found:
                count += 1
                if len(shown) < SHOWN:
                    shown.append(found)
        position += n
    return count, shown


def summarize(results: list[tuple[int, list[str]]], total: int) -> str | None:
    """Every rank's (count, shown) -> one message naming the first few (None: all present)."""
    count = sum(c for c, _ in results)
    if not count:
        return None
    named = sorted(p for _, shown in results for p in shown)[:SHOWN]
    more = f" (and {count - len(named)} more)" if count > len(named) else ""
    return f"{count} of the {total} shards the manifests list are missing or not the recorded size: " + \
        "; ".join(named) + more


def check_listed_shards(manifests: list[Manifest], rank: int, world: int, gather) -> str | None:
    """The problems of every shard `manifests` list, found by all ranks together: `gather(obj)` returns every
    rank's obj (a collective, e.g. all_gather_object)."""
    return summarize(gather(local_problems(manifests, rank, world)), sum(len(m.shards) for m in manifests))
