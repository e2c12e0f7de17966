"""ParallelDims: the one validated description of the parallel layout.

Every constraint is checked here, before anything is allocated, with an error that names the
flag and the numbers. Later code asks this object for degrees instead of recomputing them: the model
config (model/mcore_config.py) and the process groups (parallel/runtime.py) read it, and nothing else
holds a copy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from model.config import GLM5Config


def add_arguments(p: argparse.ArgumentParser):
    """The layout's flags (Megatron-LM's names), in a "parallelism" group that is returned for the engine's."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--pipeline-model-parallel-layout", default=None,
                   help="megatron-core's per-stage layer lists, stages split by '|' in virtual-stage-major "
                        "order: E embedding, t decoder layer, m MTP layer, L loss; (..)*N repeats, e.g. "
                        "'Et|(tt|)*3,ttmL' (sets the virtual stages itself; translated into the hybrid "
                        "layer pattern's stages)")
    g.add_argument("--hybrid-layer-pattern", default=None,
                   help="Megatron-LM's hybrid layer pattern, checked against the model config: each GLM layer "
                        "'D' (DSA attention) then '-' (dense MLP) or 'E' (MoE), '|' between pipeline stages "
                        "(virtual-stage-major), '/DE' per MTP depth, e.g. 'D-DE|DEDE/DE' (default: the config's)")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved schedule: consecutive micro-batches per virtual stage (default: PP)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    return g


