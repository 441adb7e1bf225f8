"""Configs as data: one TOML file per model size (`models/configs/<name>.toml`).

    cfg = load_config("small")                 # a bundled name, or a path to a .toml file
    cfg = load_config("small", overrides={"teacher.steps": 10})
    cfg.model.dim, cfg.video.height, cfg.teacher.lr ...

Every section is a frozen dataclass; a file may leave out any field (the default below is
used) but may not name a field that does not exist or give a value of the wrong type:
`ConfigError` names the file, the field, the value and what is allowed. `fingerprint(cfg)`
hashes the fields that fix the weights' shapes, so a checkpoint of another architecture is
refused by name rather than by a shape mismatch deep inside torch.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file names an unknown field or holds a value that is not allowed."""

    def __init__(self, source: str, field: str, value: object, allowed: str):
        self.source, self.field, self.value, self.allowed = source, field, value, allowed
        super().__init__(f"{source}: {field} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class VideoConfig:
    """The frames the model sees: pixels (or latents) per frame and the AR geometry."""
    channels: int = 3
    height: int = 64
    width: int = 64
    frames: int = 21             # the training horizon (frames per training clip)
    chunk_frames: int = 3        # frames generated per AR step


@dataclass(frozen=True)
class WorldConfig:
    """The procedural world (models/world.py): a scene wider than the view, sprites, a camera."""
    scene_width_factor: float = 3.0   # scene width / view width (the camera pans across it)
    scene_height_factor: float = 1.5
    num_sprites: int = 4
    sprite_size: int = 12             # pixels (at the video's resolution)
    camera_period: int = 48           # frames for the camera to pan out and come back
    num_classes: int = 4              # background styles; the label when conditioning is on


@dataclass(frozen=True)
class ModelConfig:
    """A Wan-style causal video DiT (models/dit.py)."""
    patch: int = 4
    dim: int = 384
    layers: int = 8
    heads: int = 6
    ffn: int = 1536
    num_classes: int = 0          # 0: unconditional; else label conditioning (+1 null label for CFG)
    text_tokens: int = 0          # cross-attention context length (0: no cross-attention)
    text_dim: int = 0
    rope_theta: float = 10000.0
    time_rope: str = "absolute"   # how frame positions enter RoPE (docs/model.md)
    prediction: str = "x"         # the network predicts the clean frames (pixel space)


@dataclass(frozen=True)
class AttentionConfig:
    """Which attention runs where (models/attention.py)."""
    tile: tuple = (4, 4)          # tokens per block (rows, cols) for compiled patterns
    cache_frames: int = 21        # dense baseline: the rolling KV cache holds this many frames,
                                  # the chunk being generated included (Self-Forcing)
    sink_frames: int = 0          # dense baseline: frames kept forever ahead of the window
    pattern: str = "dense"        # self-forcing stage and generation: "dense", a preset name or a .py file
    presets: dict = field(default_factory=dict)   # preset name -> keyword overrides at this geometry
    # a compiled pattern's sink and persistent blocks past the horizon: "absolute" (each keeps
    # its frame's RoPE position) or "realigned" (moved to the frame just before the window at
    # every chunk); docs/model.md, "Positions past the training horizon"
    memory_positions: str = "absolute"


@dataclass(frozen=True)
class FlowConfig:
    """Rectified flow: x_t = (1 - t) x0 + t noise, t in [0, 1]; Wan's time shift."""
    shift: float = 3.0
    denoising_steps: tuple = (1000, 750, 500, 250)   # Self-Forcing's few-step schedule
    sample_steps: int = 24        # Euler steps of the many-step samplers (teacher, ODE pairs)
    cfg_scale: float = 1.0        # classifier-free guidance of the real score (labels only)


@dataclass(frozen=True)
class StageConfig:
    """One training stage: optimisation and bookkeeping."""
    steps: int = 1000
    batch: int = 16               # global batch (split over the processes)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 50
    grad_clip: float = 1.0
    ema: float = 0.0              # 0: no EMA (teacher, self-forcing)
    log_every: int = 10
    sample_every: int = 250       # sample GIFs (0: only at the end)
    checkpoint_every: int = 100
    snapshot_every: int = 0       # bf16 weights kept in snapshots/ every N steps (0: none)
    num_workers: int = 2
    seed: int = 0
    # student stage: teacher forcing, then ODE regression on pairs from the AR diffusion model
    ar_steps: int = 0             # teacher-forcing steps (student stage)
    ode_pairs: int = 0            # trajectories generated for the ODE regression
    # self-forcing stage (DMD)
    fake_updates: int = 5         # fake-score updates per generator update
    fake_lr: float = 0.0          # 0: same as lr
    rollout_frames: int = 0       # 0: the horizon; more: Self-Forcing++'s long rollout, scored on a window


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    video: VideoConfig = VideoConfig()
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    attention: AttentionConfig = AttentionConfig()
    flow: FlowConfig = FlowConfig()
    teacher: StageConfig = StageConfig()
    student: StageConfig = StageConfig()
    self_forcing: StageConfig = StageConfig()
    device: str = "auto"          # "auto": CUDA when present, else CPU
    precision: str = "bf16"       # autocast dtype on CUDA ("bf16" | "fp32"); CPU runs fp32

    # --- derived geometry -------------------------------------------------------------
    @property
    def tokens_h(self) -> int:
        return self.video.height // self.model.patch

    @property
    def tokens_w(self) -> int:
        return self.video.width // self.model.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.tokens_h * self.tokens_w

    @property
    def head_dim(self) -> int:
        return self.model.dim // self.model.heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"video": VideoConfig, "world": WorldConfig, "model": ModelConfig,
            "attention": AttentionConfig, "flow": FlowConfig, "teacher": StageConfig,
            "student": StageConfig, "self_forcing": StageConfig}
