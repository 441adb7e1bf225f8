"""The PBSA forward on Hopper (sm_90) in Gluon: FlashAttention-3's overlap, by hand.

Why a second forward: `triton.language` on sm_90 (Triton 3.6) waits on every wgmma with 0
pending and runs no warp specialisation, so the generated Triton forward (templates/forward.py.jinja)
computes S = Q K^T, the softmax and O += P V one after the other (~470 TFLOP/s on an H100).
Gluon exposes the pieces FA3 uses: async wgmma with `warpgroup_mma_wait(num_outstanding)`,
TMA with mbarriers, and `gl.warp_specialize`. Measured on the same problem
(measured by a retired probe script; the numbers are in docs/benchmarks.md): ~600 TFLOP/s.

Structure of one program = one (batch, head, query block of 128 rows):
  - a 1-warp producer partition TMA-loads Q (two 64-row halves) and then the K/V tiles of
    the visit list into a STAGES-deep shared-memory ring (ready / empty mbarrier pairs per
    slot): first the chunk's own blocks [0, n_cur) from k_cur / v_cur, then the visited pool
    slots VISIT_SLOTS[b, h, qb, :VISIT_COUNT[b, h, qb]] from k_pool / v_pool, read in place;
  - two 4-warp consumer partitions, 64 query rows each, run the intra-warpgroup pipeline:
    issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back (async), wait with 1
    outstanding (S_j done), compute the softmax of tile j while the PV wgmma runs, wait 0
    and rescale O. P stays in registers as the A operand. The two consumers drift against
    each other, so one's softmax also runs under the other's matmuls.

Blocks of 64 tokens (the presets' 8x8 tiles) have a second kernel, `pbsa_fwd_gluon64_kernel`:
one consumer warpgroup per query block (64 rows) and a producer warp, two programs per SM
(their softmaxes run under each other's matmuls), and padding: real tokens are a prefix of
each block (`cur_valid`, `slot_valid`); padded key columns are masked out of the softmax,
the padded rows of a partial V tile are zeroed in shared memory before its matmul (a
non-finite value there must not turn into 0 * inf), padded query rows get O = 0, LSE = -inf.

Scope (`supported`): sm_90, bf16/fp16, head dim 128, 128-token blocks without padding or
64-token blocks with or without it, no explicit KV splits; everything else takes the
generated Triton forward. Same contract as that forward: O in the input dtype, LSE in fp32
natural log, the same visit order (current blocks, then pool slots), GQA (query head h
reads kv head h // G), dense or causal current chunk.
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon ships with Triton >= 3.5; without it every call takes the Triton forward
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
    CONSUMER_REGS = gl.constexpr(240)
    PRODUCER_REGS = gl.constexpr(24)
    MASKED = gl.constexpr(-1.0e30)  # finite: a fully masked tile never makes inf - inf
except Exception:  # pragma: no cover - older Triton
    HAVE_GLUON = False

BLOCK_TOKENS = 128
SMALL_BLOCK_TOKENS = 64
SMALL_STAGES = 2  # 64-token kernel: 2 x 2 x 16 KB ring + 16 KB of Q: two programs per SM
SMALL_MAXNREG = 128
HEAD_DIM = 128
HALF = 64  # query rows per consumer warpgroup
STAGES = 3  # K/V ring depth: 3 x 2 x 32 KB + 2 x 16 KB of Q = 224 KB of shared memory
LOG2E = 1.4426950408889634
# registers: the kernel launches at maxnreg 168 and the partitions re-balance, two consumer
# warpgroups to 240 per thread and the producer warp to 24 (CONSUMER_REGS / PRODUCER_REGS)
MAXNREG = 168


def supported(spec, q: torch.Tensor, tensors) -> bool:
    """Whether the Gluon forward handles this call (else the generated Triton forward)."""
    if not (HAVE_GLUON and q.is_cuda):
        return False
    if spec.head_dim != HEAD_DIM:
        return False
    if not (spec.block_tokens == SMALL_BLOCK_TOKENS
            or (spec.block_tokens == BLOCK_TOKENS and not spec.has_padding)):
        return False
    if spec.dtype not in ("bfloat16", "float16"):
        return False
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())[0] != 9:
        return False
    rows = max(t.numel() // HEAD_DIM for t in tensors)
    return rows < 2**31 and all(t.data_ptr() % 16 == 0 and t.is_contiguous() for t in tensors)


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


if HAVE_GLUON:

    @gluon.constexpr_function
    def _mma_layout(num_warps, n):
        # one wgmma per 16 rows x n columns; warps stacked along M so that a row's max and
        # sum stay inside one warp
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                         instr_shape=[16, n, 16])

    @gluon.jit
    def _softmax_step(s, m_i, l_i, qk_scale):
        """Online softmax in log2 units: P (fp32), new row max and sum, the rescale factor."""
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _alloc_ring(kv_desc, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        """The Q barrier and the K/V ring: STAGES tiles of K and of V, a ready barrier per slot
        (TMA arrival) and an empty barrier per slot that every consumer partition releases."""
        k_bufs = gl.allocate_shared_memory(kv_desc.dtype, [STAGES] + kv_desc.block_type.shape, kv_desc.layout)
        v_bufs = gl.allocate_shared_memory(kv_desc.dtype, [STAGES] + kv_desc.block_type.shape, kv_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=CONSUMERS)
            mbarrier.init(v_empty.index(i), count=CONSUMERS)
        return q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty

    @gluon.jit
    def _producer(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_bufs, k_bufs, v_bufs, q_bar,
                  k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row, n_cur, n,
                  STAGES: gl.constexpr):
        BN: gl.constexpr = kc_desc.block_type.shape[0]
        QROWS: gl.constexpr = q_desc.block_type.shape[0]
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_bufs.index(0))
        tma.async_copy_global_to_shared(q_desc, [q_row0 + QROWS, 0], q_bar, q_bufs.index(1))
        for t in range(n):
            slot = t % STAGES
            # an empty barrier starts with its previous phase complete: the first STAGES waits pass
            ph = ((t // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(slot), ph)
            mbarrier.expect(k_ready.index(slot), kc_desc.block_type.nbytes)
            if t < n_cur:  # the chunk's own block t
                row = cur_row0 + t * BN
                tma.async_copy_global_to_shared(kc_desc, [row, 0], k_ready.index(slot), k_bufs.index(slot))
            else:  # a visited pool slot, read in place
                row = pool_row0 + gl.load(vis_row + (t - n_cur)) * BN
                tma.async_copy_global_to_shared(kp_desc, [row, 0], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), ph)
            mbarrier.expect(v_ready.index(slot), vc_desc.block_type.nbytes)
            if t < n_cur:
                tma.async_copy_global_to_shared(vc_desc, [row, 0], v_ready.index(slot), v_bufs.index(slot))
            else:
                tma.async_copy_global_to_shared(vp_desc, [row, 0], v_ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_ptr, lse_ptr,
                  q_row0, n, qk_scale, WG: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: query rows [WG * 64, WG * 64 + 64) of the block against every tile."""
        BM: gl.constexpr = q_bufs.type.shape[1]
        BN: gl.constexpr = k_bufs.type.shape[1]
        HEAD: gl.constexpr = k_bufs.type.shape[2]
        s_layout: gl.constexpr = _mma_layout(4, BN)
        o_layout: gl.constexpr = _mma_layout(4, HEAD)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        q_smem = q_bufs.index(WG)

        # tile 0: S_0, softmax -> P_0
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                              gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.full([BM], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BM], gl.float32, row_l)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
        p = gl.convert_layout(p.to(k_bufs.dtype), p_layout)
        acc = gl.zeros([BM, HEAD], gl.float32, o_layout)

        for j in range(1, n):
            slot = j % STAGES
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            pslot = (j - 1) % STAGES
            mbarrier.wait(v_ready.index(pslot), ((j - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p, v_bufs.index(pslot), acc, is_async=True)
            # wgmma groups retire in order: 1 outstanding = S_j done, PV_{j-1} may still run
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(slot), count=1)  # K_j read: the producer may refill
            p_f, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
            p_next = gl.convert_layout(p_f.to(k_bufs.dtype), p_layout)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))  # P_{j-1} lives until its PV retires
            p = p_next
            mbarrier.arrive(v_empty.index(pslot), count=1)  # V_{j-1} read
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]

        last = (n - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(last), count=1)

        # epilogue: O = acc / l in the input dtype, LSE = (m + log2 l) * ln 2
        m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        rows = q_row0 + WG * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD, layout=gl.SliceLayout(0, o_layout))
        o = acc / l_o[:, None]
        gl.store(o_ptr + rows.to(gl.int64)[:, None] * HEAD + cols[None, :], o.to(o_ptr.dtype.element_ty))
        gl.store(lse_ptr + rows, (m_o + gl.log2(l_o)) * 0.6931471805599453)

    @gluon.jit
    def pbsa_fwd_gluon_kernel(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, o_ptr, lse_ptr, vis_ptr, cnt_ptr,
                              qk_scale, NSLOTS,
                              H: gl.constexpr, HKV: gl.constexpr, NQB: gl.constexpr, NB: gl.constexpr,
                              MAXV: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
        BN: gl.constexpr = kc_desc.block_type.shape[0]
        pid = gl.program_id(0)
        bh = gl.program_id(1)  # b * H + h
        if CAUSAL:
            qb = NQB - 1 - pid  # later frames see more blocks: start them first
            n_cur = (qb // NB + 1) * NB
        else:
            qb = pid
            n_cur = NQB
        bhkv = (bh // H) * HKV + (bh % H) // (H // HKV)
        q_row0 = (bh * NQB + qb) * BN
        cur_row0 = bhkv * NQB * BN
        pool_row0 = bhkv * NSLOTS * BN
        vis_row = vis_ptr + (bh * NQB + qb).to(gl.int64) * MAXV
        n = n_cur + gl.load(cnt_ptr + bh * NQB + qb)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty = _alloc_ring(kc_desc, STAGES, 2)

        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_ptr, lse_ptr, q_row0, n, qk_scale, 0, STAGES)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_ptr, lse_ptr, q_row0, n, qk_scale, 1, STAGES)),
            (_producer, (q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_bufs, k_bufs, v_bufs, q_bar,
                         k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row,
                         n_cur, n, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


    # ------------------------------------------------------------------------------------
    # 64-token blocks, with padding
    # ------------------------------------------------------------------------------------
    @gluon.jit
    def _visit_valid(v, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS):
        """Real tokens of visit v (current block v, or pool slot vis_row[v - n_cur]); 0 past the list."""
        cv = gl.load(cur_valid_ptr + gl.minimum(v, n_cur - 1))
        p = gl.maximum(gl.minimum(v - n_cur, cnt - 1), 0)
        slot = gl.minimum(gl.maximum(gl.load(vis_row + p), 0), NSLOTS - 1)
        pv = gl.load(sv_row + slot)
        return gl.where(v < n, gl.where(v < n_cur, cv, pv), 0)

    @gluon.jit
    def _load_visit(cur_desc, pool_desc, dst, bar, v, n_cur, cur_row0, pool_row0, vis_row):
        """TMA one block of visit v (current block v, or a pool slot read in place) into dst."""
        BN: gl.constexpr = cur_desc.block_type.shape[0]
        if v < n_cur:
            tma.async_copy_global_to_shared(cur_desc, [cur_row0 + v * BN, 0], bar, dst)
        else:
            row = pool_row0 + gl.load(vis_row + (v - n_cur)) * BN
            tma.async_copy_global_to_shared(pool_desc, [row, 0], bar, dst)

    @gluon.jit
    def _producer64(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_smem, k_bufs, v_bufs, q_bar,
                    k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row, n_cur, n,
                    STAGES: gl.constexpr):
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
        for t in range(n):
            slot = t % STAGES
            ph = ((t // STAGES) & 1) ^ 1  # empty barriers start with their previous phase complete
            mbarrier.wait(k_empty.index(slot), ph)
            mbarrier.expect(k_ready.index(slot), kc_desc.block_type.nbytes)
            _load_visit(kc_desc, kp_desc, k_bufs.index(slot), k_ready.index(slot), t, n_cur, cur_row0,
                        pool_row0, vis_row)
            mbarrier.wait(v_empty.index(slot), ph)
            mbarrier.expect(v_ready.index(slot), vc_desc.block_type.nbytes)
            _load_visit(vc_desc, vp_desc, v_bufs.index(slot), v_ready.index(slot), t, n_cur, cur_row0,
                        pool_row0, vis_row)

    @gluon.jit
    def _masked_softmax_step(s, keep, m_i, l_i, qk_scale):
        """Online softmax in log2 units over the real key columns `keep` only."""
        s = gl.where(keep[None, :], s * qk_scale, MASKED)
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.where(keep[None, :], gl.exp2(s - m_new[:, None]), 0.0)
        return p, m_new, l_i * alpha + gl.sum(p, axis=1), alpha

    @gluon.jit
    def _zero_padded_rows(v_tile, n_valid, BN: gl.constexpr, HEAD: gl.constexpr):
        """Zero rows [n_valid, BN) of a V tile in shared memory (only partial tiles pay)."""
        if n_valid < BN:
            blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
            x = v_tile.load(blocked)
            r = gl.arange(0, BN, layout=gl.SliceLayout(1, blocked))
            v_tile.store(gl.where((r < n_valid)[:, None], x, gl.zeros_like(x)))
            fence_async_shared()  # the wgmma reads shared memory through the async proxy

    @gluon.jit
    def _consumer64(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_ptr, lse_ptr,
                    cur_valid_ptr, sv_row, vis_row, q_row0, q_valid, n_cur, n, cnt, qk_scale, NSLOTS,
                    STAGES: gl.constexpr):
        """The program's 64 query rows against every visited block, masks included."""
        BM: gl.constexpr = q_smem.type.shape[0]
        BN: gl.constexpr = k_bufs.type.shape[1]
        HEAD: gl.constexpr = k_bufs.type.shape[2]
        s_layout: gl.constexpr = _mma_layout(4, BN)
        o_layout: gl.constexpr = _mma_layout(4, HEAD)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))

        valid = _visit_valid(0, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS)
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                              gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i = gl.full([BM], float("-inf"), gl.float32, row_l)
        l_i = gl.zeros([BM], gl.float32, row_l)
        p, m_i, l_i, alpha = _masked_softmax_step(s, cols < valid, m_i, l_i, qk_scale)
        p = gl.convert_layout(p.to(k_bufs.dtype), p_layout)
        acc = gl.zeros([BM, HEAD], gl.float32, o_layout)

        for j in range(1, n):
            slot = j % STAGES
            valid_prev = valid
            valid = _visit_valid(j, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS)
            mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            pslot = (j - 1) % STAGES
            mbarrier.wait(v_ready.index(pslot), ((j - 1) // STAGES) & 1)
            _zero_padded_rows(v_bufs.index(pslot), valid_prev, BN, HEAD)
            acc_tok = warpgroup_mma(p, v_bufs.index(pslot), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(slot), count=1)
            p_f, m_i, l_i, alpha = _masked_softmax_step(s, cols < valid, m_i, l_i, qk_scale)
            p_next = gl.convert_layout(p_f.to(k_bufs.dtype), p_layout)
            acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
            p = p_next
            mbarrier.arrive(v_empty.index(pslot), count=1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]

        last = (n - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n - 1) // STAGES) & 1)
        _zero_padded_rows(v_bufs.index(last), valid, BN, HEAD)
        acc_tok = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(last), count=1)

        # epilogue: real rows O = acc / l and LSE = (m + log2 l) * ln 2; padded rows 0 and -inf
        m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        r = gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
        hd = gl.arange(0, HEAD, layout=gl.SliceLayout(0, o_layout))
        row_ok = r < q_valid
        o = gl.where(row_ok[:, None], acc / l_o[:, None], 0.0)
        rows = q_row0 + r
        gl.store(o_ptr + rows.to(gl.int64)[:, None] * HEAD + hd[None, :], o.to(o_ptr.dtype.element_ty))
        gl.store(lse_ptr + rows, gl.where(row_ok, (m_o + gl.log2(l_o)) * 0.6931471805599453, float("-inf")))

    @gluon.jit
    def pbsa_fwd_gluon64_kernel(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, o_ptr, lse_ptr, cur_valid_ptr,
                                slot_valid_ptr, vis_ptr, cnt_ptr, qk_scale, NSLOTS,
                                H: gl.constexpr, HKV: gl.constexpr, NQB: gl.constexpr, NB: gl.constexpr,
                                MAXV: gl.constexpr, CAUSAL: gl.constexpr, STAGES: gl.constexpr):
        BN: gl.constexpr = kc_desc.block_type.shape[0]
        pid = gl.program_id(0)
        bh = gl.program_id(1)  # b * H + h
        if CAUSAL:
            qb = NQB - 1 - pid  # later frames see more blocks: start them first
            n_cur = (qb // NB + 1) * NB
        else:
            qb = pid
            n_cur = NQB
        bhkv = (bh // H) * HKV + (bh % H) // (H // HKV)
        q_row0 = (bh * NQB + qb) * BN
        cur_row0 = bhkv * NQB * BN
        pool_row0 = bhkv * NSLOTS * BN
        vis_row = vis_ptr + (bh * NQB + qb).to(gl.int64) * MAXV
        sv_row = slot_valid_ptr + bhkv * NSLOTS
        cnt = gl.load(cnt_ptr + bh * NQB + qb)
        q_valid = gl.load(cur_valid_ptr + qb)
        n = n_cur + cnt

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        q_bar, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty = _alloc_ring(kc_desc, STAGES, 1)

        gl.warp_specialize([
            (_consumer64, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_ptr, lse_ptr,
                           cur_valid_ptr, sv_row, vis_row, q_row0, q_valid, n_cur, n, cnt, qk_scale, NSLOTS,
                           STAGES)),
            (_producer64, (q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_smem, k_bufs, v_bufs, q_bar,
                           k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row, n_cur, n,
                           STAGES)),
        ], [1], [PRODUCER_REGS])


def _descriptor(t: torch.Tensor, rows: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, HEAD_DIM], gdt)
    return TensorDescriptor.from_tensor(t.view(-1, HEAD_DIM), [rows, HEAD_DIM], layout)


def attention_forward(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                      visit_count, scale, o, lse):
    """Launch the Gluon forward into o [B, H, NQB, BT, D] and lse [B, H, NQB, BT] (see module doc).
    The caller checked `supported` and replaced an empty pool / visit table by dummies."""
    B, H, NQB = q.shape[:3]
    if spec.block_tokens == SMALL_BLOCK_TOKENS:
        bt = SMALL_BLOCK_TOKENS
        pbsa_fwd_gluon64_kernel[(NQB, B * H)](
            _descriptor(q, bt), _descriptor(k_cur, bt), _descriptor(v_cur, bt),
            _descriptor(k_pool, bt), _descriptor(v_pool, bt),
            o, lse, cur_valid, slot_valid, visit_slots, visit_count, scale * LOG2E, k_pool.shape[2],
            H=H, HKV=spec.num_kv_heads, NQB=NQB, NB=spec.blocks_per_frame,
            MAXV=visit_slots.shape[-1], CAUSAL=spec.current == "causal", STAGES=SMALL_STAGES,
            num_warps=4, maxnreg=SMALL_MAXNREG)
        return o, lse
    pbsa_fwd_gluon_kernel[(NQB, B * H)](
        _descriptor(q, HALF), _descriptor(k_cur, BLOCK_TOKENS), _descriptor(v_cur, BLOCK_TOKENS),
        _descriptor(k_pool, BLOCK_TOKENS), _descriptor(v_pool, BLOCK_TOKENS),
        o, lse, visit_slots, visit_count, scale * LOG2E, k_pool.shape[2],
        H=H, HKV=spec.num_kv_heads, NQB=NQB, NB=spec.blocks_per_frame,
        MAXV=visit_slots.shape[-1], CAUSAL=spec.current == "causal", STAGES=STAGES,
        num_warps=4, maxnreg=MAXNREG)
    return o, lse
