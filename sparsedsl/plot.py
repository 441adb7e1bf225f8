"""Pictures of a schedule: the block mask of one AR step, coloured by segment.

    from sparsedsl.plot import draw_block_mask
    draw_block_mask(schedule, path="sparse-forcing.png")          # first steady-state step

Rows are the chunk's query blocks, columns the key blocks of the causal history up to the
chunk's end; each cell is coloured by the segment that grants it (white: not attended).
The runtime parts (Top-K picks, the persistent set) are chosen as a rollout would on
random data: seeded Gaussian representatives per block, Top-K by <q_rep, k_rep>, the
persistent set by summed score over the chunk's query representatives. All numpy, no
per-token work, so a Self-Forcing-sized step (84 x thousands of blocks) draws in about a second.

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
switch), so importing this module never changes the user's matplotlib state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .schedule import Schedule

#: Segment codes of the picture, in drawing order (0 = not attended).
SEGMENTS = ("current", "sink", "persistent", "window-static", "window-top-k")
COLORS = {
    "none": "#ffffff",
    "current": "#4c72b0",        # blue
    "sink": "#8172b3",           # purple
    "persistent": "#dd8452",     # orange
    "window-static": "#55a868",  # green
    "window-top-k": "#c44e52",   # red
}
#: Default steps are capped so the causal history stays at most this many key blocks.
MAX_HISTORY_BLOCKS = 4096
#: Horizon (frames) used as the default step of a pattern without a steady state.
UNBOUNDED_DEFAULT_FRAMES = 21


@dataclass(frozen=True)
class BlockMaskPicture:
    """What the picture shows: one step, one head, runtime parts drawn from random q/k."""

    step: int
    head: int
    seed: int
    grid: np.ndarray                   # int8 [query blocks, key blocks]: 0 none, 1.. SEGMENTS
    persistent: tuple[int, ...]        # the persistent set used (all query blocks)
    topk: tuple[tuple[int, ...], ...]  # per query block, the Top-K picks
    visits: tuple[int, ...]            # per query block, the number of key blocks visited

    @property
    def history_blocks(self) -> int:
        return self.grid.shape[1]

    @property
    def attended(self) -> int:
        return int((self.grid > 0).sum())

    @property
    def density(self) -> float:
        """Attended cells / causal-history cells, over all query blocks of the step."""
        return self.attended / self.grid.size

    def counts(self) -> dict[str, int]:
        """Cells per segment, over all query blocks."""
        return {name: int((self.grid == code).sum()) for code, name in enumerate(SEGMENTS, 1)}


def default_step(schedule: Schedule) -> int:
    """The first step in steady state (window full and, with memory, at least `capacity`
    blocks evicted), capped so the history stays <= MAX_HISTORY_BLOCKS key blocks.

    An unbounded window never reaches a steady state: its default is the step that ends the
    5 s horizon (21 frames).
    """
    lay = schedule.layout
    c, nb = lay.chunk_frames, lay.blocks_per_frame
    if schedule.window.frames is None:
        frames = max(UNBOUNDED_DEFAULT_FRAMES, schedule.sink_frames + c)
        step = math.ceil(frames / c) - 1
    else:
        frames = schedule.sink_frames + schedule.window.frames
        if schedule.capacity:
            frames += math.ceil(schedule.capacity / nb)
        step = math.ceil(frames / c)
    cap = max(1, MAX_HISTORY_BLOCKS // lay.chunk_blocks - 1)
    return max(1, min(step, cap))


def _representatives(schedule: Schedule, step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Gaussian q representatives [H, Q, D] and k representatives [H_kv, N, D]."""
    lay = schedule.layout
    rng = np.random.default_rng([seed, step])
    n_keys = (step + 1) * lay.chunk_blocks
    q = rng.standard_normal((schedule.num_heads, lay.chunk_blocks, schedule.head_dim))
    k = rng.standard_normal((schedule.num_kv_heads, n_keys, schedule.head_dim))
    return q, k


def _top(scores: np.ndarray, ids: np.ndarray, count: int) -> list[int]:
    """The `count` ids with the highest scores, ties to the lower id."""
    order = np.lexsort((ids, -scores))
    return sorted(int(i) for i in ids[order[:count]])


