"""The rollout cache (codegen/memory/rollout_cache.py) and the generated update rule
(codegen/memory/update_rule.py) against the float64 reference (sparsedsl/reference.py).

After every chunk: the persistent sets equal the reference's (up to float32-vs-float64
near-ties at the C-th score, which are checked and then adopted by the reference so the
rollout can go on), capacity holds, no block is in the window and in P, every slot is
either referenced once by a table or on the free list, nothing from the future is held,
the pool holds exactly the reference's blocks with their K/V, and attention through the
cache equals the reference's attention (freed slots are poisoned with NaN meanwhile).
"""
import dataclasses
import io
import os

import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.layout import VideoLayout
from sparsedsl.shapes import T
from sparsedsl.testing import chunk_tensors, schedules
from sparsedsl.update import age, importance, previous

from codegen.memory import rollout_cache as rc
from codegen.memory import update_rule as ur
from codegen.check import TOL, check_near_ties, program_block_mask
from codegen.program import PBSAProgram

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
TIE_TOL = 1e-4


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def small_pattern(score=importance, shared=True, capacity=5, window=2, sink=1, chunk=2,
                  layout=None, neighborhood=None):
    layout = layout or VideoLayout(4, 6, (2, 3), chunk)
    return sd.Pattern(layout, sink=sd.Sink(sink) if sink else None,
                      persistent=sd.Persistent(capacity, shared) if capacity else None,
                      window=sd.LocalWindow(window, neighborhood or (sd.Radius(1, 1, 1) | sd.TopK(k=2))),
                      update=sd.Update(score) if capacity else None, name="small")


def program_of(pattern, heads=2, kv_heads=None, head_dim=4, backend="torch"):
    schedule = sd.lower(pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                        dtype="float32")
    return PBSAProgram(schedule, backend=backend)


def chunks_of(schedule, batch, seed, steps, dtype=torch.float32, quantize=False):
    """(q64, k64, v64) rounded to `dtype`, so that the reference sees what the cache stores."""
    return [tuple(x.to(dtype).double() for x in c)
            for c in chunk_tensors(schedule, batch, seed, steps, quantize)]


def snapshot(cache):
    """A deep copy of the cache's whole state, to prove an error left it unchanged."""
    return cache.state_dict(copy=True)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key != "layers":
            assert a[key] == b[key], key
    for la, lb in zip(a["layers"], b["layers"]):
        for name in la:
            if isinstance(la[name], torch.Tensor):
                assert la[name].dtype == lb[name].dtype and la[name].shape == lb[name].shape, name
                assert torch.equal(la[name].view(torch.uint8) if la[name].is_floating_point() else la[name],
                                   lb[name].view(torch.uint8) if lb[name].is_floating_point() else lb[name]), name
            else:
                assert la[name] == lb[name], name


