"""Generate a long rollout with a bounded KV cache: the chunk protocol of Self-Forcing.

    python examples/generate_with_cache.py [--chunks 60] [--png memory.png]

A stand-in "model" (one random projection per layer, no training) produces q, k, v for
every chunk, so that the example runs anywhere (the torch backend on CPU, the generated
Triton kernels on a GPU). What it shows is the protocol a real model follows:

    for each chunk:
        for each denoising pass:  attend to the cache (read only; selection may differ per pass)
        clean pass, per layer:    attend, then cache.commit(layer, q, k, v)

and what the cache guarantees: the memory stays at the pattern's peak size however long the
rollout, and a paused rollout resumes bit for bit from `cache.state_dict()`.
"""
from __future__ import annotations

import argparse

import torch

import sparsedsl as sd

LAYERS, HEADS, HEAD_DIM, DENOISING_PASSES = 2, 2, 16, 2


def small_pattern() -> sd.Pattern:
    """Sparse Forcing on a small frame (12 x 16 tokens in 4 x 4 tiles), so that a CPU runs it."""
    layout = sd.VideoLayout(height=12, width=16, tile=(4, 4), chunk_frames=3)
    return sd.presets.sparse_forcing(layout=layout, capacity=8, window_frames=6)


class StandInModel:
    """q, k, v of each layer from the chunk's tokens: fixed random projections (the pass's
    noise level only perturbs the input, as a denoiser's input would change)."""

    def __init__(self, program, device, dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        s = program.schedule
        self.heads, self.d = s.num_heads, s.head_dim
        self.width = self.heads * self.d
        self.proj = [torch.randn(self.width, 3 * self.width, generator=g).to(device, dtype) / self.width**0.5
                     for _ in range(LAYERS)]
        lay = s.layout
        self.tokens = lay.chunk_blocks * lay.block_tokens
        # padding tokens of partial tiles stay zero (tile-major layout, padded blocks)
        self.valid = lay.valid_token_mask(lay.chunk_frames).to(device)[None, :, None]
        self.device, self.dtype = device, dtype

    def qkv(self, layer: int, x: torch.Tensor):
        q, k, v = (x @ self.proj[layer]).chunk(3, dim=-1)
        split = lambda t: (t * self.valid).view(1, self.tokens, self.heads, self.d).transpose(1, 2)  # noqa: E731
        return split(q), split(k), split(v)

    def chunk_input(self, chunk: int, noise: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + chunk)
        x = torch.randn(1, self.tokens, self.width, generator=g) * (1.0 + noise)
        return x.to(self.device, self.dtype)


def generate(program, model, cache, chunks: range) -> list[float]:
    """Run the chunk protocol for `chunks`; returns a checksum of each chunk's clean output."""
    sums = []
    for chunk in chunks:
        for noise in torch.linspace(1.0, 0.25, DENOISING_PASSES).tolist():   # read-only passes
            x = model.chunk_input(chunk, noise)
            for layer in range(LAYERS):
                out, _ = program.attention(*model.qkv(layer, x), cache.tables(layer))
        x = model.chunk_input(chunk, 0.0)                                    # the clean pass
        total = 0.0
        for layer in range(LAYERS):
            q, k, v = model.qkv(layer, x)
            out, _ = program.attention(q, k, v, cache.tables(layer))
            cache.commit(layer, q, k, v)
            total += float(out.float().sum())
        sums.append(total)
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=60)
    ap.add_argument("--png", default=None, help="draw the persistent memory over the rollout")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    program = sd.compile(small_pattern(), num_heads=HEADS, head_dim=HEAD_DIM,
                         dtype=str(dtype).replace("torch.", ""))
    model = StandInModel(program, device, dtype)
    cache = program.new_cache(batch=1, num_layers=LAYERS, device=device, dtype=dtype)
    print(f"{program!r} on {device}; cache {cache.nbytes() / 2**10:.1f} KiB of K/V, fixed")

    half = args.chunks // 2
    first = generate(program, model, cache, range(half))
    paused = cache.state_dict()                     # pause ...
    rest = generate(program, model, cache, range(half, args.chunks))
    assert cache.nbytes() == program.new_cache(1, LAYERS, device, dtype).nbytes(), "memory grew"

    resumed = program.new_cache(batch=1, num_layers=LAYERS, device=device, dtype=dtype)
    resumed.load_state_dict(paused)                 # ... and resume elsewhere
    again = generate(program, model, resumed, range(half, args.chunks))
    assert again == rest, "a resumed rollout must match the uninterrupted one bit for bit"
    print(f"{args.chunks} chunks ({args.chunks * program.schedule.chunk_frames} latent frames) "
          f"generated; resumed at chunk {half}: identical outputs")
    print(cache.describe(layer=0, max_blocks=8))
    if args.png:
        program.draw_memory(args.chunks * program.schedule.chunk_frames, args.png)
        print(f"wrote {args.png}")
    assert len(first) == half


if __name__ == "__main__":
    main()
