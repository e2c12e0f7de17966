"""--profile: iterations --profile-step-start+1 .. --profile-step-end on each of --profile-ranks, as
Megatron-LM profiles them.

With --use-pytorch-profiler: a torch.profiler trace per rank, `<--tensorboard-dir>/profile/rank<R>.*.pt.trace.json`
(TensorBoard's profiler plugin, Perfetto or chrome://tracing open it); each profiled iteration is a
`ProfilerStep#<iteration>` range. Without it: CUDA profiler start/stop around those iterations with NVTX
ranges for every operator, for `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop`.
The torch profiler warms up on the iteration before the first profiled one (when there is one); its
events are discarded.
"""

from __future__ import annotations

import os

import torch


class StepProfiler:
    def __init__(self, obs, rank: int, tensorboard_dir: str | None):
        self.obs = obs
        self.on = obs.profile and rank in obs.profile_ranks
        self.rank, self.tensorboard_dir = rank, tensorboard_dir
        self._torch = None  # the running torch.profiler
        self._nvtx = None  # the running emit_nvtx context

    @property
    def trace_dir(self) -> str:
        return os.path.join(self.tensorboard_dir, "profile")

    def before_step(self, done: int) -> None:
        """Before the step after `done` iterations."""
        if not self.on:
            return
        first = self.obs.profile_step_start + 1  # the first profiled iteration
        if self.obs.use_pytorch_profiler and done == max(first - 2, 0) and self._torch is None:
            self._start_torch(done + 1, first)
        elif self._torch is not None:
            self._torch.step()
        if not self.obs.use_pytorch_profiler and done == first - 1:
            torch.cuda.profiler.start()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=self.obs.profiler_collect_shapes)
            self._nvtx.__enter__()

    def after_step(self, done: int) -> None:
        if self.on and done == self.obs.profile_step_end:
            self.stop()

    def _start_torch(self, iteration: int, first: int) -> None:
        """Start torch.profiler before `iteration`: one warm-up iteration (discarded, as Megatron-LM's
        schedule does) when there is one before `first`, then iterations first .. --profile-step-end."""
        action, end = torch.profiler.ProfilerAction, self.obs.profile_step_end

        def schedule(step: int):  # step: the iteration (the profiler's step_num, set below)
            if step < first:
                return action.WARMUP
            return action.RECORD if step < end else action.RECORD_AND_SAVE

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # the profiler asks for schedule(0) when made: the action of `iteration`, its first step
        self._torch = torch.profiler.profile(
            activities=activities, schedule=lambda step: schedule(max(step, iteration)),
            record_shapes=self.obs.profiler_collect_shapes, with_stack=self.obs.profiler_collect_callstack,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.trace_dir, worker_name=f"rank{self.rank}"))
        self._torch.step_num = iteration  # ProfilerStep#<iteration>
        self._torch.start()

    def stop(self) -> None:
        """End the profile (also when training stops before --profile-step-end)."""
        if self._torch is not None:
            self._torch.stop()  # writes the trace
            self._torch = None
        if self._nvtx is not None:
            torch.cuda.profiler.stop()
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