def check_invariants(cache, state, layer=0):
    """Tables vs pool vs the reference state (same step)."""
    s = cache.schedule
    L = cache.layers[layer]
    step = L.step
    assert step == state.step
    lay = s.layout
    nb, c = lay.blocks_per_frame, lay.chunk_frames
    n_sink = min(s.sink_frames, step * c) * nb
    ws, we = s.window_frames_range(step)
    window_blocks = list(range(ws * nb, we * nb))
    bt, d = lay.block_tokens, s.head_dim
    evicted_so_far = int(s.shapes.persistent_blocks.subs(sd.shapes.t, step)) if s.capacity else 0
    for b in range(cache.batch):
        for g in range(s.num_kv_heads):
            sb = L.slot_block[b, g].tolist()
            free = L.free_list[b, g, :L.n_free].tolist()
            assert len(set(free)) == len(free), "a slot is twice on the free list"
            assert set(free) == {i for i, x in enumerate(sb) if x < 0}, "free list != free slots"
            sink = L.sink_slots[b, g, :n_sink].tolist()
            assert [sb[x] for x in sink] == list(range(n_sink))
            pc = int(L.persistent_count[b, g])
            assert pc == L.n_persistent <= s.capacity, "capacity exceeded"
            assert pc == min(s.capacity, evicted_so_far)
            pers = L.persistent_slots[b, g, :pc].tolist()
            pblocks = [sb[x] for x in pers]
            assert pblocks == sorted(set(pblocks)), "persistent table not in block order"
            win = L.window_slots[b, g, :len(window_blocks)].tolist()
            assert [sb[x] for x in win] == window_blocks, "window table out of order"
            refs = sink + pers + win
            assert len(set(refs)) == len(refs), "a slot is referenced twice"
            assert not set(refs) & set(free), "a freed slot is still referenced"
            assert set(refs) == {i for i, x in enumerate(sb) if x >= 0}, "a slot leaked"
            assert not set(pblocks) & set(window_blocks), "a block is in the window and in P"
            assert all(s.sink_frames * nb <= kb < ws * nb for kb in pblocks)
            assert all(x < step * lay.chunk_blocks for x in sb), "a block from the future"
            # the pool holds exactly the reference's blocks, with their K/V
            assert sorted(sb[x] for x in refs) == state.blocks(b, g)
            for slot in refs:
                block = sb[slot]
                valid = reference.block_valid(s, block)
                kk, vv = state.kv[(b, g)][block]
                assert int(L.slot_valid[b, g, slot]) == valid
                assert torch.equal(L.k_pool[b, g, slot, :bt, :d].double(), kk)
                assert torch.equal(L.v_pool[b, g, slot, :bt, :d].double(), vv)
                rep = kk[:valid].mean(0)
                assert torch.allclose(L.k_rep[b, g, slot, :d].double(), rep, atol=1e-5)
            assert set(pblocks) == set(state.persistent[(b, g)])
            for slot, block in zip(pers, pblocks):
                want = state.persistent[(b, g)][block]
                assert abs(float(L.slot_score[b, g, slot]) - want) <= TIE_TOL * (1 + abs(want))


def sync_persistent(schedule, prev, new, got, q64):
    """Compare the cache's P_{t+1} with the reference's; where they differ, every swapped
    block must score within TIE_TOL of the C-th score (a float32 vs float64 near-tie); the
    reference then adopts the cache's choice so both go on from the same memory."""
    if schedule.update is None:
        assert all(not v for v in got.values())
        return new
    nb = schedule.blocks_per_frame
    C = schedule.capacity
    for (b, g), members in got.items():
        want = set(new.persistent[(b, g)])
        have = set(members)
        if want == have:
            continue
        g_eff = 0 if schedule.update.shared_heads else g
        w0, w1 = schedule.window_frames_range(prev.step)
        domain = sorted(prev.persistent[(b, g_eff)]) + list(range(w0 * nb, w1 * nb))
        e0, e1 = schedule.evicted_frames(prev.step)
        scores = reference._scores(schedule, prev, q64, b, g_eff, domain,
                                   list(range(e0 * nb, e1 * nb)), prev.step)
        ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        cth = ranked[C - 1][1]
        for kb in want ^ have:
            assert abs(scores[kb] - cth) <= TIE_TOL * (1 + abs(cth)), (
                f"persistent sets differ beyond a near-tie at step {prev.step}, (b, g) = {(b, g)}: "
                f"reference {sorted(want)}, cache {sorted(have)}, block {kb} scores {scores[kb]} "
                f"vs C-th {cth}")
        # A near-tie may go either way (float32 vs float64), but an exact tie may not: when a
        # dropped block and a kept one score exactly the same, the lower block index must win.
        exact_kept = [kb for kb in have - want if scores[kb] == cth]
        exact_dropped = [kb for kb in want - have if scores[kb] == cth]
        assert not any(d < k for d in exact_dropped for k in exact_kept), (
            f"exact tie at step {prev.step}, (b, g) = {(b, g)}: the cache kept {sorted(exact_kept)} "
            f"over the lower block(s) {sorted(exact_dropped)} of the same score {cth} "
            "(ties go to the lower block index)")
        new.persistent[(b, g)] = {kb: scores[kb] for kb in have}
        for kb in want - have:
            new.kv[(b, g)].pop(kb)
        for kb in have - want:
            new.kv[(b, g)][kb] = prev.kv[(b, g)][kb]
    return new


