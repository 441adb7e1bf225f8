"""Per-frame metrics of a generated continuation against the true one (the procedural world
renders it to any length), for `models/evaluate.py`.

    psnr = psnr_per_frame(gen, truth)                  # [N] dB; identical frames -> inf
    ssim = ssim_per_frame(gen, truth)                  # [N] in [-1, 1]; identical -> 1
    recall = revisit_recall(gen, truth_meta, cfg, context_meta=prefix_meta)
    recall["mean_score"], recall["success_rate"]       # None when no revisit is in range
    frame_stats(gen)["mean"]                           # [N, C] in [0, 1]
    color_histogram_distance(gen, truth)               # [N] in [0, 1]; identical -> 0
    gap_similarity(gen)                                # {gap: mean SSIM of frames t, t + gap}
    vivid_fraction(gen)                                # [N] share of sprite-coloured pixels
    sprite_visibility(gen, truth_meta, cfg)            # [N] sprites drawn where they are; nan: none in view
    confidence_interval(values)                        # Interval(mean, half_width, n)

Videos are uint8 numpy arrays [N, H, W, C] (what `models.world.render` and
`models.data.to_uint8` give). PSNR and SSIM come from torchmetrics when it is installed,
else from scikit-image (`METRIC_BACKEND` says which); both compute on [0, 1] floats with
data_range 1.0 and the Gaussian-weighted SSIM of Wang et al. (sigma 1.5, 11 taps), so
numbers are comparable with the literature. PSNR is the same in both; SSIM is not (they treat
the borders differently: a few percent at 64x64, much more at 16x16), so compare SSIM only
between runs with the same backend (metrics.json records it).

Identity recall on revisits uses the world's metadata only (no truth pixels): for every
sprite that left the view and came back within the evaluated frames, the generated frame's
pixels where the truth shows that sprite's solid colour (the shape's fully covered pixels
inside its box, minus the boxes of sprites drawn after it, i.e. on top) are compared with
the sprite's true colour. A frame's score is the fraction of those pixels within
`RECALL_DISTANCE` (Euclidean RGB distance, uint8 units) of the colour; a revisit's score is
the mean over the frames of the sprite's stay in view after it came back; it succeeds when
that score is at least `RECALL_SUCCESS`.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .config import VideoConfig, WorldConfig
from .world import FrameMeta, _shape_alpha

try:  # torchmetrics is the project's choice; scikit-image is accepted in its place
    import torchmetrics as _tm
    from torchmetrics.functional.image import peak_signal_noise_ratio as _tm_psnr
    from torchmetrics.functional.image import (
        structural_similarity_index_measure as _tm_ssim,
    )
    METRIC_BACKEND = f"torchmetrics {_tm.__version__}"
except ImportError:  # pragma: no cover - depends on the environment
    _tm_psnr = _tm_ssim = None
    try:
        import skimage
        from skimage.metrics import peak_signal_noise_ratio as _sk_psnr
        from skimage.metrics import structural_similarity as _sk_ssim
        METRIC_BACKEND = f"scikit-image {skimage.__version__}"
    except ImportError:
        _sk_psnr = _sk_ssim = None
        METRIC_BACKEND = None

RECALL_DISTANCE = 64.0    # a pixel "shows the sprite's colour" within this RGB distance (of 441)
RECALL_SUCCESS = 0.5      # a revisit succeeds when at least half its pixels show the colour
RECALL_MIN_VISIBLE = 0.5  # a frame is scored when this fraction of the sprite's solid pixels
                          # is in view and not covered by a later-drawn sprite's box
SSIM_SIGMA, SSIM_WINDOW = 1.5, 11     # Wang et al.'s Gaussian window (torchmetrics' default)
BATCH = 64                # frames per torchmetrics call (bounds memory on long videos)


class MetricsUnavailable(ImportError):
    """Neither torchmetrics nor scikit-image is installed."""


def _need_backend() -> None:
    if METRIC_BACKEND is None:
        raise MetricsUnavailable("PSNR/SSIM need torchmetrics (pip install 'torchmetrics>=1.0') "
                                 "or scikit-image")


# --- inputs --------------------------------------------------------------------------------
def _video(v, what: str) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype != np.uint8 or v.ndim != 4:
        raise ValueError(f"{what}: expected a uint8 video [N, H, W, C], got {v.dtype} "
                         f"{list(v.shape)}")
    return v


def _pair(gen, truth) -> tuple[np.ndarray, np.ndarray]:
    gen, truth = _video(gen, "gen"), _video(truth, "truth")
    if gen.shape != truth.shape:
        raise ValueError(f"gen {list(gen.shape)} and truth {list(truth.shape)} differ in shape")
    return gen, truth


def _unit(v: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(v)).permute(0, 3, 1, 2).float() / 255


def _window(h: int, w: int, largest: int) -> int:
    """The largest odd window <= `largest` that fits the frame."""
    size = min(largest, h, w)
    return size if size % 2 else size - 1


# --- fidelity ------------------------------------------------------------------------------
def psnr_per_frame(gen, truth) -> np.ndarray:
    """PSNR (dB) of each frame, float64 [N]; identical frames give inf."""
    gen, truth = _pair(gen, truth)
    _need_backend()
    if _tm_psnr is not None:
        out = [_tm_psnr(_unit(gen[i:i + BATCH]), _unit(truth[i:i + BATCH]), data_range=1.0,
                        reduction="none", dim=(1, 2, 3)) for i in range(0, len(gen), BATCH)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)
    with np.errstate(divide="ignore"):   # identical frames: inf, as intended
        return np.array([_sk_psnr(t.astype(np.float64) / 255, g.astype(np.float64) / 255,
                                  data_range=1.0) for g, t in zip(gen, truth)], np.float64)


def ssim_per_frame(gen, truth) -> np.ndarray:
    """SSIM of each frame (channels averaged), float64 [N]; identical frames give 1."""
    gen, truth = _pair(gen, truth)
    _need_backend()
    if len(gen) == 0:
        return np.zeros(0)
    h, w = gen.shape[1:3]
    if _tm_ssim is not None:
        k = _window(h, w, SSIM_WINDOW)
        out = [_tm_ssim(_unit(gen[i:i + BATCH]), _unit(truth[i:i + BATCH]), data_range=1.0,
                        kernel_size=k, sigma=SSIM_SIGMA, reduction="none")
               for i in range(0, len(gen), BATCH)]
        return torch.cat(out).double().numpy()
    k = _window(h, w, SSIM_WINDOW)   # Gaussian weights truncated at 3.5 sigma: 11 taps
    return np.array([_sk_ssim(t.astype(np.float64) / 255, g.astype(np.float64) / 255,
                              data_range=1.0, channel_axis=-1, gaussian_weights=True,
                              sigma=SSIM_SIGMA, win_size=k, use_sample_covariance=False)
                     for g, t in zip(gen, truth)], np.float64)


# --- identity recall on revisits -----------------------------------------------------------
def _configs(video_cfg) -> tuple[VideoConfig, Optional[WorldConfig]]:
    """A VideoConfig, or a whole Config (its video and world sections)."""
    if hasattr(video_cfg, "video"):
        return video_cfg.video, getattr(video_cfg, "world", None)
    return video_cfg, None


def _sprite_size(metas: Sequence[FrameMeta], video: VideoConfig) -> int:
    """The sprites' side in pixels, read off a box not clipped at the right (or bottom) edge
    of the view: there x1 = (position - camera) + size. The metadata holds clipped boxes only."""
    for m in metas:
        cx, cy = m.camera
        for s in m.sprites:
            if s.bbox is not None:
                _, _, x1, y1 = s.bbox
                if x1 < video.width:
                    return x1 - (s.position[0] - cx)
                if y1 < video.height:
                    return y1 - (s.position[1] - cy)
    raise ValueError("revisit_recall: no sprite box in the metadata shows the sprite size; "
                     "pass the world config (a Config, or world=...)")


def _solid(shape: str, size: int, cache: dict) -> np.ndarray:
    """The pixels of the shape's box that are fully covered (where the true frame shows the
    sprite's exact colour); the most covered ones when no pixel is fully covered."""
    if shape not in cache:
        alpha = _shape_alpha(shape, size)
        solid = alpha >= 1 - 1e-6
        cache[shape] = solid if solid.any() else alpha >= alpha.max()
    return cache[shape]


