"""Input validation for PBSA attention: every problem is a ValueError that names
the argument, the offending value and what is allowed (never a Triton crash).

Shape, dtype, device and layout checks cost nothing on the device. The value
checks (index ranges, counts, valid lengths, duplicates) run as a few small
tensor ops and cost one host synchronisation in total; pass `validate=False`
to the public functions to skip them in a hot loop once a schedule is trusted.
"""

from __future__ import annotations

import torch

from .kernel_spec import AttentionKernelSpec

ARG_NAMES = (
    "q",
    "k_cur",
    "v_cur",
    "cur_valid",
    "k_pool",
    "v_pool",
    "slot_valid",
    "visit_slots",
    "visit_count",
)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _expect(name: str, t, shape, dtype, device, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {_shape_str(t.shape)}; expected {_shape_str(shape)} ({what})"
        )
    if t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}; expected {dtype} ({what})")
    if t.device != device:
        raise ValueError(
            f"{name} is on {t.device}; every tensor must be on the device of q ({device})"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{name} (shape {_shape_str(t.shape)}, strides {tuple(t.stride())}) must be "
            f"contiguous; call .contiguous() first"
        )


def check_shapes(
    spec: AttentionKernelSpec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
    visit_slots, visit_count,
) -> tuple[int, int]:
    """Check shapes/dtypes/devices/contiguity; return (B, NSLOTS)."""
    if not isinstance(spec, AttentionKernelSpec):
        raise ValueError(f"spec must be an AttentionKernelSpec, got {type(spec).__name__}")
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    H, HKV, NQB = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks
    BT, D, MAXV = spec.block_tokens, spec.head_dim, spec.max_cached_visits
    dt = spec.torch_dtype()
    if q.dim() != 5:
        raise ValueError(
            f"q has shape {_shape_str(q.shape)}; expected 5 dims [B, H={H}, NQB={NQB}, BT={BT}, D={D}]"
        )
    B = int(q.shape[0])
    if B < 1:
        raise ValueError(f"q has batch size {B}; expected >= 1")
    dev = q.device
    _expect("q", q, (B, H, NQB, BT, D), dt, dev, f"[B, num_heads, NQB, BT, D] in spec.dtype={spec.dtype}")
    for name, t in (("k_cur", k_cur), ("v_cur", v_cur)):
        _expect(name, t, (B, HKV, NQB, BT, D), dt, dev, "[B, num_kv_heads, NQB, BT, D]")
    _expect("cur_valid", cur_valid, (NQB,), torch.int32, dev, "int32 real-token count per chunk block")
    if not isinstance(k_pool, torch.Tensor) or k_pool.dim() != 5:
        raise ValueError(
            f"k_pool must be a 5-dim tensor [B, HKV={HKV}, NSLOTS, BT={BT}, D={D}], got "
            f"{_shape_str(k_pool.shape) if isinstance(k_pool, torch.Tensor) else type(k_pool).__name__}"
        )
    NSLOTS = int(k_pool.shape[2])
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        _expect(name, t, (B, HKV, NSLOTS, BT, D), dt, dev, "[B, num_kv_heads, NSLOTS, BT, D]")
    _expect("slot_valid", slot_valid, (B, HKV, NSLOTS), torch.int32, dev, "int32 real-token count per pool slot")
    _expect("visit_slots", visit_slots, (B, H, NQB, MAXV), torch.int32, dev,
            "int32 pool slots visited per query block, width spec.max_cached_visits")
    _expect("visit_count", visit_count, (B, H, NQB), torch.int32, dev, "int32 used entries per row of visit_slots")
    return B, NSLOTS


