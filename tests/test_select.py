"""codegen/select.py (block representatives, window Top-K, block importance) against
independent float64 references written here with plain loops.

Both implementations run on every example: the Triton kernels (under TRITON_INTERPRET=1
when there is no GPU, set below before triton is imported) and the torch fallback.

Exactness: with QUANTISED inputs (small integers) every fp32 dot product is exact, so
the picks must equal the reference exactly, in order (best first, equal scores by
ascending window position); these inputs produce many exact ties. With continuous
inputs the fp32 and float64 rankings may differ only between scores closer than
fp32 rounding, so the check is "a valid top k within 1e-4".
Unreferenced pool slots and padding tokens hold NaN: any leak fails the comparisons.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from codegen import select as sel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAN = float("nan")


# ====================================================================================
# float64 references (loops, straight from the definitions)
# ====================================================================================
def ref_representatives(x, valid):
    B, Hx, NB, BT, D = x.shape
    out = torch.zeros(B, Hx, NB, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hx):
            for n in range(NB):
                v = int(valid[n] if valid.dim() == 1 else valid[b, h, n])
                if v:
                    out[b, h, n] = x[b, h, n, :v].double().cpu().mean(dim=0)
    return out


def ref_select(q_rep, k_pool, window_slots, nw, static_pos, static_count, mode, k):
    """{(b, h, qb): [(score, position, slot), ...] best first} and the candidate scores."""
    B, H, NQB, _ = q_rep.shape
    group = H // k_pool.shape[1]
    picks, cands = {}, {}
    for b in range(B):
        for h in range(H):
            g = h // group
            for qb in range(NQB):
                static = {int(static_pos[qb, s]) for s in range(int(static_count[qb]))}
                positions = [p for p in range(nw) if (p in static) == (mode == "intersection")]
                q = q_rep[b, h, qb].double().cpu()
                scored = []
                for p in positions:
                    slot = int(window_slots[b, g, p])
                    scored.append((float(q @ k_pool[b, g, slot].double().cpu()), p, slot))
                scored.sort(key=lambda t: (-t[0], t[1]))  # highest first, ties: lower position
                picks[(b, h, qb)] = scored[:k]
                cands[(b, h, qb)] = scored
    return picks, cands


def ref_importance(q_rep, k_pool, domain_slots, nd, scale):
    B, H, NQB, _ = q_rep.shape
    group = H // k_pool.shape[1]
    out = torch.zeros(B, H, domain_slots.shape[2], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            if nd == 0:
                continue
            g = h // group
            keys = torch.stack([k_pool[b, g, int(domain_slots[b, g, j])].double().cpu()
                                for j in range(nd)])
            for qb in range(NQB):
                logits = [float(q_rep[b, h, qb].double().cpu() @ keys[j]) * scale for j in range(nd)]
                m = max(logits)
                e = [math.exp(z - m) for z in logits]
                s = sum(e)
                for j in range(nd):
                    out[b, h, j] += e[j] / s
    return out


# ====================================================================================
# input generation
# ====================================================================================
def _values(gen, shape, quantised):
    x = torch.randn(shape, generator=gen)
    return torch.round(x * 1.5) if quantised else x


def _maybe_strided(x, gen):
    """Half the time, the same values in a non-contiguous tensor (a permuted allocation)."""
    if torch.rand((), generator=gen) < 0.5:
        return x
    return x.transpose(0, 1).contiguous().transpose(0, 1)


@st.composite
def select_cases(draw, max_b=2):
    B = draw(st.integers(1, max_b))
    hkv = draw(st.integers(1, 2))
    H = hkv * draw(st.integers(1, 2))
    NQB = draw(st.integers(1, 6))
    D = draw(st.sampled_from([4, 8, 16]))
    nwmax = draw(st.integers(1, 20))
    nw = draw(st.integers(0, nwmax))
    nslots = nwmax + draw(st.integers(0, 6))
    smax = draw(st.integers(0, 5))
    mode = draw(st.sampled_from(["union", "intersection"]))
    k = draw(st.integers(0, nw + 3))
    quantised = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(B=B, hkv=hkv, H=H, NQB=NQB, D=D, nwmax=nwmax, nw=nw, nslots=nslots,
                smax=smax, mode=mode, k=k, quantised=quantised, seed=seed)


def make_select_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    B, H, hkv, NQB, D = c["B"], c["H"], c["hkv"], c["NQB"], c["D"]
    nw, nwmax, nslots, smax = c["nw"], c["nwmax"], c["nslots"], c["smax"]
    q_rep = _maybe_strided(_values(gen, (B, H, NQB, D), c["quantised"]), gen)
    k_pool = _values(gen, (B, hkv, nslots, D), c["quantised"])
    window_slots = torch.empty(B, hkv, nwmax, dtype=torch.int32)
    for b in range(B):
        for g in range(hkv):
            perm = torch.randperm(nslots, generator=gen)
            window_slots[b, g, :nw] = perm[:nw].int()
            used = set(perm[:nw].tolist())
            for s in range(nslots):  # poison every slot the valid window does not reference
                if s not in used:
                    k_pool[b, g, s] = NAN
            # padding positions: poisoned slots or garbage (must never be read)
            pad = torch.randint(-3, nslots + 5, (nwmax - nw,), generator=gen)
            window_slots[b, g, nw:] = pad.int()
    static_count = torch.randint(0, smax + 1, (NQB,), generator=gen).int() if nw else \
        torch.zeros(NQB, dtype=torch.int32)
    static_pos = torch.randint(-4, nwmax + 4, (NQB, smax), generator=gen).int()  # padding garbage
    for qb in range(NQB):
        n = int(static_count[qb])
        if n:  # real entries: window positions, duplicates allowed
            static_pos[qb, :n] = torch.randint(0, nw, (n,), generator=gen).int()
    # candidate counts, then a visit table with random existing entries and just enough room
    picks_per_qb = []
    for qb in range(NQB):
        static = set(static_pos[qb, :int(static_count[qb])].tolist())
        n_cand = len(static) if c["mode"] == "intersection" else nw - len(static)
        picks_per_qb.append(min(c["k"], n_cand))
    count0 = torch.randint(0, 4, (B, H, NQB), generator=gen).int()
    need = max(int(count0.max()) + max(picks_per_qb), 1)
    maxv = need + int(torch.randint(0, 3, (), generator=gen))
    visit_slots = torch.randint(1000, 2000, (B, H, NQB, maxv), generator=gen).int()
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(q_rep=dev(q_rep), k_pool=dev(k_pool), window_slots=dev(window_slots),
                static_pos=dev(static_pos), static_count=dev(static_count),
                count0=count0, visit_slots0=visit_slots)


def run_select(backend, c, inp, **kw):
    vs = inp["visit_slots0"].clone().to(DEVICE)
    vc = inp["count0"].clone().to(DEVICE)
    sel.select_topk(inp["q_rep"], inp["k_pool"], inp["window_slots"], c["nw"], inp["static_pos"],
                    inp["static_count"], c["mode"], c["k"], vs, vc, backend=backend, **kw)
    return vs.cpu(), vc.cpu()


def check_select(c, inp, vs, vc):
    ref, cands = ref_select(inp["q_rep"], inp["k_pool"], inp["window_slots"], c["nw"],
                            inp["static_pos"], inp["static_count"], c["mode"], c["k"])
    count0, vs0 = inp["count0"], inp["visit_slots0"]
    B, H, NQB = count0.shape
    for b in range(B):
        for h in range(H):
            for qb in range(NQB):
                want = ref[(b, h, qb)]
                c0 = int(count0[b, h, qb])
                where = f"(b={b}, h={h}, qb={qb}, case={c})"
                assert int(vc[b, h, qb]) == c0 + len(want), where
                # existing entries and the columns past the new count are untouched
                assert torch.equal(vs[b, h, qb, :c0], vs0[b, h, qb, :c0]), where
                assert torch.equal(vs[b, h, qb, c0 + len(want):], vs0[b, h, qb, c0 + len(want):]), where
                got = vs[b, h, qb, c0:c0 + len(want)].tolist()
                if c["quantised"]:
                    assert got == [slot for _, _, slot in want], where
                    continue
                # continuous inputs: a valid top-k up to fp32 rounding, best first
                by_slot = {slot: (score, p) for score, p, slot in cands[(b, h, qb)]}
                assert len(set(got)) == len(got) and all(s in by_slot for s in got), where
                scores = [by_slot[s][0] for s in got]
                rest = [score for score, _, slot in cands[(b, h, qb)] if slot not in set(got)]
                tol = 1e-4 * (1 + max([abs(s) for s, _, _ in cands[(b, h, qb)]], default=0))
                if scores and rest:
                    assert min(scores) >= max(rest) - tol, where
                assert all(x >= y - tol for x, y in zip(scores, scores[1:])), where


# ====================================================================================
# select_topk
# ====================================================================================
@SETTINGS
@given(select_cases())
def test_select_topk_matches_reference(c):
    inp = make_select_inputs(c)
    results = {be: run_select(be, c, inp) for be in BACKENDS}
    for be, (vs, vc) in results.items():
        check_select(c, inp, vs, vc)
    if c["quantised"]:  # exact scores: both implementations write identical tables
        assert torch.equal(results["torch"][0], results["triton"][0])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(select_cases(max_b=1))
def test_select_topk_sort_path_matches_reference(c):
    """The GPU's large-k path (one tl.sort per row) gives the same picks as the rounds."""
    inp = make_select_inputs(c)
    old = sel.SELECT_TOPK_ALGO
    try:
        sel.SELECT_TOPK_ALGO = "sort"
        vs, vc = run_select("triton", c, inp)
    finally:
        sel.SELECT_TOPK_ALGO = old
    check_select(c, inp, vs, vc)


