"""Attention backends of the reference model: one interface, chosen by config.

The model calls `attend(layer, q, k, v) -> out` with q, k, v [B, H, N, D] in raster token
order, keys after RoPE. Two situations need two kinds of `attend`:

* whole clips in one pass (training the teacher and the causal student):
  `SequenceAttention(frame_mask, tokens_per_frame)`, dense SDPA under a frame-level mask
  (`bidirectional_mask`, `block_causal_mask`, `teacher_forcing_mask`);
* rollouts, one chunk at a time (the self-forcing stage, generation): a chunk cache
  made by a backend's `new_cache(...)`, whose `reader()` attends the chunk to the cache
  without changing it (denoising steps) and whose `writer()` attends and then commits the
  chunk's K/V (the clean pass). Two backends:
    - `DenseBackend`: Self-Forcing's baseline, SDPA over a rolling KV cache of the last
      `cache_frames` frames (the chunk included), optional sink frames;
    - `PatternBackend`: any sparsedsl pattern (preset name, Python file or `Pattern`),
      compiled with `sparsedsl.compile` and run through its RolloutCache: the generated
      Triton kernels on CUDA, the PyTorch backend on CPU, forward and backward.
The compiled `dense-causal` and `sliding-window` patterns compute what `DenseBackend`
computes (tests/test_model_attention.py), which keeps every comparison fair.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

import codegen  # noqa: F401  (registers the triton and torch backends without an install)
import sparsedsl as sd
from sparsedsl import presets

from .config import Config, ConfigError
from .rope import apply_rope, time_shift_angles


# =========================================================================================
# whole clips: frame-level masks
# =========================================================================================
def bidirectional_mask(frames: int) -> torch.Tensor:
    return torch.ones(frames, frames, dtype=torch.bool)


def block_causal_mask(frames: int, chunk_frames: int) -> torch.Tensor:
    """Frame q sees frame k when k's chunk is not after q's (dense inside a chunk)."""
    chunk = torch.arange(frames) // chunk_frames
    return chunk[None, :] <= chunk[:, None]


def teacher_forcing_mask(frames: int, chunk_frames: int) -> torch.Tensor:
    """[2F, 2F] over (clean copy, noisy copy): clean frames are block-causal among
    themselves; a noisy frame of chunk i sees the clean frames of chunks < i and the noisy
    frames of chunk i — exactly what it sees at inference (a cache of clean chunks)."""
    chunk = torch.arange(frames) // chunk_frames
    causal = chunk[None, :] <= chunk[:, None]
    before = chunk[None, :] < chunk[:, None]
    same = chunk[None, :] == chunk[:, None]
    top = torch.cat([causal, torch.zeros_like(causal)], dim=1)
    bottom = torch.cat([before, same], dim=1)
    return torch.cat([top, bottom], dim=0)


class SequenceAttention:
    """Dense SDPA over a whole clip under a frame-level mask (None: no mask)."""

    def __init__(self, frame_mask: Optional[torch.Tensor], tokens_per_frame: int):
        self.frame_mask, self.tokens_per_frame = frame_mask, tokens_per_frame
        self._token_mask: dict = {}

    def token_mask(self, device) -> Optional[torch.Tensor]:
        if self.frame_mask is None:
            return None
        key = str(device)
        if key not in self._token_mask:
            n = self.tokens_per_frame
            self._token_mask[key] = (self.frame_mask.repeat_interleave(n, 0)
                                     .repeat_interleave(n, 1).to(device))
        return self._token_mask[key]

    def __call__(self, layer: int, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.token_mask(q.device))


class TeacherForcingAttention:
    """`teacher_forcing_mask` computed chunk by chunk with unmasked SDPA calls (the flash
    path), instead of one SDPA under a [2N, 2N] boolean mask, which leaves it: clean chunk i
    attends clean chunks <= i; noisy chunk i attends clean chunks < i and itself. Same
    result (tests/test_model.py), a fraction of the time on a GPU."""

    def __init__(self, frames: int, chunk_frames: int, tokens_per_frame: int):
        self.frames, self.chunk_tokens = frames, chunk_frames * tokens_per_frame
        self.chunks = frames // chunk_frames

    def __call__(self, layer: int, q, k, v):
        n, half = self.chunk_tokens, q.shape[2] // 2
        out = torch.empty_like(q)
        for i in range(self.chunks):
            clean, noisy = slice(i * n, (i + 1) * n), slice(half + i * n, half + (i + 1) * n)
            out[:, :, clean] = F.scaled_dot_product_attention(q[:, :, clean], k[:, :, :(i + 1) * n],
                                                              v[:, :, :(i + 1) * n])
            keys = torch.cat([k[:, :, :i * n], k[:, :, noisy]], dim=2)
            values = torch.cat([v[:, :, :i * n], v[:, :, noisy]], dim=2)
            out[:, :, noisy] = F.scaled_dot_product_attention(q[:, :, noisy], keys, values)
        return out


# =========================================================================================
# rollouts: chunk caches
# =========================================================================================
class ChunkCache:
    """What a rollout needs from a backend's cache: `attend` (read only), `commit`
    (the clean pass writes the chunk), `frame_start` (first frame of the current chunk)."""

    num_layers: int
    frame_start: int

    def attend(self, layer: int, q, k, v):
        raise NotImplementedError

    def commit(self, layer: int, q, k, v) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def reader(self):
        """`attend` for the denoising steps: the cache is read, never changed."""
        return self.attend

    def writer(self):
        """`attend` for the clean pass: attend, then commit the chunk's K/V, per layer."""
        def attend_and_commit(layer, q, k, v):
            out = self.attend(layer, q, k, v)
            self.commit(layer, q.detach(), k.detach(), v.detach())
            return out
        return attend_and_commit