def run_rollout(program, seed, steps, batch, dtype=torch.float32, attention=True, layers=1,
                quantize=False, cache=None):
    schedule = program.schedule
    cache = cache or program.new_cache(batch, layers, "cpu", dtype)
    state = reference.new_state(schedule, batch)
    for step, (q64, k64, v64) in enumerate(chunks_of(schedule, batch, seed, steps, dtype, quantize)):
        check_invariants(cache, state)
        q, k, v = (x.to(dtype) for x in (q64, k64, v64))
        if attention:
            tables = cache.tables(0)
            out, lse, (vs, vc) = program.attention(q, k, v, tables, return_visits=True)
            B, H = q.shape[:2]
            got_mask = program_block_mask(program, program.visited_blocks(vs, vc, tables), step, B, H)
            want_mask = reference.allowed_blocks(schedule, state, q64)
            check_near_ties(schedule, state, q64, want_mask, got_mask, step)
            want, want_lse = reference.masked_attention(schedule, state, q64, k64, v64, got_mask)
            err = (out.double() - want).norm() / want.norm().clamp_min(1e-12)
            assert err < TOL[dtype], f"step {step}: relative output error {err:.2e}"
            valid = schedule.layout.valid_token_mask(schedule.layout.chunk_frames)
            assert torch.allclose(lse.double()[:, :, valid], want_lse[:, :, valid], atol=TOL[dtype] * 10)
        for layer in range(layers):
            assert cache.step == step
            cache.commit(layer, q, k, v)
        assert cache.step == step + 1
        new = reference.commit(schedule, state, q64, k64, v64)
        state = sync_persistent(schedule, state, new, cache.persistent_sets(0), q64)
        for layer in range(1, layers):  # the same chunk in every layer: the same memory
            assert cache.persistent_sets(layer) == cache.persistent_sets(0)
    check_invariants(cache, state)
    return cache, state


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(rc, "POISON_FREED", True)


# ---------------------------------------------------------------------------------------
# the rollout against the reference
# ---------------------------------------------------------------------------------------
@given(schedules(max_heads=2, head_dim=4), st.integers(0, 2**31 - 1), st.integers(2, 6),
       st.integers(1, 2), st.booleans())
def test_rollout_matches_reference(schedule, seed, steps, batch, quantize):
    rc.POISON_FREED = True   # a table pointing at a freed slot would poison the output
    try:
        run_rollout(PBSAProgram(schedule, backend="torch"), seed, steps, batch,
                    quantize=quantize)
    finally:
        rc.POISON_FREED = False