def _scored_pixels(meta: FrameMeta, k: int, size: int, video: VideoConfig,
                   cache: dict) -> tuple[np.ndarray, int]:
    """(view-sized mask of sprite k's solid pixels that are in view and not under a later
    sprite's box, the number of solid pixels of the whole shape)."""
    s = meta.sprites[k]
    solid = _solid(s.shape, size, cache)
    mask = np.zeros((video.height, video.width), bool)
    if s.bbox is None:
        return mask, int(solid.sum())
    x0, y0, x1, y1 = s.bbox
    vx, vy = s.position[0] - meta.camera[0], s.position[1] - meta.camera[1]
    mask[y0:y1, x0:x1] = solid[y0 - vy:y1 - vy, x0 - vx:x1 - vx]
    for later in meta.sprites[k + 1:]:          # drawn after k: on top of it
        if later.bbox is not None:
            a0, b0, a1, b1 = later.bbox
            mask[b0:b1, a0:a1] = False
    return mask, int(solid.sum())


def _sprite_score(frame: np.ndarray, meta: FrameMeta, k: int, size: int, video: VideoConfig,
                  cache: dict, distance: float, min_visible: float) -> Optional[float]:
    """The fraction of sprite k's scored pixels (`_scored_pixels`) that `frame` shows within
    `distance` of its colour; None when fewer than `min_visible` of its solid pixels are in
    view and unoccluded."""
    mask, total = _scored_pixels(meta, k, size, video, cache)
    n = int(mask.sum())
    if not n or n < min_visible * total:
        return None
    pixels = frame[mask].astype(np.float64)
    color = np.asarray(meta.sprites[k].color, np.float64)
    return float((np.linalg.norm(pixels - color, axis=-1) <= distance).mean())


