"""sparsedsl: declare persistent block-sparse attention patterns, compile them to kernels.

    import sparsedsl as sd
    pattern = sd.Pattern(layout=sd.VideoLayout(30, 52, tile=(8, 8), chunk_frames=3),
                         sink=sd.Sink(1), persistent=sd.Persistent(capacity=64),
                         window=sd.LocalWindow(6, sd.Radius(1, 1, 1) | sd.TopK(fraction=0.25)),
                         update=sd.Update(score=sd.stat.importance))
    program = sd.compile(pattern, num_heads=12, head_dim=128, dtype="bfloat16")
    print(program.explain())
"""
from __future__ import annotations

from typing import Optional

from . import presets, reference
from .backends import available_backends, get_backend, make_program, register_backend
from .errors import BackendError, PatternError
from .layout import VideoLayout
from .lowering import lower
from .neighborhood import All, Intersection, Neighborhood, Radius, TopK, Union
from .pattern import Pattern
from .program import ReferenceCache, ReferenceProgram
from .protocol import Cache, Program
from .schedule import Schedule
from .segments import Causal, Dense, LocalWindow, Persistent, Sink
from .update import Update, stat

__version__ = "0.1.0"

register_backend("reference", ReferenceProgram)


def compile(pattern: Pattern, *, num_heads: int = 12, num_kv_heads: Optional[int] = None,
            head_dim: int = 128, dtype: object = "bfloat16", backend: str = "auto", **options):
    """Lower `pattern` to a schedule and hand it to a backend ("auto": Triton on a GPU, else the
    PyTorch backend, else the float64 reference). Every backend returns a `Program`
    (sparsedsl/protocol.py); one that does not raises BackendError here."""
    schedule = lower(pattern, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, dtype=dtype)
    return make_program(backend, schedule, **options)


__all__ = ["compile", "lower", "Pattern", "VideoLayout", "Sink", "Persistent", "LocalWindow",
           "Dense", "Causal", "All", "Radius", "TopK", "Union", "Intersection", "Neighborhood",
           "Update", "stat", "PatternError", "BackendError", "Schedule", "presets", "reference",
           "register_backend", "available_backends", "get_backend", "Program", "Cache",
           "ReferenceProgram", "ReferenceCache"]