class DenseCache(ChunkCache):
    """Self-Forcing's KV cache: per layer the K/V of the sink frames and of the last
    `window_frames` frames before the chunk (None: every earlier frame); attention is dense
    SDPA over [kept frames, current chunk]."""

    def __init__(self, num_layers: int, chunk_frames: int, tokens_per_frame: int,
                 window_frames: Optional[int], sink_frames: int = 0):
        self.num_layers, self.chunk_frames = num_layers, chunk_frames
        self.tokens_per_frame = tokens_per_frame
        self.window_frames, self.sink_frames = window_frames, sink_frames
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.kept_frames: list[int] = []      # frame index of each kept frame, in order
        self.frame_start = 0
        self._committed = 0

    def attend(self, layer, q, k, v):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        return F.scaled_dot_product_attention(q, k, v)

    def _keep(self, frames: list[int], next_start: int) -> list[bool]:
        lo = -1 if self.window_frames is None else next_start - self.window_frames
        return [f < self.sink_frames or f >= max(lo, self.sink_frames) for f in frames]

    def commit(self, layer, q, k, v) -> None:
        c, n = self.chunk_frames, self.tokens_per_frame
        frames = self.kept_frames + list(range(self.frame_start, self.frame_start + c))
        keep = self._keep(frames, self.frame_start + c)
        ks = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        vs = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        if not all(keep):
            idx = torch.tensor([i * n + j for i, kp in enumerate(keep) if kp for j in range(n)],
                               dtype=torch.long, device=k.device)
            ks, vs = ks.index_select(2, idx), vs.index_select(2, idx)
        self.k[layer], self.v[layer] = ks.contiguous(), vs.contiguous()
        self._committed += 1
        if self._committed == self.num_layers:   # the step ends with the last layer
            self.kept_frames = [f for f, kp in zip(frames, keep) if kp]
            self.frame_start += c
            self._committed = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


