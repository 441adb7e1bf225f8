"""`train --profile SKIP:STEPS`: where a training step's time goes.

torch.profiler records STEPS steps after the first SKIP of this process (compilation and
warm-up left out) and writes two files to the run folder:

- `profile.txt`: the mean wall time per step against the time the device was busy (the sum
  of its kernels' own times): a step much longer than the device's work is bound by the
  host (Python, launches, waits for the GPU, data), one about as long is bound by the
  device; then the ops by their own device time and by their own CPU time;
- `profile.json`: the Chrome trace of those steps (chrome://tracing or ui.perfetto.dev).

A step ends where the stage calls `StageRun.checkpoint`, once per step in every stage, which
calls `tick()` here; nothing is recorded when no profile was asked for.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule

_active: Optional["StepProfiler"] = None


PROFILE_FORMAT = ("SKIP:STEPS, two integers: SKIP >= 0 steps left out first (compilation, "
                  "warm-up), then STEPS >= 1 recorded, e.g. 20:10")


def parse_profile(text: str) -> tuple[int, int]:
    """'SKIP:STEPS' -> (skip, steps); ValueError (PROFILE_FORMAT) otherwise."""
    parts = text.split(":")
    try:
        skip, steps = (int(p) for p in parts) if len(parts) == 2 else (-1, 0)
    except ValueError:
        skip, steps = -1, 0
    if skip < 0 or steps < 1:
        raise ValueError(PROFILE_FORMAT)
    return skip, steps


class StepProfiler:
    """Records `steps` training steps after the first `skip` ones of this process."""

    def __init__(self, run_dir, skip: int, steps: int):
        self.run_dir, self.skip, self.steps = Path(run_dir), skip, steps
        self.cuda = False          # whether the steps run on a GPU: the run says so at each tick
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        # the schedule's wait + warm-up steps are the skipped ones; one warm-up step (when
        # there is one to spare) lets the profiler start before the recorded steps
        warmup = 1 if skip else 0
        self.prof = profile(activities=activities,
                            schedule=schedule(wait=skip - warmup, warmup=warmup, active=steps,
                                              repeat=1),
                            on_trace_ready=self._write)
        self.ticks: list[float] = []

    def start(self) -> None:
        self.prof.start()
        self.ticks.append(time.perf_counter())

    def tick(self, device: torch.device) -> None:
        """The end of one training step run on `device`."""
        self.cuda = device.type == "cuda"
        if self.cuda:   # a step's time includes its device work
            torch.cuda.synchronize()
        self.ticks.append(time.perf_counter())
        self.prof.step()

    def stop(self) -> None:
        self.prof.stop()

    def _write(self, prof) -> None:
        if int(os.environ.get("RANK", "0")) != 0:   # under torchrun: the first process's
            return
        events = prof.key_averages()
        first = self.skip                      # ticks[i] ends step i (ticks[0]: the start)
        recorded = self.ticks[first:first + self.steps + 1]
        n = len(recorded) - 1
        wall = (recorded[-1] - recorded[0]) / max(n, 1) * 1e3
        device = sum(e.self_device_time_total for e in events) / max(n, 1) / 1e3
        lines = [f"{n} steps recorded after {self.skip} skipped: {wall:.1f} ms a step (wall), "
                 f"the device busy {device:.1f} ms of it ({device / wall:.0%})"
                 if self.cuda and wall > 0 else
                 f"{n} steps recorded after {self.skip} skipped: {wall:.1f} ms a step (wall; "
                 "no device: CPU only)", ""]
        if self.cuda:
            lines += ["ops by their own device time:",
                      events.table(sort_by="self_device_time_total", row_limit=25), ""]
        lines += ["ops by their own CPU time:",
                  events.table(sort_by="self_cpu_time_total", row_limit=25)]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "profile.txt").write_text("\n".join(lines) + "\n")
        prof.export_chrome_trace(str(self.run_dir / "profile.json"))


@contextlib.contextmanager
def profile_steps(run_dir, skip: int, steps: int):
    """Profile the training steps run inside the block (see the module's docstring)."""
    global _active
    profiler = StepProfiler(run_dir, skip, steps)
    profiler.start()
    _active = profiler
    try:
        yield profiler
    finally:
        _active = None
        profiler.stop()


def tick(device: torch.device) -> None:
    """Called by StageRun at the end of every step (on its device); a no-op unless a profile
    was asked for."""
    if _active is not None:
        _active.tick(device)