EDGE_CASES = {
    # the window is shorter than a chunk: the chunk's first frames never enter it
    "window<chunk": (sd.Pattern(VideoLayout(4, 4, (2, 2), 3), sink=sd.Sink(1),
                                window=sd.LocalWindow(1, sd.Radius(1, 1, 1) | sd.TopK(k=1))), 2, 1),
    # the sink spans several chunks (chunk blocks become sink blocks at later steps)
    "sink>chunk": (small_pattern(sink=3, chunk=2, capacity=3, window=2), 2, 1),
    # no sink, one set per KV head, causal chunk, grouped-query attention
    "per-head, causal, GQA": (dataclasses.replace(
        small_pattern(importance + previous / 2, shared=False, sink=0, capacity=4),
        current=sd.Causal()), 4, 2),
    # a shared set averaged over 4 query heads of 2 KV heads, Top-K only in the window
    "shared GQA": (small_pattern(shared=True, capacity=6, window=3,
                                 neighborhood=sd.TopK(fraction=0.5)), 4, 2),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_geometries(name, poison):
    pattern, heads, kv_heads = EDGE_CASES[name]
    run_rollout(program_of(pattern, heads=heads, kv_heads=kv_heads), 5, 7, 2)


@settings(max_examples=4)
@given(schedules(max_heads=2, head_dim=4), st.integers(0, 2**31 - 1))
def test_rollout_bf16_two_layers(schedule, seed):
    run_rollout(PBSAProgram(schedule, backend="torch"), seed, 3, 1, dtype=torch.bfloat16, layers=2)


@pytest.mark.parametrize("score,shared", [(importance + previous / 2, False), (-age, True),
                                          (importance - age / 100, True)])
def test_hundreds_of_chunks_bounded_and_exact(score, shared):
    """200 chunks: memory bounded (pool never grows, nbytes constant) and equal to the
    reference's at every step (no attention: the update is what is long-lived)."""
    program = program_of(small_pattern(score, shared, capacity=4, window=2, chunk=1,
                                       layout=VideoLayout(2, 4, (1, 2), 1)), heads=2, kv_heads=2)
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    nbytes = cache.nbytes()
    run_rollout(program, 7, 200, 1, attention=False, cache=cache)
    assert cache.nbytes() == nbytes == rc.expected_nbytes(program, 1, 1, torch.float32)
    assert cache.step == 200


def test_unbounded_window_grows_and_stays_exact(poison):
    pattern = sd.Pattern(VideoLayout(2, 4, (1, 2), 1), sink=sd.Sink(1),
                         window=sd.LocalWindow(None, sd.TopK(k=2)), name="moba-small")
    program = program_of(pattern, heads=2, kv_heads=1)
    cache = program.new_cache(1, 2, "cpu", torch.float32)
    first = cache.nslots
    run_rollout(program, 3, 2 * rc.GROWTH_START_CHUNKS + 3, 1, layers=2, cache=cache)
    assert cache.nslots > first
    # with max_frames the pool is sized once, and a commit past it is refused
    fixed = program.new_cache(1, 1, "cpu", torch.float32, max_frames=3)
    assert fixed.nslots == rc.peak_blocks(program.schedule, 3) == 3 * program.schedule.blocks_per_frame
    q, k, v = (x.float() for x in chunks_of(program.schedule, 1, 0, 1)[0])
    for _ in range(3):
        fixed.commit(0, q, k, v)
    before = snapshot(fixed)
    with pytest.raises(ValueError, match="max_frames"):
        fixed.commit(0, q, k, v)
    assert_same_state(before, snapshot(fixed))


# ---------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(schedules(max_heads=2, head_dim=4), st.integers(1, 2), st.integers(1, 3),
       st.one_of(st.none(), st.integers(1, 30)))
def test_nbytes_is_the_sympy_formula(schedule, batch, layers, max_frames):
    program = PBSAProgram(schedule, backend="torch")
    if schedule.window.frames is None and max_frames is None:
        max_frames = 12
    cache = program.new_cache(batch, layers, "meta", torch.float32, max_frames=max_frames)
    s = schedule
    frames = -(-max_frames // s.chunk_frames) * s.chunk_frames if max_frames else 10**6
    blocks = int(s.shapes.kv_blocks.subs(T, frames))
    assert cache.nslots == max(blocks, 1)
    per_block = 2 * program.kernel_block_tokens * program.kernel_head_dim * 4
    assert cache.nbytes() == layers * batch * s.num_kv_heads * cache.nslots * per_block
    # in the schedule's own units: kv_bytes scaled to the kernel's padded block and dtype
    scale = (program.kernel_block_tokens * program.kernel_head_dim * 4) / (
        s.layout.block_tokens * s.head_dim * sd.schedule.dtype_bytes(s.dtype))
    if blocks:
        assert cache.nbytes() == pytest.approx(layers * batch * s.shapes.kv_bytes(frames) * scale)


def test_nbytes_self_forcing_geometry():
    """Self-Forcing geometry needs no padding (64-token blocks, D=128): the pool is exactly
    the sympy KV bytes (S + W + C blocks per KV head), without the chunk being generated."""
    program = sd.compile(sd.presets.get("sparse-forcing"), num_heads=12, head_dim=128,
                         dtype="bfloat16", backend="torch")
    cache = program.new_cache(batch=1, num_layers=30, device="meta", dtype=torch.bfloat16)
    s = program.schedule
    assert cache.nslots == 1 * 28 + 6 * 28 + 64
    assert cache.nbytes() == 30 * s.shapes.kv_bytes(10**6) == 30 * s.shapes.kv_bytes(21)


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_state_dict_resumes_bit_for_bit(shared):
    program = program_of(small_pattern(importance + previous / 2, shared), heads=4, kv_heads=2)
    s = program.schedule
    chunks = [tuple(x.float() for x in c) for c in chunks_of(s, 2, 11, 7)]
    a = program.new_cache(2, 2, "cpu", torch.float32)
    for q, k, v in chunks[:3]:
        for layer in range(2):
            a.commit(layer, q, k, v)
    a.commit(0, *chunks[3])                 # mid-step: layer 0 done, layer 1 pending
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)

    def finish(cache):
        outs = []
        cache.commit(1, *chunks[3])
        for q, k, v in chunks[4:]:
            for layer in range(2):
                outs.append(program.attention(q, k, v, cache.tables(layer)))
                cache.commit(layer, q, k, v)
        return outs

    want = finish(a)
    b = program.new_cache(2, 2, "cpu", torch.float32)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert b.step == 3 and b.pending_layers() == [1]
    got = finish(b)
    for (o1, l1), (o2, l2) in zip(want, got):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert_same_state(a.state_dict(), b.state_dict())


