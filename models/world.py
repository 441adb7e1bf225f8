"""The procedural world the reference model is trained on: a scene, sprites, a panning camera.

    frames, meta = render(seed, start=0, n=96, video=cfg.video, world=cfg.world)
    frames.shape == (96, cfg.video.height, cfg.video.width, 3)    # uint8
    meta[t].camera, meta[t].sprites[k].bbox ...

A seed fixes one world: a scene `scene_width_factor` x `scene_height_factor` times the view,
with a textured background (value noise, a pattern chosen by `label(seed)`, fixed landmarks,
so a place can be recognised when the camera comes back to it) and `num_sprites` sprites of
distinct shape and saturated colour bouncing off the scene borders. The camera (the view, one
video frame) pans across the scene and returns every `camera_period` frames, so sprites and
places leave the view and re-enter it: `revisits` lists when, for identity-recall evaluation.

Every moving quantity is a closed form of the frame index (triangle waves), so frame t costs
O(1) and `render(seed, start, n)` equals `render(seed, 0, start + n)[start:]` exactly. All
scene randomness is drawn from `np.random.default_rng(seed)`, in a fixed order.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import VideoConfig, WorldConfig

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "hexagon", "saltire")
STYLES = ("blobs", "bands", "tiles", "stripes")   # background texture, by label
SUPERSAMPLE = 4          # sub-pixel samples per axis for the sprites' anti-aliased masks


@dataclass(frozen=True)
class SpriteMeta:
    """One sprite in one frame. `position` is its top-left corner in scene pixels; `bbox` is
    (x0, y0, x1, y1) in view pixels, clipped to the view, end exclusive; None when out of view."""
    id: int
    shape: str
    color: tuple[int, int, int]
    position: tuple[int, int]
    visible: bool
    bbox: Optional[tuple[int, int, int, int]]


@dataclass(frozen=True)
class FrameMeta:
    """What frame `index` shows: the view's top-left corner `camera` = (x, y) in scene pixels
    and every sprite, drawn in id order (a later sprite covers an earlier one)."""
    index: int
    camera: tuple[int, int]
    sprites: tuple[SpriteMeta, ...]


@dataclass(frozen=True)
class Sprite:
    """A sprite's constant description; its position at frame t is `World.positions(t)[id]`."""
    id: int
    shape: str
    color: tuple[int, int, int]
    start: tuple[float, float]        # (x, y) at frame 0, scene pixels
    velocity: tuple[float, float]     # scene pixels per frame


def label(seed: int, world: WorldConfig = WorldConfig()) -> int:
    """The world's class: it picks the background palette and texture."""
    return seed % world.num_classes


def check_config(video: VideoConfig, world: WorldConfig) -> None:
    """A ValueError naming the field when the world cannot be rendered at this video size."""
    if video.channels != 3:
        raise ValueError(f"video.channels = {video.channels}: the procedural world renders RGB "
                         "video only; set video.channels = 3")
    if world.scene_width_factor < 1 or world.scene_height_factor < 1:
        raise ValueError("world.scene_width_factor and world.scene_height_factor must be >= 1 "
                         "(the scene holds the view)")
    if not 1 <= world.sprite_size <= min(video.height, video.width):
        raise ValueError(f"world.sprite_size = {world.sprite_size} must be in "
                         f"[1, {min(video.height, video.width)}] (fit in the view)")
    if world.num_sprites < 0 or world.camera_period < 1 or world.num_classes < 1:
        raise ValueError("world.num_sprites >= 0, world.camera_period >= 1 and "
                         "world.num_classes >= 1 are required")


