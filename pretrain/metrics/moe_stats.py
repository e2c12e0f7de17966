"""MoE routing statistics: tokens per expert per layer, read just before megatron-core's
finalize_model_grads uses them for the expert-bias update and zeroes them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_layer import TransformerLayer
from model.specs_flash import FlashLayer  # GLM-5.3-Flash's mHC-wrapped MLP / MoE layers


def routers(chunks) -> list[tuple[int, torch.nn.Module]]:
    """(0-based global GLM layer index, router) of every MoE layer on this rank, the MTP layer included."""
    found = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (TransformerLayer, FlashLayer)) and hasattr(getattr(module, "mlp", None), "router"):
                # HybridModel numbers GLM layer i's MoE half 2i + 2 (model/layer_pattern.py), and the MTP
                # layer's inner layers from 1 (is_mtp_layer): counted after the decoder's GLM layers
                mtp_offset = module.config.glm_num_layers if getattr(module, "is_mtp_layer", False) else 0
                found.append((mtp_offset + (module.layer_number - 1) // 2, module.mlp.router))
    return found


class LoadImbalanceTracker:
    """max / mean tokens per expert for each MoE layer, over the whole global batch, and the
    share of token-to-expert assignments dropped by a capacity factor."""

    def __init__(self, chunks, total_layers: int, num_experts: int, topk: int, device: torch.device):
        self.routers = routers(chunks)
        self.total_layers, self.num_experts, self.topk = total_layers, num_experts, topk
        self.device = device  # where the counts are reduced (NCCL: the GPU), also on a stage without MoE layers
        self.moe_layers = None
        self.per_layer: dict[int, float] = {}
        self.counts = torch.zeros(total_layers, num_experts)  # the last step's global tokens per expert
        self.bias_range: tuple[float, float] = (0.0, 0.0)
        self.dropped_fraction = 0.0
        # megatron counts the tokens each expert *kept* (after capacity dropping); count what was
        # routed, under the same condition (grad enabled: not eval, not the no-grad first pass of
        # activation recompute), to know how many were dropped.
        self.routed = torch.zeros(total_layers)
        for layer, router in self.routers:
            router.register_forward_hook(self._count_routed(layer))

    def _count_routed(self, layer: int):
        def hook(module, args, output):
            if torch.is_grad_enabled():
                self.routed[layer] += args[0].numel() // args[0].shape[-1]
        return hook

    def record(self) -> None:
        counts = torch.zeros(self.total_layers, self.num_experts)
        bias = torch.zeros(self.total_layers, 2)
        for layer, router in self.routers:
            counts[layer] = router.local_tokens_per_expert.detach().float().cpu()
            b = router.expert_bias.detach().float().cpu()
            bias[layer] = torch.stack([b.min(), b.max()])
        counts, bias = counts.to(self.device), bias.to(self.device)
        # Every rank that holds a layer saw a share of its tokens (TP ranks see the same ones,
        # which scales the whole row and leaves max/mean unchanged): summing over the world
        # gives each layer's global counts, from every pipeline stage.
        routed = self.routed.clone().to(self.device)
        self.routed.zero_()
        dist.all_reduce(counts)
        dist.all_reduce(bias)
        dist.all_reduce(routed)
        holders = counts.new_zeros(self.total_layers)
        for layer, _ in self.routers:
            holders[layer] = 1
        dist.all_reduce(holders)
        counts, bias, holders, routed = counts.cpu(), bias.cpu(), holders.cpu(), routed.cpu()
        self.counts = counts
        assigned = routed.sum() * self.topk
        self.dropped_fraction = float(1 - counts.sum() / assigned) if assigned > 0 else 0.0
        self.per_layer = {}
        for layer in range(self.total_layers):
            total = counts[layer].sum()
            if total > 0:
                self.per_layer[layer] = float(counts[layer].max() / counts[layer].mean())
        moe = [layer for layer in range(self.total_layers) if holders[layer] > 0]
        if moe:
            mean_bias = bias[moe] / holders[moe].unsqueeze(1)  # replicas hold the same bias
            self.bias_range = (float(mean_bias[:, 0].min()), float(mean_bias[:, 1].max()))

    def load(self):
        """layers x experts numpy array: tokens per expert / the layer's mean (NaN: no experts there)."""
        counts = self.counts.double()
        mean = counts.mean(dim=1, keepdim=True)
        return torch.where(mean > 0, counts / mean.clamp_min(1e-30), float("nan")).numpy()

    def scalars(self) -> dict[str, float]:
        if not self.per_layer:
            return {}
        out = {"moe/load-imbalance": sum(self.per_layer.values()) / len(self.per_layer),
               "moe/expert-bias-min": self.bias_range[0], "moe/expert-bias-max": self.bias_range[1],
               "moe/dropped-tokens-fraction": self.dropped_fraction}
        for layer, value in self.per_layer.items():
            out[f"moe/load-imbalance/layer-{layer:02d}"] = value
        return out


def aux_loss_scalars(tconfig, num_microbatches: int) -> dict[str, float]:
    """The routers' auxiliary losses (the sequence-wise balance loss under --moe-aux-loss-coeff),
    without their coefficient, averaged over MoE layers and micro-batches as Megatron-LM logs them.
    A collective (every rank calls it); clears megatron's tracker for the next step."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        track_moe_metrics,
    )

    if not get_moe_layer_wise_logging_tracker():
        return {}
    totals: dict[str, torch.Tensor] = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals,
                      num_layers=tconfig.num_layers, moe_layer_freq=tconfig.moe_layer_freq,
                      mtp_num_layers=tconfig.mtp_num_layers)
    clear_aux_losses_tracker()
    return {f"moe/{name}": float(value) for name, value in totals.items()}
