"""Every patch of third-party code, in one place: no module outside this package replaces, wraps or
fills in an object of megatron-core, Transformer Engine, DeepSpeed or torch.

A patch reaches into a library's internals (often private names), so each one is written against
the version below and must be re-read against the new source when that library is upgraded:
megatron-core 0.16.1, DeepSpeed 0.19.8, torch 2.13. Transformer Engine: none of its objects is
patched (only megatron-core's stand-ins for it, when it is absent). Importing this package
patches nothing; each module's functions do, when the caller named below calls them.

megatron_cpu.py -- megatron-core 0.16.1 and torch.cuda, only on a machine without CUDA
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

megatron_without_te.py -- megatron-core 0.16.1 where Transformer Engine is absent, GPU or not
(`repair_te_stand_ins`, by model/specs.py before any layer is built): megatron replaces TE's names
by stand-ins that break its own local path:
  - `multi_latent_attention.HAVE_TE = False`: `TELinear` is a MagicMock while MLA believes TE is
    there, so its `isinstance(self.linear_proj, TELinear)` raises;
  - `moe_utils.te_general_gemm = None`: the fp32 router's gating references it, never defined;
  - `tensor_parallel.random.FP8GlobalStateManager`, `activation_recompute_forward`, `fp8_autocast`
    -> "FP8 off" and null contexts: selective recompute (`CheckpointWithoutOutput`) asks them,
    names only imported with TE.

megatron_config.py -- megatron-core 0.16.1's TransformerConfig validation (`mla_config_with_dsa_cp`,
by model/mcore_config.py): `__post_init__` refuses DSA with context parallelism (its DSAttention
has none; ours, model/modules/cp_attention.py, has), so the config is validated with CP = 1 and
the real degree set on it afterwards.

deepspeed.py -- DeepSpeed 0.19.8 under --dp-engine deepspeed (pretrain/deepspeed_engine.py):
  - registers megatron's expert and expert-data-parallel groups in DeepSpeed's private group tables
    (`groups._EXPERT_*`) under one name;
  - an engine subclass that answers `has_moe_layers` from the parameters (DeepSpeed looks for its
    own MoE layer class).

megatron_checkpoint.py -- megatron-core 0.16.1's checkpointing (pretrain/checkpointing.py, pretrain/engine.py):
  - the checkpoint writer's multiprocessing results queue (`filesystem_async._results_queue`)
    created with a server that dies with its parent (a SIGKILLed trainer leaves no orphan);
  - the distributed optimizer's per-parameter state copy (`_set_main_param_and_optimizer_states`,
    per instance) wrapped for torch Adam, so every parameter gets its own step tensor.
"""