# ---------------------------------------------------------------------------------------
# faults: each a ValueError that leaves the cache unchanged
# ---------------------------------------------------------------------------------------
def test_fault_cases_leave_the_cache_unchanged():
    program = program_of(small_pattern(), heads=2, kv_heads=1)
    s = program.schedule
    cache = program.new_cache(1, 2, "cpu", torch.float32)
    q, k, v = (x.float() for x in chunks_of(s, 1, 0, 1)[0])
    cache.commit(0, q, k, v)
    cache.commit(1, q, k, v)
    cache.commit(0, q, k, v)                # step 1: layer 0 done, layer 1 pending
    other = program_of(small_pattern(capacity=3), heads=2, kv_heads=1)
    other_cache = other.new_cache(1, 2, "cpu", torch.float32)
    cases = [
        ("shape", lambda: cache.commit(1, q[:, :, :-1], k, v)),
        ("shape", lambda: cache.commit(1, q, k.expand(1, 2, *k.shape[2:]), v)),
        ("shape", lambda: cache.commit(1, q, k, v[None])),
        ("dtype", lambda: cache.commit(1, q, k.double(), v)),
        ("already committed", lambda: cache.commit(0, q, k, v)),
        ("already committed", lambda: cache.tables(0)),
        ("layer", lambda: cache.commit(2, q, k, v)),
        ("schedule", lambda: cache.load_state_dict(other_cache.state_dict())),
        ("layers", lambda: cache.load_state_dict({**cache.state_dict(), "layers": []})),
        ("format", lambda: cache.load_state_dict({"format": 0})),
        ("schedule", lambda: rc.check_tables(other, cache.tables(1))),
    ]
    for what, fault in cases:
        before = snapshot(cache)
        with pytest.raises(ValueError) as info:
            fault()
        assert_same_state(before, snapshot(cache))
        assert str(info.value), what
    rc.check_tables(program, cache.tables(1))   # its own tables pass
    cache.commit(1, q, k, v)                    # and the cache still works
    assert cache.step == 2


def test_unsupported_score_is_a_clear_error():
    pattern = small_pattern(score=sympy.erf(importance))
    with pytest.raises(ur.UnsupportedScoreError, match="erf"):
        program_of(pattern).new_cache(1, 1, "cpu", torch.float32)


# ---------------------------------------------------------------------------------------
# the generated update rule
# ---------------------------------------------------------------------------------------
EXPRESSIONS = [importance, -age, importance + previous / 2 - age / 100,
               sympy.exp(-age / 3) * importance + sympy.Max(previous, 0.1) ** 2,
               sympy.Piecewise((importance, age < 3), (previous / 2, True)),
               sympy.sqrt(importance) + 1 / (1 + age) + sympy.Abs(previous) * sympy.tanh(previous),
               sympy.Min(importance, previous) + sympy.log(1 + age) + sympy.floor(age / 2)]


@pytest.mark.parametrize("expr", EXPRESSIONS, ids=str)
def test_printed_score_matches_sympy(expr):
    rule = ur.load_update_rule(expr)
    gen = torch.Generator().manual_seed(0)
    imp = torch.rand(64, generator=gen)
    prev = torch.randn(64, generator=gen)
    ages = torch.randint(0, 20, (64,), generator=gen).float()
    got = rule.score_torch(imp, prev, ages).double()
    want = torch.tensor(sd.Update(expr).evaluate(imp.double().numpy(), prev.double().numpy(),
                                                  ages.double().numpy()), dtype=torch.float64)
    want = want.expand_as(got)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert f"SCORE = {str(expr)!r}" in rule.source
    assert "def update_kernel" in rule.source and "def score_torch" in rule.source