def _sprite_side(world: Optional[WorldConfig], metas: Sequence[FrameMeta], video: VideoConfig) -> int:
    """The sprites' side in pixels: the world config's, else read off the metadata."""
    if world is not None:
        return world.sprite_size
    return _sprite_size(metas, video) if metas else 0


def _find_revisits(metas: Sequence[FrameMeta]) -> list[tuple[int, int, int, bool]]:
    """(sprite position in the frame's list, left, back): list positions in `metas` of the
    absences that ended within them; the rule of `models.world.revisits`."""
    seen, left, out = set(), {}, []
    for j, m in enumerate(metas):
        for k, s in enumerate(m.sprites):
            if s.visible:
                if k in left:
                    out.append((k, left.pop(k), j))
                seen.add(k)
            elif k in seen and k not in left:
                left[k] = j
    return out


def _check_scored_frames(fn: str, gen: np.ndarray, metas: list, video: VideoConfig,
                         min_visible: float) -> None:
    """The checks of the sprite scores: one metadata entry per frame, the config's view, a
    fraction for `min_visible`."""
    if len(metas) != len(gen):
        raise ValueError(f"{fn}: {len(gen)} generated frames but {len(metas)} metadata entries")
    if gen.shape[1:3] != (video.height, video.width):
        raise ValueError(f"{fn}: frames {list(gen.shape[1:3])} but the config's view is "
                         f"{[video.height, video.width]}")
    if not 0 < min_visible <= 1:
        raise ValueError(f"min_visible = {min_visible}: expected a fraction in (0, 1]")


