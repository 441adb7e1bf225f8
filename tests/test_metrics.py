"""models/metrics.py on inputs whose answers are known: the world's own frames as the
"generated" video (perfect), a recoloured sprite (forgotten identity), added noise (lower
PSNR), static video (maximal gap similarity), constant and normal samples (intervals)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models import metrics as M
from models.config import load_config
from models.world import render, revisits

SMALL, TINY = load_config("small"), load_config("tiny")
PREFIX = 3


@pytest.fixture(scope="module")
def clip():
    """Small world seed 0, frames 0..95, one camera period (four sprites leave and come back
    in range, five revisits)."""
    frames, meta = render(0, 0, 96, SMALL.video, SMALL.world)
    return frames, meta


def recall(gen, meta, **kw):
    return M.revisit_recall(gen, meta[PREFIX:], SMALL, context_meta=meta[:PREFIX], **kw)


def noisy(video, sigma, seed=0):
    z = np.random.default_rng(seed).standard_normal(video.shape)
    return np.clip(np.rint(video + sigma * z), 0, 255).astype(np.uint8)


# --- PSNR / SSIM ---------------------------------------------------------------------------
def test_identical_videos_are_perfect(clip):
    frames, _ = clip
    assert M.METRIC_BACKEND is not None
    psnr, ssim = M.psnr_per_frame(frames, frames), M.ssim_per_frame(frames, frames)
    assert psnr.shape == ssim.shape == (96,)
    assert np.isposinf(psnr).all()
    np.testing.assert_allclose(ssim, 1.0, atol=1e-5)


@given(st.floats(1, 40), st.floats(3, 60))
def test_psnr_finite_and_decreasing_with_noise(sigma, more):
    truth, _ = render(1, 0, 4, TINY.video, TINY.world)
    low, high = noisy(truth, sigma), noisy(truth, sigma + more)   # same noise, scaled
    p_low, p_high = M.psnr_per_frame(low, truth), M.psnr_per_frame(high, truth)
    assert np.isfinite(p_low).all() and np.isfinite(p_high).all()
    assert (p_high < p_low).all()
    assert M.ssim_per_frame(high, truth).mean() < M.ssim_per_frame(low, truth).mean() < 1


def test_inputs_are_checked(clip):
    frames, meta = clip
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr_per_frame(frames[:3], frames[:4])
    with pytest.raises(ValueError, match="uint8"):
        M.ssim_per_frame(frames.astype(np.float32), frames)
    with pytest.raises(ValueError, match="metadata entries"):
        M.revisit_recall(frames[:5], meta[:4], SMALL)


# --- identity recall -----------------------------------------------------------------------
def test_recall_of_the_truth_is_perfect_and_finds_the_worlds_revisits(clip):
    frames, meta = clip
    r = recall(frames[PREFIX:], meta, distance=0.5)   # the solid pixels are exactly the colour
    assert r["revisits"] > 0 and r["context_revisits"] > 0
    assert r["mean_score"] == 1.0 and r["success_rate"] == 1.0
    expected = {(k, left, back) for k, pairs in revisits(0, 0, 96, SMALL.video, SMALL.world).items()
                for left, back in pairs if back >= PREFIX}
    assert {(x["sprite"], x["left"], x["back"]) for x in r["records"]} == expected
    for x in r["records"]:
        assert all(x["back"] <= f < 96 for f in x["frames"])
    # the sprite size from the metadata alone (a VideoConfig) agrees with the world config's
    assert M.revisit_recall(frames[PREFIX:], meta[PREFIX:], SMALL.video,
                            context_meta=meta[:PREFIX]) == recall(frames[PREFIX:], meta)


def test_recolouring_a_sprite_after_its_return_fails_its_recall(clip):
    frames, meta = clip
    before = recall(frames[PREFIX:], meta)
    target = next(x for x in before["records"] if x["seen_in_context"] and x["frames"])
    gen = frames[PREFIX:].copy()
    color = np.array(target["color"], np.uint8)
    for f in target["frames"]:
        x0, y0, x1, y1 = meta[f].sprites[target["sprite"]].bbox
        box = gen[f - PREFIX, y0:y1, x0:x1]
        box[(box == color).all(-1)] = 255 - color          # the complementary colour
    after = recall(gen, meta)
    changed = {(x["sprite"], x["back"]): x for x in after["records"]}
    hit = changed[(target["sprite"], target["back"])]
    assert hit["score"] == 0.0 and hit["success"] is False
    assert after["mean_score"] < before["mean_score"] == 1.0
    assert after["success_rate"] < 1.0
    others = [x for x in after["records"] if x["sprite"] != target["sprite"] and x["score"] is not None]
    assert others and all(x["score"] == 1.0 for x in others)


def test_a_blank_generation_recalls_nothing(clip):
    frames, meta = clip
    r = recall(np.full_like(frames[PREFIX:], 128), meta)
    assert r["revisits"] > 0 and r["mean_score"] == 0.0 and r["success_rate"] == 0.0


def test_no_revisit_in_range_is_none_not_a_number():
    frames, meta = render(0, 0, 12, SMALL.video, SMALL.world)   # sprite 3 is back at frame 12
    r = M.revisit_recall(frames[PREFIX:], meta[PREFIX:], SMALL, context_meta=meta[:PREFIX])
    assert r["records"] == [] and r["revisits"] == 0
    assert r["mean_score"] is None and r["success_rate"] is None
    assert "no sprite came back" in r["note"]


# --- drift ---------------------------------------------------------------------------------
# --- sprites on screen ---------------------------------------------------------------------
def sprite_free(frames, meta):
    """The frames with every sprite's box painted over by the pixel left of it."""
    out = frames.copy()
    for j, m in enumerate(meta):
        for s in m.sprites:
            if s.bbox is not None:
                x0, y0, x1, y1 = s.bbox
                out[j, y0:y1, x0:x1] = out[j, y0:y1, max(x0 - 1, 0)][:, None] if x0 else 0
    return out


