"""Segments of the KV space, each with one access rule (docs/design.md §2).

sink: first frames, kept forever, attended densely;
persistent: at most `capacity` older blocks chosen by the update rule, attended densely;
window: the last `frames` frames before the chunk, restricted to a neighborhood;
current: the chunk's own blocks, dense or causal by frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import PatternError, require_int
from .neighborhood import All, Neighborhood, split_dynamic


@dataclass(frozen=True)
class Sink:
    """The first `frames` latent frames stay in the cache forever (StreamingLLM-style sink)."""

    frames: int = 1

    def __post_init__(self) -> None:
        require_int("sink.frames", self.frames, 1)

    def __str__(self) -> str:
        return f"Sink(frames={self.frames})"


@dataclass(frozen=True)
class Persistent:
    """Long-range memory: at most `capacity` blocks older than the window.

    shared_heads=True keeps one set for all heads (scores averaged over heads);
    False keeps one set per KV head.
    """

    capacity: int = 64
    shared_heads: bool = True

    def __post_init__(self) -> None:
        require_int("persistent.capacity", self.capacity, 1)
        if not isinstance(self.shared_heads, bool):
            raise PatternError("persistent.shared_heads", self.shared_heads, "True or False")

    def __str__(self) -> str:
        return f"Persistent(capacity={self.capacity}, shared_heads={self.shared_heads})"


@dataclass(frozen=True)
class LocalWindow:
    """The last `frames` frames before the chunk (None: all frames after the sink)."""

    frames: Optional[int] = None
    neighborhood: Neighborhood = field(default_factory=All)

    def __post_init__(self) -> None:
        if self.frames is not None:
            require_int("window.frames", self.frames, 1)
        split_dynamic(self.neighborhood)  # raises PatternError on a form we cannot lower

    @property
    def bounded(self) -> bool:
        return self.frames is not None

    def __str__(self) -> str:
        frames = "unbounded" if self.frames is None else f"frames={self.frames}"
        return f"LocalWindow({frames}, neighborhood={self.neighborhood})"


@dataclass(frozen=True)
class Dense:
    """Every query block of the chunk sees every block of the chunk."""

    def __str__(self) -> str:
        return "Dense()"


@dataclass(frozen=True)
class Causal:
    """A query block of frame f sees the chunk's blocks of frames <= f."""

    def __str__(self) -> str:
        return "Causal()"


CurrentRule = Dense | Causal
