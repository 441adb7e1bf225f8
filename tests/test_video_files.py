"""User videos (models/video_files.py): array files round-trip, resize to the config's size,
cut into deterministic windows, and every bad file or folder fails when the folder is opened
with an error that names it. The .mp4 path runs where imageio-ffmpeg is installed."""
import dataclasses
import io
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.utils.data import DataLoader

from models import video_files
from models.config import load_config
from models.data import to_uint8
from models.video_files import VideoFolder

TINY, SMALL = load_config("tiny"), load_config("small")
FRAMES = TINY.video.frames


def video(frames=FRAMES, height=16, width=16, channels=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, channels), np.uint8)


# --- reading -----------------------------------------------------------------------------
def test_npy_round_trip_at_the_config_size(tmp_path):
    frames = video()
    np.save(tmp_path / "a.npy", frames)
    item = VideoFolder(tmp_path, TINY)[0]
    assert item["video"].shape == (FRAMES, 3, 16, 16) and item["video"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].item() == 0
    assert (item["seed"], item["start"]) == (0, 0)
    assert np.array_equal(to_uint8(item["video"]), frames)


def test_float_frames_in_unit_range(tmp_path):
    frames = video()
    np.save(tmp_path / "a.npy", frames.astype(np.float32) / 255)
    assert np.array_equal(to_uint8(VideoFolder(tmp_path, TINY)[0]["video"]), frames)


def test_npz_takes_video_key_else_first_array(tmp_path):
    frames = video(seed=1)
    np.savez(tmp_path / "keyed.npz", other=np.zeros(3), video=frames)
    np.savez_compressed(tmp_path / "plain.npz", video(seed=2), np.zeros(3))
    clips = VideoFolder(tmp_path, TINY)
    assert [f.name for f, _ in clips.windows] == ["keyed.npz", "plain.npz"]
    assert np.array_equal(to_uint8(clips[0]["video"]), frames)
    assert np.array_equal(to_uint8(clips[1]["video"]), video(seed=2))


def test_gray_repeats_to_rgb(tmp_path):
    np.save(tmp_path / "g.npy", video(channels=1))
    v = VideoFolder(tmp_path, TINY)[0]["video"]
    assert v.shape[1] == 3 and torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2])


@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
@pytest.mark.parametrize("size", [(24, 40), (8, 12)], ids=["down", "up"])
def test_resize_to_the_config(tmp_path, cfg, size):
    frames = video(cfg.video.frames, *size)
    np.save(tmp_path / "v.npy", frames)
    got = VideoFolder(tmp_path, cfg)[0]["video"]
    x = torch.from_numpy(frames).float().movedim(-1, 1) / 255
    want = F.interpolate(x, size=(cfg.video.height, cfg.video.width), mode="bilinear",
                         antialias=True, align_corners=False) * 2 - 1
    assert got.shape == want.shape and torch.allclose(got, want.clamp(-1, 1), atol=1e-6)


def test_a_flat_colour_stays_flat_when_resized(tmp_path):
    frames = np.broadcast_to(np.array([200, 30, 90], np.uint8), (FRAMES, 37, 53, 3))
    np.save(tmp_path / "flat.npy", np.ascontiguousarray(frames))
    out = to_uint8(VideoFolder(tmp_path, TINY)[0]["video"]).astype(int)
    assert np.abs(out - [200, 30, 90]).max() <= 1


@given(length=st.integers(FRAMES, 3 * FRAMES), stride=st.none() | st.integers(1, 2 * FRAMES))
def test_windows_are_deterministic_and_complete(tmp_path_factory, length, stride):
    folder = tmp_path_factory.mktemp("w")
    np.save(folder / "b.npy", video(length))
    np.save(folder / "a.npy", video(FRAMES + 1, seed=3))
    clips = VideoFolder(folder, TINY, stride=stride)
    step = stride or FRAMES
    want = [("a.npy", s) for s in range(0, 2, step)] + \
           [("b.npy", s) for s in range(0, length - FRAMES + 1, step)]
    assert [(f.name, s) for f, s in clips.windows] == want and len(clips) == len(want)
    assert clips.windows == VideoFolder(folder, TINY, stride=stride).windows
    last = want[-1][1]
    assert np.array_equal(to_uint8(clips[-1]["video"]), video(length)[last:last + FRAMES])


