"""`--dp-engine deepspeed`: DeepSpeed ZeRO-1/2 in place of megatron-core's DDP + distributed optimizer.

megatron-core still builds the model (TP, EP, CP, MoE dispatch) and runs the no-pipeline schedule;
DeepSpeed only owns gradient reduction, optimizer-state partitioning (optionally offloaded to CPU),
clipping and the update. The pieces that join the two:

- DeepSpeed's data-parallel group is megatron's (with context parallel); megatron's experts carry
  `allreduce=False`, which DeepSpeed reads as "MoE parameter", and reduce over megatron's
  expert-data-parallel group, registered in DeepSpeed's group table under one name
  (parallel/compat/deepspeed.py, as the engine subclass that says the model has experts).
- The schedule calls `torch.autograd.backward` itself: DeepSpeed's torch-style backward with
  `managed_gradient_accumulation: false` makes `step()` the accumulation boundary.
- The loss is normalized by the global token count up front (`DeepSpeedEngine.scale_loss` as
  megatron's `grad_scale_func`): megatron's `finalize_model_grads` would divide by it afterwards;
  DeepSpeed averages over data parallel instead. The auxiliary losses go through the same function
  (megatron's schedule does it for MoE and MTP, the recipe for the DSA indexer's).
- What `finalize_model_grads` does besides DP reduction happens here: gradients of weights
  replicated over TP but fed different tokens (sequence-parallel norms, the router) are summed over
  TP as they are produced, and the expert bias is updated once per global batch.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed.finalize_model_grads import (
    _update_router_expert_bias,
    reset_model_temporary_tensors,
)

from parallel.compat.deepspeed import EXPERT_GROUP, engine_class, register_expert_groups
from pretrain.config.train_config import TrainConfig
from pretrain.engine.megatron import Engine
from pretrain.engine.implementations import origin
from pretrain.engine.optimizer import optimizer_config
from pretrain.checkpoint.run_state import CheckpointError


def _mpu() -> SimpleNamespace:
    """The subset of Megatron-LM's `mpu` that DeepSpeed asks for, from megatron-core's groups."""
    mp_group = ps.get_model_parallel_group()
    return SimpleNamespace(
        get_model_parallel_group=lambda: mp_group,
        get_model_parallel_rank=lambda: dist.get_rank(mp_group),
        get_model_parallel_world_size=lambda: dist.get_world_size(mp_group),
        get_data_parallel_group=lambda: ps.get_data_parallel_group(with_context_parallel=True),
        get_data_parallel_rank=lambda: ps.get_data_parallel_rank(with_context_parallel=True),
        get_data_parallel_world_size=lambda: ps.get_data_parallel_world_size(with_context_parallel=True),
        get_tensor_model_parallel_group=ps.get_tensor_model_parallel_group,
        get_tensor_model_parallel_rank=ps.get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size=ps.get_tensor_model_parallel_world_size,
        get_tensor_model_parallel_src_rank=ps.get_tensor_model_parallel_src_rank,
    )


def _is_expert(param) -> bool:
    return getattr(param, "allreduce", True) is False


def _param_groups(module, cfg: TrainConfig) -> list[dict]:
    """megatron-core's own grouping, as its optimizer gets it (no weight decay on biases and 1-D
    weights: `wd_mult` 0, applied by the LR/WD scheduler), with its expert groups marked for
    DeepSpeed, which partitions them over the expert-data-parallel group."""
    from megatron.core.optimizer import _get_param_groups, get_standard_config_overrides

    # megatron-core 0.19 applies its standard overrides (wd_mult 0 for biases and 1-D weights) in
    # get_megatron_optimizer, not inside _get_param_groups: pass them (tests/pretrain/engine/test_deepspeed.py)
    config = optimizer_config(cfg)
    groups = [g for g in _get_param_groups([module], config, get_standard_config_overrides(config)) if g["params"]]
    for group in groups:
        if group["is_expert_parallel"]:
            for p in group["params"]:
                p.group_name = EXPERT_GROUP
            group.update(moe=True, name=EXPERT_GROUP)
    return groups


def _sum_over_tp_when_produced(module, tconfig) -> None:
    """The weights finalize_model_grads sums (or averages) over TP: each TP rank saw other tokens."""
    tp_group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return

    def reducer(op):
        def hook(grad):
            grad = grad.clone()
            dist.all_reduce(grad, op=op, group=tp_group)
            return grad
        return hook

    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "average_gradients_across_tp_domain", False):
            p.register_hook(reducer(dist.ReduceOp.AVG))
        elif (tconfig.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
                tconfig.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)):
            p.register_hook(reducer(dist.ReduceOp.SUM))


def ds_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # megatron's schedule accumulates; step() is the boundary
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.clip_grad,
        "bf16": {"enabled": cfg.model_options.bf16},
        "zero_optimization": {
            "stage": cfg.zero_stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": cfg.zero_stage == 2 and torch.cuda.is_available(),
            **({"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}
               if cfg.zero_offload_optimizer else {}),
        },
        # our torch AdamW (megatron-core's "adam") also when the state is offloaded
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def base_optimizer_class(offload: bool) -> type:
    """AdamW as megatron-core picks it (TE's fused, apex's fused, else torch); with the state
    offloaded, DeepSpeed's CPU Adam on a GPU machine (its C++ op, built on first use), else torch."""
    if offload:
        if torch.cuda.is_available():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam  # adamw_mode=True by default: decoupled weight decay
        return torch.optim.AdamW
    from megatron.core.optimizer import Adam

    return Adam