class World:
    """One seed's world, built once; `frame(t)` and `meta(t)` are O(1) in t."""

    def __init__(self, seed: int, video: VideoConfig = VideoConfig(),
                 world: WorldConfig = WorldConfig()):
        check_config(video, world)
        self.seed, self.video, self.world = seed, video, world
        self.label = label(seed, world)
        self.scene_height = round(world.scene_height_factor * video.height)
        self.scene_width = round(world.scene_width_factor * video.width)
        rng = np.random.default_rng(seed)
        self.background = _background(rng, self.label, self.scene_height, self.scene_width,
                                      video.height, world.num_classes)
        self.sprites = _sprites(rng, world.num_sprites, world.sprite_size,
                                self.scene_height, self.scene_width, video.height)
        self.camera_phase = int(rng.integers(world.camera_period))
        size = world.sprite_size
        self._span = np.array([self.scene_width - size, self.scene_height - size], np.float64)
        self._start = np.array([s.start for s in self.sprites], np.float64).reshape(-1, 2)
        self._velocity = np.array([s.velocity for s in self.sprites], np.float64).reshape(-1, 2)
        self._alpha = {s.shape: _shape_alpha(s.shape, size) for s in self.sprites}

    def camera(self, t: int) -> tuple[int, int]:
        """The view's top-left corner: a horizontal triangle wave over the whole scene width
        and a gentle vertical sway, both exactly periodic in `camera_period`."""
        period = self.world.camera_period
        k = (t + self.camera_phase) % period      # integer phase: camera(t + period) == camera(t)
        x = (self.scene_width - self.video.width) * _triangle(k / period)
        y = (self.scene_height - self.video.height) * 0.5 * (1 - np.cos(4 * np.pi * k / period))
        return int(np.rint(x)), int(np.rint(y))

    def positions(self, t: int) -> np.ndarray:
        """Every sprite's top-left corner (x, y) at frame t, int [num_sprites, 2]: each axis
        a triangle wave, i.e. uniform motion reflected at the scene borders."""
        span = self._span
        period = 2 * np.where(span > 0, span, 1.0)    # span 0: the sprite fills the axis, stays
        pos = span * _triangle((self._start + self._velocity * t) / period)
        return np.rint(pos).astype(np.int64)

    def meta(self, t: int) -> FrameMeta:
        (cx, cy), sprites = self.camera(t), []
        for sprite, (x, y) in zip(self.sprites, self.positions(t)):
            bbox = self._view_bbox(x - cx, y - cy)
            sprites.append(SpriteMeta(sprite.id, sprite.shape, sprite.color, (int(x), int(y)),
                                      bbox is not None, bbox))
        return FrameMeta(t, (cx, cy), tuple(sprites))

    def frame(self, t: int) -> np.ndarray:
        """Frame t as uint8 [height, width, 3]."""
        h, w = self.video.height, self.video.width
        cx, cy = self.camera(t)
        image = self.background[cy:cy + h, cx:cx + w].copy()
        for sprite, (x, y) in zip(self.sprites, self.positions(t)):
            vx, vy = x - cx, y - cy
            bbox = self._view_bbox(vx, vy)
            if bbox is None:
                continue
            x0, y0, x1, y1 = bbox
            alpha = self._alpha[sprite.shape][y0 - vy:y1 - vy, x0 - vx:x1 - vx, None]
            region = image[y0:y1, x0:x1]
            region += alpha * (np.asarray(sprite.color, np.float32) / 255 - region)
        return (image * 255 + 0.5).astype(np.uint8)

    def _view_bbox(self, vx: int, vy: int) -> Optional[tuple[int, int, int, int]]:
        size = self.world.sprite_size
        x0, y0 = max(vx, 0), max(vy, 0)
        x1, y1 = min(vx + size, self.video.width), min(vy + size, self.video.height)
        return (int(x0), int(y0), int(x1), int(y1)) if x0 < x1 and y0 < y1 else None


