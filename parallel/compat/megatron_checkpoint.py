"""Patches of megatron-core 0.19.2's checkpointing (dist_checkpointing's async writer, the distributed
optimizer's state loading). Listed with their reasons in parallel/compat/__init__.py."""

from __future__ import annotations

_QUEUE_MANAGER = None


def _die_with_parent() -> None:
    """Runs in the queue's server process: end it when its parent dies (Linux prctl)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def results_queue_dies_with_us() -> None:
    """megatron-core's checkpoint writer collects results through a multiprocessing Manager queue:
    a server process that would outlive a SIGKILLed trainer, orphaned, holding the job's output
    open. Create that manager ourselves (its module-level `_results_queue`), with a server that
    dies with its parent."""
    global _QUEUE_MANAGER
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _QUEUE_MANAGER = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _QUEUE_MANAGER.start(initializer=_die_with_parent)
        filesystem_async._results_queue = _QUEUE_MANAGER.Queue()


def load_step_per_parameter(opt) -> None:
    """For one megatron DistributedOptimizer over torch Adam/AdamW. It copies each parameter's state
    from the checkpoint tensor by tensor; the step count comes from the param groups instead, so
    torch Adam's per-parameter `step` has no tensor to copy from, and megatron gives all parameters
    one shared `step` tensor (which Adam would then increment once per parameter). Wrap the
    instance's copy: copy everything else, and give each parameter its own copy of the step."""
    if "_set_main_param_and_optimizer_states" in vars(opt):  # wrapped already
        return
    copy_states = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            copy_states(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    opt._set_main_param_and_optimizer_states = set_states
