"""Probe: does a Gluon forward (FA3-style overlap) beat our Triton forward on 64-token padded blocks?

    cd /work/main && PYTHONPATH=. python3 bench/gluon_fwd64_probe.py   # H100: check + time
    cd /work/main && PYTHONPATH=. python3 bench/gluon_fwd64_probe.py   # no GPU: compile for sm_90 only

Why: codegen/gluon_forward.py (TMA producer warp + two consumer warpgroups, async wgmma, the
softmax of tile j under the PV wgmma of tile j-1) reaches ~574 TFLOP/s vs 471 for the generated
Triton forward, but only for unpadded 128-token blocks. The model's real geometry is
Self-Forcing's: 30x52-token frames in 8x8 tiles = 64-token blocks with padding (bottom tile row
48 real tokens, right column 32, corner 24; real tokens are a prefix of each block). There the
Triton forward runs at ~392 TFLOP/s (bench/gpu_program.py --tune64). This script measures
whether the same Gluon structure pays on that geometry before anything is integrated.

Contract (same as codegen/render.py `pbsa_fwd_kernel`): q [B, H, NQB, 64, 128], k_cur / v_cur
[B, HKV, NQB, 64, 128], k_pool / v_pool [B, HKV, NSLOTS, 64, 128], bf16. Query block (b, h, qb)
visits the current blocks [0, NQB) (dense current) and then the pool slots
visit_slots[b, h, qb, :visit_count[b, h, qb]], one softmax over all; kv head = h // (H // HKV).
Padded key columns are masked to -1e30 before the max and their P is zeroed; padded query rows
get O = 0 and LSE = -inf; LSE in natural log; P via exp2 with scale * log2(e).

Kernel (one program per (b, h, query block of 64 rows), gl.warp_specialize):
  - a 1-warp producer partition TMA-loads Q (64 x 128) once, then the K / V tiles of the visit
    list into a STAGES-deep ring (ready / empty mbarrier pair per slot and operand). A tile is
    BPT blocks of 64 keys (BPT = 1: a 64-key tile; BPT = 2: two visited blocks side by side in one
    128-key tile, the second half loaded into the lower 64 rows of the buffer; an odd list ends
    with a duplicate block whose columns are all masked);
  - one 4-warp consumer partition (the default partition) runs FA3's intra-warpgroup pipeline:
    issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back (async), wait with 1 outstanding,
    mask + softmax tile j while the PV wgmma still runs, wait 0, rescale O. It reads the valid
    token count of each tile's block(s) itself (cur_valid[j] or slot_valid[b, hkv, slot]: one
    scalar load per block, issued before the tile's wgmma so its latency hides under it).
  With BPT = 1 and STAGES <= 3 a program needs <= 112 KB of shared memory, so two programs
  share an SM and one's softmax also runs under the other's matmuls (the role of the second
  consumer warpgroup in codegen/gluon_forward.py).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from codegen.gluon_forward import (  # noqa: E402  the integrated kernel's building blocks
    PRODUCER_REGS,
    _masked_softmax_step,
    _mma_layout,
    _visit_valid,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gluon_fwd_probe import Watchdog  # noqa: E402

BLK = 64  # tokens per block (query rows of a program, keys per visited block)
HEAD_D = 128
LOG2E = 1.4426950408889634


# -------------------------------------------------------------------------
# kernel
# -------------------------------------------------------------------------




@gluon.jit
def _load_block(kc_desc, kp_desc, dst, bar, v, n_cur, n, cur_row0, pool_row0, vis_row):
    """TMA one 64-row block of visit v (clamped to the last visit) into dst, arriving on bar."""
    BN: gl.constexpr = kc_desc.block_type.shape[0]
    v = gl.minimum(v, n - 1)
    if v < n_cur:  # the chunk's own block v
        tma.async_copy_global_to_shared(kc_desc, [cur_row0 + v * BN, 0], bar, dst)
    else:  # a visited pool slot, read in place
        row = pool_row0 + gl.load(vis_row + (v - n_cur)) * BN
        tma.async_copy_global_to_shared(kp_desc, [row, 0], bar, dst)


@gluon.jit
def _producer(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_smem, k_bufs, v_bufs, q_bar,
              k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row, n_cur, n,
              n_tiles, STAGES: gl.constexpr, BPT: gl.constexpr):
    BN: gl.constexpr = kc_desc.block_type.shape[0]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
    for t in range(n_tiles):
        slot = t % STAGES
        ph = ((t // STAGES) & 1) ^ 1  # empty barriers start "previous phase complete"
        mbarrier.wait(k_empty.index(slot), ph)
        mbarrier.expect(k_ready.index(slot), BPT * kc_desc.block_type.nbytes)
        for i in gl.static_range(BPT):
            _load_block(kc_desc, kp_desc, k_bufs.index(slot).slice(i * BN, BN), k_ready.index(slot),
                        t * BPT + i, n_cur, n, cur_row0, pool_row0, vis_row)
        mbarrier.wait(v_empty.index(slot), ph)
        mbarrier.expect(v_ready.index(slot), BPT * vc_desc.block_type.nbytes)
        for i in gl.static_range(BPT):
            _load_block(vc_desc, vp_desc, v_bufs.index(slot).slice(i * BN, BN), v_ready.index(slot),
                        t * BPT + i, n_cur, n, cur_row0, pool_row0, vis_row)


@gluon.jit
def _tile_keep(t, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS,
               BPT: gl.constexpr, BLOCK: gl.constexpr, col_l: gl.constexpr):
    """Bool [BPT * BLOCK] over the key columns of tile t: True where the key is a real token."""
    cols = gl.arange(0, BPT * BLOCK, layout=col_l)
    v0 = _visit_valid(t * BPT, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS)
    if BPT == 1:
        keep = cols < v0
    else:
        v1 = _visit_valid(t * BPT + 1, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS)
        keep = gl.where(cols < BLOCK, cols < v0, (cols - BLOCK) < v1)
    return keep




@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_ptr, lse_ptr,
              cur_valid_ptr, sv_row, vis_row, q_row0, q_valid, n_cur, n, cnt, n_tiles, qk_scale, NSLOTS,
              STAGES: gl.constexpr, BPT: gl.constexpr):
    """The 64 query rows of the program against every tile of the visit list."""
    BM: gl.constexpr = q_smem.type.shape[0]
    BN: gl.constexpr = k_bufs.type.shape[1]
    HEAD: gl.constexpr = k_bufs.type.shape[2]
    BLOCK: gl.constexpr = BN // BPT
    s_layout: gl.constexpr = _mma_layout(4, BN)
    o_layout: gl.constexpr = _mma_layout(4, HEAD)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)

    # tile 0: S_0, softmax -> P_0
    keep = _tile_keep(0, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS, BPT, BLOCK, col_l)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                          gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    mbarrier.arrive(k_empty.index(0), count=1)
    m_i = gl.full([BM], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BM], gl.float32, row_l)
    p, m_i, l_i, alpha = _masked_softmax_step(s, keep, m_i, l_i, qk_scale)
    p = gl.convert_layout(p.to(k_bufs.dtype), p_layout)
    acc = gl.zeros([BM, HEAD], gl.float32, o_layout)

    for j in range(1, n_tiles):
        slot = j % STAGES
        keep = _tile_keep(j, n_cur, n, cnt, cur_valid_ptr, sv_row, vis_row, NSLOTS, BPT, BLOCK, col_l)
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)),
                              gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        pslot = (j - 1) % STAGES
        mbarrier.wait(v_ready.index(pslot), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_bufs.index(pslot), acc, is_async=True)
        # wgmma groups retire in order: 1 outstanding = S_j done, PV_{j-1} may still run
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(slot), count=1)  # K_j read: the producer may refill it
        p_f, m_i, l_i, alpha = _masked_softmax_step(s, keep, m_i, l_i, qk_scale)
        p_next = gl.convert_layout(p_f.to(k_bufs.dtype), p_layout)
        acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))  # P_{j-1} lives until its PV retires
        p = p_next
        mbarrier.arrive(v_empty.index(pslot), count=1)  # V_{j-1} read
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
    mbarrier.arrive(v_empty.index(last), count=1)

    # epilogue: real rows O = acc / l, LSE = (m + log2 l) * ln 2; padded rows O = 0, LSE = -inf
    m_o = gl.convert_layout(m_i, gl.SliceLayout(1, o_layout))
    l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD, layout=gl.SliceLayout(0, o_layout))
    row_ok = r < q_valid
    o = gl.where(row_ok[:, None], acc / l_o[:, None], 0.0)
    rows = q_row0 + r
    gl.store(o_ptr + rows.to(gl.int64)[:, None] * HEAD + cols[None, :], o.to(o_ptr.dtype.element_ty))
    lse = gl.where(row_ok, (m_o + gl.log2(l_o)) * 0.6931471805599453, float("-inf"))
    gl.store(lse_ptr + rows, lse)


@gluon.jit
def gluon_fwd64_kernel(q_desc, kc_desc, vc_desc, kp_desc, vp_desc, o_ptr, lse_ptr, cur_valid_ptr,
                       slot_valid_ptr, vis_ptr, cnt_ptr, qk_scale, NSLOTS,
                       H: gl.constexpr, HKV: gl.constexpr, NQB: gl.constexpr, MAXV: gl.constexpr,
                       STAGES: gl.constexpr, BPT: gl.constexpr):
    BN: gl.constexpr = kc_desc.block_type.shape[0]  # 64 rows per block
    qb = gl.program_id(0)
    bh = gl.program_id(1)  # b * H + h
    bhkv = (bh // H) * HKV + (bh % H) // (H // HKV)
    q_row0 = (bh * NQB + qb) * BN
    cur_row0 = bhkv * NQB * BN
    pool_row0 = bhkv * NSLOTS * BN
    vis_row = vis_ptr + (bh * NQB + qb).to(gl.int64) * MAXV
    sv_row = slot_valid_ptr + bhkv * NSLOTS
    cnt = gl.load(cnt_ptr + bh * NQB + qb)
    q_valid = gl.load(cur_valid_ptr + qb)
    n_cur = NQB  # dense current chunk
    n = n_cur + cnt
    n_tiles = (n + BPT - 1) // BPT

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(kc_desc.dtype, [STAGES, BPT * BN, kc_desc.block_type.shape[1]],
                                       kc_desc.layout)
    v_bufs = gl.allocate_shared_memory(vc_desc.dtype, [STAGES, BPT * BN, vc_desc.block_type.shape[1]],
                                       vc_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)

    gl.warp_specialize([
        (_consumer, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_ptr, lse_ptr,
                     cur_valid_ptr, sv_row, vis_row, q_row0, q_valid, n_cur, n, cnt, n_tiles, qk_scale, NSLOTS,
                     STAGES, BPT)),
        (_producer, (q_desc, kc_desc, vc_desc, kp_desc, vp_desc, q_smem, k_bufs, v_bufs, q_bar,
                     k_ready, v_ready, k_empty, v_empty, q_row0, cur_row0, pool_row0, vis_row, n_cur, n,
                     n_tiles, STAGES, BPT)),
    ], [1], [PRODUCER_REGS])


# name -> (constexprs, maxnreg at launch). BPT=1, STAGES<=3: <= 112 KB smem -> 2 programs per SM,
# 8 warps each (4 consumer + producer warpgroup) -> at most 128 registers per thread at launch.
VARIANTS = {
    "gluon64 1wg 64-key tiles s3 (2 CTA/SM)": (dict(BPT=1, STAGES=3), 128),
    "gluon64 1wg 64-key tiles s2 (2 CTA/SM)": (dict(BPT=1, STAGES=2), 128),
    "gluon64 1wg 64-key tiles s6 (1 CTA/SM)": (dict(BPT=1, STAGES=6), 240),
    "gluon64 1wg 128-key tiles s3 (1 CTA/SM)": (dict(BPT=2, STAGES=3), 240),
}


# -------------------------------------------------------------------------
# host side
# -------------------------------------------------------------------------
def _smem_layout(rows):
    return gl.NVMMASharedLayout.get_default_for([rows, HEAD_D], gl.bfloat16)


def _descriptor(t):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    assert t.is_contiguous() and t.dtype == torch.bfloat16 and t.data_ptr() % 16 == 0
    return TensorDescriptor.from_tensor(t.view(-1, HEAD_D), [BLK, HEAD_D], _smem_layout(BLK))


def make_launcher(variant, H, HKV, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                  visit_count, scale):
    """Returns fn() -> (o, lse) running the variant (descriptors built once, outside the timing)."""
    consts, maxnreg = VARIANTS[variant]
    B, _, NQB = q.shape[:3]
    assert q.shape[3:] == (BLK, HEAD_D) and k_pool.shape[3:] == (BLK, HEAD_D)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:4], device=q.device, dtype=torch.float32)
    descs = [_descriptor(t) for t in (q, k_cur, v_cur, k_pool, v_pool)]
    vis, cnt = visit_slots.contiguous(), visit_count.contiguous()
    cv, sv = cur_valid.to(torch.int32).contiguous(), slot_valid.to(torch.int32).contiguous()

    def fn():
        gluon_fwd64_kernel[(NQB, B * H)](*descs, o, lse, cv, sv, vis, cnt, scale * LOG2E, k_pool.shape[2],
                                         H=H, HKV=HKV, NQB=NQB, MAXV=vis.shape[-1], **consts,
                                         num_warps=4, maxnreg=maxnreg)
        return o, lse
    return fn


def compile_sm90(variant):
    """Compile one variant for sm_90 without a GPU (Self-Forcing 8x8 geometry constants)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    consts, maxnreg = VARIANTS[variant]
    d = f"tensordesc<bf16[{BLK}, {HEAD_D}],{_smem_layout(BLK)!r}>"
    sig = dict(q_desc=d, kc_desc=d, vc_desc=d, kp_desc=d, vp_desc=d, o_ptr="*bf16", lse_ptr="*fp32",
               cur_valid_ptr="*i32", slot_valid_ptr="*i32", vis_ptr="*i32", cnt_ptr="*i32",
               qk_scale="fp32", NSLOTS="i32")
    constexprs = dict(H=12, HKV=12, NQB=84, MAXV=112, **consts)
    for k in constexprs:
        sig[k] = "constexpr"
    src = GluonASTSource(gluon_fwd64_kernel, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))


