"""Export one step's visits as a FlexAttention BlockMask (`PBSAProgram.to_block_mask`).

Everything is built on q's device with tensor ops (no loop over batch, head or query block):

1. the dense block-visit matrix `visit [B, H, NQB, n_keys]` (bool) over the global key blocks
   `[0, (step+1) * chunk_blocks)`: the pool slots of the visit table mapped to their global
   blocks through `tables.slot_block`, plus the chunk's own blocks by the current rule (dense, or
   causal by frame);
2. `kv_num_blocks` / `kv_indices` from it, visited blocks first in ascending order. A visited
   pair whose query block and key block are both whole tiles (no padding) goes in the *full*
   lists (Flex's compiled kernel skips `mask_mod` there); the other visited pairs in the partial
   lists;
3. a token-level `mask_mod` that looks the block pair up in `visit` and masks padding: a token is
   real iff its offset in its block is below the tile's real-token count (the layout puts a
   partial tile's real tokens first). Eager `flex_attention` evaluates only `mask_mod` (it
   ignores the block lists), the compiled kernel evaluates it on the partial blocks only, so
   both compute exactly the program's attention.
"""
from __future__ import annotations

import torch


def frame_constants(program, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(real [blocks_per_frame * block_tokens] bool: True on the real tokens of one tile-major
    frame; whole [blocks_per_frame] bool: True on the tiles without padding), cached on the
    program and copied to `device` once."""
    key = ("flex_frame", str(device))
    consts = program._device_constants
    if key not in consts:
        lay = program.schedule.layout
        whole = torch.tensor([n == lay.block_tokens for n in lay.frame_valid_tokens])
        consts[key] = (lay.valid_token_mask(1).to(device), whole.to(device))
    return consts[key]


def current_rule_blocks(schedule, device) -> torch.Tensor:
    """Bool [chunk_blocks, chunk_blocks]: which of the chunk's blocks each query block attends
    (Dense: all; Causal: the blocks of frames <= its own frame)."""
    nqb, nb = schedule.layout.chunk_blocks, schedule.blocks_per_frame
    if schedule.current == "dense":
        return torch.ones(nqb, nqb, dtype=torch.bool, device=device)
    frame = torch.arange(nqb, device=device) // nb
    return frame[None, :] <= frame[:, None]


def visit_block_matrix(program, visit_slots: torch.Tensor, visit_count: torch.Tensor,
                       tables, step: int) -> torch.Tensor:
    """Bool [B, H, NQB, (step+1) * chunk_blocks]: the global key blocks each (batch, head,
    query block) attends at `step`: its cached visits and the chunk's blocks."""
    s = program.schedule
    B, H, NQB = visit_count.shape
    dev = visit_count.device
    nqb = s.layout.chunk_blocks
    n_keys = (step + 1) * nqb
    group = s.num_heads // s.num_kv_heads
    head_kv = torch.arange(H, device=dev) // group
    maxv = visit_slots.shape[-1]
    used = torch.arange(maxv, device=dev) < visit_count[..., None].long()    # [B, H, NQB, maxv]
    slots = torch.where(used, visit_slots.long(), 0).reshape(B, H, NQB * maxv)
    slot_block = tables.slot_block.to(dev).index_select(1, head_kv).long()      # [B, H, NS]
    blocks = slot_block.gather(-1, slots).reshape(B, H, NQB, maxv)
    # a visit of a free slot (slot_block -1, slot_valid 0) attends no token: drop it
    used = used & (blocks >= 0) & (blocks < n_keys)
    column = torch.where(used, blocks, n_keys)                                 # spill column
    visit = torch.zeros(B, H, NQB, n_keys + 1, dtype=torch.bool, device=dev)
    visit.scatter_(-1, column, True)
    visit = visit[..., :n_keys]
    base = step * nqb
    visit[..., base:base + nqb] |= current_rule_blocks(s, dev)
    return visit


def dense_to_kv_lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool [..., n_keys] -> (kv_num_blocks [...] int32, kv_indices [..., n_keys] int32): the
    True columns first, in ascending order, then the others (as `create_block_mask` does)."""
    num = dense.sum(-1, dtype=torch.int32)
    order = torch.sort(dense.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return num, order.to(torch.int32)


def block_mask(program, q: torch.Tensor, tables):
    """The BlockMask of `program.to_block_mask` (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask
    s, lay = program.schedule, program.schedule.layout
    step = tables.step
    dev = q.device
    visit_slots, visit_count = program.visit_tables(program._blocks(q).detach(), tables, step)
    visit = visit_block_matrix(program, visit_slots, visit_count, tables, step)
    bt, nqb = lay.block_tokens, lay.chunk_blocks
    n_keys = visit.shape[-1]
    frames = n_keys // s.blocks_per_frame
    frame_real, frame_whole = frame_constants(program, dev)
    q_real = frame_real.repeat(lay.chunk_frames)                        # [NQB * bt]
    kv_real = frame_real.repeat(frames)                                 # [n_keys * bt]
    # a visited pair of two whole tiles (no padding) is a full block: mask_mod is True on it
    full = visit & frame_whole.repeat(lay.chunk_frames)[:, None] & frame_whole.repeat(frames)
    partial = visit & ~full
    kv_num, kv_indices = dense_to_kv_lists(partial)
    full_num, full_indices = dense_to_kv_lists(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return visit[b, h, q_idx // bt, kv_idx // bt] & q_real[q_idx] & kv_real[kv_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=bt,
                                    mask_mod=mask_mod, seq_lengths=(nqb * bt, n_keys * bt))