def test_select_topk_tie_rule_and_order():
    """All scores equal: the k lowest positions, in ascending order; then a clear winner."""
    q = torch.ones(1, 1, 2, 4, device=DEVICE)
    k_pool = torch.ones(1, 1, 8, 4, device=DEVICE)
    k_pool[0, 0, 5] = 2.0                       # position 6 (slot 5) wins for every block
    ws = torch.tensor([[[7, 6, 4, 3, 2, 1, 5, 0]]], dtype=torch.int32, device=DEVICE)
    sp = torch.tensor([[1, 0], [0, 0]], dtype=torch.int32, device=DEVICE)
    sc = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    for be in BACKENDS:
        vs = torch.full((1, 1, 2, 4), -1, dtype=torch.int32, device=DEVICE)
        vc = torch.zeros(1, 1, 2, dtype=torch.int32, device=DEVICE)
        sel.select_topk(q, k_pool, ws, 8, sp, sc, "union", 3, vs, vc, backend=be)
        # block 0 excludes position 1: slot 5 (pos 6), then pos 0 (slot 7), pos 2 (slot 4)
        assert vs[0, 0, 0, :3].tolist() == [5, 7, 4], be
        assert vs[0, 0, 1, :3].tolist() == [5, 7, 6], be
        assert vc.tolist() == [[[3, 3]]], be


