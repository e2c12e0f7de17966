"""GLM-5 as a megatron-core hybrid layer pattern (`--hybrid-layer-pattern`, HybridModel's).

Each GLM layer is two hybrid layers: DSA attention `D`, then a dense MLP `-` (the first
`first_k_dense_replace` layers) or an MoE `E`; GLM-5 is `D-D-D-DEDE...`. `|` separates pipeline
segments (virtual stage-major, as megatron-core assigns them); each MTP depth follows a `/` as `DE`.
Hybrid layers are numbered 1..2N: GLM layer i (0-based) is hybrid layers 2i+1 (attention) and 2i+2.
"""

from __future__ import annotations

from megatron.core.models.hybrid.hybrid_layer_allocation import parse_hybrid_pattern

from model.config import GLM5Config

ATTENTION, DENSE, MOE, PIPE, MTP = "D", "-", "E", "|", "/"
MTP_DEPTH = ATTENTION + MOE  # the MTP layer: DSA attention and MoE, as the last decoder layers


def glm_layer(cfg: GLM5Config, i: int) -> str:
    return ATTENTION + (MOE if cfg.is_moe_layer(i) else DENSE)


def derive(cfg: GLM5Config, mtp_depths: int, stages: list[list[int]] | None = None) -> str:
    """The pattern of `cfg` with `mtp_depths` MTP depths; `stages`: the GLM layers (0-based) of each
    pipeline segment in model order (parallel/dims.py stage_layers), None for one segment."""
    stages = stages or [list(range(cfg.num_hidden_layers))]
    main = PIPE.join("".join(glm_layer(cfg, i) for i in layers) for layers in stages)
    return main + (MTP + MTP_DEPTH) * mtp_depths


def hybrid_layer_number(glm_layer_index: int) -> int:
    """The 1-based hybrid layer number of GLM layer `glm_layer_index`'s (0-based) attention."""
    return 2 * glm_layer_index + 1


def hybrid_topk_schedule(freq: int, offset: int) -> tuple[int, int]:
    """megatron-core's (dsa_indexer_topk_freq, dsa_indexer_skip_topk_offset) count the layers they are
    built in: GLM layer L (1-based) is hybrid layer 2L-1, so the GLM schedule (f, o) is (2f, 2o-1) in a
    hybrid stack (GLM-5.2's (4, 3) is (8, 5)). megatron-core raises an offset to at least 1 first."""
    if freq <= 1:
        return freq, offset
    return 2 * freq, 2 * max(offset, 1) - 1


def check(pattern: str, cfg: GLM5Config, mtp_depths: int, pp: int, flag: str = "--hybrid-layer-pattern") -> list[list[int]]:
    """The GLM layers of each pipeline segment of `pattern` (placed by their attention: segment_layers), or a
    ValueError naming `flag` when the pattern is not this config's (layers, dense/MoE split, MTP depths) or its
    segments do not fit --pipeline-model-parallel-size `pp`. A '|' may cut a GLM layer between its attention
    and its MLP."""
    if getattr(cfg, "model_type", None) == "glm5_next":  # GLM-5.3-Flash: model/mcore_config_flash.py
        from model.mcore_config_flash import check_flash_pattern

        check_flash_pattern(pattern, cfg, pp, flag)
        return segment_layers(pattern)
    where = f"{flag} {pattern!r}"
    try:
        parsed = parse_hybrid_pattern(pattern)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    main = parsed.main_pattern or ""
    want = derive(cfg, 0)
    if main.replace(PIPE, "") != want:
        raise ValueError(f"{where}: the config's {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense "
                         f"first) are {want!r} (each GLM layer is 'D' then '-' or 'E'), not {main.replace(PIPE, '')!r}")
    if (parsed.mtp_pattern or MTP_DEPTH) != MTP_DEPTH or parsed.mtp_num_depths != mtp_depths:
        raise ValueError(f"{where}: {mtp_depths} MTP depth(s) (--mtp-num-layers, or the config's "
                         f"num_nextn_predict_layers) are {(MTP + MTP_DEPTH) * mtp_depths!r} after the layers")
    segments = main.split(PIPE)
    if len(segments) % pp:
        raise ValueError(f"{where}: {len(segments)} pipeline segment(s) ('|') for --pipeline-model-parallel-size "
                         f"{pp}: a multiple of it is needed (mark every stage)")
    return segment_layers(pattern)


def segment_halves(pattern: str) -> list[tuple[list[int], list[int]]]:
    """(GLM layers whose attention, GLM layers whose MLP or MoE) each '|' segment of a GLM-5 pattern holds,
    0-based. A '|' may cut a GLM layer between its attention and its MLP: the segment after it starts on
    that layer's MLP/MoE half (HybridModel sends the hidden states between the two as between any layers)."""
    stages, start = [], 0
    for segment in (parse_hybrid_pattern(pattern).main_pattern or "").split(PIPE):
        numbers = range(start, start + len(segment))  # 0-based hybrid layers: GLM layer i is 2i and 2i + 1
        stages.append(([h // 2 for h in numbers if h % 2 == 0], [h // 2 for h in numbers if h % 2 == 1]))
        start += len(segment)
    return stages


def segment_layers(pattern: str) -> list[list[int]]:
    """The GLM layers (0-based) whose attention each '|' segment holds: where their DSA top-k is computed
    and read (IndexShare), and where each GLM layer's pipeline stage is counted from."""
    return [attention for attention, _ in segment_halves(pattern)]


def virtual_stages(pattern: str, pp: int) -> int | None:
    """The virtual pipeline stages per rank the pattern's segments make (None: not interleaved)."""
    segments = (parse_hybrid_pattern(pattern).main_pattern or "").count(PIPE) + 1
    return segments // pp if segments > pp else None


def pipeline_stages(num_layers: int, pp: int, vpp: int | None, layout: str | None) -> list[list[int]] | None:
    """The GLM layers (0-based) of each pipeline segment in model order (virtual stage-major, as
    megatron-core assigns them): from --pipeline-model-parallel-layout ("Et|tt|tmL", its 't's) or an
    even split over PP x VPP; None for one stage."""
    if layout is not None:
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        chunks = PipelineParallelLayerLayout(layout, pp).layout
        counts = [chunks[p][v].count(LayerType.decoder) for v in range(len(chunks[0])) for p in range(pp)]
    elif pp * (vpp or 1) > 1:
        counts = [num_layers // (pp * (vpp or 1))] * (pp * (vpp or 1))
    else:
        return None
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return [list(range(a, a + n)) for a, n in zip(starts, counts)]
