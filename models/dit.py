"""A Wan-style causal video DiT in pixel space (the reference model of Sparse Forcing).

    model = CausalDiT(cfg)
    x0_hat = model(video, t, attend)      # video [B, F, C, H, W], t [B, F] flow times

Per frame: patchify (p x p pixels -> one token), linear embedding. Per block:
AdaLN-zero modulation by the frame's flow time (Wan's shared time projection plus a
learned per-block offset; gates start at zero, so a new model is the identity), self-
attention with RMS-normed q/k and 3D RoPE, optional cross-attention to a text context,
and a GELU FFN. The head predicts the clean frames (x-prediction, models/flow.py).

Self-attention goes through `attend(layer, q, k, v) -> out` with q, k, v [B, H, N, D]
(raster tokens, keys after RoPE): the caller decides what a query may see — the whole
clip (teacher), the block-causal mask (student), or a KV cache of earlier chunks
(rollouts; models/attention.py). The weights do not depend on that choice, so one
checkpoint runs under every attention backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .rope import apply_rope, rope_angles

ROPE_TABLES_KEPT = 16   # RoPE tables cached per model (chunk positions x devices)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of flow times t in [0, 1] (scaled to Self-Forcing's 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t.float() * 1000)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype) * self.weight.to(dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(self.head_dim)
        self.norm_k = RMSNorm(self.head_dim)
        self.out = nn.Linear(dim, dim)

    # its forward is split around the attention call: _attention_inputs / _attention_outputs


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = RMSNorm(dim // heads)
        self.norm_k = RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, N, D = x.shape
        q = self.norm_q(self.q(x).view(B, N, self.heads, -1)).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, self.norm_k(k), v)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.norm1 = nn.LayerNorm(m.dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(m.dim, m.heads)
        self.cross = CrossAttention(m.dim, m.heads) if m.text_tokens else None
        self.norm_cross = nn.LayerNorm(m.dim, eps=1e-6) if m.text_tokens else None
        self.norm2 = nn.LayerNorm(m.dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(m.dim, m.ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(m.ffn, m.dim))
        # Wan: every block adds its own learned offset to the shared time modulation
        self.modulation = nn.Parameter(torch.randn(1, 6, m.dim) / m.dim ** 0.5)

    def forward(self, x, time_mod, tokens_per_frame: int, cos, sin, attend, layer, context):
        # time_mod [B, F, 6, dim]: applied per frame by viewing x as [B, F, tokens, dim]
        # (no per-token copy of the modulation)
        mod = (time_mod + self.modulation[:, None])[:, :, :, None]     # [B, F, 6, 1, dim]
        before, after = _BLOCK_HALVES.get()
        q, k, v = before(self, x, mod, tokens_per_frame, cos, sin)
        o = attend(layer, q, k, v)
        return after(self, x, o, mod, tokens_per_frame, context)


# The two halves of a block around its attention call: everything in them is element-wise
# work and matmuls that torch.compile fuses (`compile_blocks`); the attention call between
# them stays eager, because it is whatever the caller passes (SDPA, a cache, a pattern).
def _attention_inputs(blk: Block, x, mod, tokens_per_frame: int, cos, sin):
    """Norm, modulation, qkv projection, RMS-normed q/k and RoPE: (q, k, v) [B, H, N, D]."""
    B, N, D = x.shape
    shift1, scale1 = mod[:, :, 0], mod[:, :, 1]
    per_frame = (B, N // tokens_per_frame, tokens_per_frame, D)
    h = modulate(blk.norm1(x).view(per_frame), shift1, scale1).view(B, N, D)
    a = blk.attn
    q, k, v = a.qkv(h).view(B, N, 3, a.heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q = apply_rope(a.norm_q(q), cos, sin)
    k = apply_rope(a.norm_k(k), cos, sin)
    return q, k, v.contiguous()


def _attention_outputs(blk: Block, x, o, mod, tokens_per_frame: int, context):
    """Output projection and gated residual, cross-attention, modulated FFN and its residual."""
    B, N, D = x.shape
    gate1, shift2, scale2, gate2 = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]
    per_frame = (B, N // tokens_per_frame, tokens_per_frame, D)
    o = blk.attn.out(o.transpose(1, 2).reshape(B, N, -1))
    x = x + (gate1 * o.view(per_frame)).view(B, N, D)
    if blk.cross is not None:
        x = x + blk.cross(blk.norm_cross(x), context)
    h = modulate(blk.norm2(x).view(per_frame), shift2, scale2).view(B, N, D)
    return x + (gate2 * blk.ffn(h).view(per_frame)).view(B, N, D)


class _Halves:
    """The block halves in use: eager by default, compiled after `compile_blocks()`."""

    def __init__(self):
        self.eager = (_attention_inputs, _attention_outputs)
        self.compiled = None

    def get(self):
        return self.compiled or self.eager


_BLOCK_HALVES = _Halves()


def compile_blocks(enabled: bool = True) -> None:
    """Run every block's halves through `torch.compile` (dynamic shapes: the teacher's clip,
    the teacher-forcing sequence and a rollout's chunk share the compiled code). The
    element-wise fp32 work of norms, RoPE and modulation is most of a small model's training
    step on a GPU (docs/training.md); fused, it costs a fraction. Process-wide, off by default;
    `sparse-forcing train --compile` turns it on."""
    if not enabled:
        _BLOCK_HALVES.compiled = None
        return
    _BLOCK_HALVES.compiled = tuple(torch.compile(f, dynamic=True) for f in _BLOCK_HALVES.eager)


class CausalDiT(nn.Module):
    """x-prediction video DiT; see the module docstring."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        m, v = cfg.model, cfg.video
        self.patch, self.channels = m.patch, v.channels
        self.rows, self.cols = cfg.tokens_h, cfg.tokens_w
        self.tokens_per_frame = cfg.tokens_per_frame
        patch_dim = v.channels * m.patch * m.patch
        self.embed = nn.Linear(patch_dim, m.dim)
        self.time_embed = nn.Sequential(nn.Linear(256, m.dim), nn.SiLU(), nn.Linear(m.dim, m.dim))
        self.time_project = nn.Sequential(nn.SiLU(), nn.Linear(m.dim, 6 * m.dim))
        self.label_embed = nn.Embedding(m.num_classes + 1, m.dim) if m.num_classes else None
        self.text_embed = (nn.Sequential(nn.Linear(m.text_dim, m.dim), nn.GELU(approximate="tanh"),
                                         nn.Linear(m.dim, m.dim)) if m.text_tokens else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.layers))
        self.head_norm = nn.LayerNorm(m.dim, elementwise_affine=False, eps=1e-6)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, m.dim) / m.dim ** 0.5)
        self.head = nn.Linear(m.dim, patch_dim)
        self._rope_tables: dict = {}
        self._init_weights()

    def _init_weights(self):
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        nn.init.zeros_(self.time_project[1].weight)   # AdaLN-zero: gates start at 0
        nn.init.zeros_(self.time_project[1].bias)
        for blk in self.blocks:
            with torch.no_grad():
                blk.modulation[:, 2].zero_()    # gate1
                blk.modulation[:, 5].zero_()    # gate2
        nn.init.zeros_(self.head.weight)

    # --- patches <-> tokens ---------------------------------------------------------------
    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> [B, F * rows * cols, C * p * p] (raster tokens)."""
        B, Fr, C, H, W = video.shape
        p = self.patch
        x = video.reshape(B, Fr, C, self.rows, p, self.cols, p)
        return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr * self.rows * self.cols, C * p * p)

    def unpatchify(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:
        B, p = tokens.shape[0], self.patch
        x = tokens.reshape(B, frames, self.rows, self.cols, self.channels, p, p)
        return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, frames, self.channels, self.rows * p,
                                                       self.cols * p)

    def _rope(self, positions: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of these frame positions on `device`, kept for reuse: a rollout asks
        for the same chunk positions at every denoising step and in every layer."""
        key = (positions, str(device))
        if key not in self._rope_tables:
            if len(self._rope_tables) >= ROPE_TABLES_KEPT:   # rollouts move on: drop the oldest
                self._rope_tables.pop(next(iter(self._rope_tables)))
            cos, sin = rope_angles(torch.tensor(positions, device="cpu"), self.rows, self.cols,
                                   self.cfg.head_dim, self.cfg.model.rope_theta)
            self._rope_tables[key] = (cos.to(device), sin.to(device))
        return self._rope_tables[key]

    # --- forward ----------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, t: torch.Tensor, attend, frame_start: int = 0,
                frame_positions: torch.Tensor | None = None, label: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x0 prediction for `video` [B, F, C, H, W] at flow times `t` [B, F].

        Frame f of the input sits at time position `frame_start + f`, or at
        `frame_positions[f]` when given (teacher forcing: the clean and noisy copies of a
        frame share its position). `label` [B] (num_classes = null label), `context`
        [B, text_tokens, text_dim] when the config has cross-attention."""
        B, Fr = video.shape[:2]
        if t.shape != (B, Fr):
            raise ValueError(f"t.shape = {tuple(t.shape)}: expected (batch, frames) = {(B, Fr)}")
        if frame_positions is None:
            frame_positions = torch.arange(Fr, device="cpu") + frame_start
        cos, sin = self._rope(tuple(frame_positions.tolist()), video.device)
        emb = self.time_embed(timestep_embedding(t, 256).to(video.dtype))          # [B, F, dim]
        if self.label_embed is not None:
            if label is None:
                label = torch.full((B,), self.cfg.model.num_classes, device=video.device)
            emb = emb + self.label_embed(label)[:, None]
        time_mod = self.time_project(emb).unflatten(-1, (6, -1))                   # [B, F, 6, dim]
        ctx = None
        if self.text_embed is not None:
            if context is None:
                context = video.new_zeros(B, self.cfg.model.text_tokens, self.cfg.model.text_dim)
            ctx = self.text_embed(context)
        x = self.embed(self.patchify(video))
        for i, blk in enumerate(self.blocks):
            x = blk(x, time_mod, self.tokens_per_frame, cos, sin, attend, i, ctx)
        shift, scale = (emb[:, :, None] + self.head_modulation[:, None])[:, :, :, None].unbind(2)
        h = modulate(self.head_norm(x).view(B, Fr, self.tokens_per_frame, -1), shift, scale)
        out = self.head(h.view(B, Fr * self.tokens_per_frame, -1))
        return self.unpatchify(out, Fr)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