def test_select_topk_signed_zero_and_nan_scores():
    """-0.0 ties with +0.0 (lower position first); a NaN score ranks last."""
    q = torch.tensor([[[[1.0, 0.0]]]], device=DEVICE)
    k_pool = torch.tensor([[[[0.0, 0.0], [-0.0, 0.0], [NAN, 0.0], [-1.0, 0.0]]]], device=DEVICE)
    ws = torch.tensor([[[2, 1, 0, 3]]], dtype=torch.int32, device=DEVICE)  # scores NaN, -0, +0, -1
    sp = torch.zeros(1, 0, dtype=torch.int32, device=DEVICE)
    sc = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for be in BACKENDS:
        vs = torch.zeros(1, 1, 1, 4, dtype=torch.int32, device=DEVICE)
        vc = torch.zeros(1, 1, 1, dtype=torch.int32, device=DEVICE)
        sel.select_topk(q, k_pool, ws, 4, sp, sc, "union", 4, vs, vc, backend=be)
        assert vs.flatten().tolist() == [1, 0, 3, 2], be


def test_select_topk_without_value_checks_never_writes_out_of_bounds():
    """check_values=False and too little room: picks past MAXV are dropped, count clipped."""
    q = torch.arange(4.0, device=DEVICE).reshape(1, 1, 1, 4)
    k_pool = torch.randn(1, 1, 6, 4, device=DEVICE)
    ws = torch.arange(6, dtype=torch.int32, device=DEVICE).reshape(1, 1, 6)
    sp = torch.zeros(1, 0, dtype=torch.int32, device=DEVICE)
    sc = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = {}
    for be in BACKENDS:
        big = torch.full((1, 1, 1, 8), -7, dtype=torch.int32, device=DEVICE)
        vs = big[..., :3]                       # a view: the columns after it must stay -7
        vc = torch.full((1, 1, 1), 1, dtype=torch.int32, device=DEVICE)
        with pytest.raises(ValueError, match="no room"):
            sel.select_topk(q, k_pool, ws, 6, sp, sc, "union", 4, vs, vc, backend=be)
        sel.select_topk(q, k_pool, ws, 6, sp, sc, "union", 4, vs, vc, backend=be,
                        check_values=False)
        assert vc.item() == 3 and big[0, 0, 0, 0].item() == -7, be
        assert (big[0, 0, 0, 3:] == -7).all(), be
        out[be] = big.clone()
    assert torch.equal(out["torch"], out["triton"])


