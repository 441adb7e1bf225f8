"""Runtime hardening: state dict validation, NaN scores, table checks, non-finite inputs,
broken kernel cache entries and argument types (codegen/memory/rollout_cache.py, program.py,
cache.py, update_rule.py)."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import sympy
import torch

import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.layout import VideoLayout
from sparsedsl.testing import chunk_tensors
from sparsedsl.update import importance, previous

from codegen.attention import cache as kcache
from codegen.program import PBSAProgram

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def small_pattern(score=importance, capacity=5, window=2, sink=1, chunk=2, shared=True):
    layout = VideoLayout(4, 6, (2, 3), chunk)
    return sd.Pattern(layout, sink=sd.Sink(sink) if sink else None,
                      persistent=sd.Persistent(capacity, shared) if capacity else None,
                      window=sd.LocalWindow(window, sd.Radius(1, 1, 1) | sd.TopK(k=2)),
                      update=sd.Update(score) if capacity else None, name="small")


def program_of(pattern, heads=2, kv_heads=None, head_dim=4, backend="torch"):
    schedule = sd.lower(pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                        dtype="float32")
    return PBSAProgram(schedule, backend=backend)


def chunks_of(schedule, batch, seed, steps):
    return [tuple(x.float().double() for x in c)
            for c in chunk_tensors(schedule, batch, seed, steps)]


def state_bytes(state):
    """Everything in a state dict, tensors as raw bytes (bitwise comparison, NaN included)."""
    out = {k: v for k, v in state.items() if k != "layers"}
    layers = []
    for entry in state["layers"]:
        layers.append({n: (v.contiguous().view(torch.uint8).clone() if isinstance(v, torch.Tensor)
                           and v.is_floating_point() else v.clone() if isinstance(v, torch.Tensor)
                           else v) for n, v in entry.items()})
    out["layers"] = layers
    return out


def assert_bitwise_same(a, b):
    a, b = state_bytes(a), state_bytes(b)
    assert a.keys() == b.keys()
    for key in a:
        if key != "layers":
            assert a[key] == b[key], key
    for la, lb in zip(a["layers"], b["layers"]):
        assert la.keys() == lb.keys()
        for name in la:
            if isinstance(la[name], torch.Tensor):
                assert torch.equal(la[name], lb[name]), name
            else:
                assert la[name] == lb[name], name


# ---------------------------------------------------------------------------------------
# 1. load_state_dict validates every index, count and the step
# ---------------------------------------------------------------------------------------
def _rolled(steps):
    program = program_of(small_pattern(capacity=5))
    cache = program.new_cache(2, 2, "cpu", torch.float32)
    for q, k, v in chunks_of(program.schedule, 2, 3, steps):
        for layer in range(2):
            cache.commit(layer, q.float(), k.float(), v.float())
    return program, cache.state_dict()


@pytest.fixture(scope="module")
def rolled():
    """A two-layer cache after 4 chunks (persistent memory filled, no free slot left) and
    after 2 chunks (a free slot left), with their state dicts."""
    return {4: _rolled(4), 2: _rolled(2)}


def _corrupt(state, fn):
    bad = {k: v for k, v in state.items()}
    bad["layers"] = [{n: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for n, v in e.items()} for e in state["layers"]]
    fn(bad)
    return bad


def _set(name, idx, value, layer=0):
    def fn(st):
        st["layers"][layer][name][idx] = value
    return fn


def _setint(name, value, layer=0):
    def fn(st):
        st["layers"][layer][name] = value
    return fn


BAD_STATES = {
    "slot_block huge": (lambda st: _set("slot_block", (0, 0, 0), 1000000)(st), "slot_block"),
    "slot_block below -1": (lambda st: _set("slot_block", (1, 0, 2), -7)(st), "slot_block"),
    "step ahead of the tables": (lambda st: st.update(step=st["step"] + 3) or
                                 [e.update(step=e["step"] + 3) for e in st["layers"]], "step"),
    "step behind the tables": (lambda st: st.update(step=st["step"] - 1) or
                               [e.update(step=e["step"] - 1) for e in st["layers"]], "step"),
    "window slot out of range": (_set("window_slots", (0, 0, 1), 10**6), "window_slots"),
    "window slot negative": (_set("window_slots", (0, 0, 0), -1), "window_slots"),
    "sink slot out of range": (_set("sink_slots", (0, 0, 0), 10**6), "sink_slots"),
    "persistent slot out of range": (_set("persistent_slots", (0, 0, 0), -3), "persistent_slots"),
    "persistent_count negative": (_set("persistent_count", (0, 0), -1), "persistent_count"),
    "persistent_count above capacity": (_set("persistent_count", (1, 0), 6), "persistent_count"),
    "n_free negative": (_setint("n_free", -1), "n_free"),
    "n_free above nslots": (_setint("n_free", 10**6), "n_free"),
    "n_persistent wrong": (_setint("n_persistent", 2), "n_persistent"),
    "free slot also in use": (None, "free_list"),
    "free list entry out of range": (None, "free_list"),
    "window slot twice": (None, "window_slots"),
    "slot_valid out of range": (_set("slot_valid", (0, 0, 0), 99), "slot_valid"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_load_state_dict_refuses_inconsistent_states(rolled, case):
    program, good = rolled[2 if "free" in case else 4]
    fn, field = BAD_STATES[case]
    if case == "free slot also in use":
        def fn(st):
            e = st["layers"][0]
            assert e["n_free"] > 0
            e["free_list"][0, 0, e["n_free"] - 1] = e["window_slots"][0, 0, 0]
    elif case == "free list entry out of range":
        def fn(st):
            e = st["layers"][0]
            assert e["n_free"] > 0
            e["free_list"][0, 0, e["n_free"] - 1] = e["k_pool"].shape[2]
    elif case == "window slot twice":
        def fn(st):
            e = st["layers"][0]
            e["window_slots"][0, 0, 1] = e["window_slots"][0, 0, 0]
    bad = _corrupt(good, fn)
    cache = program.new_cache(2, 2, "cpu", torch.float32)
    cache.load_state_dict(good)
    before = cache.state_dict()
    with pytest.raises(ValueError, match=field):
        cache.load_state_dict(bad)
    assert_bitwise_same(before, cache.state_dict())
    # a good state still loads, and the loaded cache goes on committing
    cache.load_state_dict(good)
    assert_bitwise_same(good, cache.state_dict())


def test_load_state_dict_accepts_every_reachable_state():
    """States at every step (mid-step included, unbounded growable pool included) load."""
    for pattern, kw in ((small_pattern(capacity=5), {}), (small_pattern(capacity=0, window=None), {})):
        program = program_of(pattern)
        cache = program.new_cache(1, 2, "cpu", torch.float32, **kw)
        other = program.new_cache(1, 2, "cpu", torch.float32, **kw)
        other.load_state_dict(cache.state_dict())
        for q, k, v in chunks_of(program.schedule, 1, 4, 6):
            cache.commit(0, q.float(), k.float(), v.float())
            other.load_state_dict(cache.state_dict())          # mid-step
            cache.commit(1, q.float(), k.float(), v.float())
            other.load_state_dict(cache.state_dict())
            assert_bitwise_same(cache.state_dict(), other.state_dict())


# ---------------------------------------------------------------------------------------
# 2. a NaN score ranks last, the same in the reference, the torch and the Triton update
# ---------------------------------------------------------------------------------------
NAN_SCORE = sympy.sqrt(previous) + importance - 3


def _nan_rank_key(item):
    block, score = item
    return (math.isnan(score), 0.0 if math.isnan(score) else -score, block)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (CUDA or INTERPRETER), reason="needs a GPU or TRITON_INTERPRET=1"))])
def test_nan_scores_rank_last_like_the_reference(backend):
    pattern = small_pattern(score=NAN_SCORE, capacity=12)
    program = program_of(pattern, backend=backend)
    s = program.schedule
    device = "cuda" if (CUDA and backend == "triton") else "cpu"
    cache = program.new_cache(1, 1, device, torch.float32)
    state = reference.new_state(s, 1)
    saw_nan_winner = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy: sqrt of a negative number
        for step, (q, k, v) in enumerate(chunks_of(s, 1, 11, 7)):
            cache.commit(0, *(x.float().to(device) for x in (q, k, v)))
            state = reference.commit(s, state, q, k, v)
            got = cache.persistent_sets(0)
            for key, want in state.persistent.items():
                assert sorted(got[key]) == sorted(want), f"step {step}, {key}"
                for block, score in want.items():
                    have = got[key][block]
                    if math.isnan(score):
                        saw_nan_winner = True
                        assert math.isnan(have), (step, block)
                    else:
                        assert abs(have - score) <= 1e-4 * (1 + abs(score)), (step, block)
    assert saw_nan_winner, "the rollout never kept a NaN-scored block: the test tests nothing"


def test_reference_ranks_nan_last():
    """The reference's ranking: numbers (even -inf) before NaN, NaNs by block index."""
    scores = {7: float("nan"), 3: float("-inf"), 5: 1.0, 2: float("nan"), 9: 1.0}
    assert [b for b, _ in sorted(scores.items(), key=reference.rank_key)] == [5, 9, 3, 2, 7]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (CUDA or INTERPRETER), reason="needs a GPU or TRITON_INTERPRET=1"))])
