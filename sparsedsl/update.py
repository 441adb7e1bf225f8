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
from sympy.parsing.sympy_parser import TokenError

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

#: What a score string may use besides the statistics: sympy's functions and numbers (no
#: builtins, so a string cannot run arbitrary Python).
_PARSE_GLOBALS = {name: getattr(sympy, name) for name in dir(sympy) if not name.startswith("_")}
_PARSE_GLOBALS["__builtins__"] = {}


@dataclass(frozen=True)
class Update:
    """`P_{t+1} = TopC(P_t ∪ E_t ; score)`; `score` is a sympy expression over `stat.*`."""

    score: sympy.Expr = field(default=importance)

    def __post_init__(self) -> None:
        try:
            if isinstance(self.score, str):
                # parse against the known statistics, so "importance*2" means stat.importance
                expr = sympy.parse_expr(self.score, local_dict=dict(STATISTICS),
                                        global_dict=_PARSE_GLOBALS, evaluate=True)
            else:
                expr = sympy.sympify(self.score)
        except (sympy.SympifyError, TypeError, SyntaxError, TokenError, ValueError,
                AttributeError, NameError) as exc:
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