# ====================================================================================
# block_importance
# ====================================================================================
@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 6),
       st.sampled_from([4, 8, 16]), st.integers(1, 20), st.booleans(), st.integers(0, 2**31 - 1))
def test_block_importance_matches_reference(B, hkv, group, NQB, D, ndmax, quantised, seed):
    gen = torch.Generator().manual_seed(seed)
    H = hkv * group
    nd = int(torch.randint(0, ndmax + 1, (), generator=gen))
    nslots = ndmax + 3
    q_rep = _maybe_strided(_values(gen, (B, H, NQB, D), quantised), gen)
    k_pool = _values(gen, (B, hkv, nslots, D), quantised)
    ds = torch.randint(-2, nslots + 3, (B, hkv, ndmax), generator=gen).int()  # padding garbage
    for b in range(B):
        for g in range(hkv):
            perm = torch.randperm(nslots, generator=gen)
            ds[b, g, :nd] = perm[:nd].int()
            for s in perm[nd:].tolist():
                k_pool[b, g, s] = NAN
    scale = 1.0 / math.sqrt(D)
    ref = ref_importance(q_rep, k_pool, ds, nd, scale)
    for be in BACKENDS:
        got = sel.block_importance(q_rep.to(DEVICE), k_pool.to(DEVICE), ds.to(DEVICE), nd, scale,
                                   backend=be).cpu()
        assert got.shape == (B, H, ndmax) and got.dtype == torch.float32
        assert torch.isfinite(got).all(), be
        assert (got[..., nd:] == 0).all(), be
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5, msg=lambda m: f"{be}: {m}")
        if nd:  # each query block spreads probability 1 over the domain
            torch.testing.assert_close(got.double().sum(-1), torch.full((B, H), float(NQB),
                                       dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_block_importance_many_query_tiles():
    """More query blocks than one program holds: per-tile partial sums are added up."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 37, 8, generator=gen)
    k_pool = torch.randn(1, 1, 300, 8, generator=gen)
    ds = torch.randperm(300, generator=gen)[:260].int().reshape(1, 1, 260)
    ref = ref_importance(q, k_pool, ds, 250, 0.3)
    for be in BACKENDS:
        got = sel.block_importance(q.to(DEVICE), k_pool.to(DEVICE), ds.to(DEVICE), 250, 0.3,
                                   backend=be).cpu()
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 11),
       st.sampled_from([(4, 4), (6, 8), (16, 16)]), st.integers(0, 6), st.integers(0, 8),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_commit_importance_matches_reference(B, hkv, group, NQB, bt_d, na, nwin, padded_q, seed):
    """The commit's fused launch: query representatives from the tokens (a prefix of each
    block is real; the rest holds NaN), the domain read from two tables (persistent then
    window); the partial sums over the query tiles add up to the float64 importance."""
    bt, D = bt_d
    gen = torch.Generator().manual_seed(seed)
    H = hkv * group
    nd = na + nwin
    amax, wmax = na + 2, nwin + 3
    nslots = nd + 4
    x = torch.randn(B, H, NQB, bt, D, generator=gen)
    valid = torch.randint(1 if not padded_q else 0, bt + 1, (NQB,), generator=gen).int()
    for n in range(NQB):
        x[:, :, n, int(valid[n]):] = NAN
    k_pool = torch.randn(B, hkv, nslots, D, generator=gen)
    dom_a = torch.full((B, hkv, amax), -7, dtype=torch.int32)   # padding garbage
    dom_b = torch.full((B, hkv, wmax), nslots + 5, dtype=torch.int32)
    dom = torch.zeros(B, hkv, nd, dtype=torch.int32)
    for b in range(B):
        for g in range(hkv):
            perm = torch.randperm(nslots, generator=gen)
            dom[b, g] = perm[:nd].int()
            dom_a[b, g, :na], dom_b[b, g, :nwin] = dom[b, g, :na], dom[b, g, na:]
            for s in perm[nd:].tolist():
                k_pool[b, g, s] = NAN
    scale = 1.0 / math.sqrt(D)
    q_rep_ref = ref_representatives(x, valid)
    ref = ref_importance(q_rep_ref, k_pool, dom, nd, scale)
    ndom = amax + wmax
    launch = sel.CommitImportance(NQB, bt, D, ndom)
    q_rep = torch.zeros(B, H, NQB, D, device=DEVICE)
    part = torch.full((B, H, launch.n_tiles, ndom), NAN, device=DEVICE)
    tokens = x.reshape(B, H, NQB * bt, D).to(DEVICE)
    launch.launch(tokens, valid.to(DEVICE), q_rep, k_pool.to(DEVICE), dom_a.to(DEVICE), na,
                  dom_b.to(DEVICE), nd, part, scale, group)
    torch.testing.assert_close(q_rep.cpu().double(), q_rep_ref, rtol=1e-5, atol=1e-6)
    got = part.cpu().double().sum(dim=2)
    assert (got[..., nd:] == 0).all()
    torch.testing.assert_close(got[..., :nd], ref, rtol=2e-5, atol=2e-5)


# ====================================================================================
# block_representatives
# ====================================================================================
@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.sampled_from([4, 16]),
       st.sampled_from([4, 8, 16]), st.sampled_from(["float32", "bfloat16", "float16"]),
       st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_block_representatives_matches_reference(B, Hx, NB, BT, D, dtype, per_head, use_out, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Hx, NB, BT, D, generator=gen).to(getattr(torch, dtype))
    shape = (B, Hx, NB) if per_head else (NB,)
    valid = torch.randint(0, BT + 1, shape, generator=gen).int()
    vb = valid if per_head else valid.expand(B, Hx, NB)
    for b in range(B):  # poison the padding tokens (past each block's real prefix)
        for h in range(Hx):
            for n in range(NB):
                x[b, h, n, int(vb[b, h, n]):] = NAN
    ref = ref_representatives(x, valid)
    for be in BACKENDS:
        xs = x.to(DEVICE)
        if use_out:  # write into a slice of a larger pool; the rest must stay untouched
            pool = torch.full((B, Hx, NB + 3, D), -5.0, device=DEVICE)
            got = sel.block_representatives(xs, valid.to(DEVICE), pool[:, :, 2:2 + NB], backend=be)
            assert (pool[:, :, :2] == -5).all() and (pool[:, :, 2 + NB:] == -5).all(), be
            assert got.data_ptr() == pool[:, :, 2:].data_ptr()
        else:
            got = sel.block_representatives(xs, valid.to(DEVICE), backend=be)
        assert got.dtype == torch.float32 and got.shape == (B, Hx, NB, D)
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{be}: {m}")


# ====================================================================================
# validation: ValueError naming the argument, never a Triton crash
# ====================================================================================
def _good_select_args():
    dev = DEVICE
    return dict(
        q_rep=torch.zeros(1, 2, 3, 4, device=dev), k_rep_pool=torch.zeros(1, 1, 10, 4, device=dev),
        window_slots=torch.arange(6, dtype=torch.int32, device=dev).reshape(1, 1, 6),
        window_count=5,
        static_pos=torch.tensor([[0, 1], [2, 9], [4, 4]], dtype=torch.int32, device=dev),
        static_count=torch.tensor([2, 1, 0], dtype=torch.int32, device=dev),
        mode="union", k=2,
        visit_slots=torch.zeros(1, 2, 3, 4, dtype=torch.int32, device=dev),
        visit_count=torch.zeros(1, 2, 3, dtype=torch.int32, device=dev))


def _i32(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


SELECT_ERRORS = [
    ("window_count", dict(window_count=7), "window_count = 7"),
    ("window_count_type", dict(window_count=2.5), "window_count"),
    ("k", dict(k=-1), "k = -1"),
    ("mode", dict(mode="both"), "mode = 'both'"),
    ("q_dtype", dict(q_rep=torch.zeros(1, 2, 3, 4, dtype=torch.float16)), "q_rep.dtype = float16"),
    ("pool_d", dict(k_rep_pool=torch.zeros(1, 1, 10, 5)), "k_rep_pool.shape"),
    ("gqa", dict(k_rep_pool=torch.zeros(1, 3, 10, 4)), "multiple of HKV = 3"),
    ("slots_dtype", dict(window_slots=torch.zeros(1, 1, 6, dtype=torch.int64)), "window_slots.dtype = int64"),
    ("slots_range", dict(window_slots=torch.tensor([[[0, 1, 10, 3, 4, 5]]], dtype=torch.int32)),
     "window_slots[0, 0, 2] = 10"),
    ("static_shape", dict(static_pos=torch.zeros(2, 2, dtype=torch.int32)), "static_pos.shape"),
    ("static_count_range", dict(static_count=_i32(3, 0, 0)), "static_count[0] = 3"),
    ("static_pos_range", dict(static_count=_i32(2, 2, 0)), "static_pos[1, 1] = 9"),
    ("visit_count_range", dict(visit_count=torch.full((1, 2, 3), 5, dtype=torch.int32)),
     "visit_count[0, 0, 0] = 5"),
    ("room", dict(visit_count=torch.full((1, 2, 3), 3, dtype=torch.int32)), "no room"),
    ("visit_shape", dict(visit_slots=torch.zeros(1, 2, 4, 4, dtype=torch.int32)), "visit_slots.shape"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,message", SELECT_ERRORS, ids=[e[0] for e in SELECT_ERRORS])
def test_select_topk_rejects_bad_inputs(backend, name, change, message):
    args = _good_select_args()
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()})
    before = args["visit_slots"].clone()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sel.select_topk(**args, backend=backend)
    assert torch.equal(args["visit_slots"], before)  # nothing was launched


def test_select_topk_good_args_pass():
    for be in BACKENDS:
        args = _good_select_args()
        sel.select_topk(**args, backend=be)
        assert (args["visit_count"] == 2).all(), be


def test_other_validation_errors():
    x = torch.zeros(1, 1, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"valid.shape = \(3,\)"):
        sel.block_representatives(x, _i32(1, 2, 3))
    with pytest.raises(ValueError, match="allowed: 0..BT=4"):
        sel.block_representatives(x, _i32(1, 5))
    with pytest.raises(ValueError, match="valid.dtype = int64"):
        sel.block_representatives(x, torch.ones(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="out.shape"):
        sel.block_representatives(x, _i32(1, 2), out=torch.zeros(1, 1, 2, 7, device=DEVICE))
    q = torch.zeros(1, 2, 3, 4, device=DEVICE)
    pool = torch.zeros(1, 1, 5, 4, device=DEVICE)
    ds = torch.arange(4, dtype=torch.int32, device=DEVICE).reshape(1, 1, 4)
    with pytest.raises(ValueError, match="domain_count = 5"):
        sel.block_importance(q, pool, ds, 5, 0.5)
    with pytest.raises(ValueError, match="scale = nan"):
        sel.block_importance(q, pool, ds, 4, float("nan"))
    with pytest.raises(ValueError, match=r"domain_slots\[0, 0, 1\] = 9"):
        sel.block_importance(q, pool, _i32(0, 9, 1, 2).reshape(1, 1, 4), 3, 0.5)
    with pytest.raises(ValueError, match="backend = 'cuda'"):
        sel.block_importance(q, pool, ds, 4, 0.5, backend="cuda")
    old = sel.SELECT_TOPK_ALGO
    try:
        sel.SELECT_TOPK_ALGO = "heap"
        with pytest.raises(ValueError, match="SELECT_TOPK_ALGO = 'heap'"):
            sel.select_topk(**_good_select_args(), backend="triton")
    finally:
        sel.SELECT_TOPK_ALGO = old


def test_auto_backend_is_torch_on_cpu_tensors():
    assert sel._use_triton("f", "auto", torch.device("cpu")) is False
    if torch.cuda.is_available():
        assert sel._use_triton("f", "auto", torch.device("cuda")) is True


# ====================================================================================
# the size threshold (issue 12): large allocations take the torch path
# ====================================================================================
def test_select_backend_for_threshold(monkeypatch):
    limit = sel.SELECT_TRITON_MAX_POSITIONS
    assert sel.select_backend_for("triton", limit) == "triton"
    assert sel.select_backend_for("triton", limit + 1) == "torch"
    assert sel.select_backend_for("auto", limit) == "auto"
    assert sel.select_backend_for("auto", limit + 1) == "torch"
    assert sel.select_backend_for("torch", 3) == "torch"
    with pytest.raises(ValueError, match="backend = 'cuda'"):
        sel.select_backend_for("cuda", 3)
    with pytest.raises(ValueError, match="n_positions = -1"):
        sel.select_backend_for("auto", -1)
    monkeypatch.setattr(sel, "SELECT_TRITON_MAX_POSITIONS", 0)
    with pytest.raises(ValueError, match="SELECT_TRITON_MAX_POSITIONS = 0, allowed: a python int >= 1"):
        sel.select_backend_for("auto", 3)


def test_select_topk_large_allocation_both_paths_match_reference():
    """An allocation past the threshold (a grown unbounded-window pool): both paths give the
    reference's picks, in order."""
    c = dict(B=1, hkv=1, H=2, NQB=3, D=8, nwmax=sel.SELECT_TRITON_MAX_POSITIONS + 188, nw=650,
             nslots=sel.SELECT_TRITON_MAX_POSITIONS + 190, smax=3, mode="union", k=5,
             quantised=True, seed=11)
    inp = make_select_inputs(c)
    results = {be: run_select(be, c, inp) for be in BACKENDS}
    for vs, vc in results.values():
        check_select(c, inp, vs, vc)
    assert torch.equal(results["torch"][0], results["triton"][0])


def test_select_topk_tile_follows_the_valid_window(monkeypatch):
    """The Triton tile is sized by this step's valid window NW, not the allocation NWMAX (a
    doubled pool's empty slots are not scored): a pool past the kernel's hard limit with a
    small valid window still runs the kernel, and gives the reference's picks in order."""
    sizes = []
    real = sel._tile_config
    monkeypatch.setattr(sel, "_tile_config", lambda n, nqb: sizes.append(n) or real(n, nqb))
    nwmax = sel._MAX_TRITON_POSITIONS + 5
    c = dict(B=1, hkv=1, H=2, NQB=3, D=8, nwmax=nwmax, nw=37, nslots=nwmax + 2, smax=3,
             mode="union", k=6, quantised=True, seed=5)
    inp = make_select_inputs(c)
    vs, vc = run_select("triton", c, inp)
    check_select(c, inp, vs, vc)
    assert sizes == [37], sizes


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 5),
       st.sampled_from([4, 8]), st.integers(17, 70), st.integers(0, 8),
       st.sampled_from(["union", "intersection"]), st.integers(0, 12), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_tiled_select_matches_reference(B, hkv, group, NQB, D, nw, spare, mode, k, quantised, seed):
    """SELECT_TILED: a window wider than one tile (here 16 positions: up to 5 tiles) is
    scored tile by tile, each tile's best k kept and merged: the reference's picks, in
    order, with the same tie rule (quantised inputs tie often, also across tiles)."""
    c = dict(B=B, hkv=hkv, H=hkv * group, NQB=NQB, D=D, nwmax=nw + spare, nw=nw,
             nslots=nw + spare + 2, smax=3, mode=mode, k=k, quantised=quantised, seed=seed)
    inp = make_select_inputs(c)
    calls = []
    old = (sel.SELECT_TILED, sel.SELECT_TRITON_MAX_POSITIONS, sel._select_topk_tiled)
    real = sel._select_topk_tiled
    try:
        sel.SELECT_TILED, sel.SELECT_TRITON_MAX_POSITIONS = True, 16
        sel._select_topk_tiled = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        vs, vc = run_select("triton", c, inp)
    finally:
        sel.SELECT_TILED, sel.SELECT_TRITON_MAX_POSITIONS, sel._select_topk_tiled = old
    check_select(c, inp, vs, vc)
    assert len(calls) == (1 if k else 0), (calls, k)