def test_update_step_nan_below_minus_inf(backend):
    """NaN ranks below -inf; -inf and NaN are not a tie (torch and Triton alike)."""
    from codegen.memory import update_rule as ur
    rule = ur.load_update_rule(importance)
    dev = "cuda" if (CUDA and backend == "triton") else "cpu"
    f32, i32 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
    imp = torch.tensor([[[float("nan"), float("-inf"), float("nan"), 0.5, float("-inf")]]], **f32)
    nc, cap = 5, 3
    slot_block = torch.arange(nc, **i32).view(1, 1, nc).contiguous()
    slot_score = torch.zeros(1, 1, nc, **f32)
    slot_valid = torch.ones(1, 1, nc, **i32)
    ps = torch.zeros(1, 1, cap, **i32)
    pc = torch.zeros(1, 1, **i32)
    fl = torch.zeros(1, 1, nc, **i32)
    scores = torch.zeros(1, 1, nc, **f32)
    ur.update_step(rule, backend=backend, importance=imp, cand_slots=slot_block.clone(),
                   num_persistent=0, num_candidates=nc, capacity=cap, blocks_per_frame=4,
                   age0=3, slot_block=slot_block, slot_score=slot_score, slot_valid=slot_valid,
                   persistent_slots=ps, persistent_count=pc, free_list=fl, free_at=0,
                   scores=scores)
    assert ps[0, 0].tolist() == [1, 3, 4]
    assert fl[0, 0, :2].tolist() == [0, 2]


