"""The memory update rule: a sympy score over per-block statistics, then Top-C.

After chunk t is committed, the candidates are P_t ∪ E_t (E_t: blocks leaving
the window). Each candidate gets the statistics below; the `capacity`
candidates with the highest score form P_{t+1} (ties to the lower block index).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from types import SimpleNamespace

import sympy

from .errors import PatternError

#: Block-level softmax attention mass the block receives from the chunk's query
#: representatives, summed over query blocks (Sparse Forcing's column sum).
importance = sympy.Symbol("importance", nonnegative=True)
#: The block's score after the previous update (0 for a block just evicted from the window).
previous = sympy.Symbol("previous", real=True)
#: Frames since the block's frame: (t+1)*c - 1 - f.
age = sympy.Symbol("age", nonnegative=True, integer=True)

STATISTICS = {"importance": importance, "previous": previous, "age": age}

#: Namespace for user code: `sd.stat.importance + 0.5 * sd.stat.previous`.
stat = SimpleNamespace(**STATISTICS)


@dataclass(frozen=True)
class Update:
    """`P_{t+1} = TopC(P_t ∪ E_t ; score)`; `score` is a sympy expression over `stat.*`."""

    score: sympy.Expr = field(default=importance)

    def __post_init__(self) -> None:
        try:
            expr = sympy.sympify(self.score)
        except (sympy.SympifyError, TypeError) as exc:
            raise PatternError("update.score", self.score,
                               "a sympy expression over " + ", ".join(STATISTICS)) from exc
        if not isinstance(expr, sympy.Expr):
            raise PatternError("update.score", self.score,
                               "a sympy expression over " + ", ".join(STATISTICS))
        unknown = sorted(str(s) for s in expr.free_symbols if s not in STATISTICS.values())
        if unknown:
            raise PatternError("update.score", str(expr),
                               "only the statistics " + ", ".join(STATISTICS),
                               hint=f"unknown symbols: {', '.join(unknown)}; "
                                    "use sparsedsl.stat.<name>")
        probe = expr.subs({importance: sympy.Rational(1, 3), previous: sympy.Rational(1, 7), age: 2})
        if probe.has(sympy.I) or probe.has(sympy.zoo) or probe.has(sympy.nan):
            raise PatternError("update.score", str(expr), "an expression with real values")
        object.__setattr__(self, "score", expr)

    def evaluate(self, importance_value, previous_value, age_value):
        """Score candidates (scalars or numpy/torch arrays) with the expression, in float64."""
        return _numeric(self.score)(importance_value, previous_value, age_value)

    def __str__(self) -> str:
        return f"Update(score={self.score})"


@lru_cache(maxsize=None)
def _numeric(expr: sympy.Expr):
    """Compile the score once to a numpy function of (importance, previous, age)."""
    return sympy.lambdify((importance, previous, age), expr, modules="numpy")
