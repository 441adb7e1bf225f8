"""Named patterns, each written in the DSL itself (attention-gym style: the name says what it is).

All presets default to Self-Forcing's geometry: 30 x 52 latent tokens per frame,
8 x 8 tiles (4 x 7 blocks, the bottom row partial) and 3-frame chunks.
"""
from __future__ import annotations

from typing import Callable

from .errors import PatternError
from .layout import VideoLayout
from .neighborhood import All, Radius, TopK
from .pattern import Pattern
from .segments import Dense, LocalWindow, Persistent, Sink
from .update import Update, importance

SELF_FORCING_LAYOUT = VideoLayout(height=30, width=52, tile=(8, 8), chunk_frames=3)


def dense_causal(layout: VideoLayout = SELF_FORCING_LAYOUT) -> Pattern:
    """Self-Forcing: every earlier frame, dense chunk (block-causal)."""
    return Pattern(layout, window=LocalWindow(None, All()), current=Dense(), name="dense-causal")


def sliding_window(layout: VideoLayout = SELF_FORCING_LAYOUT, frames: int = 6) -> Pattern:
    """The last `frames` frames, densely."""
    return Pattern(layout, window=LocalWindow(frames, All()), name="sliding-window")


def sink_window(layout: VideoLayout = SELF_FORCING_LAYOUT, sink: int = 1, frames: int = 6) -> Pattern:
    """StreamingLLM-style: sink frames kept forever plus a dense sliding window."""
    return Pattern(layout, sink=Sink(sink), window=LocalWindow(frames, All()), name="sink-window")


def sliding_tile(layout: VideoLayout = SELF_FORCING_LAYOUT, t: int = 3, h: int = 1, w: int = 1) -> Pattern:
    """Sliding Tile Attention: a static 3D box of tiles around each query block."""
    return Pattern(layout, window=LocalWindow(t, Radius(t, h, w)), name="sliding-tile")


def moba(layout: VideoLayout = SELF_FORCING_LAYOUT, k: int = 32) -> Pattern:
    """MoBA: Top-K over all history by mean-pooled keys; the chunk itself always attended."""
    return Pattern(layout, window=LocalWindow(None, TopK(k=k)), name="moba")


def sparse_forcing(layout: VideoLayout = SELF_FORCING_LAYOUT, capacity: int = 64,
                   window_frames: int = 6, fraction: float = 0.25) -> Pattern:
    """Sparse Forcing: sink + persistent memory + window (radius ∪ Top-K) + importance update."""
    return Pattern(layout, sink=Sink(1), persistent=Persistent(capacity=capacity),
                   window=LocalWindow(window_frames, Radius(1, 1, 1) | TopK(fraction=fraction)),
                   current=Dense(), update=Update(score=importance), name="sparse-forcing")


PRESETS: dict[str, Callable[..., Pattern]] = {
    "dense-causal": dense_causal,
    "sliding-window": sliding_window,
    "sink-window": sink_window,
    "sliding-tile": sliding_tile,
    "moba": moba,
    "sparse-forcing": sparse_forcing,
}


def get(name: str, **overrides) -> Pattern:
    """A preset by name; keyword overrides go to its factory (e.g. layout=..., capacity=...)."""
    if name not in PRESETS:
        raise PatternError("preset", name, "one of " + ", ".join(PRESETS))
    return PRESETS[name](**overrides)