def test_dataloader_workers_give_the_same_items(tmp_path):
    np.save(tmp_path / "a.npy", video(3 * FRAMES))
    clips = VideoFolder(tmp_path, TINY)
    batches = [list(DataLoader(clips, batch_size=2, num_workers=w)) for w in (0, 2)]
    for a, b in zip(*batches):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["start"], b["start"])


def test_unrelated_files_are_ignored(tmp_path):
    np.save(tmp_path / "a.npy", video())
    (tmp_path / "notes.txt").write_text("not a video")
    assert [f.name for f in VideoFolder(tmp_path, TINY).files] == ["a.npy"]


# --- errors ------------------------------------------------------------------------------
def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_zip_without_arrays(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "nothing here")


BAD_FILES = {
    "corrupt.npy": lambda p: p.write_bytes(b"\x93NUMPY garbage"),
    "truncated.npy": lambda p: p.write_bytes(npy_bytes(video())[:200]),
    "corrupt.npz": lambda p: p.write_bytes(b"PK not really a zip"),
    "empty.npz": write_zip_without_arrays,
    "dims.npy": lambda p: np.save(p, np.zeros((FRAMES, 16, 16), np.uint8)),
    "channels.npy": lambda p: np.save(p, np.zeros((FRAMES, 16, 16, 4), np.uint8)),
    "channels.npz": lambda p: np.savez(p, video=np.zeros((FRAMES, 16, 16, 2), np.uint8)),
    "short.npy": lambda p: np.save(p, video(FRAMES - 1)),
    "dtype.npy": lambda p: np.save(p, np.zeros((FRAMES, 16, 16, 3), np.int32)),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_named(tmp_path, name):
    np.save(tmp_path / "good.npy", video())
    BAD_FILES[name](tmp_path / name)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        VideoFolder(tmp_path, TINY)


def test_floats_out_of_range_are_named_when_read(tmp_path):
    np.save(tmp_path / "bright.npy", np.full((FRAMES, 16, 16, 3), 2.0, np.float32))
    clips = VideoFolder(tmp_path, TINY)
    with pytest.raises(ValueError, match=r"bright\.npy.*\[0, 1\]"):
        clips[0]


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoFolder(tmp_path / "nowhere", TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        VideoFolder(tmp_path / "empty", TINY)


def test_rgb_config_only(tmp_path):
    np.save(tmp_path / "a.npy", video())
    cfg = dataclasses.replace(TINY, video=dataclasses.replace(TINY.video, channels=1))
    with pytest.raises(ValueError, match="video.channels"):
        VideoFolder(tmp_path, cfg)


# --- mp4 ---------------------------------------------------------------------------------
def test_mp4_without_a_backend_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(video_files, "_video_backend_available", lambda: False)
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(ImportError, match=r"clip\.mp4.*pip install imageio-ffmpeg"):
        VideoFolder(tmp_path, TINY)


def test_mp4_round_trip(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    # smooth content survives lossy coding: a gradient that drifts frame by frame
    y, x = np.mgrid[0:32, 0:32]
    frames = np.stack([np.stack([x * 8, y * 8, np.full_like(x, 16 * t)], -1)
                       for t in range(2 * FRAMES)]).astype(np.uint8)
    iio.imwrite(tmp_path / "clip.mp4", frames, fps=10, macro_block_size=1)
    clips = VideoFolder(tmp_path, TINY)
    assert [s for _, s in clips.windows] == [0, FRAMES]
    got = to_uint8(clips[1]["video"]).astype(int)
    x = torch.from_numpy(frames[FRAMES:]).float().movedim(-1, 1)
    want = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True).movedim(1, -1).numpy()
    assert np.abs(got - want).mean() < 8


def test_corrupt_mp4_is_named(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    with pytest.raises(ValueError, match=r"broken\.mp4"):
        VideoFolder(tmp_path, TINY)