def ptxas_usage(kernel):
    """ptxas -v register / spill line of a compiled kernel (bundled ptxas; no GPU needed)."""
    import re
    import subprocess
    import tempfile

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as handle:
            handle.write(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (f"{regs.group(1) if regs else '?'} regs, "
            f"{spill.group(1) + '/' + spill.group(2) if spill else '?'} B spill st/ld")


# -------------------------------------------------------------------------
# checks and timing on an H100
# -------------------------------------------------------------------------
def build_problem():
    """The steady-state problem of bench/gpu_program.py (`steady_step`, 8x8 tiles)."""
    from gpu_program import steady_step

    st = steady_step((8, 8))
    args = (st.qb, st.kb, st.vb, st.cur_valid, st.tables.k_pool, st.tables.v_pool, st.tables.slot_valid,
            st.vs, st.vc)
    return st.spec, args, st.program.scale, st.flops


def reference(spec, args, scale, heads):
    """float64 masked attention of batch 0, query heads `heads`: (o [h, NQB, 64, D], lse [h, NQB, 64])."""
    q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, vs, vc = args
    G = spec.num_heads // spec.num_kv_heads
    NQB = q.shape[2]
    cv = cur_valid.long().tolist()
    o = torch.zeros(len(heads), NQB, BLK, HEAD_D, dtype=torch.float64, device=q.device)
    lse = torch.full((len(heads), NQB, BLK), float("-inf"), dtype=torch.float64, device=q.device)
    for i, h in enumerate(heads):
        g = h // G
        cur_k = torch.cat([k_cur[0, g, j, :cv[j]] for j in range(NQB)]).double()
        cur_v = torch.cat([v_cur[0, g, j, :cv[j]] for j in range(NQB)]).double()
        sv = slot_valid[0, g].long().tolist()
        for qb in range(NQB):
            slots = vs[0, h, qb, : int(vc[0, h, qb])].long().tolist()
            K = torch.cat([cur_k] + [k_pool[0, g, s, :sv[s]].double() for s in slots])
            V = torch.cat([cur_v] + [v_pool[0, g, s, :sv[s]].double() for s in slots])
            S = (q[0, h, qb, :cv[qb]].double() @ K.T) * scale
            lse[i, qb, :cv[qb]] = torch.logsumexp(S, 1)
            o[i, qb, :cv[qb]] = torch.softmax(S, 1) @ V
    return o, lse


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(name, o, lse, ro, rlse, pad_rows):
    """PASS/FAIL line: rel. errors on the real rows, exact O = 0 / LSE = -inf on the padded rows."""
    real = ~pad_rows
    err_o = rel(o[real], ro[real])
    err_l = rel(lse[real], rlse[real])
    pad_ok = bool((o[pad_rows] == 0).all()) and bool((lse[pad_rows] == float("-inf")).all())
    ok = err_o <= 1e-2 and err_l <= 1e-2 and pad_ok
    print(f"{'PASS' if ok else 'FAIL'} {name}: rel. err o {err_o:.2e}, lse {err_l:.2e}, "
          f"padded rows O=0/LSE=-inf: {'yes' if pad_ok else 'NO'}", flush=True)
    return ok, max(err_o, err_l)


def main_gpu():
    from codegen.autograd import pbsa_attention
    from codegen.launch import default_config

    print(f"# Gluon 64-token forward probe on {torch.cuda.get_device_name()}, {datetime.date.today()}, "
          f"triton {triton.__version__}, torch {torch.__version__}")
    spec, args, scale, flops = build_problem()
    q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, vs, vc = args
    B, H, NQB = q.shape[:3]
    HKV = spec.num_kv_heads
    print(f"problem: B={B} H={H} HKV={HKV} NQB={NQB} NSLOTS={k_pool.shape[2]} MAXV={vs.shape[-1]}, "
          f"pool visits per query block {vc.float().mean().item():.1f} (+{NQB} current), "
          f"cur_valid {sorted(set(cur_valid.tolist()))}, has_padding={spec.has_padding}")
    heads = [0, H // 2 + 1]
    ro, rlse = reference(spec, args, scale, heads)
    pad_ref = (torch.arange(BLK, device=q.device)[None, :] >= cur_valid.long()[:, None])  # [NQB, 64]
    pad_sub = pad_ref.expand(len(heads), NQB, BLK)
    pad_all = pad_ref.expand(B, H, NQB, BLK)

    cfg = default_config(spec, q.device)
    triton_fn = lambda: pbsa_attention(spec, *args, scale, validate=False,  # noqa: E731
                                       config=cfg.replace(fwd_gluon=False))
    to, tlse = triton_fn()
    all_ok, _ = compare("triton pbsa vs float64", to[0, heads], tlse[0, heads], ro, rlse, pad_sub)
    rows = [("triton pbsa (generated Triton forward)", triton.testing.do_bench(triton_fn, warmup=25, rep=100))]
    # the integrated kernel (codegen/gluon_forward.py: padded V rows zeroed, 2-stage ring)
    lib_fn = lambda: pbsa_attention(spec, *args, scale, validate=False, config=cfg)  # noqa: E731
    o, lse = lib_fn()
    ok, _ = compare("codegen gluon64 (default config) vs float64", o[0, heads], lse[0, heads], ro, rlse, pad_sub)
    all_ok &= ok
    rows.append(("codegen gluon64 (default config)", triton.testing.do_bench(lib_fn, warmup=25, rep=100)))

    for variant in VARIANTS:
        try:
            fn = make_launcher(variant, H, HKV, *args, scale)
            with Watchdog(variant + " (compile + first run)"):
                o, lse = fn()
                torch.cuda.synchronize()
            ok1, _ = compare(variant + " vs float64", o[0, heads], lse[0, heads], ro, rlse, pad_sub)
            ok2, _ = compare(variant + " vs triton pbsa", o, lse, to, tlse, pad_all)
            all_ok &= ok1 and ok2
            with Watchdog(variant + " (timing)"):
                rows.append((variant, triton.testing.do_bench(fn, warmup=25, rep=100)))
        except Exception as exc:
            all_ok = False
            print(f"FAIL {variant}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            rows.append((variant + " FAILED", float("nan")))

    print("\n| variant | ms | TFLOP/s |")
    print("|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} |")
    print(f"\nTFLOP/s = 4*64*64*128*(visit pairs) / time, visit pairs = sum(visit_count) + H*NQB^2 "
          f"(as bench/gpu_program.py tune_small_blocks). Programs: {B * H * NQB} on "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs.")
    print(f"overall: {'PASS' if all_ok else 'FAIL'}")


def main_compile_only():
    print(f"# no CUDA device: compiling the Gluon 64-token variants for sm_90 (triton {triton.__version__})")
    ok = True
    for variant in VARIANTS:
        try:
            k = compile_sm90(variant)
            smem = k.metadata.shared
            print(f"{variant}: compiled for sm_90: OK (shared memory {smem} B, {ptxas_usage(k)}, "
                  f"{k.metadata.num_warps} warps)")
        except Exception as exc:
            ok = False
            root = exc
            while root.__cause__ is not None:  # the innermost Gluon error says what is wrong
                root = root.__cause__
            print(f"{variant}: compiled for sm_90: ERROR {type(root).__name__}: {root}")
    print("compiled for sm_90: OK" if ok else "compiled for sm_90: some variants FAILED")


if __name__ == "__main__":
    if torch.cuda.is_available():
        main_gpu()
    else:
        main_compile_only()