class ScheduleView:
    """What megatron's schedule and our checkpointing see as the model chunk: calls go through
    the engine (its backward hooks), `config` is megatron's (the engine's own `config` is
    DeepSpeed's dict) and `module` the megatron model, as under megatron's DDP."""

    def __init__(self, engine, tconfig):
        self.engine, self.config, self.module = engine, tconfig, engine.module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def parameters(self):
        return self.engine.module.parameters()

    def train(self, mode: bool = True):
        self.engine.train(mode)
        return self

    def eval(self):
        return self.train(False)


class DeepSpeedEngine(Engine):
    """The Engine over DeepSpeed ZeRO-1/2; its `optimizer` is DeepSpeed's ZeRO optimizer (the LR/WD
    scheduler sets its param groups). The schedule's normalization by global tokens lives here."""

    name = "deepspeed"

    def __init__(self, chunks, tconfig, cfg: TrainConfig):
        import deepspeed
        from deepspeed.runtime.config import DeepSpeedConfig

        from pretrain.engine.optimizer import wrap_precision

        (module,) = wrap_precision(chunks, tconfig)  # no pipeline parallelism (checked by the arguments)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   dist_init_required=False)
        register_expert_groups(ps.get_expert_model_parallel_group(), ps.get_expert_data_parallel_group())
        _sum_over_tp_when_produced(module, tconfig)
        base = base_optimizer_class(cfg.zero_offload_optimizer)(
            _param_groups(module, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        mpu, config = _mpu(), ds_config(cfg)
        self.ds = engine_class(_is_expert)(args=None, model=module, optimizer=base, mpu=mpu, config=config,
                                           config_class=DeepSpeedConfig(config, mpu), dist_init_required=False)
        self.tconfig = tconfig
        self.model = [ScheduleView(self.ds, tconfig)]
        self.optimizer = self.ds.optimizer
        self.dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
        self._scale = 1.0

    def zero_grad(self) -> None:
        self.ds.optimizer.zero_grad()

    def begin_step(self, microbatches: list[dict]) -> None:
        # DeepSpeed divides by the data-parallel size; megatron divides by the global token count.
        # The micro-batches are still on the host (the forward step moves them): NCCL needs the device.
        device = next(self.ds.module.parameters()).device
        tokens = torch.stack([mb["loss_mask"].sum() for mb in microbatches]).sum().reshape(1).to(device)
        dist.all_reduce(tokens, group=ps.get_data_parallel_group(with_context_parallel=True))
        self._scale = self.dp_size / int(tokens.item())

    def scale_loss(self, loss):
        return loss * self._scale

    def finalize_grads(self, *args, **kwargs) -> None:
        """What megatron's finalize_model_grads does that DeepSpeed does not (see the module doc)."""
        modules = [m.module for m in self.model]
        if self.tconfig.moe_router_enable_expert_bias:
            _update_router_expert_bias(modules, self.tconfig)
        reset_model_temporary_tensors(self.tconfig, modules)

    def step(self) -> tuple[bool, float | None, None]:
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return self.ds.was_step_applied(), (float(norm) if norm is not None else None), None

    def report(self) -> dict[str, str]:
        zero = self.ds.optimizer
        return {"optimizer": f"{origin(type(zero))} over {origin(type(zero.optimizer))}",
                "grad-norm+clip": "DeepSpeed ZeRO (per partition)"}

    def reload_model_params(self) -> None:
        self.ds.optimizer._restore_from_bit16_weights()

    def check_resumable(self, saved: dict, layout: dict, where: str) -> None:
        super().check_resumable(saved, layout, where)
        if saved.get("layout") != layout:
            raise CheckpointError(f"{where} holds DeepSpeed ZeRO state partitioned for the layout "
                                  f"{saved.get('layout')}; resume at that layout (this run: {layout})")

    def rank_state_dict(self) -> dict:
        return self.ds.optimizer.state_dict()  # this rank's ZeRO partition, fp32 master copy included

    def load_rank_state_dict(self, state: dict | None) -> None:
        # DeepSpeed takes a list indexed by data-parallel rank and reads only this rank's entry at
        # an unchanged layout.
        states = [None] * self.dp_size
        states[ps.get_data_parallel_rank(with_context_parallel=True)] = state
        self.ds.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
