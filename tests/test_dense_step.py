"""The dense path: `Schedule.dense_at` marks exactly the steps where every query block visits
every earlier block, `Schedule.frames_at` the steps where every query block visits the same
earlier frames whole (both checked against the float64 reference's block mask), and at the
latter `program.attention` (one fused SDPA over those frames) equals the sparse kernels and
the float64 reference, outputs, log-sum-exp and gradients."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import codegen  # noqa: F401  (registers the backends)
import sparsedsl as sd
from codegen.program import PBSAProgram
from sparsedsl import reference
from sparsedsl.explain import explain
from sparsedsl.testing import chunk_tensors, rollouts

LAYOUT = sd.VideoLayout(5, 6, (2, 4), 2)      # partial tiles on both axes (8, 4, 4, 2 tokens)
PRESETS = {
    "sink-window": dict(frames=4),
    "dense-causal": {},
    "moba": dict(k=3),
    "sparse-forcing": dict(capacity=2, window_frames=4),
}


def _schedule(name, dtype="float32", heads=4, kv_heads=2, head_dim=8):
    pattern = sd.presets.get(name, layout=LAYOUT, **PRESETS[name])
    return sd.lower(pattern, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(rollouts(steps=5))
def test_dense_at_is_exactly_every_earlier_block_visited(case):
    schedule = case.schedule
    state = reference.new_state(schedule, case.batch)
    for step, (q, k, v) in enumerate(case.chunks):
        mask = reference.allowed_blocks(schedule, state, q)       # [B, H, NQB, keys]
        earlier = step * schedule.layout.chunk_blocks
        assert schedule.dense_at(step) == bool(mask[..., :earlier].all()), step
        state = reference.commit(schedule, state, q, k, v)
    assert schedule.dense_at(0)                                  # nothing earlier: always


def _check_frames_at(schedule, chunks, batch):
    """Where `frames_at` names frames, every (batch, head, query block) visits exactly the
    blocks of those frames among the earlier ones. Where it does not, and the visits cannot
    depend on runtime state (no Top-K, no persistent set), they are not such a set.
    Returns the number of steps named after frames had left the window."""
    nb = schedule.blocks_per_frame
    state = reference.new_state(schedule, batch)
    after_eviction = 0
    for step, (q, k, v) in enumerate(chunks):
        mask = reference.allowed_blocks(schedule, state, q)       # [B, H, NQB, keys]
        earlier = mask[..., :step * schedule.layout.chunk_blocks]
        frames = schedule.frames_at(step)
        if frames is not None:
            want = torch.zeros(earlier.shape[-1], dtype=torch.bool)
            for f in frames:
                want[f * nb:(f + 1) * nb] = True
            assert bool((earlier == want).all()), (step, frames)
            assert schedule.dense_at(step) == (frames == tuple(range(step * schedule.chunk_frames)))
            after_eviction += schedule.frames_left_window(step) > 0
        elif not schedule.window.has_topk and not schedule.capacity:
            per_frame = earlier.reshape(*earlier.shape[:-1], -1, nb)
            whole = per_frame.all(-1) | ~per_frame.any(-1)
            uniform = (earlier == earlier.reshape(-1, earlier.shape[-1])[0]).all()
            assert not (bool(whole.all()) and bool(uniform)), step
        state = reference.commit(schedule, state, q, k, v)
    assert schedule.frames_at(0) == ()
    return after_eviction


@settings(max_examples=40, deadline=None)
@given(rollouts(steps=5))
def test_frames_at_names_exactly_the_frames_every_query_block_visits_whole(case):
    _check_frames_at(case.schedule, case.chunks, case.batch)


@pytest.mark.parametrize("name, options", [("sink-window", dict(frames=4)),
                                           ("sliding-window", dict(frames=2)),
                                           ("sparse-forcing", dict(capacity=8, window_frames=2))])
def test_frames_at_after_frames_leave_the_window(name, options):
    """Steps after frames have left the window: a sink + window pattern (past `dense_at`:
    the sink and the window, not the frames between), and a persistent set that still holds
    every block that left (capacity 8: one frame of 6 blocks)."""
    if name == "sparse-forcing":   # a whole window: the Top-K takes every candidate
        pattern = sd.Pattern(LAYOUT, sink=sd.Sink(1), persistent=sd.Persistent(8),
                             window=sd.LocalWindow(2, sd.All()), current=sd.Dense(),
                             update=sd.Update(sd.stat.importance))
    else:
        pattern = sd.presets.get(name, layout=LAYOUT, **options)
    schedule = sd.lower(pattern, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32")
    chunks = chunk_tensors(schedule, 2, seed=1, steps=6)
    assert _check_frames_at(schedule, chunks, 2) >= (1 if schedule.capacity else 3)


def _rollout(program, chunks, dense_path: bool):
    """Outputs, LSEs and input gradients of every step (inputs as leaves)."""
    program.dense_path = dense_path
    first = chunks[0][0]
    cache = program.new_cache(batch=first.shape[0], num_layers=1, dtype=first.dtype,
                              device=first.device)
    results = []
    for q, k, v in chunks:
        q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
        out, lse = program.attention(q, k, v, cache.tables(0))
        weight = torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64, device=out.device)
        (out.double() * weight).sum().backward()
        results.append((program.path_at(cache.step, q.device), out.detach(), lse,
                        q.grad, k.grad, v.grad))
        cache.commit(0, q.detach(), k.detach(), v.detach())
    return results


@torch.no_grad()
def _outputs_without_grad(program, chunks):
    """Outputs and LSEs of every step without autograd (the one-buffer key gather's case)."""
    program.dense_path = True
    cache = program.new_cache(batch=chunks[0][0].shape[0], num_layers=1,
                              dtype=chunks[0][0].dtype, device=chunks[0][0].device)
    results = []
    for q, k, v in chunks:
        results.append(program.attention(q, k, v, cache.tables(0)))
        cache.commit(0, q, k, v)
    return results


@pytest.mark.parametrize("keys, head_dim", [("one-buffer", 16), ("one-buffer", 8), ("cat", 16)],
                         ids=["one-buffer", "one-buffer-padded-head-dim", "cat"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dense_path_equals_the_sparse_kernels_and_the_reference(name, keys, head_dim, monkeypatch):
    """Both key layouts of the dense path (head dim 8: the kernels pad it to 16, and the
    one-buffer gather falls back to the concatenation)."""
    from codegen.attention import dense_step
    monkeypatch.setattr(dense_step, "DENSE_PATH_KEYS", keys)
    schedule = _schedule(name, head_dim=head_dim)
    program = PBSAProgram(schedule, backend="torch")
    assert (program.kernel_head_dim == head_dim) == (head_dim == 16)
    steps = 5
    chunks = [tuple(x.float() for x in c) for c in chunk_tensors(schedule, 2, seed=3, steps=steps)]
    dense = _rollout(program, chunks, dense_path=True)
    no_grad = _outputs_without_grad(program, chunks)
    sparse = _rollout(program, chunks, dense_path=False)
    paths = [r[0] for r in dense]
    assert paths == ["dense" if schedule.frames_at(t) is not None else "sparse"
                     for t in range(steps)]
    assert paths[0] == "dense" and all(r[0] == "sparse" for r in sparse)
    valid = LAYOUT.valid_token_mask(LAYOUT.chunk_frames)
    state = reference.new_state(schedule, 2)
    for t, (d, s) in enumerate(zip(dense, sparse)):
        q, k, v = (x.double() for x in chunks[t])
        want, want_lse, _ = reference.attention(schedule, state, q, k, v)
        state = reference.commit(schedule, state, q, k, v)
        for out, lse in (d[1:3], no_grad[t]):
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[:, :, valid].double(), want_lse[:, :, valid],
                                       rtol=1e-5, atol=1e-5)
            assert bool((out[:, :, ~valid] == 0).all()) and bool((lse[:, :, ~valid] == -torch.inf).all())
        assert d[2].dtype == s[2].dtype == torch.float32
        for got, ref in zip(d[3:], s[3:]):       # dq, dk, dv: the two paths agree
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_the_dense_steps_of_the_presets_at_self_forcing_geometry():
    """Step 0 is dense for every pattern; a sink + window pattern stays dense until a frame
    leaves its window; dense-causal at every step; Top-K patterns only at step 0 here."""
    lay = sd.VideoLayout(30, 52, (8, 8), 3)
    steps = {}
    for name in ("sparse-forcing", "sink-window", "moba", "sliding-tile", "dense-causal"):
        schedule = sd.lower(sd.presets.get(name, layout=lay), num_heads=12, head_dim=128,
                            dtype="bfloat16")
        steps[name] = schedule.dense_steps(80)
    assert steps["sparse-forcing"] == steps["moba"] == steps["sliding-tile"] == [0]
    assert steps["dense-causal"] == list(range(80))
    sink_window = sd.presets.get("sink-window", layout=lay)
    last = steps["sink-window"][-1]
    assert steps["sink-window"] == list(range(last + 1))
    s = sd.lower(sink_window, num_heads=12, head_dim=128, dtype="bfloat16")
    assert s.evicted_frames(last) != (0, 0) and s.window_frames_range(last)[0] == s.sink_frames
    # after that, sink-window still visits whole frames (the sink and the window): dense path
    assert s.whole_frame_steps(80) == list(range(80))
    assert s.frames_at(79) == (0,) + tuple(range(237 - 6, 237))


def test_explain_names_the_dense_steps():
    text = explain(_schedule("sink-window"))
    assert "dense path" in text and "0-" in text.split("dense path")[1].splitlines()[0]


@settings(max_examples=30, deadline=None)
@given(rollouts(steps=5))
def test_program_with_dense_path_equals_reference_on_random_patterns(case):
    """Random patterns (persistent sets that hold every evicted block included): at every
    dense step the program's attention is the float64 reference's. (Sparse steps are checked
    elsewhere: with the rollouts' quantised inputs a Top-K tie may pick another block.)"""
    schedule = case.schedule
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(batch=case.batch, num_layers=1, dtype=torch.float32)
    state = reference.new_state(schedule, case.batch)
    valid = schedule.layout.valid_token_mask(schedule.layout.chunk_frames)
    for step, chunk in enumerate(case.chunks):
        q, k, v = (x.float() for x in chunk)
        out, lse = program.attention(q, k, v, cache.tables(0))
        dense = schedule.frames_at(step) is not None
        assert program.path_at(step) == ("dense" if dense else "sparse")
        if dense:
            want, want_lse, _ = reference.attention(schedule, state, *(x.double() for x in (q, k, v)))
            torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lse[:, :, valid].double(), want_lse[:, :, valid],
                                       rtol=1e-4, atol=1e-4)
        cache.commit(0, q, k, v)
        state = reference.commit(schedule, state, *(x.double() for x in (q, k, v)))


def test_dense_steps_whose_persistent_set_holds_every_evicted_block():
    """A one-frame window whose persistent set is large enough to keep every block that
    leaves it: every step is dense, and the keys gathered from the persistent set (in the
    update's order, sorted back by block on the device) give the reference's attention."""
    layout = sd.VideoLayout(3, 4, (2, 2), 1)
    pattern = sd.Pattern(layout, persistent=sd.Persistent(16, shared_heads=False),
                         window=sd.LocalWindow(1, sd.All()), current=sd.Dense(),
                         update=sd.Update(sd.stat.importance))
    schedule = sd.lower(pattern, num_heads=2, num_kv_heads=2, head_dim=8, dtype="float32")
    # 4 blocks a frame, capacity 16: after step 5, 5 evicted frames no longer fit
    assert schedule.dense_steps(8) == list(range(6))
    program = PBSAProgram(schedule, backend="torch")
    cache = program.new_cache(batch=1, num_layers=1, dtype=torch.float32)
    state = reference.new_state(schedule, 1)
    for step, chunk in enumerate(chunk_tensors(schedule, 1, seed=5, steps=7)):
        q, k, v = (x.float() for x in chunk)
        assert program.path_at(step) == ("dense" if step < 6 else "sparse")
        out, lse = program.attention(q, k, v, cache.tables(0))
        want, _, _ = reference.attention(schedule, state, *chunk)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
        cache.commit(0, q, k, v)
        state = reference.commit(schedule, state, *chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, sdpa, keys", [(torch.bfloat16, "flash", "one-buffer"),
                                               (torch.bfloat16, "cudnn", "one-buffer"),
                                               (torch.bfloat16, "cudnn", "cat"),
                                               (torch.float32, "flash", "one-buffer")])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dense_path_on_cuda_equals_the_reference_and_the_kernels(name, dtype, sdpa, keys,
                                                                  monkeypatch):
    """The GPU check that DENSE_PATH_CHECKED_ON_CUDA (and DENSE_PATH_SDPA_CUDA = "cudnn")
    wait for: the dense path forced on (flash or cuDNN SDPA in bf16, memory-efficient SDPA in
    fp32) against the float64 reference and the generated Triton kernels, outputs, LSE and
    gradients, along a rollout."""
    from codegen.attention import dense_step
    from codegen.check import TOL
    monkeypatch.setattr(dense_step, "DENSE_PATH_SDPA_CUDA", sdpa)
    monkeypatch.setattr(dense_step, "DENSE_PATH_KEYS", keys)
    schedule = _schedule(name, dtype=str(dtype).replace("torch.", ""), head_dim=16)
    program = PBSAProgram(schedule, backend="triton")
    chunks = [tuple(x.to("cuda", dtype) for x in c)
              for c in chunk_tensors(schedule, 2, seed=4, steps=5)]
    dense, sparse = (_rollout(program, chunks, dense_path=d) for d in (True, False))
    no_grad = _outputs_without_grad(program, chunks)
    valid = LAYOUT.valid_token_mask(LAYOUT.chunk_frames).cuda()
    tol = TOL[dtype]
    state = reference.new_state(schedule, 2)
    for t, (d, s) in enumerate(zip(dense, sparse)):
        q, k, v = (x.double().cpu() for x in chunks[t])
        want, want_lse, _ = reference.attention(schedule, state, q, k, v)
        state = reference.commit(schedule, state, q, k, v)
        for out in (d[1], no_grad[t][0]):
            err = (out.double().cpu() - want).norm() / want.norm()
            assert err < tol, f"step {t} ({d[0]}): relative error {err:.2e}"
        torch.testing.assert_close(d[2][:, :, valid].double().cpu(), want_lse[:, :, valid.cpu()],
                                   rtol=10 * tol, atol=10 * tol)
        for got, ref in zip(d[3:], s[3:]):
            assert (got - ref).double().norm() <= 10 * tol * ref.double().norm() + 1e-6