TOP_LEVEL = {"name": str, "device": str, "precision": str}
CHOICES = {"model.time_rope": ("absolute",), "model.prediction": ("x",),
           "attention.memory_positions": ("absolute", "realigned"),
           "precision": ("bf16", "fp32")}


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def config_path(name_or_path: Union[str, Path]) -> Path:
    """A bundled config name (`tiny`, `small`, `wan-1.3b`) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml":
        if not p.is_file():
            raise ConfigError(str(p), "config", str(name_or_path), "an existing .toml file")
        return p
    bundled = CONFIG_DIR / f"{name_or_path}.toml"
    if not bundled.is_file():
        raise ConfigError("--config", "config", str(name_or_path),
                          "a bundled name (" + ", ".join(bundled_configs()) + ") or a .toml file")
    return bundled


def parse_overrides(items: Sequence[str]) -> dict:
    """--set teacher.steps=10 --set attention.tile=[4,4] -> {"teacher.steps": 10, ...}"""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError("--set", item, item, "KEY=VALUE, e.g. teacher.steps=100")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text   # a bare word: a string
    return out


def load_config(name_or_path: Union[str, Path], overrides: Optional[dict] = None) -> Config:
    """Read and validate a config; `overrides` maps dotted keys ("teacher.steps") to values."""
    path = config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "file", path.name, f"valid TOML ({e})") from None
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        if not isinstance(target, dict):
            raise ConfigError("overrides", key, value, "a field of a section")
        target[name] = value
    return from_dict(raw, source=str(path))


def from_dict(raw: dict, source: str = "config") -> Config:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(source, key, value, f"a [{key}] table")
            kwargs[key] = _section(SECTIONS[key], value, key, source)
        elif key in TOP_LEVEL:
            kwargs[key] = _coerce(value, TOP_LEVEL[key], key, source)
        else:
            raise ConfigError(source, key, value, "one of the sections " + ", ".join(SECTIONS) +
                              " or the fields " + ", ".join(TOP_LEVEL))
    cfg = Config(**kwargs)
    _check(cfg, source)
    return cfg


def _section(cls, values: dict, prefix: str, source: str):
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(source, f"{prefix}.{key}", value,
                              f"a field of [{prefix}]: " + ", ".join(sorted(names)))
        out[key] = _coerce(value, hints[key], f"{prefix}.{key}", source)
    return cls(**out)


def _coerce(value, hint, where: str, source: str):
    origin = get_origin(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, [a for a in get_args(hint) if a is not type(None)][0], where, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, where, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, where, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, where, value, "a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(source, where, value, "a string")
        allowed = CHOICES.get(where)
        if allowed is not None and value not in allowed:
            raise ConfigError(source, where, value, "one of " + ", ".join(allowed))
        return value
    if hint is tuple:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(source, where, value, "a list of numbers")
        return tuple(value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, where, value, "a table")
        return dict(value)
    raise TypeError(f"config field {where} has an unsupported type {hint}")  # a bug here, not the user's


def _check(cfg: Config, source: str) -> None:
    """Cross-field rules: what one field allows depends on another."""
    v, m, a = cfg.video, cfg.model, cfg.attention
    positive = [("video.channels", v.channels), ("video.height", v.height), ("video.width", v.width),
                ("video.frames", v.frames), ("video.chunk_frames", v.chunk_frames),
                ("model.patch", m.patch), ("model.dim", m.dim), ("model.layers", m.layers),
                ("model.heads", m.heads), ("model.ffn", m.ffn),
                ("attention.cache_frames", a.cache_frames)]
    for stage in ("teacher", "student", "self_forcing"):
        sc = getattr(cfg, stage)
        positive += [(f"{stage}.batch", sc.batch), (f"{stage}.log_every", sc.log_every),
                     (f"{stage}.checkpoint_every", sc.checkpoint_every)]
        for field in ("steps", "sample_every", "snapshot_every", "ar_steps", "ode_pairs",
                      "fake_updates", "rollout_frames", "warmup"):
            if getattr(sc, field) < 0:
                raise ConfigError(source, f"{stage}.{field}", getattr(sc, field), "an integer >= 0")
        if not 0.0 <= sc.ema < 1.0:
            raise ConfigError(source, f"{stage}.ema", sc.ema, "a decay in [0, 1) (0: no EMA)")
    for name, value in positive:
        if value < 1:
            raise ConfigError(source, name, value, "an integer >= 1")
    for name, value in (("video.height", v.height), ("video.width", v.width)):
        if value % m.patch:
            raise ConfigError(source, name, value, f"a multiple of model.patch = {m.patch}")
    if v.frames % v.chunk_frames:
        raise ConfigError(source, "video.frames", v.frames,
                          f"a multiple of video.chunk_frames = {v.chunk_frames}")
    r = cfg.self_forcing.rollout_frames
    if r and (r < v.frames or r % v.chunk_frames):
        raise ConfigError(source, "self_forcing.rollout_frames", r,
                          f"0 (the horizon) or a multiple of video.chunk_frames = {v.chunk_frames} "
                          f"of at least video.frames = {v.frames}")
    if m.dim % m.heads or (m.dim // m.heads) % 2:
        raise ConfigError(source, "model.heads", m.heads,
                          f"a divisor of model.dim = {m.dim} leaving an even head dim")
    if a.cache_frames < v.chunk_frames:
        raise ConfigError(source, "attention.cache_frames", a.cache_frames,
                          f"at least video.chunk_frames = {v.chunk_frames} (the chunk is in the cache)")
    if len(a.tile) != 2 or any(int(t) != t or t < 1 for t in a.tile):
        raise ConfigError(source, "attention.tile", list(a.tile), "two integers >= 1 (rows, cols)")
    if (m.text_tokens > 0) != (m.text_dim > 0):
        raise ConfigError(source, "model.text_dim", m.text_dim,
                          "> 0 exactly when model.text_tokens > 0 (cross-attention on or off)")
    if not cfg.flow.denoising_steps or any(not 0 < s <= 1000 for s in cfg.flow.denoising_steps):
        raise ConfigError(source, "flow.denoising_steps", list(cfg.flow.denoising_steps),
                          "a non-empty list of timesteps in (0, 1000]")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(source, "device", cfg.device, "auto, cpu, cuda or cuda:N")


ARCHITECTURE_SECTIONS = ("video", "model")


def fingerprint(cfg: Config) -> str:
    """A short hash of what fixes the weights' shapes (video channels/size, model)."""
    arch = {k: cfg.to_dict()[k] for k in ARCHITECTURE_SECTIONS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
