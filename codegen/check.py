"""Property checks of a compiled program against the float64 reference (`sparsedsl check`).

`check_rollout` runs one random rollout and compares, at every step, the program's visits
with the reference's block mask (up to Top-K near-ties: fp32 representatives vs float64)
and its output, LSE and gradients with float64 attention on the blocks it visited.
`property_check` drives it with hypothesis over small layouts of a user's pattern and
returns the shrunk counterexample if one fails.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from sparsedsl import reference
from sparsedsl.backends import get_backend
from sparsedsl.errors import CheckEnvironmentError
from sparsedsl.testing import chunk_tensors

from .attention.tables import tables_from_reference


def _preflight(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckEnvironmentError("device cuda: no CUDA GPU is visible; use device cpu")
    if backend == "triton" and not torch.cuda.is_available() \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise CheckEnvironmentError("backend triton: no CUDA GPU is visible; use backend torch "
                                    "(or set TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise CheckEnvironmentError(f"backend triton: triton is not installed ({exc})") from exc


TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def program_block_mask(program, blocks, step, B, H):
    s = program.schedule
    n_keys = (step + 1) * s.layout.chunk_blocks
    mask = torch.zeros(B, H, s.layout.chunk_blocks, n_keys, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for qb in range(s.layout.chunk_blocks):
                for kb in blocks[b][h][qb] + s.current_blocks(step, qb):
                    mask[b, h, qb, kb] = True
    return mask


def rep_scores(s, state, q64, b, h, qb, blocks):
    group = s.num_heads // s.num_kv_heads
    bt = s.layout.block_tokens
    qv = reference.block_valid(s, qb)
    q_rep = q64[b, h, qb * bt:qb * bt + qv].mean(0)
    return {kb: float(q_rep @ state.kv[(b, h // group)][kb][0][:reference.block_valid(s, kb)].mean(0))
            for kb in blocks}


def check_near_ties(s, state, q64, want, got, step):
    """Where the Top-K picks differ, the swapped blocks must have (near-)equal scores."""
    diff = (want != got).nonzero().tolist()
    for b, h, qb, _ in {tuple(d[:3]) + (0,) for d in diff}:
        cand = s.topk_candidates(step, qb)
        picked_ref = [kb for kb in cand if want[b, h, qb, kb]]
        picked_got = [kb for kb in cand if got[b, h, qb, kb]]
        assert len(picked_ref) == len(picked_got), "different number of Top-K picks"
        scores = rep_scores(s, state, q64, b, h, qb, cand)
        kth_ref = min(scores[kb] for kb in picked_ref)
        assert min(scores[kb] for kb in picked_got) >= kth_ref - 1e-4 * (1 + abs(kth_ref))
        # and nothing outside the candidates differs
        non_cand = [kb for kb in range(want.shape[-1]) if kb not in set(cand)]
        assert torch.equal(want[b, h, qb, non_cand], got[b, h, qb, non_cand])


def _program(schedule, backend: str, device):
    """The compiled program of `schedule`, made through the backend registry (codegen/__init__.py
    registers "triton" and "torch" -> PBSAProgram). Not imported from program.py: that module
    imports this one (`PBSAProgram.property_check`). "auto" is what a PBSAProgram of backend
    "auto" runs on `device`: Triton for CUDA tensors, torch otherwise."""
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend = {backend!r}: expected 'auto', 'triton' or 'torch'")
    return get_backend(backend)(schedule)


def check_rollout(schedule, backend, dtype, seed, steps, batch, device, check_grads=True):
    program = _program(schedule, backend, device)
    chunks = [tuple(x.to(dtype).double() for x in c)
              for c in chunk_tensors(schedule, batch, seed, steps)]
    state = reference.new_state(schedule, batch)
    for step, (q64, k64, v64) in enumerate(chunks):
        tables = tables_from_reference(program, state, dtype, device, seed=seed + step)
        q, k, v = (x.to(device=device, dtype=dtype).requires_grad_(check_grads)
                   for x in (q64, k64, v64))
        out, lse, (vs, vc) = program.attention(q, k, v, tables, return_visits=True)
        B, H = q.shape[:2]
        got_mask = program_block_mask(program, program.visited_blocks(vs, vc, tables), step, B, H)
        want_mask = reference.allowed_blocks(schedule, state, q64)
        check_near_ties(schedule, state, q64, want_mask, got_mask, step)
        q_r, k_r, v_r = (x.clone().requires_grad_(check_grads) for x in (q64, k64, v64))
        want, want_lse = reference.masked_attention(schedule, state, q_r, k_r, v_r, got_mask)
        tol = TOL[dtype]
        lay = schedule.layout
        valid = lay.valid_token_mask(lay.chunk_frames)
        err = (out.double().cpu() - want).norm() / (want.norm() + 1e-6 * want.numel() ** 0.5)
        assert err < tol, f"step {step}: relative output error {err:.2e} > {tol}"
        assert torch.allclose(lse.double().cpu()[:, :, valid], want_lse[:, :, valid], atol=tol * 10)
        assert bool((out.cpu()[:, :, ~valid] == 0).all()), "padded query rows must be zero"
        if check_grads:
            w = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            (out.double().cpu() * w).sum().backward()
            (want * w).sum().backward()
            for name, a, r in (("dq", q.grad, q_r.grad), ("dk", k.grad, k_r.grad), ("dv", v.grad, v_r.grad)):
                # relative error, with an absolute floor: a gradient that is exactly zero in
                # float64 (a row attending one key) is ~1e-8 in fp32
                gerr = (a.double().cpu() - r).norm() / (r.norm() + 1e-4 * r.numel() ** 0.5)
                assert gerr < 5 * tol, f"step {step}: {name} relative error {gerr:.2e}"
        state = reference.commit(schedule, state, q64, k64, v64)




def small_variant(pattern, layout):
    """The same segments and rules on a small layout (for float64 checking)."""
    return dataclasses.replace(pattern, layout=layout)


def property_check(pattern, examples: int = 20, device: str = "cpu", backend: str = "auto",
                   dtypes=("float32",), shrink: bool = True, num_heads: int | None = None,
                   head_dim: int | None = None) -> str | None:
    """Hypothesis over small layouts, heads, seeds and dtypes; None if all pass, else the
    shrunk counterexample and its error as text. `num_heads` / `head_dim` fix those (else
    drawn small); an environment that cannot run the check raises CheckEnvironmentError."""
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from sparsedsl import PatternError, lower
    from sparsedsl.layout import VideoLayout

    _preflight(backend, device)
    failure = {}
    chunk = pattern.layout.chunk_frames

    @st.composite
    def cases(draw):
        h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        layout = VideoLayout(h, w, (draw(st.integers(1, min(h, 4))), draw(st.integers(1, min(w, 4)))),
                             min(chunk, 2))
        try:
            small = small_variant(pattern, layout)
        except PatternError:
            small = small_variant(pattern, VideoLayout(h, w, layout.tile, chunk))
        if num_heads is None:
            kv = draw(st.integers(1, 2))
            heads = kv * draw(st.integers(1, 2))
        else:
            heads = num_heads
            kv = draw(st.sampled_from([d for d in range(1, num_heads + 1) if num_heads % d == 0]))
        dim = draw(st.sampled_from([4, 16])) if head_dim is None else head_dim
        schedule = lower(small, num_heads=heads, num_kv_heads=kv, head_dim=dim, dtype="float32")
        return (schedule, draw(st.sampled_from(list(dtypes))), draw(st.integers(0, 2**31 - 1)),
                draw(st.integers(1, 3)))

    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False, phases=phases)
    @given(cases())
    def run(case):
        schedule, dtype, seed, steps = case
        try:
            check_rollout(schedule, backend, getattr(torch, dtype), seed, steps, 1, device)
        except (ImportError, CheckEnvironmentError) as exc:
            failure["environment"] = f"{type(exc).__name__}: {exc}"
            raise
        except Exception as exc:
            failure["case"] = (f"layout {schedule.layout}, heads {schedule.num_heads} "
                               f"(kv {schedule.num_kv_heads}) x {schedule.head_dim}, {dtype}, "
                               f"seed {seed}, {steps} steps: {type(exc).__name__}: {exc}")
            raise

    try:
        run()
    except Exception:
        if "environment" in failure:
            raise CheckEnvironmentError(failure["environment"]) from None
        return failure.get("case", "unknown failure")
    return None