class PatternCache(ChunkCache):
    """A compiled sparsedsl program and its RolloutCache, behind the ChunkCache interface:
    tokens move between the model's raster order and the kernels' tile-major layout.

    `realign` (attention.memory_positions = "realigned"): before a step's first attention in
    each layer, the keys of the sink's and the persistent set's blocks (and their key
    representatives) are rotated in place to the frame just before the window's oldest
    frame, so a memory block is always as far from the chunk as the window's edge — a
    distance training shows — instead of growing without bound (Deep Forcing's
    re-alignment of the sink, applied to the whole memory). RoPE's time rotation composes,
    so each step rotates by the difference to where a slot's keys already are; a slot
    written since the last step holds its own frame. Window blocks are never moved."""

    def __init__(self, program, rollout_cache, layout: sd.VideoLayout, realign: bool = False,
                 head_dim: int = 0, rope_theta: float = 10000.0):
        self.program, self.cache, self.layout = program, rollout_cache, layout
        self.num_layers = rollout_cache.num_layers
        self.chunk_frames = layout.chunk_frames
        self._index: dict = {}
        s = program.schedule
        self.realign = realign and bool(s.sink_frames or s.capacity)
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self._at: list = [None] * self.num_layers       # frame each slot's keys are rotated to
        self._held: list = [None] * self.num_layers     # slot_block when they were
        self._aligned_step = [-1] * self.num_layers

    @property
    def frame_start(self) -> int:
        return self.cache.step * self.chunk_frames

    def _tiles(self, x):
        return self.layout.to_tile_major(x, self.chunk_frames)

    def attend(self, layer, q, k, v):
        tables = self.cache.tables(layer)
        if self.realign and self._aligned_step[layer] != tables.step:
            self._realign_memory(layer, tables)
        out, _ = self.program.attention(self._tiles(q), self._tiles(k), self._tiles(v),
                                        tables)   # trusted: no host sync
        return self.layout.from_tile_major(out, self.chunk_frames)

    def memory_slots(self, tables) -> torch.Tensor:
        """Bool [B, Hkv, NSLOTS]: the slots of the sink's and the persistent set's blocks."""
        s = self.program.schedule
        block = tables.slot_block
        count = torch.zeros(block.shape, dtype=torch.int32, device=block.device)
        n_sink = min(s.sink_frames, tables.step * s.chunk_frames) * s.blocks_per_frame
        if n_sink:
            count.scatter_add_(2, tables.sink_slots[:, :, :n_sink].long(),
                               torch.ones_like(tables.sink_slots[:, :, :n_sink]))
        ps = tables.persistent_slots.long()
        if ps.shape[2]:
            valid = torch.arange(ps.shape[2], device=ps.device) < tables.persistent_count[..., None]
            count.scatter_add_(2, ps.clamp(min=0), valid.int())
        return (count > 0) & (block >= 0)

    @torch.no_grad()
    def _realign_memory(self, layer: int, tables) -> None:
        s = self.program.schedule
        block = tables.slot_block.long()
        own = torch.where(block >= 0, block // s.blocks_per_frame, 0)     # each block's frame
        at, held = self._at[layer], self._held[layer]
        if at is None:
            at = own
        else:
            if at.shape != block.shape:       # the pool grew: its new slots are fresh
                grown = own.clone()
                grown[..., :at.shape[2]] = at
                at, held = grown, torch.cat([held, block[..., held.shape[2]:]], dim=2)
            at = torch.where(block == held, at, own)
        start = s.window_frames_range(tables.step)[0]
        target = torch.where(self.memory_slots(tables), torch.clamp(own, min=start - 1), own)
        cos, sin = time_shift_angles(target - at, self.head_dim, self.rope_theta)
        d = self.head_dim
        tables.k_pool[..., :d] = apply_rope(tables.k_pool[..., :d], cos[..., None, :], sin[..., None, :])
        tables.k_rep[..., :d] = apply_rope(tables.k_rep[..., :d], cos, sin)
        self._at[layer], self._held[layer] = target, block.clone()
        self._aligned_step[layer] = tables.step

    def commit(self, layer, q, k, v) -> None:
        self.cache.commit(layer, self._tiles(q), self._tiles(k), self._tiles(v))

    def nbytes(self) -> int:
        return self.cache.nbytes()


# =========================================================================================
# backends
# =========================================================================================
class DenseBackend:
    """Self-Forcing's baseline: a rolling window of `cache_frames` frames (chunk included)."""

    name = "dense"

    def __init__(self, cfg: Config, cache_frames: Optional[int] = None,
                 sink_frames: Optional[int] = None):
        self.cfg = cfg
        self.cache_frames = cfg.attention.cache_frames if cache_frames is None else cache_frames
        self.sink_frames = cfg.attention.sink_frames if sink_frames is None else sink_frames

    @property
    def window_frames(self) -> int:
        return self.cache_frames - self.cfg.video.chunk_frames

    def new_cache(self, batch: int, device, dtype, max_frames: Optional[int] = None) -> DenseCache:
        return DenseCache(self.cfg.model.layers, self.cfg.video.chunk_frames,
                          self.cfg.tokens_per_frame, self.window_frames, self.sink_frames)

    def describe(self) -> str:
        sink = f" + {self.sink_frames} sink frames" if self.sink_frames else ""
        return f"dense SDPA over a rolling {self.cache_frames}-frame cache{sink}"


class PatternBackend:
    """A sparsedsl pattern compiled at the model's geometry."""

    def __init__(self, cfg: Config, pattern: sd.Pattern, device="cpu", dtype=torch.float32):
        self.cfg, self.pattern = cfg, pattern
        self.name = pattern.name or "pattern"
        self.layout = pattern.layout
        dev = torch.device(device)
        self.program = sd.compile(pattern, num_heads=cfg.model.heads, head_dim=cfg.head_dim,
                                  dtype=str(dtype).replace("torch.", ""),
                                  backend="triton" if dev.type == "cuda" else "torch")

    def new_cache(self, batch: int, device, dtype, max_frames: Optional[int] = None) -> PatternCache:
        cache = self.program.new_cache(batch=batch, num_layers=self.cfg.model.layers,
                                       device=device, dtype=dtype, max_frames=max_frames)
        return PatternCache(self.program, cache, self.layout,
                            realign=self.cfg.attention.memory_positions == "realigned",
                            head_dim=self.cfg.head_dim, rope_theta=self.cfg.model.rope_theta)

    def describe(self) -> str:
        realigned = (", memory realigned to the window's edge"
                     if self.cfg.attention.memory_positions == "realigned" else "")
        return f"sparsedsl pattern {self.name}{realigned}: {self.program!r}"


def model_layout(cfg: Config) -> sd.VideoLayout:
    """The model's token grid cut into the configured tiles, chunk_frames frames a step."""
    return sd.VideoLayout(height=cfg.tokens_h, width=cfg.tokens_w,
                          tile=tuple(int(t) for t in cfg.attention.tile),
                          chunk_frames=cfg.video.chunk_frames)


def resolve_pattern(spec: Union[str, Path, sd.Pattern], cfg: Config) -> sd.Pattern:
    """A preset name (with the config's overrides for it), a Python file defining `pattern`,
    or a Pattern; always re-laid out at the model's geometry."""
    layout = model_layout(cfg)
    if isinstance(spec, sd.Pattern):
        return dataclasses.replace(spec, layout=layout)
    spec = str(spec)
    if spec in presets.PRESETS:
        overrides = dict(cfg.attention.presets.get(spec, {}))
        try:
            return presets.get(spec, layout=layout, **overrides)
        except TypeError as e:
            raise ConfigError("config", f"attention.presets.{spec}", overrides,
                              f"keyword arguments of the {spec} preset ({e})") from None
    if spec.endswith(".py"):
        from sparsedsl.cli import load_pattern
        return dataclasses.replace(load_pattern(spec), layout=layout)
    raise ConfigError("config", "attention.pattern", spec,
                      "'dense', a preset (" + ", ".join(presets.PRESETS) + ") or a .py file "
                      "defining `pattern`")


def make_backend(cfg: Config, pattern: Union[None, str, Path, sd.Pattern] = None,
                 device="cpu", dtype=torch.float32):
    """The rollout backend named by `pattern` (default: the config's attention.pattern)."""
    spec = cfg.attention.pattern if pattern is None else pattern
    if isinstance(spec, str) and spec == "dense":
        return DenseBackend(cfg)
    return PatternBackend(cfg, resolve_pattern(spec, cfg), device=device, dtype=dtype)