def revisit_recall(gen, truth_meta: Sequence[FrameMeta], video_cfg, *,
                   context_meta: Sequence[FrameMeta] = (), world: Optional[WorldConfig] = None,
                   distance: float = RECALL_DISTANCE, success: float = RECALL_SUCCESS,
                   min_visible: float = RECALL_MIN_VISIBLE, min_absence: int = 1,
                   frames_after: Optional[int] = None) -> dict:
    """Identity recall of sprites that leave the view and come back.

    `gen` [N, H, W, 3] uint8 are the generated frames whose true metadata is `truth_meta`
    (N entries, in order); `context_meta` is the metadata of the frames before them (the
    prefix the model was given): a sprite seen there and back within `truth_meta` is a
    revisit too. `video_cfg` is a VideoConfig or a whole Config; the sprite size comes from
    `world` or the Config, else from the metadata.

    A revisit is a (left, back) pair as in `models.world.revisits` with `back` among the
    evaluated frames and at least `min_absence` frames out of view. Its frames are `back`
    and the following ones while the sprite stays in view (at most `frames_after` of them
    when given); a frame is scored when at least `min_visible` of the sprite's solid pixels
    are in view and not under a later-drawn sprite's box (occluded or mostly out of view
    otherwise). Frame score: the fraction of those pixels of `gen` within `distance`
    (Euclidean, uint8 RGB) of the sprite's colour.

    Returns {"records": [one dict per revisit: sprite, shape, color, left, back, absence
    (frame indices from the metadata), seen_in_context, frames, frame_scores, score (None
    when no frame could be scored), success], "revisits": number with a score, "mean_score",
    "success_rate" (None when no revisit is scored: there is nothing to measure, not a
    zero), the same three for the revisits of sprites seen in the context ("context_*"),
    "unscored": revisits whose frames were all occluded, and "note"}.
    """
    gen = _video(gen, "gen")
    video, world_cfg = _configs(video_cfg)
    world = world or world_cfg
    truth_meta, context_meta = list(truth_meta), list(context_meta)
    _check_scored_frames("revisit_recall", gen, truth_meta, video, min_visible)
    metas = context_meta + truth_meta
    offset = len(context_meta)
    size = _sprite_side(world, metas, video)
    cache: dict = {}
    records = []
    for k, left, back in _find_revisits(metas):
        if back < offset or back - left < min_absence:
            continue
        s = metas[back].sprites[k]
        frames, scores = [], []
        j = back
        while j < len(metas) and metas[j].sprites[k].visible and (
                frames_after is None or j - back < frames_after):
            score = _sprite_score(gen[j - offset], metas[j], k, size, video, cache, distance,
                                  min_visible)
            if score is not None:
                frames.append(metas[j].index)
                scores.append(score)
            j += 1
        score = float(np.mean(scores)) if scores else None
        records.append({
            "sprite": s.id, "shape": s.shape, "color": list(s.color),
            "left": metas[left].index, "back": metas[back].index,
            "absence": metas[back].index - metas[left].index,
            "seen_in_context": any(m.sprites[k].visible for m in metas[:min(left, offset)]),
            "frames": frames, "frame_scores": scores, "score": score,
            "success": None if score is None else bool(score >= success)})
    out = {"records": records, **_summary(records, ""),
           **_summary([r for r in records if r["seen_in_context"]], "context_"),
           "unscored": sum(r["score"] is None for r in records)}
    out["note"] = ("no sprite came back into view within the evaluated frames"
                   if not records else
                   "every revisit was occluded or mostly out of view" if not out["revisits"]
                   else f"{out['revisits']} revisits scored")
    return out


def _summary(records: list[dict], prefix: str) -> dict:
    scored = [r for r in records if r["score"] is not None]
    return {f"{prefix}revisits": len(scored),
            f"{prefix}mean_score": float(np.mean([r["score"] for r in scored])) if scored else None,
            f"{prefix}success_rate": (float(np.mean([r["success"] for r in scored]))
                                      if scored else None)}


# --- sprites on screen ------------------------------------------------------------------------
# The world's sprites are drawn at full saturation and value; its backgrounds and landmarks
# are muted (saturation <= 0.45), so "vivid" pixels are sprite pixels, in any frame.
VIVID_SATURATION = 0.7
VIVID_VALUE = 0.6


def vivid_fraction(video) -> np.ndarray:
    """Per frame, the fraction of pixels with HSV saturation >= VIVID_SATURATION and value
    >= VIVID_VALUE: float64 [N]. It needs no truth: a generator that keeps drawing sprites
    keeps it near the true video's, one that loses them drops it to 0 (PSNR, which rewards
    the blur of a mean prediction, does not see this)."""
    v = _video(video, "video").astype(np.float64) / 255
    hi, lo = v.max(axis=-1), v.min(axis=-1)
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0.0)
    return ((saturation >= VIVID_SATURATION) & (hi >= VIVID_VALUE)).mean(axis=(1, 2))


def sprite_visibility(gen, truth_meta: Sequence[FrameMeta], video_cfg, *,
                      world: Optional[WorldConfig] = None, distance: float = RECALL_DISTANCE,
                      min_visible: float = RECALL_MIN_VISIBLE) -> np.ndarray:
    """Per frame, the mean over the sprites in view of the fraction of each one's solid
    pixels that `gen` shows in its colour (within `distance`, uint8 RGB), where the truth
    has it: float64 [N], NaN for frames with no sprite at least `min_visible` in view and
    unoccluded. The scoring of `revisit_recall`, applied to every sprite at every frame:
    1 when the generator draws every sprite where the world has it."""
    gen = _video(gen, "gen")
    video, world_cfg = _configs(video_cfg)
    world = world or world_cfg
    metas = list(truth_meta)
    _check_scored_frames("sprite_visibility", gen, metas, video, min_visible)
    size = _sprite_side(world, metas, video)
    cache: dict = {}
    out = np.full(len(metas), np.nan)
    for j, m in enumerate(metas):
        scores = [_sprite_score(gen[j], m, k, size, video, cache, distance, min_visible)
                  for k, s in enumerate(m.sprites) if s.visible]
        scores = [x for x in scores if x is not None]
        if scores:
            out[j] = float(np.mean(scores))
    return out


