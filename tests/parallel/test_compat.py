"""parallel/compat/: every upstream behaviour that a patch or a workaround relies on (docs/COMPAT.md) is held
here, so that the next megatron-core or torch upgrade fails a test instead of changing training silently;
and the CPU runtime's recompute builds nothing. What each behaviour protects is tested beside its owner
(e.g. tests/pretrain/checkpoint/test_upgrade.py: checkpoints of the 0.16.1 stack still load)."""

from __future__ import annotations

import inspect

import torch


def test_upstream_shapes_the_patches_rely_on():
    """The functions and defaults parallel/compat/ patches or works around (docs/COMPAT.md): a change here
    means re-deriving that patch."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
    from megatron.core.transformer import multi_token_prediction as mtp
    from megatron.core.transformer.moe import moe_utils

    # megatron_without_te: fp8=False still asks TE's FP8 state; the recomputed outputs go back through a
    # C++ extension built at first use
    assert CheckpointWithoutOutput(fp8=False).fp8 is True
    assert "share_storage = _get_share_storage()" in inspect.getsource(CheckpointWithoutOutput._recompute)
    # megatron_checkpoint: the async writer's queue, the default strategy we override, the per-state copy
    assert hasattr(filesystem_async, "_results_queue")
    assert inspect.signature(dist_checkpointing.save).parameters["async_strategy"].default == "nvrx"
    assert "tensors" in inspect.signature(DistributedOptimizer._set_main_param_and_optimizer_states).parameters
    # megatron_mtp: process_mtp_loss takes its counts from the module's roll_tensor
    assert "roll_tensor(" in inspect.getsource(mtp.process_mtp_loss)
    assert "original_num_tokens / num_tokens_safe" in inspect.getsource(mtp.process_mtp_loss)
    # ... which models/hybrid/hybrid_model.py (ours) and models/gpt/gpt_model.py call by their imported
    # names (wrapped there too), cp_group by keyword
    from megatron.core.models.gpt import gpt_model
    from megatron.core.models.hybrid import hybrid_model

    for module in (hybrid_model, gpt_model):
        assert "process_mtp_loss" in vars(module) and "cp_group=self.pg_collection.cp" in inspect.getsource(module)
    # --mtp-loss-type (model/modules/mtp_objective.py): HybridModel calls it by its imported name too; the
    # cross-entropy tap relies on one compute_language_model_loss call per depth, after that depth's label
    # roll; e2e_tv on the scale per depth and the autoscaler; mtp_loss_type is ours (upstream has none yet)
    from megatron.core.transformer.transformer_config import TransformerConfig

    loop = inspect.getsource(mtp.process_mtp_loss)
    assert loop.count("compute_language_model_loss(") == 1 and loop.index("mtp_labels, _ = roll_tensor(") < \
        loop.index("compute_language_model_loss(mtp_labels, mtp_logits)")
    assert "config.mtp_loss_scaling_factor / config.mtp_num_layers" in loop and "MTPLossAutoScaler.apply" in loop
    assert hasattr(mtp, "_mtp_logits_are_vocab_sharded")
    fields = TransformerConfig.__dataclass_fields__
    assert "mtp_detach_heads" in fields and "mtp_loss_type" not in fields
    # megatron_muon: the registry entry we copy, the hook we override, the orthogonalizer we call per head
    from megatron.core.optimizer import emerging_optimizers as eo

    muon = eo._EMERGING_OPTIMIZERS["muon"]
    assert muon.optimizer_cls is eo.TensorParallelMuon and muon.config_to_kwargs is eo._muon_config_to_kwargs
    assert "self.orthogonalize(p, grad" in inspect.getsource(eo.OrthogonalizedOptimizer.step)
    assert "def scaled_orthogonalize_fn(\n            grad" in inspect.getsource(eo.TensorParallelMuon.__init__)
    assert "check_config_overrides_consistency" in inspect.getsource(mcore_optimizer.get_megatron_optimizer)
    # ... and the layer-wise distributed optimizer: its constructor's arguments, bf16-only wrapping, the uneven
    # all-gather we pad over gloo, the nested state layout its checkpoint code reads
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer as LayerWise

    assert list(inspect.signature(LayerWise.__init__).parameters)[1:] == [
        "optimizers", "config", "pg_collection", "init_state_fn_list", "model_chunks"]
    assert "if config.bf16:" in inspect.getsource(LayerWise.__init__)
    assert "torch.distributed.all_gather(gather_list, src, group=group)" in inspect.getsource(LayerWise.allgather_params)
    assert "sd['optimizer']['state']" in inspect.getsource(LayerWise.sharded_state_dict)
    # megatron_cpu: the dispatcher converts only CUDA split sizes to numpy (read from the file: the CPU
    # runtime of this process has replaced the function)
    source = inspect.getsource(moe_utils)
    assert "tensor.is_cuda" in source[source.index("def maybe_move_tensor_to_cpu"):][:1200]
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import token_dispatcher

    assert "maybe_move_tensor_to_cpu" in vars(token_dispatcher)  # the imported copy megatron_cpu replaces too
    source = inspect.getsource(mc_random)
    assert "def _get_cuda_rng_state" in source and "def _set_cuda_rng_state" in source
    # torch_checkpoint: the metadata is unpickled by filesystem.py's `pickle.load`; stored objects by
    # load_bytes, whose body (weights_only=False, then set_element or state_dict) our replacement repeats
    from torch.distributed.checkpoint import default_planner, filesystem

    from parallel.compat import torch_checkpoint

    assert "pickle.load(metadata_file)" in inspect.getsource(filesystem.FileSystemReader.read_metadata)
    load_bytes = torch_checkpoint._ORIGINAL_LOAD_BYTES or default_planner.DefaultLoadPlanner.load_bytes
    body = inspect.getsource(load_bytes)
    assert body.count("torch.load(") == 2 and body.count("weights_only=False") == 2
    assert "set_element(" in body and "self.mappings[read_item.dest_index.fqn]" in body
    assert "self.state_dict[read_item.dest_index.fqn] = " in body and "self.flatten_state_dict" in body
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    assert "load_bytes" not in vars(MCoreLoadPlanner)  # megatron-core inherits torch's


def test_selective_recompute_on_cpu_builds_nothing_and_matches(monkeypatch):
    """megatron-core's output-discarding recompute on CPU tensors gives the gradients of no recompute,
    through a view of the discarded output, without JIT-building its C++ extension (a build that once
    hung CI on a lock a killed process left behind)."""
    import megatron.core.tensor_parallel.random as mc_random
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    from parallel.compat import megatron_cpu, patch_megatron

    megatron_cpu.activate()
    patch_megatron()

    def no_build(*args, **kwargs):
        raise AssertionError("the CPU runtime must not JIT-build megatron's share_storage extension")

    monkeypatch.setattr(mc_random, "load_inline", no_build)
    torch.manual_seed(0)
    x0, w0 = torch.randn(4, 8), torch.randn(8, 8)

    def grads(recompute: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        layer = lambda a: torch.nn.functional.gelu(a @ w)  # noqa: E731
        if recompute:
            ckpt = CheckpointWithoutOutput(fp8=False)
            h = ckpt.checkpoint(layer, x)
        else:
            h = layer(x)
        loss = (h.view(2, 16)[:, 3:] ** 2).sum()  # pow saves a view of h: backward reads the refilled storage
        if recompute:
            ckpt.discard_output_and_register_recompute(loss)
            assert h.untyped_storage().nbytes() == 0
        loss.backward()
        return x.grad, w.grad

    for got, want in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
