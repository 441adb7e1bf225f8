"""User videos as training clips: a folder of `.npy`, `.npz` or `.mp4` files.

    clips = VideoFolder("my_videos/", cfg)   # item: the dict of WorldClips, label 0
    clips.windows                            # [(file, first frame), ...] in item order

An array file holds [T, H, W, C] frames, uint8 or float in [0, 1], C = 3 (RGB) or 1 (gray,
repeated to RGB); an `.npz` file's array is the one named "video", else its first. Every file
is checked when the folder is opened (array files by their header only, without reading the
frames), so a bad file fails at once with a `ValueError` naming it, not in a DataLoader worker
hours later. Items resize to the config's height x width and map to [-1, 1].
"""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import Config

SUFFIXES = (".npy", ".npz", ".mp4")
INSTALL_HINT = "pip install imageio-ffmpeg imageio"


class VideoFileError(ValueError):
    """A video file that cannot be used; the message starts with its path."""

    def __init__(self, path: Path, problem: str):
        self.path = path
        super().__init__(f"{path}: {problem}")


class VideoFolder(Dataset):
    """Clips of `cfg.video.frames` frames from every video in `path` (not recursive), taken
    every `stride` frames (default: back to back); files in name order."""

    def __init__(self, path: Union[str, Path], cfg: Config, stride: Optional[int] = None):
        if cfg.video.channels != 3:
            raise ValueError(f"video.channels = {cfg.video.channels}: user videos are RGB; "
                             "set video.channels = 3")
        self.folder, self.cfg = Path(path), cfg
        self.stride = stride or cfg.video.frames
        if self.stride < 1:
            raise ValueError(f"VideoFolder: stride = {self.stride} must be >= 1")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such folder of videos")
        self.files = sorted(p for p in self.folder.iterdir()
                            if p.suffix.lower() in SUFFIXES and p.is_file())
        if not self.files:
            raise VideoFileError(self.folder, f"no video files ({', '.join(SUFFIXES)}) "
                                 "in this folder")
        self._npz_key: dict[Path, str] = {}
        self._decoded: dict[Path, np.ndarray] = {}
        self.windows: list[tuple[Path, int]] = []
        for file in self.files:
            length = self._scan(file)
            starts = range(0, length - cfg.video.frames + 1, self.stride)
            self.windows += [(file, s) for s in starts]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        file, start = self.windows[i]
        try:
            frames = self._frames(file)[start:start + self.cfg.video.frames]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:   # changed since opened
            raise VideoFileError(file, f"cannot read frames {start}+ ({e})") from None
        return {"video": self._to_model(file, frames), "label": torch.tensor(0, dtype=torch.int64),
                "seed": i, "start": start}

    # --- reading ------------------------------------------------------------------------
    def _scan(self, file: Path) -> int:
        """Check one file's shape and dtype; return its frame count."""
        clip = self.cfg.video.frames
        if file.suffix.lower() == ".mp4":
            # no cheap frame count for mp4 (the ffmpeg backend reports inf): decode it once
            # here and keep it at the model's size, which is small
            frames = _read_mp4(file)
            _check_shape(file, frames.shape, frames.dtype, clip)
            self._decoded[file] = self._resize_uint8(file, frames)
            return len(frames)
        if file.suffix.lower() == ".npy":
            shape, dtype = _npy_header(file)
        else:
            self._npz_key[file], shape, dtype = _npz_header(file)
        _check_shape(file, shape, dtype, clip)
        return shape[0]

    def _frames(self, file: Path) -> np.ndarray:
        if file in self._decoded:
            return self._decoded[file]
        if file in self._npz_key:
            with np.load(file) as archive:
                return archive[self._npz_key[file]]
        return np.load(file, mmap_mode="r")            # only the window's frames are read

    def _to_model(self, file: Path, frames: np.ndarray) -> torch.Tensor:
        """[T, h, w, C] uint8 or float in [0, 1] -> float32 [T, 3, H, W] in [-1, 1]."""
        x = torch.from_numpy(np.array(frames))
        if x.dtype == torch.uint8:
            x = x.float() / 255
        else:
            x = x.float()
            # floats are range-checked here, per clip: checking at open would read every frame
            if not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
                raise VideoFileError(file, "float frames must be finite and in [0, 1] "
                                     f"(found [{x.min().item():.3g}, {x.max().item():.3g}])")
        x = x.movedim(-1, 1).expand(-1, 3, -1, -1)     # gray (C = 1) repeats to RGB
        size = (self.cfg.video.height, self.cfg.video.width)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (x * 2 - 1).clamp(-1, 1).contiguous()

    def _resize_uint8(self, file: Path, frames: np.ndarray) -> np.ndarray:
        x = self._to_model(file, frames)
        return ((x + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()


def _check_shape(file: Path, shape: tuple, dtype: np.dtype, frames: int) -> None:
    if len(shape) != 4:
        raise VideoFileError(file, f"shape {tuple(shape)} has {len(shape)} dims; expected 4, "
                             "[frames, height, width, channels]")
    if shape[-1] not in (1, 3):
        raise VideoFileError(file, f"shape {tuple(shape)} has {shape[-1]} channels; expected 3 "
                             "(RGB) or 1 (gray)")
    if dtype != np.uint8 and dtype.kind != "f":
        raise VideoFileError(file, f"dtype {dtype}; expected uint8 or float in [0, 1]")
    if shape[1] < 1 or shape[2] < 1:
        raise VideoFileError(file, f"shape {tuple(shape)} has empty frames")
    if shape[0] < frames:
        raise VideoFileError(file, f"{shape[0]} frames, fewer than one clip "
                             f"(video.frames = {frames})")


def _npy_header(file: Path) -> tuple[tuple, np.dtype]:
    try:
        array = np.load(file, mmap_mode="r")           # maps the file; reads only the header
    except (OSError, ValueError, EOFError) as e:
        raise VideoFileError(file, f"not a readable .npy array ({e})") from None
    return array.shape, array.dtype


def _npz_header(file: Path) -> tuple[str, tuple, np.dtype]:
    """The chosen array's key, shape and dtype, from its .npy header inside the zip."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as e:
        raise VideoFileError(file, f"not a readable .npz archive ({e})") from None
    with archive:
        names = [n for n in archive.namelist() if n.endswith(".npy")]
        if not names:
            raise VideoFileError(file, "the .npz archive holds no arrays")
        name = "video.npy" if "video.npy" in names else names[0]
        try:
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise VideoFileError(file, f"array {name[:-4]!r} is not readable ({e})") from None
    return name[:-len(".npy")], shape, dtype


def _video_backend_available() -> bool:
    return importlib.util.find_spec("imageio") is not None and (
        importlib.util.find_spec("imageio_ffmpeg") is not None
        or importlib.util.find_spec("av") is not None)


def _read_mp4(file: Path) -> np.ndarray:
    if not _video_backend_available():
        raise ImportError(f"{file}: reading .mp4 needs imageio with an ffmpeg or pyav backend: "
                          f"{INSTALL_HINT}")
    import imageio.v3 as iio

    try:
        return np.asarray(iio.imread(file))
    except Exception as e:  # decoders raise many types (OSError, av errors, RuntimeError)
        raise VideoFileError(file, f"cannot decode the video ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
