"""Muon for GLM-5 (`--optimizer muon`), on megatron-core 0.19.2's Muon (emerging-optimizers' Newton-Schulz),
with GLM-5's "Muon Split" of MLA: the up-projections `linear_q_up_proj` and `linear_kv_up_proj` hold each
attention head's rows together, and each head's block is orthogonalized (and scaled) on its own, so heads
update at their own scales (GLM-5 technical report, arXiv 2602.15763; docs/MUON.md).

Which matrices Muon takes and which go to Adam is decided here, explicitly, and printed at start-up
(`describe`): Muon takes every 2-D weight of the attention (MLA's projections, the DSA indexer's q/k
projections), the dense and shared-expert MLPs, each routed expert's matrices (one parameter per expert:
each orthogonalized on its own) and the MTP layer's projection; Adam takes the embedding and the output
layer (megatron-core's rule), every 1-D parameter (norms, the router's expert bias), the router's weight
and the indexer's `linear_weights_proj` (a per-head gate of n_heads rows, not a feature map).

Under tensor parallelism a head is whole on a rank (MLA's up-projections are column-parallel: rows are
split by heads), so the split needs no communication; the unsplit matrices follow `--muon-tp-mode`.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections import Counter
from dataclasses import dataclass

import torch

SPLIT_HEADS = ("linear_q_up_proj.weight", "linear_kv_up_proj.weight")
ADAM_MATRICES = ("mlp.router.weight", "indexer.linear_weights_proj.weight")


@dataclass
class MuonOptions:
    """--muon-* (Megatron-LM's names; OptimizerConfig's muon_* fields) and the MLA head split."""

    momentum: float = 0.95
    use_nesterov: bool = False
    num_ns_steps: int = 5
    coefficient_type: str = "quintic"
    scale_mode: str = "spectral"
    extra_scale_factor: float = 0.2
    fp32_matmul_prec: str = "medium"
    tp_mode: str = "blockwise"
    split_mla_heads: bool = True

    @classmethod
    def from_args(cls, args) -> "MuonOptions":
        return cls(**{f: getattr(args, "muon_" + f) for f in cls.__dataclass_fields__})

    def optimizer_config_fields(self) -> dict:
        return {"muon_momentum": self.momentum, "muon_nesterov": self.use_nesterov,
                "muon_num_ns_steps": self.num_ns_steps, "muon_coefficient_type": self.coefficient_type,
                "muon_scale_mode": self.scale_mode, "muon_extra_scale_factor": self.extra_scale_factor,
                "muon_fp32_matmul_prec": self.fp32_matmul_prec, "muon_tp_mode": self.tp_mode,
                "muon_split_qkv": False}  # MLA has no fused QKV; its split is the per-head one


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--muon-* (--optimizer itself: pretrain/engine/optimizer.py)."""
    g = p.add_argument_group("Muon (with --optimizer muon; Megatron-LM's flags)")
    g.add_argument("--muon-momentum", type=float, default=0.95)
    g.add_argument("--muon-use-nesterov", action="store_true", help="Nesterov-style momentum")
    g.add_argument("--muon-num-ns-steps", type=int, default=5, help="Newton-Schulz iterations")
    g.add_argument("--muon-coefficient-type", default="quintic", help="Newton-Schulz coefficients (emerging-optimizers')")
    g.add_argument("--muon-scale-mode", choices=["spectral", "unit_rms_norm", "shape_scaling"], default="spectral",
                   help="update scale: spectral is sqrt(max(m, n))")
    g.add_argument("--muon-extra-scale-factor", type=float, default=0.2,
                   help="times the scale: 0.2 x sqrt(max(m, n)) matches AdamW's update RMS (Moonlight), so "
                        "Muon reuses AdamW's --lr and --weight-decay (Megatron-LM's default is 1.0)")
    g.add_argument("--muon-fp32-matmul-prec", choices=["low", "medium", "high"], default="medium",
                   help="matmul precision of the Newton-Schulz iteration (medium: bf16)")
    g.add_argument("--muon-tp-mode", choices=["blockwise", "duplicated", "distributed"], default="blockwise",
                   help="a TP-sharded matrix: orthogonalize each shard (blockwise) or the whole matrix")
    g.add_argument("--no-muon-split-mla-heads", dest="muon_split_mla_heads", action="store_false",
                   help="orthogonalize MLA's q/kv up-projections whole instead of head by head (GLM-5's Muon Split)")


