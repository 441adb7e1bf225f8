"""The reference model's pieces against independent references: backends that must agree
do, the teacher-forcing sequence equals the chunk rollout, RoPE is relative, AdaLN-zero
starts as the identity, and the causal masks hide the future."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from models.attention import (DenseBackend, PatternBackend, SequenceAttention,
                              TeacherForcingAttention, block_causal_mask, make_backend,
                              model_layout, resolve_pattern, teacher_forcing_mask)
from models.config import ConfigError, load_config
from models.dit import CausalDiT
from models.flow import denoising_times
from models.rollout import gaussian_noise, rollout
from models.rope import apply_rope, rope_angles
from sparsedsl import presets

CFG = load_config("tiny")


def random_model(seed=0, cfg=CFG):
    """A model with every weight random (a fresh one is the identity on its residual path)."""
    torch.manual_seed(seed)
    model = CausalDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def run_rollout(model, backend, frames, batch=2, seed=1, cfg=CFG):
    cache = backend.new_cache(batch, "cpu", torch.float32, max_frames=frames)
    shape = (batch, cfg.video.chunk_frames, cfg.video.channels, cfg.video.height, cfg.video.width)
    times = denoising_times(cfg.flow.denoising_steps, cfg.flow.shift)
    with torch.no_grad():
        return rollout(model, cache, gaussian_noise(shape, torch.Generator().manual_seed(seed)),
                       frames, times)


@pytest.mark.parametrize("window", [3, 6])
def test_compiled_sliding_window_reproduces_dense_rolling_cache(window):
    model, layout = random_model(), model_layout(CFG)
    dense = run_rollout(model, DenseBackend(CFG, cache_frames=window + CFG.video.chunk_frames), 15)
    pattern = PatternBackend(CFG, presets.sliding_window(layout, frames=window))
    compiled = run_rollout(model, pattern, 15)
    torch.testing.assert_close(compiled, dense, rtol=1e-4, atol=1e-4)


def test_compiled_dense_causal_reproduces_dense_over_all_frames():
    model, layout = random_model(1), model_layout(CFG)
    dense = run_rollout(model, DenseBackend(CFG, cache_frames=10**6), 12)
    compiled = run_rollout(model, PatternBackend(CFG, presets.dense_causal(layout)), 12)
    torch.testing.assert_close(compiled, dense, rtol=1e-4, atol=1e-4)


def test_window_changes_the_output():
    """The equivalence above is not vacuous: a shorter window gives another video."""
    model = random_model(2)
    long = run_rollout(model, DenseBackend(CFG, cache_frames=12), 12)
    short = run_rollout(model, DenseBackend(CFG, cache_frames=3), 12)
    assert (long - short).abs().max() > 1e-3


def test_sparse_forcing_rollout_runs_and_differs_from_dense():
    model = random_model(3)
    sparse = run_rollout(model, make_backend(CFG, "sparse-forcing"), 18)
    dense = run_rollout(model, DenseBackend(CFG), 18)
    assert torch.isfinite(sparse).all()
    assert (sparse - dense).abs().max() > 1e-3


def test_teacher_forcing_sequence_equals_the_chunk_rollout():
    """What the student trains on (one sequence, teacher_forcing_mask) is what it sees at
    inference (clean chunks committed to the cache, then the noisy chunk read)."""
    cfg, model = CFG, random_model(4)
    F_, c, n = cfg.video.frames, cfg.video.chunk_frames, cfg.tokens_per_frame
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(2, F_, 3, 16, 16, generator=g)
    noisy = torch.randn(2, F_, 3, 16, 16, generator=g)
    t = torch.rand(2, F_ // c, generator=g).repeat_interleave(c, dim=1)
    attend = SequenceAttention(teacher_forcing_mask(F_, c), n)
    with torch.no_grad():
        seq = model(torch.cat([clean, noisy], 1), torch.cat([torch.zeros_like(t), t], 1), attend,
                    frame_positions=torch.cat([torch.arange(F_), torch.arange(F_)]))[:, F_:]
        cache = DenseBackend(cfg, cache_frames=F_).new_cache(2, "cpu", torch.float32)
        for i in range(F_ // c):
            sl = slice(i * c, (i + 1) * c)
            out = model(noisy[:, sl], t[:, sl], cache.reader(), frame_start=i * c)
            torch.testing.assert_close(out, seq[:, sl], rtol=1e-4, atol=1e-4)
            model(clean[:, sl], torch.zeros_like(t[:, sl]), cache.writer(), frame_start=i * c)


def test_chunked_teacher_forcing_equals_the_masked_sequence():
    """The student's fast teacher-forcing attention (unmasked SDPA per chunk) computes
    exactly the teacher-forcing mask."""
    F_, c, n = CFG.video.frames, CFG.video.chunk_frames, CFG.tokens_per_frame
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 2, 2 * F_ * n, 8, generator=g).unbind(0)
    masked = SequenceAttention(teacher_forcing_mask(F_, c), n)(0, q, k, v)
    chunked = TeacherForcingAttention(F_, c, n)(0, q, k, v)
    torch.testing.assert_close(chunked, masked, rtol=1e-5, atol=1e-5)


def test_block_causal_sequence_hides_the_future():
    model = random_model(5)
    F_, c = CFG.video.frames, CFG.video.chunk_frames
    attend = SequenceAttention(block_causal_mask(F_, c), CFG.tokens_per_frame)
    x = torch.randn(1, F_, 3, 16, 16)
    t = torch.full((1, F_), 0.5)
    y = x.clone()
    y[:, c:] += torch.randn_like(y[:, c:])      # change every frame after the first chunk
    with torch.no_grad():
        a, b = model(x, t, attend), model(y, t, attend)
    torch.testing.assert_close(a[:, :c], b[:, :c])
    assert (a[:, c:] - b[:, c:]).abs().max() > 1e-3


def test_masks():
    tf = teacher_forcing_mask(6, 3)
    assert tf[:6, 6:].sum() == 0                          # clean never sees noisy
    assert tf[6 + 3, 0:3].all() and not tf[6 + 3, 3:6].any()   # noisy chunk 1: clean chunk 0 only
    assert tf[6 + 3, 9:12].all() and not tf[6 + 3, 6:9].any()  # ... and its own noisy chunk
    assert torch.equal(tf[:6, :6], block_causal_mask(6, 3))


@settings(max_examples=20)
@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 40))
def test_rope_scores_depend_on_frame_difference_only(f1, f2, shift):
    """<rope(q, f1), rope(k, f2)> == <rope(q, f1 + s), rope(k, f2 + s)>: cached keys keep
    their frame's position and only distances matter."""
    g = torch.Generator().manual_seed(f1 * 1000 + f2)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64).float().unbind(0)
    def score(a, b):
        ca, sa = rope_angles(torch.tensor([a]), 1, 1, 16)
        cb, sb = rope_angles(torch.tensor([b]), 1, 1, 16)
        return (apply_rope(q[None], ca, sa) * apply_rope(k[None], cb, sb)).sum()
    torch.testing.assert_close(score(f1, f2), score(f1 + shift, f2 + shift), rtol=1e-4, atol=1e-4)


