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
from megatron.core.distributed import finalize_model_grads
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size,
    init_num_microbatches_calculator,
    update_num_microbatches,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from data.format import ShardError
from model.accounting import flops_per_token
from model.builder import build_model
from model.init import init_weights
from model.mcore_config import to_transformer_config
from parallel import runtime as rt
from pretrain import checkpointing, faults
from pretrain.config import TrainConfig
from pretrain.evaluate import Evaluator
from pretrain.implementations import format_report, report
from pretrain.metrics import Metrics, memory_gb
from pretrain.mock_data import MockData
from pretrain.moe_stats import LoadImbalanceTracker, aux_loss_scalars
from pretrain.optim import build_optimizer, build_scheduler, wrap_ddp, wrap_precision
from pretrain.recipe import Recipe
from pretrain.signals import StopSignal
from pretrain.step import make_forward_step, split_microbatches


class Trainer:
    def __init__(self, cfg: TrainConfig, runtime: rt.Runtime):
        self.cfg, self.runtime = cfg, runtime
        if cfg.save:
            checkpointing.check_writable(cfg.save, runtime.device)  # before any work
        rt.init_model_parallel(cfg.dims, cfg.model.num_hidden_layers, cfg.seed, cfg.distributed_timeout_s)
        self.data = self._build_data()  # first: it checks the manifests, tokenizer and vocabulary
        self.tconfig = to_transformer_config(cfg.model, cfg.model_options)

        chunks = build_model(cfg.model, self.tconfig, cfg.model_options.use_te)
        for chunk in chunks:
            chunk.to(runtime.device)
        init_weights(chunks, cfg.model.vocab_size, cfg.seed)
        self.deepspeed = cfg.dp_engine == "deepspeed"
        if self.deepspeed:
            from pretrain import deepspeed_engine

            self.model, self.optimizer = deepspeed_engine.build(
                wrap_precision(chunks, self.tconfig), self.tconfig, cfg)
        else:
            self.model = wrap_ddp(wrap_precision(chunks, self.tconfig), self.tconfig, cfg)
            self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

        if runtime.rank == 0:
            zero = self.optimizer.engine.optimizer if self.deepspeed else None
            print(format_report(report(chunks, deepspeed_optimizer=zero)), flush=True)
        self.moe_stats = LoadImbalanceTracker(
            chunks, cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers, cfg.model.n_routed_experts,
            cfg.model.num_experts_per_tok, runtime.device)
        self._hook_megatron(self.tconfig)
        self.recipe = Recipe(cfg.recipe, self.tconfig, chunks, cfg.model_options.dsa_indexer_loss_coeff,
                             tokens_per_microbatch=cfg.micro_batch_size * cfg.seq_length // cfg.dims.cp)
        if self.deepspeed and cfg.recipe.dsa_warmup_iters:
            self.recipe.zero_grads_as_produced()
        init_num_microbatches_calculator(
            runtime.rank, cfg.rampup_batch_size, cfg.global_batch_size, cfg.micro_batch_size, cfg.dims.dp,
            decrease_batch_size_if_needed=False)

        self.guard = faults.StepGuard(cfg.max_consecutive_skipped_iters, cfg.loss_spike_factor, cfg.skip_loss_spikes)
        self.phase = "start-up"
        self.iteration = 0
        self.evaluated = None  # the iteration of the last evaluation
        self.consumed_tokens = 0
        self.consumed_samples = 0
        self.metrics = Metrics(runtime.rank == runtime.world_size - 1, cfg.tensorboard_dir, cfg.log_interval)
        self.flops_per_token = flops_per_token(cfg.model, cfg.seq_length)
        self._model_forward = make_forward_step(runtime.device)
        self.eod_id = self._eod_id() if cfg.eod_mask_loss else None
        self.evaluator = (Evaluator(cfg, self.model, self._model_forward, self.eod_id)
                          if cfg.eval_interval else None)
        self.async_queue = None
        if cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()
        if cfg.load and checkpointing.latest_iteration(cfg.load) is not None:
            self._load()
        elif cfg.load:  # (--exit-on-missing-checkpoint stopped at the arguments)
            if runtime.rank == 0:
                print(f"--load {cfg.load} holds no checkpoint (no {checkpointing.TRACKER}): starting from random "
                      "weights at iteration 0 (--exit-on-missing-checkpoint stops instead)", flush=True)

    # --- checkpoints ------------------------------------------------------------------------
    def _checkpoint_objects(self) -> dict:
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, data=self.data)

    def _load(self) -> None:
        state = checkpointing.load(self.cfg.load, model_config=self.cfg.model.to_hf_dict(),
                                   layout=checkpointing.layout_of(self.cfg.dims), **self._checkpoint_objects())
        self.iteration = state["iteration"]
        self.consumed_tokens = state["consumed_tokens"]
        self.consumed_samples = state["consumed_samples"]
        if self.runtime.rank == 0:
            print(f"loaded checkpoint {self.cfg.load} at iteration {self.iteration}", flush=True)

    def _global_data_state(self) -> dict:
        # The reader's own state covers this rank's streams; a checkpoint loaded at another
        # layout needs them all (collective: every rank calls it).
        if isinstance(self.data, MockData):
            return self.data.state_dict()
        return self.data.global_state_dict()

    def save(self) -> None:
        run_state = {"consumed_tokens": self.consumed_tokens, "consumed_samples": self.consumed_samples,
                     "model_config": self.cfg.model.to_hf_dict(),
                     "layout": checkpointing.layout_of(self.cfg.dims), "data": self._global_data_state(),
                     "preset": self.cfg.preset, "seq_length": self.cfg.seq_length}
        if self.async_queue is not None:
            self._finish_async_saves(blocking=True)  # one save in flight at a time
        # --overlap-param-gather leaves the all-gather of the updated parameters to the next forward's
        # pre-hooks: finish it now, or each rank saves the other ranks' shards from the step before
        # (Megatron-LM disables the hooks around its saves the same way).
        gather_first = self.cfg.overlap_param_gather and self.cfg.use_distributed_optimizer
        if gather_first:
            for m in self.model:
                m.disable_forward_pre_hook(param_sync=True)
        try:
            checkpointing.save(self.cfg.save, self.iteration, run_state=run_state, device=self.runtime.device,
                               async_queue=self.async_queue, **self._checkpoint_objects())
        finally:
            if gather_first:
                for m in self.model:
                    m.enable_forward_pre_hook()

    def _finish_async_saves(self, blocking: bool) -> None:
        """Publish the background saves that are done on every rank (a collective)."""
        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except Exception as e:  # megatron raises the writer's failure on every rank
            raise checkpointing.CheckpointError(
                f"--save {self.cfg.save}: a background save failed ({e}); the checkpoint before it is intact") from e

    # --- wiring ---------------------------------------------------------------------------
    def _hook_megatron(self, tconfig) -> None:
        def finalize(*args, **kwargs):
            self.moe_stats.record()  # before finalize_model_grads updates the bias and zeroes counts
            if self.deepspeed:
                from pretrain.deepspeed_engine import finalize_grads

                return finalize_grads(self.model, tconfig)
            return finalize_model_grads(*args, **kwargs)

        tconfig.finalize_model_grads_func = finalize
        tconfig.grad_scale_func = self.optimizer.scale_loss
        if self.cfg.overlap_grad_reduce:
            no_sync = [m.no_sync for m in self.model]
            tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.cfg.overlap_param_gather and self.cfg.use_distributed_optimizer:
            sync = [m.start_param_sync for m in self.model]
            tconfig.param_sync_func = sync[0] if len(sync) == 1 else sync

    def _build_data(self):
        cfg = self.cfg
        dp_rank = parallel_state.get_data_parallel_rank()
        if cfg.mock_data:
            return MockData(cfg.model.vocab_size, cfg.seq_length, dp_rank, cfg.dims.dp, cfg.seed)
        from data import build_pretraining_data

        return build_pretraining_data(
            data_path=cfg.data_path, seq_length=cfg.seq_length, global_batch_size=cfg.global_batch_size,
            dp_rank=dp_rank, dp_size=cfg.dims.dp, seed=cfg.seed, vocab_size=cfg.model.vocab_size,
            tokenizer_dir=cfg.tokenizer, num_workers=cfg.num_workers, skip_bad_shards=cfg.skip_bad_shards,
            rampup_batch_size=cfg.rampup_batch_size, allow_pipe=cfg.data_allow_pipe,
        )

    def _eod_id(self) -> int:
        if isinstance(self.data, MockData):  # the model's EOS stands for the tokenizer's EOD
            eos = self.cfg.model.eos_token_id
            return eos[0] if isinstance(eos, list) else eos
        return self.data.eod_id

    def _next_batch(self, global_batch_size: int) -> dict:
        if isinstance(self.data, MockData):
            return self.data.next_batch(global_batch_size)
        batch = next(self.data)  # the shard reader follows the same ramp by its own step count
        if batch["tokens"].shape[0] * self.cfg.dims.dp != global_batch_size:
            raise RuntimeError(f"data reader gave {batch['tokens'].shape[0]} rows per rank, megatron's batch "
                               f"schedule expects {global_batch_size} / {self.cfg.dims.dp}")
        return batch

    # --- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        update_num_microbatches(self.consumed_samples, consistency_check=True)
        global_batch_size = get_current_global_batch_size()
        recipe_scalars = self.recipe.before_step(self.iteration, self.consumed_tokens)
        if not self.deepspeed:
            for m in self.model:
                m.zero_grad_buffer()
        self.optimizer.zero_grad()
        microbatches = split_microbatches(self._next_batch(global_batch_size)["tokens"], cfg.micro_batch_size,
                                          eod_id=self.eod_id)
        if self.deepspeed:
            self.optimizer.set_global_tokens(self._global_tokens(microbatches))
        self.recipe.scale_indexer_loss(self.optimizer.scale_loss, self.runtime.device)
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
        grad_norm = None
        if not skip:
            self.recipe.before_optimizer_step(self.iteration, self.optimizer)
            updated, grad_norm, _ = self.optimizer.step()
            skip = not updated
        if not skip:
            self.scheduler.step(increment=global_batch_size)
        self.consumed_samples += global_batch_size
        self.guard.record(skip, scalars.get("lm loss"), self.iteration + 1)
        scalars.update(recipe_scalars)
        scalars["batch-size"] = float(global_batch_size)
        scalars["grad-norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        scalars["skipped-iterations"] = 1.0 if skip else 0.0
        scalars["skipped-iterations-total"] = float(self.guard.total_skipped)
        scalars["learning-rate"] = self.optimizer.param_groups[0]["lr"]
        scalars.update(self.moe_stats.scalars())
        return scalars

    def _global_tokens(self, microbatches: list[dict]) -> int:
        # the micro-batches are still on the host (the forward step moves them): NCCL needs the device
        tokens = torch.stack([mb["loss_mask"].sum() for mb in microbatches]).sum().reshape(1)
        tokens = tokens.to(self.runtime.device)
        dist.all_reduce(tokens, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return int(tokens.item())

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
        flag = torch.tensor([0.0 if finite and not (spike and self.cfg.skip_loss_spikes) else 1.0],
                            device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not finite and self.runtime.rank == 0:
            print(f"iteration {self.iteration + 1}: non-finite gradients, step skipped", flush=True)
        return bool(flag.item())

    def _reduce_losses(self, losses: list[dict], num_microbatches: int) -> dict[str, float]:
        out = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            total = torch.stack([d["lm loss"] for d in losses]).sum(0)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            out["lm loss"] = float(total[0] / total[1])
            if self.cfg.model.num_nextn_predict_layers:
                MTPLossLoggingHelper.reduce_loss_in_tracker()
                values = MTPLossLoggingHelper.tracker["values"] / num_microbatches
                out["mtp loss"] = float(values.mean())
                MTPLossLoggingHelper.clean_loss_in_tracker()
        if self.tconfig.moe_aux_loss_coeff > 0:  # collective: every rank calls it
            out.update(aux_loss_scalars(self.tconfig, num_microbatches))
        if self.recipe.indexer_loss_coeff > 0:  # every rank holds indexers: a collective over PP
            DSAIndexerLossLoggingHelper.reduce_loss_in_tracker()
            values = DSAIndexerLossLoggingHelper.tracker["values"] / num_microbatches
            out["dsa/indexer-loss"] = float(values.mean())
            DSAIndexerLossLoggingHelper.clean_loss_in_tracker()
        return out

    # --- the loop ---------------------------------------------------------------------------
    def train(self, stop: StopSignal | None = None) -> list[dict[str, float]]:
        cfg = self.cfg
        history, saved, stopped = [], False, False
        while self.iteration < cfg.train_iters:
            if self.async_queue is not None:
                self._finish_async_saves(blocking=False)
            start = time.perf_counter()
            try:
                scalars = self.train_step()
            except RuntimeError as e:
                raise faults.explain_timeout(e, self.phase, self.iteration + 1, cfg.distributed_timeout_s) from e
            elapsed = time.perf_counter() - start
            tokens_per_step = int(scalars["batch-size"]) * cfg.seq_length
            self.iteration += 1
            self.consumed_tokens += tokens_per_step
            scalars["throughput/tokens-per-sec"] = tokens_per_step / elapsed
            scalars["throughput/tflops-per-gpu"] = (
                self.flops_per_token * tokens_per_step / elapsed / self.runtime.world_size / 1e12)
            scalars["consumed-tokens"] = float(self.consumed_tokens)
            scalars.update(memory_gb())
            self.metrics.log(self.iteration, cfg.train_iters, scalars)
            history.append(scalars)
            saved = bool(cfg.save and cfg.save_interval and self.iteration % cfg.save_interval == 0)
            if saved:
                self.phase = "checkpoint save"
                self.save()
            if self.evaluator is not None and self.iteration % cfg.eval_interval == 0:
                self.evaluate()
            if cfg.exit_interval and self.iteration % cfg.exit_interval == 0:
                break
            if stop is not None and stop.requested(self.runtime.device):  # every rank asks: a collective
                stopped = True
                break  # SLURM's pre-timeout signal: the save below writes the checkpoint
        if self.evaluator is not None and not stopped and self.evaluated != self.iteration:
            self.evaluate()  # at the end of training, as Megatron-LM
        if cfg.save and not saved:
            self.save()
        if self.async_queue is not None:
            self.phase = "checkpoint save"
            self._finish_async_saves(blocking=True)
        return history

    def evaluate(self) -> None:
        """The validation loss now (outside the timed training step: not in the throughput)."""
        self.phase = "evaluation"
        try:
            scalars = self.evaluator.evaluate()
        except RuntimeError as e:
            raise faults.explain_timeout(e, self.phase, self.iteration, self.cfg.distributed_timeout_s) from e
        self.evaluated = self.iteration
        self.metrics.log_validation(self.iteration, scalars)

    def close(self) -> None:
        self.metrics.close()


def _report_startup_error(error: Exception, rank: int, stop: StopSignal) -> None:
    """Bad input found at start-up, usually by every rank: one line from rank 0, no traceback. The
    others wait a little first: torchrun stops them (SIGTERM) when rank 0 failed too; if it did not,
    their error is news and is said."""
    deadline = time.monotonic() + (5.0 if rank else 0.0)
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
