"""PBSA attention in plain torch: the same contract as the generated kernels,
computed in float32. Runs anywhere (CPU included); differentiable through
ordinary autograd. It is the fallback backend, so it favours clarity over speed,
and walks the query blocks in chunks to bound the memory of the materialised
scores. Two ways to the same numbers:

- "gather": each query block gathers the pool slots it visits (work follows the
  visit count; many small products);
- "pool": each query block scores every pool slot in one matrix product and masks
  the slots it does not visit (work follows the pool size; a few large products);
  calls with a non-finite key or value take the gather path, which confines it to
  the rows that visit its block.
  Where the pool is not much larger than a query block's visits, as in the rollout
  caches of the presets, this is several times faster on a CPU.

"auto" picks by that ratio (`POOL_OVER_VISITS`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .kernel_spec import AttentionKernelSpec

_CHUNK_BYTES = 256 * 2**20
# "auto" scores the whole pool when it holds at most this many times a query block's visits
POOL_OVER_VISITS = 4
METHODS = ("auto", "gather", "pool")
_forced: str | None = None
# PyTorch's fused CPU attention returns (out, logsumexp); an aten op without a public
# wrapper, so looked up once and used only where it exists
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@contextlib.contextmanager
def use_method(method: str):
    """Force "gather" or "pool" (tests and benchmarks); "auto" restores the choice."""
    global _forced
    if method not in METHODS:
        raise ValueError(f"torch backend method = {method!r}; allowed: {', '.join(METHODS)}")
    previous, _forced = _forced, (None if method == "auto" else method)
    try:
        yield
    finally:
        _forced = previous


def choose_method(num_slots: int, max_visits: int) -> str:
    if _forced is not None:
        return _forced
    if num_slots == 0 or max_visits == 0:
        return "gather"
    return "pool" if num_slots <= POOL_OVER_VISITS * max_visits else "gather"


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
    args = (spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
            1.0 / math.sqrt(spec.head_dim) if scale is None else scale)
    if choose_method(k_pool.shape[2], spec.max_cached_visits) == "pool":
        out = _attention_over_pool(*args)
        if out is not None:
            return out
    return _attention_gathered(*args)


def _attention_gathered(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                        visit_slots, visit_count, scale):
    B = q.shape[0]
    H, HKV, NQB, G = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks, spec.group_size
    BT, D, MAXV = spec.block_tokens, spec.head_dim, spec.max_cached_visits
    NSLOTS = k_pool.shape[2]
    dev = q.device
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


def _attention_over_pool(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                         visit_slots, visit_count, scale):
    """Every query block against [the chunk's blocks | every pool slot], masked to the
    blocks it may read: the causal rule for the chunk, the visit list for the pool.
    None when the output is not finite (see the end)."""
    B = q.shape[0]
    H, HKV, NQB, G = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks, spec.group_size
    BT, D, MAXV = spec.block_tokens, spec.head_dim, spec.max_cached_visits
    NSLOTS = k_pool.shape[2]
    NKB = NQB + NSLOTS
    dev, f32 = q.device, torch.float32
    head_kv = torch.arange(H, device=dev) // G
    tok = torch.arange(BT, device=dev)

    # which key blocks each query block reads: [B,H,NQB,NKB] (chunk blocks, then pool slots)
    used = torch.arange(MAXV, device=dev) < visit_count.long()[..., None]  # [B,H,NQB,MAXV]
    visited = torch.zeros(B, H, NQB, NSLOTS + 1, dtype=torch.bool, device=dev)
    visited.scatter_(-1, torch.where(used, visit_slots.long(), NSLOTS), True)  # unused -> spare column
    reads = torch.cat([current_block_mask(spec, dev).expand(B, H, NQB, NQB), visited[..., :NSLOTS]], -1)
    # which key tokens are real (not tile padding) and read by some query: [B,H,NKB*BT];
    # the others may hold anything (unused slots are never written), so they are zeroed
    cur_tok_ok = (tok[None, :] < cur_valid.long()[:, None]).expand(B, HKV, NQB, BT)
    pool_tok_ok = tok < slot_valid.long()[..., None]                       # [B,HKV,NSLOTS,BT]
    key_ok = torch.cat([cur_tok_ok, pool_tok_ok], 2).index_select(1, head_kv)
    key_ok = (key_ok & reads.any(2)[..., None]).reshape(B, H, NKB * BT)
    # keys and values of every block a query may read, per query head: [B,H,NKB*BT,D]
    keys = torch.cat([k_cur, k_pool], 2).to(f32).index_select(1, head_kv).reshape(B, H, NKB * BT, D)
    values = torch.cat([v_cur, v_pool], 2).to(f32).index_select(1, head_kv).reshape(B, H, NKB * BT, D)
    keys = torch.where(key_ok[..., None], keys, 0.0)
    values = torch.where(key_ok[..., None], values, 0.0)

    q_ok_all = tok[None, :] < cur_valid.long()[:, None]                     # [NQB, BT]
    # without gradients on a CPU, PyTorch's fused CPU attention (which also returns the
    # log-sum-exp) does the scoring without materialising the probabilities
    fused = (_CPU_FLASH is not None and dev.type == "cpu" and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cur, v_cur, k_pool, v_pool))))
    per_qb = B * H * BT * NKB * BT * 4 * 4
    step = max(1, min(NQB, _CHUNK_BYTES // max(per_qb, 1)))
    # a query block has some key when it reads a block with a real token: [B,H,NQB]
    block_any = (reads & key_ok.view(B, H, NKB, BT).any(-1)[:, :, None, :]).any(-1)
    if fused:   # additive masks: -inf where a block is not read or a token is padding
        block_bias = torch.zeros(reads.shape, dtype=f32, device=dev).masked_fill_(~reads, float("-inf"))
        key_bias = torch.zeros(key_ok.shape, dtype=f32, device=dev).masked_fill_(~key_ok, float("-inf"))
    outs, lses = [], []
    finite = True
    for q0 in range(0, NQB, step):
        q1 = min(NQB, q0 + step)
        n = q1 - q0
        qc = q[:, :, q0:q1].to(f32)
        qc = torch.where(q_ok_all[q0:q1][None, None, :, :, None], qc, 0.0).reshape(B, H, n * BT, D)
        row_any = block_any[:, :, q0:q1, None].expand(B, H, n, BT).reshape(B, H, n * BT)
        if fused:
            bias = block_bias[:, :, q0:q1, None, :, None] + key_bias.view(B, H, 1, 1, NKB, BT)
            bias = bias.expand(B, H, n, BT, NKB, BT).reshape(B, H, n * BT, NKB * BT)
            o, lse = _CPU_FLASH(qc, keys, values, 0.0, False, attn_mask=bias, scale=scale)
        else:
            m = reads[:, :, q0:q1, None, :, None].expand(B, H, n, BT, NKB, BT).reshape(B, H, n * BT, NKB * BT)
            m = m & key_ok[:, :, None, :]
            s = torch.matmul(qc, keys.transpose(-1, -2)) * scale            # [B,H,n*BT,NKB*BT]
            s = s.masked_fill(~m, float("-inf")).masked_fill(~row_any[..., None], 0.0)
            lse = torch.logsumexp(s, -1)                                     # [B,H,n*BT]
            p = torch.exp(s - lse[..., None]) * m
            o = torch.matmul(p, values)                                      # [B,H,n*BT,D]
        finite = finite and bool(torch.isfinite(o).all())
        q_ok = q_ok_all[q0:q1].reshape(1, 1, n * BT) & row_any
        outs.append(torch.where(q_ok[..., None], o, 0.0).reshape(B, H, n, BT, D))
        lses.append(torch.where(q_ok, lse, float("-inf")).reshape(B, H, n, BT))
    if not finite:
        # a NaN/inf key or value must reach exactly the rows that visit its block; in one
        # product over the pool it reaches every row (0 * nan, nan - inf), so such a call is
        # answered by the gather path. A finite output means nothing non-finite was read.
        return None
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)