def test_tiled_select_is_on_and_leaves_large_k_to_torch(monkeypatch):
    """Off, a window past the threshold takes the torch path; on (the default), the tiled
    Triton path, except for k past SELECT_TILED_MAX_K; select_backend_for follows."""
    assert sel.SELECT_TILED is True
    monkeypatch.setattr(sel, "SELECT_TILED", False)
    monkeypatch.setattr(sel, "SELECT_TRITON_MAX_POSITIONS", 16)
    assert sel.select_backend_for("auto", 40) == "torch"
    c = dict(B=1, hkv=1, H=1, NQB=2, D=4, nwmax=40, nw=40, nslots=42, smax=0, mode="union",
             k=6, quantised=True, seed=3)
    inp = make_select_inputs(c)
    paths = []
    real_tiled, real_torch = sel._select_topk_tiled, sel.select_topk_torch
    monkeypatch.setattr(sel, "_select_topk_tiled", lambda *a, **kw: paths.append("tiled") or real_tiled(*a, **kw))
    monkeypatch.setattr(sel, "select_topk_torch", lambda *a, **kw: paths.append("torch") or real_torch(*a, **kw))
    check_select(c, inp, *run_select("auto" if DEVICE == "cuda" else "triton", c, inp))
    monkeypatch.setattr(sel, "SELECT_TILED", True)
    assert sel.select_backend_for("auto", 40, tiled=True) == "auto"
    # block importance has no tiled path: past the threshold it still falls back
    assert sel.select_backend_for("auto", 40) == "torch"
    assert sel._auto_by_size("auto", 40) == "torch"
    check_select(c, inp, *run_select("triton", c, inp))
    monkeypatch.setattr(sel, "SELECT_TILED_MAX_K", 4)
    check_select(c, inp, *run_select("triton", c, inp))
    # the first call: "auto" on CUDA falls back to torch; the interpreter's forced "triton"
    # runs the one-tile kernel (neither path recorded)
    first = ["torch"] if DEVICE == "cuda" else []
    assert paths == first + ["tiled", "torch"], paths