def check_arguments(args) -> None:
    """Before any work: Muon flags without --optimizer muon, and numbers out of range."""
    if args.optimizer != "muon":
        changed = [f for f, on in (("--muon-use-nesterov", args.muon_use_nesterov),
                                   ("--no-muon-split-mla-heads", not args.muon_split_mla_heads)) if on]
        if changed:
            raise ValueError(f"{changed[0]} needs --optimizer muon")
        return
    if args.use_distributed_optimizer and args.overlap_param_gather:
        # the layer-wise optimizer all-gathers whole parameters after its step (pretrain/engine/optimizer.py)
        raise ValueError("--overlap-param-gather does not work with --optimizer muon --use-distributed-optimizer "
                         "(megatron-core's layer-wise optimizer gathers parameters after the step): drop it")
    if args.muon_num_ns_steps < 1:
        raise ValueError(f"--muon-num-ns-steps {args.muon_num_ns_steps} must be at least 1")
    if not 0 <= args.muon_momentum < 1:
        raise ValueError(f"--muon-momentum {args.muon_momentum} must be in [0, 1)")
    try:
        from megatron.core.optimizer.emerging_optimizers import validate_coefficient_type

        validate_coefficient_type(args.muon_coefficient_type)
    except ImportError as e:
        raise ValueError(f"--optimizer muon needs the emerging-optimizers package ({e})") from None
    except (ValueError, AssertionError) as e:
        raise ValueError(f"--muon-coefficient-type {args.muon_coefficient_type}: {e}") from None


def goes_to_adam(name: str, param: torch.nn.Parameter) -> bool:
    return (getattr(param, "is_embedding_or_output_parameter", False) or param.dim() != 2
            or name.endswith(ADAM_MATRICES))


def tag_parameters(chunks, split_heads: bool) -> None:
    """Mark what megatron-core's Muon reads: `muon_adam` (to the Adam side) and `muon_head_rows` (the rows
    of one head in an MLA up-projection, when split)."""
    for chunk in chunks:
        config = chunk.config
        for name, p in chunk.named_parameters():
            p.muon_adam = goes_to_adam(name, p)
            if split_heads and name.endswith(SPLIT_HEADS):
                p.muon_head_rows = head_rows(name, config)


def head_rows(name: str, config) -> int:
    if name.endswith("linear_q_up_proj.weight"):
        return config.qk_head_dim + config.qk_pos_emb_head_dim
    return config.qk_head_dim + config.v_head_dim  # kv up: [k_nope; v] per head


def describe(chunks) -> str:
    """Which parameters Muon takes and which Adam, by kind (layer and expert numbers folded), for the start-up log."""
    sides: dict[str, Counter] = {"muon (split per head)": Counter(), "muon": Counter(), "adam": Counter()}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            kind = re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", name))
            side = "adam" if p.muon_adam else "muon (split per head)" if getattr(p, "muon_head_rows", 0) else "muon"
            sides[side][kind] += 1
    return "\n".join(f"  {side}: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(c.items()))
                     for side, c in sides.items() if c)


@functools.cache
def optimizer_class():
    """megatron-core's TensorParallelMuon, with MLA's up-projections orthogonalized head by head."""
    from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon

    class HeadSplitMuon(TensorParallelMuon):
        def orthogonalize(self, p, grad, **kwargs):
            rows = getattr(p, "muon_head_rows", 0)
            if not rows:
                return super().orthogonalize(p, grad, **kwargs)
            # rows are head-major and a head is whole on its TP rank: no gather, no partition_dim
            blocks = grad.view(-1, rows, grad.shape[-1])
            return torch.stack([self.scaled_orthogonalize_fn(b, None, None) for b in blocks]).view_as(grad)

    return HeadSplitMuon