def check_values(
    spec: AttentionKernelSpec, cur_valid, slot_valid, visit_slots, visit_count, nslots: int,
    check_duplicates: bool = True,
) -> None:
    """Check index ranges, counts and valid lengths (one host sync; details only on failure)."""
    BT, MAXV = spec.block_tokens, spec.max_cached_visits
    cnt = visit_count.long()
    used = torch.arange(MAXV, device=visit_slots.device) < cnt[..., None]
    slots = visit_slots.long()
    checks = {}
    checks["count"] = ((cnt < 0) | (cnt > MAXV)).any()
    checks["slots"] = (used & ((slots < 0) | (slots >= nslots))).any()
    checks["cur_valid"] = ((cur_valid < 0) | (cur_valid > BT)).any()
    if spec.has_padding:
        checks["slot_valid"] = ((slot_valid < 0) | (slot_valid > BT)).any()
    else:
        checks["cur_full"] = (cur_valid != BT).any()
    safe = torch.where(used, slots, 0).clamp(0, max(nslots - 1, 0))
    if nslots > 0 and MAXV > 0:
        B, H = visit_slots.shape[:2]
        G = spec.group_size
        hkv = (torch.arange(H, device=slots.device) // G).view(1, H, 1, 1)
        bidx = torch.arange(B, device=slots.device).view(B, 1, 1, 1)
        sv = slot_valid.long()[bidx, hkv, safe]
        if spec.has_padding:
            checks["visited_valid"] = (used & ((sv < 0) | (sv > BT))).any()
        else:
            checks["visited_full"] = (used & (sv != BT)).any()
    if check_duplicates and MAXV > 1 and nslots > 0:
        marked = torch.where(used, slots, -1 - torch.arange(MAXV, device=slots.device))
        srt = marked.sort(dim=-1).values
        checks["dups"] = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()
    names = list(checks)
    flags = torch.stack([checks[n] for n in names]).tolist()  # the one host sync
    bad = [n for n, f in zip(names, flags) if f]
    if not bad:
        return
    what = bad[0]

    def first(mask):
        idx = mask.nonzero()[0].tolist()
        return idx, "[" + ", ".join(map(str, idx)) + "]"

    if what == "count":
        idx, s = first((cnt < 0) | (cnt > MAXV))
        raise ValueError(
            f"visit_count{s} = {int(cnt[tuple(idx)])} is out of range: counts must be in "
            f"[0, {MAXV}] (spec.max_cached_visits)"
        )
    if what == "slots":
        idx, s = first(used & ((slots < 0) | (slots >= nslots)))
        raise ValueError(
            f"visit_slots{s} = {int(slots[tuple(idx)])} is out of range: entries below "
            f"visit_count must be pool slots in [0, {nslots}) (k_pool.shape[2] = {nslots})"
        )
    if what == "cur_valid":
        idx, s = first((cur_valid < 0) | (cur_valid > BT))
        raise ValueError(f"cur_valid{s} = {int(cur_valid[tuple(idx)])} must be in [0, {BT}] (block_tokens)")
    if what == "cur_full":
        idx, s = first(cur_valid != BT)
        raise ValueError(
            f"cur_valid{s} = {int(cur_valid[tuple(idx)])} but spec.has_padding is False: every "
            f"block must hold {BT} real tokens (use a spec with has_padding=True)"
        )
    if what == "slot_valid":
        idx, s = first((slot_valid < 0) | (slot_valid > BT))
        raise ValueError(f"slot_valid{s} = {int(slot_valid[tuple(idx)])} must be in [0, {BT}] (block_tokens)")
    if what in ("visited_valid", "visited_full"):
        cond = (sv < 0) | (sv > BT) if what == "visited_valid" else sv != BT
        idx, s = first(used & cond)
        slot = int(safe[tuple(idx)])
        b, h = idx[0], idx[1]
        allowed = f"in [0, {BT}]" if what == "visited_valid" else f"{BT} because spec.has_padding is False"
        raise ValueError(
            f"slot_valid[{b}, {h // spec.group_size}, {slot}] = {int(sv[tuple(idx)])} for the slot "
            f"visited at visit_slots{s}; must be {allowed}"
        )
    if what == "dups":
        d = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        idx, s = first(d)
        raise ValueError(
            f"visit_slots[{', '.join(map(str, idx[:3]))}] visits pool slot {int(srt[tuple(idx)])} "
            f"twice; each query block may visit a slot at most once"
        )
    raise AssertionError(what)  # pragma: no cover


def check_scale(scale) -> float:
    import math

    if scale is None:
        return None
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale = {scale!r} must be a finite float or None") from None
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale = {scale!r} must be a finite float > 0 or None (1/sqrt(head_dim))")
    return s
