"""megatron-core 0.19.2's emerging-optimizer registry extended with GLM-5's Muon (listed in
parallel/compat/__init__.py).

`optimizer/emerging_optimizers._EMERGING_OPTIMIZERS` maps an optimizer name to its class, the kwargs
it takes from OptimizerConfig and the parameters it hands to Adam; its docstring invites new entries.
`register_muon_variant(name, cls, to_adam)` adds one more, a subclass of upstream's TensorParallelMuon
(pretrain/muon.py: MLA's up-projections orthogonalized head by head) built exactly as upstream's `muon`
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
