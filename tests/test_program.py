"""A compiled program (select + attention over pool tables) against the float64 reference."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sparsedsl as sd
from sparsedsl.testing import layouts, patterns, schedules

from codegen.check import check_rollout as run_rollout, property_check
from codegen.program import PBSAProgram

CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@settings(max_examples=15)
@given(schedules(max_heads=2, head_dim=4), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_torch_backend_matches_reference(schedule, seed, steps):
    run_rollout(schedule, "torch", torch.float32, seed, steps, batch=1, device="cpu")


@settings(max_examples=8)
@given(schedules(max_heads=2, head_dim=4), st.integers(0, 2**31 - 1))
def test_torch_backend_bf16(schedule, seed):
    run_rollout(schedule, "torch", torch.bfloat16, seed, 2, batch=2, device="cpu")


@pytest.mark.slow
@pytest.mark.skipif(CUDA or not INTERPRETER, reason="interpreter test: set TRITON_INTERPRET=1")
@settings(max_examples=3)
# layouts capped at 4x4 tokens: larger draws (up to ~300 blocks a chunk) made this test take
# 11 s to 900 s on the same commit under the interpreter
@given(schedules(pattern=layouts(max_side=4, max_chunk_frames=2).flatmap(
           lambda lay: patterns(layout=lay)), max_heads=2, head_dim=4),
       st.integers(0, 2**31 - 1))
def test_triton_interpreter_matches_reference(schedule, seed):
    run_rollout(schedule, "triton", torch.float32, seed, 2, batch=1, device="cpu")


@pytest.mark.gpu
@settings(max_examples=10)
@given(schedules(max_heads=2, head_dim=4), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_triton_gpu_matches_reference(schedule, seed, dtype):
    run_rollout(schedule, "triton", dtype, seed, 3, batch=2, device="cuda")


def test_program_is_registered_as_backends():
    assert {"triton", "torch", "reference"} <= set(sd.available_backends())
    program = sd.compile(sd.presets.get("sparse-forcing"), backend="torch")
    assert isinstance(program, PBSAProgram)
    assert "def pbsa_fwd_kernel" in program.source


def test_property_check_finds_a_broken_backend(monkeypatch):
    """The user-facing checker must fail, with a counterexample, when the kernel is wrong."""
    from codegen.attention import torch_backend
    real = torch_backend.attention

    def broken(spec, q, *args, **kwargs):
        o, lse = real(spec, q, *args, **kwargs)
        return o * 1.01, lse

    monkeypatch.setattr(torch_backend, "attention", broken)
    report = property_check(sd.presets.get("sink-window"), examples=5, backend="torch",
                            shrink=False)
    assert report is not None and "relative output error" in report


def test_property_check_passes_for_a_preset():
    assert property_check(sd.presets.get("sparse-forcing"), examples=4, backend="torch") is None


def test_to_block_mask_exports_exactly_the_visited_blocks():
    """The exported FlexAttention BlockMask holds exactly the reference's block mask.

    (FlexAttention's numbers on that mask are compared with PBSA on the GPU, in the benchmark.)
    """
    from sparsedsl import reference
    from sparsedsl.testing import chunk_tensors
    from codegen.attention.tables import tables_from_reference

    layout = sd.VideoLayout(8, 8, (4, 4), 2)  # no padding: 16-token blocks
    pattern = sd.presets.get("sparse-forcing", layout=layout, capacity=3, window_frames=2)
    schedule = sd.lower(pattern, num_heads=2, head_dim=16, dtype="float32")
    program = PBSAProgram(schedule, backend="torch")
    chunks = chunk_tensors(schedule, 1, seed=3, steps=4)
    state = reference.new_state(schedule, 1)
    for step, (q, k, v) in enumerate(chunks):
        tables = tables_from_reference(program, state, torch.float32, "cpu", seed=step)
        mask = program.to_block_mask(q.float(), tables)
        want = reference.allowed_blocks(schedule, state, q)
        assert mask.seq_lengths == (q.shape[2], (step + 1) * q.shape[2])
        assert torch.equal(mask.to_dense().bool(), want)
        state = reference.commit(schedule, state, q, k, v)
