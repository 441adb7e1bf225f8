"""Launchers for the generated PBSA attention kernels (forward, backward).

These functions take already validated inputs (see codegen/attention/validate.py) and
return plain tensors; `codegen.attention.autograd` wires them into autograd.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from . import gluon_forward
from .cache import load_attention_kernels
from .kernel_spec import AttentionKernelSpec, KernelConfig
from .transpose import build_transposed_schedule

_INT32_MAX = 2**31 - 1

# Debug/test switch: fill every output buffer with NaN before the launch, so an
# element a kernel forgot to write shows up as NaN instead of stale memory.
POISON_OUTPUTS = False


def _out_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _out(*shape, dtype, device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def interpreter_active() -> bool:
    active = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if active:
        from .. import _interp_compat

        _interp_compat.install()
    return active


@functools.lru_cache(maxsize=None)
def _device_props(index: int):
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, torch.cuda.get_device_capability(index)


def default_config(spec: AttentionKernelSpec, device: torch.device) -> KernelConfig:
    """Tuning defaults per device (the GPU numbers come from bench/gpu_attention.py)."""
    if device.type != "cuda" or interpreter_active():
        # the interpreter pays per op, not per FLOP: take whole blocks per step
        bt = min(spec.block_tokens, 128)
        return KernelConfig(
            variant="ptr", warp_specialize=False,
            fwd_block_m=bt, fwd_block_n=bt, fwd_kv_splits=1,
            dq_block_m=bt, dq_block_n=bt, dkdv_block_m=bt, dkdv_block_n=bt,
        ).fitted(spec)
    _, cap = _device_props(device.index if device.index is not None else torch.cuda.current_device())
    hopper = cap[0] >= 9
    # warp_specialize stays off: Triton 3.6 runs no warp-specialisation pass on sm_90.
    if spec.block_tokens <= 64:
        # 64-token blocks (8x8 tiles): 4 warps and plain loads. Measured on an H100 at
        # Self-Forcing geometry (bench/gpu_program.py --tune64): forward 1.22 ms vs 3.17 ms with
        # the 128-token settings, forward+backward 3.99 ms vs 8.42 ms.
        return KernelConfig(
            variant="ptr", warp_specialize=False, fwd_gluon=hopper,
            fwd_block_m=64, fwd_block_n=64, fwd_warps=4, fwd_stages=3, fwd_kv_splits=0,
            fwd_overlap=False, dq_block_m=64, dq_block_n=64, dq_warps=4, dq_stages=2,
            dq_overlap=False, dkdv_block_m=64, dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2,
            dkdv_overlap=True, bwd_warp_specialize=False, bwd_fused=True, bwd_variant="ptr",
        ).fitted(spec)
    return KernelConfig(
        variant="desc" if hopper else "ptr",
        warp_specialize=False, fwd_gluon=hopper,
        fwd_block_m=128, fwd_block_n=128, fwd_warps=8, fwd_stages=3, fwd_kv_splits=0, fwd_overlap=False,
        dq_block_m=128, dq_block_n=128, dq_warps=8, dq_stages=2, dq_overlap=False,
        dkdv_block_m=64, dkdv_block_n=128, dkdv_warps=8, dkdv_stages=2, dkdv_overlap=True,
        bwd_warp_specialize=False, bwd_fused=True, bwd_variant="ptr",
    ).fitted(spec)


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from triton.set_allocator.
    Triton keeps the allocator in a context variable, and autograd runs the backward
    on its own thread, so it is (cheaply) set before every descriptor launch."""
    import triton

    triton.set_allocator(_alloc)


def _variant_for(cfg: KernelConfig, spec, q, rows_q: int, rows_pool: int, tensors) -> str:
    """The load variant to render for this call ('desc' only where TMA descriptors are legal)."""
    if not q.is_cuda:
        interpreter_active()  # installs the interpreter shims before any launch
    if cfg.variant != "desc":
        return "ptr"
    if max(rows_q, rows_pool) > _INT32_MAX:
        return "ptr"  # descriptor coordinates are int32
    if any(t.data_ptr() % 16 for t in tensors):
        return "ptr"  # TMA needs 16-byte aligned bases
    if q.is_cuda:
        _ensure_allocator()
    return "desc"


def _bwd(cfg: KernelConfig) -> KernelConfig:
    """The config as the backward kernels see it (their own load variant, if set)."""
    return cfg.replace(variant=cfg.bwd_variant) if cfg.bwd_variant else cfg


_WS_BROKEN: set = set()
# optional code paths a launch may drop when their compile fails, in this order
_FALLBACK_FLAGS = ("WARP_SPEC", "OVERLAP", "DQ_OVERLAP", "KV_OVERLAP")


