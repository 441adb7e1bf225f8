"""Generated PBSA attention kernels (codegen/) against an independent float64 reference.

On a machine without CUDA the Triton path runs under TRITON_INTERPRET=1 (set
below, before triton is imported) at tiny shapes. The reference materialises
the full token mask per (batch, head) and uses torch.softmax in float64.

Tolerances (relative Frobenius error ||out - ref|| / ||ref||):
  float32: 1e-5 for outputs and gradients (interpreter: numpy fp32 matmuls; on a
           GPU the fp32 spec keeps IEEE fp32 dots); worst seen over 60 random
           cases: 4.5e-7.
  float16: 1e-2; bfloat16: 1e-2 for outputs, 2e-2 for gradients (at these toy
           sizes a gradient sums few terms; worst seen over 60 random cases 8e-3;
           at BT=D=128 on the GPU bench: 2.9e-3).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from codegen.attention import cache as kcache  # noqa: E402
from codegen.attention import launch  # noqa: E402
from codegen.attention.autograd import pbsa_attention  # noqa: E402
from codegen.attention import torch_backend  # noqa: E402
from codegen.attention.kernel_spec import AttentionKernelSpec, KernelConfig  # noqa: E402
from codegen.attention.render import render_attention_source  # noqa: E402

from attention_reference import dense_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("SPARSEDSL_KERNEL_CACHE")
    os.environ["SPARSEDSL_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    launch.POISON_OUTPUTS = True  # unwritten outputs become NaN and fail the comparisons
    kcache.clear_memory_cache()
    yield
    launch.POISON_OUTPUTS = False
    kcache.clear_memory_cache()
    if old is None:
        os.environ.pop("SPARSEDSL_KERNEL_CACHE", None)
    else:
        os.environ["SPARSEDSL_KERNEL_CACHE"] = old


# --------------------------------------------------------------------------
# independent float64 reference: full token mask + torch.softmax
# --------------------------------------------------------------------------
def rel_err(out, ref):
    out = out.double().cpu()
    ref = ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite values where the reference is finite"
    den = ref.norm().item()
    return (out - ref).norm().item() / max(den, 1e-30)


# --------------------------------------------------------------------------
# problem generator
# --------------------------------------------------------------------------
def make_problem(spec, B, nslots, seed, device=DEVICE, poison=True):
    """Random inputs; NaN in every place the kernels must never read (when `poison`)."""
    g = torch.Generator().manual_seed(seed)
    H, HKV, NQB = spec.num_heads, spec.num_kv_heads, spec.num_query_blocks
    BT, D, MAXV = spec.block_tokens, spec.head_dim, spec.max_cached_visits
    dt = getattr(torch, spec.dtype)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    q = rnd(B, H, NQB, BT, D)
    k_cur, v_cur = rnd(B, HKV, NQB, BT, D), rnd(B, HKV, NQB, BT, D)
    k_pool, v_pool = rnd(B, HKV, nslots, BT, D), rnd(B, HKV, nslots, BT, D)
    if spec.has_padding:
        cur_valid = torch.randint(1, BT + 1, (NQB,), generator=g, dtype=torch.int32)
        slot_valid = torch.randint(0, BT + 1, (B, HKV, nslots), generator=g, dtype=torch.int32)
    else:
        cur_valid = torch.full((NQB,), BT, dtype=torch.int32)
        slot_valid = torch.full((B, HKV, nslots), BT, dtype=torch.int32)
    # visit table: distinct slots per row, garbage (out of range) past the count
    visit_slots = torch.randint(-7, nslots + 1000, (B, H, NQB, MAXV), generator=g, dtype=torch.int32)
    visit_count = torch.zeros(B, H, NQB, dtype=torch.int32)
    kmax = min(MAXV, nslots)
    for b in range(B):
        for h in range(H):
            for qb in range(NQB):
                n = int(torch.randint(0, kmax + 1, (1,), generator=g))
                visit_count[b, h, qb] = n
                visit_slots[b, h, qb, :n] = torch.randperm(nslots, generator=g)[:n].to(torch.int32)
    if poison:
        visited = torch.zeros(B, HKV, nslots, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for qb in range(NQB):
                    for i in range(int(visit_count[b, h, qb])):
                        visited[b, h // spec.group_size, int(visit_slots[b, h, qb, i])] = True
        k_pool[~visited] = float("nan")
        v_pool[~visited] = float("inf")
        tok = torch.arange(BT)
        pad_cur = tok[None, :] >= cur_valid[:, None]  # [NQB, BT]
        pad_pool = tok >= slot_valid[..., None]  # [B, HKV, NS, BT]
        k_cur[:, :, pad_cur] = float("nan")
        v_cur[:, :, pad_cur] = float("nan")
        q[:, :, pad_cur] = float("nan")
        k_pool[pad_pool] = float("nan")
        v_pool[pad_pool] = float("-inf")
    tensors = dict(
        q=q.to(dt), k_cur=k_cur.to(dt), v_cur=v_cur.to(dt), cur_valid=cur_valid,
        k_pool=k_pool.to(dt), v_pool=v_pool.to(dt), slot_valid=slot_valid,
        visit_slots=visit_slots, visit_count=visit_count,
    )
    return {k: v.to(device) for k, v in tensors.items()}


ARGS = ("q", "k_cur", "v_cur", "cur_valid", "k_pool", "v_pool", "slot_valid", "visit_slots", "visit_count")
FLOATS = ("q", "k_cur", "v_cur", "k_pool", "v_pool")


def run_with_grads(spec, prob, backend, go, glse, scale, pool_grad, config=None):
    leaves = {k: prob[k].clone().requires_grad_(k in ("q", "k_cur", "v_cur") or pool_grad) for k in FLOATS}
    args = [leaves[k] if k in leaves else prob[k] for k in ARGS]
    o, lse = pbsa_attention(spec, *args, scale=scale, backend=backend, config=config)
    valid = torch.isfinite(lse)
    loss = (o.float() * go).sum() + torch.where(valid, lse, torch.zeros_like(lse)).mul(glse).sum()
    loss.backward()
    grads = {k: leaves[k].grad for k in FLOATS if leaves[k].grad is not None}
    return o.detach(), lse.detach(), grads


def reference_with_grads(spec, prob, go, glse, scale, pool_grad):
    cpu = {k: v.cpu() for k, v in prob.items()}
    leaves = {}
    for k in FLOATS:
        x = torch.nan_to_num(cpu[k].double(), nan=0.0, posinf=0.0, neginf=0.0)
        leaves[k] = x.requires_grad_(k in ("q", "k_cur", "v_cur") or pool_grad)
    args = [leaves[k] if k in leaves else cpu[k] for k in ARGS]
    o, lse = dense_reference(spec, *args, scale=scale)
    valid = torch.isfinite(lse)
    loss = (o * go.double().cpu()).sum() + torch.where(valid, lse, torch.zeros_like(lse)).mul(glse.double().cpu()).sum()
    loss.backward()
    grads = {k: leaves[k].grad for k in FLOATS if leaves[k].grad is not None}
    return o.detach(), lse.detach(), grads


def check_against_reference(spec, prob, got, ref, tol):
    o, lse, grads = got
    ro, rlse, rgrads = ref
    valid = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse.cpu()), valid), "LSE must be -inf exactly on padded query rows"
    assert (lse.cpu()[~valid] == float("-inf")).all()
    assert (o.cpu()[~valid] == 0).all(), "padded query rows must get O = 0"
    assert rel_err(o, ro) <= tol, f"o: {rel_err(o, ro):.3g}"
    assert rel_err(lse[valid.to(lse.device)], rlse[valid]) <= tol, "lse"
    assert set(grads) == set(rgrads)
    for k in rgrads:
        e = rel_err(grads[k], rgrads[k])
        assert e <= tol * (2 if spec.dtype == "bfloat16" else 1), f"d{k}: {e:.3g}"


# --------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------
@st.composite
def problems(draw):
    hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    bt = draw(st.sampled_from([16, 16, 32]))
    spec = AttentionKernelSpec(
        block_tokens=bt,
        head_dim=16,
        num_heads=hkv * G,
        num_kv_heads=hkv,
        dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        chunk_frames=draw(st.sampled_from([1, 2])),
        blocks_per_frame=draw(st.sampled_from([1, 2])),
        current=draw(st.sampled_from(["dense", "causal"])),
        max_cached_visits=draw(st.integers(0, 3)),
        has_padding=draw(st.booleans()),
    )
    B = draw(st.sampled_from([1, 1, 2]))
    nslots = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    sub = draw(st.sampled_from([16, bt]))
    config = KernelConfig(
        variant=draw(st.sampled_from(["ptr", "desc"])),
        fwd_block_m=sub, fwd_block_n=draw(st.sampled_from([16, bt])),
        fwd_kv_splits=draw(st.sampled_from([1, 1, 2, 3])),
        dq_block_m=sub, dq_block_n=draw(st.sampled_from([16, bt])), dkdv_block_m=16, dkdv_block_n=sub,
        bwd_fused=draw(st.booleans()),
        bwd_dq=draw(st.sampled_from(["ordered", "atomic"])),
        fwd_overlap=draw(st.booleans()), dq_overlap=draw(st.booleans()), dkdv_overlap=draw(st.booleans()),
    )
    pool_grad = draw(st.booleans())
    return spec, B, nslots, seed, config, pool_grad


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_triton_matches_float64_reference(case):
    spec, B, nslots, seed, config, pool_grad = case
    prob = make_problem(spec, B, nslots, seed)
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(prob["q"].shape, generator=g).to(DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], generator=g).to(DEVICE)
    scale = 0.3 if seed % 2 else None
    sc = scale if scale is not None else spec.head_dim**-0.5
    ref = reference_with_grads(spec, prob, go, glse, sc, pool_grad)
    got = run_with_grads(spec, prob, "triton", go, glse, scale, pool_grad, config=config)
    check_against_reference(spec, prob, got, ref, TOL[spec.dtype])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_backend_matches_float64_reference(case):
    spec, B, nslots, seed, _, pool_grad = case
    prob = {k: v.cpu() for k, v in make_problem(spec, B, nslots, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(prob["q"].shape, generator=g)
    glse = torch.randn(prob["q"].shape[:-1], generator=g)
    ref = reference_with_grads(spec, prob, go, glse, spec.head_dim**-0.5, pool_grad)
    for method in ("gather", "pool"):   # the backend's two ways to the same numbers
        with torch_backend.use_method(method):
            got = run_with_grads(spec, prob, "torch", go, glse, None, pool_grad)
            with torch.no_grad():   # inference: "pool" scores through PyTorch's fused CPU attention
                o, lse = pbsa_attention(spec, *[prob[k] for k in ARGS], backend="torch")
        check_against_reference(spec, prob, got, ref, TOL[spec.dtype])
        check_against_reference(spec, prob, (o, lse, {}), ref[:2] + ({},), TOL[spec.dtype])


def test_backward_is_deterministic_and_skips_pool_without_grad():
    spec = AttentionKernelSpec(16, 16, 2, 1, "float32", 2, 2, "causal", 3, True)
    prob = make_problem(spec, 1, 4, seed=7)
    go = torch.randn(prob["q"].shape, device=DEVICE)
    glse = torch.zeros(prob["q"].shape[:-1], device=DEVICE)
    ordered = KernelConfig(bwd_dq="ordered")
    a = run_with_grads(spec, prob, "triton", go, glse, None, pool_grad=True, config=ordered)
    b = run_with_grads(spec, prob, "triton", go, glse, None, pool_grad=True, config=ordered)
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k
    c = run_with_grads(spec, prob, "triton", go, glse, None, pool_grad=False, config=ordered)
    assert "k_pool" not in c[2] and "v_pool" not in c[2]
    for k in c[2]:
        assert torch.equal(a[2][k], c[2][k]), k


def test_atomic_dq_backward_matches_ordered_and_respects_deterministic_mode(monkeypatch):
    """The atomic backward gives the ordered one's gradients (dK/dV bitwise: same visitor
    sums; dQ within rounding), also when the pool needs no gradient (pool slots still add
    their dQ share), and torch.use_deterministic_algorithms(True) routes to the ordered path."""
    spec = AttentionKernelSpec(16, 16, 4, 2, "float32", 2, 2, "dense", 3, True)
    prob = make_problem(spec, 2, 4, seed=3)
    go = torch.randn(prob["q"].shape, device=DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], device=DEVICE)
    ordered = run_with_grads(spec, prob, "triton", go, glse, None, True, KernelConfig(bwd_dq="ordered"))
    atomic_cfg = KernelConfig(bwd_dq="atomic", dkdv_block_m=16, dkdv_block_n=16)
    for pool_grad in (True, False):
        got = run_with_grads(spec, prob, "triton", go, glse, None, pool_grad, atomic_cfg)
        assert set(got[2]) == {"q", "k_cur", "v_cur"} | ({"k_pool", "v_pool"} if pool_grad else set())
        for k, g in got[2].items():
            assert rel_err(g, ordered[2][k]) <= 1e-6, k
    calls = []
    real = launch.launch_bwd_atomic
    monkeypatch.setattr(launch, "launch_bwd_atomic", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    run_with_grads(spec, prob, "triton", go, glse, None, True, atomic_cfg)
    assert calls == [1]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_with_grads(spec, prob, "triton", go, glse, None, True, atomic_cfg)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert calls == [1], "deterministic mode must take the ordered dQ path"


@settings(max_examples=25, deadline=None)
@given(problems(), st.booleans())
def test_transposed_schedule_lists_every_visitor_once_in_order(case, include_pool):
    """CSR of the transposed schedule vs a direct enumeration of the visit tables: item
    (b, kv head, j) lists h * NQB + qb of every query block that reads it, ascending;
    items run longest first; both builders (Triton marks, torch sort) agree."""
    from codegen.attention import transpose
    from codegen.attention.transpose import build_transposed_schedule

    spec, B, nslots, seed, _, _ = case
    prob = make_problem(spec, B, nslots, seed, device="cpu", poison=False)
    vs, vc = prob["visit_slots"], prob["visit_count"]
    NQB, HKV, G = spec.num_query_blocks, spec.num_kv_heads, spec.group_size
    with_pool = include_pool and nslots > 0
    NJ = NQB + (nslots if with_pool else 0)
    expect = {item: [] for item in range(B * HKV * NJ)}
    for b in range(B):
        for h in range(spec.num_heads):
            base = (b * HKV + h // G) * NJ
            for qb in range(NQB):
                for j in range(spec.current_blocks_visible(qb)):
                    expect[base + j].append(h * NQB + qb)
                if with_pool:
                    for slot in vs[b, h, qb, :int(vc[b, h, qb])].tolist():
                        expect[base + NQB + slot].append(h * NQB + qb)
    for builder in ("marks", "sort", "marks"):  # the third call reuses cached parts
        transpose.BUILDER = builder
        try:
            ts = build_transposed_schedule(spec, vs, vc, nslots, include_pool)
        finally:
            transpose.BUILDER = "marks"
        assert (ts.num_items, ts.num_items_per_head) == (B * HKV * NJ, NJ)
        ptr = ts.row_ptr.tolist()
        got = {i: ts.visitors[ptr[i]:ptr[i + 1]].tolist() for i in range(ts.num_items)}
        assert got == {i: sorted(v) for i, v in expect.items()}
        order = ts.item_order.tolist()
        assert sorted(order) == list(range(ts.num_items))
        lengths = [len(expect[i]) for i in order]
        assert lengths == sorted(lengths, reverse=True)


# --------------------------------------------------------------------------
# spec, cache, source, validation
# --------------------------------------------------------------------------
def test_spec_rejects_bad_fields():
    base = dict(block_tokens=16, head_dim=16, num_heads=4, num_kv_heads=2, dtype="float32",
                chunk_frames=1, blocks_per_frame=2, current="dense", max_cached_visits=2, has_padding=False)
    for field, bad, needle in [
        ("block_tokens", 24, "power of two"),
        ("block_tokens", 8, "block_tokens"),
        ("head_dim", 48, "head_dim"),
        ("num_kv_heads", 3, "multiple"),
        ("dtype", "float64", "dtype"),
        ("current", "full", "current"),
        ("max_cached_visits", -1, "max_cached_visits"),
    ]:
        with pytest.raises(ValueError, match=needle):
            AttentionKernelSpec(**{**base, field: bad})


def test_cache_renders_once_and_reloads_fast(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("SPARSEDSL_KERNEL_CACHE", str(tmp_path))
    kcache.clear_memory_cache()
    spec = AttentionKernelSpec(32, 32, 4, 4, "bfloat16", 3, 2, "causal", 5, True)
    before = kcache.STATS["renders"]
    m1 = kcache.load_attention_kernels(spec, "desc")
    assert kcache.STATS["renders"] == before + 1
    files = list(tmp_path.glob("pbsa_attn_*.py"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    t0 = time.perf_counter()
    for _ in range(100):
        m2 = kcache.load_attention_kernels(spec, "desc")
    per_load = (time.perf_counter() - t0) / 100
    assert m2 is m1 and per_load < 1e-3
    assert kcache.STATS["renders"] == before + 1
    kcache.clear_memory_cache()  # a new process: found on disk, not re-rendered
    kcache.load_attention_kernels(spec, "desc")
    assert kcache.STATS["renders"] == before + 1
    src = files[0].read_text()
    assert src.splitlines()[0] == f"# sparsedsl-kernel-key: {m1.KERNEL_KEY}"
    assert "current=causal" in src and "has_padding=True" in src and "make_tensor_descriptor" in src
    compile(src, "generated", "exec")
    kcache.clear_memory_cache()


def test_rendered_source_specialises_masks_and_loads():
    dense = AttentionKernelSpec(16, 16, 2, 2, "bfloat16", 1, 2, "dense", 2, False)
    src = render_attention_source(dense, "ptr")
    assert "col_ok = " not in src and "make_tensor_descriptor" not in src and "#?" not in src
    src_pad = render_attention_source(dense.__class__(**{**dense.as_dict(), "has_padding": True}), "desc")
    assert "col_ok = " in src_pad and "tl.load(K_CUR + kv_offs)" not in src_pad.split("def _dkdv_program")[0]


def _valid_problem():
    spec = AttentionKernelSpec(16, 16, 2, 1, "float32", 1, 2, "dense", 2, True)
    return spec, make_problem(spec, 1, 3, seed=3, poison=False)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda p: p.__setitem__("visit_slots", torch.where(torch.arange(2, device=p["visit_slots"].device) == 0,
                                                            torch.full_like(p["visit_slots"], 99), p["visit_slots"])) or
         p.__setitem__("visit_count", torch.ones_like(p["visit_count"])), r"visit_slots\[0, 0, 0, 0\] = 99"),
        (lambda p: p.__setitem__("visit_count", torch.full_like(p["visit_count"], 3)), r"visit_count\[0, 0, 0\] = 3"),
        (lambda p: p.__setitem__("q", p["q"].half()), r"q has dtype torch.float16"),
        (lambda p: p.__setitem__("k_cur", p["k_cur"].transpose(-1, -2).contiguous().transpose(-1, -2)), "k_cur .*contiguous"),
        (lambda p: p.__setitem__("v_pool", p["v_pool"][:, :, :2].contiguous()), r"v_pool has shape"),
        (lambda p: p.__setitem__("cur_valid", p["cur_valid"].long()), r"cur_valid has dtype torch.int64"),
        (lambda p: p.__setitem__("cur_valid", torch.full_like(p["cur_valid"], 17)), r"cur_valid\[0\] = 17"),
        (lambda p: (p["visit_count"].fill_(2), p["visit_slots"].fill_(1)), "twice"),
    ],
)
def test_validation_names_argument_value_and_rule(mutate, needle):
    spec, prob = _valid_problem()
    mutate(prob)
    with pytest.raises(ValueError, match=needle):
        pbsa_attention(spec, *[prob[k] for k in ARGS], backend="torch")


def test_empty_pool_and_no_visits():
    spec = AttentionKernelSpec(16, 16, 2, 2, "float32", 2, 1, "causal", 0, True)
    prob = make_problem(spec, 1, 0, seed=5)
    go = torch.randn(prob["q"].shape, device=DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], device=DEVICE)
    ref = reference_with_grads(spec, prob, go, glse, 0.25, False)
    got = run_with_grads(spec, prob, "triton", go, glse, None, False)
    check_against_reference(spec, prob, got, ref, TOL["float32"])


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_real_shape_bf16_fast_config():
    spec = AttentionKernelSpec(128, 128, 4, 2, "bfloat16", 2, 3, "dense", 8, True)
    prob = make_problem(spec, 1, 12, seed=11)
    go = torch.randn(prob["q"].shape, device=DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], device=DEVICE)
    ref = reference_with_grads(spec, prob, go, glse, spec.head_dim**-0.5, True)
    got = run_with_grads(spec, prob, "triton", go, glse, None, True)
    check_against_reference(spec, prob, got, ref, TOL["bfloat16"])


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), "big"])
def test_validation_rejects_bad_scale(scale):
    spec, prob = _valid_problem()
    with pytest.raises(ValueError, match="scale"):
        pbsa_attention(spec, *[prob[k] for k in ARGS], scale=scale, backend="torch")


def test_torch_and_triton_backends_agree_on_gqa_causal_bf16():
    """A fixed (non-random) case through the default config of this machine."""
    spec = AttentionKernelSpec(32, 16, 4, 2, "bfloat16", 2, 2, "causal", 3, True)
    prob = make_problem(spec, 2, 5, seed=21)
    go = torch.randn(prob["q"].shape, device=DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], device=DEVICE)
    ref = reference_with_grads(spec, prob, go, glse, spec.head_dim**-0.5, True)
    for backend in ("triton", "torch"):
        got = run_with_grads(spec, prob, backend, go, glse, None, True)
        check_against_reference(spec, prob, got, ref, TOL["bfloat16"])


SM90 = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


@gpu
@pytest.mark.skipif(not SM90, reason="the Gluon forward needs an sm_90 (Hopper) GPU")
@pytest.mark.parametrize("bt, hkv, current, dtype, padding", [
    (128, 4, "dense", "bfloat16", False), (128, 1, "causal", "float16", False),
    (128, 2, "causal", "bfloat16", False), (64, 2, "dense", "bfloat16", True),
    (64, 4, "causal", "float16", True), (64, 1, "dense", "bfloat16", False)])
def test_gpu_gluon_forward_matches_reference(bt, hkv, current, dtype, padding, monkeypatch):
    """The Hopper Gluon forwards (default on sm_90: unpadded 128-token blocks; 64-token blocks
    with padding, whose padded K/V/Q rows hold NaN and inf here): output, LSE and the
    gradients of the backward that consumes its LSE, against float64; and the same numbers
    as the generated Triton forward on identical inputs."""
    from codegen.attention import gluon_forward

    spec = AttentionKernelSpec(bt, 128, 4, hkv, dtype, 2, 3, current, 8, padding)
    prob = make_problem(spec, 2, 12, seed=5)
    assert gluon_forward.supported(spec, prob["q"], [prob[k] for k in FLOATS])
    calls = []
    real = gluon_forward.attention_forward
    monkeypatch.setattr(gluon_forward, "attention_forward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(6)
    go = torch.randn(prob["q"].shape, generator=g).to(DEVICE)
    glse = torch.randn(prob["q"].shape[:-1], generator=g).to(DEVICE)
    scale = spec.head_dim**-0.5
    ref = reference_with_grads(spec, prob, go, glse, scale, True)
    got = run_with_grads(spec, prob, "triton", go, glse, None, True)
    assert calls, "the default config on sm_90 must take the Gluon forward"
    check_against_reference(spec, prob, got, ref, TOL[dtype])
    triton_fwd = run_with_grads(spec, prob, "triton", go, glse, None, True,
                                launch.default_config(spec, torch.device(DEVICE)).replace(fwd_gluon=False))
    real = torch.isfinite(triton_fwd[1])  # LSE is -inf on padded query rows in both
    assert torch.equal(torch.isfinite(got[1]), real)
    assert rel_err(got[0], triton_fwd[0]) <= 1e-2 and rel_err(got[1][real], triton_fwd[1][real]) <= 1e-5


def test_torch_backend_method_choice_and_bad_name():
    """"auto" scores the whole pool only where it is small next to the visits."""
    assert torch_backend.choose_method(num_slots=128, max_visits=64) == "pool"
    assert torch_backend.choose_method(num_slots=4096, max_visits=8) == "gather"
    assert torch_backend.choose_method(num_slots=0, max_visits=0) == "gather"
    with pytest.raises(ValueError, match="method = 'fast'"):
        with torch_backend.use_method("fast"):
            pass
