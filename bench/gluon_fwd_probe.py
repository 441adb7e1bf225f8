"""Probe: does a Gluon forward with FA3-style overlap beat our Triton forward? (experiment, not a test)

    cd /work/main && PYTHONPATH=. python3 bench/gluon_fwd_probe.py           # H100: check + time
    cd /work/main && PYTHONPATH=. python3 bench/gluon_fwd_probe.py           # no GPU: compile for sm_90 only

Why: the generated Triton forward (codegen/render.py, `pbsa_fwd_kernel`) reaches ~460 TFLOP/s on
an H100 at the paper's profile point; dense cuDNN SDPA reaches ~560. Triton 3.6 on sm_90 cannot
overlap the softmax with the QK^T / PV wgmmas (no warp specialisation below sm_100, every wgmma
waited on with 0 pending). FlashAttention-3 gets its speed from exactly that overlap. Gluon lets us
write the overlap by hand; this script measures whether it pays on our problem before anything is
integrated.

What the kernels compute: the "pool" segment of our forward. One program per (query block of 128
rows, batch*head); it visits the key blocks VIS[bh, qb, 0:CNT[bh, qb]] of its kv head's block pool
(K/V as 2-D [B*HKV*NBLK*128, 128] tensors; block j of kv head g at rows (g*NBLK + j)*128), one
softmax over all of them; O in bf16, LSE in fp32 natural log (P computed with exp2 and
scale*log2(e), as codegen/render.py does). bf16, head_dim 128, no padding masks, no causal mask.
Every query block must visit at least one key block (the probe asserts CNT >= 1).

Variants:
  overlap   no warp specialisation; the program's warps issue the TMA loads themselves
            (STAGES-deep ring of 128x128 K and V tiles, one mbarrier each, slot refilled as soon
            as its tile is consumed) and run FA3's intra-warpgroup pipeline: issue S_j = Q K_j^T and
            O += P_{j-1} V_{j-1} back to back (both async), wait with 1 outstanding (S_j done), do
            the softmax of tile j while the PV wgmma still runs, then wait 0 and rescale O.
            P stays in registers as the A operand of the PV wgmma. BLOCK_M=128 with 8 warps (two
            warpgroups in lockstep, 64 rows each) or BLOCK_M=64 with 4 warps.
  ws        gl.warp_specialize: a 1-warp producer partition issues all TMA loads (ready/empty
            mbarrier pairs per ring slot) and two independent 4-warp consumer partitions each own
            64 of the 128 query rows, each running the same intra-warpgroup pipeline; the two
            consumers drift against each other, so one's softmax runs under the other's wgmmas
            (FA3's ping-pong, but scheduled by the warp scheduler instead of named barriers).
            This variant won and became codegen/gluon_forward.py; the probe times it there
            (the default config), on the problem with its current segment kept separate.
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

from codegen.gluon_forward import _mma_layout, _softmax_step  # noqa: E402  shared with the integrated kernel

BT = 128  # tokens per block (rows of a query block, rows of a key block)
HEAD_D = 128
LOG2E = 1.4426950408889634


# -------------------------------------------------------------------------
# shared pieces
# -------------------------------------------------------------------------




@gluon.jit
def _store_out(acc, m_i, l_i, o_ptr, lse_ptr, row0, ROWS: gl.constexpr, HEAD: gl.constexpr,
               layout: gl.constexpr):
    """O = acc / l (bf16) and LSE = (m + log2 l) * ln 2 for ROWS rows starting at row0."""
    row_l: gl.constexpr = gl.SliceLayout(1, layout)
    col_l: gl.constexpr = gl.SliceLayout(0, layout)
    rows = gl.arange(0, ROWS, layout=row_l)
    cols = gl.arange(0, HEAD, layout=col_l)
    o = acc / l_i[:, None]
    offs = (row0 + rows).to(gl.int64)[:, None] * HEAD + cols[None, :]
    gl.store(o_ptr + offs, o.to(gl.bfloat16))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + row0 + rows, lse)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, vis_row, kv_row0, t, n,
              STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """TMA-load K and V of visit t into ring slot t % STAGES (predicated off past the list)."""
    do = t < n
    slot = t % STAGES
    idx = gl.load(vis_row + gl.minimum(t, n - 1))  # the block index inside this head's pool
    row = kv_row0 + idx * BLOCK_N
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=do)
    tma.async_copy_global_to_shared(k_desc, [row, 0], k_bars.index(slot), k_bufs.index(slot), pred=do)
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=do)
    tma.async_copy_global_to_shared(v_desc, [row, 0], v_bars.index(slot), v_bufs.index(slot), pred=do)


# -------------------------------------------------------------------------
# variant "overlap": no warp specialisation
# -------------------------------------------------------------------------
@gluon.jit
def gluon_fwd_overlap_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, vis_ptr, cnt_ptr,
                             qk_scale, NQ, NBLK, MAXV,
                             GROUP: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                             num_warps: gl.constexpr):
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD: gl.constexpr = k_desc.block_type.shape[1]
    TILES_PER_QB: gl.constexpr = BLOCK_N // BLOCK_M  # query blocks have BLOCK_N (=128) rows
    pid = gl.program_id(0)  # query tile of BLOCK_M rows
    bh = gl.program_id(1)
    qb = pid // TILES_PER_QB
    q_row0 = bh * NQ * BLOCK_N + pid * BLOCK_M
    kv_row0 = (bh // GROUP) * NBLK * BLOCK_N
    vis_row = vis_ptr + (bh * NQ + qb) * MAXV
    n = gl.load(cnt_ptr + bh * NQ + qb)

    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
    for t in gl.static_range(STAGES):  # fill the ring
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, vis_row, kv_row0, t, n, STAGES, BLOCK_N)

    # tile 0: S_0 = Q K_0^T, softmax -> P_0
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s_tok = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok, ))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_l)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
    p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
    p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD], gl.float32, o_layout)

    for j in range(1, n):
        # issue S_j = Q K_j^T, then O += P_{j-1} V_{j-1}: both wgmmas in flight together
        slot = j % STAGES
        mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_bufs.index(slot).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        pslot = (j - 1) % STAGES
        mbarrier.wait(v_bars.index(pslot), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_bufs.index(pslot), acc, is_async=True)
        # wgmma groups retire in order: 1 outstanding = S_j is done, PV_{j-1} may still run
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        # softmax of tile j overlaps the PV wgmma of tile j-1
        p_f, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
        p_next = gl.convert_layout(p_f.to(gl.bfloat16), p_layout)
        # P_{j-1} is a register operand of the in-flight PV wgmma: keep it alive until it retires
        acc, p = warpgroup_mma_wait(0, deps=(acc_tok, p))
        p = p_next
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        # tile j-1 is fully consumed (K at the previous iteration, V just now): refill its slot
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, vis_row, kv_row0, j - 1 + STAGES, n,
                  STAGES, BLOCK_N)

    last = (n - 1) % STAGES
    mbarrier.wait(v_bars.index(last), ((n - 1) // STAGES) & 1)
    acc_tok = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _store_out(acc, gl.convert_layout(m_i, gl.SliceLayout(1, o_layout)),
               gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), o_ptr, lse_ptr, q_row0, BLOCK_M, HEAD,
               o_layout)


# name -> (kernel, constexprs, num_warps, extra launch options, q rows per TMA box)
VARIANTS = {
    "gluon overlap M128 w8 s3": (gluon_fwd_overlap_kernel, dict(BLOCK_M=128, STAGES=3), 8, {}, 128),
    "gluon overlap M128 w8 s2": (gluon_fwd_overlap_kernel, dict(BLOCK_M=128, STAGES=2), 8, {}, 128),
    "gluon overlap M64 w4 s3": (gluon_fwd_overlap_kernel, dict(BLOCK_M=64, STAGES=3), 4, {}, 64),
}


# -------------------------------------------------------------------------
# host side
# -------------------------------------------------------------------------
def _smem_layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def gluon_forward(q, k_pool, v_pool, visits, counts, scale, variant="gluon ws 2x64 s3", group=1):
    """Block-sparse forward over a block pool.

    q:      [BH*NQ*128, 128] bf16 (rows of query block qb of head bh at (bh*NQ + qb)*128)
    k_pool, v_pool: [BHKV*NBLK*128, 128] bf16 (block j of kv head g at rows (g*NBLK + j)*128)
    visits: int32 [BH, NQ, MAXV] block indices; counts: int32 [BH, NQ] (>= 1 each)
    Returns (o [BH*NQ*128, 128] bf16, lse [BH*NQ*128] fp32, natural log).
    """
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kernel, consts, warps, opts, qrows = VARIANTS[variant]
    BH, NQ, MAXV = visits.shape
    NBLK = k_pool.shape[0] // (BT * (BH // group))
    assert q.shape == (BH * NQ * BT, HEAD_D) and q.dtype == torch.bfloat16
    assert k_pool.shape == v_pool.shape and k_pool.shape[0] == (BH // group) * NBLK * BT
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
    q_desc = TensorDescriptor.from_tensor(q, [qrows, HEAD_D], _smem_layout([qrows, HEAD_D]))
    k_desc = TensorDescriptor.from_tensor(k_pool, [BT, HEAD_D], _smem_layout([BT, HEAD_D]))
    v_desc = TensorDescriptor.from_tensor(v_pool, [BT, HEAD_D], _smem_layout([BT, HEAD_D]))
    q_tiles = NQ * (BT // consts.get("BLOCK_M", BT))
    kernel[(q_tiles, BH)](q_desc, k_desc, v_desc, o, lse, visits, counts, scale * LOG2E, NQ, NBLK, MAXV,
                          GROUP=group, **consts, num_warps=warps, **opts)
    return o, lse


def compile_sm90(variant):
    """Compile one variant for sm_90 without a GPU (catches Gluon front-end and ptxas-free errors)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel, consts, warps, opts, qrows = VARIANTS[variant]
    qd = f"tensordesc<bf16[{qrows}, {HEAD_D}],{_smem_layout([qrows, HEAD_D])!r}>"
    kd = f"tensordesc<bf16[{BT}, {HEAD_D}],{_smem_layout([BT, HEAD_D])!r}>"
    sig = dict(q_desc=qd, k_desc=kd, v_desc=kd, o_ptr="*bf16", lse_ptr="*fp32", vis_ptr="*i32",
               cnt_ptr="*i32", qk_scale="fp32", NQ="i32", NBLK="i32", MAXV="i32")
    constexprs = dict(GROUP=1, num_warps=warps, **consts)
    for k in constexprs:
        sig[k] = "constexpr"
    src = GluonASTSource(kernel, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, **opts))


