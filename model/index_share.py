"""IndexShare ("IndexCache", GLM-5.1/5.2): layers that reuse the nearest preceding full layer's DSA top-k.

transformers 5.25 (`GlmMoeDsaConfig.indexer_types`) is the reference: a list of "full"/"shared" per
decoder layer (0-based), derived when absent from `index_topk_pattern` ("FSSF...") or from
`index_topk_freq` (default 1) and `index_skip_topk_offset` (default 2): layer i is full when
max(i - offset + 1, 0) % freq == 0. A shared layer builds no indexer and attends to the top-k of the
nearest full layer before it; layer 0 must be full (transformers raises at its forward otherwise).

megatron-core 0.19.2's `DSAttention` (`dsa_indexer_topk_freq`, `dsa_indexer_skip_topk_offset`)
counts layers from 1 and raises the offset to at least 1: the same schedule as transformers for an
offset >= 1, a different one at offset 0. `megatron_core_schedule` finds the (freq, offset) that gives
exactly a list, or None: an arbitrary list is not such a schedule.

The MTP layer always runs its own indexer: transformers builds no MTP layer (its list covers the
decoder layers only) and megatron-core numbers the MTP layer 1, a computing layer.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SHARED = "full", "shared"


@dataclass(frozen=True)
class ShareRole:
    """What one decoder layer's core attention does in IndexShare (a layer with no role: full, and no
    layer shares from it)."""

    source: int | None = None  # shared: the layer number of the full layer whose top-k it reads
    last: bool = False  # shared: the group's last sharer, which drops the source's top-k once read
    publishes: bool = False  # full: the next layer shares its top-k


def from_schedule(num_layers: int, freq: int, offset: int) -> list[str]:
    """transformers' derivation from `index_topk_freq` / `index_skip_topk_offset` (layers from 0)."""
    freq = max(int(freq), 1)
    return [FULL if max(i - offset + 1, 0) % freq == 0 else SHARED for i in range(num_layers)]


def from_pattern(pattern) -> list[str]:
    """transformers' reading of `index_topk_pattern`: "FSSF..." or a list of types."""
    if isinstance(pattern, str):
        bad = sorted(set(pattern) - {"F", "S"})
        if bad:
            raise ValueError(f"GLM5Config: index_topk_pattern={pattern!r}: only 'F' (full) and 'S' (shared), not {bad}")
        return [FULL if c == "F" else SHARED for c in pattern]
    return list(pattern)


def hf_indexer_types(d: dict, num_layers: int) -> list[str]:
    """The per-layer types an HF config.json means, read as transformers reads it (checked, the
    error naming the field it came from)."""
    if d.get("indexer_types") is not None:
        types, spelled = list(d["indexer_types"]), "indexer_types"
    elif d.get("index_topk_pattern") is not None:
        types, spelled = from_pattern(d["index_topk_pattern"]), f"index_topk_pattern={d['index_topk_pattern']!r}"
    else:
        freq, offset = d.get("index_topk_freq", 1), d.get("index_skip_topk_offset", 2)
        types = from_schedule(num_layers, freq, offset)
        spelled = f"index_topk_freq={freq}, index_skip_topk_offset={offset}"
    check(types, num_layers, spelled)
    return types


def check(types, num_layers: int, spelled: str = "indexer_types") -> None:
    """A ValueError naming the field for a list transformers would refuse or misread."""
    if len(types) != num_layers:
        raise ValueError(f"GLM5Config: {spelled}: {len(types)} layer types for num_hidden_layers={num_layers}")
    bad = [(i, t) for i, t in enumerate(types) if t not in (FULL, SHARED)]
    if bad:
        raise ValueError(f"GLM5Config: {spelled}: layer {bad[0][0]} is {bad[0][1]!r}; only 'full' or 'shared'")
    if types and types[0] != FULL:
        raise ValueError(f"GLM5Config: {spelled} makes layer 0 'shared' (indexer_types[0]): it has no preceding "
                         "full layer to take its top-k from (transformers refuses it at the forward)")


def source_layer(types, i: int) -> int:
    """The full layer (0-based) whose top-k layer i attends to (i itself when full)."""
    while types[i] != FULL:
        i -= 1
    return i


def roles(types, number) -> dict[int, ShareRole]:
    """The ShareRole of each decoder layer that shares or is shared from, by its layer number
    `number(i)` (i 0-based; GPTModel's i + 1, model/layer_pattern.py hybrid_layer_number in a hybrid stack)."""
    out = {}
    for i, t in enumerate(types):
        following = types[i + 1] if i + 1 < len(types) else FULL
        if t == SHARED:
            out[number(i)] = ShareRole(source=number(source_layer(types, i)), last=following == FULL)
        elif following == SHARED:
            out[number(i)] = ShareRole(publishes=True)
    return out


def megatron_core_schedule(types) -> tuple[int, int] | None:
    """(dsa_indexer_topk_freq, dsa_indexer_skip_topk_offset) with which megatron-core 0.19.2 builds
    exactly `types`, or None when no such pair exists. Layer L = i + 1 skips when
    max(L - max(offset, 1), 0) % freq != 0."""
    n = len(types)
    if all(t == FULL for t in types):
        return 1, 0
    for freq in range(2, n + 1):
        for offset in range(1, n + 1):
            if all((max(i + 1 - offset, 0) % freq == 0) == (t == FULL) for i, t in enumerate(types)):
                return freq, offset
    return None


def split_groups(types, stages: list[list[int]]) -> list[tuple[int, int]]:
    """(shared layer, its source) for every shared layer whose source is not earlier in the same
    list of `stages` (each the 0-based decoder layers of one pipeline stage or virtual chunk)."""
    out = []
    for layers in stages:
        for pos, i in enumerate(layers):
            if types[i] == SHARED and source_layer(types, i) not in layers[:pos]:
                out.append((i, source_layer(types, i)))
    return out


def group_starts(types) -> list[int]:
    """The layers (0-based) where a stage may start: the full layers."""
    return [i for i, t in enumerate(types) if t == FULL]
