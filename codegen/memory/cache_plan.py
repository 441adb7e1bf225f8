"""Sizes and the per-step plan of a rollout cache: host integers, pure functions of the schedule.

`step_plan(schedule, t)` says what the commit of chunk t does to the tables (how many
window blocks leave, how many of the chunk's blocks are kept, where the sink ends, the
age of the candidates); `peak_blocks` / `expected_nbytes` size the pools from the sympy
formula of the foundation.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from sparsedsl.schedule import Schedule

# ==================================================================================
# sizes and the per-step plan (host integers, pure functions of the schedule)
# ==================================================================================
@lru_cache(maxsize=256)
def _kv_blocks_fn(schedule: Schedule):
    import sympy
    from sparsedsl.shapes import T
    return sympy.lambdify(T, schedule.shapes.kv_blocks, modules="math")


def _kv_blocks(schedule: Schedule, frames: int) -> int:
    """shapes.kv_blocks(T = frames): blocks held per KV head after `frames` committed frames
    (the sympy formula, lambdified once per schedule)."""
    return int(round(_kv_blocks_fn(schedule)(frames)))


def _round_frames(schedule: Schedule, frames: int) -> int:
    c = schedule.chunk_frames
    return -(-frames // c) * c


def steady_frames(schedule: Schedule) -> Optional[int]:
    """Frames after which a bounded pattern holds its peak (None: unbounded window)."""
    if schedule.window.frames is None:
        return None
    nb = schedule.blocks_per_frame
    return _round_frames(schedule, schedule.sink_frames + schedule.window.frames
                         + -(-schedule.capacity // nb) + schedule.chunk_frames)


def peak_blocks(schedule: Schedule, max_frames: Optional[int] = None) -> int:
    """Blocks held per KV head at the peak of a rollout: shapes.kv_blocks(T_peak).

    T_peak = min(max_frames rounded up to whole chunks, steady state); an unbounded window
    needs max_frames (or the cache's growth policy)."""
    steady = steady_frames(schedule)
    if max_frames is None:
        if steady is None:
            raise ValueError("an unbounded window has no peak: give max_frames")
        return _kv_blocks(schedule, steady)
    frames = _round_frames(schedule, max_frames)
    if steady is not None:
        frames = min(frames, steady)
    return _kv_blocks(schedule, frames)


def expected_nbytes(program, batch: int, num_layers: int, dtype: torch.dtype,
                    max_frames: Optional[int] = None) -> int:
    """K/V pool bytes of `program.new_cache(...)`, from the sympy formula."""
    s = program.schedule
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (num_layers * batch * s.num_kv_heads * peak_blocks(s, max_frames) * 2
            * program.kernel_block_tokens * program.kernel_head_dim * itemsize)


@dataclass(frozen=True)
class StepPlan:
    """What the commit of chunk `step` does to one layer's tables (block counts)."""

    step: int
    n_sink_old: int          # sink blocks before / after
    n_sink_new: int
    nw: int                  # window blocks before / after
    nw_new: int
    n_drop: int              # window positions [0, n_drop) leave the window (E_t when updating)
    chunk_sink: int          # chunk blocks [0, chunk_sink) become sink blocks
    chunk_keep_start: int    # chunk blocks [chunk_keep_start, chunk_blocks) enter the window
    age0: int                # (t+1)*c - 1
    chunk_blocks: int        # c * nb

    @property
    def chunk_kept(self) -> tuple[int, ...]:
        """Chunk blocks written to the pool: the new sink blocks, then the window's."""
        return tuple(range(self.chunk_sink)) + tuple(range(self.chunk_keep_start,
                                                           self.chunk_blocks))


@lru_cache(maxsize=4096)
def step_plan(schedule: Schedule, step: int) -> StepPlan:
    c, nb, S = schedule.chunk_frames, schedule.blocks_per_frame, schedule.sink_frames
    t0, t1 = step * c, (step + 1) * c
    ws, we = schedule.window_frames_range(step)
    ws1, we1 = schedule.window_frames_range(step + 1)
    n_drop = max(0, min(we, ws1) - ws) * nb
    chunk_sink = max(0, min(S, t1) - t0) * nb
    keep_start = (max(ws1, t0) - t0) * nb
    plan = StepPlan(step=step, n_sink_old=min(S, t0) * nb, n_sink_new=min(S, t1) * nb,
                    nw=(we - ws) * nb, nw_new=(we1 - ws1) * nb, n_drop=n_drop,
                    chunk_sink=chunk_sink, chunk_keep_start=keep_start, age0=t1 - 1,
                    chunk_blocks=c * nb)
    # consistency with the schedule's own definitions (cheap, host-only)
    assert plan.nw_new == plan.nw - n_drop + c * nb - keep_start, plan
    assert plan.n_sink_new - plan.n_sink_old == chunk_sink, plan
    if schedule.update is not None:
        e0, e1 = schedule.evicted_frames(step)
        assert (e1 - e0) * nb == n_drop and (n_drop == 0 or e0 == ws), (plan, e0, e1)
    return plan