# ---------------------------------------------------------------------------------------
# 3. user tables: persistent_count out of range is refused (validate=True)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def step_tables():
    program = program_of(small_pattern(capacity=5))
    s = program.schedule
    state = reference.new_state(s, 1)
    chunks = chunks_of(s, 1, 2, 5)
    for q, k, v in chunks[:4]:
        state = reference.commit(s, state, q, k, v)
    from codegen.attention.tables import tables_from_reference
    return program, tables_from_reference(program, state, torch.float32, "cpu"), chunks[4]


@pytest.mark.parametrize("count", [-1, 6, 100])
def test_attention_refuses_persistent_count_out_of_range(step_tables, count):
    import dataclasses
    program, tables, (q, k, v) = step_tables
    pc = tables.persistent_count.clone()
    pc[0, 0] = count
    bad = dataclasses.replace(tables, persistent_count=pc)
    with pytest.raises(ValueError, match="persistent_count"):
        program.attention(q.float(), k.float(), v.float(), bad)
    program.attention(q.float(), k.float(), v.float(), tables)  # the good tables still run
    program.attention(q.float(), k.float(), v.float(), bad, validate=False)  # no check, no raise


# ---------------------------------------------------------------------------------------
# 4. non-finite inputs give non-finite outputs where they are read, and nothing crashes
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_one_chunk_poisons_only_where_its_block_is_visited(value):
    program = program_of(small_pattern(capacity=5))
    s = program.schedule
    nb = s.blocks_per_frame
    bt = s.layout.block_tokens
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    chunks = [tuple(x.float() for x in c) for c in chunks_of(s, 1, 6, 4)]
    q0, k0, v0 = chunks[0]
    k0 = k0.clone()
    bad_block = nb  # chunk 0 block nb = frame 1, tile 0 (not a sink block: sink = frame 0)
    k0[:, :, bad_block * bt] = value
    out, _ = program.attention(q0, k0, v0, cache.tables(0))
    cache.commit(0, q0, k0, v0)               # accepted: no host sync spent on checking
    seen = set()
    for step in (1, 2):
        q, k, v = chunks[step]
        tables = cache.tables(0)
        out, lse, (vs, vc) = program.attention(q, k, v, tables, return_visits=True)
        visited = program.visited_blocks(vs, vc, tables)
        for h in range(s.num_heads):
            for qb in range(s.layout.chunk_blocks):
                rows = out[0, h, qb * bt:(qb + 1) * bt]
                seen.add(bad_block in visited[0][h][qb])
                if bad_block in visited[0][h][qb]:
                    if value != value:
                        assert torch.isnan(rows).any(), (step, h, qb)
                else:
                    assert torch.isfinite(rows).all(), (step, h, qb)
        cache.commit(0, q, k, v)
    assert cache.step == 3
    assert seen == {True, False}, "the poisoned block must be visited by some rows, not all"
    # the tables, free list and step stayed consistent (the state passes load_state_dict)
    other = program.new_cache(1, 1, "cpu", torch.float32)
    other.load_state_dict(cache.state_dict())


