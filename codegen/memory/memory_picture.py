"""What a rollout cache holds over time: snapshots, a simulated rollout and its picture."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

#: Most AR steps `simulate_memory` runs (an unbounded window holds every frame of them).
MAX_SIMULATED_STEPS = 2_000


@dataclass(frozen=True)
class MemorySnapshot:
    """What one layer holds after `frames` committed frames (the memory chunk `step` sees).

    persistent[(b, g)] = {block: score}; sink / window are frame ranges [start, end).
    """

    step: int
    frames: int
    blocks_per_frame: int
    sink: tuple[int, int]
    window: tuple[int, int]
    persistent: dict = field(default_factory=dict)

    def frame_counts(self, b: int = 0) -> dict[int, float]:
        """Persistent blocks per frame, averaged over the KV heads of batch element b."""
        keys = [k for k in self.persistent if k[0] == b]
        counts: dict[int, float] = {}
        for key in keys:
            for block in self.persistent[key]:
                f = block // self.blocks_per_frame
                counts[f] = counts.get(f, 0.0) + 1.0 / len(keys)
        return counts

    def place(self, frame: int, counts: Optional[dict] = None) -> str:
        """Where `frame` is in this memory: "sink", "window", "persistent" (some of its
        blocks kept) or "dropped". `counts`: `frame_counts(b)`, for callers that ask about
        many frames (default: batch element 0)."""
        if self.sink[0] <= frame < self.sink[1]:
            return "sink"
        if self.window[0] <= frame < self.window[1]:
            return "window"
        counts = self.frame_counts() if counts is None else counts
        return "persistent" if counts.get(frame, 0.0) > 0 else "dropped"


# ==================================================================================
# a simulated rollout and its picture
# ==================================================================================
def simulate_memory(program, steps: int, batch: int = 1, seed: int = 0, device="cpu",
                    dtype=torch.float32, chunks: Optional[Sequence] = None) -> list[MemorySnapshot]:
    """Commit `steps` chunks (random q/k/v unless `chunks` gives (q, k, v) per step) through a
    one-layer cache (`program.new_cache`) and return the memory after every step (snapshot
    i = before chunk i)."""
    s = program.schedule
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_SIMULATED_STEPS:
        raise ValueError(f"simulate_memory: steps = {steps!r} is not allowed: an integer in "
                         f"[0, {MAX_SIMULATED_STEPS}] (the simulation holds and draws every step)")
    # the program makes the cache (PBSAProgram.new_cache -> RolloutCache): this module sits
    # below rollout_cache.py, which imports it, and does not import it back
    cache = program.new_cache(batch=batch, num_layers=1, device=device, dtype=dtype,
                              max_frames=(steps + 1) * s.chunk_frames if s.window.frames is None
                              else None)
    gen = torch.Generator().manual_seed(seed)
    lay = s.layout
    n = lay.chunk_blocks * lay.block_tokens
    valid = lay.valid_token_mask(lay.chunk_frames)[None, None, :, None]
    snaps = [cache.snapshot()]
    for t in range(steps):
        if chunks is not None:
            q, k, v = (x.to(device=device, dtype=dtype) for x in chunks[t])
        else:
            q, k, v = ((torch.randn(batch, h, n, s.head_dim, generator=gen) * valid)
                       .to(device=device, dtype=dtype)
                       for h in (s.num_heads, s.num_kv_heads, s.num_kv_heads))
        cache.commit(0, q, k, v)
        snaps.append(cache.snapshot())
    return snaps


def draw_memory(snapshots: Sequence[MemorySnapshot], path=None, *, batch: int = 0,
                title: Optional[str] = None, marks: Sequence[tuple[int, int, str]] = ()):
    """Which blocks of which frames are in memory over a rollout, as a PNG at `path`.

    x = AR step t (the memory that chunk t attends to), y = frame; a cell is coloured by
    the number of that frame's blocks in the persistent set (mean over KV heads of batch
    element `batch`; exact for shared sets), purple for sink frames, green for window
    frames, light grey for frames that left the window with no block kept, white for
    frames not generated yet. `marks` (x, frame, label) ring the cells to look at, e.g. at
    a revisit the last frame that showed the returning content, at the step that brings it
    back. Returns the path (or the Figure when path is None).
    Needs only the snapshots (plain data) and matplotlib.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not snapshots:
        raise ValueError("draw_memory: no snapshots")
    nb = snapshots[0].blocks_per_frame
    steps = len(snapshots)
    n_frames = max(max(sn.frames for sn in snapshots), 1)
    rgba = np.ones((n_frames, steps, 4))
    counts = np.full((n_frames, steps), np.nan)
    sink_c, win_c, gone_c = (np.array(to_rgba) for to_rgba in
                             ((0.506, 0.447, 0.702, 1.0), (0.333, 0.659, 0.408, 1.0),
                              (0.9, 0.9, 0.9, 1.0)))
    from matplotlib import colormaps
    cmap = ListedColormap(colormaps["YlOrRd"](np.linspace(0.12, 1.0, 256)))
    norm = Normalize(vmin=0.0, vmax=float(nb))
    total_p = []
    for x, sn in enumerate(snapshots):
        fc = sn.frame_counts(batch)
        total_p.append(sum(fc.values()))
        for f in range(sn.frames):
            place = sn.place(f, fc)
            if place == "persistent":
                counts[f, x] = fc[f]
                rgba[f, x] = cmap(norm(fc[f]))
            else:
                rgba[f, x] = {"sink": sink_c, "window": win_c, "dropped": gone_c}[place]
    height = min(12.0, max(4.0, n_frames * 0.06 + 2.5))
    width = min(16.0, max(8.0, steps * 0.08 + 3.0))
    fig = Figure(figsize=(width, height), dpi=120)
    ax = fig.add_axes((0.09, 0.12, 0.74, 0.76))
    ax.imshow(rgba, origin="lower", aspect="auto", interpolation="nearest",
              extent=(-0.5, steps - 0.5, -0.5, n_frames - 0.5))
    for x, frame, label in marks:
        ax.plot([x], [frame], marker="o", markersize=9, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.5)
        ax.annotate(label, (x, frame), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("AR step t (memory seen by chunk t)")
    ax.set_ylabel("latent frame")
    cax = fig.add_axes((0.86, 0.12, 0.025, 0.76))
    from matplotlib.cm import ScalarMappable
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax,
                 label=f"blocks of the frame in the persistent set (of {nb})")
    handles = [Patch(facecolor=sink_c, label="sink"), Patch(facecolor=win_c, label="window"),
               Patch(facecolor=gone_c, edgecolor="#a0a0a0", label="dropped (no block kept)"),
               Patch(facecolor="white", edgecolor="#a0a0a0", label="not generated yet")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    last = snapshots[-1]
    fig.suptitle(textwrap.fill(title, int(width * 11)) if title else
                 f"persistent memory over {steps - 1} AR steps\n"
                          f"({last.frames} frames, {nb} blocks/frame; "
                          f"{total_p[-1]:.0f} persistent blocks at the end)", fontsize=10)
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