def reference(q, k_pool, v_pool, visits, counts, scale, group=1):
    """float64 block-sparse attention, one (bh, qb) at a time (dense gather of the visited blocks)."""
    BH, NQ, _ = visits.shape
    qd = q.double().view(BH, NQ, BT, HEAD_D)
    kd = k_pool.double().view(BH // group, -1, BT, HEAD_D)
    vd = v_pool.double().view(BH // group, -1, BT, HEAD_D)
    o = torch.empty_like(qd)
    lse = torch.empty(BH, NQ, BT, dtype=torch.float64, device=q.device)
    for bh in range(BH):
        for qb in range(NQ):
            idx = visits[bh, qb, : int(counts[bh, qb])].long()
            K = kd[bh // group, idx].reshape(-1, HEAD_D)
            V = vd[bh // group, idx].reshape(-1, HEAD_D)
            S = (qd[bh, qb] @ K.T) * scale
            lse[bh, qb] = torch.logsumexp(S, 1)
            o[bh, qb] = torch.softmax(S, 1) @ V
    return o.view(-1, HEAD_D), lse.view(-1)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def build_problem(seed=0):
    """bench/gpu_attention.py's bench_problem(0.25) as one pool: the 36 current blocks first, then
    the 476 pool slots; each query block visits its 36 current blocks + 32 persistent + 111 random
    window blocks = 179 blocks (the same pairs our kernel computes). Returns the pool problem and
    the pbsa_attention arguments of the identical problem."""
    saved = sys.argv
    sys.argv = [saved[0]]  # gpu_attention parses its own argv at import
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_attention import ARGN, bench_problem
    finally:
        sys.argv = saved
    spec, t, vis, n_pairs = bench_problem(0.25, seed=seed)
    B, H, NQB = t["q"].shape[:3]
    assert B == 1 and spec.num_kv_heads == H
    k_all = torch.cat([t["k_cur"], t["k_pool"]], 2).contiguous()  # [B, H, NQB+NS, BT, D]
    v_all = torch.cat([t["v_cur"], t["v_pool"]], 2).contiguous()
    vl = vis.to(t["q"].device)  # [B, H, NQB, MAXV] slots, -1 unused
    cnt_pool = (vl >= 0).sum(-1)
    maxv = NQB + vl.shape[-1]
    visits = torch.zeros(B * H, NQB, maxv, dtype=torch.int32, device=vl.device)
    visits[..., :NQB] = torch.arange(NQB, dtype=torch.int32, device=vl.device)
    visits[..., NQB:] = torch.where(vl >= 0, vl + NQB, 0).view(B * H, NQB, -1).to(torch.int32)
    counts = (NQB + cnt_pool).view(B * H, NQB).to(torch.int32).contiguous()
    prob = dict(q=t["q"].reshape(-1, HEAD_D), k=k_all.view(-1, HEAD_D), v=v_all.view(-1, HEAD_D),
                visits=visits.contiguous(), counts=counts)
    return spec, t, ARGN, prob, n_pairs


class Watchdog:
    """A wrong mbarrier phase hangs the GPU forever: give up loudly instead (the wait in
    torch.cuda.synchronize releases the GIL, so this timer thread still runs)."""

    def __init__(self, what, seconds=180):
        import threading

        self.what, self.timer = what, threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self):
        print(f"FAIL {self.what}: no result after the watchdog's timeout (hang?); exiting", flush=True)
        os._exit(3)

    def __enter__(self):
        self.timer.start()

    def __exit__(self, *exc):
        self.timer.cancel()


def main_gpu():
    from codegen import launch
    from codegen.autograd import pbsa_attention

    print(f"# Gluon forward probe on {torch.cuda.get_device_name()}, {datetime.date.today()}, "
          f"triton {triton.__version__}, torch {torch.__version__}")
    spec, t, argn, prob, n_pairs = build_problem()
    assert int(prob["counts"].min()) >= 1
    scale = HEAD_D ** -0.5
    flops = 4 * BT * BT * HEAD_D * n_pairs
    print(f"problem: B*H={prob['visits'].shape[0]}, {prob['visits'].shape[1]} query blocks, "
          f"{prob['k'].shape[0] // BT // prob['visits'].shape[0]} blocks per head pool, "
          f"{n_pairs} block pairs ({n_pairs / prob['visits'].numel() * prob['visits'].shape[-1]:.0f} per query block)")
    ro, rlse = reference(prob["q"], prob["k"], prob["v"], prob["visits"], prob["counts"], scale)

    rows = []
    # our generated Triton forward on the identical problem (current segment + pool)
    args = [t[k] for k in argn]
    cfg = launch.default_config(spec, torch.device("cuda"))
    tri = cfg.replace(fwd_gluon=False)
    triton_cfgs = (("triton pbsa (generated Triton forward)", tri),
                   ("triton pbsa (fwd_overlap)", tri.replace(fwd_overlap=True)),
                   ("triton pbsa (no kv splits, like the Gluon kernels)", tri.replace(fwd_kv_splits=1)),
                   # the warp-specialised kernel this probe led to (codegen/gluon_forward.py)
                   ("codegen gluon ws 2x64 s3 (default config)", cfg))
    for name, c in triton_cfgs:
        try:
            fn = lambda c=c: pbsa_attention(spec, *args, scale=scale, config=c, validate=False)  # noqa: E731
            o, lse = fn()
            err = max(rel(o.reshape(-1, HEAD_D), ro), rel(lse.reshape(-1), rlse))
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append((name, ms, flops / ms / 1e9, err))
        except Exception as exc:  # keep going: the Gluon numbers are the point
            rows.append((name + f" FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", float("nan"),
                         float("nan"), float("nan")))

    all_ok = True
    for variant in VARIANTS:
        try:
            fn = lambda v=variant: gluon_forward(prob["q"], prob["k"], prob["v"], prob["visits"],  # noqa: E731
                                                 prob["counts"], scale, variant=v)
            with Watchdog(variant + " (compile + first run)"):
                o, lse = fn()
                torch.cuda.synchronize()
            err_o, err_l = rel(o, ro), rel(lse, rlse)
            err = max(err_o, err_l)
            ok = err <= 1e-2
            all_ok &= ok
            print(f"{'PASS' if ok else 'FAIL'} {variant}: rel. err o {err_o:.2e}, lse {err_l:.2e}", flush=True)
            with Watchdog(variant + " (timing)"):
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append((variant, ms, flops / ms / 1e9, err))
        except Exception as exc:
            all_ok = False
            print(f"FAIL {variant}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            rows.append((variant + " FAILED", float("nan"), float("nan"), float("nan")))

    print("\n| variant | ms | TFLOP/s | rel. err. |")
    print("|---|---|---|---|")
    for name, ms, tf, err in rows:
        print(f"| {name} | {ms:.3f} | {tf:.0f} | {err:.1e} |")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nprog = prob["visits"].shape[0] * prob["visits"].shape[1]
    print(f"\nTFLOP/s = 4*128*128*128*{n_pairs} / time. The Gluon kernels run one program per "
          f"(query block, head) without kv splits: {nprog} programs (x2 for M64) on {sms} SMs at 1 CTA/SM "
          f"(shared memory), i.e. {nprog / sms:.2f} waves; compare them with the 'no kv splits' Triton row "
          f"for the kernel itself.")
    print(f"overall: {'PASS' if all_ok else 'FAIL'}")


def main_compile_only():
    print(f"# no CUDA device: compiling the Gluon variants for sm_90 (triton {triton.__version__})")
    ok = True
    for variant in VARIANTS:
        try:
            k = compile_sm90(variant)
            smem = k.metadata.shared
            print(f"{variant}: compiled for sm_90: OK (shared memory {smem} bytes, "
                  f"{'fits' if smem <= 232448 else 'TOO MUCH for an H100'})")
        except Exception as exc:
            ok = False
            print(f"{variant}: compiled for sm_90: ERROR {type(exc).__name__}: {exc}")
    print("compiled for sm_90: OK" if ok else "compiled for sm_90: some variants FAILED")


if __name__ == "__main__":
    if torch.cuda.is_available():
        main_gpu()
    else:
        main_compile_only()
