"""The dense path of a program step.

At a step where every query block visits the same earlier frames whole, and nothing else of
them (`Schedule.frames_at`: step 0 of every pattern; every step of `dense-causal` and of a
sink + window pattern; the first steps of a pattern whose persistent set still holds every
block that has left the window), the step's attention *is* dense attention over the real
tokens of those frames, with the current rule inside the chunk. SDPA's fused kernels (flash
on CUDA, the fused CPU kernel) then compute it without the sparse machinery: no visit
tables, no Top-K, no block kernel on padded tiles. Same visits, same result
(tests/test_dense_step.py checks it against the sparse path and the float64 reference,
outputs, log-sum-exp and gradients).

Keys come from the cache's pool in block order (the sink's, the persistent set's and the
window's slots) followed by the chunk's own; the padding of partial tiles and the kernel's
block padding are dropped by a static token index, so no mask is needed and SDPA stays on
its fastest path. Attention does not depend on key order; the token index only needs each
frame's blocks in order.
"""
from __future__ import annotations

import torch

from .tables import BlockTables


def _frame_token_map(program, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of every real token of one frame, long [tokens_per_frame] each: block
    j of a frame keeps its first `frame_valid_tokens[j]` of the kernel's
    `kernel_block_tokens` slots."""
    key = ("dense_frame_tokens", str(device))
    consts = program._device_constants
    if key not in consts:
        valid = program.schedule.layout.frame_valid_tokens
        block = [j for j, n in enumerate(valid) for _ in range(n)]
        offset = [i for n in valid for i in range(n)]
        consts[key] = (torch.tensor(block, dtype=torch.long, device=device),
                       torch.tensor(offset, dtype=torch.long, device=device))
    return consts[key]


def _padding_rows(program, real: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows of a chunk's [.., rows, d] query layout that `real` leaves out, long."""
    key = ("dense_padding_rows", str(real.device), rows)
    consts = program._device_constants
    if key not in consts:
        keep = torch.zeros(rows, dtype=torch.bool, device=real.device)
        keep[real] = True
        consts[key] = (~keep).nonzero()[:, 0]
    return consts[key]


def earlier_slots(program, tables: BlockTables, step: int) -> torch.Tensor:
    """Pool slots of the blocks of `Schedule.frames_at(step)` in block order,
    [B, Hkv, frames * blocks_per_frame] long: the sink's, the persistent set's (at such a
    step it holds every block that has left the window, or the pattern has none) and the
    window's; only the persistent set's come in no particular order, so they are sorted by
    the block each slot holds (on the device: no sync)."""
    s = program.schedule
    nb = s.blocks_per_frame
    sink_frames = min(s.sink_frames, step * s.chunk_frames)
    held = s.frames_left_window(step) * nb if s.capacity else 0
    slots = torch.cat([tables.sink_slots[:, :, :sink_frames * nb],
                       tables.persistent_slots[:, :, :held],
                       tables.window_slots[:, :, :s.window_block_count(step)]], dim=2).long()
    if held:
        order = tables.slot_block.long().gather(2, slots).argsort(dim=2)
        slots = slots.gather(2, order)
    return slots


def _pool_rows(program, pool: torch.Tensor, slots: torch.Tensor, frames: int) -> torch.Tensor:
    """Row indices into `pool` viewed as [B * Hkv * NSLOTS * BT, D] of the real tokens of the
    first `frames` frames through their `slots` in block order: long [B, Hkv, frames *
    tokens_per_frame]."""
    nb = program.schedule.blocks_per_frame
    B, Hkv, NSLOTS, BT, D = pool.shape
    block, offset = _frame_token_map(program, pool.device)
    frame = torch.arange(frames, device=pool.device)[:, None]
    which = (frame * nb + block[None, :]).reshape(-1)                  # [L] index into slots
    tokens = slots.gather(2, which.expand(B, Hkv, -1)) * BT + offset.repeat(frames)
    base = torch.arange(B * Hkv, device=pool.device).view(B, Hkv, 1) * (NSLOTS * BT)
    return base + tokens


def earlier_keys(program, pool: torch.Tensor, slots: torch.Tensor, frames: int) -> torch.Tensor:
    """The real tokens of the first `frames` frames from `pool` [B, Hkv, NSLOTS, BT, D]
    through their `slots` in block order: [B, Hkv, frames * tokens_per_frame, d] (the
    kernel's padding removed). One row gather of exactly those tokens: gathering whole
    blocks first and dropping the padding after cost two more passes over the keys (the
    dense path ran at 0.6x of SDPA on the same frames, H100)."""
    B, Hkv, _, _, D = pool.shape
    rows = pool.reshape(-1, D).index_select(0, _pool_rows(program, pool, slots, frames).reshape(-1))
    return rows.view(B, Hkv, -1, D)[..., :program.schedule.head_dim]


def step_keys(program, pool: torch.Tensor, slots: torch.Tensor, frames: int,
              chunk: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The earlier frames' real tokens (as `earlier_keys`) followed by the chunk's real tokens
    `chunk[:, :, real]`, [B, Hkv, frames * tokens_per_frame + len(real), d], gathered by two
    `index_select`s straight into one buffer. The buffer is token-major in memory ([L, B,
    Hkv, d], returned as a permuted view), so each part is a contiguous slice of it: no
    `torch.cat` pass over the keys afterwards. A prefix over the key axis (the chunk's
    frames <= f under the causal rule) is again a view. Without gradient only (inference, and
    every denoising step of a rollout but the one that trains)."""
    B, Hkv, _, _, D = pool.shape
    # the kernels pad the head dim (slice), and out= has no autograd (training: the chunk's
    # keys carry gradient): the concatenation
    if (D != program.schedule.head_dim or chunk.dtype != pool.dtype
            or (chunk.requires_grad and torch.is_grad_enabled())):
        return concatenated_keys(program, pool, slots, frames, chunk, real)
    past_rows = _pool_rows(program, pool, slots, frames).permute(2, 0, 1).reshape(-1)  # token-major
    Lp = past_rows.numel() // (B * Hkv)
    buf = pool.new_empty(Lp + real.numel(), B, Hkv, D)
    torch.index_select(pool.reshape(-1, D), 0, past_rows, out=buf[:Lp].view(-1, D))
    torch.index_select(chunk.permute(2, 0, 1, 3), 0, real, out=buf[Lp:])
    return buf.permute(1, 2, 0, 3)


def concatenated_keys(program, pool, slots, frames, chunk, real) -> torch.Tensor:
    """What `step_keys` returns, as `earlier_keys` and a torch.cat with the chunk's keys."""
    past = earlier_keys(program, pool, slots, frames).to(chunk.dtype)
    return torch.cat([past, chunk.index_select(2, real)], 2)


# How the dense path lays out its keys: "one-buffer" (`step_keys`: the earlier frames' and the
# chunk's real tokens gathered into one token-major buffer) or "cat" (`earlier_keys`, then a
# torch.cat with the chunk's keys: one more pass over the keys). bench/rollout.py --dense-keys
# times both. On an H100 (2026-12-07) `pytest -m gpu tests/test_dense_step.py` passed with
# both against the float64 reference (16 passed), and sink-window's steady-state dense step
# took 1.20 ms with one-buffer against 1.27 ms with cat (faster at every timed step).
DENSE_PATH_KEYS = "one-buffer"
_KEY_LAYOUTS = ("one-buffer", "cat")


# The fused SDPA kernel of the dense path on CUDA for bf16/fp16: "cudnn" (cuDNN's fused
# attention) or "flash" (FlashAttention-2). On an H100 (2026-12-07, bench/rollout.py
# --dense-path on, sink-window at 30x52 tokens, H=12, D=128) the steady-state dense step took
# 1.46 ms with cuDNN against 2.08 ms with flash; `pytest -m gpu tests/test_dense_step.py`
# passed with both.
DENSE_PATH_SDPA_CUDA = "cudnn"
_CUDA_KERNELS = ("flash", "cudnn")


def _cudnn_attention(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:-1])       # [B, H, Lq] (cuDNN may add a unit dim)


def attention_with_lse(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q k^T * scale) v, log-sum-exp [B, H, Lq] float32) with one fused SDPA call
    (differentiable in q, k, v). k/v may have fewer heads (grouped-query: head h reads KV
    head h // group)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q.is_cuda:
        if DENSE_PATH_SDPA_CUDA not in _CUDA_KERNELS:
            raise ValueError(f"codegen.attention.dense_step.DENSE_PATH_SDPA_CUDA = "
                             f"{DENSE_PATH_SDPA_CUDA!r}, allowed: "
                             f"{', '.join(map(repr, _CUDA_KERNELS))}")
        half = q.dtype in (torch.float16, torch.bfloat16)
        if half and DENSE_PATH_SDPA_CUDA == "cudnn" and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128:
            out, lse = _cudnn_attention(q, k, v, scale)
        elif half and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False, scale=scale)[:2]
        else:   # float32 (or an odd head dim): the memory-efficient kernel returns the LSE too
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, False, scale=scale)[:2]
            lse = lse[..., :q.shape[2]]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale)[:2]
    return out, lse.float()