def render(seed: int, start: int, n: int, video: VideoConfig = VideoConfig(),
           world: WorldConfig = WorldConfig()) -> tuple[np.ndarray, list[FrameMeta]]:
    """Frames [start, start + n) of world `seed`: uint8 [n, height, width, 3] and their metadata."""
    if start < 0 or n < 0:
        raise ValueError(f"render: start = {start}, n = {n} must both be >= 0")
    w = World(seed, video, world)
    frames = np.empty((n, video.height, video.width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = w.frame(start + i)
    return frames, [w.meta(start + i) for i in range(n)]


def visible_sprites(meta: FrameMeta) -> tuple[SpriteMeta, ...]:
    """The sprites of one frame whose box intersects the view."""
    return tuple(s for s in meta.sprites if s.visible)


def revisits(seed: int, start: int, n: int, video: VideoConfig = VideoConfig(),
             world: WorldConfig = WorldConfig()) -> dict[int, list[tuple[int, int]]]:
    """For each sprite id, its absences within frames [start, start + n): (left, back), the
    first frame out of view after having been seen and the first frame back in view. Absences
    still open at the end of the range are left out. Metadata only: no pixels are rendered."""
    w = World(seed, video, world)
    out: dict[int, list[tuple[int, int]]] = {s.id: [] for s in w.sprites}
    seen, left = set(), {}                     # ids seen so far; id -> frame it left
    for t in range(start, start + n):
        for s in w.meta(t).sprites:
            if s.visible:
                if s.id in left:
                    out[s.id].append((left.pop(s.id), t))
                seen.add(s.id)
            elif s.id in seen and s.id not in left:
                left[s.id] = t
    return out


# --- building a world --------------------------------------------------------------------
def _triangle(u):
    """0 at integer u, 1 at half-integers, linear in between: the closed form of bouncing."""
    return 1 - np.abs(1 - 2 * np.mod(u, 1.0))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a grid of `cell` pixels, smoothstep-interpolated."""
    grid = rng.random((int(height / cell) + 2, int(width / cell) + 2))

    def axis(n):
        u = (np.arange(n) + 0.5) / cell
        i = u.astype(np.int64)
        f = u - i
        return i, f * f * (3 - 2 * f)

    (iy, fy), (ix, fx) = axis(height), axis(width)
    rows = grid[:, ix] * (1 - fx) + grid[:, ix + 1] * fx              # [grid rows, width]
    return (rows[iy] * (1 - fy)[:, None] + rows[iy + 1] * fy[:, None]).astype(np.float32)


def _background(rng, label_: int, height: int, width: int, view: int,
                num_classes: int) -> np.ndarray:
    """The scene's background, float32 [height, width, 3] in [0, 1]. Muted colours, so that
    the saturated sprites stand out; lengths scale with the view height, so the world looks
    the same at any resolution."""
    hue = label_ / num_classes + rng.uniform(-0.03, 0.03)
    dark, light = _hsv(hue, 0.45, 0.35), _hsv(hue + 0.08, 0.35, 0.75)
    accent = _hsv(hue - 0.1, 0.4, 0.55)
    fine = _value_noise(rng, height, width, view / 5)
    coarse = _value_noise(rng, height, width, view / 1.5)   # place-scale shading
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / view
    style = STYLES[label_ % len(STYLES)]
    if style == "blobs":
        t = fine
    elif style == "bands":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * y + 4 * fine)
    elif style == "tiles":
        t = 0.6 * ((np.floor(4 * x) + np.floor(4 * y)) % 2) + 0.4 * fine
    else:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * (x + y) + 2 * fine)
    image = dark + t[..., None] * (light - dark)
    image += (coarse[..., None] - 0.5) * 0.5 * (accent - image)
    _draw_landmarks(rng, image, view, (dark, light, accent))
    return np.clip(image, 0, 1)


def _draw_landmarks(rng, image: np.ndarray, view: int, palette) -> None:
    """Fixed, larger, muted shapes with a dark rim (towers, ponds, hills), about two per view."""
    height, width = image.shape[:2]
    count = max(2, round(2 * height * width / view ** 2))
    for _ in range(count):
        kind = rng.integers(3)
        ry, rx = rng.uniform(0.08, 0.16, size=2) * view           # half extents
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        # only the landmark's box (and its rim) is touched
        top, left = max(int(cy - ry) - 2, 0), max(int(cx - rx) - 2, 0)
        y, x = np.mgrid[top:min(int(cy + ry) + 3, height), left:min(int(cx + rx) + 3, width)] + 0.5
        dy, dx = np.abs(y - cy) / ry, np.abs(x - cx) / rx
        if kind == 0:                                             # tower: a rectangle
            d = np.maximum(dx, dy)
        elif kind == 1:                                           # pond: an ellipse
            d = np.sqrt(dx * dx + dy * dy)
        else:                                                     # hill: a triangle, apex up
            ly = (y - cy) / ry
            d = np.maximum(dx - (ly + 1) / 2 + 1, ly)
        fill = 0.5 * palette[rng.integers(3)] + 0.5 * _hsv(rng.random(), 0.3, rng.uniform(0.3, 0.8))
        box = image[top:top + d.shape[0], left:left + d.shape[1]]
        box[d <= 1] = fill
        box[(d > 1) & (d <= 1 + 1.5 / min(rx, ry))] *= 0.55      # the rim: about one pixel


def _sprites(rng, count: int, size: int, height: int, width: int, view: int) -> tuple[Sprite, ...]:
    """Distinct shapes (cycling when there are more sprites than shapes), hues spread evenly
    around the colour wheel at full saturation, speeds of 2-4% of the view per frame."""
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    hue0 = rng.random()
    sprites = []
    for i in range(count):
        color = tuple(int(c) for c in np.rint(_hsv(hue0 + i / max(count, 1), 1.0, 1.0) * 255))
        start = (rng.uniform(0, width - size), rng.uniform(0, height - size))
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.04) * view
        sprites.append(Sprite(i, shapes[i % len(SHAPES)], color, start,
                              (speed * np.cos(angle), speed * np.sin(angle))))
    return tuple(sprites)


def _shape_alpha(shape: str, size: int) -> np.ndarray:
    """Coverage of `shape` in a size x size box, float32 in [0, 1], from SUPERSAMPLE^2 samples
    per pixel. Every shape covers the box centre, where tests read the sprite's colour."""
    n = size * SUPERSAMPLE
    v, u = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1                 # y down, both in (-1, 1)
    au, av = np.abs(u), np.abs(v)
    inside = {
        "circle": u * u + v * v <= 1,
        "square": np.maximum(au, av) <= 0.85,
        "triangle": (au <= (v + 1) / 2) & (v <= 0.9),
        "diamond": au + av <= 1,
        "cross": np.minimum(au, av) <= 0.34,
        "hexagon": (av <= 0.87) & (1.73 * au + av <= 1.73),
        "saltire": np.minimum(np.abs(u - v), np.abs(u + v)) <= 0.45,
    }[shape]
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)).astype(np.float32)
