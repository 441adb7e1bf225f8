"""The memory update rule, compiled: the pattern's sympy score printed into generated code.

After the clean pass of chunk t (DESIGN.md §3), the candidates P_t ∪ E_t of every
(batch, KV head) are scored with the pattern's expression over the statistics
`importance`, `previous`, `age`, and the `capacity` best (ties to the lower block
index) become P_{t+1}. This module turns the expression into source code, once per
expression, in two dialects printed from the same sympy tree:

    score_torch(importance, previous, age)   a torch function (CPU, fallback)
    score_triton(importance, previous, age)  a @triton.jit function, inlined into
    update_kernel(...)                       one program per (batch, KV head): score the
                                             candidates, rank them, rewrite the tables

The module's text is the Jinja2 template codegen/memory/templates/update.py.jinja (the
printed expressions go into its placeholders; rendering settings in codegen/_templates.py).
It is written to the kernel cache directory (`codegen.attention.cache.cache_dir()`) as
`pbsa_update_<key>.py`, key = sha256(generator version, the template file's hash, the
expression's srepr, torch and triton versions), atomically, and imported with importlib;
within a process a second load is one dict lookup (like the attention kernels,
codegen/attention/cache.py).

`update_step(...)` is the entry point (the torch commit's; the rollout cache's Triton
commit calls `launch_update_kernel` directly, with its arguments ready); both paths
compute the same thing:

    for each (b, g), candidates i in [0, NC) given as pool slots cand_slots[b, g, i]
    (or, for i >= NP, cand_tail[b, g, i - NP]: the persistent table then the window
    table), the first NP of them the current persistent set, all in ascending block order:
        importance = importance[b, g, i], or imp_scale * sum_r importance[b, g, r, i]
                   (the commit's per-tile, per-head partial sums, averaged in the kernel)
        block    = slot_block[slot]           previous = slot_score[slot] if i < NP else 0
        age      = AGE0 - block // NB         (AGE0 = (t+1)*c - 1)
        score    = <expression>(importance[b, g, i], previous, age)   in float32
        rank     = #{j : j beats i}: score_j > score_i, or equal scores and j < i; a NaN
                   score ranks last (below every number, -inf included), NaNs among
                   themselves by candidate index; -0.0 equals +0.0: a strict total order
                   (sparsedsl.reference.rank_key; NaN scores are stored as NaN)
        winners (rank < CAP), in candidate order (= ascending block index):
            persistent_slots[b, g, :min(NC, CAP)], slot_score[slot] = score
        losers, in candidate order: pushed on the free list at free_list[b, g, FREE_AT:],
            slot_block[slot] = -1, slot_valid[slot] = 0, slot_score[slot] = 0
        persistent_count[b, g] = min(NC, CAP)
    scores[b, g, :NC] = the candidates' scores (an output, for inspection);
    optionally the window advances: window_slots[b, g, :count] = old [shift : shift + count].

Winners stay in their pool slots: no K/V is copied. No host synchronisation: NP, NC,
CAP, AGE0 and FREE_AT are host integers known from the schedule; they change from step
to step, so the kernel does not specialise on them (`do_not_specialize`: AGE0 = (t+1)*c-1
is divisible by 16 every 16 steps, which used to compile a second kernel mid-rollout).

Printable expressions: numbers, the three statistics, + - * /, powers (integer powers
unrolled, x**(1/2) as sqrt, other powers as exp(y*log(x))), exp, log, sqrt, Abs, sign,
floor, ceiling, sin, cos, tan, tanh, Max, Min, Piecewise and comparisons. Anything else
raises `UnsupportedScoreError` naming the function, when the program builds its cache.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import sympy
import torch

from .._templates import render, templates_hash

GENERATOR_VERSION = "update-3"
STATISTICS = ("importance", "previous", "age")
SUPPORTED = ("numbers", "importance", "previous", "age", "+", "-", "*", "/", "**", "exp",
             "log", "sqrt", "Abs", "sign", "floor", "ceiling", "sin", "cos", "tan", "tanh",
             "Max", "Min", "Piecewise", "comparisons (<, <=, >, >=, ==, !=)", "And", "Or", "Not")


class UnsupportedScoreError(ValueError):
    """The score expression uses something the code generator cannot print."""


# ==================================================================================
# printing sympy -> torch / triton source
# ==================================================================================
_FUNCS = {
    # name: (torch form, triton form), each a format string over the printed arguments
    "exp": ("torch.exp({0})", "tl.exp({0})"),
    "log": ("torch.log({0})", "tl.log({0})"),
    "Abs": ("torch.abs({0})", "tl.abs({0})"),
    "sin": ("torch.sin({0})", "tl.sin({0})"),
    "cos": ("torch.cos({0})", "tl.cos({0})"),
    "tan": ("torch.tan({0})", "(tl.sin({0}) / tl.cos({0}))"),
    "tanh": ("torch.tanh({0})", "(1.0 - 2.0 / (tl.exp(2.0 * {0}) + 1.0))"),
    "floor": ("torch.floor({0})", "tl.floor({0})"),
    "ceiling": ("torch.ceil({0})", "tl.ceil({0})"),
    "sign": ("torch.sign({0})", "tl.where({0} > 0.0, 1.0, tl.where({0} < 0.0, -1.0, 0.0))"),
}
_REL = {"StrictGreaterThan": ">", "StrictLessThan": "<", "GreaterThan": ">=",
        "LessThan": "<=", "Equality": "==", "Unequality": "!="}


def print_score(expr, dialect: str) -> str:
    """Source text of `expr` over the names importance, previous, age.

    dialect "torch": torch ops on float32 tensors; "triton": triton.language ops.
    """
    if dialect not in ("torch", "triton"):
        raise ValueError(f"dialect = {dialect!r}, allowed: 'torch' or 'triton'")
    tri = dialect == "triton"
    lib = "tl" if tri else "torch"

    def num(value) -> str:
        v = float(value)
        if v != v:
            return "float('nan')"
        if v in (float("inf"), float("-inf")):
            return f"float('{'-' if v < 0 else ''}inf')"
        return repr(v)

    def where(cond: str, a: str, b: str) -> str:
        return f"{lib}.where({cond}, {a}, {b})"

    def p(e) -> str:
        if e.is_Symbol:
            if e.name not in STATISTICS:
                raise UnsupportedScoreError(f"score uses the symbol {e.name!r}; only "
                                            + ", ".join(STATISTICS) + " are statistics")
            return e.name
        if e is sympy.true:
            return "True"
        if e is sympy.false:
            return "False"
        if e.is_Number or e.is_NumberSymbol:
            return num(e)
        if e.is_Add:
            return "(" + " + ".join(p(a) for a in e.args) + ")"
        if e.is_Mul:
            num_part, rest = e.as_coeff_Mul()
            if num_part == -1:
                return f"(-{p(rest)})"
            return "(" + " * ".join(p(a) for a in e.args) + ")"
        if e.is_Pow:
            base, ex = e.args
            if ex == sympy.Rational(1, 2):
                return f"{lib}.sqrt({p(base)})"
            if ex == sympy.Rational(-1, 2):
                return f"(1.0 / {lib}.sqrt({p(base)}))"
            if ex.is_Integer and 0 < abs(int(ex)) <= 16:
                b = p(base)
                prod = "(" + " * ".join([b] * abs(int(ex))) + ")"
                return prod if int(ex) > 0 else f"(1.0 / {prod})"
            if ex == 0:
                return "1.0"
            # x ** y = exp(y * log(x)) (real for x > 0, as the float functions are)
            return f"{lib}.exp({p(ex)} * {lib}.log({p(base)}))"
        name = type(e).__name__
        if name in _FUNCS:
            if len(e.args) != 1:
                raise UnsupportedScoreError(f"{name} with {len(e.args)} arguments")
            return _FUNCS[name][1 if tri else 0].format(p(e.args[0]))
        if name in ("Max", "Min"):
            consts = [a for a in e.args if a.is_Number]   # sympy folds them into one
            parts = [p(a) for a in e.args if not a.is_Number]
            out = parts[0]
            for other in parts[1:]:
                fn = ("maximum" if name == "Max" else "minimum")
                out = f"{lib}.{fn}({out}, {other})"
            for c in consts:
                if tri:
                    out = f"tl.{'maximum' if name == 'Max' else 'minimum'}({out}, {num(c)})"
                else:
                    out = f"torch.clamp({out}, {'min' if name == 'Max' else 'max'}={num(c)})"
            return out
        if name == "Piecewise":
            out = "float('nan')"
            for value, cond in reversed(e.args):
                if cond is sympy.true:
                    out = p(value)
                else:
                    out = where(p(cond), p(value), out)
            return out
        if name in _REL:
            return f"({p(e.args[0])} {_REL[name]} {p(e.args[1])})"
        if name in ("And", "Or"):
            op = " & " if name == "And" else " | "
            return "(" + op.join(p(a) for a in e.args) + ")"
        if name == "Not":
            return f"(~{p(e.args[0])})"
        raise UnsupportedScoreError(
            f"the update score uses {name}({', '.join(map(str, e.args))}), which the update "
            f"code generator cannot print; supported: {', '.join(SUPPORTED)}")

    return p(sympy.sympify(expr))


# ==================================================================================
# the generated module
# ==================================================================================
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATE = "update.py.jinja"   # the module's text; rendered by codegen/_templates.py
# edits to the template change the cache key (no stale update modules after a template change)
TEMPLATE_HASH = templates_hash(TEMPLATE_DIR)


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = "none"
    return {"torch": torch.__version__, "triton": tv}


def update_key(expr) -> str:
    payload = {"generator": GENERATOR_VERSION, "template": TEMPLATE_HASH,
               "expr": sympy.srepr(sympy.sympify(expr)), **_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def render_update_source(expr, key: str = "uncached", header: tuple[str, ...] = ()) -> str:
    """The generated module's source for `expr`; `header` lines go into its docstring."""
    expr = sympy.sympify(expr)
    torch_expr = print_score(expr, "torch")
    triton_expr = print_score(expr, "triton")
    return render(TEMPLATE_DIR, TEMPLATE, key=key, generator=GENERATOR_VERSION, expr=str(expr),
                  header=tuple(header), torch_expr=torch_expr, triton_expr=triton_expr)