@pytest.mark.parametrize("tile, cuda_at_0, cuda_at_5", [((8, 8), "sparse", "dense"),
                                                         ((8, 16), "dense", "dense"),
                                                         ((4, 4), "sparse", "sparse")])
def test_on_cuda_the_dense_path_is_taken_only_where_it_measured_faster(tile, cuda_at_0, cuda_at_5):
    """At a frames_at step the CPU always runs the dense path; on CUDA with blocks of at least
    DENSE_PATH_MIN_BLOCK_TOKENS_CUDA tokens (128: the generic kernel, slower there than SDPA)
    at every such step, with 64-token blocks (the Gluon kernel) only once the step visits at
    least DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA earlier frames, never with smaller blocks."""
    from codegen import program as program_module
    layout = sd.VideoLayout(16, 16, tile, 3)
    schedule = sd.lower(sd.presets.get("sink-window", layout=layout, frames=6), num_heads=2,
                        head_dim=16, dtype="bfloat16")
    program = PBSAProgram(schedule, backend="triton")
    assert schedule.dense_at(0) and not schedule.dense_at(5)
    assert len(schedule.frames_at(0)) == 0 and len(schedule.frames_at(5)) == 7   # sink + window
    assert program.path_at(0, "cpu") == "dense"
    assert program.path_at(0, "cuda") == cuda_at_0
    assert program.path_at(5, "cuda") == cuda_at_5     # sink + window: whole frames at every step
    # step 1 visits 3 earlier frames: below the 64-token threshold
    assert program.path_at(1, "cuda") == ("dense" if tile == (8, 16) else "sparse")
    assert program_module.DENSE_PATH_64_MIN_EARLIER_FRAMES_CUDA == 6
    program.dense_path = True                 # forced on: taken wherever frames_at names frames
    assert program.path_at(0, "cuda") == "dense"
