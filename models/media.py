"""Pictures people look at: sample videos as GIF/MP4, frame strips, loss curves.

Videos are uint8 arrays [T, H, W, 3] (numpy, or anything `np.asarray` takes). Several videos
are shown side by side, each optionally labelled. Every file is written atomically, so a viewer
refreshing during training never sees half a picture.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.checkpoint import atomic_path

SEPARATOR = 2              # pixels between side-by-side videos (after scaling)
SEPARATOR_COLOR = 255      # white
LABEL_PAD = 2              # pixels around a label's text

Videos = Union[np.ndarray, Sequence[np.ndarray]]


def _as_video(v, i: int) -> np.ndarray:
    v = np.asarray(v)
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] == 0:
        raise ValueError(f"video {i}: expected a uint8 array [T, H, W, 3] with T >= 1, "
                         f"got {v.dtype} {list(v.shape)}")
    return v


def _label_band(text: str, width: int, height: int) -> np.ndarray:
    band = Image.new("RGB", (width, height), (0, 0, 0))  # text past `width` is clipped here
    ImageDraw.Draw(band).text((LABEL_PAD, LABEL_PAD), text, fill=(255, 255, 255),
                              font=ImageFont.load_default())
    return np.asarray(band)


def compose(videos: Videos, scale: int = 2, labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """The frames of `videos` side by side: uint8 [T, H', W', 3], T the longest video's length.

    Shorter videos hold their last frame; shorter heights are padded with black below; each
    video is upscaled `scale` times (nearest neighbour) and labelled above when `labels` is given.
    """
    if not isinstance(videos, (list, tuple)):  # one video, or a batch [N, T, H, W, 3]
        videos = np.asarray(videos)
        videos = [videos] if videos.ndim == 4 else list(videos)
    videos = [_as_video(v, i) for i, v in enumerate(videos)]
    if not videos:
        raise ValueError("no video to show")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{len(labels)} labels for {len(videos)} videos")
    if scale < 1:
        raise ValueError(f"scale = {scale}: must be >= 1")
    frames = max(v.shape[0] for v in videos)
    height = max(v.shape[1] for v in videos) * scale
    label_h = 0
    if labels is not None:
        font = ImageFont.load_default()
        label_h = max(font.getbbox(t or " ")[3] for t in labels) + 2 * LABEL_PAD
    columns = []
    for i, v in enumerate(videos):
        v = np.concatenate([v, np.repeat(v[-1:], frames - v.shape[0], axis=0)])
        v = v.repeat(scale, axis=1).repeat(scale, axis=2)
        column = np.zeros((frames, label_h + height, v.shape[2], 3), np.uint8)
        column[:, label_h:label_h + v.shape[1]] = v
        if labels is not None:
            column[:, :label_h] = _label_band(labels[i], v.shape[2], label_h)
        if i:
            columns.append(np.full((frames, label_h + height, SEPARATOR, 3), SEPARATOR_COLOR, np.uint8))
        columns.append(column)
    return np.concatenate(columns, axis=2)


def write_gif(path: Union[str, Path], videos: Videos, fps: float = 8, scale: int = 2,
              labels: Optional[Sequence[str]] = None) -> Path:
    """An endlessly looping GIF of `videos` side by side (see `compose`).

    GIF stores frame times in 1/100 s, and identical consecutive frames are merged into one
    longer frame, so playback is what was asked but the frame count may be lower.
    """
    frames = [Image.fromarray(f) for f in compose(videos, scale, labels)]
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=round(1000 / fps), loop=0)
    return path


def write_mp4(path: Union[str, Path], videos: Videos, fps: float = 8, scale: int = 2,
              labels: Optional[Sequence[str]] = None) -> Path:
    """An H.264 MP4 of `videos` side by side; needs imageio-ffmpeg (RuntimeError without it)."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the encoder imageio drives)
    except ImportError:
        raise RuntimeError("writing MP4 needs imageio and its ffmpeg: pip install imageio "
                           "imageio-ffmpeg (or write a GIF instead)") from None
    frames = compose(videos, scale, labels)
    # yuv420p, which every player decodes, needs even sides
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    path = Path(path)
    with atomic_path(path) as tmp:
        imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", pixelformat="yuv420p",
                         macro_block_size=1)
    return path


def frame_strip(path: Union[str, Path], video: np.ndarray, every: int = 4, scale: int = 2) -> Path:
    """A PNG of frames 0, every, 2*every, ... of one video in a row."""
    video = _as_video(video, 0)
    if every < 1:
        raise ValueError(f"every = {every}: must be >= 1")
    picked = video[::every]
    strip = compose([f[None] for f in picked], scale)[0]
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    return path


def plot_curves(path: Union[str, Path], curves: dict[str, Sequence[tuple[int, float]]],
                title: str = "", logy: bool = True) -> Path:
    """A PNG with one line per curve, x = step. The y axis is logarithmic when `logy` and every
    finite value is positive (a log axis would silently drop the others)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # Agg directly: no pyplot state, no display needed
    ax = fig.add_subplot()
    values = []
    for name, points in curves.items():
        if points:
            steps, ys = zip(*points)
            ax.plot(steps, ys, label=name, linewidth=1.2)
            values += [y for y in ys if math.isfinite(y)]
    if logy and values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
