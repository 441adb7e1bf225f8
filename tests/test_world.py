"""The procedural world (models/world.py) and its clip dataset (models/data.py).

Rendering is deterministic and O(1) per frame (a range equals a slice of a longer render);
the background is textured and differs between places; sprites move; the metadata agrees
with the pixels; the camera comes back, so sprites leave the view and re-enter it; the
dataset is the renderer seen through [-1, 1] tensors and gives the same items in workers.
"""
import dataclasses
import time

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils.data import DataLoader

from models.config import load_config
from models.data import WorldClips, clip_start, from_uint8, to_uint8
from models.world import SHAPES, World, label, render, revisits, visible_sprites

TINY, SMALL = load_config("tiny"), load_config("small")
CONFIGS = pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
seeds = st.integers(0, 2**32 - 1)


def background_view(world: World, t: int) -> np.ndarray:
    """What frame t shows without sprites, as uint8."""
    (cx, cy), v = world.camera(t), world.video
    return (world.background[cy:cy + v.height, cx:cx + v.width] * 255 + 0.5).astype(np.uint8)


# --- rendering ---------------------------------------------------------------------------
@CONFIGS
def test_shapes_dtype_and_metadata_layout(cfg):
    frames, meta = render(3, 5, 7, cfg.video, cfg.world)
    assert frames.shape == (7, cfg.video.height, cfg.video.width, 3) and frames.dtype == np.uint8
    assert [m.index for m in meta] == list(range(5, 12))
    for m in meta:
        assert len(m.sprites) == cfg.world.num_sprites
        for s in m.sprites:
            assert s.shape in SHAPES and s.visible == (s.bbox is not None)
            if s.bbox is not None:
                x0, y0, x1, y1 = s.bbox
                assert 0 <= x0 < x1 <= cfg.video.width and 0 <= y0 < y1 <= cfg.video.height
        assert visible_sprites(m) == tuple(s for s in m.sprites if s.bbox is not None)


@CONFIGS
def test_deterministic_per_seed(cfg):
    a, meta_a = render(11, 0, 12, cfg.video, cfg.world)
    b, meta_b = render(11, 0, 12, cfg.video, cfg.world)
    assert np.array_equal(a, b) and meta_a == meta_b


@CONFIGS
@given(seed=seeds, start=st.integers(0, 150), n=st.integers(0, 5))
def test_range_equals_slice_of_longer_render(cfg, seed, start, n):
    frames, meta = render(seed, start, n, cfg.video, cfg.world)
    full, full_meta = render(seed, 0, start + n, cfg.video, cfg.world)
    assert np.array_equal(frames, full[start:]) and meta == full_meta[start:]


@given(a=seeds, b=seeds)
def test_different_seeds_differ(a, b):
    if a == b:
        return
    fa, _ = render(a, 0, 3, TINY.video, TINY.world)
    fb, _ = render(b, 0, 3, TINY.video, TINY.world)
    assert not np.array_equal(fa, fb)


@CONFIGS
@pytest.mark.parametrize("seed", range(8))
def test_background_is_textured_and_places_differ(cfg, seed):
    world = World(seed, cfg.video, cfg.world)
    frame = world.frame(0).astype(np.float64)
    assert frame.std(axis=(0, 1)).mean() > 8            # not a flat colour
    # the two ends of the pan: camera x at 0 (phase 0) and at its maximum (half a period)
    t0 = -world.camera_phase % cfg.world.camera_period
    t1 = t0 + cfg.world.camera_period // 2
    assert world.camera(t0)[0] == 0
    assert world.camera(t1)[0] == world.scene_width - cfg.video.width
    diff = np.abs(background_view(world, t0).astype(int) - background_view(world, t1)).mean()
    assert diff > 8


def test_labels_pick_the_style():
    assert [label(s, TINY.world) for s in range(5)] == [s % TINY.world.num_classes
                                                        for s in range(5)]
    # same label, same palette family: mean colours of two worlds of one class are closer
    # than those of the other class
    mean = [World(s, SMALL.video, SMALL.world).background.mean(axis=(0, 1)) for s in (0, 4, 2)]
    assert np.abs(mean[0] - mean[1]).sum() < np.abs(mean[0] - mean[2]).sum()


@CONFIGS
@given(seed=seeds)
def test_sprites_move(cfg, seed):
    world = World(seed, cfg.video, cfg.world)
    positions = np.stack([world.positions(t) for t in range(12)])      # [t, sprite, xy]
    for k in range(cfg.world.num_sprites):
        assert len({tuple(p) for p in positions[:, k]}) > 1