# ---------------------------------------------------------------------------------------
# 5. a cached kernel file that does not import is rendered again
# ---------------------------------------------------------------------------------------
def test_truncated_cache_entry_is_rerendered(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDSL_KERNEL_CACHE", str(tmp_path))
    program = program_of(small_pattern(capacity=5))
    spec = program.kernel_spec(10**4, "float32")
    kcache.clear_memory_cache()
    try:
        mod = kcache.load_attention_kernels(spec)
        path = mod.KERNEL_PATH
        text = open(path).read()
        first, rest = text.split("\n", 1)
        with open(path, "w") as f:          # the key line survives, the body is cut short
            f.write(first + "\n" + rest[:len(rest) // 2])
        kcache.clear_memory_cache()
        mod = kcache.load_attention_kernels(spec)
        assert open(path).read() == text
        assert hasattr(mod, "KERNEL_KEY")
    finally:
        kcache.clear_memory_cache()


def test_write_and_import_rerenders_a_broken_module(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("# key: 1\ndef f(:\n")
    mod, rendered = kcache.write_and_import(path, "# key: 1", lambda: "# key: 1\nX = 3\n",
                                            "sparsedsl_kernels.hardening_test_mod")
    assert rendered and mod.X == 3 and path.read_text() == "# key: 1\nX = 3\n"


# ---------------------------------------------------------------------------------------
# 10. wrong argument types say what was expected
# ---------------------------------------------------------------------------------------
def test_attention_argument_types(step_tables):
    program, tables, (q, k, v) = step_tables
    q, k, v = q.float(), k.float(), v.float()
    with pytest.raises(ValueError, match=r"tables must be the BlockTables of "
                                         r"program.new_cache\(...\).tables\(layer\), got None"):
        program.attention(q, k, v, None)
    with pytest.raises(ValueError, match="tables must be the BlockTables.*got dict"):
        program.attention(q, k, v, {})
    with pytest.raises(ValueError, match="q must be a torch.Tensor, got ndarray"):
        program.attention(q.numpy(), k, v, tables)
    with pytest.raises(ValueError, match="k must be a torch.Tensor, got list"):
        program.attention(q, [1], v, tables)
    with pytest.raises(ValueError, match="v must be a torch.Tensor, got NoneType"):
        program.attention(q, k, None, tables)
    cache = program.new_cache(1, 1, "cpu", torch.float32)
    with pytest.raises(ValueError, match="q must be a torch.Tensor, got ndarray"):
        cache.attention(0, np.zeros(3), k, v)