def _random_update_inputs(seed, B=2, HKV=3, nslots=40, NP=5, NC=12, ties=False):
    gen = torch.Generator().manual_seed(seed)
    slot_block = torch.full((B, HKV, nslots), -1, dtype=torch.int32)
    cand = torch.zeros(B, HKV, 16, dtype=torch.int32)
    for b in range(B):
        for g in range(HKV):
            slots = torch.randperm(nslots, generator=gen)[:NC]
            blocks = torch.sort(torch.randperm(200, generator=gen)[:NC]).values
            slot_block[b, g, slots] = blocks.int()
            cand[b, g, :NC] = slots.int()
    imp = torch.rand(B, HKV, 16, generator=gen)
    if ties:
        imp = torch.round(imp * 3) / 3
    score = torch.where(slot_block >= 0, torch.rand(B, HKV, nslots, generator=gen), 0.0)
    valid = torch.where(slot_block >= 0, 7, 0).int()
    free = torch.zeros(B, HKV, nslots, dtype=torch.int32)
    return dict(importance=imp, cand_slots=cand, num_persistent=NP, num_candidates=NC,
                blocks_per_frame=4, age0=60, slot_block=slot_block, slot_score=score,
                slot_valid=valid, persistent_slots=torch.zeros(B, HKV, 8, dtype=torch.int32),
                persistent_count=torch.zeros(B, HKV, dtype=torch.int32), free_list=free,
                free_at=nslots - NC - 3, scores=torch.zeros(B, HKV, 16))


def _split_update_inputs(args, NP=5, NC=12):
    """The same update as `args`, in the commit's form: importance as 3 partial rows
    (2x, 0, 2x: their sum is 4x exactly in any order, scale 1/4), candidates [NP, NC) in
    a separate tail table (the cand_slots entries there become garbage), plus a window
    table to shift."""
    gen = torch.Generator().manual_seed(11)
    imp = args["importance"]
    rows = torch.stack([2 * imp, torch.zeros_like(imp), 2 * imp], dim=2)
    tail = torch.full((*imp.shape[:2], NC - NP + 2), -5, dtype=torch.int32)
    tail[..., :NC - NP] = args["cand_slots"][..., NP:NC]
    cand = args["cand_slots"].clone()
    cand[..., NP:] = 10**6                      # must not be read
    window = torch.randint(0, 40, (*imp.shape[:2], 10), generator=gen).int()
    return dict(args, importance=rows, importance_scale=0.25, cand_slots=cand,
                cand_tail=tail, window_shift=(window, 3, 5))


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("expr", [importance, -age, importance + previous / 2 - age / 100,
                                  EXPRESSIONS[3], EXPRESSIONS[4]], ids=str)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("split", [False, True], ids=["one-table", "commit-form"])
def test_triton_update_kernel_matches_torch(expr, ties, split):
    rule = ur.load_update_rule(expr)
    dev = "cuda" if CUDA else "cpu"
    results = []
    for backend in ("torch", "triton"):
        args = _random_update_inputs(3, ties=ties)
        if split:
            args = _split_update_inputs(args)
        args = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        if split:
            window, shift, count = args["window_shift"]
            args["window_shift"] = (window.to(dev), shift, count)
            old_window = window.clone()
        ur.update_step(rule, backend=backend, capacity=7, **args)
        results.append(args)
    a, b = results
    for name in ("persistent_slots", "persistent_count", "slot_block", "slot_valid", "free_list"):
        assert torch.equal(a[name], b[name]), name
    for name in ("slot_score", "scores"):
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    # the torch path follows the contract: winners = Top-7 by (score desc, index asc)
    s = a["scores"][..., :12].cpu()
    plain = _random_update_inputs(3, ties=ties)
    for bb in range(2):
        for g in range(3):
            order = sorted(range(12), key=lambda i: (-float(s[bb, g, i]), i))[:7]
            slots = plain["cand_slots"][bb, g]
            assert a["persistent_slots"][bb, g, :7].tolist() == [int(slots[i]) for i in sorted(order)]
            losers = [int(slots[i]) for i in range(12) if i not in order]
            assert a["free_list"][bb, g, 25:30].tolist() == losers
    if split:   # the same scores as the one-table form; the window advanced by 3
        ur.update_step(rule, backend="torch", capacity=7, **plain)
        # plain ran on the CPU: exp and sums may differ from the device's in the last bit
        assert torch.allclose(a["scores"].cpu(), plain["scores"], rtol=1e-6, atol=1e-7)
        for r in results:
            assert torch.equal(r["window_shift"][0][..., :5].cpu(), old_window[..., 3:8].cpu())
            assert torch.equal(r["window_shift"][0][..., 5:].cpu(), old_window[..., 5:].cpu())


