"""The pattern: what the user declares. Immutable, hashable, printable; validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import PatternError
from .layout import VideoLayout
from .neighborhood import split_dynamic
from .segments import Causal, Dense, LocalWindow, Persistent, Sink
from .update import Update


@dataclass(frozen=True)
class Pattern:
    """A persistent block-sparse attention pattern for AR video diffusion.

    Memory at step t is  sink ∪ persistent ∪ window-neighborhood ∪ current chunk.
    """

    layout: VideoLayout
    sink: Optional[Sink] = None
    persistent: Optional[Persistent] = None
    window: LocalWindow = field(default_factory=LocalWindow)
    current: Dense | Causal = field(default_factory=Dense)
    update: Optional[Update] = None
    name: str = "custom"

    def __post_init__(self) -> None:
        _expect(self.layout, VideoLayout, "layout", "a sparsedsl.VideoLayout(...)")
        _expect(self.sink, (Sink, type(None)), "sink", "None or sparsedsl.Sink(frames=...)")
        _expect(self.persistent, (Persistent, type(None)), "persistent",
                "None or sparsedsl.Persistent(capacity=...)")
        _expect(self.window, LocalWindow, "window", "sparsedsl.LocalWindow(frames=..., neighborhood=...)")
        _expect(self.current, (Dense, Causal), "current", "sparsedsl.Dense() or sparsedsl.Causal()")
        _expect(self.update, (Update, type(None)), "update", "None or sparsedsl.Update(score=...)")
        if not isinstance(self.name, str) or not self.name:
            raise PatternError("name", self.name, "a non-empty string")
        if self.persistent is not None:
            if not self.window.bounded:
                raise PatternError("persistent", str(self.persistent),
                                   "persistent memory only with a bounded window",
                                   hint="blocks become candidates when they leave the window; "
                                        "set window=LocalWindow(frames=W, ...)")
            if self.window.frames < self.layout.chunk_frames:
                raise PatternError("window.frames", self.window.frames,
                                   f"at least layout.chunk_frames = {self.layout.chunk_frames} "
                                   "when persistent memory is used",
                                   hint="a chunk's blocks must pass through the window before they "
                                        "compete for memory")
            if self.update is None:
                object.__setattr__(self, "update", Update())
        elif self.update is not None:
            raise PatternError("update", str(self.update), "None when persistent is None",
                               hint="the update rule chooses the persistent set; add "
                                    "persistent=Persistent(capacity=...)")

    # Convenience views used by the lowering passes.
    @property
    def sink_frames(self) -> int:
        return 0 if self.sink is None else self.sink.frames

    @property
    def window_frames(self) -> Optional[int]:
        return self.window.frames

    @property
    def capacity(self) -> int:
        return 0 if self.persistent is None else self.persistent.capacity

    @property
    def split(self):
        return split_dynamic(self.window.neighborhood)

    def describe(self) -> str:
        lines = [f"Pattern '{self.name}'", f"  layout:     {self.layout}"]
        lines.append(f"  sink:       {self.sink or 'none'}")
        lines.append(f"  persistent: {self.persistent or 'none'}")
        lines.append(f"  window:     {self.window}")
        lines.append(f"  current:    {self.current}")
        lines.append(f"  update:     {self.update or 'none'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def _expect(value: object, types, field_name: str, allowed: str) -> None:
    if not isinstance(value, types):
        raise PatternError(field_name, value, allowed)
