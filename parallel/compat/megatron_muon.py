"""megatron-core 0.19.2's emerging-optimizer registry extended with GLM-5's Muon (listed in
parallel/compat/__init__.py).

`optimizer/emerging_optimizers._EMERGING_OPTIMIZERS` maps an optimizer name to its class, the kwargs
it takes from OptimizerConfig and the parameters it hands to Adam; its docstring invites new entries.
`register_muon_variant(name, cls, to_adam)` adds one more, a subclass of upstream's TensorParallelMuon
(pretrain/engine/muon.py: MLA's up-projections orthogonalized head by head) built exactly as upstream's `muon`
entry builds TensorParallelMuon (same kwargs from the `muon_*` fields), whose Adam side is the
parameters `to_adam(param)` names (an entry's own overrides are the one place megatron-core lets a
parameter's optimizer be chosen: `check_config_overrides_consistency` refuses it in the caller's).
Upstream's entries are left as they are. Held by `test_upstream_shapes_the_patches_rely_on`.
"""

from __future__ import annotations

import dataclasses


def register_muon_variant(name: str, optimizer_cls: type, to_adam) -> None:
    from megatron.core.optimizer import emerging_optimizers as eo
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate

    adam_side = ParamKey(predicate=ParamPredicate(name=f"{name}_adam_side", fn=to_adam))
    eo._EMERGING_OPTIMIZERS[name] = dataclasses.replace(
        eo._EMERGING_OPTIMIZERS["muon"], optimizer_cls=optimizer_cls,
        default_param_overrides={adam_side: {"optimizer": "adam"}})


def layer_wise_for_any_precision_and_backend() -> None:
    """megatron-core 0.19.2's `LayerWiseDistributedOptimizer` (optimizer/layer_wise_optimizer.py: each
    data-parallel rank steps whole matrices, then all-gathers them), which `--use-distributed-optimizer`
    selects for Muon, made to run where upstream's does not; idempotent, inert where upstream runs:
    - `__init__` wraps its base torch optimizers in megatron's mixed-precision optimizer under bf16 only,
      leaving fp32 runs with raw torch optimizers (they fail at `get_loss_scale`): fp32 runs get megatron's
      `FP32Optimizer`, whose state is nested under "optimizer" as the mixed-precision one's is, which
      `sharded_state_dict` / `load_state_dict` read (`FP32Optimizer` itself keeps it flat);
    - `allgather_params` all-gathers each rank's flattened shard with its own length, which NCCL takes
      and gloo refuses: over a gloo group the shards are padded to the longest and cut after."""
    import torch
    from megatron.core.optimizer import layer_wise_optimizer as lw
    from megatron.core.optimizer.optimizer import FP32Optimizer

    cls = lw.LayerWiseDistributedOptimizer
    if getattr(cls, "_glm5_patched", False):
        return
    init, allgather_params, all_gather = cls.__init__, cls.allgather_params, torch.distributed.all_gather

    def __init__(self, optimizers, config, pg_collection=None, init_state_fn_list=None, model_chunks=None):
        if not config.bf16:
            fns = init_state_fn_list or [None] * len(optimizers)
            optimizers = [_NestedFP32Optimizer(o, config, fn) for o, fn in zip(optimizers, fns)]
        init(self, optimizers, config, pg_collection, init_state_fn_list, model_chunks)

    class _NestedFP32Optimizer(FP32Optimizer):
        def sharded_state_dict(self, *args, **kwargs):
            return {"optimizer": super().sharded_state_dict(*args, **kwargs)}

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict["optimizer"])

    def gloo_all_gather(gather_list, src, group):
        longest = max(t.numel() for t in gather_list)
        padded = [torch.empty(longest, device=src.device, dtype=src.dtype) for _ in gather_list]
        mine = torch.zeros(longest, device=src.device, dtype=src.dtype)
        mine[:src.numel()] = src
        all_gather(padded, mine, group=group)
        for out, got in zip(gather_list, padded):
            if out is not src:
                out.copy_(got[:out.numel()])

    @torch.no_grad()
    def allgather_params_any_backend(self):
        groups = [g for g in (self.dp_cp, self.expt_dp) if g is not None]
        if not any(torch.distributed.get_backend(g) == "gloo" for g in groups):
            return allgather_params(self)
        torch.distributed.all_gather = gloo_all_gather  # upstream's call, for this method's duration
        try:
            return allgather_params(self)
        finally:
            torch.distributed.all_gather = all_gather

    cls.__init__, cls.allgather_params, cls._glm5_patched = __init__, allgather_params_any_backend, True
