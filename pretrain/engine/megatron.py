"""The data-parallel engine: what owns gradient reduction, the optimizer and the optimizer's state.

The trainer and checkpointing talk to an `Engine` and never ask which one it is. Two implementations:
megatron-core's DDP + optimizer (plain or distributed) here, DeepSpeed ZeRO-1/2 in
pretrain/engine/deepspeed_zero.py. megatron-core's pipeline schedule drives both: it calls the model
chunks in `engine.model` and the schedule hooks the engine installs on the TransformerConfig
(`grad_scale_func`, `finalize_model_grads_func`, and for overlap `no_sync_func` / `param_sync_func`).
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path

from megatron.core.distributed import finalize_model_grads

from pretrain.engine import optimizer_state
from pretrain.checkpoint.checkpointer import SHARDING_METADATA
from pretrain.config.train_config import TrainConfig
from pretrain.engine.implementations import megatron_optimizer_report
from pretrain.engine.optimizer import build_optimizer, shards_grad_buffers, wrap_ddp, wrap_precision
from pretrain.checkpoint.run_state import CheckpointError


class Engine(abc.ABC):
    name: str  # recorded in checkpoints ("dp_engine")
    model: list  # the model chunks as megatron's schedule calls them
    optimizer: object  # has `param_groups` (the LR/WD scheduler's handle)

    def attach(self, tconfig, before_finalize) -> None:
        """Install the schedule hooks; `before_finalize()` runs first when the schedule finalizes the
        step's gradients (the MoE load statistics are read there, before the bias update)."""
        def finalize(*args, **kwargs):
            before_finalize()
            return self.finalize_grads(*args, **kwargs)

        tconfig.finalize_model_grads_func = finalize
        tconfig.grad_scale_func = self.scale_loss

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    def begin_step(self, microbatches: list[dict]) -> None:
        """Before the step's forward-backward, with its micro-batches (still on the host)."""

    @abc.abstractmethod
    def scale_loss(self, loss): ...

    @abc.abstractmethod
    def finalize_grads(self, *args, **kwargs): ...

    @abc.abstractmethod
    def step(self) -> tuple[bool, float | None, float | None]:
        """(whether the update was applied, the gradient norm, the number of zero gradient values: None
        unless --log-num-zeros-in-grad, which the arguments allow only where the engine counts them)."""

    def report(self) -> dict[str, str]:
        """The optimizer and gradient-norm implementations, for the start-up log."""
        return {}

    # --- checkpoints ----------------------------------------------------------------------
    def saving(self):
        """Context for the duration of a save."""
        return contextlib.nullcontext()

    def describe(self) -> dict:
        """What the checkpoint records about the engine (RunState fields)."""
        return {"dp_engine": self.name}

    def check_resumable(self, saved: dict, layout: dict, where: str) -> None:
        """Refuse a checkpoint this engine cannot resume at this run's `layout` (CheckpointError naming
        the way out)."""
        theirs = saved.get("dp_engine", "megatron")
        if theirs != self.name:
            raise CheckpointError(f"{where} holds {theirs}'s optimizer state, this run uses --dp-engine {self.name}: "
                                  f"resume with --dp-engine {theirs}")

    def sharded_state_dict(self, model_state: dict, is_loading: bool) -> dict:
        """Reshardable optimizer state, saved with the model's tensors ({} when the engine keeps none)."""
        return {}

    def prepare_load(self, request: dict, directory: Path, saved: dict) -> None:
        """Adjust the load request (model + `sharded_state_dict`) to what the checkpoint holds."""

    def load_sharded(self, loaded: dict, request: dict, saved: dict, same_layout: bool) -> None:
        """Take the optimizer state from a load of `request`."""

    def rank_state_dict(self) -> dict | None:
        """This rank's own state (saved per rank, resumed at the same layout only)."""
        return None

    def load_rank_state_dict(self, state: dict | None) -> None:
        pass

    @abc.abstractmethod
    def reload_model_params(self) -> None:
        """The weights were loaded from outside (an HF import): refresh the optimizer's copies."""


