"""The transposed schedule for dK/dV: per key block, the query blocks that read it.

Items are (b, kv head, j) with j in [0, NJ): j < NQB is current-chunk block j,
j >= NQB is pool slot j - NQB (present only when pool gradients are needed).
Built on the device with one stable sort (no Python loop over blocks), so the
visitor order of every item is fixed by the forward tables: the dK/dV sums are
deterministic.

Returns a CSR structure: `visitors[row_ptr[i]:row_ptr[i+1]]` holds h * NQB + qb
for every query block (b, h, qb) visiting item i, and `item_order` lists the
items longest first (so long programs start early and short ones fill the tail).

Everything that depends only on the spec and shapes (the current segment's
entries, the visitor ids, the per-head key offsets) is cached per device, so a
call costs about eight small kernels; without pool items (pool detached, the
usual training case) the whole schedule is static and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools
import os

import torch
import triton
import triton.language as tl

from .kernel_spec import AttentionKernelSpec

_STATIC: dict = {}
# How schedules with pool items are built: "marks" (two Triton kernels: mark every (item,
# visitor) pair in a byte matrix, then compact each item's row in visitor order) or
# "sort" (one stable torch.sort of all entries). Both give the same CSR; tests compare them.
BUILDER = "marks"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class TransposedSchedule:
    item_order: torch.Tensor  # int32 [n_items]
    row_ptr: torch.Tensor  # int32 [n_items + 1]
    visitors: torch.Tensor  # int32 [n_entries (+ padding)]
    num_items_per_head: int  # NJ
    num_items: int


def _static_parts(spec: AttentionKernelSpec, B: int, NJ: int, include_pool: bool, device):
    """(current keys, all visitor ids, pool key base, column index): static per shape."""
    key = (spec, B, NJ, include_pool, str(device))
    hit = _STATIC.get(key)
    if hit is not None:
        return hit
    H, HKV, NQB, G = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks, spec.group_size
    MAXV = spec.max_cached_visits
    i32 = torch.int32
    qb = torch.arange(NQB, device=device)
    j = torch.arange(NQB, device=device)
    if spec.current == "dense":
        allowed = torch.ones(NQB, NQB, dtype=torch.bool, device=device)
    else:
        ncur = (qb // spec.blocks_per_frame + 1) * spec.blocks_per_frame
        allowed = j[None, :] < ncur[:, None]  # [qb, j]
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    qq = qb.view(1, 1, NQB, 1)
    mask = allowed.view(1, 1, NQB, NQB).expand(B, H, NQB, NQB)
    cur_keys = ((b * HKV + h // G) * NJ + j.view(1, 1, 1, NQB)).expand(B, H, NQB, NQB)[mask]
    cur_vals = (h * NQB + qq).expand(B, H, NQB, NQB)[mask]
    pool_base = col = None
    vals = cur_vals
    if include_pool and MAXV > 0:
        pool_base = ((b * HKV + h // G) * NJ + NQB).to(i32)  # [B,H,1,1]
        col = torch.arange(MAXV, device=device, dtype=i32)
        vals = torch.cat([cur_vals, (h * NQB + qq).expand(B, H, NQB, MAXV).reshape(-1)])
    out = (cur_keys.to(i32), vals.to(i32).contiguous(), pool_base, col)
    if len(_STATIC) > 64:
        _STATIC.clear()
    _STATIC[key] = out
    return out


def build_transposed_schedule(
    spec: AttentionKernelSpec,
    visit_slots: torch.Tensor,
    visit_count: torch.Tensor,
    nslots: int,
    include_pool: bool,
) -> TransposedSchedule:
    B = visit_slots.shape[0]
    NQB = spec.num_query_blocks
    device = visit_slots.device
    include_pool = include_pool and nslots > 0
    NJ = NQB + (nslots if include_pool else 0)
    n_items = B * spec.num_kv_heads * NJ
    if not include_pool:
        # only the chunk's own blocks: the visitors follow from the spec alone (the usual
        # training case, pool detached), so the whole schedule is built once per shape
        key = (spec, B, str(device), "current-only")
        hit = _STATIC.get(key)
        if hit is None:
            hit = _sort_into_csr(*_static_parts(spec, B, NJ, False, device)[:2], n_items, NJ, device)
            _STATIC[key] = hit
        return hit
    if BUILDER == "marks" and (device.type == "cuda" or _interpreting()) and spec.max_cached_visits > 0:
        return _marks_into_csr(spec, visit_slots, visit_count, n_items, NJ)
    cur_keys, vals, pool_base, col = _static_parts(spec, B, NJ, include_pool, device)
    keys = cur_keys
    if pool_base is not None:
        used = col < visit_count[..., None]  # [B,H,NQB,MAXV]
        pkeys = torch.where(used, pool_base + visit_slots, n_items)  # unused entries sort last
        keys = torch.cat([cur_keys, pkeys.reshape(-1)])
    return _sort_into_csr(keys, vals, n_items, NJ, device)


def _sort_into_csr(keys, vals, n_items: int, NJ: int, device) -> TransposedSchedule:
    """Group the (item key, visitor) entries by item with one stable sort (visitor order kept)."""
    bounds = torch.arange(n_items + 1, device=device, dtype=torch.int32)
    sorted_keys, perm = torch.sort(keys, stable=True)
    visitors = vals[perm]
    row_ptr = torch.searchsorted(sorted_keys, bounds, out_int32=True)  # CSR offsets, no atomics
    counts = row_ptr[1:] - row_ptr[:-1]
    item_order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    if visitors.numel() == 0:
        visitors = torch.zeros(1, dtype=torch.int32, device=device)
    return TransposedSchedule(
        item_order=item_order,
        row_ptr=row_ptr,
        visitors=visitors,
        num_items_per_head=NJ,
        num_items=n_items,
    )


@triton.jit
def _mark_visits_kernel(VISIT_SLOTS, VISIT_COUNT, MARKS, NJ, V, MAXV,
                        H: tl.constexpr, HKV: tl.constexpr, NQB: tl.constexpr, NB: tl.constexpr,
                        CAUSAL: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """Query block row = (b, h, qb): MARKS[item, g * NQB + qb] = 1 for every key block it reads
    (current blocks [0, n_cur) and its visited pool slots). Each mark has one writer."""
    row = tl.program_id(0)
    qb = row % NQB
    h = (row // NQB) % H
    b = row // (NQB * H)
    G: tl.constexpr = H // HKV
    col = (h % G) * NQB + qb
    base = (b * HKV + h // G) * NJ
    j = tl.arange(0, BLOCK_J)
    if CAUSAL:
        n_cur = (qb // NB + 1) * NB
    else:
        n_cur = NQB
    tl.store(MARKS + (base + j).to(tl.int64) * V + col, tl.full([BLOCK_J], 1, tl.int8), mask=j < n_cur)
    c = tl.arange(0, BLOCK_C)
    used = c < tl.load(VISIT_COUNT + row)
    slot = tl.load(VISIT_SLOTS + row.to(tl.int64) * MAXV + c, mask=used, other=0)
    tl.store(MARKS + (base + NQB + slot).to(tl.int64) * V + col, tl.full([BLOCK_C], 1, tl.int8), mask=used)


@triton.jit
def _compact_marks_kernel(MARKS, ROW_PTR, VISITORS, NJ, V, HKV: tl.constexpr, NQB: tl.constexpr,
                          G: tl.constexpr, BLOCK_V: tl.constexpr):
    """Item row of MARKS -> its visitors h * NQB + qb, ascending, at VISITORS[ROW_PTR[item]:]."""
    item = tl.program_id(0)
    v = tl.arange(0, BLOCK_V)
    m = tl.load(MARKS + item.to(tl.int64) * V + v, mask=v < V, other=0).to(tl.int32)
    pos = tl.cumsum(m, 0) - 1
    visitor = ((item // NJ) % HKV) * (G * NQB) + v  # (hkv * G + g) * NQB + qb
    tl.store(VISITORS + tl.load(ROW_PTR + item) + pos, visitor, mask=m != 0)


@functools.lru_cache(maxsize=256)
def _entry_bound(spec: AttentionKernelSpec, B: int, MAXV: int) -> int:
    """Upper bound of the CSR entries (no host sync): every current pair + every table column."""
    H, NQB = spec.num_heads, spec.num_query_blocks
    cur = sum(spec.current_blocks_visible(qb) for qb in range(NQB))
    return max(B * H * (cur + NQB * MAXV), 1)


def _marks_into_csr(spec: AttentionKernelSpec, visit_slots, visit_count, n_items: int, NJ: int):
    """The CSR without a sort: mark, count, scan, compact (deterministic: no atomics)."""
    B, H, NQB, MAXV = visit_slots.shape
    device = visit_slots.device
    G = spec.group_size
    V = G * NQB  # visitor columns per item: the query blocks of the kv head's group
    marks = torch.zeros(n_items, V, dtype=torch.int8, device=device)
    _mark_visits_kernel[(B * H * NQB,)](
        visit_slots, visit_count, marks, NJ, V, MAXV,
        H=H, HKV=spec.num_kv_heads, NQB=NQB, NB=spec.blocks_per_frame,
        CAUSAL=spec.current == "causal", BLOCK_J=triton.next_power_of_2(NQB),
        BLOCK_C=triton.next_power_of_2(MAXV), num_warps=1)
    counts = marks.sum(dim=1, dtype=torch.int32)
    row_ptr = torch.zeros(n_items + 1, dtype=torch.int32, device=device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    visitors = torch.empty(_entry_bound(spec, B, MAXV), dtype=torch.int32, device=device)
    _compact_marks_kernel[(n_items,)](
        marks, row_ptr, visitors, NJ, V, HKV=spec.num_kv_heads, NQB=NQB, G=G,
        BLOCK_V=triton.next_power_of_2(V), num_warps=1 if V <= 256 else 4)
    item_order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    return TransposedSchedule(item_order=item_order, row_ptr=row_ptr, visitors=visitors,
                              num_items_per_head=NJ, num_items=n_items)
