"""The PBSA forward on Hopper (sm_90) in Gluon: FlashAttention-3's overlap, by hand.

Why a second forward: `triton.language` on sm_90 (Triton 3.6) waits on every wgmma with 0
pending and runs no warp specialisation, so the generated Triton forward (codegen/render.py)
computes S = Q K^T, the softmax and O += P V one after the other (~470 TFLOP/s on an H100).
Gluon exposes the pieces FA3 uses: async wgmma with `warpgroup_mma_wait(num_outstanding)`,
TMA with mbarriers, and `gl.warp_specialize`. Measured on the same problem
(bench/gluon_fwd_probe.py, docs/benchmarks.md): ~600 TFLOP/s.

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

Scope (`supported`): sm_90, bf16/fp16, 128-token blocks, head dim 128, no padding (every
block full), no KV splits; everything else takes the generated Triton forward. Same
contract as that forward: O in the input dtype, LSE in fp32 natural log, the same visit
order (current blocks, then pool slots), GQA (query head h reads kv head h // G), dense
or causal current chunk.
"""
from __future__ import annotations

import functools

import torch

try:  # Gluon ships with Triton >= 3.5; without it every call takes the Triton forward
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    HAVE_GLUON = True
    CONSUMER_REGS = gl.constexpr(240)
    PRODUCER_REGS = gl.constexpr(24)
except Exception:  # pragma: no cover - older Triton
    HAVE_GLUON = False

BLOCK_TOKENS = 128
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
    if spec.block_tokens != BLOCK_TOKENS or spec.head_dim != HEAD_DIM or spec.has_padding:
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
        k_bufs = gl.allocate_shared_memory(kc_desc.dtype, [STAGES] + kc_desc.block_type.shape, kc_desc.layout)
        v_bufs = gl.allocate_shared_memory(vc_desc.dtype, [STAGES] + vc_desc.block_type.shape, vc_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
            mbarrier.init(v_empty.index(i), count=2)

        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_ptr, lse_ptr, q_row0, n, qk_scale, 0, STAGES)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         o_ptr, lse_ptr, q_row0, n, qk_scale, 1, STAGES)),
            (_producer, (q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_bufs, k_bufs, v_bufs, q_bar,
                         k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row,
                         n_cur, n, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _descriptor(t: torch.Tensor, rows: int):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gdt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, HEAD_DIM], gdt)
    return TensorDescriptor.from_tensor(t.view(-1, HEAD_DIM), [rows, HEAD_DIM], layout)


def attention_forward(spec, q, k_cur, v_cur, k_pool, v_pool, visit_slots, visit_count, scale, o, lse):
    """Launch the Gluon forward into o [B, H, NQB, BT, D] and lse [B, H, NQB, BT] (see module doc).
    The caller checked `supported` and replaced an empty pool / visit table by dummies."""
    B, H, NQB = q.shape[:3]
    pbsa_fwd_gluon_kernel[(NQB, B * H)](
        _descriptor(q, HALF), _descriptor(k_cur, BLOCK_TOKENS), _descriptor(v_cur, BLOCK_TOKENS),
        _descriptor(k_pool, BLOCK_TOKENS), _descriptor(v_pool, BLOCK_TOKENS),
        o, lse, visit_slots, visit_count, scale * LOG2E, k_pool.shape[2],
        H=H, HKV=spec.num_kv_heads, NQB=NQB, NB=spec.blocks_per_frame,
        MAXV=visit_slots.shape[-1], CAUSAL=spec.current == "causal", STAGES=STAGES,
        num_warps=4, maxnreg=MAXNREG)
    return o, lse
