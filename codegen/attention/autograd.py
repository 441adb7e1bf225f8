"""`pbsa_attention`: the public entry point (validation, backend choice, autograd).

    o, lse = pbsa_attention(spec, q, k_cur, v_cur, cur_valid,
                            k_pool, v_pool, slot_valid, visit_slots, visit_count)

Backends: "triton" (generated kernels; on CPU only under TRITON_INTERPRET=1),
"torch" (codegen/attention/torch_backend.py), "auto" (triton on CUDA or under the
interpreter, torch otherwise). Gradients flow to q, k_cur, v_cur and, when they
require grad, k_pool/v_pool (cached, detached pool blocks are skipped entirely).
lse is differentiable too (its gradient folds into the softmax backward).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from . import torch_backend
from .kernel_spec import AttentionKernelSpec, KernelConfig
from .launch import attention_backward, attention_forward, interpreter_active
from .validate import check_scale, check_shapes, check_values

BACKENDS = ("auto", "triton", "torch")


class PBSAAttentionFunction(torch.autograd.Function):
    """autograd wrapper over the generated forward/backward kernels."""

    @staticmethod
    def forward(ctx, spec, config, scale, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                visit_slots, visit_count):
        o, lse = attention_forward(
            spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
            scale, config,
        )
        if any(ctx.needs_input_grad):
            # The backward reads the pools and tables as they were at this call, but a rollout
            # cache's commits rewrite them in place (self-forcing runs the backward after the
            # later chunks are committed): keep a copy, so the gradients are this forward's.
            k_pool, v_pool, slot_valid = k_pool.clone(), v_pool.clone(), slot_valid.clone()
            visit_slots, visit_count = visit_slots.clone(), visit_count.clone()
        ctx.save_for_backward(q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                              visit_count, o, lse)
        ctx.spec, ctx.config, ctx.scale = spec, config, scale
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        (q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count, o,
         lse) = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (spec, config, scale, q, k_cur, v_cur, cur_valid, k_pool, v_pool, ...)
        if do is None and dlse is None:
            return (None,) * 12
        if do is None:
            do = torch.zeros_like(o)
        need_cur = needs[4] or needs[5]
        need_pool = needs[7] or needs[8]
        dq, dkc, dvc, dkp, dvp = attention_backward(
            ctx.spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
            visit_count, o, lse, do, dlse, ctx.scale,
            need_kv_cur=need_cur, need_pool=need_pool, config=ctx.config,
        )
        if needs[7] and dkp is None:  # empty pool: its gradient is empty too
            dkp, dvp = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
        return (
            None, None, None,
            dq if needs[3] else None,
            dkc if needs[4] else None,
            dvc if needs[5] else None,
            None,
            dkp if needs[7] else None,
            dvp if needs[8] else None,
            None, None, None,
        )


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        if q.is_cuda or interpreter_active():
            return "triton" if importlib.util.find_spec("triton") is not None else "torch"
        return "torch"
    if backend == "triton" and not q.is_cuda and not interpreter_active():
        raise ValueError(
            f"backend = 'triton' needs CUDA tensors (q is on {q.device}) or TRITON_INTERPRET=1 "
            "set before triton is imported; use backend='torch' on CPU"
        )
    return backend


def pbsa_attention(
    spec: AttentionKernelSpec,
    q: torch.Tensor,
    k_cur: torch.Tensor,
    v_cur: torch.Tensor,
    cur_valid: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slot_valid: torch.Tensor,
    visit_slots: torch.Tensor,
    visit_count: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
    config: KernelConfig | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of the chunk's query blocks over (a) the current-chunk
    blocks allowed by `spec.current` and (b) the visited pool slots, with one softmax.

    Returns (o [B,H,NQB,BT,D] in q.dtype, lse [B,H,NQB,BT] float32, natural log).
    `validate=False` skips the value checks (one host sync) but never the shape checks.
    """
    _, nslots = check_shapes(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                             visit_slots, visit_count)
    scale = check_scale(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(spec.head_dim)
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    if validate:
        check_values(spec, cur_valid, slot_valid, visit_slots, visit_count, nslots)
    which = _resolve_backend(backend, q)
    if which == "torch":
        return torch_backend.attention(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                                       visit_slots, visit_count, scale)
    return PBSAAttentionFunction.apply(spec, config, scale, q, k_cur, v_cur, cur_valid, k_pool, v_pool,
                                       slot_valid, visit_slots, visit_count)