class MegatronEngine(Engine):
    """megatron-core's DDP (gradient buckets, overlap) and optimizer (plain or distributed)."""

    name = "megatron"

    def __init__(self, chunks, tconfig, cfg: TrainConfig):
        self.cfg = cfg
        self.model = wrap_ddp(wrap_precision(chunks, tconfig), tconfig, cfg)
        self.optimizer = build_optimizer(self.model, cfg, timers=tconfig.timers)

    def attach(self, tconfig, before_finalize) -> None:
        super().attach(tconfig, before_finalize)
        if self.cfg.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self._gathers_params_in_forward:
            sync = [m.start_param_sync for m in self.model]
            tconfig.param_sync_func = sync[0] if len(sync) == 1 else sync

    @property
    def _gathers_params_in_forward(self) -> bool:
        return self.cfg.overlap_param_gather and shards_grad_buffers(self.cfg)

    def zero_grad(self) -> None:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def scale_loss(self, loss):
        return self.optimizer.scale_loss(loss)

    def finalize_grads(self, *args, **kwargs):
        return finalize_model_grads(*args, **kwargs)

    def step(self) -> tuple[bool, float | None, float | None]:
        updated, grad_norm, num_zeros = self.optimizer.step()
        return updated, grad_norm, (num_zeros if self.cfg.observability.log_num_zeros_in_grad else None)

    def report(self) -> dict[str, str]:
        items = megatron_optimizer_report()
        if self.cfg.optimizer == "muon":
            items["optimizer"] = "megatron-core Muon (emerging-optimizers, MLA heads split: pretrain/engine/muon.py) + " \
                                 + items["optimizer"].removeprefix("megatron-core over ")
        return items

    def reload_model_params(self) -> None:
        self.optimizer.reload_model_params()  # fp32 main copies (bf16) were made from the init

    # --- checkpoints ----------------------------------------------------------------------
    @contextlib.contextmanager
    def saving(self):
        # --overlap-param-gather leaves the all-gather of the updated parameters to the next forward's
        # pre-hooks: finish it now, or each rank saves the other ranks' shards from the step before
        # (Megatron-LM disables the hooks around its saves the same way).
        if not self._gathers_params_in_forward:
            yield
            return
        for m in self.model:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in self.model:
                m.enable_forward_pre_hook()

    def describe(self) -> dict:
        return {"dp_engine": self.name, "distributed_optimizer": optimizer_state.is_distributed(self.optimizer),
                "optimizer": self.cfg.optimizer}

    def check_resumable(self, saved: dict, layout: dict, where: str) -> None:
        super().check_resumable(saved, layout, where)
        theirs = saved.get("optimizer", "adam")
        if theirs != self.cfg.optimizer:
            raise CheckpointError(f"{where} holds {theirs}'s optimizer state, this run uses --optimizer "
                                  f"{self.cfg.optimizer}: resume with --optimizer {theirs}")

    def sharded_state_dict(self, model_state: dict, is_loading: bool) -> dict:
        if is_loading:
            self._prepare_fresh_state()
        # The nested {model0: ..., model1: ...} of interleaved pipelining, not a merged dict: the
        # chunks' keys are local to each chunk and would overwrite each other.
        return {"optimizer": self.optimizer.sharded_state_dict(dict(model_state), is_loading=is_loading,
                                                               metadata=SHARDING_METADATA)}

    def _prepare_fresh_state(self) -> None:
        from parallel.compat.megatron_checkpoint import load_step_per_parameter

        optimizer_state.materialize_adam_state(self.optimizer)
        for opt in optimizer_state.sub_optimizers(self.optimizer):
            if optimizer_state.is_distributed(opt) and optimizer_state.keeps_step_per_parameter(opt.optimizer):
                load_step_per_parameter(opt)

    def _switched(self, saved: dict) -> bool:
        """Saved without --use-distributed-optimizer, loaded with it."""
        return optimizer_state.is_distributed(self.optimizer) and not saved.get("distributed_optimizer", False)

    def prepare_load(self, request: dict, directory: Path, saved: dict) -> None:
        if self.cfg.optimizer == "muon":  # param groups differ by layout: this run's are used (optimizer_state)
            self._param_groups = optimizer_state.take_param_groups(request["optimizer"])
        if self._switched(saved):
            optimizer_state.main_params_from_plain_checkpoint(request["optimizer"], directory)

    def load_sharded(self, loaded: dict, request: dict, saved: dict, same_layout: bool) -> None:
        state = loaded["optimizer"]
        if self._switched(saved):
            models = [k for k in request if k != "optimizer"]
            optimizer_state.fill_from_weights(state, {k: request[k] for k in models}, {k: loaded[k] for k in models})
        if self.cfg.optimizer == "muon":
            optimizer_state.put_param_groups(self._param_groups)
        if not same_layout or self._switched(saved) or self.cfg.optimizer == "muon":
            state = optimizer_state.conform(request["optimizer"], state)
        self.optimizer.load_state_dict(state)