@dataclass(frozen=True)
class UpdateRule:
    """A loaded, generated update module for one score expression."""

    expr: sympy.Expr
    key: str
    path: str
    module: ModuleType

    @property
    def source(self) -> str:
        return Path(self.path).read_text()

    def score_torch(self, importance, previous, age):
        out = self.module.score_torch(importance, previous, age)
        if not isinstance(out, torch.Tensor):  # a constant score
            out = torch.full_like(importance, float(out))
        return out.to(torch.float32).expand_as(importance)

    @property
    def has_triton(self) -> bool:
        return getattr(self.module, "update_kernel", None) is not None


_LOADED: dict[str, UpdateRule] = {}
_LOCK = threading.Lock()
STATS = {"renders": 0, "disk_loads": 0}


def load_update_rule(expr, header: tuple[str, ...] = ()) -> UpdateRule:
    """The generated module of `expr`: rendered and written only on a cache miss."""
    from ..attention.cache import cache_dir, write_and_import

    expr = sympy.sympify(expr)
    key = update_key(expr)
    rule = _LOADED.get(key)
    if rule is not None:
        return rule
    with _LOCK:
        rule = _LOADED.get(key)
        if rule is not None:
            return rule
        source = render_update_source(expr, key, header)  # raises UnsupportedScoreError early
        path = cache_dir() / f"pbsa_update_{key}.py"
        module, rendered = write_and_import(path, f"# sparsedsl-update-key: {key}",
                                            lambda: source, f"sparsedsl_kernels.pbsa_update_{key}")
        STATS["renders" if rendered else "disk_loads"] += 1
        rule = UpdateRule(expr, key, str(path), module)
        _LOADED[key] = rule
        return rule


