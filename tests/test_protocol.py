"""One program protocol (sparsedsl/protocol.py): the same user code runs on every backend.

For every registered backend (reference, torch, triton under the interpreter on a CPU, and a
third party's registered here): compile, new_cache, a rollout that attends and commits on
every layer, a pause (state_dict through torch.save) and a resume into a fresh cache with
identical outputs, nbytes, explain; outputs agree with float64 attention (reference.attention
on the same rounded inputs) within the dtype's tolerance of codegen.check. The same wrong
calls raise the same ValueErrors, and a backend that does not follow the protocol fails in
sd.compile with a BackendError naming it and what it lacks.
"""
import copy
import io
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import codegen  # noqa: F401  (registers the triton and torch backends without an install)
import sparsedsl as sd
from sparsedsl import reference
from sparsedsl.explain import explain
from sparsedsl.protocol import missing_members
from sparsedsl.testing import chunk_tensors, layouts, patterns

from codegen.check import TOL

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = sd.available_backends()
#: backends that run a hypothesis example in well under a second on a CPU core
FAST = [b for b in BACKENDS if b != "triton"]

# sink, persistent memory with an update, a window of radius | Top-K, causal chunk, a partial
# edge tile (2x5 tokens in 2x3 tiles) and grouped-query heads, yet small enough for Triton's
# interpreter (8 kernel programs a call): the persistent set fills at step 1, competes at 2
SMALL = sd.Pattern(sd.VideoLayout(2, 5, (2, 3), 2), sink=sd.Sink(1),
                   persistent=sd.Persistent(2, shared_heads=False),
                   window=sd.LocalWindow(2, sd.Radius(1, 0, 0) | sd.TopK(k=1)),
                   current=sd.Causal(), update=sd.Update(sd.stat.importance + sd.stat.previous / 2),
                   name="protocol-small")


def skip_unrunnable(backend):
    if backend == "triton" and not (CUDA or INTERPRETER):
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")


def device_of(backend):
    return "cuda" if CUDA and backend != "reference" else "cpu"


# ---------------------------------------------------------------------------------------
# the user's code: not one line depends on the backend
# ---------------------------------------------------------------------------------------
def save(cache) -> bytes:
    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    return buffer.getvalue()


def load(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=True)