class LayoutError(ValueError):
    """An impossible parallel layout; the message names the flags to change."""


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel; megatron's default is tp
    sequence_parallel: bool = False
    layers_per_virtual_stage: int | None = None
    microbatch_group_size: int | None = None  # interleaved: micro-batches per virtual stage in a row
    # --pipeline-model-parallel-layout: megatron-core's per-stage layer lists ("Et|tt|...|tmL"), which
    # also sets the virtual stages (len / PP); None: num_hidden_layers split evenly
    pipeline_layout: str | None = None
    # --hybrid-layer-pattern (model/layer_pattern.py): its '|' segments are the (virtual) stages
    hybrid_pattern: str | None = None

    @classmethod
    def from_args(cls, args, world_size: int) -> "ParallelDims":
        """The layout of the flags `add_arguments` declares (not yet validated: `validate`)."""
        return cls(world_size=world_size, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                   cp=args.context_parallel_size, ep=args.expert_model_parallel_size,
                   etp=args.expert_tensor_parallel_size, sequence_parallel=args.sequence_parallel,
                   layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
                   microbatch_group_size=args.microbatch_group_size_per_virtual_pipeline_stage,
                   pipeline_layout=args.pipeline_model_parallel_layout, hybrid_pattern=args.hybrid_layer_pattern)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp

    @property
    def expert_dp(self) -> int:
        return (self.tp * self.cp * self.dp) // (self.expert_tp * self.ep)

    def vpp(self, num_layers: int) -> int | None:
        if self.hybrid_pattern is not None:
            from model.layer_pattern import virtual_stages

            return virtual_stages(self.hybrid_pattern, self.pp)
        if self.pipeline_layout is not None:
            stages = _layout_stages(self.pipeline_layout)
            return stages // self.pp if stages > self.pp else None
        if self.layers_per_virtual_stage is None:
            return None
        return num_layers // (self.pp * self.layers_per_virtual_stage)

    def describe(self) -> str:
        return (f"world={self.world_size} TP={self.tp}{'+SP' if self.sequence_parallel else ''} "
                f"PP={self.pp} CP={self.cp} DP={self.dp} EP={self.ep} ETP={self.expert_tp}")

    def validate(self, cfg: GLM5Config, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 mtp_num_layers: int | None = None) -> None:
        """Every constraint of this layout for `cfg`; `mtp_num_layers`: --mtp-num-layers (the MTP depths
        the layouts place; default the config's)."""
        depths = cfg.mtp_depths(mtp_num_layers)

        def need(cond: bool, msg: str):
            if not cond:
                raise LayoutError(msg)

        for flag, v in [("--tensor-model-parallel-size", self.tp), ("--pipeline-model-parallel-size", self.pp),
                        ("--context-parallel-size", self.cp), ("--expert-model-parallel-size", self.ep),
                        ("--expert-tensor-parallel-size", self.expert_tp)]:
            need(v >= 1, f"{flag} {v} must be >= 1")
        model_parallel = self.tp * self.pp * self.cp
        need(self.world_size % model_parallel == 0,
             f"world size {self.world_size} is not divisible by --tensor-model-parallel-size {self.tp} x "
             f"--pipeline-model-parallel-size {self.pp} x --context-parallel-size {self.cp} = {model_parallel}")
        need(cfg.num_attention_heads % self.tp == 0,
             f"num_attention_heads {cfg.num_attention_heads} is not divisible by --tensor-model-parallel-size {self.tp}")
        if self.cp > 1:
            # The sequence is cut into 2 x CP load-balanced chunks (model/modules/cp_attention.py),
            # and under sequence parallelism each CP rank's S/CP tokens into TP slices.
            chunks = 2 * self.cp * (self.tp if self.sequence_parallel else 1)
            sp = f" x --tensor-model-parallel-size {self.tp} (sequence parallel)" if self.sequence_parallel else ""
            need(seq_length % chunks == 0,
                 f"--seq-length {seq_length} is not divisible by 2 x --context-parallel-size {self.cp}{sp} "
                 f"= {chunks} (context parallelism splits the sequence into 2 x CP load-balanced chunks)")
        need(not self.sequence_parallel or self.tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.sequence_parallel:
            need(seq_length % self.tp == 0,
                 f"--seq-length {seq_length} is not divisible by --tensor-model-parallel-size {self.tp} "
                 "(required by --sequence-parallel)")
        need(self.tp == 1 or self.sequence_parallel,
             f"--tensor-model-parallel-size {self.tp} with MoE layers needs --sequence-parallel "
             "(megatron-core's MoE token dispatch requires it)")
        need(cfg.n_routed_experts % self.ep == 0,
             f"n_routed_experts {cfg.n_routed_experts} is not divisible by --expert-model-parallel-size {self.ep}")
        need((self.tp * self.cp * self.dp) % (self.expert_tp * self.ep) == 0,
             f"--expert-model-parallel-size {self.ep} x --expert-tensor-parallel-size {self.expert_tp} = "
             f"{self.ep * self.expert_tp} does not divide TP x CP x DP = {self.tp * self.cp * self.dp}")
        need(cfg.moe_intermediate_size % self.expert_tp == 0,
             f"moe_intermediate_size {cfg.moe_intermediate_size} is not divisible by "
             f"--expert-tensor-parallel-size {self.expert_tp}")
        need(cfg.intermediate_size % self.tp == 0,
             f"intermediate_size {cfg.intermediate_size} is not divisible by --tensor-model-parallel-size {self.tp}")
        if self.hybrid_pattern is not None:
            self.validate_hybrid_pattern(cfg, depths)
        elif self.pipeline_layout is not None:
            need(self.layers_per_virtual_stage is None,
                 "--pipeline-model-parallel-layout sets the virtual stages itself: drop "
                 "--num-layers-per-virtual-pipeline-stage")
            self._validate_pipeline_layout(cfg, depths)
        else:
            need(cfg.num_hidden_layers % self.pp == 0,
                 f"num_hidden_layers {cfg.num_hidden_layers} is not divisible by --pipeline-model-parallel-size "
                 f"{self.pp} (the MTP layer goes on the last stage), or give --pipeline-model-parallel-layout")
        if self.layers_per_virtual_stage is not None:
            need(self.layers_per_virtual_stage >= 1,
                 f"--num-layers-per-virtual-pipeline-stage {self.layers_per_virtual_stage} must be >= 1 "
                 "(a virtual stage without layers)")
            need(self.pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            per_stage = cfg.num_hidden_layers // self.pp
            need(per_stage % self.layers_per_virtual_stage == 0,
                 f"layers per pipeline stage {per_stage} (num_hidden_layers {cfg.num_hidden_layers} / "
                 f"--pipeline-model-parallel-size {self.pp}) is not divisible by "
                 f"--num-layers-per-virtual-pipeline-stage {self.layers_per_virtual_stage}")
        need(micro_batch_size >= 1, f"--micro-batch-size {micro_batch_size} must be >= 1")
        need(global_batch_size % (micro_batch_size * self.dp) == 0,
             f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size {micro_batch_size} x "
             f"data-parallel size {self.dp} = {micro_batch_size * self.dp}")
        if self.vpp(cfg.num_hidden_layers) is not None:
            # megatron-core's interleaved schedule runs micro-batches in groups of G (default PP) per
            # virtual stage: PP <= G <= M, and a last partial group of at least PP micro-batches.
            n_micro = global_batch_size // (micro_batch_size * self.dp)
            group = self.microbatch_group_size or self.pp
            m = (f"the number of micro-batches {n_micro} (--global-batch-size {global_batch_size} / "
                 f"(--micro-batch-size {micro_batch_size} x DP {self.dp}))")
            g = (f"--microbatch-group-size-per-virtual-pipeline-stage {group}" if self.microbatch_group_size
                 else f"--pipeline-model-parallel-size {self.pp} (the default micro-batch group of the "
                      "interleaved schedule, --microbatch-group-size-per-virtual-pipeline-stage)")
            need(self.pp <= group <= n_micro,
                 f"interleaved pipelining: {g} must be between --pipeline-model-parallel-size {self.pp} and {m}")
            need(n_micro % group == 0 or n_micro % group >= self.pp,
                 f"interleaved pipelining needs {m} divisible by {g}, or a remainder of at least "
                 f"--pipeline-model-parallel-size {self.pp}")
        elif self.microbatch_group_size is not None:
            raise LayoutError("--microbatch-group-size-per-virtual-pipeline-stage needs "
                              "--num-layers-per-virtual-pipeline-stage (or virtual stages in "
                              "--pipeline-model-parallel-layout)")
        if cfg.shares_top_k and self.pp > 1:
            self._validate_index_share(cfg, depths)
        need(seq_length <= cfg.max_position_embeddings,
             f"--seq-length {seq_length} exceeds max_position_embeddings {cfg.max_position_embeddings}")

    def _validate_pipeline_layout(self, cfg: GLM5Config, depths: int) -> None:
        """megatron-core's own checks of the layout (embedding first, loss last, every decoder layer once, the
        MTP layer after them in a last virtual stage), as a LayoutError naming the flag; and ours: the MTP
        layer on the last pipeline stage, where the loss function computes its loss."""
        from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

        flag = f"--pipeline-model-parallel-layout {self.pipeline_layout!r}"
        try:
            layout = PipelineParallelLayerLayout(self.pipeline_layout, self.pp)
            standalone_mtp = layout.validate_layer_layout(cfg.num_hidden_layers, depths or None)
        except (AssertionError, ValueError, KeyError) as e:
            raise LayoutError(f"{flag} for --pipeline-model-parallel-size {self.pp}, {cfg.num_hidden_layers} "
                              f"layers and {depths} MTP depth(s) ('m' once a depth): {e or 'not a layout'}") from None
        if standalone_mtp:
            raise LayoutError(f"{flag}: put the MTP layer ('m') in the last pipeline stage, beside the loss ('L') "
                              "(an MTP stage of its own is not supported here yet)")

    def validate_hybrid_pattern(self, cfg: GLM5Config, depths: int) -> None:
        """--hybrid-layer-pattern against `cfg` with `depths` MTP depths, and alone in marking the stages."""
        from model import layer_pattern

        flag = f"--hybrid-layer-pattern {self.hybrid_pattern!r}"
        for other, given in [("--pipeline-model-parallel-layout", self.pipeline_layout),
                             ("--num-layers-per-virtual-pipeline-stage", self.layers_per_virtual_stage)]:
            if given is not None:
                raise LayoutError(f"{flag} marks the (virtual) pipeline stages itself ('|'): drop {other}")
        try:
            layer_pattern.check(self.hybrid_pattern, cfg, depths, self.pp)
        except ValueError as e:
            raise LayoutError(str(e)) from None

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """The decoder layers (0-based) of every pipeline stage or virtual chunk, in model order
        (virtual stage-major, as megatron-core assigns them)."""
        from model import layer_pattern

        if self.hybrid_pattern is not None:
            return layer_pattern.segment_layers(self.hybrid_pattern)
        return (layer_pattern.pipeline_stages(num_layers, self.pp, self.vpp(num_layers), self.pipeline_layout)
                or [list(range(num_layers))])

    def _validate_index_share(self, cfg: GLM5Config, depths: int) -> None:
        """IndexShare: a shared layer takes its top-k from the full layer before it within its own
        stage (the indices do not travel between stages: docs/MODEL.md, "IndexShare")."""
        from model import index_share

        types = cfg.layer_indexer_types
        stages = self.stage_layers(cfg.num_hidden_layers)
        split = index_share.split_groups(types, stages)
        if not split:
            return
        layer, source = split[0]
        flag = (f"--hybrid-layer-pattern {self.hybrid_pattern!r}" if self.hybrid_pattern else
                f"--pipeline-model-parallel-layout {self.pipeline_layout!r}" if self.pipeline_layout else
                f"--pipeline-model-parallel-size {self.pp}" + (f" with --num-layers-per-virtual-pipeline-stage "
                                                                f"{self.layers_per_virtual_stage}"
                                                                if self.layers_per_virtual_stage else ""))
        raise LayoutError(
            f"{flag} puts layer {layer} in another pipeline stage than layer {source}, whose DSA top-k it "
            f"shares (indexer_types: {len(split)} shared layer(s) cut off from their full layer, e.g. "
            f"{split[:3]}); every stage must start on a full layer. A layout that keeps each sharing group "
            f"in one stage: --pipeline-model-parallel-layout "
            f"'{suggest_layout(types, len(stages), bool(depths))}'")


def suggest_layout(types, chunks: int, mtp: bool) -> str:
    """A --pipeline-model-parallel-layout of `chunks` stages (PP x VPP) that cuts only before full
    layers: each sharing group goes to the chunk its first layer falls in by an even split."""
    from model import index_share

    n = len(types)
    counts = [0] * chunks
    starts = index_share.group_starts(types) + [n]
    for a, b in zip(starts, starts[1:]):
        counts[min(chunks - 1, a * chunks // n)] += b - a
    stages = ["t" * c for c in counts]
    stages[0] = "E" + stages[0]
    stages[-1] += ("m" if mtp else "") + "L"
    return "|".join(stages)


def _layout_stages(layout: str) -> int:
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    return PipelineParallelLayerLayout.get_num_stages_from_str(layout)
