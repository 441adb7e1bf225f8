"""The schedule IR: a compiled pattern's block visits, frozen and hashable.

Per query block of a chunk, the key blocks it visits at step t are, in order:
  current  -- chunk blocks (dense, or causal by frame),       static
  sink     -- all blocks of frames [0, min(S, t*c)),          static
  persist. -- the persistent set P_t (per KV head or shared),  runtime table
  window   -- static offsets into the window, filtered by the window's start,
              or the whole window when the static part is `All` and unbounded,
  top-k    -- dynamic picks among the window's candidates,     runtime indices.
The methods below are the one place that turns the IR into concrete block ids;
backends use them (or mirror them in generated code) and the tests check them
against the float64 reference, which implements docs/design.md §2 independently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Optional, Sequence


from .layout import VideoLayout
from .neighborhood import SplitNeighborhood
from .update import Update


@dataclass(frozen=True)
class WindowPlan:
    """The window segment lowered: static offsets and the dynamic Top-K rule."""

    frames: Optional[int]              # W, None for unbounded
    # Per chunk query block: static key offsets (frame offset from the chunk start, in [-lookback, -1],
    # tile row, tile col); None when the static part is "the whole window" (All, unbounded).
    static_offsets: Optional[tuple[tuple[tuple[int, int, int], ...], ...]]
    lookback: Optional[int]            # frames the offsets reach back (None = unbounded)
    split: SplitNeighborhood           # static part, TopK and how they combine

    @property
    def has_topk(self) -> bool:
        return self.split.topk is not None


@dataclass(frozen=True)
class UpdatePlan:
    capacity: int
    shared_heads: bool
    rule: Update


@dataclass(frozen=True)
class Schedule:
    """Everything a backend needs to run the pattern; its `key` names the generated kernels."""

    pattern_name: str
    pattern_text: str
    layout: VideoLayout
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    current: str                        # "dense" | "causal"
    sink_frames: int
    window: WindowPlan
    update: Optional[UpdatePlan]
    max_visits: Optional[int]           # steady-state max visits per query block (None: unbounded window)
    shapes: "object"                    # sparsedsl.shapes.ShapeAnalysis (sympy), excluded from the key
    pattern: "object" = None            # the Pattern it was lowered from (its text is in the key)

    # --- identity ---------------------------------------------------------------
    @cached_property
    def key(self) -> str:
        text = "|".join([self.pattern_text, str(self.num_heads), str(self.num_kv_heads),
                         str(self.head_dim), self.dtype])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and other.key == self.key

    # --- geometry -----------------------------------------------------------------
    @property
    def chunk_frames(self) -> int:
        return self.layout.chunk_frames

    @property
    def blocks_per_frame(self) -> int:
        return self.layout.blocks_per_frame

    @property
    def capacity(self) -> int:
        return 0 if self.update is None else self.update.capacity

    def chunk_start_frame(self, step: int) -> int:
        return step * self.chunk_frames

    def window_frames_range(self, step: int) -> tuple[int, int]:
        """[start, end) frames of the window at `step` (empty when start >= end)."""
        end = step * self.chunk_frames
        start = self.sink_frames if self.window.frames is None else max(
            self.sink_frames, end - self.window.frames)
        return min(start, end), end

    def frames_left_window(self, step: int) -> int:
        """Frames between the sink and the window at `step`: they have left the window (the
        persistent set may hold some of their blocks)."""
        return self.window_frames_range(step)[0] - min(self.sink_frames, step * self.chunk_frames)

    def window_block_count(self, step: int) -> int:
        start, end = self.window_frames_range(step)
        return (end - start) * self.blocks_per_frame

    def sink_blocks(self, step: int) -> list[int]:
        frames = min(self.sink_frames, step * self.chunk_frames)
        return list(range(frames * self.blocks_per_frame))

    def evicted_frames(self, step: int) -> tuple[int, int]:
        """Frames that leave the window when chunk `step` is committed: [start, end).

        E_t = [max(S, t*c - W), max(S, (t+1)*c - W)); sink frames never leave, and an
        unbounded window evicts nothing.
        """
        if self.window.frames is None:
            return 0, 0
        c, S, W = self.chunk_frames, self.sink_frames, self.window.frames
        start = max(S, step * c - W)
        return start, max(start, (step + 1) * c - W)

    def query_coords(self, query_block: int) -> tuple[int, int, int]:
        """(frame offset inside the chunk, tile row, tile col) of a chunk query block."""
        return self.layout.block_coords(query_block)

    # --- visits ------------------------------------------------------------------
    def current_blocks(self, step: int, query_block: int) -> list[int]:
        base = step * self.layout.chunk_blocks
        if self.current == "dense":
            return list(range(base, base + self.layout.chunk_blocks))
        frame_in_chunk = query_block // self.blocks_per_frame
        return list(range(base, base + (frame_in_chunk + 1) * self.blocks_per_frame))

    def _window_blocks(self, step: int) -> range:
        start, end = self.window_frames_range(step)
        return range(start * self.blocks_per_frame, end * self.blocks_per_frame)

    def static_window_blocks(self, step: int, query_block: int) -> list[int]:
        """Window blocks chosen by the static part of the neighborhood, ascending."""
        start, end = self.window_frames_range(step)
        if start >= end or self.window.split.static is None:
            return []
        if self.window.static_offsets is None:
            return list(self._window_blocks(step))
        chunk_start = step * self.chunk_frames
        blocks = []
        for d, i, j in self.window.static_offsets[query_block]:
            frame = chunk_start + d
            if start <= frame < end:
                blocks.append(self.layout.block_index(frame, i, j))
        return sorted(blocks)

    def topk_candidates(self, step: int, query_block: int) -> list[int]:
        """Window blocks the dynamic Top-K may pick for this query block, ascending."""
        if not self.window.has_topk:
            return []
        static = set(self.static_window_blocks(step, query_block))
        window = self._window_blocks(step)
        if self.window.split.mode == "union":
            return [b for b in window if b not in static]
        return [b for b in window if b in static]

    def topk_count(self, step: int, query_block: int) -> int:
        """How many blocks the Top-K picks: k (or ceil(fraction * window blocks)), at most the candidates."""
        if not self.window.has_topk:
            return 0
        wanted = self.window.split.topk.count(self.window_block_count(step))
        return min(wanted, len(self.topk_candidates(step, query_block)))

    def visits(self, step: int, query_block: int, persistent: Sequence[int] = (),
               topk: Sequence[int] = ()) -> tuple[int, ...]:
        """The ordered key blocks of one query block (one head) given the runtime parts."""
        static_window = self.static_window_blocks(step, query_block)
        if self.window.split.mode == "intersection" and self.window.has_topk:
            static_window = []  # the static part only names the Top-K's candidates
        return tuple(self.current_blocks(step, query_block) + self.sink_blocks(step)
                     + sorted(persistent) + static_window + list(topk))

    def dense_at(self, step: int) -> bool:
        """True when at `step` every query block visits every block of every earlier frame:
        the persistent set holds every block that has left the window (it takes all of them
        while they fit its capacity; none have left early in a rollout) and sink + window +
        Top-K cover the window whole. The step is then dense
        attention over all frames so far (with the current rule inside the chunk), and a
        backend may run it with a dense kernel: same visits, same result. Exact, from the
        schedule alone: the case of `frames_at` where the frames are all the earlier ones."""
        frames = self.frames_at(step)   # distinct earlier frames: all of them iff as many
        return frames is not None and len(frames) == step * self.chunk_frames

    def dense_steps(self, horizon_steps: int) -> list[int]:
        """The steps in [0, horizon_steps) that `dense_at` marks."""
        return [t for t in range(horizon_steps) if self.dense_at(t)]

    def frames_at(self, step: int) -> Optional[tuple[int, ...]]:
        """The earlier frames that every query block visits whole at `step`, when that is all it
        visits of them; None when the visits depend on the query block or on runtime state.

        A superset of `dense_at` (there the frames are all of [0, step * chunk_frames)): a
        sink + window pattern without a persistent set visits its sink and window frames
        whole at every step, after frames have left the window too. Such a step is dense
        attention over those frames (with the current rule inside the chunk), which a backend
        may run as one fused SDPA over their tokens. Exact, from the schedule alone: the
        window is covered whole by its static part and the Top-K (which then takes every
        candidate), and the persistent set is either absent or holds every block that has
        left the window; memoised."""
        return _frames_at(self, step)

    def whole_frame_steps(self, horizon_steps: int) -> list[int]:
        """The steps in [0, horizon_steps) where `frames_at` names the visited frames."""
        return [t for t in range(horizon_steps) if self.frames_at(t) is not None]

    def describe(self) -> str:
        w = self.window
        lines = [f"schedule {self.key} for '{self.pattern_name}'",
                 f"  heads {self.num_heads} (kv {self.num_kv_heads}) x {self.head_dim}, {self.dtype}",
                 f"  current: {self.current}, sink frames: {self.sink_frames}",
                 f"  window: {'unbounded' if w.frames is None else f'{w.frames} frames'}, "
                 f"static offsets: {'whole window' if w.static_offsets is None else max(len(o) for o in w.static_offsets)}"
                 f" per query block (max), top-k: {w.split.topk or 'none'} ({w.split.mode or '-'})",
                 f"  persistent capacity: {self.capacity}"
                 + (f", {'shared' if self.update.shared_heads else 'per KV head'}, score = {self.update.rule.score}"
                    if self.update else ""),
                 f"  max visits per query block (steady state): {self.max_visits}"]
        return "\n".join(lines)


@lru_cache(maxsize=4096)
def _frames_at(schedule: Schedule, step: int) -> Optional[tuple[int, ...]]:
    nb = schedule.blocks_per_frame
    sink_frames = min(schedule.sink_frames, step * schedule.chunk_frames)
    left = schedule.frames_left_window(step)          # frames between the sink and the window
    if schedule.capacity and schedule.capacity < left * nb:
        return None                                   # the persistent set holds some of them
    held = left if schedule.capacity else 0
    window_blocks = schedule.window_block_count(step)
    split = schedule.window.split
    for qb in range(schedule.layout.chunk_blocks):
        static = 0 if (split.mode == "intersection" and schedule.window.has_topk) \
            else len(schedule.static_window_blocks(step, qb))
        if static + schedule.topk_count(step, qb) != window_blocks:
            return None                               # the window is not visited whole
    start, end = schedule.window_frames_range(step)
    return tuple(range(sink_frames + held)) + tuple(range(start, end))


def dtype_bytes(dtype: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