def dense_step_attention(program, q, k, v, tables: BlockTables):
    """`program.attention` at a step where `Schedule.frames_at` names the visited frames:
    (out [B, H, NQB*bt, d] in q's dtype with zero padded rows, lse [B, H, NQB*bt] float32
    with -inf on padded rows)."""
    s, lay = program.schedule, program.schedule.layout
    step = tables.step
    frames = len(s.frames_at(step))
    real = program.chunk_real_index(q.device)                   # [c * tokens_per_frame]
    padded = real.numel() < q.shape[2]
    qr = q.index_select(2, real) if padded else q
    slots = earlier_slots(program, tables, step)
    if DENSE_PATH_KEYS not in _KEY_LAYOUTS:
        raise ValueError(f"codegen.attention.dense_step.DENSE_PATH_KEYS = {DENSE_PATH_KEYS!r}, "
                         f"allowed: {', '.join(map(repr, _KEY_LAYOUTS))}")
    gather = step_keys if DENSE_PATH_KEYS == "one-buffer" else concatenated_keys
    keys = gather(program, tables.k_pool, slots, frames, k, real)
    values = gather(program, tables.v_pool, slots, frames, v, real)
    if s.current == "dense":
        out, lse = attention_with_lse(qr, keys, values, program.scale)
    else:   # causal by frame: frame f of the chunk sees the chunk's frames <= f
        n, past = lay.tokens_per_frame, frames * lay.tokens_per_frame
        parts = [attention_with_lse(qr[:, :, f * n:(f + 1) * n], keys[:, :, :past + (f + 1) * n],
                                    values[:, :, :past + (f + 1) * n], program.scale)
                 for f in range(lay.chunk_frames)]
        out, lse = torch.cat([o for o, _ in parts], 2), torch.cat([m for _, m in parts], 2)
    if not padded:
        return out.to(q.dtype), lse
    # only the padded rows are filled: the real ones are written once by index_copy_
    pad = _padding_rows(program, real, q.shape[2])
    full = q.new_empty(q.shape).index_copy_(2, real, out.to(q.dtype)).index_fill_(2, pad, 0)
    full_lse = lse.new_empty(q.shape[:-1]).index_copy_(2, real, lse).index_fill_(2, pad, float("-inf"))
    return full, full_lse
