"""Hypothesis strategies for testing patterns and kernels: the project's own, made public.

Use them to property-test your own patterns or backends against the float64
reference::

    from hypothesis import given
    import sparsedsl as sd
    from sparsedsl import testing as sdt

    @given(sdt.rollouts(sdt.schedules(pattern=my_pattern), steps=3))
    def test_my_backend(case):
        state = sd.reference.new_state(case.schedule, case.batch)
        for q, k, v in case.chunks:
            want, _, _ = sd.reference.attention(case.schedule, state, q, k, v)
            got = my_backend(case.schedule, state, q, k, v)
            assert torch.allclose(got.double(), want, atol=1e-6)
            state = sd.reference.commit(case.schedule, state, q, k, v)

All sizes are kept tiny so that examples run in milliseconds on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hypothesis import strategies as st

from .errors import require_int
from .layout import VideoLayout
from .lowering import lower
from .neighborhood import All, Neighborhood, Radius, TopK
from .pattern import Pattern
from .schedule import Schedule
from .segments import Causal, Dense, LocalWindow, Persistent, Sink
from .update import Update, age, importance, previous


@st.composite
def layouts(draw, max_side: int = 10, max_chunk_frames: int = 3) -> VideoLayout:
    """Small layouts, partial edge tiles included."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    th = draw(st.integers(1, min(height, 4)))
    tw = draw(st.integers(1, min(width, 4)))
    chunk = draw(st.integers(1, max_chunk_frames))
    return VideoLayout(height, width, (th, tw), chunk)


def static_neighborhoods(max_radius: int = 3) -> st.SearchStrategy[Neighborhood]:
    radius = st.builds(Radius, st.integers(0, max_radius), st.integers(0, max_radius),
                       st.integers(0, max_radius))
    leaf = st.one_of(st.just(All()), radius)
    return st.recursive(leaf, lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda ab: ab[0] | ab[1]),
        st.tuples(inner, inner).map(lambda ab: ab[0] & ab[1])), max_leaves=3)


def topks(max_k: int = 6) -> st.SearchStrategy[TopK]:
    return st.one_of(st.builds(TopK, k=st.integers(1, max_k)),
                     st.builds(TopK, fraction=st.sampled_from([0.1, 0.25, 0.3, 0.5, 1.0])))


@st.composite
def neighborhoods(draw) -> Neighborhood:
    """Every form the lowering accepts: S, TopK, S | TopK, S & TopK."""
    form = draw(st.sampled_from(["static", "topk", "union", "intersection"]))
    if form == "static":
        return draw(static_neighborhoods())
    topk = draw(topks())
    if form == "topk":
        return topk
    static = draw(static_neighborhoods())
    left_first = draw(st.booleans())
    if form == "union":
        return static | topk if left_first else topk | static
    return static & topk if left_first else topk & static


scores = st.sampled_from([importance, importance + previous / 2, importance - age / 100,
                          2 * importance + previous, -age])


@st.composite
def patterns(draw, layout: Optional[VideoLayout] = None) -> Pattern:
    """Random valid patterns over every segment kind."""
    layout = draw(layouts()) if layout is None else layout
    c = layout.chunk_frames
    sink = draw(st.one_of(st.none(), st.builds(Sink, st.integers(1, 3))))
    persistent = draw(st.one_of(st.none(), st.builds(Persistent, st.integers(1, 6), st.booleans())))
    if persistent is not None:
        frames = draw(st.integers(c, c + 3))
    else:
        frames = draw(st.one_of(st.none(), st.integers(1, 4)))
    window = LocalWindow(frames, draw(neighborhoods()))
    current = draw(st.sampled_from([Dense(), Causal()]))
    update = Update(draw(scores)) if persistent is not None else None
    return Pattern(layout, sink=sink, persistent=persistent, window=window, current=current,
                   update=update)


@st.composite
def schedules(draw, pattern=None, max_heads: int = 2, head_dim: int = 4) -> Schedule:
    """Lowered patterns with small head counts (grouped-query attention included)."""
    pattern = draw(patterns()) if pattern is None else (
        draw(pattern) if isinstance(pattern, st.SearchStrategy) else pattern)
    kv_heads = draw(st.integers(1, max_heads))
    group = draw(st.integers(1, 2))
    return lower(pattern, num_heads=kv_heads * group, num_kv_heads=kv_heads,
                 head_dim=head_dim, dtype=draw(st.sampled_from(["float32", "bfloat16"])))


@dataclass(frozen=True)
class RolloutCase:
    schedule: Schedule
    batch: int
    chunks: tuple  # of (q, k, v) in tile-major layout, float64
    seed: int