# ==================================================================================
# the update step
# ==================================================================================
def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def update_step(rule: UpdateRule, *, backend: str, importance: torch.Tensor,
                cand_slots: torch.Tensor, num_persistent: int, num_candidates: int,
                capacity: int, blocks_per_frame: int, age0: int, slot_block: torch.Tensor,
                slot_score: torch.Tensor, slot_valid: torch.Tensor,
                persistent_slots: torch.Tensor, persistent_count: torch.Tensor,
                free_list: torch.Tensor, free_at: int, scores: torch.Tensor,
                block_n: int | None = None, cand_tail: torch.Tensor | None = None,
                importance_scale: float = 1.0,
                window_shift: tuple[torch.Tensor, int, int] | None = None) -> None:
    """Score candidates, take Top-`capacity`, rewrite the tables in place (see module doc).

    importance float32 [B, HKV, >= NC], or [B, HKV, R, >= NC]: then the importance is
    `importance_scale` * the sum over R (partial sums per query tile and head, averaged here
    so that the commit needs no reduction launch; may be an expanded view for a shared set);
    cand_slots int32 [B, HKV, >= NC]; with `cand_tail` int32 [B, HKV, >= NC - NP], the
    candidates [NP, NC) are cand_tail[..., i - NP] instead (the persistent table, then the
    window table, without concatenating them); slot_block / slot_valid int32 and slot_score
    float32 [B, HKV, NSLOTS], contiguous; persistent_slots int32 [B, HKV, CMAX >=
    min(NC, CAP)]; persistent_count int32 [B, HKV]; free_list int32 [B, HKV, NSLOTS] with
    room for the losers at free_at; scores float32 [B, HKV, >= NC] (output).
    window_shift = (window_slots, shift, count): afterwards window_slots[..., :count] =
    the old window_slots[..., shift:shift + count] (the window advances by `shift`).
    backend "triton" or "torch"; `block_n` fixes the Triton tile (one compile per pattern).
    """
    NC, NP, CAP = num_candidates, num_persistent, capacity
    if NC == 0:
        return
    if importance.dim() == 3:
        importance = importance.unsqueeze(2)
    if cand_tail is None:
        cand_tail = cand_slots[..., NP:]
    if backend == "triton" and rule.has_triton:
        from ..select import _interpreter_active
        _interpreter_active()  # installs the Triton-interpreter shims where TRITON_INTERPRET=1
        launch_update_kernel(rule, importance, importance_scale, cand_slots, cand_tail, NP, NC,
                             CAP, blocks_per_frame, age0, slot_block, slot_score, slot_valid,
                             persistent_slots, persistent_count, free_list, free_at, scores,
                             block_n or _next_pow2(NC), window_shift)
        return
    _update_torch(rule, importance, importance_scale, cand_slots, cand_tail, NP, NC, CAP,
                  blocks_per_frame, age0, slot_block, slot_score, slot_valid, persistent_slots,
                  persistent_count, free_list, free_at, scores, window_shift)


