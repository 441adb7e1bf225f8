"""The fused *select* step of persistent block-sparse attention (DESIGN.md §3, §4.3).

A room of one module (codegen/__init__.py): it may import `codegen._interp_compat` only;
the memory runtime and the program import it.

Three operations, each with a Triton kernel and a plain-torch twin (`*_torch`, same
arguments less `backend`; CPU fallback and second opinion in the tests):

    block_representatives(x, valid, out=None)            -> [B, Hx, NB, D] float32
        mean of each block's real tokens (a prefix of the block), accumulated in fp32;
    select_topk(q_rep, k_rep_pool, window_slots, window_count, static_pos,
                static_count, mode, k, visit_slots, visit_count)          (in place)
        per (batch, head, query block): the top-k window positions by <q_rep, k_rep>
        among the candidates of `mode`, ties to the lower position; their pool slots
        are appended to the visit table;
    block_importance(q_rep, k_rep_pool, domain_slots, domain_count, scale)
                                                          -> [B, H, NDOM] float32
        Sparse Forcing's column sum of block-level attention: per (batch, head), the
        softmax over the domain of <q_rep, k_rep> * scale, summed over query blocks.

Glossary
    B batch, H query heads, HKV key/value heads (head h reads kv head h // (H // HKV)),
    NQB query blocks, D head dim, NSLOTS key-representative pool slots,
    NWMAX / NW window positions (allocated / valid this step), position p = window
    block w_start * nb + p (ascending block index), SMAX static positions per query
    block, MAXV visit-table width, NDOMMAX / ND domain entries (allocated / valid).

Semantics worth stating
  * Candidates: "union" = window positions p < NW that the static set of the query
    block does not contain; "intersection" = the static positions themselves. A static
    position listed twice counts once; entries past static_count[qb] are padding.
  * Order of the appended picks: descending score, equal scores by ascending position
    (the DESIGN.md tie rule), identical in both implementations. Scores are fp32 dots;
    -0.0 equals +0.0; a NaN score ranks like -inf (last, ties by position).
  * Only referenced pool slots are read: window/domain entries past the valid count
    and padding tokens past `valid` never reach a result, even when they hold NaN.
  * block_representatives of a block with valid == 0 is 0.
  * Memory safety does not depend on validation: the kernels never read a pool slot
    outside [0, NSLOTS) nor write a visit column outside [0, MAXV) (picks without room
    are dropped and visit_count is clipped to MAXV). With `check_values=True` (the
    default) such inputs raise ValueError before any launch instead; that check reads
    the small index tensors back to the host (one device sync), so a hot loop that has
    already validated its tables can pass `check_values=False`. Shape, dtype and
    device checks are always done (they cost no sync).

Performance notes (sm_90 SASS inspected offline: Triton 3.6 compiled for sm_90 with the
specialisation a contiguous CUDA launch gets, then its ptxas; no spills in any kernel up to
8192 positions). Self-Forcing size: B=1, H=12, D=128, NW=168 (padded to BLOCK_W=256),
k=42, NQB=84 (or 36):
  * select: one program per (b, h, 8 query blocks), 8 warps -> 11 x 12 = 132 programs
    (one H100 wave; 5 x 12 = 60 for NQB=36). Scores are fp32 FMAs on the tile
    [BLOCK_Q query blocks, BLOCK_W positions], d in steps of 4 (16-byte gathers of pool
    rows; 168 x 512 B per program, ~11 MB over the grid, L2-resident). No tl.dot: no
    M >= 16 padding, no TF32 rounding, and the gathers give the tile a layout in which a
    thread holds 8 positions of one query block (a tl.dot accumulator spreads a row over
    all warps: ~5x the instructions per top-k round). Candidates become distinct int64
    keys (order-preserving int32 image of the score << 32 | (2^31-1 - position): ties go
    to the lower position). Top k: either k rounds of a row max (~106 SASS instructions
    a round: 8 thread-local compares, 2 shuffles, one cross-warp step) or one bitonic
    tl.sort of the row (~3.3K instructions at BLOCK_W=256); SELECT_TOPK_ALGO="auto"
    sorts when k > 1.5 * log2(BLOCK_W)^2 (96 here; on the H100 rounds won at every measured
    k up to 111), so k=42 takes rounds.
    Per warp: ~3.7K instructions for the scores (32 d-steps), ~3.3K for the top k,
    ~90 per static entry for the membership -> an estimated 5-10 us per call, one launch,
    no mask tensor, no host sync (with check_values=False), picks written in place.
  * importance: same tile and layout, one program per (b, h, 8 query blocks) -> 132
    programs, then one deterministic torch sum over the tiles (no float atomics).
    Once per chunk.
  * representatives: one program per block, 8 warps, [32, 128] tiles accumulated in
    fp32 registers and reduced once; bandwidth bound (84 x 12 blocks of 64 x 128 bf16
    = 16 MB, ~6 us at 3 TB/s).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

try:  # the torch path must work where triton is absent
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing
    triton = None
    tl = None

__all__ = [
    "block_representatives", "block_representatives_torch",
    "select_topk", "select_topk_torch",
    "block_importance", "block_importance_torch",
    "select_backend_for", "SELECT_TRITON_MAX_POSITIONS",
]

_MODES = ("union", "intersection")
_BACKENDS = ("auto", "triton", "torch")
_MAX_TRITON_POSITIONS = 8192      # window / domain entries one program holds in registers
_NEG_INF_IMAGE = -2139095041      # order-preserving int32 image of float32 -inf
_LOW31 = 0x7FFFFFFF            # low word of a key: _LOW31 - position
SELECT_DC = 4                     # d elements per gather (16-byte fp32 loads)
# Top-k algorithm of the select kernel: "rounds" (k rounds of a row max), "sort" (one
# bitonic tl.sort of the row), or "auto": sort when k > 1.5 * log2(BLOCK_W)^2 on a GPU
# (H100, bench/gpu_program.py: rounds was faster at every measured point, k = 28 and 111
# at BLOCK_W = 512 and k = 42 at 256; the instruction-count estimate had put the crossover
# at k ~ 32), rounds in the interpreter (where tl.sort costs ~0.5 s per call). Tests set
# it to cover both.
SELECT_TOPK_ALGO = "auto"
# Size threshold of the Triton select / importance tiles (issue 12). The kernels size their
# register tile by this step's *valid* count (BLOCK_W = next power of two of NW / ND) and give
# each program fewer query blocks as it grows (`_tile_config`): built for sink-window-sized
# windows (NW = 168 -> BLOCK_W = 256, 8 query blocks a program). An unbounded window (moba)
# lives in a pool that doubles with the history (336 / 1,344 / 2,688 slots at steps 4 / 10 /
# 20 at 8x8 tiles) while its valid window is smaller (e.g. NW = 630 of 1,344 slots at step
# 10); a tile sized by the allocation gathered and scored the empty slots too (0.99 against
# 0.11 ms at moba's step 10 on an H100, bench/select_probe.py). Sizing by NW compiles one
# kernel per power of two the window passes (a handful over a rollout), each once. Above
# this many valid positions select_topk runs the tiled kernel below (SELECT_TILED), and
# block_importance, or select_topk with SELECT_TILED off, the torch path (one gather, one
# GEMM, one torch.topk, no host sync: the same candidates, tie rule and order of picks; the
# fp32 scores may differ in the last bit (GEMM summation order), and on CUDA the GEMM
# follows torch.backends.cuda.matmul.allow_tf32), which also lifts the kernel's hard limit.
# The probe measured the Triton tile 8-11x faster than torch up to 1,024 positions and
# slower from 2,048 (one query block a program re-gathers the whole window).
# backend="triton" passed to block_importance (or to select_topk with SELECT_TILED off)
# still forces the one-tile kernel (up to _MAX_TRITON_POSITIONS valid positions). A
# positive int; set it to _MAX_TRITON_POSITIONS to turn the fallback off.
SELECT_TRITON_MAX_POSITIONS = 1024
# The tiled Triton select for windows past SELECT_TRITON_MAX_POSITIONS (issue 12): tiles of
# that many positions, each keeping its best k, merged by one torch.topk
# (`_select_topk_tiled`). Checked against the float64 reference on an H100 (tests/test_select.py)
# and timed there at moba's sizes (docs/benchmarks.md, tenth session): 0.5-0.8 ms against the
# torch path's 1.3-1.8 ms from 1,344 to 3,360 positions, same picks. False keeps the torch
# path above the threshold. Picks with k above SELECT_TILED_MAX_K take the torch path (k
# rounds of a row max).
SELECT_TILED = True
SELECT_TILED_MAX_K = 128
_INT64_MIN = -(2**63)


# ==================================================================================
# helpers: backend choice and validation
# ==================================================================================
def _interpreter_active() -> bool:
    active = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if active:
        from . import _interp_compat

        _interp_compat.install()
    return active


def _use_triton(fn: str, backend: str, device: torch.device) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend = {backend!r}, allowed: 'auto' (Triton on CUDA "
                         "tensors, torch otherwise), 'triton' or 'torch'")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and triton is not None
    if triton is None:
        raise ValueError(f"{fn}: backend = 'triton' but triton cannot be imported; "
                         "use backend='torch'")
    if device.type != "cuda" and not _interpreter_active():
        raise ValueError(f"{fn}: backend = 'triton' needs CUDA tensors (got device "
                         f"{device}) or TRITON_INTERPRET=1; use backend='torch' on CPU")
    return True


def _triton_max_positions() -> int:
    v = SELECT_TRITON_MAX_POSITIONS
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"codegen.select.SELECT_TRITON_MAX_POSITIONS = {v!r}, allowed: a "
                         f"python int >= 1 (allocated window / domain positions above which "
                         f"the torch path runs; {_MAX_TRITON_POSITIONS} turns the fallback off)")
    return v


def select_backend_for(backend: str, n_positions: int, *, tiled: bool = False) -> str:
    """The backend a caller should pass to `select_topk` / `block_importance` for
    `n_positions` valid positions (window_count NW / domain_count ND): 'torch' when
    `backend` may pick Triton ('auto' or 'triton') and n_positions >
    SELECT_TRITON_MAX_POSITIONS, else `backend` unchanged. The program's visit tables use
    it, so an unbounded window past the threshold runs the torch path, or with SELECT_TILED
    on the tiled Triton select.

    tiled=True says the caller's kernel has a tiled path past the threshold (select_topk
    with SELECT_TILED on), so `backend` stays; block_importance has none and keeps the
    default."""
    if backend not in _BACKENDS:
        raise ValueError(f"select_backend_for: backend = {backend!r}, allowed: 'auto', "
                         "'triton' or 'torch'")
    n = _need_int("select_backend_for", "n_positions", n_positions, 0)
    if backend != "torch" and n > _triton_max_positions() and not tiled:
        return "torch"
    return backend


def _auto_by_size(backend: str, n_positions: int, *, tiled: bool = False) -> str:
    """`backend`, with "auto" resolved by size: 'torch' above SELECT_TRITON_MAX_POSITIONS
    valid positions unless `tiled` (the rule of `select_backend_for`, which an explicit
    'triton' obeys only when the caller asks it)."""
    if backend != "auto":
        return backend
    return select_backend_for(backend, n_positions, tiled=tiled)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _need_tensor(fn: str, name: str, t, ndim, dtypes, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(ndim, int):
        ndim = (ndim,)
    if t.dim() not in ndim:
        raise ValueError(f"{fn}: {name}.shape = {_shape(t)} has {t.dim()} dims, "
                         f"expected {' or '.join(map(str, ndim))}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{fn}: {name}.dtype = {str(t.dtype).replace('torch.', '')}, "
                         f"allowed: {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, but the other inputs are on "
                         f"{device}; put every tensor on one device")


def _need_int(fn: str, name: str, v, lo: int, hi: Optional[int] = None,
              what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        else:
            raise ValueError(f"{fn}: {name} = {v!r} must be a python int")
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{fn}: {name} = {v} is outside {rng}{what}")
    return v


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n) if triton is not None else 1 << (n - 1).bit_length())


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_I32 = (torch.int32,)
_F32 = (torch.float32,)


# ==================================================================================
# 1. block representatives
# ==================================================================================
def _check_representatives(fn, x, valid, out, check_values):
    _need_tensor(fn, "x", x, 5, _FLOATS)
    dev = x.device
    B, Hx, NB, BT, D = x.shape
    _need_tensor(fn, "valid", valid, (1, 3), _I32, dev)
    if _shape(valid) not in ((NB,), (B, Hx, NB)):
        raise ValueError(f"{fn}: valid.shape = {_shape(valid)}, expected ({NB},) or "
                         f"({B}, {Hx}, {NB}) for x.shape = {_shape(x)} [B, Hx, NB, BT, D]")
    if out is not None:
        _need_tensor(fn, "out", out, 4, _F32, dev)
        if _shape(out) != (B, Hx, NB, D):
            raise ValueError(f"{fn}: out.shape = {_shape(out)}, expected {(B, Hx, NB, D)}")
    if check_values and valid.numel():
        lo, hi = (int(v) for v in torch.stack([valid.min(), valid.max()]).tolist())
        if lo < 0 or hi > BT:
            bad = int(torch.nonzero((valid < 0) | (valid > BT))[0][-1])
            raise ValueError(f"{fn}: valid holds {lo if lo < 0 else hi} (block {bad}), "
                             f"allowed: 0..BT={BT} real tokens per block")


def block_representatives_torch(x: torch.Tensor, valid: torch.Tensor,
                                 out: Optional[torch.Tensor] = None, *,
                                 check_values: bool = True) -> torch.Tensor:
    """Mean of the first `valid` tokens of every block, fp32: [B, Hx, NB, D] (torch path)."""
    _check_representatives("block_representatives_torch", x, valid, out, check_values)
    B, Hx, NB, BT, D = x.shape
    v = valid.long().clamp(0, BT)
    if v.dim() == 1:
        v = v.expand(B, Hx, NB)
    real = torch.arange(BT, device=x.device) < v[..., None]          # [B, Hx, NB, BT]
    xs = torch.where(real[..., None], x.to(torch.float32), torch.zeros((), device=x.device))
    res = xs.sum(dim=-2) / v.clamp(min=1)[..., None].to(torch.float32)
    if out is None:
        return res
    out.copy_(res)
    return out


def block_representatives(x: torch.Tensor, valid: torch.Tensor,
                          out: Optional[torch.Tensor] = None, *, backend: str = "auto",
                          check_values: bool = True) -> torch.Tensor:
    """Mean of the real tokens of every block, accumulated in fp32.

    x [B, Hx, NB, BT, D] (any float dtype, any strides); valid int32 [NB] or [B, Hx, NB]
    = real tokens of each block (a prefix); out: optional float32 [B, Hx, NB, D] (any
    strides, e.g. a slice of a representative pool). Returns out (or a new tensor).
    """
    fn = "block_representatives"
    _check_representatives(fn, x, valid, out, check_values)
    if not _use_triton(fn, backend, x.device):
        return block_representatives_torch(x, valid, out, check_values=False)
    B, Hx, NB, BT, D = x.shape
    if out is None:
        out = torch.empty(B, Hx, NB, D, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    if valid.dim() == 1:
        sv = (0, 0, valid.stride(0))
    else:
        sv = valid.stride()
    block_d = min(_pow2(D, 1), 128)
    block_t = max(1, min(_pow2(BT, 1), 4096 // block_d))
    warps = 8 if block_t * block_d >= 4096 else 4
    _block_representatives_kernel[(NB, Hx, B)](
        x, valid, out, BT,
        *x.stride(), *sv, *out.stride(),
        D=D, BT_CEIL=triton.cdiv(BT, block_t) * block_t,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out


# ==================================================================================
# 2. dynamic Top-K over the window
# ==================================================================================
def _check_reps(fn, q_rep, k_rep_pool):
    """Shared checks of the query and key representatives; returns their sizes."""
    _need_tensor(fn, "q_rep", q_rep, 4, _F32)
    dev = q_rep.device
    B, H, NQB, D = q_rep.shape
    _need_tensor(fn, "k_rep_pool", k_rep_pool, 4, _F32, dev)
    Bk, HKV, NSLOTS, Dk = k_rep_pool.shape
    if Bk != B or Dk != D:
        raise ValueError(f"{fn}: k_rep_pool.shape = {_shape(k_rep_pool)} [B, HKV, NSLOTS, D] "
                         f"does not match q_rep.shape = {_shape(q_rep)} [B, H, NQB, D] "
                         "in B or D")
    if HKV == 0 or H % HKV:
        raise ValueError(f"{fn}: H = {H} query heads is not a multiple of HKV = {HKV} "
                         "kv heads (k_rep_pool.shape[1])")
    return dev, B, H, NQB, D, HKV, NSLOTS


def _check_select(fn, q_rep, k_rep_pool, window_slots, window_count, static_pos,
                  static_count, mode, k, visit_slots, visit_count):
    dev, B, H, NQB, D, HKV, NSLOTS = _check_reps(fn, q_rep, k_rep_pool)
    _need_tensor(fn, "window_slots", window_slots, 3, _I32, dev)
    if _shape(window_slots)[:2] != (B, HKV):
        raise ValueError(f"{fn}: window_slots.shape = {_shape(window_slots)}, expected "
                         f"({B}, {HKV}, NWMAX)")
    NWMAX = window_slots.shape[2]
    NW = _need_int(fn, "window_count", window_count, 0, NWMAX,
                   f" (window_slots holds NWMAX = {NWMAX} positions)")
    _need_tensor(fn, "static_pos", static_pos, 2, _I32, dev)
    if static_pos.shape[0] != NQB:
        raise ValueError(f"{fn}: static_pos.shape = {_shape(static_pos)}, expected "
                         f"({NQB}, SMAX): one row per query block of q_rep")
    SMAX = static_pos.shape[1]
    _need_tensor(fn, "static_count", static_count, 1, _I32, dev)
    if _shape(static_count) != (NQB,):
        raise ValueError(f"{fn}: static_count.shape = {_shape(static_count)}, expected ({NQB},)")
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode = {mode!r}, allowed: 'union' (candidates = window "
                         "positions not in the static set) or 'intersection' (candidates = "
                         "the static positions)")
    k = _need_int(fn, "k", k, 0)
    _need_tensor(fn, "visit_slots", visit_slots, 4, _I32, dev)
    if _shape(visit_slots)[:3] != (B, H, NQB):
        raise ValueError(f"{fn}: visit_slots.shape = {_shape(visit_slots)}, expected "
                         f"({B}, {H}, {NQB}, MAXV)")
    _need_tensor(fn, "visit_count", visit_count, 3, _I32, dev)
    if _shape(visit_count) != (B, H, NQB):
        raise ValueError(f"{fn}: visit_count.shape = {_shape(visit_count)}, expected "
                         f"{(B, H, NQB)}")
    return B, H, HKV, NQB, D, NSLOTS, NWMAX, NW, SMAX, k


def _static_membership(static_pos, static_count, NW):
    """Bool [NQB, NW]: window position p is in query block qb's static set."""
    NQB, SMAX = static_pos.shape
    live = torch.arange(SMAX, device=static_pos.device) < static_count.long()[:, None]
    pos = static_pos.long()
    idx = torch.where(live & (pos >= 0) & (pos < NW), pos, torch.full_like(pos, NW))
    member = torch.zeros(NQB, NW + 1, dtype=torch.bool, device=static_pos.device)
    member.scatter_(1, idx, True)
    return member[:, :NW]