@pytest.mark.parametrize("tiled", [False, True], ids=["torch-fallback", "tiled"])
def test_program_select_switches_path_above_the_threshold(monkeypatch, tiled):
    """moba's window grows with the history; once its valid count passes
    SELECT_TRITON_MAX_POSITIONS the program's Triton visit tables run the torch select
    (SELECT_TILED off) or the tiled Triton select (on), and they equal the torch program's
    at every step, before and after the switch."""
    import sparsedsl as sd
    from codegen.program import PBSAProgram
    from codegen.memory import rollout_cache as rc
    from sparsedsl.testing import chunk_tensors

    pattern = sd.Pattern(sd.VideoLayout(2, 4, (1, 2), 1),
                         window=sd.LocalWindow(None, sd.TopK(k=2)), name="moba-small")
    schedule = sd.lower(pattern, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32")
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(1, 1, DEVICE, torch.float32)   # CUDA: "triton" needs its tensors
    first = schedule.window_block_count(2)       # one tile at steps 1-2, switched after
    monkeypatch.setattr(sel, "SELECT_TRITON_MAX_POSITIONS", first)
    monkeypatch.setattr(sel, "SELECT_TILED", tiled)
    switched_calls = []
    switched_to = "_select_topk_tiled" if tiled else "select_topk_torch"
    real = getattr(sel, switched_to)

    def counted(*args, **kwargs):
        switched_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sel, switched_to, counted)
    paths = []
    steps = rc.GROWTH_START_CHUNKS + 3
    for step, chunk in enumerate(chunk_tensors(schedule, 1, 5, steps, quantize=True)):
        q, k, v = (x.float().to(DEVICE) for x in chunk)
        tables = cache.tables(0)
        if step:
            qb = program._blocks(q)
            switched_calls.clear()
            got = program.visit_tables(qb, tables, step, select_backend="triton")
            switched = bool(switched_calls)
            want = program.visit_tables(qb, tables, step, select_backend="torch")
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), step
            assert switched == (schedule.window_block_count(step) > first), step
            paths.append(switched)
        cache.commit(0, q, k, v)
    assert paths[:2] == [False, False] and paths[-1] is True, paths
