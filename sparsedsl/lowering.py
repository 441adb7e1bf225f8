"""Lowering passes: pattern -> schedule. Each pass is a small pure function.

    validate_options  the compile options (heads, head dim, dtype)
    resolve_window    static neighborhood -> offset table; TopK -> dynamic rule
    analyse_shapes    sympy sizes, visits, FLOPs and KV bytes vs the horizon
    build_schedule    the frozen, hashable IR
The graph pass (causality, duplicates, reach) lives in `sparsedsl.graph` and
runs on the finished schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy

from .errors import PatternError, require_int
from .neighborhood import All, Intersection, Neighborhood, Radius, TopK, Union, split_dynamic
from .pattern import Pattern
from .schedule import Schedule, UpdatePlan, WindowPlan, dtype_bytes
from .segments import Causal
from .shapes import ShapeAnalysis, analyse, w as w_symbol

DTYPES = ("float16", "bfloat16", "float32", "float64")
#: Head dims the generated kernels take (padded to a power of two >= 16 inside).
MAX_HEAD_DIM = 256
#: Entries of the static offset table (query blocks x window frames x blocks per frame) beyond
#: which lowering refuses: a Radius reaching back many frames over a long window.
MAX_STATIC_OFFSETS = 2_000_000


@dataclass(frozen=True)
class CompileOptions:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str


def validate_options(num_heads: int, num_kv_heads: Optional[int], head_dim: int,
                     dtype: object) -> CompileOptions:
    require_int("num_heads", num_heads, 1, 1024)
    if num_kv_heads is None:
        num_kv_heads = num_heads
    require_int("num_kv_heads", num_kv_heads, 1, num_heads)
    if num_heads % num_kv_heads:
        raise PatternError("num_kv_heads", num_kv_heads,
                           f"a divisor of num_heads = {num_heads} (grouped-query attention)")
    if (not isinstance(head_dim, bool) and isinstance(head_dim, int)
            and not 1 <= head_dim <= MAX_HEAD_DIM):
        raise PatternError("head_dim", head_dim, f"an integer in [1, {MAX_HEAD_DIM}]",
                           hint=f"the kernels take head dims up to {MAX_HEAD_DIM}")
    require_int("head_dim", head_dim, 1, MAX_HEAD_DIM)
    dtype_name = str(dtype).replace("torch.", "")
    if dtype_name not in DTYPES:
        raise PatternError("dtype", dtype, "one of " + ", ".join(DTYPES))
    return CompileOptions(num_heads, num_kv_heads, head_dim, dtype_name)


def time_extent(neighborhood: Neighborhood) -> Optional[int]:
    """How many frames back a static neighborhood reaches (None: unlimited)."""
    if isinstance(neighborhood, All):
        return None
    if isinstance(neighborhood, Radius):
        return neighborhood.t
    if isinstance(neighborhood, Union):
        left, right = time_extent(neighborhood.left), time_extent(neighborhood.right)
        return None if left is None or right is None else max(left, right)
    if isinstance(neighborhood, Intersection):
        extents = [e for e in (time_extent(neighborhood.left), time_extent(neighborhood.right))
                   if e is not None]
        return min(extents) if extents else None
    raise PatternError("window.neighborhood", str(neighborhood), "a static neighborhood here")


def resolve_window(pattern: Pattern) -> WindowPlan:
    """Resolve the static neighborhood into per-query-block offsets (frame offset, row, col)."""
    split = split_dynamic(pattern.window.neighborhood)
    layout = pattern.layout
    extent = time_extent(split.static)
    frames = pattern.window.frames
    lookback = extent if frames is None else (frames if extent is None else min(frames, extent))
    if lookback is None:
        return WindowPlan(frames, None, None, split)
    if extent is None:
        # The static part is All: the whole (bounded) window, no table (its cost would grow
        # with window.frames).
        return WindowPlan(frames, None, lookback, split)
    entries = layout.chunk_blocks * lookback * layout.blocks_per_frame
    if entries > MAX_STATIC_OFFSETS:
        raise PatternError("window.neighborhood", str(split.static),
                           f"a static neighborhood whose offset table (query blocks x frames "
                           f"reached x blocks per frame = {entries}) is at most "
                           f"{MAX_STATIC_OFFSETS} entries",
                           hint=f"it reaches back {lookback} frames; use a smaller Radius t or "
                                "window.frames, or All() for the whole window")
    offsets = []
    for query_block in range(layout.chunk_blocks):
        r, i, j = layout.block_coords(query_block)
        offsets.append(tuple(
            (d, ik, jk)
            for d in range(-lookback, 0)
            for ik in range(layout.tiles_h) for jk in range(layout.tiles_w)
            if split.static.contains((r, i, j), (d, ik, jk))))
    return WindowPlan(frames, tuple(offsets), lookback, split)


def analyse_shapes(pattern: Pattern, options: CompileOptions, window: WindowPlan) -> ShapeAnalysis:
    layout = pattern.layout
    nb, c = layout.blocks_per_frame, layout.chunk_frames
    split = window.split
    causal = isinstance(pattern.current, Causal)

    def current_count(query_block: int) -> int:
        return (query_block // nb + 1) * nb if causal else layout.chunk_blocks

    def static_count(query_block: int, frames: int) -> int:
        if window.static_offsets is None:
            return frames * nb
        return sum(1 for d, _, _ in window.static_offsets[query_block] if d >= -frames)

    def window_count(static: int, frames: int) -> int:
        if split.topk is None:
            return static
        k = split.topk.count(frames * nb)
        if split.mode == "union":
            return static + min(k, frames * nb - static)
        return min(k, static)

    def count_window(query_block: int, frames: int) -> tuple[int, int]:
        return current_count(query_block), window_count(static_count(query_block, frames), frames)

    def window_expr(static, wsym):
        if split.topk is None:
            return static
        k = split.topk.count_expr(wsym * nb)
        if split.mode == "union":
            return static + sympy.Min(k, wsym * nb - static)
        return sympy.Min(k, static)

    def tails(last_row):
        # Past the table (unbounded windows only) the static part is frozen at its last value,
        # or, for the whole window, grows as w * nb.
        pairs = sorted({(current_count(q), static_count(q, table_frames))
                        for q in range(layout.chunk_blocks)})
        if window.static_offsets is None:
            pairs = sorted({(current_count(q), None) for q in range(layout.chunk_blocks)})
        terms, total = [], 0
        for q in range(layout.chunk_blocks):
            st = w_symbol * nb if window.static_offsets is None else static_count(q, table_frames)
            total += current_count(q) + window_expr(st, w_symbol)
        for cur, st in pairs:
            st = w_symbol * nb if st is None else st
            terms.append(cur + window_expr(st, w_symbol))
        return sympy.Max(*terms), total

    # Tabulate only up to the frames the static offsets reach; past them every count has a
    # closed form in w (`tails`), so nothing here grows with window.frames.
    table_frames = 0 if window.static_offsets is None else window.lookback
    parts = dict(c=c, nb=nb, S=pattern.sink_frames, W=window.frames, C=pattern.capacity,
                 table_frames=table_frames, tails=tails, tokens_per_frame=layout.tokens_per_frame,
                 bt=layout.block_tokens, D=options.head_dim, dbytes=dtype_bytes(options.dtype),
                 H=options.num_heads, Hkv=options.num_kv_heads)
    return analyse(parts, count_window, layout.chunk_blocks)


def build_schedule(pattern: Pattern, options: CompileOptions, window: WindowPlan,
                   shapes: ShapeAnalysis) -> Schedule:
    update = None
    if pattern.persistent is not None:
        update = UpdatePlan(pattern.persistent.capacity, pattern.persistent.shared_heads,
                            pattern.update)
    steady = None
    if window.frames is not None:
        steady = shapes.max_visits_at(10**6)
    return Schedule(
        pattern_name=pattern.name, pattern_text=repr(pattern), layout=pattern.layout,
        num_heads=options.num_heads, num_kv_heads=options.num_kv_heads,
        head_dim=options.head_dim, dtype=options.dtype,
        current="causal" if isinstance(pattern.current, Causal) else "dense",
        sink_frames=pattern.sink_frames, window=window, update=update,
        max_visits=steady, shapes=shapes, pattern=pattern)


def lower(pattern: Pattern, num_heads: int = 12, num_kv_heads: Optional[int] = None,
          head_dim: int = 128, dtype: object = "bfloat16") -> Schedule:
    """Run every pass: pattern + options -> schedule."""
    if not isinstance(pattern, Pattern):
        raise PatternError("pattern", pattern, "a sparsedsl.Pattern (or a preset name via "
                                                "sparsedsl.presets.get)")
    options = validate_options(num_heads, num_kv_heads, head_dim, dtype)
    window = resolve_window(pattern)
    shapes = analyse_shapes(pattern, options, window)
    return build_schedule(pattern, options, window, shapes)


__all__ = ["CompileOptions", "validate_options", "resolve_window", "analyse_shapes",
           "build_schedule", "lower", "time_extent", "TopK"]