def block_mask_segments(schedule: Schedule, step: Optional[int] = None, head: int = 0,
                        seed: int = 0) -> BlockMaskPicture:
    """Compute the segment of every (query block, key block) cell of one step for one head."""
    step = default_step(schedule) if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step = {step!r}: expected an integer >= 0 (AR step, chunk index)")
    if not 0 <= head < schedule.num_heads:
        raise ValueError(f"head = {head!r}: expected an integer in [0, {schedule.num_heads})")
    lay = schedule.layout
    nb, n_q = lay.blocks_per_frame, lay.chunk_blocks
    n_keys = (step + 1) * n_q
    group = schedule.num_heads // schedule.num_kv_heads
    g = head // group
    q_reps, k_reps = _representatives(schedule, step, seed)

    # Persistent set: min(capacity, evicted so far) blocks of [sink, window start), by summed
    # score over the chunk's query representatives (all heads when the set is shared).
    persistent: list[int] = []
    w_start, _ = schedule.window_frames_range(step)
    evicted = np.arange(schedule.sink_frames * nb, max(schedule.sink_frames, w_start) * nb)
    if schedule.capacity and evicted.size:
        if schedule.update.shared_heads:
            heads = range(schedule.num_heads)
        else:
            heads = range(g * group, (g + 1) * group)
        score = sum((q_reps[h] @ k_reps[h // group, evicted].T).sum(axis=0) for h in heads)
        persistent = _top(score, evicted, min(schedule.capacity, evicted.size))

    grid = np.zeros((n_q, n_keys), dtype=np.int8)
    code = {name: i for i, name in enumerate(SEGMENTS, 1)}
    intersection = schedule.window.has_topk and schedule.window.split.mode == "intersection"
    topk_all, visit_counts = [], []
    for qb in range(n_q):
        topk: list[int] = []
        count = schedule.topk_count(step, qb)
        if count:
            cands = np.asarray(schedule.topk_candidates(step, qb))
            topk = _top(k_reps[g, cands] @ q_reps[head, qb], cands, count)
        visits = schedule.visits(step, qb, persistent=persistent, topk=topk)
        if len(set(visits)) != len(visits) or max(visits) >= n_keys:
            raise RuntimeError(f"schedule.visits(step={step}, query_block={qb}) repeats a block "
                               "or reaches into the future")
        parts = [("current", schedule.current_blocks(step, qb)),
                 ("sink", schedule.sink_blocks(step)),
                 ("persistent", persistent),
                 ("window-static", [] if intersection else schedule.static_window_blocks(step, qb)),
                 ("window-top-k", topk)]
        for name, blocks in parts:
            grid[qb, blocks] = code[name]
        if int((grid[qb] > 0).sum()) != len(visits):
            raise RuntimeError(f"step {step}, query block {qb}: the segments cover "
                               f"{int((grid[qb] > 0).sum())} blocks but visits() lists {len(visits)}")
        topk_all.append(tuple(topk))
        visit_counts.append(len(visits))
    return BlockMaskPicture(step, head, seed, grid, tuple(persistent), tuple(topk_all),
                            tuple(visit_counts))


def _tick_stride(n: int, most: int) -> int:
    """A 1-2-5 stride so that at most `most` of `n` ticks get a label."""
    for stride in (1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000):
        if n / stride <= most:
            return stride
    return max(1, n // most)


def draw_block_mask(schedule: Schedule, step: Optional[int] = None, path: Optional[str | Path] = None,
                    head: int = 0, seed: int = 0):
    """Draw the block mask of one AR step (one head) as a PNG at `path`; returns the path.

    With `path=None` the matplotlib Figure is returned instead (for notebooks).
    `step=None` picks `default_step(schedule)`: the first steady-state step.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    pic = block_mask_segments(schedule, step, head=head, seed=seed)
    lay = schedule.layout
    nb, c, n_q = lay.blocks_per_frame, lay.chunk_frames, lay.chunk_blocks
    step = pic.step
    n_keys = pic.history_blocks
    key_frames = n_keys // nb
    chunk0 = step * c

    # Wide figure; widen further for very long histories so each key block keeps >= ~1 pixel.
    dpi = 150
    width = min(48.0, max(16.0, n_keys / (0.86 * dpi) + 2.0))
    fig = Figure(figsize=(width, 5.0), dpi=dpi)
    left = min(0.05, 0.8 / width)
    ax = fig.add_axes((left, 0.19, 0.985 - left, 0.6))
    band = fig.add_axes((left, 0.8, 0.985 - left, 0.045), sharex=ax)

    colors = [COLORS["none"]] + [COLORS[s] for s in SEGMENTS]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(-0.5, len(colors) + 0.5), cmap.N)
    ax.imshow(pic.grid, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto",
              extent=(-0.5, n_keys - 0.5, n_q - 0.5, -0.5))

    # Frames: a tick at every boundary, labels thinned, light grid lines between frames.
    for f in range(1, key_frames):
        ax.axvline(f * nb - 0.5, color="#b0b0b0", lw=0.5, zorder=3)
    for r in range(1, c):
        ax.axhline(r * nb - 0.5, color="#b0b0b0", lw=0.5, zorder=3)
    ax.axvline(chunk0 * nb - 0.5, color="#404040", lw=1.0, zorder=4)
    stride = _tick_stride(key_frames, 40)
    ax.set_xticks([f * nb - 0.5 for f in range(key_frames + 1)], minor=True)
    ax.set_xticks([f * nb - 0.5 for f in range(0, key_frames + 1, stride)])
    ax.set_xticklabels([str(f) for f in range(0, key_frames + 1, stride)], fontsize=7)
    ax.set_yticks([r * nb - 0.5 for r in range(c + 1)])
    ax.set_yticklabels([str(chunk0 + r) for r in range(c + 1)], fontsize=7)
    ax.tick_params(which="minor", length=2)
    ax.set_xlim(-0.5, n_keys - 0.5)
    ax.set_xlabel(f"key blocks by frame (tick = frame boundary, {nb} blocks/frame; "
                  f"frame f starts at tick f)", fontsize=8)
    ax.set_ylabel(f"query blocks\n(chunk frames {chunk0}-{chunk0 + c - 1})", fontsize=8)

    # A band above the mask naming the frame ranges: sink, older frames, window, chunk.
    band.set_yticks([])
    band.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    for side in ("top", "right", "left", "bottom"):
        band.spines[side].set_visible(False)
    w_start, w_end = schedule.window_frames_range(step)
    sink_end = min(schedule.sink_frames, chunk0)
    older = (("older frames: persistent-memory candidates", "older: memory", "older", "o")
             if schedule.capacity else ("older frames: dropped", "dropped", "d"))
    spans = [(("sink", "s"), 0, sink_end, "#e4e0f2"), (older, sink_end, w_start, "#f7e3d6"),
             (("window", "w"), w_start, w_end, "#dcefe0"), (("chunk", "c"), chunk0, chunk0 + c,
                                                            "#dce4f2")]
    for labels, f0, f1, color in spans:
        if f1 <= f0:
            continue
        band.axvspan(f0 * nb - 0.5, f1 * nb - 0.5, color=color, lw=0)
        span_in = (f1 - f0) * nb / n_keys * width * 0.9   # inches the span takes on the page
        text = next((t for t in labels if 0.065 * len(t) < span_in), "")
        band.text((f0 + f1) / 2 * nb - 0.5, 0.5, text, ha="center", va="center", fontsize=7,
                  clip_on=True)

    visits = np.asarray(pic.visits)
    vtext = (f"{visits.min()}" if visits.min() == visits.max()
             else f"{visits.min()}-{visits.max()} (mean {visits.mean():.1f})")
    fig.suptitle(f"{schedule.pattern_name}: step {step} (frames {chunk0}-{chunk0 + c - 1}), "
                 f"density {pic.density:.1%} ({pic.attended} / {pic.grid.size} causal-history "
                 f"cells), visits per query block {vtext}", fontsize=11, y=0.97)
    dynamic = [name for name, on in (("Top-K", schedule.window.has_topk),
                                      ("persistent set", bool(pic.persistent))) if on]
    how = (f": {' and '.join(dynamic)} chosen as a rollout would on random data" if dynamic
           else " (this pattern has no runtime choices)")
    fig.text(0.5, 0.885, f"head {head}, random q/k (seed {seed}){how}; {lay}; "
                         f"schedule {schedule.key}", ha="center", fontsize=8, color="#404040")

    counts = pic.counts()
    handles = [Patch(facecolor=COLORS[s], edgecolor="#808080", lw=0.5,
                     label=f"{s} ({counts[s] / n_q:.1f}/query block)")
               for s in SEGMENTS if counts[s] or s in ("current",)]
    handles.append(Patch(facecolor="white", edgecolor="#808080", lw=0.5, label="not attended"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, -0.01))

    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


__all__ = ["draw_block_mask", "block_mask_segments", "default_step", "BlockMaskPicture",
           "SEGMENTS", "COLORS"]
