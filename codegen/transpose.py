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
call costs about eight small kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernel_spec import AttentionKernelSpec

_STATIC: dict = {}


@dataclass
class TransposedSchedule:
    item_order: torch.Tensor  # int32 [n_items]
    row_ptr: torch.Tensor  # int32 [n_items + 1]
    visitors: torch.Tensor  # int32 [n_entries (+ padding)]
    num_items_per_head: int  # NJ
    num_items: int


def _static_parts(spec: AttentionKernelSpec, B: int, NJ: int, include_pool: bool, device):
    """(current keys, all visitor ids, pool key base, column index, bounds): static per shape."""
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
    n_items = B * HKV * NJ
    out = (
        cur_keys.to(i32),
        vals.to(i32).contiguous(),
        pool_base,
        col,
        torch.arange(n_items + 1, device=device, dtype=i32),
    )
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
    cur_keys, vals, pool_base, col, bounds = _static_parts(spec, B, NJ, include_pool, device)
    keys = cur_keys
    if pool_base is not None:
        used = col < visit_count[..., None]  # [B,H,NQB,MAXV]
        pkeys = torch.where(used, pool_base + visit_slots, n_items)  # unused entries sort last
        keys = torch.cat([cur_keys, pkeys.reshape(-1)])
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