def assert_same(a, b, where="state"):
    """Equal state dicts: the same keys, values and tensors (bitwise)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def layer_chunks(schedule, batch, steps, layers, seed):
    """chunks[t][layer] = (q, k, v) float64 tile-major; each layer its own inputs."""
    per_layer = [chunk_tensors(schedule, batch, seed + 1000 * layer, steps) for layer in range(layers)]
    return [[per_layer[layer][t] for layer in range(layers)] for t in range(steps)]


def user_code(backend, pattern, chunks, *, heads=2, kv_heads=1, head_dim=4, dtype=torch.float32,
              batch=1, device="cpu", resume_at=1):
    """Compile, roll out (attention then commit on every layer), pause at step `resume_at`,
    resume in a fresh cache and check that it gives the same outputs and state. Returns
    {(step, layer): (out, lse)}."""
    program = sd.compile(pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         dtype=str(dtype).replace("torch.", ""), backend=backend)
    assert isinstance(program, sd.Program) and program.backend == backend
    assert "visits" in program.explain()
    steps, layers = len(chunks), len(chunks[0])
    cache = program.new_cache(batch=batch, num_layers=layers, device=device, dtype=dtype)
    assert isinstance(cache, sd.Cache) and cache.step == 0
    assert (cache.batch, cache.num_layers, cache.dtype) == (batch, layers, dtype)
    as_input = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    outs, paused = {}, None
    for t in range(steps):
        if t == resume_at:
            paused = save(cache)
        for layer in range(layers):
            q, k, v = map(as_input, chunks[t][layer])
            outs[t, layer] = program.attention(q, k, v, cache.tables(layer))
            cache.commit(layer, q, k, v)
        assert cache.step == t + 1
    assert cache.nbytes() > 0
    if paused is not None:
        fresh = program.new_cache(batch=batch, num_layers=layers, device=device, dtype=dtype)
        fresh.load_state_dict(load(paused))
        assert fresh.step == resume_at
        for t in range(resume_at, steps):
            for layer in range(layers):
                q, k, v = map(as_input, chunks[t][layer])
                out, lse = fresh.attention(layer, q, k, v)       # the cache's shorthand
                assert torch.equal(out, outs[t, layer][0]) and torch.equal(lse, outs[t, layer][1])
                fresh.commit(layer, q, k, v)
        assert_same(fresh.state_dict(), cache.state_dict())
    return outs


def check_against_float64(schedule, chunks, outs, dtype, batch=1):
    """Every output against reference.attention in float64 on the inputs rounded to `dtype`."""
    tol = TOL[dtype]
    lay = schedule.layout
    valid = lay.valid_token_mask(lay.chunk_frames)
    for layer in range(len(chunks[0])):
        state = reference.new_state(schedule, batch)
        for t in range(len(chunks)):
            q, k, v = (x.to(dtype).double() for x in chunks[t][layer])
            want, want_lse, _ = reference.attention(schedule, state, q, k, v)
            out, lse = (x.cpu() for x in outs[t, layer])
            assert out.dtype == dtype and lse.dtype == torch.float32
            err = (out.double() - want).norm() / (want.norm() + 1e-6 * want.numel() ** 0.5)
            assert err < tol, f"step {t}, layer {layer}: relative output error {err:.2e}"
            assert torch.allclose(lse.double()[:, :, valid], want_lse[:, :, valid], atol=10 * tol)
            assert bool((out[:, :, ~valid] == 0).all()) and bool((lse[:, :, ~valid] == -torch.inf).all())
            state = reference.commit(schedule, state, q, k, v)


# ---------------------------------------------------------------------------------------
# every registered backend
# ---------------------------------------------------------------------------------------
def test_the_project_backends_are_registered():
    assert {"reference", "torch", "triton"} <= set(BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_follows_the_protocol(backend):
    skip_unrunnable(backend)
    program = sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32",
                         backend=backend)
    assert missing_members(program, sd.Program) == []
    cache = program.new_cache(batch=1, num_layers=2, device=device_of(backend))
    assert missing_members(cache, sd.Cache) == []
    assert cache.dtype == torch.float32 and cache.device.type == device_of(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_user_code_runs_on_every_backend(backend):
    skip_unrunnable(backend)
    schedule = sd.lower(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32")
    chunks = layer_chunks(schedule, batch=1, steps=4, layers=2, seed=7)
    outs = user_code(backend, SMALL, chunks, device=device_of(backend), resume_at=3)
    check_against_float64(schedule, chunks, outs, torch.float32)


@pytest.mark.parametrize("backend", FAST)
def test_bfloat16_on_every_fast_backend(backend):
    schedule = sd.lower(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="bfloat16")
    chunks = layer_chunks(schedule, batch=2, steps=3, layers=1, seed=3)
    outs = user_code(backend, SMALL, chunks, dtype=torch.bfloat16, batch=2,
                     device=device_of(backend), resume_at=2)
    check_against_float64(schedule, chunks, outs, torch.bfloat16, batch=2)


@st.composite
def small_patterns(draw):
    """A preset or a random pattern on a small layout."""
    layout = draw(layouts(max_side=5, max_chunk_frames=2))
    name = draw(st.sampled_from([None] + sorted(sd.presets.PRESETS)))
    if name is None:
        return draw(patterns(layout=layout))
    overrides = {"capacity": draw(st.integers(1, 4))} if name == "sparse-forcing" else {}
    return sd.presets.get(name, layout=layout, **overrides)


@settings(max_examples=8)
@given(small_patterns(), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_fast_backends_agree_over_patterns(pattern, kv_heads, group, steps, layers, seed):
    schedule = sd.lower(pattern, num_heads=kv_heads * group, num_kv_heads=kv_heads, head_dim=4,
                        dtype="float32")
    chunks = layer_chunks(schedule, batch=1, steps=steps, layers=layers, seed=seed)
    for backend in FAST:
        outs = user_code(backend, pattern, chunks, heads=kv_heads * group, kv_heads=kv_heads,
                         device=device_of(backend), resume_at=steps - 1)
        check_against_float64(schedule, chunks, outs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_mistakes_raise_the_same_errors(backend):
    skip_unrunnable(backend)
    device = device_of(backend)
    program = sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32",
                         backend=backend)
    other = sd.compile(sd.presets.get("sink-window", layout=SMALL.layout, frames=2), num_heads=2,
                       num_kv_heads=1, head_dim=4, dtype="float32", backend=backend)
    cache = program.new_cache(batch=1, num_layers=2, device=device)
    q, k, v = (x.to(device, torch.float32) for x in chunk_tensors(program.schedule, 1, 0, 1)[0])
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        program.attention(q.numpy() if device == "cpu" else None, k, v, cache.tables(0))
    with pytest.raises(ValueError, match="tables must be"):
        program.attention(q, k, v, None)
    with pytest.raises(ValueError, match="dtype"):
        program.attention(q.double(), k.double(), v.double(), cache.tables(0))
    with pytest.raises(ValueError, match="belong to a cache of schedule"):
        program.attention(q, k, v, other.new_cache(device=device).tables(0))
    with pytest.raises(ValueError, match=r"layer = 2"):
        cache.tables(2)
    with pytest.raises(ValueError, match="shape"):
        cache.commit(0, q[:, :1], k, v)
    with pytest.raises(ValueError, match="dtype"):
        cache.commit(0, q.half(), k.half(), v.half())
    before = save(cache)
    with pytest.raises(ValueError, match="belongs to pattern"):
        cache.load_state_dict(other.new_cache(num_layers=2, device=device).state_dict())
    assert_same(load(before), cache.state_dict())
    cache.commit(0, q, k, v)
    with pytest.raises(ValueError, match="already committed"):
        cache.commit(0, q, k, v)
    with pytest.raises(ValueError, match="already committed"):
        cache.tables(0)
    cache.commit(1, q, k, v)
    assert cache.step == 1 and cache.tables(0).step == 1
    # max_frames bounds an unbounded window: the third chunk of 2 frames does not fit in 4
    dense = sd.compile(sd.presets.get("dense-causal", layout=SMALL.layout), num_heads=2,
                       num_kv_heads=1, head_dim=4, dtype="float32", backend=backend)
    bounded = dense.new_cache(device=device, max_frames=4)
    for _ in range(2):
        bounded.commit(0, q, k, v)
    with pytest.raises(ValueError, match="max_frames"):
        bounded.commit(0, q, k, v)


@pytest.mark.parametrize("backend", FAST)
def test_attention_is_differentiable_on_every_fast_backend(backend):
    program = sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32",
                         backend=backend)
    cache = program.new_cache()
    chunks = chunk_tensors(program.schedule, 1, 5, 3)
    for q, k, v in chunks[:2]:
        cache.commit(0, *(x.float() for x in (q, k, v)))
    q, k, v = (x.float().requires_grad_() for x in chunks[2])
    out, _ = program.attention(q, k, v, cache.tables(0))
    out.square().sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    state = reference.new_state(program.schedule, 1)
    for c in chunks[:2]:
        state = reference.commit(program.schedule, state, *(x.float().double() for x in c))
    want, _, _ = reference.attention(program.schedule, state, q64, k64, v64)
    want.square().sum().backward()
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------
# the reference backend's own forms
# ---------------------------------------------------------------------------------------
def test_reference_program_takes_a_bare_state_and_refuses_the_old_call_form():
    program = sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32",
                         backend="reference")
    state = reference.new_state(program.schedule, 1)
    q, k, v = chunk_tensors(program.schedule, 1, 0, 1)[0]
    out, lse = program.attention(q, k, v, state)          # float64 in, float64 out
    want, want_lse, _ = reference.attention(program.schedule, state, q, k, v)
    assert out.dtype == lse.dtype == torch.float64
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match=r"is now attention\(q, k, v, tables\)"):
        program.attention(state, q, k, v)


def test_reference_cache_refuses_a_state_that_does_not_fit():
    program = sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32",
                         backend="reference")
    cache = program.new_cache(num_layers=2)
    for q, k, v in chunk_tensors(program.schedule, 1, 0, 4):
        for layer in range(2):
            cache.commit(layer, q.float(), k.float(), v.float())
    good = cache.state_dict()
    bad = copy.deepcopy(good)
    bad["layers"][1]["blocks"][0, 2] = 99                  # a block the rollout does not hold
    with pytest.raises(ValueError, match="layer 1 blocks held"):
        cache.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["layers"][0]["persistent"] = bad["layers"][0]["persistent"][:1]
    bad["layers"][0]["scores"] = bad["layers"][0]["scores"][:1]
    with pytest.raises(ValueError, match="layer 0 persistent set"):
        cache.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["layers"][0]["step"] = 7
    with pytest.raises(ValueError, match="step"):
        cache.load_state_dict(bad)
    assert_same(cache.state_dict(), good)                  # unchanged by the failed loads


# ---------------------------------------------------------------------------------------
# a third party's backend
# ---------------------------------------------------------------------------------------
class ToyCache:
    """A third party's cache: a reference.RolloutState per layer, saved with deepcopy."""

    def __init__(self, program, batch, num_layers, device, dtype):
        self.program, self.batch, self.num_layers = program, batch, num_layers
        self.device, self.dtype = torch.device(device), dtype
        self.states = [reference.new_state(program.schedule, batch) for _ in range(num_layers)]
        self.step = 0

    def tables(self, layer):
        return self.states[layer]

    def attention(self, layer, q, k, v, **kwargs):
        return self.program.attention(q, k, v, self.tables(layer), **kwargs)

    def commit(self, layer, q, k, v):
        self.states[layer] = reference.commit(self.program.schedule, self.states[layer],
                                              q.detach(), k.detach(), v.detach())
        self.step = min(s.step for s in self.states)

    def state_dict(self):
        return {"step": self.step, "states": [{"step": s.step, "kv": copy.deepcopy(s.kv),
                                               "persistent": copy.deepcopy(s.persistent)}
                                              for s in self.states]}

    def load_state_dict(self, state):
        self.step = state["step"]
        self.states = [reference.RolloutState(s["step"], self.batch, copy.deepcopy(s["kv"]),
                                              copy.deepcopy(s["persistent"]))
                       for s in state["states"]]

    def nbytes(self):
        return sum(s.nbytes(str(self.dtype).replace("torch.", "")) for s in self.states)


