"""GPU check + benchmark of the generated PBSA attention kernels (one script, one lease).

    cd /work/main && PYTHONPATH=. python3 bench/gpu_attention.py [--phases check,sweep,splits,table] [--tiny]

Phases
  check  correctness on the GPU at real shapes (bf16, BT=128, D=128, H=12; MHA and
         GQA; dense/causal; padding on/off) against a float64 reference, forward and
         backward (pool gradients included), outputs poisoned with NaN, NaN in
         unvisited pool slots, bitwise determinism of the backward.
  sweep  time a few kernel configurations (forward; dQ; dK/dV) at 25% local density
         and keep the fastest of each for the table.
  table  PBSA vs FlexAttention (torch.compile'd, BlockMask.from_kv_blocks with the
         identical block set, as full blocks) vs dense SDPA; B=1, H=12, D=128,
         36 query blocks of 128 tokens (3 frames x 12 blocks), 512 KV blocks
         (36 current + 32 persistent + 444 window), local density 6.25/12.5/25% + dense.
         TFLOP/s counted over computed blocks (fwd 4*BT*BT*D per block pair,
         fwd+bwd 3.5x that).
Writes $OUT/bench.md (and prints it); --tiny runs the whole script on CPU with the
Triton interpreter at toy sizes (a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

ap = argparse.ArgumentParser()
ap.add_argument("--phases", default="check,sweep,table")
ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script (interpreter)")
ap.add_argument("--densities", default="0.25,0.0625,0.125,1.0")
ap.add_argument("--no-flex", action="store_true")
ap.add_argument("--sweep-set", default="full", help="full|small")
ARGS = ap.parse_args()
if ARGS.tiny:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from codegen.attention import launch  # noqa: E402
from codegen.attention.autograd import pbsa_attention  # noqa: E402
from codegen.attention.kernel_spec import AttentionKernelSpec, KernelConfig  # noqa: E402

DEV = "cpu" if ARGS.tiny else "cuda"
OUT = os.environ.get("OUT", "/tmp/pbsa_bench_out")
os.makedirs(OUT, exist_ok=True)
LOG_LINES: list[str] = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG_LINES.append(s)


def bench(fn, warmup=25, rep=100):
    if ARGS.tiny:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# -------------------------------------------------------------------------
# problem construction
# -------------------------------------------------------------------------
def make_inputs(spec, B, nslots, visit_lists, pad=False, seed=0, poison_unvisited=True):
    """visit_lists: LongTensor [B, H, NQB, MAXV] of slots (-1 = unused, sorted first)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    H, HKV, NQB, BT, D = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks, spec.block_tokens, spec.head_dim
    dt = getattr(torch, spec.dtype)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dt).to(DEV)

    q = rnd(B, H, NQB, BT, D)
    k_cur, v_cur = rnd(B, HKV, NQB, BT, D), rnd(B, HKV, NQB, BT, D)
    k_pool, v_pool = rnd(B, HKV, nslots, BT, D), rnd(B, HKV, nslots, BT, D)
    if pad:
        cur_valid = torch.randint(BT // 3, BT + 1, (NQB,), generator=g, dtype=torch.int32).to(DEV)
        slot_valid = torch.randint(0, BT + 1, (B, HKV, nslots), generator=g, dtype=torch.int32).to(DEV)
    else:
        cur_valid = torch.full((NQB,), BT, dtype=torch.int32, device=DEV)
        slot_valid = torch.full((B, HKV, nslots), BT, dtype=torch.int32, device=DEV)
    vl = visit_lists.to(DEV)
    visit_count = (vl >= 0).sum(-1).to(torch.int32)
    visit_slots = torch.where(vl >= 0, vl, 10**6).to(torch.int32).contiguous()  # garbage past the count
    if poison_unvisited:
        visited = torch.zeros(B, HKV, nslots, dtype=torch.bool, device=DEV)
        hk = (torch.arange(H, device=DEV) // spec.group_size).view(1, H, 1, 1).expand_as(vl)
        bb = torch.arange(B, device=DEV).view(B, 1, 1, 1).expand_as(vl)
        ok = vl >= 0
        visited[bb[ok], hk[ok], vl[ok]] = True
        k_pool[~visited] = float("nan")
        v_pool[~visited] = float("nan")
    return dict(q=q, k_cur=k_cur, v_cur=v_cur, cur_valid=cur_valid, k_pool=k_pool, v_pool=v_pool,
                slot_valid=slot_valid, visit_slots=visit_slots, visit_count=visit_count)


ARGN = ("q", "k_cur", "v_cur", "cur_valid", "k_pool", "v_pool", "slot_valid", "visit_slots", "visit_count")
FLOATS = ("q", "k_cur", "v_cur", "k_pool", "v_pool")


def random_visits(B, H, NQB, n_persist, n_window, k, maxv, seed, var_counts=False):
    """Per (b, h, qb): all persistent slots [0, n_persist) + k random window slots."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.full((B, H, NQB, maxv), -1, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for qb in range(NQB):
                kk = k if not var_counts else int(torch.randint(0, k + 1, (1,), generator=g))
                win = torch.randperm(n_window, generator=g)[:kk] + n_persist
                s = torch.cat([torch.arange(n_persist), win]).sort().values
                out[b, h, qb, : s.numel()] = s
    return out


# -------------------------------------------------------------------------
# float64 reference (token mask materialised per head, on the device)
# -------------------------------------------------------------------------
def reference(spec, t, scale):
    q, k_cur, v_cur = t["q"], t["k_cur"], t["v_cur"]
    k_pool, v_pool = t["k_pool"], t["v_pool"]
    B, H, NQB, BT, D = q.shape
    NS = k_pool.shape[2]
    G, nb = spec.group_size, spec.blocks_per_frame
    dev = q.device
    tok = torch.arange(BT, device=dev)
    cv = t["cur_valid"].long()
    cur_tok_ok = (tok[None, :] < cv[:, None]).reshape(-1)  # [NQB*BT]
    qb_of_row = torch.arange(NQB * BT, device=dev) // BT
    jb = torch.arange(NQB * BT, device=dev) // BT
    if spec.current == "dense":
        blk = torch.ones(NQB * BT, NQB * BT, dtype=torch.bool, device=dev)
    else:
        blk = (jb[None, :] // nb) <= (qb_of_row[:, None] // nb)
    row_ok = cur_tok_ok
    outs, lses = [], []
    for b in range(B):
        ob, lb = [], []
        for h in range(H):
            kv = h // G
            K = torch.cat([k_cur[b, kv].reshape(-1, D), k_pool[b, kv].reshape(-1, D)])
            V = torch.cat([v_cur[b, kv].reshape(-1, D), v_pool[b, kv].reshape(-1, D)])
            m_cur = blk & cur_tok_ok[None, :]
            vis = torch.zeros(NQB, NS, dtype=torch.bool, device=dev)
            cnt = t["visit_count"][b, h].long()
            used = torch.arange(t["visit_slots"].shape[-1], device=dev)[None, :] < cnt[:, None]
            qi = torch.arange(NQB, device=dev)[:, None].expand_as(used)
            vis[qi[used], t["visit_slots"][b, h].long()[used]] = True
            sv = t["slot_valid"][b, kv].long()
            pool_tok_ok = (tok[None, :] < sv[:, None])  # [NS, BT]
            m_pool = (vis[:, :, None] & pool_tok_ok[None]).reshape(NQB, NS * BT)
            m_pool = m_pool.repeat_interleave(BT, 0)
            mask = torch.cat([m_cur, m_pool], 1) & row_ok[:, None]
            S = (q[b, h].reshape(-1, D) @ K.T) * scale
            S = S.masked_fill(~mask, float("-inf"))
            has = mask.any(1, keepdim=True)
            S = torch.where(has, S, torch.zeros_like(S))
            P = torch.softmax(S, 1) * has
            ob.append((P @ V).reshape(NQB, BT, D))
            lb.append(torch.where(has[:, 0], torch.logsumexp(S, 1), float("-inf")).reshape(NQB, BT))
        outs.append(torch.stack(ob))
        lses.append(torch.stack(lb))
    return torch.stack(outs), torch.stack(lses)


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_case(name, spec, B, nslots, visits, pad, seed, config=None):
    t = make_inputs(spec, B, nslots, visits, pad=pad, seed=seed)
    scale = spec.head_dim ** -0.5
    g = torch.Generator(device="cpu").manual_seed(seed + 99)
    go = torch.randn(t["q"].shape, generator=g).to(DEV)
    glse = torch.randn(t["q"].shape[:-1], generator=g).to(DEV)

    def run(grad_pool):
        leaves = {k: t[k].clone().requires_grad_(k in ("q", "k_cur", "v_cur") or grad_pool) for k in FLOATS}
        o, lse = pbsa_attention(spec, *[leaves.get(k, t[k]) for k in ARGN], config=config)
        fin = torch.isfinite(lse)
        loss = (o.float() * go).sum() + (torch.where(fin, lse, 0.0) * glse).sum()
        ws = [leaves[k] for k in FLOATS if leaves[k].requires_grad]
        grads = torch.autograd.grad(loss, ws)
        return o, lse, dict(zip([k for k in FLOATS if leaves[k].requires_grad], grads))

    launch.POISON_OUTPUTS = True
    o, lse, grads = run(True)
    o2, lse2, grads2 = run(True)
    _, _, grads3 = run(False)
    launch.POISON_OUTPUTS = False
    atomic = config is not None and launch.use_atomic_dq(config)
    if atomic:  # dQ's summation order varies: dK/dV bitwise, dQ equal within rounding
        drift = max(rel(grads2["q"], grads["q"]), rel(grads3["q"], grads["q"]))
        determ = all(torch.equal(grads[k], grads2[k]) for k in grads if k != "q") and torch.equal(o, o2)
        same_nopool = all(torch.equal(grads[k], grads3[k]) for k in grads3 if k != "q") and drift < 1e-2
    else:
        determ = all(torch.equal(grads[k], grads2[k]) for k in grads) and torch.equal(o, o2)
        same_nopool = all(torch.equal(grads[k], grads3[k]) for k in grads3)
    ref_leaves = {k: torch.nan_to_num(t[k].double(), nan=0.0, posinf=0.0, neginf=0.0).requires_grad_() for k in FLOATS}
    rt = dict(t)
    rt.update(ref_leaves)
    ro, rlse = reference(spec, rt, scale)
    fin = torch.isfinite(rlse)
    rloss = (ro * go.double()).sum() + (torch.where(fin, rlse, 0.0) * glse.double()).sum()
    rgrads = dict(zip(FLOATS, torch.autograd.grad(rloss, [ref_leaves[k] for k in FLOATS])))
    errs = {"o": rel(o, ro), "lse": rel(lse[fin], rlse[fin])}
    for k in FLOATS:
        errs["d" + k] = rel(grads[k], rgrads[k])
    pad_ok = bool(torch.equal(torch.isfinite(lse), fin) and (o[~fin] == 0).all())
    worst = max(errs.values())
    ok = worst <= 1e-2 and pad_ok and determ and same_nopool
    log(f"| {name} | {spec.num_heads}/{spec.num_kv_heads} | {spec.current} | {pad} | "
        + " | ".join(f"{errs[k]:.1e}" for k in errs)
        + (f" | dK/dV {determ}; dQ atomic, run-to-run {drift:.1e}" if atomic else f" | {determ}")
        + f" | {'PASS' if ok else 'FAIL'} |")
    return ok


def phase_check():
    log("\n## Correctness on the GPU (bf16 vs float64 reference; rel. Frobenius error)\n")
    log("| case | H/HKV | current | padding | o | lse | dq | dk_cur | dv_cur | dk_pool | dv_pool | bitwise-deterministic | result |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if ARGS.tiny:
        BT, D, H, c, nb, NS, maxv = 16, 16, 2, 2, 2, 6, 4
    else:
        BT, D, H, c, nb, NS, maxv = 128, 128, 12, 3, 2, 40, 12
    all_ok = True
    cases = [
        ("MHA dense", H, H, "dense", False),
        ("GQA causal pad", H, max(1, H // 4), "causal", True),
        ("MHA causal pad", H, H, "causal", True),
        ("GQA dense", H, max(1, H // 3), "dense", False),
    ]
    for i, (name, h, hkv, cur, pad) in enumerate(cases):
        spec = AttentionKernelSpec(BT, D, h, hkv, "bfloat16", c, nb, cur, maxv, pad)
        vis = random_visits(1, h, c * nb, 4, NS - 4, maxv - 4, maxv, seed=i, var_counts=True)
        base = launch.default_config(spec, torch.device(DEV))
        base_bwd = base.bwd_variant or base.variant
        alt = base.replace(fwd_kv_splits=2, bwd_fused=not base.bwd_fused, variant="ptr",
                           bwd_variant="desc" if base_bwd == "ptr" else "ptr")
        alt_name = (f"ptr fwd, split2, {alt.bwd_variant} " + ("fused" if alt.bwd_fused else "separate") + " bwd")
        if i % 2 == 0:  # every other case: the straight (non-overlapped) loops too
            alt = alt.replace(fwd_overlap=not base.fwd_overlap, dq_overlap=not base.dq_overlap,
                              dkdv_overlap=not base.dkdv_overlap)
            alt_name += ", other loop orders"
        other_dq = "ordered" if base.bwd_dq == "atomic" else "atomic"
        third = base.replace(bwd_dq=other_dq, dq_atomic_tma=(i % 2 == 1),
                             bwd_variant="desc" if i % 2 == 1 else base.bwd_variant)
        third_name = f"{other_dq} dQ" + (", TMA adds" if third.dq_atomic_tma and other_dq == "atomic" else "")
        for cname, cfg in (("default cfg", base), (alt_name, tiny_cfg(alt)), (third_name, tiny_cfg(third))):
            try:
                all_ok &= check_case(f"{name}, {cname}", spec, 1, NS, vis, pad, seed=i, config=cfg)
            except Exception:
                log(f"| {name}, {cname} | EXCEPTION | " + traceback.format_exc().replace("\n", " ")[-600:])
                all_ok = False
    log(f"\nall correctness checks: {'PASS' if all_ok else 'FAIL'}")
    return all_ok


# -------------------------------------------------------------------------
# the benchmark problem
# -------------------------------------------------------------------------
if ARGS.tiny:
    GEO = dict(B=1, H=2, D=16, BT=16, c=3, nb=2, n_persist=2, n_window=20)
else:
    GEO = dict(B=1, H=12, D=128, BT=128, c=3, nb=12, n_persist=32, n_window=444)
GEO["NQB"] = GEO["c"] * GEO["nb"]
GEO["NSLOTS"] = GEO["n_persist"] + GEO["n_window"]
GEO["NKV"] = GEO["NQB"] + GEO["NSLOTS"]


def bench_problem(density, seed=0, requires_grad=False):
    B, H, D, BT, NQB = GEO["B"], GEO["H"], GEO["D"], GEO["BT"], GEO["NQB"]
    nw = GEO["n_window"]
    k = nw if density >= 1.0 else max(1, round(density * nw))
    maxv = GEO["n_persist"] + k
    spec = AttentionKernelSpec(BT, D, H, H, "bfloat16", GEO["c"], GEO["nb"], "dense", maxv, False)
    vis = random_visits(B, H, NQB, GEO["n_persist"], nw, k, maxv, seed=seed)
    t = make_inputs(spec, B, GEO["NSLOTS"], vis, pad=False, seed=seed, poison_unvisited=False)
    if requires_grad:
        for kk in FLOATS:
            t[kk].requires_grad_(True)
    n_pairs = B * H * NQB * (NQB + maxv)
    return spec, t, vis, n_pairs


def flex_setup(spec, t, vis):
    """The identical block set for FlexAttention: KV = [current blocks ; pool slots]."""
    from torch.nn.attention.flex_attention import BlockMask

    B, H, NQB, BT, D = t["q"].shape
    NKV = NQB + t["k_pool"].shape[2]
    q = t["q"].reshape(B, H, NQB * BT, D)
    k = torch.cat([t["k_cur"], t["k_pool"]], 2).reshape(B, H, NKV * BT, D)
    v = torch.cat([t["v_cur"], t["v_pool"]], 2).reshape(B, H, NKV * BT, D)
    vl = vis.to(DEV)
    cnt = NQB + (vl >= 0).sum(-1)
    idx = torch.zeros(B, H, NQB, NKV, dtype=torch.int32, device=DEV)  # as wide as the KV blocks
    idx[..., :NQB] = torch.arange(NQB, device=DEV, dtype=torch.int32)
    mv = vl.shape[-1]
    idx[..., NQB:NQB + mv] = torch.where(vl >= 0, vl + NQB, 0).to(torch.int32)
    zeros_n = torch.zeros(B, H, NQB, dtype=torch.int32, device=DEV)
    zeros_i = torch.zeros_like(idx)
    # token-level mask_mod with the same block set: only evaluated by eager flex (CPU smoke
    # test); the compiled kernel skips it for full blocks
    allowed = torch.zeros(B, H, NQB, NKV, dtype=torch.bool, device=DEV)
    allowed[..., :NQB] = True
    bb = torch.arange(B, device=DEV).view(B, 1, 1, 1).expand_as(vl)
    hh = torch.arange(H, device=DEV).view(1, H, 1, 1).expand_as(vl)
    qq = torch.arange(NQB, device=DEV).view(1, 1, NQB, 1).expand_as(vl)
    ok = vl >= 0
    allowed[bb[ok], hh[ok], qq[ok], vl[ok] + NQB] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, h, q_idx // BT, kv_idx // BT]

    try:
        bm = BlockMask.from_kv_blocks(zeros_n, zeros_i, cnt.to(torch.int32), idx, BLOCK_SIZE=BT,
                                      mask_mod=mask_mod)
        mode = "full blocks"
    except Exception as e:  # older API: partial blocks
        log("from_kv_blocks with full blocks failed:", repr(e)[:200])
        bm = BlockMask.from_kv_blocks(cnt.to(torch.int32), idx, BLOCK_SIZE=BT, mask_mod=mask_mod)
        mode = "partial blocks"
    return q, k, v, bm, mode


_FLEX = {}


def flex_fn():
    if "f" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX["f"] = flex_attention if ARGS.tiny else torch.compile(flex_attention, dynamic=False)
    return _FLEX["f"]


# -------------------------------------------------------------------------
# sweep
# -------------------------------------------------------------------------
def fwd_candidates():
    # warp_specialize is left off: Triton 3.6 runs no warp-specialisation pass on sm_90
    # (the flag only matters on Blackwell), so it never changed the Hopper code.
    base = KernelConfig(variant="desc", fwd_block_m=128, fwd_block_n=128, fwd_warps=8, fwd_stages=3,
                        fwd_kv_splits=0, fwd_overlap=False)
    c = [
        ("desc straight 128x128 w8 s3 auto-split", base),
        ("desc straight 128x128 w8 s3 split2", base.replace(fwd_kv_splits=2)),
        ("desc overlap 128x64 w8 s3 auto-split", base.replace(fwd_block_n=64, fwd_overlap=True)),
        ("desc overlap 128x64 w8 s4 auto-split", base.replace(fwd_block_n=64, fwd_stages=4, fwd_overlap=True)),
        # one warpgroup per program, small enough for two programs per SM (they interleave
        # their softmax and matmuls, a poor man's ping-pong)
        ("desc straight 64x64 w4 s3 auto-split", base.replace(fwd_block_m=64, fwd_block_n=64, fwd_warps=4)),
        ("desc straight 64x128 w4 s2 auto-split", base.replace(fwd_block_m=64, fwd_warps=4, fwd_stages=2)),
        ("desc straight 128x64 w8 s3 auto-split", base.replace(fwd_block_n=64)),
        ("desc straight 128x64 w4 s3 auto-split", base.replace(fwd_block_n=64, fwd_warps=4)),
        # the Gluon forward (codegen/attention/gluon_forward.py): producer warp + two consumer
        # warpgroups
        ("gluon warp-specialised 2x64, 3-stage TMA ring (sm_90)", base.replace(fwd_gluon=True, fwd_kv_splits=1)),
    ]
    if ARGS.sweep_set == "small":
        c = c[:3]
    return c


def dq_candidates():
    base = KernelConfig(variant="desc", dq_block_m=128, dq_block_n=128, dq_warps=8, dq_stages=2, dq_overlap=False)
    c = [
        ("dq desc straight 128x128 w8 s2", base),
        ("dq ptr straight 128x128 w8 s2", base.replace(variant="ptr")),
        ("dq desc overlap 128x64 w8 s2", base.replace(dq_block_n=64, dq_overlap=True)),
    ]
    return c[:2] if ARGS.sweep_set == "small" else c


def dkdv_candidates():
    base = KernelConfig(variant="ptr", dkdv_block_m=64, dkdv_block_n=128, dkdv_warps=8, dkdv_stages=2,
                        dkdv_overlap=True)
    c = [
        ("dkdv ptr reordered 64x128 w8 s2", base),
        ("dkdv ptr straight 64x128 w8 s2", base.replace(dkdv_overlap=False)),
        ("dkdv desc reordered 64x128 w8 s2", base.replace(variant="desc")),
    ]
    return c[:2] if ARGS.sweep_set == "small" else c


def bwd_inputs(spec, args, do, cfg):
    """The backward launchers' common inputs (dummies for an empty pool, the module)."""
    return launch.BwdInputs.make(spec, *args, do, cfg.fitted(spec))


def tiny_cfg(cfg):
    return cfg.replace(fwd_kv_splits=min(cfg.fwd_kv_splits or 2, 2)) if ARGS.tiny else cfg


def phase_sweep(density=0.25):
    log(f"\n## Config sweep (local density {density:.2%}, ms, median of do_bench)\n")
    spec, t, vis, n_pairs = bench_problem(density)
    fl_f = 4 * spec.block_tokens**2 * spec.head_dim * n_pairs
    args = [t[k] for k in ARGN]
    scale = spec.head_dim ** -0.5
    best = {}
    log("| kernel | config | ms | TFLOP/s |")
    log("|---|---|---|---|")
    ref_o = None
    for name, cfg in fwd_candidates():
        cfg = tiny_cfg(cfg)
        try:
            fn = lambda: pbsa_attention(spec, *args, config=cfg, validate=False)  # noqa: E731
            o, lse = fn()
            if ref_o is None:
                ref_o = o
            err = rel(o, ref_o)
            ms = bench(fn)
            ok = err < 1e-2
            log(f"| fwd | {name} | {ms:.3f} | {fl_f / ms / 1e9:.0f} |" + ("" if ok else f" MISMATCH {err:.2e}"))
            if ok and ("fwd" not in best or ms < best["fwd"][0]):
                best["fwd"] = (ms, name, cfg)
        except Exception as e:
            log(f"| fwd | {name} | failed: {repr(e)[:160]} | |")
    # backward pieces, timed separately with the saved forward
    o, lse = pbsa_attention(spec, *args, validate=False)
    do = torch.randn_like(o)
    fl_dq = 3 * fl_f / 2  # 3 matmuls per tile in dQ (recompute QK, dP, dQ)
    fl_dkdv = 4 * fl_f / 2
    ref_dq = None
    for name, cfg in dq_candidates():
        try:
            fn = lambda: launch.launch_dq(bwd_inputs(spec, args, do, cfg), o, lse, None, scale, cfg.fitted(spec))  # noqa: E731
            dq, _ = fn()
            ref_dq = dq if ref_dq is None else ref_dq
            err = rel(dq, ref_dq)
            ms = bench(fn)
            log(f"| dq | {name} | {ms:.3f} | {fl_dq / ms / 1e9:.0f} |" + ("" if err < 1e-2 else f" MISMATCH {err:.2e}"))
            if err < 1e-2 and ("dq" not in best or ms < best["dq"][0]):
                best["dq"] = (ms, name, cfg)
        except Exception as e:
            log(f"| dq | {name} | failed: {repr(e)[:160]} | |")
    _, delta = launch.launch_dq(bwd_inputs(spec, args, do, KernelConfig()), o, lse, None, scale,
                                KernelConfig().fitted(spec))
    from codegen.attention.transpose import build_transposed_schedule

    ms_t = bench(lambda: build_transposed_schedule(spec, t["visit_slots"], t["visit_count"], GEO["NSLOTS"], True))
    log(f"| transposed schedule (all items; Triton mark-and-compact builder) | - | {ms_t:.3f} | - |")
    ref_dk = None
    for name, cfg in dkdv_candidates():
        try:
            fn = lambda: launch.launch_dkdv(bwd_inputs(spec, args, do, cfg), lse, delta, scale, True, cfg.fitted(spec))  # noqa: E731
            dkc, dvc, dkp, dvp = fn()
            ref_dk = dkp if ref_dk is None else ref_dk
            err = rel(dkp, ref_dk)
            ms = bench(fn)
            log(f"| dkdv (+transpose) | {name} | {ms:.3f} | {fl_dkdv / ms / 1e9:.0f} |" + ("" if err < 1e-2 else f" MISMATCH {err:.2e}"))
            if err < 1e-2 and ("dkdv" not in best or ms < best["dkdv"][0]):
                best["dkdv"] = (ms, name, cfg)
        except Exception as e:
            log(f"| dkdv | {name} | failed: {repr(e)[:160]} | |")
    f, d, k = best.get("fwd"), best.get("dq"), best.get("dkdv")
    # whole backward (as autograd runs it): separate dQ + dK/dV launches vs one fused launch
    if d and k:
        tiles = dict(variant="desc", bwd_variant=k[2].variant, dq_block_m=d[2].dq_block_m,
                     dq_block_n=d[2].dq_block_n, dq_warps=d[2].dq_warps, dq_stages=d[2].dq_stages,
                     dq_overlap=d[2].dq_overlap, dkdv_block_m=k[2].dkdv_block_m, dkdv_block_n=k[2].dkdv_block_n,
                     dkdv_warps=k[2].dkdv_warps, dkdv_stages=k[2].dkdv_stages, dkdv_overlap=k[2].dkdv_overlap,
                     bwd_warp_specialize=k[2].bwd_warp_specialize)
        other = "desc" if k[2].variant == "ptr" else "ptr"
        whole = [
            (f"bwd separate (best tiles, {k[2].variant})", KernelConfig(**tiles, bwd_fused=False)),
            (f"bwd fused (best tiles, {k[2].variant})", KernelConfig(**tiles, bwd_fused=True)),
            (f"bwd fused (best tiles, {other})", KernelConfig(**{**tiles, "bwd_variant": other}, bwd_fused=True)),
        ]
        atomic = KernelConfig(variant="desc", bwd_variant="ptr", bwd_dq="atomic", dkdv_block_m=64,
                              dkdv_block_n=128, dkdv_warps=8, dkdv_stages=2)
        whole += [
            ("bwd atomic dQ, ptr 64x128 w8 s2", atomic),
            ("bwd atomic dQ, desc 64x128 w8 s2, TMA adds", atomic.replace(bwd_variant="desc", dq_atomic_tma=True)),
            ("bwd atomic dQ, ptr 64x128 w8 s3", atomic.replace(dkdv_stages=3)),
            ("bwd atomic dQ, ptr 64x64 w4 s2", atomic.replace(dkdv_block_n=64, dkdv_warps=4)),
            ("bwd atomic dQ, ptr 128x128 w8 s2", atomic.replace(dkdv_block_m=128)),
        ]
        ref_b = None
        for name, cfg in whole:
            try:
                fn = lambda: launch.attention_backward(spec, *args, o, lse, do, None, scale, True, True, cfg)  # noqa: E731
                outs = fn()
                ref_b = outs if ref_b is None else ref_b
                err = max(rel(a, b) for a, b in zip(outs, ref_b))
                ms = bench(fn)
                log(f"| bwd (all grads) | {name} | {ms:.3f} | {2.5 * fl_f / ms / 1e9:.0f} (2.5x fwd flops) |"
                    + ("" if err < 1e-2 else f" MISMATCH {err:.2e}"))
                if err < 1e-2 and ("bwd" not in best or ms < best["bwd"][0]):
                    best["bwd"] = (ms, name, cfg)
            except Exception as e:
                log(f"| bwd | {name} | failed: {repr(e)[:160]} | |")
    if launch._WS_BROKEN:
        log(f"warp-specialised compiles that failed and fell back: {len(launch._WS_BROKEN)}")
    if ARGS.tiny:
        return None
    cfg = launch.default_config(spec, torch.device(DEV))
    if f:
        fc = f[2]
        cfg = cfg.replace(variant=fc.variant, warp_specialize=fc.warp_specialize, fwd_gluon=fc.fwd_gluon,
                          fwd_block_m=fc.fwd_block_m,
                          fwd_block_n=fc.fwd_block_n, fwd_warps=fc.fwd_warps, fwd_stages=fc.fwd_stages,
                          fwd_kv_splits=fc.fwd_kv_splits, fwd_overlap=fc.fwd_overlap)
    if d:
        dc = d[2]
        cfg = cfg.replace(dq_block_m=dc.dq_block_m, dq_block_n=dc.dq_block_n, dq_warps=dc.dq_warps,
                          dq_stages=dc.dq_stages, dq_overlap=dc.dq_overlap)
    if k:
        kc = k[2]
        cfg = cfg.replace(dkdv_block_m=kc.dkdv_block_m, dkdv_block_n=kc.dkdv_block_n, dkdv_warps=kc.dkdv_warps,
                          dkdv_stages=kc.dkdv_stages, dkdv_overlap=kc.dkdv_overlap)
    if best.get("bwd"):
        bc = best["bwd"][2]
        cfg = cfg.replace(dq_block_m=bc.dq_block_m, dq_block_n=bc.dq_block_n, dq_warps=bc.dq_warps,
                          dq_stages=bc.dq_stages, dkdv_block_m=bc.dkdv_block_m, dkdv_block_n=bc.dkdv_block_n,
                          dkdv_warps=bc.dkdv_warps, dkdv_stages=bc.dkdv_stages,
                          bwd_warp_specialize=bc.bwd_warp_specialize, bwd_fused=bc.bwd_fused,
                          dq_overlap=bc.dq_overlap, dkdv_overlap=bc.dkdv_overlap, bwd_variant=bc.bwd_variant,
                          bwd_dq=bc.bwd_dq, dq_atomic_tma=bc.dq_atomic_tma)
    log("\nchosen:", {kk: vv[1] for kk, vv in best.items()})
    log("chosen config:", cfg)
    return cfg


# -------------------------------------------------------------------------
# table
# -------------------------------------------------------------------------
def phase_table(cfg):
    log("\n## PBSA vs FlexAttention vs SDPA (bf16, B=1, H=12, D=128, 36 query blocks x 128, "
        f"{GEO['NKV']} KV blocks x 128)\n")
    log(f"config: {cfg}\n")
    log("| local density | blocks/query block | pass | PBSA ms | Flex ms | SDPA ms | PBSA TFLOP/s | Flex TFLOP/s | PBSA vs Flex | rel.err PBSA vs Flex (o) |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    dens = [float(x) for x in ARGS.densities.split(",")]
    sdpa_ms = {}
    rows = []
    for d in dens:
        spec, t, vis, n_pairs = bench_problem(d, seed=1, requires_grad=True)
        nblk = n_pairs // (GEO["B"] * GEO["H"] * GEO["NQB"])
        fl_f = 4 * spec.block_tokens**2 * spec.head_dim * n_pairs
        args = [t[k] for k in ARGN]
        leaves = [t[k] for k in FLOATS]
        det = {k: (t[k].detach() if t[k].is_floating_point() else t[k]) for k in ARGN}
        dargs = [det[k] for k in ARGN]
        do = torch.randn(t["q"].shape, device=DEV, dtype=t["q"].dtype)

        def pb_f():
            return pbsa_attention(spec, *dargs, config=cfg, validate=False)

        def pb_fb():
            o, _ = pbsa_attention(spec, *args, config=cfg, validate=False)
            return torch.autograd.grad(o, leaves, do)

        cur_leaves = [t["q"], t["k_cur"], t["v_cur"]]
        dargs_cur = [t[k] if k in ("q", "k_cur", "v_cur") else det[k] for k in ARGN]

        def pb_fb_detached():  # the usual case: cached pool blocks need no gradient
            o, _ = pbsa_attention(spec, *dargs_cur, config=cfg, validate=False)
            return torch.autograd.grad(o, cur_leaves, do)

        res = {"PBSA": {}, "Flex": {}, "SDPA": {}}
        o_pb, _ = pb_f()
        res["PBSA"]["fwd"] = bench(pb_f)
        res["PBSA"]["fwd+bwd"] = bench(pb_fb)
        res["PBSA"]["fwd+bwd, pool detached (PBSA skips dK/dV of the pool)"] = bench(pb_fb_detached)
        err = float("nan")
        if not ARGS.no_flex:
            try:
                q, k, v, bm, mode = flex_setup(spec, {kk: t[kk].detach() for kk in FLOATS}, vis)
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                f = flex_fn()
                o_fx = f(q, k, v, block_mask=bm)
                err = rel(o_fx.reshape(o_pb.shape), o_pb)
                res["Flex"]["fwd"] = bench(lambda: f(q, k, v, block_mask=bm))
                dof = do.reshape(o_fx.shape)

                def fx_fb():
                    o = f(qg, kg, vg, block_mask=bm)
                    return torch.autograd.grad(o, (qg, kg, vg), dof)

                res["Flex"]["fwd+bwd"] = bench(fx_fb)
                res["Flex"]["mode"] = mode
            except Exception as e:
                log("flex failed:", repr(e)[:300])
        if "fwd" not in sdpa_ms:
            try:
                B, H, NQB, BT, D = t["q"].shape
                NKV = GEO["NKV"]
                qs = torch.randn(B, H, NQB * BT, D, device=DEV, dtype=t["q"].dtype, requires_grad=True)
                ks = torch.randn(B, H, NKV * BT, D, device=DEV, dtype=t["q"].dtype, requires_grad=True)
                vs = torch.randn(B, H, NKV * BT, D, device=DEV, dtype=t["q"].dtype, requires_grad=True)
                sd = torch.nn.functional.scaled_dot_product_attention
                with torch.no_grad():
                    sdpa_ms["fwd"] = bench(lambda: sd(qs, ks, vs))
                dos = torch.randn(B, H, NQB * BT, D, device=DEV, dtype=t["q"].dtype)
                sdpa_ms["fwd+bwd"] = bench(lambda: torch.autograd.grad(sd(qs, ks, vs), (qs, ks, vs), dos))
                sdpa_ms["pairs"] = B * H * NQB * NKV
            except Exception as e:
                log("sdpa failed:", repr(e)[:300])
        for p in ("fwd", "fwd+bwd", "fwd+bwd, pool detached (PBSA skips dK/dV of the pool)"):
            mult = 1.0 if p == "fwd" else 3.5
            pb = res["PBSA"].get(p)
            pk = "fwd" if p == "fwd" else "fwd+bwd"
            fx = res["Flex"].get(pk)
            sd = sdpa_ms.get(pk)
            tf = lambda ms: fl_f * mult / ms / 1e9 if ms else float("nan")  # noqa: E731
            ratio = fx / pb if (fx and pb) else float("nan")
            detached = "detached" in p  # PBSA does less work there: no achieved-rate figure
            line = (f"| {'dense' if d >= 1 else f'{d:.2%}'} | {nblk} | {p} | {pb:.3f} | "
                    + (f"{fx:.3f}" if fx else "n/a") + " | " + (f"{sd:.3f}" if sd else "n/a")
                    + (" | - | " if detached else f" | {tf(pb):.0f} | ")
                    + (f"{tf(fx):.0f}" if fx else "n/a") + f" | {ratio:.2f}x | {err:.1e} |")
            log(line)
            rows.append(dict(density=d, blocks=nblk, pass_=p, pbsa_ms=pb, flex_ms=fx, sdpa_ms=sd,
                             pbsa_tflops=tf(pb), flex_tflops=tf(fx) if fx else None, ratio=ratio, err=err))
    if sdpa_ms.get("pairs"):
        fl = 4 * GEO["BT"] ** 2 * GEO["D"] * sdpa_ms["pairs"]
        log(f"\nSDPA dense (all {GEO['NKV']} KV blocks): fwd {sdpa_ms['fwd']:.3f} ms = {fl / sdpa_ms['fwd'] / 1e9:.0f} TFLOP/s, "
            f"fwd+bwd {sdpa_ms['fwd+bwd']:.3f} ms = {3.5 * fl / sdpa_ms['fwd+bwd'] / 1e9:.0f} TFLOP/s")
    # validation overhead, for honesty
    spec, t, vis, _ = bench_problem(0.25, seed=1)
    args = [t[k] for k in ARGN]
    ms_v = bench(lambda: pbsa_attention(spec, *args, config=cfg, validate=True))
    ms_nv = bench(lambda: pbsa_attention(spec, *args, config=cfg, validate=False))
    log(f"\nPBSA fwd at 25%: {ms_nv:.3f} ms without value validation, {ms_v:.3f} ms with it (one host sync)")
    with open(os.path.join(OUT, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def phase_splits():
    """Forward time against the number of KV splits per query tile, at every density: checks
    the launcher's automatic choice (launch._auto_splits)."""
    log("\n## Forward vs KV splits (default config otherwise; ms, median of do_bench)\n")
    log("| local density | blocks / query block | splits=1 | 2 | 3 | 4 | automatic choice |")
    log("|---|---|---|---|---|---|---|")
    for density in [float(x) for x in ARGS.densities.split(",")]:
        spec, t, vis, n_pairs = bench_problem(density)
        args = [t[k] for k in ARGN]
        base = launch.default_config(spec, torch.device(DEV)).replace(fwd_gluon=False)  # Triton's splits
        times = []
        for splits in (1, 2, 3, 4):
            cfg = base.replace(fwd_kv_splits=splits)
            times.append(bench(lambda: pbsa_attention(spec, *args, config=cfg, validate=False)))
        n_prog = spec.num_heads * spec.num_query_blocks * (spec.block_tokens // base.fitted(spec).fwd_block_m)
        auto = launch._auto_splits(n_prog, torch.device(DEV), spec, base.fitted(spec)) if not ARGS.tiny else 1
        log(f"| {density:.2%} | {n_pairs // (spec.num_heads * spec.num_query_blocks)} | "
            + " | ".join(f"{x:.3f}" for x in times) + f" | {auto} |")


def main():
    phases = ARGS.phases.split(",")
    if not ARGS.tiny:
        p = torch.cuda.get_device_properties(0)
        log(f"# PBSA attention on {torch.cuda.get_device_name(0)} ({p.multi_processor_count} SMs)")
    log(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, torch {torch.__version__}, "
        f"triton {triton.__version__}, python {sys.version.split()[0]}")
    log(f"command: cd /work/main && PYTHONPATH=. python3 bench/gpu_attention.py {' '.join(sys.argv[1:])}")
    t0 = time.time()
    try:
        if "check" in phases:
            phase_check()
            log(f"[check done at {time.time() - t0:.0f}s]")
        cfg = None
        if "sweep" in phases:
            cfg = phase_sweep()
            log(f"[sweep done at {time.time() - t0:.0f}s]")
        if "splits" in phases:
            phase_splits()
            log(f"[splits done at {time.time() - t0:.0f}s]")
        if cfg is None:
            cfg = launch.default_config(bench_problem(0.25)[0], torch.device(DEV))
        if "table" in phases:
            phase_table(cfg)
            log(f"[table done at {time.time() - t0:.0f}s]")
    finally:
        with open(os.path.join(OUT, "bench.md"), "w") as f:
            f.write("\n".join(LOG_LINES) + "\n")


if __name__ == "__main__":
    main()
