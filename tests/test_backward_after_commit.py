"""A backward that runs after the cache has moved on must give the gradients of the forward.

Self-forcing training calls `program.attention` with gradient at one denoising step of a
chunk, commits the chunk (and later chunks) to the cache, and only then runs the backward of
the whole rollout. The commits write the cache's pools and index tables in place, so a
backward that read them at backward time would differentiate against later chunks' blocks.
Every backend must either keep what its backward needs (the contract here) or fail loudly;
the gradients are compared with a backward run right after the forward, on the same inputs."""
from __future__ import annotations

import pytest
import torch

import codegen  # noqa: F401  (registers the backends)
import sparsedsl as sd
from codegen.program import PBSAProgram
from sparsedsl.testing import chunk_tensors

LAYOUT = sd.VideoLayout(5, 6, (2, 4), 2)      # partial tiles on both axes
PRESETS = {   # small windows and memories, so that the commits below evict and reuse slots
    "sink-window": dict(frames=2),
    "sparse-forcing": dict(capacity=2, window_frames=2),
    "moba": dict(k=2),
    "sliding-window": dict(frames=2),
}
GRAD_STEP, STEPS = 2, 5


def _program(name, backend):
    pattern = sd.presets.get(name, layout=LAYOUT, **PRESETS[name])
    heads = (4, 2) if backend == "torch" else (2, 1)   # grouped-query either way; the
    schedule = sd.lower(pattern, num_heads=heads[0], num_kv_heads=heads[1],   # interpreter is slow
                        head_dim=8, dtype="float32")
    program = PBSAProgram(schedule, backend=backend)
    program.dense_path = False   # the block kernels, whose backward reads the pools
    return program


def _grads(program, chunks, backward_late: bool):
    """Input gradients of the GRAD_STEP call; its backward right away or after the rest."""
    device = chunks[0][0].device
    cache = program.new_cache(batch=1, num_layers=1, dtype=torch.float32, device=device)
    loss = None
    for step, (q, k, v) in enumerate(chunks):
        if step == GRAD_STEP:
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out, lse = program.attention(*leaves, cache.tables(0))
            weight = torch.linspace(-1, 1, out.shape[-1], device=device)
            loss = (out * weight).sum() + lse[torch.isfinite(lse)].sum()
            if not backward_late:
                loss.backward()
        cache.commit(0, q, k, v)
    if backward_late:
        loss.backward()
    return [x.grad for x in leaves]


# the generated kernels run in Triton's interpreter on a CPU (slow): the two presets whose
# commits evict window blocks into reused slots, with and without a memory update rule
CASES = ([(name, "torch") for name in sorted(PRESETS)] +
         [pytest.param("sink-window", "triton", marks=pytest.mark.slow),
          pytest.param("sparse-forcing", "triton", marks=pytest.mark.slow)])


@pytest.mark.parametrize("name,backend", CASES)
def test_backward_after_later_commits_equals_backward_right_away(name, backend):
    program = _program(name, backend)
    # the generated kernels on a GPU where there is one, else in Triton's interpreter
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    chunks = [tuple(x.to(device, torch.float32) for x in c)
              for c in chunk_tensors(program.schedule, 1, seed=3, steps=STEPS)]
    now = _grads(program, chunks, backward_late=False)
    late = _grads(program, chunks, backward_late=True)
    for which, a, b in zip("qkv", now, late):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"d{which} ({name}, {backend})")
