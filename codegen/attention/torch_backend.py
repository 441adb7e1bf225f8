"""PBSA attention in plain torch: the same contract as the generated kernels,
computed with gathers and float32 accumulation. Runs anywhere (CPU included);
differentiable through ordinary autograd. It is the fallback backend, so it
favours clarity over speed, and walks the query blocks in chunks to bound the
memory of the materialised scores.
"""

from __future__ import annotations

import math

import torch

from .kernel_spec import AttentionKernelSpec

_CHUNK_BYTES = 256 * 2**20


def current_block_mask(spec: AttentionKernelSpec, device=None) -> torch.Tensor:
    """Bool [NQB, NQB]: query block qb may read current-chunk block j."""
    NQB = spec.num_query_blocks
    j = torch.arange(NQB, device=device)
    ncur = torch.tensor([spec.current_blocks_visible(i) for i in range(NQB)], device=device)
    return j[None, :] < ncur[:, None]


def attention(
    spec: AttentionKernelSpec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
    visit_slots, visit_count, scale: float | None = None,
):
    """Returns (o [B,H,NQB,BT,D] in q.dtype, lse [B,H,NQB,BT] float32)."""
    B = q.shape[0]
    H, HKV, NQB, G = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks, spec.group_size
    BT, D, MAXV = spec.block_tokens, spec.head_dim, spec.max_cached_visits
    NSLOTS = k_pool.shape[2]
    dev = q.device
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    f32 = torch.float32
    head_kv = torch.arange(H, device=dev) // G
    tok = torch.arange(BT, device=dev)

    # current segment: keys of the chunk, expanded to query heads (zero padding tokens)
    cur_ok = tok[None, :] < cur_valid.long()[:, None]  # [NQB, BT]
    kc = k_cur.to(f32).index_select(1, head_kv)  # [B,H,NQB,BT,D]
    vc = v_cur.to(f32).index_select(1, head_kv)
    kc = torch.where(cur_ok[None, None, :, :, None], kc, 0.0)
    vc = torch.where(cur_ok[None, None, :, :, None], vc, 0.0)
    blk_mask = current_block_mask(spec, dev)  # [NQB(q), NQB(k)]

    # pool segment: visited slots gathered per (b, h, qb); unused entries read slot 0 and are zeroed
    used = torch.arange(MAXV, device=dev) < visit_count.long()[..., None]  # [B,H,NQB,MAXV]
    if NSLOTS > 0 and MAXV > 0:
        slots = torch.where(used, visit_slots.long(), 0)
        flat = (torch.arange(B, device=dev).view(B, 1, 1, 1) * HKV + head_kv.view(1, H, 1, 1)) * NSLOTS + slots
        sv = slot_valid.long().reshape(-1)[flat]  # [B,H,NQB,MAXV]
        pool_ok = used[..., None] & (tok < sv[..., None])  # [B,H,NQB,MAXV,BT]
    else:
        flat = None
        pool_ok = torch.zeros(B, H, NQB, MAXV, BT, dtype=torch.bool, device=dev)
    kp_flat = k_pool.reshape(-1, BT, D)
    vp_flat = v_pool.reshape(-1, BT, D)

    per_qb = B * H * BT * (NQB + MAXV) * BT * 4 * 3
    step = max(1, min(NQB, _CHUNK_BYTES // max(per_qb, 1)))
    q_ok_all = tok[None, :] < cur_valid.long()[:, None]  # [NQB, BT]
    outs, lses = [], []
    for q0 in range(0, NQB, step):
        q1 = min(NQB, q0 + step)
        n = q1 - q0
        qc = q[:, :, q0:q1].to(f32)  # [B,H,n,BT,D]
        qc = torch.where(q_ok_all[q0:q1][None, None, :, :, None], qc, 0.0)  # padded rows never matter
        s_cur = torch.einsum("bhqtd,bhjsd->bhqtjs", qc, kc) * scale  # [B,H,n,BT,NQB,BT]
        m_cur = blk_mask[q0:q1][:, None, :, None] & cur_ok[None, None, :, :]  # [n,1,NQB,BT]
        m_cur = m_cur[None, None].expand(B, H, n, BT, NQB, BT)
        s_cur = s_cur.reshape(B, H, n, BT, NQB * BT)
        m_cur = m_cur.reshape(B, H, n, BT, NQB * BT)
        if flat is not None:
            fl = flat[:, :, q0:q1]  # [B,H,n,MAXV]
            ok = pool_ok[:, :, q0:q1]  # [B,H,n,MAXV,BT]
            kg = torch.where(ok[..., None], kp_flat[fl].to(f32), 0.0)  # [B,H,n,MAXV,BT,D]
            vg = torch.where(ok[..., None], vp_flat[fl].to(f32), 0.0)
            s_pool = torch.einsum("bhqtd,bhqvsd->bhqtvs", qc, kg) * scale
            s_pool = s_pool.reshape(B, H, n, BT, MAXV * BT)
            m_pool = ok[:, :, :, None].expand(B, H, n, BT, MAXV, BT).reshape(B, H, n, BT, MAXV * BT)
            s = torch.cat([s_cur, s_pool], -1)
            m = torch.cat([m_cur, m_pool], -1)
        else:
            s, m = s_cur, m_cur
        row_any = m.any(-1, keepdim=True)
        s = torch.where(m, s, float("-inf"))
        s = torch.where(row_any, s, 0.0)  # rows with no key at all: keep finite, masked below
        lse = torch.logsumexp(s, -1)  # [B,H,n,BT]
        p = torch.exp(s - lse[..., None]) * m
        p_cur = p[..., : NQB * BT].reshape(B, H, n, BT, NQB, BT)
        o = torch.einsum("bhqtjs,bhjsd->bhqtd", p_cur, vc)
        if flat is not None:
            p_pool = p[..., NQB * BT:].reshape(B, H, n, BT, MAXV, BT)
            o = o + torch.einsum("bhqtvs,bhqvsd->bhqtd", p_pool, vg)
        else:  # no pool visits: keep the pool in the graph (exact zero gradient, like the kernels)
            o = o + (kp_flat[:0].sum() + vp_flat[:0].sum()).to(f32)
        q_ok = (q_ok_all[q0:q1][None, None] & row_any[..., 0])  # [B,H,n,BT]
        o = torch.where(q_ok[..., None], o, 0.0)
        lse = torch.where(q_ok, lse, float("-inf"))
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, 2).to(q.dtype)
    lse = torch.cat(lses, 2)
    return o, lse