def test_rope_preserves_norms():
    x = torch.randn(3, 2, 16 * 4, 16)
    cos, sin = rope_angles(torch.arange(4), 4, 4, 16)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_new_model_is_adaln_zero():
    """Gates start at zero and the head at zero: a new model predicts x0 = 0 everywhere,
    whatever the attention, and its gradients are not all zero (it can learn)."""
    model = CausalDiT(CFG)
    x = torch.randn(2, CFG.video.frames, 3, 16, 16)
    t = torch.rand(2, CFG.video.frames)
    out = model(x, t, SequenceAttention(None, CFG.tokens_per_frame))
    assert out.abs().max() == 0
    out.sub(x).pow(2).mean().backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_patchify_roundtrip():
    model = CausalDiT(CFG)
    x = torch.randn(2, 3, 3, 16, 16)
    torch.testing.assert_close(model.unpatchify(model.patchify(x), 3), x)


def test_gradients_flow_through_the_compiled_pattern():
    """The self-forcing stage backpropagates through the compiled pattern's attention."""
    model = random_model(6).train()
    backend = make_backend(CFG, "sparse-forcing")
    cache = backend.new_cache(1, "cpu", torch.float32, max_frames=18)
    shape = (1, 3, 3, 16, 16)
    times = denoising_times(CFG.flow.denoising_steps, CFG.flow.shift)
    video = rollout(model, cache, gaussian_noise(shape, torch.Generator().manual_seed(0)), 18,
                    times, exit_steps=[1, 0, 3, 2, 1, 0])
    video.square().mean().backward()
    grads = [p.grad for p in model.blocks[0].attn.qkv.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_rollout_chunks_without_an_exit_step_carry_no_gradient():
    """A chunk whose exit step is None runs all its denoising steps without gradient (the
    chunks of a long rollout outside the scored window), exactly as at inference."""
    model = random_model(7).train()
    times = denoising_times(CFG.flow.denoising_steps, CFG.flow.shift)
    shape = (1, 3, 3, 16, 16)

    def run(exit_steps):
        cache = DenseBackend(CFG, cache_frames=6).new_cache(1, "cpu", torch.float32, max_frames=9)
        return rollout(model, cache, gaussian_noise(shape, torch.Generator().manual_seed(1)), 9,
                       times, exit_steps=exit_steps)

    with torch.no_grad():
        inference = run(None)
    video = run([None, 1, None])
    torch.testing.assert_close(video[:, :3], inference[:, :3], rtol=0, atol=0)
    assert not torch.allclose(video[:, 3:6], inference[:, 3:6])     # stopped at step 1 of 4
    video[:, :3].sum().backward(retain_graph=True)      # chunk 0 reaches no weight
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    video[:, 3:6].square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_pattern_and_preset_options():
    with pytest.raises(ConfigError, match="attention.pattern"):
        make_backend(CFG, "no-such-pattern")
    cfg = dataclasses.replace(CFG, attention=dataclasses.replace(
        CFG.attention, presets={"sparse-forcing": {"capacityy": 3}}))
    with pytest.raises(ConfigError, match="attention.presets.sparse-forcing"):
        resolve_pattern("sparse-forcing", cfg)


def test_wan_config_has_wan_shapes_and_runs_a_chunk_on_meta():
    """wan-1.3b: Wan2.1-T2V-1.3B's shapes (about 1.4B parameters with the text
    cross-attention), and one chunk's forward is well-formed (meta tensors: no memory)."""
    cfg = load_config("wan-1.3b")
    assert (cfg.model.dim, cfg.model.layers, cfg.model.heads, cfg.head_dim, cfg.model.ffn) == \
        (1536, 30, 12, 128, 8960)
    assert cfg.tokens_per_frame == 1560 and cfg.video.chunk_frames == 3
    with torch.device("meta"):
        model = CausalDiT(cfg)
        assert 1.3e9 < sum(p.numel() for p in model.parameters()) < 1.5e9
        x = torch.empty(1, 3, 16, 60, 104)
        cache = DenseBackend(cfg).new_cache(1, "meta", torch.float32)
        out = model(x, torch.zeros(1, 3), cache.reader())
    assert out.shape == x.shape


def test_conditional_configs_are_refused_by_the_causal_stages(tmp_path):
    from models.train.common import require_unconditional
    cfg = load_config("tiny", overrides={"model.num_classes": 2})
    with pytest.raises(ConfigError, match="model.num_classes"):
        require_unconditional(cfg, "student")


def test_teacher_trains_on_a_folder_of_user_videos(tmp_path):
    import numpy as np
    from models.cli import main
    for i in range(2):
        np.save(tmp_path / f"clip{i}.npy",
                np.random.default_rng(i).integers(0, 255, (12, 20, 24, 3), dtype=np.uint8))
    run_dir = tmp_path / "run"
    assert main(["train", "teacher", "--config", "tiny", "--run-dir", str(run_dir), "--data",
                 str(tmp_path), "--no-progress", "--set", "teacher.steps=2"]) == 0
    assert (run_dir / "weights.safetensors").is_file()
    assert main(["train", "teacher", "--config", "tiny", "--run-dir", str(tmp_path / "r2"),
                 "--data", str(tmp_path / "missing"), "--no-progress"]) == 2


@pytest.mark.gpu
def test_compiled_blocks_match_eager_on_the_gpu():
    """`compile_blocks` (train --compile) changes the speed, not the function: forward and
    gradients of the small model under the teacher-forcing sequence and a cache rollout
    chunk (two sequence lengths through one dynamic-shape compilation) match eager."""
    from models.attention import TeacherForcingAttention
    from models.dit import compile_blocks
    cfg = load_config("small")
    model = random_model(7, cfg).cuda().train()
    F_, c, n = cfg.video.frames, cfg.video.chunk_frames, cfg.tokens_per_frame
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * F_, 3, cfg.video.height, cfg.video.width, generator=g).cuda()
    t = torch.rand(2, 2 * F_, generator=g).cuda()
    positions = torch.cat([torch.arange(F_), torch.arange(F_)])
    attend = TeacherForcingAttention(F_, c, n)
    chunk = x[:, :c].contiguous()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, t, attend, frame_positions=positions)
        out.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            small = model(chunk, t[:, :c], SequenceAttention(None, n))
        return out.detach(), grads, small

    eager = run()
    try:
        compile_blocks()
        compiled = run()
    finally:
        compile_blocks(False)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-4, atol=1e-4)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