def _check_select_values(fn, window_slots, NW, NSLOTS, static_pos, static_count, mode, k,
                         visit_count, MAXV):
    """Value checks (one host sync); raises ValueError naming the first bad entry."""
    NQB, SMAX = static_pos.shape
    ws = window_slots[:, :, :NW]
    live = torch.arange(SMAX, device=static_pos.device) < static_count.long()[:, None]
    member = _static_membership(static_pos, static_count, NW)
    ncand = member.sum(1) if mode == "intersection" else NW - member.sum(1)
    need = visit_count.long() + torch.clamp(ncand, max=k)[None, None, :]
    flags = torch.stack([
        ((ws < 0) | (ws >= NSLOTS)).any(),
        ((static_count < 0) | (static_count > SMAX)).any(),
        (live & ((static_pos < 0) | (static_pos >= NW))).any(),
        ((visit_count < 0) | (visit_count > MAXV)).any(),
        (need > MAXV).any(),
    ]).tolist()
    if not any(flags):
        return

    def first(mask):
        return tuple(int(i) for i in torch.nonzero(mask)[0])

    if flags[0]:
        i = first((ws < 0) | (ws >= NSLOTS))
        raise ValueError(f"{fn}: window_slots[{', '.join(map(str, i))}] = {int(ws[i])} is not "
                         f"a pool slot, allowed: 0..{NSLOTS - 1} (k_rep_pool.shape[2] = {NSLOTS})")
    if flags[1]:
        i = first((static_count < 0) | (static_count > SMAX))
        raise ValueError(f"{fn}: static_count[{i[0]}] = {int(static_count[i])}, allowed: "
                         f"0..SMAX={SMAX} (static_pos.shape[1])")
    if flags[2]:
        i = first(live & ((static_pos < 0) | (static_pos >= NW)))
        raise ValueError(f"{fn}: static_pos[{i[0]}, {i[1]}] = {int(static_pos[i])} is not a "
                         f"window position, allowed: 0..window_count-1 = {NW - 1} (entries "
                         f"past static_count[{i[0]}] = {int(static_count[i[0]])} are padding)")
    if flags[3]:
        i = first((visit_count < 0) | (visit_count > MAXV))
        raise ValueError(f"{fn}: visit_count[{', '.join(map(str, i))}] = {int(visit_count[i])}, "
                         f"allowed: 0..MAXV={MAXV} (visit_slots.shape[3])")
    i = first(need > MAXV)
    raise ValueError(f"{fn}: visit_slots has no room: visit_count[{', '.join(map(str, i))}] = "
                     f"{int(visit_count[i])} + {int(need[i] - visit_count[i])} picks "
                     f"(min(k={k}, candidates={int(ncand[i[2]])})) = {int(need[i])} > "
                     f"MAXV = {MAXV} (visit_slots.shape[3]); allocate a wider table")