# ---------------------------------------------------------------------------------------
# the Triton commit (three launches) against the torch commit and the reference
# ---------------------------------------------------------------------------------------
TRITON_COMMIT_CASES = {
    # name: (pattern, heads, kv_heads, batch, steps); every layout needs padding to the
    # kernel's 16-token blocks and 16-wide heads
    "per-head GQA": (small_pattern(importance + previous / 2, shared=False, capacity=3), 4, 2, 2, 6),
    "shared, age": (small_pattern(importance - age / 100, shared=True, capacity=6, window=3), 4, 2, 1, 7),
    "sink>chunk": (small_pattern(sink=3, chunk=2, capacity=3, window=2), 2, 1, 1, 6),
    "window<chunk": (EDGE_CASES["window<chunk"][0], 2, 1, 1, 5),   # a partial chunk kept
    "no persistent memory": (small_pattern(capacity=0, window=2), 2, 2, 2, 6),
    "unbounded window (grows)": (sd.Pattern(VideoLayout(2, 4, (1, 2), 1), sink=sd.Sink(1),
                                            window=sd.LocalWindow(None, sd.TopK(k=2))), 2, 1, 1,
                                 2 * rc.GROWTH_START_CHUNKS + 2),
}
TRITON_DEVICE = "cuda" if CUDA else "cpu"


def assert_states_close(a, b, where=""):
    """Integer tables and K/V copies equal; fp32 sums (representatives, scores) close."""
    assert a["step"] == b["step"]
    for la, lb in zip(a["layers"], b["layers"]):
        for name in rc._TENSORS:
            x, y = la[name].cpu(), lb[name].cpu()
            if name in ("slot_score", "k_rep"):
                assert torch.allclose(x, y, atol=1e-5, rtol=1e-5), f"{name} {where}"
            else:
                assert torch.equal(x, y), f"{name} {where}"
        for name in rc._INTS:
            assert la[name] == lb[name], f"{name} {where}"


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(TRITON_COMMIT_CASES))
def test_triton_commit_matches_torch(name):
    """The Triton commit (fused importance, generated update with the window shift, the
    chunk writer) leaves exactly the torch commit's state after every chunk, two layers."""
    pattern, heads, kv_heads, batch, steps = TRITON_COMMIT_CASES[name]
    caches = []
    for backend in ("torch", "triton"):
        program = program_of(pattern, heads=heads, kv_heads=kv_heads, backend=backend)
        caches.append(program.new_cache(batch, 2, TRITON_DEVICE, torch.float32))
    assert caches[1]._fast is not None and caches[0]._fast is None
    for t, (q, k, v) in enumerate(chunks_of(caches[0].schedule, batch, 5, steps)):
        q, k, v = (x.float().to(TRITON_DEVICE) for x in (q, k, v))
        for cache in caches:
            for layer in range(2):
                cache.commit(layer, q, k, v)
        assert_states_close(caches[0].state_dict(), caches[1].state_dict(), f"after chunk {t}")


@pytest.mark.skipif(CUDA or not INTERPRETER, reason="interpreter test (the reference is on the CPU)")
@pytest.mark.parametrize("name", ["per-head GQA", "sink>chunk", "no persistent memory"])
def test_triton_rollout_matches_reference(name, poison):
    """The Triton commit against the float64 reference: tables, pool contents, scores."""
    pattern, heads, kv_heads, batch, steps = TRITON_COMMIT_CASES[name]
    program = program_of(pattern, heads=heads, kv_heads=kv_heads, backend="triton")
    run_rollout(program, 9, steps, batch, attention=False)


