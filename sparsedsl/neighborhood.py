"""The neighborhood algebra: which window blocks a query block may attend.

Static neighborhoods (`All`, `Radius`) depend only on block coordinates and are
resolved at compile time into offset tables. `TopK` is dynamic: it is chosen
per head at run time by representative attention. Combine with `|` and `&`.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Optional, Union as TypingUnion

from .errors import PatternError, require_int

Coord = tuple[int, int, int]  # (frame, tile row, tile col)


class Neighborhood:
    """Base class of the algebra; subclasses are frozen dataclasses."""

    def __or__(self, other: "Neighborhood") -> "Neighborhood":
        return Union(self, _check_operand(other, "|"))

    def __and__(self, other: "Neighborhood") -> "Neighborhood":
        return Intersection(self, _check_operand(other, "&"))

    @property
    def is_static(self) -> bool:
        raise NotImplementedError


class StaticNeighborhood(Neighborhood):
    """A neighborhood decided by coordinates alone."""

    def contains(self, query: Coord, key: Coord) -> bool:
        raise NotImplementedError

    @property
    def is_static(self) -> bool:
        return True


def _check_operand(other: object, op: str) -> Neighborhood:
    if not isinstance(other, Neighborhood):
        raise PatternError(f"neighborhood {op} operand", other,
                           "a Neighborhood (All(), Radius(...), TopK(...) or a combination)")
    return other


@dataclass(frozen=True)
class All(StaticNeighborhood):
    """Every window block."""

    def contains(self, query: Coord, key: Coord) -> bool:
        return True

    def __str__(self) -> str:
        return "All()"


@dataclass(frozen=True)
class Radius(StaticNeighborhood):
    """Key blocks within `t` frames back and `h`/`w` tiles of the query block (a 3D box).

    (fk, ik, jk) is in the neighborhood of (fq, iq, jq) when fq - fk <= t,
    |iq - ik| <= h and |jq - jk| <= w.
    """

    t: int = 1
    h: int = 1
    w: int = 1

    def __post_init__(self) -> None:
        require_int("Radius.t", self.t, 0)
        require_int("Radius.h", self.h, 0)
        require_int("Radius.w", self.w, 0)

    def contains(self, query: Coord, key: Coord) -> bool:
        return (query[0] - key[0] <= self.t and abs(query[1] - key[1]) <= self.h
                and abs(query[2] - key[2]) <= self.w)

    def __str__(self) -> str:
        return f"Radius(t={self.t}, h={self.h}, w={self.w})"


@dataclass(frozen=True)
class TopK(Neighborhood):
    """Per head, the `k` (or `ceil(fraction * window blocks)`) window blocks with the largest
    representative score <mean q of the query block, mean k of the key block>; ties go to the
    lower block index."""

    k: Optional[int] = None
    fraction: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.k is None) == (self.fraction is None):
            raise PatternError("TopK", (self.k, self.fraction),
                               "exactly one of k=<int >= 1> or fraction=<float in (0, 1]>")
        if self.k is not None:
            require_int("TopK.k", self.k, 1)
        else:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                    or not (0.0 < float(self.fraction) <= 1.0) or math.isnan(float(self.fraction)):
                raise PatternError("TopK.fraction", self.fraction, "a float in (0, 1]")

    @property
    def is_static(self) -> bool:
        return False

    def count(self, window_blocks: int) -> int:
        """How many blocks this TopK asks for when the window holds `window_blocks` blocks."""
        if self.k is not None:
            return self.k
        # Exact decimal arithmetic: ceil(0.1 * 30) must be 3, not 4.
        return math.ceil(Fraction(repr(float(self.fraction))) * window_blocks)

    def count_expr(self, window_blocks):
        """The same count as a sympy expression of a symbolic number of window blocks."""
        import sympy
        if self.k is not None:
            return sympy.Integer(self.k)
        return sympy.ceiling(sympy.Rational(repr(float(self.fraction))) * window_blocks)

    def __str__(self) -> str:
        return f"TopK(k={self.k})" if self.k is not None else f"TopK(fraction={self.fraction})"


@dataclass(frozen=True)
class Union(Neighborhood):
    left: Neighborhood
    right: Neighborhood

    @property
    def is_static(self) -> bool:
        return self.left.is_static and self.right.is_static

    def contains(self, query: Coord, key: Coord) -> bool:
        return self.left.contains(query, key) or self.right.contains(query, key)

    def __str__(self) -> str:
        return f"({self.left} | {self.right})"


@dataclass(frozen=True)
class Intersection(Neighborhood):
    left: Neighborhood
    right: Neighborhood

    @property
    def is_static(self) -> bool:
        return self.left.is_static and self.right.is_static

    def contains(self, query: Coord, key: Coord) -> bool:
        return self.left.contains(query, key) and self.right.contains(query, key)

    def __str__(self) -> str:
        return f"({self.left} & {self.right})"




@dataclass(frozen=True)
class SplitNeighborhood:
    """Normal form: a static part, an optional TopK, and how the TopK combines with it.

    mode "union": the TopK picks among window blocks the static part did not choose;
    mode "intersection": the TopK picks among the static part's blocks.
    """

    static: Optional[Neighborhood]
    topk: Optional[TopK]
    mode: Optional[str]

    def static_contains(self, query: Coord, key: Coord) -> bool:
        return self.static is not None and self.static.contains(query, key)

    def dynamic_candidate(self, query: Coord, key: Coord) -> bool:
        """Is `key` a block the TopK may pick for `query`?"""
        if self.topk is None:
            return False
        inside = self.static.contains(query, key)
        return (not inside) if self.mode == "union" else inside


ALLOWED_FORMS = ("S, TopK(...), S | TopK(...) or S & TopK(...), where S is built from All() and "
                 "Radius(...) with | and &, and at most one TopK appears, at the top level")


def split_dynamic(neighborhood: object, field: str = "window.neighborhood") -> SplitNeighborhood:
    """Bring a neighborhood to normal form, or raise PatternError naming the form allowed."""
    if not isinstance(neighborhood, Neighborhood):
        raise PatternError(field, neighborhood, "a Neighborhood: " + ALLOWED_FORMS)
    if neighborhood.is_static:
        return SplitNeighborhood(neighborhood, None, None)
    if isinstance(neighborhood, TopK):
        return SplitNeighborhood(All(), neighborhood, "intersection")
    if isinstance(neighborhood, (Union, Intersection)):
        left, right = neighborhood.left, neighborhood.right
        if isinstance(left, TopK) and right.is_static:
            static, topk = right, left
        elif isinstance(right, TopK) and left.is_static:
            static, topk = left, right
        else:
            raise PatternError(field, str(neighborhood), ALLOWED_FORMS)
        mode = "union" if isinstance(neighborhood, Union) else "intersection"
        return SplitNeighborhood(static, topk, mode)
    raise PatternError(field, str(neighborhood), ALLOWED_FORMS)


NeighborhoodLike = TypingUnion[All, Radius, TopK, Union, Intersection]
