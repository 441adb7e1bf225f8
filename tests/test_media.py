"""models/media.py: GIFs, strips and plots that read back as written."""
import sys

import numpy as np
import pytest
from PIL import Image

from models.media import compose, frame_strip, plot_curves, write_gif, write_mp4


def video(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_gif_reads_back_with_its_frames_and_size(tmp_path):
    path = write_gif(tmp_path / "a.gif", video(5, 8, 10), fps=10, scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (20, 16)
        assert im.info["loop"] == 0 and im.info["duration"] == 100
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]  # no temporary file left


def test_side_by_side_widths_add_up_and_short_videos_hold(tmp_path):
    a, b = video(3, 8, 8, seed=1), video(5, 6, 12, seed=2)
    path = write_gif(tmp_path / "ab.gif", [a, b], scale=2)
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (2 * 8 + 2 + 2 * 12, 2 * 8)
    frames = compose([a, b], scale=1)
    assert frames.shape == (5, 8, 8 + 2 + 12, 3)
    assert (frames[3:, :, :8] == a[-1]).all()        # the shorter video holds its last frame
    assert (frames[:, 6:, 10:] == 0).all()            # the lower one is padded with black
    assert (frames[:, :, 8:10] == 255).all()          # the separator


def test_labels_go_above_without_changing_the_width(tmp_path):
    plain = compose([video(2, 8, 8), video(2, 8, 8)], scale=2)
    labelled = compose([video(2, 8, 8), video(2, 8, 8)], scale=2, labels=["teacher", "a long label"])
    assert labelled.shape[2] == plain.shape[2] and labelled.shape[1] > plain.shape[1]
    assert (labelled[:, -16:] == plain).all()
    with pytest.raises(ValueError, match="1 labels for 2 videos"):
        compose([video(2, 8, 8), video(2, 8, 8)], labels=["x"])


def test_bad_video_is_refused():
    with pytest.raises(ValueError, match=r"video 0: expected a uint8 array \[T, H, W, 3\]"):
        compose(np.zeros((2, 8, 8, 3), np.float32))


def test_mp4_without_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="pip install imageio imageio-ffmpeg"):
        write_mp4(tmp_path / "a.mp4", video(3, 8, 8))


def test_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio
    path = write_mp4(tmp_path / "a.mp4", [video(4, 7, 7), video(4, 7, 8)], scale=1)
    frames = imageio.mimread(path)
    assert len(frames) == 4 and frames[0].shape == (8, 18, 3)  # padded to even sides


def test_frame_strip(tmp_path):
    path = frame_strip(tmp_path / "strip.png", video(9, 8, 10), every=4, scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 20 + 2 * 2, 16)  # frames 0, 4, 8


@pytest.mark.parametrize("curves", [
    {"loss": [(0, 1.0), (10, 0.5), (20, 0.25)], "val": [(0, 2.0), (20, 0.3)]},
    {"grad": [(0, -1.0), (1, 0.0), (2, float("nan"))]},   # not positive: a linear axis
    {},
])
def test_plot_curves_writes_a_png(tmp_path, curves):
    path = plot_curves(tmp_path / "loss.png", curves, title="teacher")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (700, 400)