def _specialisation_key(fn, args, kwargs):
    """What Triton's JIT keys its compiled kernels on, for one launch: constexpr values,
    integer specialisation (== 1, divisible by 16, i32 / i64) unless do_not_specialize,
    tensor dtypes and 16-byte alignment, launch options (num_warps)."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = inspect.signature(fn.fn).parameters
    dns = set((fn.kwargs.get("do_not_specialize") or ()))
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k in params})
    key = []
    for i, (name, param) in enumerate(params.items()):
        value = bound[name]
        if "constexpr" in str(param.annotation):
            key.append((name, "constexpr", value))
        elif isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            specialise = name not in dns and i not in dns
            key.append((name, native_specialize_impl(BaseBackend, value, False, specialise, True)))
        else:
            key.append((name, type(value).__name__))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    return fn.fn.__name__, tuple(key), options


@pytest.fixture
def kernel_compiles(monkeypatch):
    """A list that receives one entry per kernel compile Triton would do: on a GPU the
    compiles themselves (jit_post_compile_hook), in the interpreter the launches with a
    specialisation key not seen before."""
    compiles = []
    if CUDA:
        import triton

        monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                            lambda **kw: compiles.append(kw["fn"].name))
        return compiles
    from triton.runtime.interpreter import InterpretedFunction

    seen = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = _specialisation_key(self, args, kwargs)
        if key not in seen:
            seen.add(key)
            compiles.append(key)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return compiles


@pytest.mark.skipif(not (CUDA or INTERPRETER), reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("chunk", [1, 3])
def test_steady_state_commits_compile_nothing(chunk, kernel_compiles):
    """After the memory is full, a commit changes only runtime integers (AGE0 = (t+1)*c - 1
    every step, which is divisible by 16 every 16 steps): nothing may be recompiled."""
    layout = VideoLayout(2, 4, (1, 2), chunk)
    pattern = small_pattern(importance - age / 100, shared=False, capacity=4, window=chunk + 1,
                            chunk=chunk, layout=layout)
    program = program_of(pattern, heads=2, kv_heads=2, backend="triton")
    s = program.schedule
    cache = program.new_cache(1, 1, TRITON_DEVICE, torch.float32)
    q, k, v = (x.float().to(TRITON_DEVICE) for x in chunks_of(s, 1, 1, 1)[0])
    warm = rc.steady_frames(s) // chunk + 1
    for _ in range(warm):
        cache.commit(0, q, k, v)
    if not CUDA:  # (on a GPU, earlier tests may have compiled these kernels already)
        assert kernel_compiles, "the warm-up launched no Triton kernel"
    kernel_compiles.clear()
    ages = []
    while cache.step < warm + 17:
        ages.append(rc.step_plan(s, cache.step).age0)
        cache.commit(0, q, k, v)
    assert any(a % 16 == 0 for a in ages) and any(a % 16 for a in ages)
    assert kernel_compiles == [], f"steady-state commits compiled: {kernel_compiles}"


# ---------------------------------------------------------------------------------------
# inspection and the picture
# ---------------------------------------------------------------------------------------
def test_describe_and_picture(tmp_path):
    program = program_of(small_pattern(capacity=4), heads=2, kv_heads=1)
    snaps = rc.simulate_memory(program, steps=12, seed=1)
    assert [sn.step for sn in snaps] == list(range(13))
    assert all(sum(len(p) for p in sn.persistent.values()) <= 4 for sn in snaps)
    path = rc.draw_memory(snaps, tmp_path / "memory.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    for q, k, v in chunks_of(program.schedule, 1, 2, 6):
        cache.commit(0, q.float(), k.float(), v.float())
    text = cache.describe()
    assert "sink: frames [0, 1)" in text and "window: frames [10, 12)" in text
    assert "persistent (shared by all heads): 4/4 blocks" in text
    members = cache.persistent_sets(0)[(0, 0)]
    f, i, j = program.schedule.layout.block_coords(min(members))
    assert f"frame {f} " in text and f"({i},{j})" in text