def _run(kernel, grid, *args, **kw):
    """Launch; if the compile of an optional path fails (warp specialisation, or an
    overlapped loop running out of shared memory; Triton versions differ in what they
    accept), drop that path, warn once and remember it for this launch shape."""
    key = (id(kernel), tuple(sorted((k, v) for k, v in kw.items() if k not in _FALLBACK_FLAGS)))
    for flag in _FALLBACK_FLAGS:
        if kw.get(flag) and (key, flag) in _WS_BROKEN:
            kw[flag] = False
    while True:
        try:
            return kernel[grid](*args, **kw)
        except Exception as e:  # compile-time or resource failure of an optional path
            flag = next((f for f in _FALLBACK_FLAGS if kw.get(f)), None)
            if flag is None or isinstance(e, ValueError):
                raise
            import warnings

            warnings.warn(f"{flag} compile failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"falling back to {flag}=False", RuntimeWarning)
            _WS_BROKEN.add((key, flag))
            kw[flag] = False


# Split model constants (H100, bench/gpu_attention.py --phases splits): a key tile of one
# program costs 4*BM*BN*D flops at about this per-SM rate; the merge kernel moves
# (splits + 1) fp32 partial rows per query row at about this bandwidth, plus a launch.
_SM_FLOPS = 3.5e12
_MERGE_BYTES_PER_S = 2.5e12
_MERGE_FIXED_S = 5e-6
_PROGRAM_FIXED_TILES = 10  # per-program fixed cost (prologue, epilogue, launch), in key-tile iterations


def _auto_splits(n_programs: int, device: torch.device, spec: AttentionKernelSpec | None = None,
                 cfg: KernelConfig | None = None) -> int:
    """KV splits per query tile that minimise the modelled forward time (1 off CUDA):
    waves of programs (the last one partly empty) times the work per program, plus the
    merge of the partial softmaxes when split."""
    if device.type != "cuda":
        return 1
    sms, _ = _device_props(device.index if device.index is not None else torch.cuda.current_device())
    if spec is None or cfg is None:  # no shape known: balance the last wave only
        tiles, bm, bn, d, rows = 64, 128, 128, 128, n_programs * 128
    else:
        bm, bn, d = cfg.fwd_block_m, cfg.fwd_block_n, spec.head_dim
        longest = spec.current_blocks_visible(spec.num_query_blocks - 1) + spec.max_cached_visits
        tiles = longest * (spec.block_tokens // bn)
        rows = n_programs * bm
    t_tile = 4 * bm * bn * d / _SM_FLOPS
    best, best_t = 1, None
    for s in (1, 2, 3, 4):
        t = math.ceil(n_programs * s / sms) * (tiles / s + _PROGRAM_FIXED_TILES) * t_tile
        if s > 1:
            t += rows * d * 4 * (s + 1) / _MERGE_BYTES_PER_S + _MERGE_FIXED_S
        if best_t is None or t < best_t * (1 - 1e-9):
            best, best_t = s, t
    return best


_GLUON_BROKEN: set = set()


def _use_gluon(cfg: KernelConfig, spec: AttentionKernelSpec, q, tensors) -> bool:
    """The Gluon forward when the config asks for it, it applies, and it has not failed before."""
    return (cfg.fwd_gluon and cfg.fwd_kv_splits <= 1 and not interpreter_active()
            and spec not in _GLUON_BROKEN and gluon_forward.supported(spec, q, tensors))


def _pool_or_dummy(spec, B, k_pool, v_pool, slot_valid):
    """Kernels always get a non-empty pool (an empty pool is never read: counts are 0)."""
    if k_pool.shape[2] > 0:
        return k_pool, v_pool, slot_valid, k_pool.shape[2]
    z = torch.zeros(B, spec.num_kv_heads, 1, spec.block_tokens, spec.head_dim, dtype=k_pool.dtype, device=k_pool.device)
    return z, z, torch.zeros(B, spec.num_kv_heads, 1, dtype=torch.int32, device=k_pool.device), 1


def _visits_or_dummy(spec, visit_slots):
    if visit_slots.shape[-1] > 0:
        return visit_slots
    return torch.zeros(*visit_slots.shape[:-1], 1, dtype=torch.int32, device=visit_slots.device)


def attention_forward(
    spec: AttentionKernelSpec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
    visit_slots, visit_count, scale: float, config: KernelConfig | None = None,
):
    """Run the forward kernel; returns (o, lse)."""
    cfg = (config or default_config(spec, q.device)).fitted(spec)
    B = q.shape[0]
    H, NQB, BT, D = spec.num_heads, spec.num_query_blocks, spec.block_tokens, spec.head_dim
    k_pool, v_pool, slot_valid, nslots = _pool_or_dummy(spec, B, k_pool, v_pool, slot_valid)
    visit_slots = _visits_or_dummy(spec, visit_slots)
    o = _out_like(q)
    lse = _out(B, H, NQB, BT, dtype=torch.float32, device=q.device)
    if _use_gluon(cfg, spec, q, (q, k_cur, v_cur, k_pool, v_pool)):
        try:
            return gluon_forward.attention_forward(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool,
                                                   slot_valid, visit_slots, visit_count, scale, o, lse)
        except Exception as e:  # a Triton without this Gluon API: the Triton forward, once warned
            import warnings

            warnings.warn(f"Gluon forward failed ({type(e).__name__}: {str(e)[:200]}); using the "
                          "generated Triton forward", RuntimeWarning)
            _GLUON_BROKEN.add(spec)
    variant = _variant_for(
        cfg, spec, q, B * H * NQB * BT, B * spec.num_kv_heads * nslots * BT,
        (q, k_cur, v_cur, k_pool, v_pool),
    )
    mod = load_attention_kernels(spec, variant)
    bm, bn = cfg.fwd_block_m, cfg.fwd_block_n
    n_prog = B * H * NQB * (BT // bm)
    splits = cfg.fwd_kv_splits or _auto_splits(n_prog, q.device, spec, cfg)
    if splits > 1:
        o_part = _out(splits, B * H * NQB * BT, D, dtype=torch.float32, device=q.device)
        lse_part = _out(splits, B * H * NQB * BT, dtype=torch.float32, device=q.device)
    else:
        o_part, lse_part = o, lse  # unused
    ws = bool(cfg.warp_specialize and q.is_cuda)
    _run(mod.pbsa_fwd_kernel, (n_prog * splits,),
        q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
        o, lse, o_part, lse_part,
        B, nslots, scale,
        BLOCK_M=bm, BLOCK_N=bn, KV_SPLITS=splits, WARP_SPEC=ws, OVERLAP=bool(cfg.fwd_overlap),
        num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages,
    )
    if splits > 1:
        cbm = min(BT, 64)
        mod.pbsa_fwd_combine_kernel[(B * H * NQB * BT // cbm,)](
            o_part, lse_part, cur_valid, o, lse, B, BLOCK_M=cbm, KV_SPLITS=splits, num_warps=4,
        )
    return o, lse


def attention_backward(
    spec: AttentionKernelSpec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
    visit_slots, visit_count, o, lse, do, dlse, scale: float,
    need_kv_cur: bool = True, need_pool: bool = False, config: KernelConfig | None = None,
):
    """Run the backward kernels; returns (dq, dk_cur, dv_cur, dk_pool, dv_pool) (None where not needed)."""
    cfg = (config or default_config(spec, q.device)).fitted(spec)
    need_pool = need_pool and k_pool.shape[2] > 0
    bw = BwdInputs.make(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                         visit_count, do, cfg)
    if need_kv_cur and use_atomic_dq(cfg):
        return launch_bwd_atomic(bw, o, lse, dlse, scale, need_pool, cfg)
    if cfg.bwd_fused and (need_kv_cur or need_pool):
        return launch_bwd_fused(bw, o, lse, dlse, scale, need_pool, cfg)
    dq, delta = launch_dq(bw, o, lse, dlse, scale, cfg)
    dk_cur = dv_cur = dk_pool = dv_pool = None
    if need_kv_cur or need_pool:
        dk_cur, dv_cur, dk_pool, dv_pool = launch_dkdv(bw, lse, delta, scale, need_pool, cfg)
    return dq, dk_cur, dv_cur, dk_pool, dv_pool


def use_atomic_dq(cfg: KernelConfig) -> bool:
    """Atomic dQ unless the config asks for the ordered sum or PyTorch is in deterministic mode."""
    return cfg.bwd_dq == "atomic" and not torch.are_deterministic_algorithms_enabled()


class BwdInputs:
    """What every backward launcher needs: the inputs with the empty pool / empty visit table
    replaced by dummies, dO made contiguous, and the generated module of the right variant."""

    @classmethod
    def make(cls, spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
             visit_count, do, cfg):
        self = cls()
        self.spec, self.q, self.k_cur, self.v_cur, self.cur_valid = spec, q, k_cur, v_cur, cur_valid
        self.k_pool, self.v_pool = k_pool, v_pool  # the real ones (dK/dV shapes)
        self.nslots_real = k_pool.shape[2]
        self.visit_slots, self.visit_count = visit_slots, visit_count
        self.B = q.shape[0]
        self.kp, self.vp, self.sv, self.nslots = _pool_or_dummy(spec, self.B, k_pool, v_pool, slot_valid)
        self.vs = _visits_or_dummy(spec, visit_slots)
        self.do = do.contiguous()
        H, NQB, BT = spec.num_heads, spec.num_query_blocks, spec.block_tokens
        self.rows = self.B * H * NQB * BT
        variant = _variant_for(
            _bwd(cfg), spec, q, self.rows, self.B * spec.num_kv_heads * self.nslots * BT,
            (q, k_cur, v_cur, self.kp, self.vp, self.do),
        )
        self.variant = variant
        self.mod = load_attention_kernels(spec, variant)
        return self

    def preprocess(self, o, lse, dlse, dq_acc=None):
        """DELTA = rowsum(O * dO) - dLSE (and dq_acc cleared, when given)."""
        delta = _out(self.B, self.spec.num_heads, self.spec.num_query_blocks, self.spec.block_tokens,
                     dtype=torch.float32, device=self.q.device)
        has_dlse = dlse is not None
        pbm = min(self.spec.block_tokens, 64)
        self.mod.pbsa_bwd_preprocess_kernel[(self.rows // pbm,)](
            o, self.do, dlse.contiguous().float() if has_dlse else lse, self.cur_valid, delta,
            dq_acc if dq_acc is not None else delta,
            BLOCK_M=pbm, HAS_DLSE=has_dlse, ZERO_DQ=dq_acc is not None, num_warps=4,
        )
        return delta

    def kv_grads(self, need_pool: bool):
        """Output buffers (dk_cur, dv_cur, dk_pool, dv_pool); pool ones None unless needed."""
        dk_pool = dv_pool = None
        if need_pool:
            dk_pool, dv_pool = _out_like(self.k_pool), _out_like(self.v_pool)
        return _out_like(self.k_cur), _out_like(self.v_cur), dk_pool, dv_pool


def launch_bwd_atomic(bw: BwdInputs, o, lse, dlse, scale, need_pool: bool, cfg: KernelConfig):
    """DELTA pre-pass (+ clear the fp32 dQ accumulator), one pass over the transposed schedule
    that writes dK/dV and adds dQ atomically, then dQ converted to the input dtype."""
    spec = bw.spec
    dq_acc = torch.empty(bw.rows, spec.head_dim, dtype=torch.float32, device=bw.q.device)
    delta = bw.preprocess(o, lse, dlse, dq_acc)
    # every visited key block takes part: pool slots add their share of dQ even without dK/dV
    ts = build_transposed_schedule(spec, bw.visit_slots, bw.visit_count, bw.nslots_real, include_pool=True)
    dk_cur, dv_cur, dk_pool, dv_pool = bw.kv_grads(need_pool)
    # TMA adds need the descriptor variant and a GPU (the interpreter has no bulk reductions)
    tma = bool(cfg.dq_atomic_tma and bw.variant == "desc" and bw.q.is_cuda and not interpreter_active())
    bm, bn = cfg.dkdv_block_m, cfg.dkdv_block_n
    bw.mod.pbsa_bwd_atomic_kernel[(ts.num_items * (spec.block_tokens // bn),)](
        bw.q, bw.k_cur, bw.v_cur, bw.cur_valid, bw.kp, bw.vp, bw.sv,
        bw.do, lse, delta, dq_acc, dk_cur, dv_cur,
        dk_pool if need_pool else dk_cur, dv_pool if need_pool else dv_cur,
        ts.item_order, ts.row_ptr, ts.visitors,
        bw.B, bw.nslots, ts.num_items_per_head, scale,
        BLOCK_M=bm, BLOCK_N=bn, NEED_POOL=need_pool, DQ_TMA=tma,
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )
    dq = _out_like(bw.q)
    cbm = min(spec.block_tokens, 64)
    bw.mod.pbsa_bwd_dq_convert_kernel[(bw.rows // cbm,)](dq_acc, dq, scale, BLOCK_M=cbm, num_warps=4)
    return dq, dk_cur, dv_cur, dk_pool, dv_pool


def launch_bwd_fused(bw: BwdInputs, o, lse, dlse, scale, need_pool: bool, cfg: KernelConfig):
    """DELTA pre-pass, then dQ and dK/dV programs in one launch; returns (dq, dk_cur, dv_cur, dk_pool, dv_pool)."""
    spec = bw.spec
    need_pool = need_pool and bw.nslots_real > 0
    delta = bw.preprocess(o, lse, dlse)
    ts = build_transposed_schedule(spec, bw.visit_slots, bw.visit_count, bw.nslots_real, include_pool=need_pool)
    dq = _out_like(bw.q)
    dk_cur, dv_cur, dk_pool, dv_pool = bw.kv_grads(need_pool)
    BT = spec.block_tokens
    n_dq = bw.rows // cfg.dq_block_m
    n_kv = ts.num_items * (BT // cfg.dkdv_block_n)
    _run(bw.mod.pbsa_bwd_fused_kernel, (n_dq + n_kv,),
        bw.q, bw.k_cur, bw.v_cur, bw.cur_valid, bw.kp, bw.vp, bw.sv, bw.vs, bw.visit_count,
        o, bw.do, lse, dq, delta, dk_cur, dv_cur,
        dk_pool if need_pool else dk_cur, dv_pool if need_pool else dv_cur,
        ts.item_order, ts.row_ptr, ts.visitors,
        bw.B, bw.nslots, ts.num_items_per_head, n_dq, scale,
        DQ_BLOCK_M=cfg.dq_block_m, DQ_BLOCK_N=cfg.dq_block_n,
        KV_BLOCK_M=cfg.dkdv_block_m, KV_BLOCK_N=cfg.dkdv_block_n,
        DQ_OVERLAP=bool(cfg.dq_overlap), KV_OVERLAP=bool(cfg.dkdv_overlap),
        num_warps=max(cfg.dq_warps, cfg.dkdv_warps), num_stages=cfg.dkdv_stages,
    )
    return dq, dk_cur, dv_cur, dk_pool, dv_pool


def launch_dq(bw: BwdInputs, o, lse, dlse, scale, cfg: KernelConfig):
    """dQ kernel (also writes DELTA = rowsum(O*dO) - dLSE); returns (dq, delta)."""
    spec = bw.spec
    dq = _out_like(bw.q)
    delta = _out(bw.B, spec.num_heads, spec.num_query_blocks, spec.block_tokens, dtype=torch.float32,
                 device=bw.q.device)
    has_dlse = dlse is not None
    dlse_t = dlse.contiguous().float() if has_dlse else lse
    bm, bn = cfg.dq_block_m, cfg.dq_block_n
    _run(bw.mod.pbsa_bwd_dq_kernel, (bw.rows // bm,),
        bw.q, bw.k_cur, bw.v_cur, bw.cur_valid, bw.kp, bw.vp, bw.sv, bw.vs, bw.visit_count,
        o, bw.do, lse, dlse_t, dq, delta,
        bw.B, bw.nslots, scale,
        BLOCK_M=bm, BLOCK_N=bn, HAS_DLSE=has_dlse, WARP_SPEC=bool(cfg.bwd_warp_specialize and bw.q.is_cuda),
        OVERLAP=bool(cfg.dq_overlap),
        num_warps=cfg.dq_warps, num_stages=cfg.dq_stages,
    )
    return dq, delta


def launch_dkdv(bw: BwdInputs, lse, delta, scale, need_pool: bool, cfg: KernelConfig):
    """Transposed schedule + dK/dV kernel; returns (dk_cur, dv_cur, dk_pool, dv_pool)."""
    spec = bw.spec
    need_pool = need_pool and bw.nslots_real > 0
    ts = build_transposed_schedule(spec, bw.visit_slots, bw.visit_count, bw.nslots_real, include_pool=need_pool)
    dk_cur, dv_cur, dk_pool, dv_pool = bw.kv_grads(need_pool)
    bm, bn = cfg.dkdv_block_m, cfg.dkdv_block_n
    _run(bw.mod.pbsa_bwd_dkdv_kernel, (ts.num_items * (spec.block_tokens // bn),),
        bw.q, bw.k_cur, bw.v_cur, bw.cur_valid, bw.kp, bw.vp, bw.sv,
        bw.do, lse, delta, dk_cur, dv_cur,
        dk_pool if need_pool else dk_cur, dv_pool if need_pool else dv_cur,
        ts.item_order, ts.row_ptr, ts.visitors,
        bw.B, bw.nslots, ts.num_items_per_head, scale,
        BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=bool(cfg.bwd_warp_specialize and bw.q.is_cuda),
        OVERLAP=bool(cfg.dkdv_overlap),
        num_warps=cfg.dkdv_warps, num_stages=cfg.dkdv_stages,
    )
    return dk_cur, dv_cur, dk_pool, dv_pool
