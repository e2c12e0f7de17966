"""Held-out evaluation, as Megatron-LM's `--eval-interval N --eval-iters M` with a validation set.

Every N iterations and at the end of training, M global batches of the validation set go
forward-only through megatron-core's schedule for the run's layout (the same schedule as training,
`forward_only=True`), with the model in eval mode and no autograd graph. The validation reader is
rewound first, so every evaluation sees the same M batches and the points of the curve compare.

Nothing that training reads is touched: no gradients, no optimizer or scheduler step, no draw from
the training data or from any RNG. megatron-core's routers count tokens for the expert-bias update,
and the aux and indexer losses are tracked, only with autograd on (pretrain/metrics/moe_stats.py counts
under the same rule), so the next training step's load statistics and loss trackers are unchanged
(tests/pretrain/test_evaluation.py: a run with evaluation logs the same training numbers, bit for bit).

Reported (Megatron-LM's tags): `lm loss validation` (per token over the M batches),
`lm loss validation ppl`, and `mtp loss validation` (mean over micro-batches, as in training).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.pipeline_parallel import get_forward_backward_func

from data.loader import PretrainingData, build_valid_data
from pretrain.config.train_config import TrainConfig
from pretrain.step import split_microbatches, take_mtp_loss


def check_validation_set(cfg: TrainConfig) -> None:
    """Refuse, before any work, a validation set that cannot be compared with the training data or
    that holds fewer than --eval-iters global batches."""
    if cfg.eval_interval is None or cfg.mock_data:
        return
    from data.blend import parse_data_path
    from data.manifest_io import load_manifest

    train = load_manifest(parse_data_path(cfg.data_path)[1][0], allow_pipe=cfg.data_allow_pipe)
    weights, paths = parse_data_path(cfg.valid_data_path)
    valid = [load_manifest(p, allow_pipe=cfg.data_allow_pipe) for p in paths]
    for m in valid:
        for what, mine, theirs in (
                ("tokenizer", m.tokenizer.get("sha256"), train.tokenizer.get("sha256")),
                ("vocabulary size", m.tokenizer.get("vocab_size"), train.tokenizer.get("vocab_size")),
                ("token dtype", m.dtype, train.dtype), ("EOD id", m.eod_id, train.eod_id)):
            if mine != theirs:
                name = f" ({m.tokenizer.get('name')} vs {train.tokenizer.get('name')})" if what == "tokenizer" else ""
                raise ValueError(f"--valid-data-path {m.location}: its {what} {mine!r} is not the training data's "
                                 f"{theirs!r} ({train.location}){name}: build it with the same tokenizer and dtype")
    if weights is None:
        weights = [float(m.total_tokens) for m in valid]
    total = sum(weights)
    # A dataset drawn with weight w lasts tokens / w tokens of the blend; windows advance by seq_length.
    tokens = min(m.total_tokens * total / w for m, w in zip(valid, weights) if w > 0)
    per_batch = cfg.global_batch_size * cfg.seq_length
    holds = int(tokens // per_batch)
    if cfg.eval_iters > holds:
        raise ValueError(f"--eval-iters {cfg.eval_iters} needs {cfg.eval_iters * per_batch:,} validation tokens "
                         f"(global batch {cfg.global_batch_size} x seq {cfg.seq_length} each); --valid-data-path "
                         f"holds {int(tokens):,}: {holds} global batch(es). Use --eval-iters {max(holds, 1)} or a "
                         "larger validation set")


def build_validation_data(cfg: TrainConfig, dp_rank: int) -> PretrainingData:
    return build_valid_data(
        mock=cfg.mock_data, data_path=cfg.valid_data_path, seq_length=cfg.seq_length,
        global_batch_size=cfg.global_batch_size, dp_rank=dp_rank, dp_size=cfg.dims.dp, seed=cfg.seed,
        vocab_size=cfg.model.vocab_size, eos_token_id=cfg.model.eos_token_id, tokenizer_dir=cfg.tokenizer,
        allow_pipe=cfg.data_allow_pipe)


class Evaluator:
    def __init__(self, cfg: TrainConfig, model: list, forward_step, eod_id: int | None, documents=None):
        self.cfg, self.model, self.forward_step, self.eod_id = cfg, model, forward_step, eod_id
        self.documents = documents  # --reset-attention-mask / --reset-position-ids, as in training
        self.data = build_validation_data(cfg, parallel_state.get_data_parallel_rank())
        self._start = self.data.state_dict()  # where every evaluation starts

    def _rewind(self) -> None:
        self.data.load_state_dict(self._start)

    def _next_tokens(self) -> torch.Tensor:
        return self.data.next_batch(self.cfg.global_batch_size)["tokens"]

    def evaluate(self) -> dict[str, float]:
        """Every rank calls it (collectives); the scalars exist on the last pipeline stage."""
        cfg = self.cfg
        self._rewind()
        totals = torch.zeros(2)  # summed token losses, tokens
        num_microbatches = 0
        with _eval_mode(self.model), torch.no_grad():
            for _ in range(cfg.eval_iters):
                microbatches = split_microbatches(self._next_tokens(), cfg.micro_batch_size, eod_id=self.eod_id,
                                                  documents=self.documents)
                iterators = [iter(microbatches) for _ in self.model]
                losses = get_forward_backward_func()(
                    forward_step_func=self.forward_step,
                    data_iterator=iterators if len(iterators) > 1 else iterators[0],
                    model=self.model if len(self.model) > 1 else self.model[0],
                    num_microbatches=len(microbatches), seq_length=cfg.seq_length,
                    micro_batch_size=cfg.micro_batch_size, decoder_seq_length=cfg.seq_length, forward_only=True)
                num_microbatches += len(microbatches)
                if losses:
                    totals += torch.stack([d["lm loss"] for d in losses]).sum(0).cpu()
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return {}
        device = _device(self.model)
        totals = totals.to(device)
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        loss = float(totals[0] / totals[1])
        out = {"lm loss validation": loss, "lm loss validation ppl": math.exp(min(20.0, loss))}
        if cfg.model.mtp_depths(cfg.model_options.mtp_num_layers):
            out.update(take_mtp_loss(num_microbatches, " validation"))  # the average over data parallel
        return out


def _device(model: list) -> torch.device:
    return next(iter(model[0].parameters())).device


def _language_models(model: list) -> list[HybridModel]:
    return [m for chunk in model for m in getattr(chunk, "module", chunk).modules() if isinstance(m, HybridModel)]


@contextmanager
def _eval_mode(model: list):
    """Megatron-LM's evaluation state: eval mode, and with --overlap-param-gather the forward
    pre-hooks off after a forced parameter all-gather (as Megatron-LM does around evaluate)."""
    hooked = [m for m in model if getattr(m, "use_forward_hook", False)]
    for m in hooked:
        m.disable_forward_pre_hook()
    for m in model:
        m.eval()
    # megatron-core's HybridModel tracks the MTP loss only while its own `training` flag is set; its
    # submodules (routers, attention, dropout) stay in eval mode, and no_grad keeps the tracker's
    # training-only side effects (expert-bias counts, aux losses) off.
    for lm in _language_models(model):
        lm.training = True
    try:
        yield
    finally:
        for m in model:
            m.train()
        for m in hooked:
            m.enable_forward_pre_hook()