def _score_keys(scores: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """int64 keys, larger = better: order-preserving image of the fp32 score in the high
    word, ~position in the low word (ties to the lower position); non-candidates lowest."""
    s = torch.where(scores == 0, torch.zeros((), device=scores.device), scores)
    bits = s.view(torch.int32)
    img = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    img = torch.where(torch.isnan(s), torch.full_like(img, _NEG_INF_IMAGE), img)
    pos = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
    key = (img.to(torch.int64) << 32) | (_LOW31 - pos)
    return torch.where(cand, key, torch.full_like(key, _INT64_MIN))


def select_topk_torch(q_rep, k_rep_pool, window_slots, window_count, static_pos,
                      static_count, mode, k, visit_slots, visit_count, *,
                      check_values: bool = True):
    """Torch path of `select_topk` (same semantics and order of picks). Returns
    (visit_slots, visit_count), both modified in place."""
    fn = "select_topk_torch"
    B, H, HKV, NQB, D, NSLOTS, NWMAX, NW, SMAX, k = _check_select(
        fn, q_rep, k_rep_pool, window_slots, window_count, static_pos, static_count,
        mode, k, visit_slots, visit_count)
    MAXV = visit_slots.shape[3]
    if check_values:
        _check_select_values(fn, window_slots, NW, NSLOTS, static_pos, static_count, mode,
                             k, visit_count, MAXV)
    kmax = min(k, NW)
    if kmax == 0 or NQB == 0 or B * H == 0:
        return visit_slots, visit_count
    group = H // HKV
    dev = q_rep.device
    slots = window_slots[:, :, :NW].long()                                   # [B, HKV, NW]
    krep = torch.gather(k_rep_pool, 2, slots.clamp(0, NSLOTS - 1)[..., None].expand(-1, -1, -1, D))
    krep = krep.repeat_interleave(group, dim=1)                              # [B, H, NW, D]
    scores = q_rep @ krep.transpose(-1, -2)                                  # [B, H, NQB, NW]
    member = _static_membership(static_pos, static_count, NW)                # [NQB, NW]
    cand = ~member if mode == "union" else member
    kk = torch.clamp(cand.sum(1), max=k)                                     # [NQB]
    keys = _score_keys(scores, cand[None, None].expand(B, H, NQB, NW))
    top = torch.topk(keys, kmax, dim=-1, sorted=True).values                 # [B, H, NQB, kmax]
    take = torch.arange(kmax, device=dev) < kk[:, None]                      # [NQB, kmax]
    return _append_picks(top, take, slots, group, visit_slots, visit_count)


def _append_picks(top, take, slots, group, visit_slots, visit_count):
    """Append picks to the visit table: `top` int64 keys [B, H, NQB, kmax] best first (the
    low word is ~window position), `take` (broadcastable to it) where a pick is real, `slots`
    [B, HKV, NW] the window's pool slots. Shared by the torch and the tiled paths."""
    B, H, NQB, kmax = top.shape
    MAXV = visit_slots.shape[3]
    dev = top.device
    take = take.expand(B, H, NQB, kmax)
    pos = torch.where(take, _LOW31 - (top & _LOW31), torch.zeros((), dtype=torch.int64, device=dev))
    picked = torch.gather(slots.long().repeat_interleave(group, dim=1), 2,
                          pos.reshape(B, H, NQB * kmax)).reshape(B, H, NQB, kmax)
    count = visit_count.long()
    cols = count[..., None] + torch.arange(kmax, device=dev)
    ok = take & (cols >= 0) & (cols < MAXV)
    wide = torch.empty(B, H, NQB, MAXV + 1, dtype=visit_slots.dtype, device=dev)
    wide[..., :MAXV] = visit_slots
    wide.scatter_(3, torch.where(ok, cols, torch.full_like(cols, MAXV)), picked.to(wide.dtype))
    visit_slots.copy_(wide[..., :MAXV])
    visit_count.copy_(torch.clamp(count + take.sum(-1), max=MAXV))
    return visit_slots, visit_count


def _select_topk_tiled(q_rep, k_rep_pool, window_slots, NW, static_pos, static_count, mode,
                       k, visit_slots, visit_count, tile: int):
    """The Top-K of a window wider than one program's tile: each program scores `tile`
    positions of the window for BLOCK_Q query blocks and keeps their best min(k, NW) keys
    (one launch, `_select_partial_kernel`); one torch.topk over the per-tile bests merges
    them (the keys are distinct and carry their position, so the merge has the same tie rule
    and order as one pass over the whole window); the picks are appended as the torch path
    does. Inputs are checked by the caller."""
    B, H, NQB, D = q_rep.shape
    HKV, NSLOTS = k_rep_pool.shape[1], k_rep_pool.shape[2]
    SMAX = static_pos.shape[1]
    kmax = min(k, NW)
    block_w, block_q, warps = _tile_config(tile, NQB)
    n_tiles = triton.cdiv(NW, block_w)
    block_k = _pow2(kmax, 1)
    part = torch.empty(B, H, NQB, n_tiles, block_k, dtype=torch.int64, device=q_rep.device)
    sp_stride = static_pos.stride() if SMAX else (0, 0)
    grid = (triton.cdiv(NQB, block_q) * n_tiles, H, B)
    _select_partial_kernel[grid](
        q_rep, k_rep_pool, window_slots, static_pos, static_count, part,
        NQB, NW, NSLOTS, SMAX, kmax, n_tiles, H // HKV,
        *q_rep.stride(), *k_rep_pool.stride(), *window_slots.stride(),
        *sp_stride, static_count.stride(0), *part.stride(),
        D=D, UNION=(mode == "union"), DC=SELECT_DC,
        BLOCK_Q=block_q, BLOCK_W=block_w, BLOCK_K=block_k, num_warps=warps)
    top = torch.topk(part.reshape(B, H, NQB, n_tiles * block_k), kmax, dim=-1, sorted=True).values
    return _append_picks(top, top != _INT64_MIN, window_slots[:, :, :NW], H // HKV,
                         visit_slots, visit_count)


def _select_path(fn: str, backend: str, device, NW: int, k: int) -> str:
    """Which select runs: 'torch'; 'one-tile' (the Triton kernel, one tile of the whole
    window); or 'tiled' (SELECT_TILED, past SELECT_TRITON_MAX_POSITIONS positions, k within
    SELECT_TILED_MAX_K). "auto" past the threshold without SELECT_TILED is torch
    (select_backend_for)."""
    if not _use_triton(fn, _auto_by_size(backend, NW, tiled=SELECT_TILED), device):
        return "torch"
    if SELECT_TILED and NW > _triton_max_positions():
        # the per-tile rounds cost k row maxima: a large k takes the torch path
        return "tiled" if min(k, NW) <= SELECT_TILED_MAX_K else "torch"
    if NW > _MAX_TRITON_POSITIONS:
        raise ValueError(f"{fn}: window_count = NW = {NW} window positions, the Triton "
                         f"kernel holds at most {_MAX_TRITON_POSITIONS} per program; "
                         "use backend='torch'")
    return "one-tile"


def _tile_config(n_pos: int, nqb: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_Q, num_warps) of a [query blocks, positions] tile: about 2048 elements
    per program and 8 per thread.

    n_pos is this step's valid count (NW / ND), not the allocation (NWMAX / NDOMMAX): the
    empty slots of a doubled pool are neither gathered nor scored. At NW=168
    (BLOCK_W=256): 8 query blocks and 8 warps per program -> 11 x 12 = 132 programs for
    NQB=84, H=12 (one H100 wave).
    """
    block_w = _pow2(n_pos)
    block_q = max(1, min(8, 2048 // block_w, _pow2(nqb, 1)))
    warps = max(1, min(8, block_q * block_w // 256))
    return block_w, block_q, warps


def _use_sort(kmax: int, block_w: int) -> bool:
    if SELECT_TOPK_ALGO not in ("auto", "rounds", "sort"):
        raise ValueError(f"codegen.select.SELECT_TOPK_ALGO = {SELECT_TOPK_ALGO!r}, allowed: "
                         "'auto', 'rounds' or 'sort'")
    if SELECT_TOPK_ALGO != "auto":
        return SELECT_TOPK_ALGO == "sort"
    if _interpreter_active():
        return False
    return kmax > 3 * (block_w.bit_length() - 1) ** 2 // 2


def select_topk(q_rep, k_rep_pool, window_slots, window_count, static_pos, static_count,
                mode, k, visit_slots, visit_count, *, backend: str = "auto",
                check_values: bool = True):
    """Dynamic Top-K over the local window, appending pool slots to the visit table.

    q_rep float32 [B, H, NQB, D]; k_rep_pool float32 [B, HKV, NSLOTS, D];
    window_slots int32 [B, HKV, NWMAX] (pool slot of window position p);
    window_count int NW <= NWMAX; static_pos int32 [NQB, SMAX] and static_count int32
    [NQB] (the static neighborhood, as window positions); mode "union" | "intersection";
    k int >= 0; visit_slots int32 [B, H, NQB, MAXV] and visit_count int32 [B, H, NQB],
    updated in place: the min(k, #candidates) best positions' slots are written at
    visit_slots[b, h, qb, visit_count : visit_count + n], best first.
    backend "auto": Triton on CUDA tensors while NW <= SELECT_TRITON_MAX_POSITIONS, else
    the torch path, or with SELECT_TILED on the tiled Triton path; "triton" / "torch"
    force one (see `select_backend_for` and `_select_path`).
    Returns (visit_slots, visit_count).
    """
    fn = "select_topk"
    B, H, HKV, NQB, D, NSLOTS, NWMAX, NW, SMAX, k = _check_select(
        fn, q_rep, k_rep_pool, window_slots, window_count, static_pos, static_count,
        mode, k, visit_slots, visit_count)
    MAXV = visit_slots.shape[3]
    path = _select_path(fn, backend, q_rep.device, NW, k)
    if check_values:
        _check_select_values(fn, window_slots, NW, NSLOTS, static_pos, static_count, mode,
                             k, visit_count, MAXV)
    if path == "torch":
        return select_topk_torch(q_rep, k_rep_pool, window_slots, NW, static_pos,
                                 static_count, mode, k, visit_slots, visit_count,
                                 check_values=False)
    kmax = min(k, NW)
    if kmax == 0 or NQB == 0 or B * H == 0:
        return visit_slots, visit_count
    if path == "tiled":
        return _select_topk_tiled(q_rep, k_rep_pool, window_slots, NW, static_pos,
                                  static_count, mode, k, visit_slots, visit_count,
                                  _triton_max_positions())
    block_w, block_q, warps = _tile_config(NW, NQB)   # by the valid window, not NWMAX
    block_k = _pow2(kmax, 1)
    sp_stride = static_pos.stride() if SMAX else (0, 0)
    grid = (triton.cdiv(NQB, block_q), H, B)
    _select_topk_kernel[grid](
        q_rep, k_rep_pool, window_slots, static_pos, static_count, visit_slots, visit_count,
        NQB, NW, NSLOTS, SMAX, kmax, k, MAXV, H // HKV,
        *q_rep.stride(), *k_rep_pool.stride(), *window_slots.stride(),
        *sp_stride, static_count.stride(0), *visit_slots.stride(), *visit_count.stride(),
        D=D, UNION=(mode == "union"), DC=SELECT_DC, USE_SORT=_use_sort(kmax, block_w),
        BLOCK_Q=block_q, BLOCK_W=block_w, BLOCK_K=block_k, num_warps=warps)
    return visit_slots, visit_count


# ==================================================================================
# 3. block importance (Sparse Forcing's column sum)
# ==================================================================================
def _check_importance(fn, q_rep, k_rep_pool, domain_slots, domain_count, scale,
                      check_values):
    dev, B, H, NQB, D, HKV, NSLOTS = _check_reps(fn, q_rep, k_rep_pool)
    _need_tensor(fn, "domain_slots", domain_slots, 3, _I32, dev)
    if _shape(domain_slots)[:2] != (B, HKV):
        raise ValueError(f"{fn}: domain_slots.shape = {_shape(domain_slots)}, expected "
                         f"({B}, {HKV}, NDOMMAX)")
    NDOM = domain_slots.shape[2]
    ND = _need_int(fn, "domain_count", domain_count, 0, NDOM,
                   f" (domain_slots holds NDOMMAX = {NDOM} entries)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{fn}: scale = {scale!r}, allowed: a finite python float "
                         "(usually 1/sqrt(D))")
    if check_values and ND and NSLOTS:
        ds = domain_slots[:, :, :ND]
        bad = (ds < 0) | (ds >= NSLOTS)
        if bool(bad.any()):
            i = tuple(int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"{fn}: domain_slots[{', '.join(map(str, i))}] = {int(ds[i])} is "
                             f"not a pool slot, allowed: 0..{NSLOTS - 1} (k_rep_pool.shape[2])")
    elif check_values and ND:
        raise ValueError(f"{fn}: domain_count = {ND} but k_rep_pool has no slots")
    return B, H, HKV, NQB, D, NSLOTS, NDOM, ND, float(scale)


def block_importance_torch(q_rep, k_rep_pool, domain_slots, domain_count, scale, *,
                           check_values: bool = True) -> torch.Tensor:
    """Torch path of `block_importance`."""
    B, H, HKV, NQB, D, NSLOTS, NDOM, ND, scale = _check_importance(
        "block_importance_torch", q_rep, k_rep_pool, domain_slots, domain_count, scale,
        check_values)
    out = torch.zeros(B, H, NDOM, dtype=torch.float32, device=q_rep.device)
    if ND == 0 or NQB == 0:
        return out
    slots = domain_slots[:, :, :ND].long().clamp(0, NSLOTS - 1)
    krep = torch.gather(k_rep_pool, 2, slots[..., None].expand(-1, -1, -1, D))
    krep = krep.repeat_interleave(H // HKV, dim=1)                          # [B, H, ND, D]
    probs = torch.softmax((q_rep @ krep.transpose(-1, -2)) * scale, dim=-1)  # [B, H, NQB, ND]
    out[..., :ND] = probs.sum(dim=2)
    return out


def block_importance(q_rep, k_rep_pool, domain_slots, domain_count, scale, *,
                     backend: str = "auto", check_values: bool = True) -> torch.Tensor:
    """Per (b, h): sum over query blocks of softmax_j(<q_rep[qb], k_rep[domain j]> * scale).

    q_rep float32 [B, H, NQB, D]; k_rep_pool float32 [B, HKV, NSLOTS, D];
    domain_slots int32 [B, HKV, NDOMMAX] (the persistent set, then the window, as pool
    slots); domain_count int ND <= NDOMMAX; scale float. Returns float32 [B, H, NDOMMAX],
    0 past ND. The caller averages over heads where the set is shared. backend "auto":
    Triton on CUDA tensors while ND <= SELECT_TRITON_MAX_POSITIONS, else torch.
    """
    fn = "block_importance"
    B, H, HKV, NQB, D, NSLOTS, NDOM, ND, scale = _check_importance(
        fn, q_rep, k_rep_pool, domain_slots, domain_count, scale, check_values)
    use_triton = _use_triton(fn, _auto_by_size(backend, ND), q_rep.device)
    if use_triton and ND > _MAX_TRITON_POSITIONS:
        raise ValueError(f"{fn}: domain_count = ND = {ND}, the Triton kernel holds at most "
                         f"{_MAX_TRITON_POSITIONS} per program; use backend='torch'")
    if not use_triton:
        return block_importance_torch(q_rep, k_rep_pool, domain_slots, ND, scale,
                                      check_values=False)
    if ND == 0 or NQB == 0 or B * H == 0:
        return torch.zeros(B, H, NDOM, dtype=torch.float32, device=q_rep.device)
    block_n, block_q, warps = _tile_config(ND, NQB)   # by the valid domain, not NDOMMAX
    n_tiles = triton.cdiv(NQB, block_q)
    # one tile: write the result directly; more: per-tile partial sums, then one
    # deterministic torch sum (no float atomics, so results are reproducible). A tile
    # narrower than the allocation leaves columns past it unwritten: they start at 0
    alloc = torch.zeros if block_n < NDOM else torch.empty
    part = alloc(B, H, n_tiles, NDOM, dtype=torch.float32, device=q_rep.device)
    _block_importance_kernel[(n_tiles, H, B)](
        q_rep, k_rep_pool, domain_slots, part,
        NQB, ND, NDOM, NSLOTS, H // HKV, scale * 1.4426950408889634,
        *q_rep.stride(), *k_rep_pool.stride(), *domain_slots.stride(), *part.stride(),
        D=D, DC=SELECT_DC, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=warps)
    return part[:, :, 0] if n_tiles == 1 else part.sum(dim=2)


# ==================================================================================
# 4. the commit's importance (internal: the rollout cache's hot path, no checks)
# ==================================================================================
class CommitImportance:
    """`block_importance` of a commit in one launch, from the chunk's query tokens.

    Fixed per cache: the query-block count, block tokens, head dim and domain width, hence
    the tiles (one compile per pattern). `launch` writes the query representatives to
    `q_rep` and the per-tile partial column sums to `part` [B, H, n_tiles, NDOM]; the sum
    over the tiles and heads is left to the update kernel (no reduction launch).
    """

    def __init__(self, nqb: int, block_tokens: int, head_dim: int, ndom: int):
        if ndom > _MAX_TRITON_POSITIONS:
            raise ValueError(f"CommitImportance: ndom = {ndom} domain entries, the Triton kernel "
                             f"holds at most {_MAX_TRITON_POSITIONS} per program")
        self.nqb, self.bt, self.d, self.ndom = nqb, block_tokens, head_dim, ndom
        self.block_n, self.block_q, self.warps = _tile_config(ndom, nqb)
        self.n_tiles = -(-nqb // self.block_q)
        self.block_d = min(_pow2(head_dim, 1), 128)
        self.block_t = max(1, min(_pow2(block_tokens, 1), 4096 // self.block_d))
        self.bt_ceil = -(-block_tokens // self.block_t) * self.block_t

    def launch(self, x, valid, q_rep, k_rep_pool, dom_a, n_a, dom_b, n_d, part, scale, group):
        """x [B, H, NQB * bt, d] query tokens (tile-major), valid int32 [NQB]; q_rep float32
        [B, H, NQB, d] and part float32 [B, H, n_tiles, NDOM] outputs; the domain is
        dom_a[..., :n_a] then dom_b[..., :n_d - n_a] (pool slots of k_rep_pool)."""
        B, H = x.shape[:2]
        sx_b, sx_h, sx_r, sx_d = x.stride()
        _commit_importance_kernel[(self.n_tiles, H, B)](
            x, valid, q_rep, k_rep_pool, dom_a, dom_b, part,
            self.nqb, self.bt, n_a, n_d, self.ndom, k_rep_pool.shape[2], group,
            scale * 1.4426950408889634,
            sx_b, sx_h, sx_r * self.bt, sx_r, sx_d, valid.stride(0),
            *q_rep.stride(), *k_rep_pool.stride(), *dom_a.stride(), *dom_b.stride(),
            *part.stride(),
            D=self.d, DC=SELECT_DC, BLOCK_Q=self.block_q, BLOCK_N=self.block_n,
            BT_CEIL=self.bt_ceil, BLOCK_T=self.block_t, BLOCK_D=self.block_d,
            num_warps=self.warps)


# ==================================================================================
# Triton kernels
# ==================================================================================
if triton is not None:

    @triton.jit
    def _block_mean(x_base, sx_t, sx_d, nv, BT, o_base, so_d, D: tl.constexpr,
                    BT_CEIL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # mean of the first nv (clamped to [0, BT]) tokens of one block, fp32, stored at o_base
        nv = tl.minimum(tl.maximum(nv, 0), BT)
        denom = tl.maximum(nv, 1).to(tl.float32)
        for d0 in tl.static_range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)   # reduced once, at the end
            for t0 in range(0, BT_CEIL, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                m = (t < nv)[:, None] & d_ok[None, :]
                xt = tl.load(x_base + t[:, None] * sx_t + d[None, :] * sx_d, mask=m, other=0.0)
                acc += xt.to(tl.float32)
            tl.store(o_base + d * so_d, tl.sum(acc, axis=0) / denom, mask=d_ok)

    @triton.jit
    def _block_representatives_kernel(
        x_ptr, valid_ptr, out_ptr, BT,
        sx_b, sx_h, sx_n, sx_t, sx_d,
        sv_b, sv_h, sv_n,
        so_b, so_h, so_n, so_d,
        D: tl.constexpr, BT_CEIL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one program = one block (b, h, n): mean of its first `valid` tokens
        n = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        nv = tl.load(valid_ptr + b * sv_b + h * sv_h + n * sv_n)
        _block_mean(x_ptr + b * sx_b + h * sx_h + n * sx_n, sx_t, sx_d, nv, BT,
                    out_ptr + b * so_b + h * so_h + n * so_n, so_d,
                    D, BT_CEIL, BLOCK_T, BLOCK_D)

    @triton.jit
    def _rep_scores(q_row, sq_d, q_ok, k_row, sk_d, s_ok, D: tl.constexpr, DC: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
        # [BLOCK_Q, BLOCK_N] dot products of query representatives (row pointers q_row) with
        # gathered key representatives (row pointers k_row): IEEE fp32 FMAs, DC d at a time;
        # rows / columns outside q_ok / s_ok are never read (0)
        dc = tl.arange(0, DC)
        k_ptrs = tl.broadcast_to(k_row[None, :, None], [BLOCK_Q, BLOCK_N, DC]) + dc[None, None, :] * sk_d
        k_mask = tl.broadcast_to(s_ok[None, :, None], [BLOCK_Q, BLOCK_N, DC])
        q_ptrs = q_row[:, None, None] + dc[None, None, :] * sq_d
        scores = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, DC):
            d_ok = (d0 + dc < D)[None, None, :]
            kd = tl.load(k_ptrs + d0 * sk_d, mask=k_mask & d_ok, other=0.0)
            qd = tl.load(q_ptrs + d0 * sq_d, mask=q_ok[:, None, None] & d_ok, other=0.0)
            scores += tl.sum(kd * qd, axis=2)
        return scores

    @triton.jit
    def _window_keys(q_ptr, kp_ptr, ws_base, sp_ptr, sc_ptr, b, g, h, qb, q_ok, pos,
                     NW, NSLOTS, SMAX, sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_s, sk_d,
                     sw_p, sp_q, sp_s, sc_q, D: tl.constexpr, UNION: tl.constexpr,
                     DC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr):
        # The select's [BLOCK_Q query blocks, BLOCK_W window positions `pos`] tile: int64
        # keys (larger = better; int64 min for non-candidates) and the candidate mask.
        p_ok = pos < NW
        slot = tl.load(ws_base + pos * sw_p, mask=p_ok, other=0)
        s_ok = p_ok & (slot >= 0) & (slot < NSLOTS)        # never read outside the pool

        # scores[qb, p] = <q_rep[b, h, qb], k_rep_pool[b, g, slot[p]]>: IEEE fp32 FMAs over d
        k_row = kp_ptr + b * sk_b + g * sk_h + slot.to(tl.int64) * sk_s
        q_row = q_ptr + b * sq_b + h * sq_h + qb.to(tl.int64) * sq_q
        scores = _rep_scores(q_row, sq_d, q_ok, k_row, sk_d, s_ok, D, DC, BLOCK_Q, BLOCK_W)

        # candidates: static membership of each query block, then the mode
        n_static = tl.load(sc_ptr + qb * sc_q, mask=q_ok, other=0)
        member = tl.zeros([BLOCK_Q, BLOCK_W], dtype=tl.int32)
        for s in range(0, SMAX):
            sp = tl.load(sp_ptr + qb * sp_q + s * sp_s, mask=q_ok & (s < n_static), other=-1)
            member = member | (pos[None, :] == sp[:, None]).to(tl.int32)
        if UNION:
            cand = (member == 0) & p_ok[None, :]
        else:
            cand = (member != 0) & p_ok[None, :]

        # int64 keys: order-preserving image of the score << 32 | ~position (ties -> lower p)
        sc = tl.where(scores == 0.0, 0.0, scores)                 # -0.0 ties with +0.0
        bits = sc.to(tl.int32, bitcast=True)
        img = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        img = tl.where(sc != sc, -2139095041, img)                # NaN ranks like -inf
        low = 2147483647 - pos.to(tl.int64)
        key = (img.to(tl.int64) << 32) | low[None, :]
        key = tl.where(cand, key, -9223372036854775808)
        return key, cand

    @triton.jit
    def _select_topk_kernel(
        q_ptr, kp_ptr, ws_ptr, sp_ptr, sc_ptr, vs_ptr, vc_ptr,
        NQB, NW, NSLOTS, SMAX, KMAX, K, MAXV, GROUP,
        sq_b, sq_h, sq_q, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sw_b, sw_h, sw_p,
        sp_q, sp_s, sc_q,
        svs_b, svs_h, svs_q, svs_v,
        svc_b, svc_h, svc_q,
        D: tl.constexpr, UNION: tl.constexpr, DC: tl.constexpr, USE_SORT: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program = (b, h, BLOCK_Q query blocks); tiles are [BLOCK_Q query blocks,
        # BLOCK_W window positions]. The gathered k loads below have no contiguity, so Triton
        # lays the tile out with threads along the query blocks first: a thread then holds
        # several positions of one query block and each round's row max is mostly
        # thread-local (no shared-memory traffic inside the d loop).
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        g = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        qb = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = qb < NQB
        pos = tl.arange(0, BLOCK_W)
        ws_base = ws_ptr + b * sw_b + g * sw_h
        key, cand = _window_keys(q_ptr, kp_ptr, ws_base, sp_ptr, sc_ptr, b, g, h, qb, q_ok, pos,
                                 NW, NSLOTS, SMAX, sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_s,
                                 sk_d, sw_p, sp_q, sp_s, sc_q, D, UNION, DC, BLOCK_Q, BLOCK_W)
        n_take = tl.minimum(tl.sum(cand.to(tl.int32), axis=1), K)

        if USE_SORT:
            # one bitonic sort of each row (keys are distinct): rank r = column r
            ranked = tl.sort(key, dim=1, descending=True)
            picks = (2147483647 - (ranked & 2147483647)).to(tl.int32)
            rank = tl.arange(0, BLOCK_W)
        else:
            # KMAX rounds of a row max; round r's winner is rank r (best first)
            rank = tl.arange(0, BLOCK_K)
            picks = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.int32)
            for r in range(0, KMAX):
                best = tl.max(key, axis=1)
                p = (2147483647 - (best & 2147483647)).to(tl.int32)
                picks = tl.where(rank[None, :] == r, p[:, None], picks)
                key = tl.where(key == best[:, None], -9223372036854775808, key)

        # append the picks' pool slots to the visit table
        count = tl.load(vc_ptr + b * svc_b + h * svc_h + qb * svc_q, mask=q_ok, other=0)
        take = q_ok[:, None] & (rank[None, :] < n_take[:, None])
        picked = tl.load(ws_base + picks * sw_p, mask=take, other=0)
        col = count[:, None] + rank[None, :]
        vs_row = vs_ptr + b * svs_b + h * svs_h + qb.to(tl.int64) * svs_q
        tl.store(vs_row[:, None] + col * svs_v, picked, mask=take & (col >= 0) & (col < MAXV))
        tl.store(vc_ptr + b * svc_b + h * svc_h + qb * svc_q,
                 tl.minimum(count + n_take, MAXV), mask=q_ok)

    @triton.jit
    def _select_partial_kernel(
        q_ptr, kp_ptr, ws_ptr, sp_ptr, sc_ptr, part_ptr,
        NQB, NW, NSLOTS, SMAX, KMAX, NTILES, GROUP,
        sq_b, sq_h, sq_q, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sw_b, sw_h, sw_p,
        sp_q, sp_s, sc_q,
        spt_b, spt_h, spt_q, spt_t, spt_k,
        D: tl.constexpr, UNION: tl.constexpr, DC: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program = (b, h, BLOCK_Q query blocks, window tile t of BLOCK_W positions): the
        # select kernel's scores, candidates and int64 keys on positions [t*BLOCK_W, ...),
        # then its best KMAX keys (KMAX rounds of a row max, best first) written to
        # part[b, h, qb, t, :]; the rest of the row is the empty key (int64 min).
        t = tl.program_id(0) % NTILES
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        g = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        qb = (tl.program_id(0) // NTILES) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = qb < NQB
        pos = t * BLOCK_W + tl.arange(0, BLOCK_W)
        ws_base = ws_ptr + b * sw_b + g * sw_h
        key, cand = _window_keys(q_ptr, kp_ptr, ws_base, sp_ptr, sc_ptr, b, g, h, qb, q_ok, pos,
                                 NW, NSLOTS, SMAX, sq_b, sq_h, sq_q, sq_d, sk_b, sk_h, sk_s,
                                 sk_d, sw_p, sp_q, sp_s, sc_q, D, UNION, DC, BLOCK_Q, BLOCK_W)

        rank = tl.arange(0, BLOCK_K)
        best_keys = tl.full([BLOCK_Q, BLOCK_K], -9223372036854775808, dtype=tl.int64)
        for r in range(0, KMAX):
            best = tl.max(key, axis=1)
            best_keys = tl.where(rank[None, :] == r, best[:, None], best_keys)
            key = tl.where(key == best[:, None], -9223372036854775808, key)
        out = (part_ptr + b * spt_b + h * spt_h + qb.to(tl.int64)[:, None] * spt_q
               + t * spt_t + rank[None, :] * spt_k)
        tl.store(out, best_keys, mask=q_ok[:, None])

    @triton.jit
    def _importance_colsum(q_row, sq_d, q_ok, k_row, sk_d, s_ok, j_ok, scale_log2e,
                           D: tl.constexpr, DC: tl.constexpr, BLOCK_Q: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        # Column sums over a tile of query blocks of the row softmax over the domain. Tile
        # [BLOCK_Q query blocks, BLOCK_N domain entries], the select kernel's layout; q_row /
        # k_row are the row pointers of the query / key representatives.
        scores = _rep_scores(q_row, sq_d, q_ok, k_row, sk_d, s_ok, D, DC, BLOCK_Q, BLOCK_N)
        z = tl.where(j_ok[None, :], scores * scale_log2e, float("-inf"))
        m = tl.max(z, axis=1)
        e = tl.exp2(z - m[:, None])
        prob = e / tl.sum(e, axis=1)[:, None]
        return tl.sum(tl.where(q_ok[:, None], prob, 0.0), axis=0)

    @triton.jit
    def _domain_slots(da_row, sa_j, db_row, sb_j, NA, ND, NSLOTS, BLOCK_N: tl.constexpr):
        # domain entry j < ND: da[j] for j < NA, else db[j - NA]; s_ok: a readable pool slot
        j = tl.arange(0, BLOCK_N)
        j_ok = j < ND
        in_a = j < NA
        slot_a = tl.load(da_row + j * sa_j, mask=j_ok & in_a, other=0)
        slot_b = tl.load(db_row + (j - NA) * sb_j, mask=j_ok & (j >= NA), other=0)
        slot = tl.where(in_a, slot_a, slot_b)
        s_ok = j_ok & (slot >= 0) & (slot < NSLOTS)        # never read outside the pool
        return j, j_ok, slot, s_ok

    @triton.jit(do_not_specialize=("NQB", "ND"))
    def _block_importance_kernel(
        q_ptr, kp_ptr, ds_ptr, out_ptr,
        NQB, ND, NDOM, NSLOTS, GROUP, scale_log2e,
        sq_b, sq_h, sq_q, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sd_b, sd_h, sd_j,
        so_b, so_h, so_t, so_j,
        D: tl.constexpr, DC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program = (b, h, tile t of BLOCK_Q query blocks): the column sums over the
        # tile of the row softmax over the domain, written to partial[b, h, t, :].
        t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        g = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        qb = t * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = qb < NQB
        ds_row = ds_ptr + b * sd_b + g * sd_h
        j, j_ok, slot, s_ok = _domain_slots(ds_row, sd_j, ds_row, sd_j, ND, ND, NSLOTS, BLOCK_N)
        k_row = kp_ptr + b * sk_b + g * sk_h + slot.to(tl.int64) * sk_s
        q_row = q_ptr + b * sq_b + h * sq_h + qb.to(tl.int64) * sq_q
        colsum = _importance_colsum(q_row, sq_d, q_ok, k_row, sk_d, s_ok, j_ok, scale_log2e,
                                    D, DC, BLOCK_Q, BLOCK_N)
        tl.store(out_ptr + b * so_b + h * so_h + t * so_t + j * so_j,
                 tl.where(j_ok, colsum, 0.0), mask=j < NDOM)

    # the domain counts change while the memory fills: not specialised (no compile per step)
    @triton.jit(do_not_specialize=("NQB", "BT", "NA", "ND"))
    def _commit_importance_kernel(
        x_ptr, valid_ptr, qr_ptr, kp_ptr, da_ptr, db_ptr, out_ptr,
        NQB, BT, NA, ND, NDOM, NSLOTS, GROUP, scale_log2e,
        sx_b, sx_h, sx_n, sx_t, sx_d, sv_n,
        sr_b, sr_h, sr_q, sr_d,
        sk_b, sk_h, sk_s, sk_d,
        sa_b, sa_h, sa_j,
        sdb_b, sdb_h, sdb_j,
        so_b, so_h, so_t, so_j,
        D: tl.constexpr, DC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BT_CEIL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # `block_importance` of the commit, in one launch: the program first writes the
        # representatives of its query blocks (from the tokens x) to qr, then reads them
        # back (its own writes, after a barrier); the domain is da[:NA] then db[:ND - NA]
        # (the persistent table, then the window table: no concatenation launch).
        t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        g = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)
        qr_head = qr_ptr + b * sr_b + h * sr_h
        for i in range(0, BLOCK_Q):
            qbi = t * BLOCK_Q + i
            if qbi < NQB:
                nv = tl.load(valid_ptr + qbi * sv_n)
                _block_mean(x_ptr + b * sx_b + h * sx_h + qbi.to(tl.int64) * sx_n, sx_t, sx_d,
                            nv, BT, qr_head + qbi.to(tl.int64) * sr_q, sr_d,
                            D, BT_CEIL, BLOCK_T, BLOCK_D)
        tl.debug_barrier()                             # the representatives are written
        qb = t * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = qb < NQB
        j, j_ok, slot, s_ok = _domain_slots(da_ptr + b * sa_b + g * sa_h, sa_j,
                                            db_ptr + b * sdb_b + g * sdb_h, sdb_j,
                                            NA, ND, NSLOTS, BLOCK_N)
        k_row = kp_ptr + b * sk_b + g * sk_h + slot.to(tl.int64) * sk_s
        colsum = _importance_colsum(qr_head + qb.to(tl.int64) * sr_q, sr_d, q_ok, k_row, sk_d,
                                    s_ok, j_ok, scale_log2e, D, DC, BLOCK_Q, BLOCK_N)
        tl.store(out_ptr + b * so_b + h * so_h + t * so_t + j * so_j,
                 tl.where(j_ok, colsum, 0.0), mask=j < NDOM)
