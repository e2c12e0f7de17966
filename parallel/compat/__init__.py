"""Every patch of third-party code, in one place: no module outside this package replaces, wraps or
fills in an object of megatron-core, Transformer Engine, DeepSpeed or torch.

A patch reaches into a library's internals (often private names), so each one is written against the version
below and re-derived when that library is upgraded: megatron-core 0.19.2, DeepSpeed 0.19.8, torch 2.13. Each
upstream behaviour a patch relies on has a test that fails when it changes (the upstream functions' shapes in
tests/parallel/test_compat.py, each behaviour beside the code that relies on it), so the next upgrade is
mechanical; docs/COMPAT.md lists them with what the move from 0.16.1 dropped. Transformer Engine: none of its
objects is patched (only megatron-core's stand-ins for it, when it is absent). Importing this package patches
nothing.

`patch_megatron()` (by parallel/runtime.init_model_parallel, before any model is built) applies the
patches every run needs, GPU or CPU:
  - megatron_without_te.py: where TE is absent, `tensor_parallel.random.CheckpointWithoutOutput`
    (selective recompute) asks TE's FP8 state: told "FP8 off";
  - megatron_mtp.py: `multi_token_prediction.process_mtp_loss` (and hybrid_model's and gpt_model's imported names) records
    the rank's pre-roll token count, and `roll_tensor` as it calls it returns a count that makes each MTP
    depth's per-token weight the context-parallel group's, not the rank's; and the name gpt_model and
    hybrid_model call becomes model/modules/mtp_objective.py's dispatch by --mtp-loss-type (cross-entropy:
    upstream's, its logits tapped for the acceptance log; e2e_tv: GLM-5.2's objective).

torch_checkpoint.py -- torch 2.13's distributed-checkpoint reader (`FileSystemReader.read_metadata`'s
`pickle.load` of `.metadata`, `DefaultLoadPlanner.load_bytes`'s `torch.load(weights_only=False)` of each
stored object), which megatron-core, the export and the tools read through: both admit checkpoint data only
(allowlists), so a checkpoint cannot run code; by `patch_megatron()` and by every reader of checkpoints
(pretrain/checkpoint/checkpointer.py, pretrain/checkpoint/integrity.py, tools/export_hf.py).

megatron_muon.py -- with --optimizer muon (pretrain/engine/optimizer.py): one more entry in megatron-core's
emerging-optimizer registry, upstream's Muon with GLM-5's per-head MLA split and our Adam side; with
--use-distributed-optimizer, megatron-core's layer-wise distributed optimizer run in fp32 (upstream wraps only
bf16) and over gloo (its uneven parameter all-gather padded there).

megatron_cpu.py -- megatron-core 0.19.2 and torch.cuda, only on a machine without CUDA
(`activate()`, by parallel/runtime.py; does nothing where CUDA is present). megatron-core assumes
CUDA in about a dozen places; the CPU/gloo runtime (debugging, CI) needs it on the CPU:
  - a process-wide TorchFunctionMode: CUDA device arguments become "cpu", `Tensor.cuda()` is a
    no-op, `Tensor.type()` answers the CUDA type name -- the schedules, optimizer, grad clipping, MoE
    trackers and dist-checkpointing put tensors on "cuda", the optimizers check for
    `torch.cuda.FloatTensor`;
  - `torch.cuda.current_device`, `set_device`, `device_count`, `synchronize`, `Stream`, `Event`,
    `current_stream`, `default_stream`, `stream`, `memory_allocated`, `max_memory_allocated`,
    `reset_peak_memory_stats`, `empty_cache` -> CPU stand-ins: megatron calls them for buffers,
    the token dispatcher's streams, timers and memory reports;
  - `torch.cuda.get_rng_state`/`set_rng_state` (and `torch.cuda.random`'s) and megatron's
    `tensor_parallel.random._get_cuda_rng_state`/`_set_cuda_rng_state` -> the CPU generator's:
    the CUDA RNG tracker forks and restores "CUDA" RNG state;
  - `moe_utils.maybe_move_tensor_to_cpu` (and the token dispatcher's imported copy) returns numpy
    for CPU tensors too: it converts only CUDA tensors, and gloo's all_to_all_single refuses tensor
    split sizes.

megatron_meta.py -- torch.cuda.current_device, only inside `on_meta()` (tools/simulate_layout.py),
restored on exit: answers a CUDA ordinal, and a TorchFunctionMode sends megatron's "GPU" tensors
to the meta device, so one CPU builds any rank of a large layout without storage.

deepspeed.py -- DeepSpeed 0.19.8 under --dp-engine deepspeed (pretrain/engine/deepspeed_zero.py):
  - registers megatron's expert and expert-data-parallel groups in DeepSpeed's private group tables
    (`groups._EXPERT_*`) under one name;
  - an engine subclass that answers `has_moe_layers` from the parameters (DeepSpeed looks for its
    own MoE layer class).

megatron_checkpoint.py -- megatron-core 0.19.2's checkpointing (pretrain/checkpoint/checkpointer.py, pretrain/engine/megatron.py):
  - the checkpoint writer's multiprocessing results queue (`filesystem_async._results_queue`)
    created with a server that dies with its parent (a SIGKILLed trainer leaves no orphan); it is
    the writer of `save(async_strategy="mcore")`, which pretrain/checkpoint/checkpointer.py asks for (0.19's
    default, "nvrx", is nvidia-resiliency-ext's writer, which this patch does not reach);
  - the distributed optimizer's per-parameter state copy (`_set_main_param_and_optimizer_states`,
    per instance) wrapped for torch Adam, so every parameter gets its own step tensor.
"""


def patch_megatron() -> None:
    """The megatron-core patches every run needs (above); idempotent."""
    from model.transformer_impl import te_available
    from parallel.compat.megatron_mtp import mtp_loss_types
    from parallel.compat.megatron_without_te import repair_te_stand_ins, share_storage_without_jit
    from parallel.compat.torch_checkpoint import read_checkpoints_as_data

    read_checkpoints_as_data()
    repair_te_stand_ins(te_present=te_available())
    share_storage_without_jit()
    mtp_loss_types()