# --- drift -----------------------------------------------------------------------------------
def frame_stats(video) -> dict[str, np.ndarray]:
    """Per frame and channel: {"mean": [N, C], "std": [N, C]}, in [0, 1] units."""
    v = _video(video, "video").astype(np.float64) / 255
    return {"mean": v.mean(axis=(1, 2)), "std": v.std(axis=(1, 2))}


def color_histograms(video, bins: int = 8) -> np.ndarray:
    """Normalised per-channel histograms, float64 [N, C, bins] (each row sums to 1)."""
    v = _video(video, "video")
    if not 1 <= bins <= 256:
        raise ValueError(f"bins = {bins}: expected 1..256")
    N, H, W, C = v.shape
    idx = (v.astype(np.int64) * bins) >> 8                       # [N, H, W, C] in [0, bins)
    flat = (np.arange(N)[:, None, None, None] * C + np.arange(C)) * bins + idx
    counts = np.bincount(flat.ravel(), minlength=N * C * bins).reshape(N, C, bins)
    return counts / float(H * W)


def color_histogram_distance(gen, truth, bins: int = 8) -> np.ndarray:
    """Per frame, the total-variation distance (half the L1) between the normalised
    `bins`-bin histograms of gen and truth, averaged over channels: float64 [N] in [0, 1];
    0 for identical colour distributions, 1 for disjoint ones."""
    gen, truth = _pair(gen, truth)
    diff = np.abs(color_histograms(gen, bins) - color_histograms(truth, bins))
    return 0.5 * diff.sum(axis=-1).mean(axis=-1)


def gap_similarity(video, gaps: Iterable[int] = (2, 5, 10, 20, 50),
                   metric: str = "ssim") -> dict[int, float]:
    """{gap: mean over t of SSIM (or PSNR, `metric="psnr"`) between frames t and t + gap},
    for the gaps shorter than the video. A static video scores the maximum (SSIM 1, PSNR
    inf); a video that keeps changing scores lower at long gaps than at short ones, so a
    generated video's curve against the truth's shows freezing or drift."""
    v = _video(video, "video")
    fn = {"ssim": ssim_per_frame, "psnr": psnr_per_frame}.get(metric)
    if fn is None:
        raise ValueError(f"metric = {metric!r}: expected 'ssim' or 'psnr'")
    out = {}
    for gap in gaps:
        gap = int(gap)
        if gap < 1:
            raise ValueError(f"gap = {gap}: expected >= 1")
        if gap < len(v):
            out[gap] = float(np.mean(fn(v[gap:], v[:-gap])))
    return out


# --- confidence intervals ------------------------------------------------------------------
class Interval(NamedTuple):
    """A mean and the half width of its confidence interval (nan when n < 2)."""
    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def confidence_interval(values, level: float = 0.95) -> Interval:
    """Mean +- the Student-t half width t_{(1+level)/2, n-1} * s / sqrt(n) (s the sample
    standard deviation): the interval for the mean of n independent draws (one per seed).

    The t quantile comes from scipy when it is installed, else from the exact closed form of
    the t distribution for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4),
    inverted by bisection: the same numbers to 1e-9. Non-finite values propagate (an inf
    PSNR makes the mean inf and the width nan); one value has no width (nan)."""
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.float64).ravel()
    if x.size == 0:
        raise ValueError("confidence_interval of no values")
    if not 0 < level < 1:
        raise ValueError(f"level = {level}: expected a probability in (0, 1)")
    n = int(x.size)
    with np.errstate(invalid="ignore"):
        mean = float(x.mean())
        if n < 2 or not np.isfinite(x).all():
            return Interval(mean, math.nan, n)
        sd = float(x.std(ddof=1))
    return Interval(mean, t_quantile(level, n - 1) * sd / math.sqrt(n) if sd > 0 else 0.0, n)


@functools.lru_cache(maxsize=256)
def t_quantile(level: float, df: int) -> float:
    """The t such that P(|T| <= t) = `level` for Student's T with `df` degrees of freedom
    (the two-sided critical value: 12.706 for df 1, 2.365 for df 7 at level 0.95)."""
    if df < 1:
        raise ValueError(f"df = {df}: expected >= 1")
    try:
        from scipy.stats import t as student_t
        return float(student_t.ppf(0.5 + level / 2, df))
    except ImportError:
        pass
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t), T Student's with integer `df` (Abramowitz & Stegun 26.7.3, 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:   # odd: (2/pi) (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...))
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    total, term = 0.0, 1.0   # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total
