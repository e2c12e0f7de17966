"""TrainConfig: the one config object that flows through a run (built by pretrain/config/arguments.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import GLM5Config
from model.mcore_config import ModelOptions
from parallel.dims import ParallelDims
from pretrain.engine.muon import MuonOptions
from pretrain.metrics.config import ObservabilityConfig
from pretrain.recipe import RecipeConfig
from pretrain.checkpoint.stages import LoadOptions


@dataclass
class TrainConfig:
    model: GLM5Config
    model_options: ModelOptions
    dims: ParallelDims
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    preset: str = "tiny"
    seq_length: int = 64
    micro_batch_size: int = 1
    global_batch_size: int = 8
    rampup_batch_size: list[int] | None = None  # [start, increment, ramp-up samples], Megatron-LM's
    train_iters: int = 20
    # optimizer and schedule (Megatron-LM names)
    optimizer: str = "adam"  # or "muon" (pretrain/engine/muon.py: Muon for the matrices, AdamW for the rest)
    muon: MuonOptions = field(default_factory=MuonOptions)
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: str = "cosine"
    # on --load, which LR/WD schedule wins when the flags and the checkpoint differ (Megatron-LM's flags)
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    dp_engine: str = "megatron"  # or "deepspeed" (ZeRO-1/2, pretrain/engine/deepspeed_zero.py)
    zero_stage: int = 2
    zero_offload_optimizer: bool = False
    seed: int = 1234
    # data
    mock_data: bool = False
    data_path: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    num_workers: int = 0
    skip_bad_shards: bool = False
    data_allow_pipe: bool = False  # manifests may name pipe: commands (docs/DATA.md, Remote data)
    valid_data_path: list[str] = field(default_factory=list)
    eod_mask_loss: bool = False  # no loss where the input token is EOD (Megatron-LM's --eod-mask-loss)
    # packed documents (model/modules/documents.py): attention and RoPE positions per document
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    # evaluation (pretrain/evaluate.py): every eval_interval iterations and at the end, eval_iters global batches
    eval_interval: int | None = None
    eval_iters: int = 100
    # logging
    log_interval: int = 1
    tensorboard_dir: str | None = None
    # timers, memory, norms, profiler, W&B, expert-load picture (pretrain/metrics/config.py)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    # checkpoints
    save: str | None = None
    load: str | None = None
    load_options: LoadOptions = field(default_factory=LoadOptions)  # --finetune, --no-load-optim, --no-load-rng
    save_interval: int | None = None
    async_save: bool = False
    exit_interval: int | None = None
    # faults
    max_consecutive_skipped_iters: int = 5
    loss_spike_factor: float | None = None
    skip_loss_spikes: bool = False
    # runtime
    distributed_timeout_s: float = 600.0

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dims.dp)
