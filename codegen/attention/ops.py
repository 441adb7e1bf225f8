"""The attention as a PyTorch custom op, so a model using it compiles under torch.compile.

`torch.ops.sparsedsl.pbsa_attention` has a fake (meta) implementation for tracing and a
registered autograd formula whose backward is itself a custom op; on CUDA both run the
generated kernels, elsewhere the PyTorch backend. The kernel spec crosses the op boundary
as a JSON string (custom ops take tensors and plain scalars only).
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from . import torch_backend
from .kernel_spec import AttentionKernelSpec


def spec_to_json(spec: AttentionKernelSpec) -> str:
    return json.dumps(spec.as_dict(), sort_keys=True)


@lru_cache(maxsize=None)
def spec_from_json(text: str) -> AttentionKernelSpec:
    return AttentionKernelSpec(**json.loads(text))


def _use_kernels(q: Tensor) -> bool:
    from .launch import interpreter_active
    return q.is_cuda or interpreter_active()


@torch.library.custom_op("sparsedsl::pbsa_attention", mutates_args=())
def pbsa_attention_op(spec_json: str, q: Tensor, k_cur: Tensor, v_cur: Tensor, cur_valid: Tensor,
                      k_pool: Tensor, v_pool: Tensor, slot_valid: Tensor, visit_slots: Tensor,
                      visit_count: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    spec = spec_from_json(spec_json)
    if _use_kernels(q):
        from .launch import attention_forward
        return attention_forward(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                                 visit_slots, visit_count, scale)
    o, lse = torch_backend.attention(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid,
                                     visit_slots, visit_count, scale)
    return o.contiguous(), lse.contiguous()


@pbsa_attention_op.register_fake
def _(spec_json, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
      scale):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("sparsedsl::pbsa_attention_backward", mutates_args=())
def pbsa_attention_backward_op(spec_json: str, q: Tensor, k_cur: Tensor, v_cur: Tensor,
                               cur_valid: Tensor, k_pool: Tensor, v_pool: Tensor,
                               slot_valid: Tensor, visit_slots: Tensor, visit_count: Tensor,
                               o: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor],
                               scale: float, need_pool: bool
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    spec = spec_from_json(spec_json)
    if _use_kernels(q):
        from .launch import attention_backward
        dq, dkc, dvc, dkp, dvp = attention_backward(
            spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
            visit_count, o, lse, do, dlse, scale, need_kv_cur=True, need_pool=need_pool)
    else:  # the PyTorch backend is differentiable: let torch.func derive the same formula
        def forward(q_, kc_, vc_, kp_, vp_):
            return torch_backend.attention(spec, q_, kc_, vc_, cur_valid, kp_, vp_, slot_valid,
                                           visit_slots, visit_count, scale)
        _, vjp = torch.func.vjp(forward, q, k_cur, v_cur, k_pool, v_pool)
        dq, dkc, dvc, dkp, dvp = vjp((do, torch.zeros_like(lse) if dlse is None else dlse))
    empty_like = lambda t, g: torch.zeros_like(t) if g is None else g.contiguous()
    return (empty_like(q, dq), empty_like(k_cur, dkc), empty_like(v_cur, dvc),
            empty_like(k_pool, dkp if need_pool else None),
            empty_like(v_pool, dvp if need_pool else None))


@pbsa_attention_backward_op.register_fake
def _(spec_json, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
      o, lse, do, dlse, scale, need_pool):
    return (torch.empty_like(q), torch.empty_like(k_cur), torch.empty_like(v_cur),
            torch.empty_like(k_pool), torch.empty_like(v_pool))


def _setup_context(ctx, inputs, output):
    (spec_json, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count,
     scale) = inputs
    o, lse = output
    ctx.save_for_backward(q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                          visit_count, o, lse)
    ctx.spec_json, ctx.scale = spec_json, scale


def _backward(ctx, do, dlse):
    (q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots, visit_count, o,
     lse) = ctx.saved_tensors
    need_pool = bool(ctx.needs_input_grad[5] or ctx.needs_input_grad[6])
    if do is None:
        do = torch.zeros_like(o)
    dq, dkc, dvc, dkp, dvp = pbsa_attention_backward_op(
        ctx.spec_json, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
        visit_count, o, lse, do.contiguous(), dlse, ctx.scale, need_pool)
    return (None, dq, dkc, dvc, None, dkp if need_pool else None, dvp if need_pool else None,
            None, None, None, None)


pbsa_attention_op.register_autograd(_backward, setup_context=_setup_context)


def pbsa_attention_compiled(spec: AttentionKernelSpec, q, k_cur, v_cur, cur_valid, k_pool, v_pool,
                            slot_valid, visit_slots, visit_count, scale: float):
    """`pbsa_attention` through the custom op (torch.compile friendly; inputs unchecked)."""
    return pbsa_attention_op(spec_to_json(spec), q, k_cur, v_cur, cur_valid, k_pool, v_pool,
                             slot_valid, visit_slots, visit_count, float(scale))
