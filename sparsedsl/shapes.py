"""Symbolic shape and cost analysis (sympy): sizes, visits, FLOPs and KV bytes vs the horizon.

Symbols: `t` is the AR step (chunk index), `T` the horizon in frames (committed frames).
Every per-step quantity is piecewise linear in t; the neighborhood-dependent part
is tabulated per number of window frames w and folded into a Piecewise of w.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy

t = sympy.Symbol("t", integer=True, nonnegative=True)   # AR step
T = sympy.Symbol("T", integer=True, nonnegative=True)   # horizon in frames
w = sympy.Symbol("w", integer=True, nonnegative=True)   # window frames present


@dataclass(frozen=True)
class ShapeAnalysis:
    tokens_per_frame: int
    blocks_per_frame: int
    block_tokens: int
    padding_per_frame: int
    window_frames: sympy.Expr          # of t
    sink_blocks: sympy.Expr            # of t
    persistent_blocks: sympy.Expr      # of t (P_t holds min(C, evicted so far))
    max_visits: sympy.Expr             # of t: max over query blocks (and heads) of visited blocks
    total_visits: sympy.Expr           # of t: sum over the chunk's query blocks
    dense_total_visits: sympy.Expr     # of t: block-causal dense attention (Self-Forcing)
    kv_blocks: sympy.Expr              # of T: blocks held per KV head after T frames committed
    dense_kv_blocks: sympy.Expr        # of T
    flops_per_block_visit: int         # per head: 4 * BT^2 * D
    bytes_per_block: int               # K and V of one block of one KV head
    num_heads: int
    num_kv_heads: int
    chunk_frames: int
    #: First step from which every per-step count is constant (None: the window is unbounded).
    settle_step: Optional[int] = None

    # --- numbers at a horizon -------------------------------------------------------
    def steps(self, horizon_frames: int) -> int:
        return -(-horizon_frames // self.chunk_frames)

    def max_visits_at(self, step: int) -> int:
        return int(self.max_visits.subs(t, step))

    def total_visits_at(self, step: int) -> int:
        """Visits summed over the chunk's query blocks (one head) at `step`."""
        return int(self.total_visits.subs(t, step))

    def flops(self, horizon_frames: int, dense: bool = False) -> int:
        """Attention FLOPs (forward, all heads, one layer, one batch element) to generate T frames."""
        per_step = self.dense_total_visits if dense else self.total_visits
        steps = self.steps(horizon_frames)
        if per_step.is_polynomial(t):  # closed form
            visits = sympy.summation(per_step, (t, 0, steps - 1)) if steps > 0 else 0
        elif self.settle_step is not None and steps > self.settle_step:
            # constant from settle_step on: the sum up to there, then a product
            head = sum(int(per_step.subs(t, s)) for s in range(self.settle_step))
            visits = head + (steps - self.settle_step) * int(per_step.subs(t, self.settle_step))
        else:  # unbounded window: linear in the steps (callers bound the horizon)
            f = _numeric_of_t(per_step)
            visits = sum(int(round(f(s))) for s in range(steps))
        return int(visits) * self.flops_per_block_visit * self.num_heads

    def kv_bytes(self, horizon_frames: int, dense: bool = False) -> int:
        """KV-cache bytes (one layer, one batch element) held after T frames are committed."""
        blocks = self.dense_kv_blocks if dense else self.kv_blocks
        return int(blocks.subs(T, horizon_frames)) * self.bytes_per_block * self.num_kv_heads

    def kv_bytes_expr(self) -> sympy.Expr:
        return self.kv_blocks * self.bytes_per_block * self.num_kv_heads

    def steady_state_flops_per_step(self) -> Optional[int]:
        """FLOPs of one step once sink, window and memory are full (None if it keeps growing)."""
        a, b = (int(self.total_visits.subs(t, 10_000)), int(self.total_visits.subs(t, 20_000)))
        if a != b:
            return None
        return a * self.flops_per_block_visit * self.num_heads


def _numeric_of_t(expr: sympy.Expr):
    return sympy.lambdify(t, expr, modules="math")


def piecewise_table(values: list[int], tail: sympy.Expr) -> sympy.Expr:
    """f(w) = values[w] for w < len(values), else `tail` (an expression of w)."""
    pieces = [(sympy.Integer(v), sympy.Eq(w, i)) for i, v in enumerate(values)]
    return sympy.Piecewise(*pieces, (tail, True))


def analyse(schedule_parts: dict, count_window: Callable[[int, int], tuple[int, int]],
            query_blocks: int) -> ShapeAnalysis:
    """Build the sympy analysis.

    `count_window(query_block, w)` returns (current visits, window visits) for a query block when
    the window holds w frames and the persistent/sink segments are ignored; `schedule_parts`
    carries the scalar sizes.
    """
    p = schedule_parts
    c, nb, S, W, C = p["c"], p["nb"], p["S"], p["W"], p["C"]
    window_frames = sympy.Max(0, t * c - S) if W is None else sympy.Max(0, sympy.Min(t * c - S, W))
    sink_blocks = sympy.Min(S, t * c) * nb
    evicted_frames = 0 if W is None else sympy.Max(0, t * c - S - W)
    persistent_blocks = sympy.Min(C, evicted_frames * nb) if C else sympy.Integer(0)

    # Tabulate the neighborhood part up to the frames it can ever see; beyond, use the
    # tail (only unbounded windows grow past the table).
    table_frames = p["table_frames"]
    per_query = [[count_window(q, frames) for q in range(query_blocks)]
                 for frames in range(table_frames + 1)]
    max_table = [max(cur + win for cur, win in row) for row in per_query]
    sum_table = [sum(cur + win for cur, win in row) for row in per_query]
    # Past the table every count has a closed form in w (the window bound W enters through
    # window_frames below), so the table never grows with W.
    max_tail, sum_tail = p["tails"](per_query[-1])
    max_part = piecewise_table(max_table, max_tail)
    sum_part = piecewise_table(sum_table, sum_tail)

    max_visits = sink_blocks + persistent_blocks + max_part.subs(w, window_frames)
    total_visits = query_blocks * (sink_blocks + persistent_blocks) + sum_part.subs(w, window_frames)
    # Self-Forcing's dense causal attention: every block of every earlier frame + the chunk.
    dense_total = query_blocks * (t * c * nb + query_blocks)

    kv_frames = (lambda h: sympy.Min(S, h) * nb + (sympy.Max(0, h - S) if W is None
                                                   else sympy.Min(W, sympy.Max(0, h - S))) * nb)
    kv_blocks = kv_frames(T) + (sympy.Min(C, nb * sympy.Max(0, T - S - W)) if C else 0)
    return ShapeAnalysis(
        tokens_per_frame=p["tokens_per_frame"], blocks_per_frame=nb, block_tokens=p["bt"],
        padding_per_frame=nb * p["bt"] - p["tokens_per_frame"],
        window_frames=window_frames, sink_blocks=sink_blocks, persistent_blocks=persistent_blocks,
        max_visits=max_visits,
        total_visits=total_visits, dense_total_visits=sympy.expand(dense_total),
        kv_blocks=sympy.sympify(kv_blocks), dense_kv_blocks=T * nb,
        flops_per_block_visit=4 * p["bt"] * p["bt"] * p["D"], bytes_per_block=2 * p["bt"] * p["D"] * p["dbytes"],
        num_heads=p["H"], num_kv_heads=p["Hkv"], chunk_frames=c,
        settle_step=None if W is None else -(-(S + W + -(-C // nb)) // c))