def test_vivid_pixels_are_the_sprites_pixels(clip):
    """The world's backgrounds and landmarks have no vivid pixel; its sprites are vivid."""
    frames, meta = clip
    vivid = M.vivid_fraction(frames)
    assert vivid.shape == (96,) and vivid.max() > 0.005
    assert M.vivid_fraction(sprite_free(frames, meta)).max() == 0.0
    in_view = np.array([any(s.visible for s in m.sprites) for m in meta])
    mostly_in_view = np.isfinite(M.sprite_visibility(frames, meta, SMALL))
    assert (vivid[~in_view] == 0).all() and (vivid[mostly_in_view] > 0).all()
    assert M.vivid_fraction(np.full_like(frames, 128)).max() == 0.0


def test_sprite_visibility_of_the_truth_is_one_and_of_sprite_free_frames_zero(clip):
    frames, meta = clip
    truth = M.sprite_visibility(frames, meta, SMALL, distance=0.5)
    scored = np.isfinite(truth)
    assert scored.sum() > 48 and (truth[scored] == 1.0).all()
    gone = M.sprite_visibility(sprite_free(frames, meta), meta, SMALL)
    assert (np.isfinite(gone) == scored).all() and (gone[scored] == 0.0).all()
    # frames a few steps out of step show the sprites where they were, not where they are
    late = M.sprite_visibility(np.roll(frames, 8, axis=0), meta, SMALL)
    assert np.nanmean(late) < 0.5
    with pytest.raises(ValueError, match="metadata entries"):
        M.sprite_visibility(frames[:5], meta[:4], SMALL)


def test_gap_similarity_of_a_static_video_is_maximal(clip):
    frames, _ = clip
    static = np.repeat(frames[:1], 30, axis=0)
    g = M.gap_similarity(static)
    assert list(g) == [2, 5, 10, 20]                            # gap 50 does not fit 30 frames
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in g.values())
    moving = M.gap_similarity(frames[:30])
    assert all(moving[k] < g[k] for k in moving)
    assert np.isposinf(list(M.gap_similarity(static, (3,), metric="psnr").values())).all()


def test_histogram_distance_and_frame_stats(clip):
    frames, _ = clip
    np.testing.assert_array_equal(M.color_histogram_distance(frames, frames), 0.0)
    black, white = np.zeros((2, 8, 8, 3), np.uint8), np.full((2, 8, 8, 3), 255, np.uint8)
    np.testing.assert_allclose(M.color_histogram_distance(black, white), 1.0)
    d = M.color_histogram_distance(frames[:10], noisy(frames[:10], 30))
    assert ((d > 0) & (d < 1)).all()
    assert np.allclose(M.color_histograms(frames[:3]).sum(-1), 1.0)
    stats = M.frame_stats(white)
    assert stats["mean"].shape == (2, 3)
    np.testing.assert_allclose(stats["mean"], 1.0)
    np.testing.assert_allclose(stats["std"], 0.0)


# --- confidence intervals ------------------------------------------------------------------
def test_interval_of_constant_values_has_zero_width():
    ci = M.confidence_interval([3.5] * 6)
    assert ci == (3.5, 0.0, 6) and ci.low == ci.high == 3.5
    assert math.isnan(M.confidence_interval([1.0]).half_width)
    assert math.isnan(M.confidence_interval([1.0, math.inf]).half_width)
    with pytest.raises(ValueError):
        M.confidence_interval([])


def test_interval_contains_the_true_mean_most_of_the_time():
    rng = np.random.default_rng(0)
    hits = [M.confidence_interval(rng.normal(10, 3, size=5)) for _ in range(400)]
    coverage = np.mean([ci.low <= 10 <= ci.high for ci in hits])
    assert 0.9 <= coverage <= 0.99                              # 95% nominal


@pytest.mark.parametrize("df,level,expected", [(1, 0.95, 12.706), (2, 0.95, 4.303),
                                               (3, 0.95, 3.182), (7, 0.95, 2.365),
                                               (30, 0.95, 2.042), (3, 0.99, 5.841)])
def test_t_quantiles_match_the_table(df, level, expected):
    assert M.t_quantile(level, df) == pytest.approx(expected, abs=1e-3)
    assert M._t_central(expected, df) == pytest.approx(level, abs=1e-4)   # scipy-free path