def launch_update_kernel(rule, importance, importance_scale, cand_slots, cand_tail, NP, NC, CAP,
                         NB, age0, slot_block, slot_score, slot_valid, persistent_slots,
                         persistent_count, free_list, free_at, scores, block_n, window_shift):
    """The generated kernel, one program per (b, KV head); no checks (the hot path).

    importance 4-D [B, HKV, R, >= NC]; the other arguments as in `update_step`."""
    B, HKV = cand_slots.shape[:2]
    if block_n < NC:
        raise ValueError(f"update_step: block_n = {block_n} < {NC} candidates")
    ws, shift, count = window_shift if window_shift is not None else (cand_slots, 0, 0)
    rule.module.update_kernel[(HKV, B)](
        importance, cand_slots, cand_tail, slot_block, slot_score, slot_valid, persistent_slots,
        persistent_count, free_list, scores, ws,
        NP, NC, CAP, min(NC, CAP), NB, age0, free_at, importance.shape[2], importance_scale,
        count, shift,
        *importance.stride(), *cand_slots.stride(), *cand_tail.stride(), *slot_block.stride(),
        *persistent_slots.stride(), *persistent_count.stride(), *free_list.stride(),
        *scores.stride(), *ws.stride(),
        BLOCK_N=block_n, BLOCK_J=min(block_n, 32), num_warps=4 if block_n <= 256 else 8)


def _update_torch(rule, importance, importance_scale, cand_slots, cand_tail, NP, NC, CAP, NB,
                  AGE0, slot_block, slot_score, slot_valid, persistent_slots, persistent_count,
                  free_list, free_at, scores, window_shift):
    dev = cand_slots.device
    B, HKV = cand_slots.shape[:2]
    slots = torch.cat([cand_slots[..., :NP], cand_tail[..., :NC - NP]], dim=-1).long()
    idx = torch.arange(NC, device=dev)
    blk = torch.gather(slot_block, 2, slots).long()
    prev = torch.where(idx < NP, torch.gather(slot_score, 2, slots),
                       torch.zeros((), device=dev, dtype=torch.float32))
    age = (AGE0 - torch.div(blk, NB, rounding_mode="floor")).to(torch.float32)
    imp = importance[..., :NC].to(torch.float32).sum(dim=2) * importance_scale
    s = rule.score_torch(imp, prev, age)
    s = torch.where(s == 0, torch.zeros((), device=dev), s)   # -0.0 ties with +0.0
    scores[..., :NC] = s
    # stable descending sort: equal scores keep candidate (= block) order; then a stable sort
    # that moves the NaN scores behind every number (-inf included), in candidate order
    nan = torch.isnan(s)
    key = torch.where(nan, torch.full((), float("-inf"), device=dev), s)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, -1, torch.sort(torch.gather(nan, -1, order).to(torch.int8),
                                               dim=-1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, idx.expand(B, HKV, NC).contiguous())
    win = rank < CAP
    n_win = min(NC, CAP)
    # compact winners then losers, each in candidate order (no host sync)
    compact = torch.sort((~win).to(torch.int8), dim=-1, stable=True).indices
    ordered = torch.gather(slots, 2, compact)
    winners, losers = ordered[..., :n_win], ordered[..., n_win:]
    persistent_slots[..., :n_win] = winners.to(torch.int32)
    slot_score.scatter_(2, winners, torch.gather(s, 2, compact[..., :n_win]))
    if losers.shape[-1]:
        free_list[..., free_at:free_at + losers.shape[-1]] = losers.to(torch.int32)
        slot_block.scatter_(2, losers, -1)
        slot_valid.scatter_(2, losers, 0)
        slot_score.scatter_(2, losers, 0.0)
    persistent_count.fill_(n_win)
    if window_shift is not None:
        ws, shift, count = window_shift
        if count:
            ws[..., :count] = ws[..., shift:shift + count].clone()