def chunk_tensors(schedule: Schedule, batch: int, seed: int, steps: int, quantize: bool = False):
    """(q, k, v) per step; `quantize` rounds to a coarse grid to provoke score ties."""
    gen = torch.Generator().manual_seed(seed)
    lay = schedule.layout
    n = lay.chunk_blocks * lay.block_tokens
    valid = lay.valid_token_mask(lay.chunk_frames)
    chunks = []
    for _ in range(steps):
        parts = []
        for heads in (schedule.num_heads, schedule.num_kv_heads, schedule.num_kv_heads):
            x = torch.randn(batch, heads, n, schedule.head_dim, generator=gen, dtype=torch.float64)
            if quantize:
                x = torch.round(x)
            parts.append(x * valid[None, None, :, None])  # padding slots hold zeros
        chunks.append(tuple(parts))
    return tuple(chunks)


def rollouts(schedule=None, steps: Optional[int] = None,
             max_batch: int = 2) -> st.SearchStrategy[RolloutCase]:
    """A schedule and random chunks for a rollout of `steps` AR steps (None: 1 to 5)."""
    if steps is not None:
        require_int("rollouts.steps", steps, 1)  # 0 or -1 would yield empty rollouts
    require_int("rollouts.max_batch", max_batch, 1)
    return _rollouts(schedule, steps, max_batch)


@st.composite
def _rollouts(draw, schedule, steps, max_batch) -> RolloutCase:
    schedule = draw(schedules()) if schedule is None else (
        draw(schedule) if isinstance(schedule, st.SearchStrategy) else schedule)
    steps = draw(st.integers(1, 5)) if steps is None else steps
    batch = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**31 - 1))
    quantize = draw(st.booleans())
    return RolloutCase(schedule, batch, chunk_tensors(schedule, batch, seed, steps, quantize), seed)


#: Declarations that must raise PatternError: (description, thunk).
def invalid_declarations() -> st.SearchStrategy[tuple[str, Callable[[], object]]]:
    lay = VideoLayout(8, 8, (4, 4), 2)
    bad_values = st.sampled_from([0, -1, 1.5, "3", None, True])
    cases = [
        ("layout.height", lambda v: VideoLayout(v, 8, (4, 4), 2)),
        ("layout.width", lambda v: VideoLayout(8, v, (4, 4), 2)),
        ("layout.tile", lambda v: VideoLayout(8, 8, (v, 4), 2)),
        ("layout.chunk_frames", lambda v: VideoLayout(8, 8, (4, 4), v)),
        ("sink.frames", lambda v: Sink(v)),
        ("persistent.capacity", lambda v: Persistent(v)),
        ("window.frames", lambda v: LocalWindow(v if v is not None else 0)),
        ("Radius.t", lambda v: Radius(v, 1, 1) if v != 0 else Radius(-1, 1, 1)),
        ("TopK.k", lambda v: TopK(k=v if v is not None else 0)),
        ("TopK.fraction", lambda v: TopK(fraction=v if v is not None else 0.0)),
        ("num_heads", lambda v: lower(Pattern(lay), num_heads=v if v is not None else 0)),
    ]
    fixed = [
        ("window.neighborhood", lambda: Pattern(lay, window=LocalWindow(2, TopK(k=1) | TopK(k=2)))),
        ("window.neighborhood", lambda: LocalWindow(2, (Radius() | TopK(k=1)) & Radius())),
        ("persistent", lambda: Pattern(lay, persistent=Persistent(4))),  # unbounded window
        ("window.frames", lambda: Pattern(lay, persistent=Persistent(4),
                                          window=LocalWindow(1, All()))),  # W < chunk
        ("update", lambda: Pattern(lay, update=Update())),
        ("update.score", lambda: Update(score=importance + __import__("sympy").Symbol("x"))),
        ("update.score", lambda: Update(score="not an expression (")),
        ("num_kv_heads", lambda: lower(Pattern(lay), num_heads=4, num_kv_heads=3)),
        ("dtype", lambda: lower(Pattern(lay), dtype="int8")),
        ("layout", lambda: Pattern("30x52")),
        ("current", lambda: Pattern(lay, current="causal")),
        ("TopK", lambda: TopK()),
        ("TopK", lambda: TopK(k=2, fraction=0.5)),
        ("layout.tile", lambda: VideoLayout(8, 8, (9, 4), 2)),
    ]
    parametric = st.tuples(st.sampled_from(cases), bad_values).filter(
        lambda cv: not (cv[0][0] == "layout.tile" and cv[1] in (None,))).map(
        lambda cv: (cv[0][0], lambda: cv[0][1](cv[1])))
    return st.one_of(parametric, st.sampled_from(fixed))
