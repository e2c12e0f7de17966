"""The training loop. Build order: runtime -> layout -> model -> optimizer -> scheduler -> data ->
checkpoint -> train. megatron-core does the heavy lifting (schedules, DDP, optimizer, MoE dispatch).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    init_num_microbatches_calculator,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper

from data.batch_ramp import step_schedule
from data.errors import ShardError
from data.shard_check import check_listed_shards
from data.loader import build_train_data
from model.accounting import flops_per_token
from model.builder import build_model
from model.initialization import init_weights
from model.mcore_config import to_transformer_config
from parallel import runtime as rt
from pretrain.checkpoint import checkpointer as checkpointing
from pretrain.resilience import faults
from pretrain.config.arguments import OTHER_RANKS_WAIT_S
from pretrain.checkpoint.integrity import iteration_to_load
from pretrain.checkpoint.checkpointer import CheckpointParts, Checkpointer
from pretrain.config.train_config import TrainConfig
from pretrain.engine.megatron import Engine, MegatronEngine
from pretrain.evaluate import Evaluator
from pretrain.engine.implementations import format_report, report
from pretrain.metrics.sink import Metrics
from pretrain.metrics.moe_stats import LoadImbalanceTracker, aux_loss_scalars
from pretrain.metrics.observer import Observer
from pretrain.engine.optimizer import build_scheduler
from pretrain.recipe import Recipe
from pretrain.checkpoint.run_state import Progress, layout_of
from pretrain.resilience.signals import StopSignal
from pretrain.engine import muon
from pretrain.step import DocumentOptions, make_forward_step, reset_loss_trackers, split_microbatches, take_mtp_loss


def build_engine(chunks, tconfig, cfg: TrainConfig) -> Engine:
    """The engine of --dp-engine, around the built model chunks (docs/ENGINES.md)."""
    if cfg.dp_engine == "deepspeed":
        from pretrain.engine.deepspeed_zero import DeepSpeedEngine  # DeepSpeed is an optional extra

        return DeepSpeedEngine(chunks, tconfig, cfg)
    return MegatronEngine(chunks, tconfig, cfg)


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: rt.Runtime):
        self.cfg, self.runtime = cfg, runtime
        if cfg.save:
            checkpointing.check_writable(cfg.save, runtime.device)  # before any work
        rt.init_model_parallel(cfg.dims, cfg.model.num_hidden_layers, cfg.seed, cfg.distributed_timeout_s)
        reset_loss_trackers()
        self.data = self._build_data()  # first: it checks the manifests, tokenizer and vocabulary
        self._check_shards()
        self.tconfig = to_transformer_config(cfg.model, cfg.model_options, cfg.dims)

        chunks = build_model(cfg.model, self.tconfig, cfg.model_options.use_te)
        for chunk in chunks:
            chunk.to(runtime.device)
        init_weights(chunks, cfg.model.vocab_size, cfg.seed)
        self.moe_stats = LoadImbalanceTracker(
            chunks, cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers, cfg.model.n_routed_experts,
            cfg.model.num_experts_per_tok, runtime.device)
        self.flops_per_token = flops_per_token(cfg.model, cfg.seq_length, mtp_depths=self.tconfig.mtp_num_layers or 0)
        self.observer = Observer(cfg, runtime, self.moe_stats, self.flops_per_token)
        self.observer.timing.attach(self.tconfig)  # before the engine: its DDP and optimizer time themselves
        self.engine = build_engine(chunks, self.tconfig, cfg)
        self.model = self.engine.model  # the chunks as megatron's schedule calls them
        self.scheduler = build_scheduler(self.engine.optimizer, cfg)

        if runtime.rank == 0:
            print(format_report(report(chunks, self.engine.report())), flush=True)
            if cfg.optimizer == "muon":  # which parameters each side takes (this rank's chunks)
                print("optimizer: Muon for the matrices, AdamW for the rest\n" + muon.describe(chunks), flush=True)
        # the MoE load statistics are read before finalize_model_grads updates the bias and zeroes them
        self.engine.attach(self.tconfig, before_finalize=self.moe_stats.record)
        self.recipe = Recipe(cfg.recipe, self.tconfig, chunks, cfg.model_options.dsa_indexer_loss_coeff,
                             tokens_per_microbatch=cfg.micro_batch_size * cfg.seq_length // cfg.dims.cp)
        if cfg.recipe.dsa_warmup_iters:
            self.recipe.zero_grads_as_produced()
        # megatron-core 0.19.2 ignores rampup_batch_size: a ramp goes in as its step schedule (data/batch_ramp.py)
        init_num_microbatches_calculator(
            runtime.rank, global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
            data_parallel_size=cfg.dims.dp, decrease_batch_size_if_needed=False,
            step_batch_size_schedule=step_schedule(*cfg.rampup_batch_size, cfg.global_batch_size)
            if cfg.rampup_batch_size else None)

        self.guard = faults.StepGuard(cfg.max_consecutive_skipped_iters, cfg.loss_spike_factor, cfg.skip_loss_spikes)
        self.phase = "start-up"
        self.progress = Progress()
        self.evaluated = None  # the iteration of the last evaluation
        self.metrics = Metrics(runtime.rank == runtime.world_size - 1, cfg)
        self._model_forward = make_forward_step(runtime.device)
        self.eod_id = self.data.eod_id if cfg.eod_mask_loss else None
        self.documents = DocumentOptions(self.data.eod_id, cfg.reset_attention_mask, cfg.reset_position_ids)
        self.evaluator = (Evaluator(cfg, self.model, self._model_forward, self.eod_id, self.documents)
                          if cfg.eval_interval else None)
        self.checkpointer = Checkpointer(
            CheckpointParts(model=self.model, progress=self.progress, engine=self.engine, scheduler=self.scheduler,
                            data=self.data),
            run_info=dict(model_config=cfg.model.to_hf_dict(), layout=layout_of(cfg.dims), preset=cfg.preset,
                          seq_length=cfg.seq_length),
            device=runtime.device, save_dir=cfg.save, async_save=cfg.async_save)
        if cfg.load and iteration_to_load(cfg.load, cfg.load_options.ckpt_step) is not None:
            loaded = self.checkpointer.load(cfg.load, cfg.load_options)
            if runtime.rank == 0:
                print(f"loaded checkpoint {cfg.load} at iteration {self.iteration}", flush=True)
                for note in loaded["notes"]:
                    print(f"  {note}", flush=True)
        elif cfg.load:  # (--exit-on-missing-checkpoint stopped at the arguments)
            if runtime.rank == 0:
                print(f"--load {cfg.load} holds no checkpoint (no {checkpointing.TRACKER}): starting from random "
                      "weights at iteration 0 (--exit-on-missing-checkpoint stops instead)", flush=True)

    @property
    def iteration(self) -> int:
        return self.progress.iteration

    @property
    def optimizer(self):
        return self.engine.optimizer

    def save(self) -> None:
        self.checkpointer.save()

    def _timed_save(self) -> None:
        self.phase = "checkpoint save"
        self.metrics.log_timers(self.iteration, *self.observer.timed_save(self.save))

    def _build_data(self):
        cfg = self.cfg
        return build_train_data(
            mock=cfg.mock_data, data_path=cfg.data_path, seq_length=cfg.seq_length,
            global_batch_size=cfg.global_batch_size, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=cfg.dims.dp, seed=cfg.seed, vocab_size=cfg.model.vocab_size, eos_token_id=cfg.model.eos_token_id,
            tokenizer_dir=cfg.tokenizer, num_workers=cfg.num_workers, skip_bad_shards=cfg.skip_bad_shards,
            rampup_batch_size=cfg.rampup_batch_size, allow_pipe=cfg.data_allow_pipe)

    def _check_shards(self) -> None:
        """Every listed shard (training and validation) is there with its recorded size: a stat each, over
        all ranks (data/shard_check.py); --skip-bad-shards logs them instead (the reader skips them)."""
        cfg = self.cfg
        if cfg.mock_data:
            return

        def gather(obj):
            out = [None] * dist.get_world_size()
            dist.all_gather_object(out, obj)
            return out

        from data.blend import parse_data_path
        from data.manifest_io import load_manifest

        valid = [load_manifest(p, allow_pipe=cfg.data_allow_pipe)
                 for p in (parse_data_path(cfg.valid_data_path)[1] if cfg.valid_data_path else [])]
        problem = check_listed_shards([*self.data.manifests, *valid], self.runtime.rank, self.runtime.world_size,
                                      gather)
        if problem and not cfg.skip_bad_shards:
            raise ShardError(f"{problem} (--skip-bad-shards skips them as they are reached)")
        if problem and self.runtime.rank == 0:
            print(f"warning: {problem}; --skip-bad-shards: they are skipped when reached", flush=True)

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        update_num_microbatches(self.progress.consumed_samples, consistency_check=True)
        global_batch_size = get_current_global_batch_size()
        recipe_scalars = self.recipe.before_step(self.iteration, self.progress.consumed_tokens)
        self.engine.zero_grad()
        with self.observer.timing.timed("batch-generator", 2):
            microbatches = split_microbatches(self.data.next_batch(global_batch_size)["tokens"],
                                              cfg.micro_batch_size, eod_id=self.eod_id, documents=self.documents)
        self.engine.begin_step(microbatches)
        self.recipe.scale_indexer_loss(self.engine.scale_loss, self.runtime.device)
        iterators = [iter(microbatches) for _ in self.model]
        faults.inject(str(self.iteration + 1))
        self.phase = "forward-backward"
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(microbatches),
            seq_length=cfg.seq_length,
            micro_batch_size=cfg.micro_batch_size,
            decoder_seq_length=cfg.seq_length,
            forward_only=False,
        )
        self.phase = "loss reduction"
        scalars = self._reduce_losses(losses, len(microbatches))
        self.phase = "optimizer step"
        skip = self._should_skip(scalars.get("lm loss"))
        grad_norm = num_zeros = None
        if not skip:
            self.recipe.before_optimizer_step(self.iteration, self.optimizer)
            with self.observer.timing.phase("optimizer"):
                updated, grad_norm, num_zeros = self.engine.step()
            skip = not updated
        if not skip:
            self.scheduler.step(increment=global_batch_size)
        self.progress.consumed_samples += global_batch_size
        self.guard.record(skip, scalars.get("lm loss"), self.iteration + 1)
        scalars.update(recipe_scalars)
        scalars["batch-size"] = float(global_batch_size)
        scalars["grad-norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        # --mtp-detach-heads: megatron-core clips the MTP layer's gradients by their own norm, kept out of grad-norm
        mtp_norm = getattr(self.optimizer, "grad_norms_by_group", {}).get("mtp") if not skip else None
        if mtp_norm is not None:
            scalars["grad-norm/mtp"] = float(mtp_norm)
        if cfg.observability.log_num_zeros_in_grad:
            scalars["num-zeros"] = float(num_zeros) if num_zeros is not None else float("nan")
        scalars["skipped-iterations"] = 1.0 if skip else 0.0
        scalars["skipped-iterations-total"] = float(self.guard.total_skipped)
        scalars["learning-rate"] = self.optimizer.param_groups[0]["lr"]
        scalars.update(self.moe_stats.scalars())
        return scalars

    def _forward_step(self, data_iterator, model):
        output, loss_fn = self._model_forward(data_iterator, model)
        return faults.inject_loss_fault(self.iteration + 1, output), loss_fn

    def _should_skip(self, lm_loss: float | None) -> bool:
        """Every rank agrees: skip when any gradient is non-finite, or on a loss spike if asked."""
        finite = faults.StepGuard.grads_finite(self.model, self.runtime.device)
        spike = self.guard.is_spike(lm_loss)
        if spike and self.runtime.rank == self.runtime.world_size - 1:
            print(f"loss spike at iteration {self.iteration + 1}: lm loss {lm_loss:.4f} > "
                  f"{self.cfg.loss_spike_factor} x running mean {self.guard.mean_loss:.4f}"
                  + (" (step skipped)" if self.cfg.skip_loss_spikes else ""), flush=True)
        skip = rt.any_rank(not finite or (spike and self.cfg.skip_loss_spikes), self.runtime.device)
        if not finite and self.runtime.rank == 0:
            print(f"iteration {self.iteration + 1}: non-finite gradients, step skipped", flush=True)
        return skip

    def _reduce_losses(self, losses: list[dict], num_microbatches: int) -> dict[str, float]:
        out = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            total = torch.stack([d["lm loss"] for d in losses]).sum(0)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            out["lm loss"] = float(total[0] / total[1])
            if self.cfg.model.mtp_depths(self.cfg.model_options.mtp_num_layers):
                out.update(take_mtp_loss(num_microbatches))
        if self.tconfig.moe_aux_loss_coeff > 0:  # collective: every rank calls it
            out.update(aux_loss_scalars(self.tconfig, num_microbatches))
        if self.recipe.indexer_loss_coeff > 0:  # every rank holds indexers: a collective over PP
            DSAIndexerLossLoggingHelper.reduce_loss_in_tracker()
            values = DSAIndexerLossLoggingHelper.tracker["values"] / (num_microbatches * self.recipe.indexer_loss_rows)
            # the mean over the decoder's and the MTP layers' indexers (megatron-core's DSAttention files
            # the MTP layer's under layer 1 in a tracker of num_layers slots, ours after the decoder's)
            out["dsa/indexer-loss"] = float(values.sum() / self.recipe.indexer_layers)
            DSAIndexerLossLoggingHelper.clean_loss_in_tracker()
        return out

    # --- the loop ---------------------------------------------------------------------------
    def train(self, stop: StopSignal | None = None) -> list[dict[str, float]]:
        cfg = self.cfg
        history, saved, stopped = [], False, False
        while self.iteration < cfg.train_iters:
            self.checkpointer.finish(blocking=False)
            self.observer.before_step(self.iteration)
            start = time.perf_counter()
            try:
                scalars = self.train_step()
            except RuntimeError as e:
                raise faults.explain_timeout(e, self.phase, self.iteration + 1, cfg.distributed_timeout_s) from e
            elapsed = time.perf_counter() - start
            tokens_per_step = int(scalars["batch-size"]) * cfg.seq_length
            self.progress.iteration += 1
            self.progress.consumed_tokens += tokens_per_step
            scalars["consumed-tokens"] = float(self.progress.consumed_tokens)
            observed = self.observer.after_step(self.model, self.iteration, elapsed, tokens_per_step)
            scalars.update(observed.scalars)
            self.metrics.log(self.iteration, cfg.train_iters, scalars, observed.line, observed.timers_text)
            for tag, image in observed.images.items():
                self.metrics.image(tag, image, self.iteration)
            history.append(scalars)
            saved = bool(cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0)
            if saved:
                self._timed_save()
            if self.evaluator is not None and self.iteration % cfg.eval_interval == 0:
                self.evaluate()
            if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                break
            if stop is not None and stop.requested(self.runtime.device):  # every rank asks: a collective
                stopped = True
                break  # SLURM's pre-timeout signal: the save below writes the checkpoint
        self.observer.close()  # a profile still running ends here
        if self.evaluator is not None and not stopped and self.evaluated != self.iteration:
            self.evaluate()  # at the end of training, as Megatron-LM
        if cfg.save and not saved:
            self._timed_save()
        self.phase = "checkpoint save"
        self.checkpointer.finish(blocking=True)
        return history

    def evaluate(self) -> None:
        """The validation loss now (outside the timed training step: not in the throughput)."""
        self.phase = "evaluation"
        try:
            with self.observer.timing.paused(self.tconfig):
                scalars = self.evaluator.evaluate()
        except RuntimeError as e:
            raise faults.explain_timeout(e, self.phase, self.iteration, self.cfg.distributed_timeout_s) from e
        self.evaluated = self.iteration
        self.metrics.log_validation(self.iteration, scalars)

    def close(self) -> None:
        self.observer.close()
        self.metrics.close()


def _report_startup_error(error: Exception, rank: int, stop: StopSignal) -> None:
    """Bad input found at start-up, usually by every rank: one line from rank 0, no traceback. The
    others wait a little first: torchrun stops them (SIGTERM) when rank 0 failed too; if it did not,
    their error is news and is said."""
    deadline = time.monotonic() + (OTHER_RANKS_WAIT_S if rank else 0.0)
    while stop.received is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if rank == 0 or stop.received is None:
        print(f"error: {error}" + (f" (rank {rank})" if rank else ""), file=sys.stderr, flush=True)


def pretrain(cfg: TrainConfig) -> list[dict[str, float]]:
    stop = StopSignal()  # first: a signal during the slow start-up is not fatal
    runtime = rt.init_distributed(cfg.distributed_timeout_s)
    trainer = None
    try:
        torch.manual_seed(cfg.seed)
        try:
            trainer = Trainer(cfg, runtime)
        except (ValueError, ShardError, checkpointing.CheckpointError) as e:
            _report_startup_error(e, runtime.rank, stop)
            os._exit(1)  # at once: nothing is written yet, and a clean shutdown would wait for the other ranks
        return trainer.train(stop)
    finally:
        if trainer is not None:
            trainer.close()
        rt.shutdown()
        stop.close()