@CONFIGS
@given(seed=seeds, t=st.integers(0, 500))
def test_metadata_agrees_with_pixels(cfg, seed, t):
    world = World(seed, cfg.video, cfg.world)
    frame, meta = world.frame(t), world.meta(t)
    size = cfg.world.sprite_size
    covered = np.zeros(frame.shape[:2], bool)
    # back to front: a sprite's box centre shows its colour unless a later sprite covers it
    for s in reversed(meta.sprites):
        if s.bbox is None:
            continue
        x0, y0, x1, y1 = s.bbox
        cx, cy = meta.camera
        assert (x0, y0) == (max(s.position[0] - cx, 0), max(s.position[1] - cy, 0))
        if x1 - x0 == size and y1 - y0 == size and not covered[y0 + size // 2, x0 + size // 2]:
            pixel = frame[y0 + size // 2, x0 + size // 2].astype(int)
            assert np.abs(pixel - s.color).max() <= 2, (s, pixel)
        covered[y0:y1, x0:x1] = True
    # everywhere else the frame is the background at the camera position
    assert np.array_equal(frame[~covered], background_view(world, t)[~covered])


@CONFIGS
def test_sprite_colours_are_distinct_and_saturated(cfg):
    for seed in range(10):
        sprites = World(seed, cfg.video, cfg.world).sprites
        colors = [np.array(s.color, int) for s in sprites]
        assert all(c.max() - c.min() > 200 for c in colors)            # saturated
        assert all(np.abs(a - b).max() > 60 for i, a in enumerate(colors) for b in colors[i + 1:])
        assert len({s.shape for s in sprites}) == min(len(sprites), len(SHAPES))


@CONFIGS
@given(seed=seeds, t=st.integers(0, 500))
def test_camera_is_periodic_and_places_come_back(cfg, seed, t):
    world = World(seed, cfg.video, cfg.world)
    period = cfg.world.camera_period
    assert world.camera(t + period) == world.camera(t)
    assert np.array_equal(background_view(world, t), background_view(world, t + period))


@CONFIGS
@given(seed=seeds)
def test_sprites_leave_and_reenter_within_three_periods(cfg, seed):
    n = 3 * cfg.world.camera_period
    gaps = revisits(seed, 0, n, cfg.video, cfg.world)
    assert set(gaps) == set(range(cfg.world.num_sprites))
    assert any(gaps.values())                                          # some sprite came back
    _, meta = render(seed, 0, n, cfg.video, cfg.world)
    for k, intervals in gaps.items():
        for left, back in intervals:
            assert 0 < left < back < n
            assert meta[left - 1].sprites[k].visible and meta[back].sprites[k].visible
            assert not any(meta[t].sprites[k].visible for t in range(left, back))


def test_one_frame_renders_fast():
    world = World(0, SMALL.video, SMALL.world)
    begin = time.perf_counter()
    for t in range(100):
        world.frame(t)
    assert (time.perf_counter() - begin) / 100 < 5e-3


def test_rgb_only_and_bad_ranges():
    four = dataclasses.replace(TINY.video, channels=4)
    with pytest.raises(ValueError, match="video.channels"):
        render(0, 0, 1, four, TINY.world)
    with pytest.raises(ValueError, match="video.channels"):
        WorldClips(dataclasses.replace(TINY, video=four))
    with pytest.raises(ValueError, match="start"):
        render(0, -1, 1, TINY.video, TINY.world)


# --- the dataset -------------------------------------------------------------------------
@CONFIGS
def test_clip_item_format_and_content(cfg):
    clips = WorldClips(cfg, base_seed=7, length=3)
    assert len(clips) == 3
    item = clips[1]
    f = cfg.video.frames
    assert item["video"].shape == (f, 3, cfg.video.height, cfg.video.width)
    assert item["video"].dtype == torch.float32
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["label"].dtype == torch.int64 and item["label"].item() == label(8, cfg.world)
    assert item["seed"] == 8 and item["start"] == clip_start(8, cfg)
    assert 0 <= item["start"] < 4 * cfg.world.camera_period
    frames, _ = render(8, item["start"], f, cfg.video, cfg.world)
    assert np.array_equal(to_uint8(item["video"]), frames)
    assert WorldClips(cfg, random_start=False)[3]["start"] == 0
    with pytest.raises(IndexError):
        clips[3]


def test_dataloader_workers_give_the_same_items():
    clips = WorldClips(TINY, base_seed=5, length=6)
    batches = [list(DataLoader(clips, batch_size=3, num_workers=w)) for w in (0, 2)]
    for a, b in zip(*batches):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
        assert torch.equal(a["seed"], b["seed"]) and torch.equal(a["start"], b["start"])


@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=st.integers(0, 99))
def test_uint8_round_trip(shape, seed):
    frames = np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    video = from_uint8(frames)                     # [..., H, W, C] -> [..., C, H, W]
    assert video.shape == (*shape[:-2], 3, *shape[-2:]) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert np.array_equal(to_uint8(video), frames)


def test_to_uint8_clamps():
    video = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(5, 1, 1, 1).expand(5, 3, 1, 1)
    assert to_uint8(video)[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]