class ToyProgram:
    """A third party's program: dense attention over the reference's block mask."""

    backend = "toy"

    def __init__(self, schedule, **options):
        self.schedule = schedule

    def explain(self, **kwargs):
        return explain(self.schedule, **kwargs) + "\n\nrun by the toy backend"

    def new_cache(self, batch=1, num_layers=1, device="cpu", dtype=None, max_frames=None):
        return ToyCache(self, batch, num_layers, device, dtype or torch.float32)

    def attention(self, q, k, v, tables, *, validate=True):
        s = self.schedule
        mask = reference.allowed_blocks(s, tables, q)
        out, lse = reference.masked_attention(s, tables, q, k, v, mask)
        return out.to(q.dtype), lse.float()


class NoCacheProgram:
    backend = "no-cache"

    def __init__(self, schedule, **options):
        self.schedule = schedule

    def explain(self, **kwargs):
        return ""

    def attention(self, q, k, v, tables, *, validate=True):
        raise NotImplementedError


@pytest.fixture
def register():
    names = []

    def add(name, factory):
        sd.register_backend(name, factory)
        names.append(name)

    yield add
    for name in names:
        sd.backends._registry.pop(name, None)


def test_a_third_party_backend_runs_the_same_user_code(register):
    register("toy", ToyProgram)
    assert "toy" in sd.available_backends()
    schedule = sd.lower(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, dtype="float32")
    chunks = layer_chunks(schedule, batch=1, steps=4, layers=2, seed=11)
    outs = user_code("toy", SMALL, chunks, resume_at=2)
    check_against_float64(schedule, chunks, outs, torch.float32)
    assert outs.keys() == user_code("reference", SMALL, chunks, resume_at=2).keys()


def test_a_backend_that_breaks_the_protocol_fails_at_compile_time(register):
    register("no-cache", NoCacheProgram)
    with pytest.raises(sd.BackendError, match=r"backend 'no-cache' returned a NoCacheProgram.*"
                                              r"missing new_cache"):
        sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, backend="no-cache")
    register("bare", lambda schedule, **options: object())
    with pytest.raises(sd.BackendError, match=r"'bare'.*missing schedule, backend, explain, "
                                              r"new_cache, attention"):
        sd.compile(SMALL, num_heads=2, num_kv_heads=1, head_dim=4, backend="bare")
    with pytest.raises(sd.BackendError, match="factory must be callable"):
        sd.register_backend("broken", ToyProgram(None))
    with pytest.raises(sd.BackendError, match="'auto'"):
        sd.register_backend("auto", ToyProgram)
