"""Checkpoints a killed run can trust: safetensors for the tensors, a small JSON for the rest.

    path = save_checkpoint(run_dir, step, {"generator": model.state_dict(),
                                           "optim": opt.state_dict()}, meta={"loss": 0.12}, cfg=cfg)
    state, meta = load_checkpoint(run_dir, cfg)        # the latest one; meta["step"] == step

A checkpoint is a pair `run_dir/checkpoints/step-0000100.{safetensors,json}`: the tensors, and a
record holding the caller's meta, the skeleton of the nested state (everything that is not a
tensor), the config, its architecture fingerprint and the sha256 of the tensor file.
`checkpoints/latest.json` names the newest complete pair and is rewritten last, each file
atomically, so a kill at any moment leaves a loadable latest. Loading verifies the checksum and,
given a config, that the architecture matches, naming the file and the first differing field.

Also here: `export_weights`/`import_weights` (one small bf16 safetensors file of a trained
generator, config inside), the RNG state of a process, and `sample_generator`, the per-sample
noise source that makes results independent of the number of processes.
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import random
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.config import ARCHITECTURE_SECTIONS, Config, fingerprint

FORMAT = "sparsedsl-checkpoint/1"
WEIGHTS_FORMAT = "sparsedsl-weights/1"
_STEP_FILE = re.compile(r"step-(\d+)\.(json|safetensors)")
_RECORD_FIELDS = ("format", "step", "file", "sha256", "fingerprint", "config", "meta", "skeleton")


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, corrupt, or of another architecture."""


# --- durable files ---------------------------------------------------------------------------

@contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it durably replaces `path`.

    The temporary name keeps the suffix (writers that infer the format from it still work) and
    lives in the same folder, so `os.replace` is an atomic rename: readers see the old file or
    the new one, never a partial one. On failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:   # the data must be on disk before the rename is
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)           # and the rename itself must survive a power cut


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be opened elsewhere
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupt: expected a JSON object")
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _cpu_copy(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # A fresh contiguous CPU copy: safetensors refuses views, non-contiguous tensors and tensors
    # sharing storage (tied weights), and the caller may keep training on the originals.
    return t.detach().to("cpu", dtype=dtype, copy=True, memory_format=torch.contiguous_format)


# --- nested state <-> flat tensors + JSON skeleton ----------------------------------------------
#
# The skeleton is the state with every tensor replaced by {"__tensor__": key}. JSON cannot say
# everything Python can, so a few values are tagged with a one-key object: non-finite floats
# ({"__float__": "nan"}), tuples ({"__tuple__": [...]}) and dicts whose keys are not all plain
# strings ({"__dict__": [[key, value], ...]}, e.g. the int keys of an optimizer's state).
# A dict is written as a plain JSON object only when no key starts with "__", so the tags are
# never ambiguous.

def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested dicts/lists/tuples into `{key: tensor}` (CPU copies) and a JSON-able skeleton.

    Tensor keys are the path to the tensor, e.g. "generator/blocks.0.attn.q.weight" or
    "optim/state/0/exp_avg". Leaves other than tensors must be None, bool, int, float or str.
    """
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(obj, "", tensors)


def _encode(x: Any, path: str, tensors: Optional[dict]) -> Any:
    """`tensors` is None while encoding a dict key: keys may not be tensors."""
    if isinstance(x, torch.Tensor) and tensors is not None:
        key = path or "tensor"
        while key in tensors:  # two paths can spell the same key ({"a/b": t} and {"a": {"b": t}})
            key += "~"
        tensors[key] = _cpu_copy(x)
        return {"__tensor__": key}
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"__float__": repr(x)}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(x)]}
    if isinstance(x, list) and tensors is not None:
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(x)]
    if isinstance(x, dict) and tensors is not None:
        def child(k):
            return f"{path}/{k}" if path else str(k)
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, child(k), tensors) for k, v in x.items()}
        return {"__dict__": [[_encode(k, path, None), _encode(v, child(k), tensors)]
                             for k, v in x.items()]}
    where = f"dict key {x!r}" if tensors is None else (path or "the state")
    raise TypeError(f"cannot checkpoint {where}: a {type(x).__name__} (allowed: tensors, dicts, "
                    "lists, tuples, None, bool, int, float, str; dict keys not tensors)")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild what `flatten_state` split (dicts come back as plain dicts)."""
    if isinstance(skeleton, list):
        return [unflatten_state(tensors, v) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        (tag, value), = skeleton.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"the skeleton names a tensor {value!r} the file does not hold")
            return tensors[value]
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(unflatten_state(tensors, v) for v in value)
        if tag == "__dict__":
            return {unflatten_state(tensors, k): unflatten_state(tensors, v) for k, v in value}
    return {k: unflatten_state(tensors, v) for k, v in skeleton.items()}


# --- checkpoints -------------------------------------------------------------------------------

def _stem(step: int) -> str:
    return f"step-{step:07d}"


def _steps(ckdir: Path) -> set[int]:
    """Steps with any file on disk (a tensor file without its record counts: it is pruned too)."""
    return {int(m.group(1)) for p in ckdir.iterdir() if (m := _STEP_FILE.fullmatch(p.name))}


def save_checkpoint(run_dir: Union[str, Path], step: int, state: dict, meta: dict, cfg: Config,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` of `state` and make it the latest; returns the record's path.

    `meta` is any JSON-able dict (losses, wall time); `load_checkpoint` returns it with "step"
    added. The `keep` newest checkpoints up to this step survive; older ones are deleted only
    after latest.json names the new one. Checkpoints of later steps (left by a run that was
    restarted from an earlier one) are left alone; saving their step again replaces them.
    """
    if keep < 1:
        raise ValueError(f"keep = {keep}: at least the checkpoint just written must be kept")
    if "step" in meta:
        raise ValueError("meta may not hold 'step': the checkpoint's step is stored on its own")
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = flatten_state(state)
    stem = _stem(step)
    _unpublish(ckdir, step)

    tensor_path = ckdir / f"{stem}.safetensors"
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    record = {"format": FORMAT, "step": step, "file": tensor_path.name,
              "sha256": _sha256(tensor_path), "torch": torch.__version__,
              "fingerprint": fingerprint(cfg), "config": cfg.to_dict(), "meta": meta,
              "skeleton": skeleton}
    record_path = ckdir / f"{stem}.json"
    _write_json(record_path, record)
    _write_json(ckdir / "latest.json", {"step": step, "file": record_path.name})
    _prune(ckdir, step, keep)
    return record_path


def _unpublish(ckdir: Path, step: int) -> None:
    """Before replacing the files latest.json names, point it at the newest other checkpoint.

    Otherwise a kill between replacing the tensor file and its record would leave latest naming
    a record whose checksum no longer matches.
    """
    latest = ckdir / "latest.json"
    if not latest.exists() or _read_json(latest).get("step") != step:
        return
    others = [s for s in _steps(ckdir) if s != step and (ckdir / f"{_stem(s)}.json").exists()]
    if others:
        _write_json(latest, {"step": max(others), "file": f"{_stem(max(others))}.json"})
    else:
        latest.unlink()
        _fsync_dir(ckdir)


def _prune(ckdir: Path, step: int, keep: int) -> None:
    older = sorted(s for s in _steps(ckdir) if s < step)
    for s in older[:max(0, len(older) - (keep - 1))]:
        for suffix in (".json", ".safetensors"):  # the record first: never a record without tensors
            (ckdir / f"{_stem(s)}{suffix}").unlink(missing_ok=True)
    for tmp in ckdir.glob(".*.tmp-*"):  # left by a writer that was killed (one writer per run)
        tmp.unlink(missing_ok=True)


def latest_step(run_dir: Union[str, Path]) -> Optional[int]:
    """The step latest.json names, or None when the run has no checkpoint yet."""
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    return _read_json(latest)["step"] if latest.exists() else None


def _record_path(p: Path) -> Path:
    """The record (.json) meant by a run dir, its checkpoints dir, latest.json or either file."""
    if p.is_dir():
        latest = next((q for q in (p / "checkpoints" / "latest.json", p / "latest.json")
                       if q.exists()), None)
        if latest is None:
            raise CheckpointError(f"{p}: no checkpoint (no checkpoints/latest.json)")
        p = latest
    if p.name == "latest.json":
        target = _read_json(p).get("file")
        if not isinstance(target, str):
            raise CheckpointError(f"{p}: corrupt: no 'file' field")
        return p.with_name(target)
    if p.suffix == ".safetensors":
        return p.with_suffix(".json")
    if p.suffix == ".json":
        return p
    raise CheckpointError(f"{p}: not a run dir, a .safetensors or a .json checkpoint file")


def load_checkpoint(path_or_run_dir: Union[str, Path], cfg: Optional[Config] = None,
                    map_location: Union[str, torch.device] = "cpu") -> tuple[Any, dict]:
    """Load and verify a checkpoint: a run dir (its latest), a .safetensors or a .json path.

    Returns (state, meta) with meta["step"] set. Raises `CheckpointError` naming the file when
    the record is not valid JSON, the tensor file's checksum does not match, the format is
    unknown, or `cfg` is of another architecture than the checkpoint.
    """
    record_path = _record_path(Path(path_or_run_dir))
    record = _read_json(record_path)
    missing = [k for k in _RECORD_FIELDS if k not in record]
    if missing:
        raise CheckpointError(f"{record_path}: corrupt: missing {', '.join(missing)}")
    if record["format"] != FORMAT:
        raise CheckpointError(f"{record_path}: format {record['format']!r}; this code reads {FORMAT!r}")
    if cfg is not None:
        _check_architecture(record_path, record["config"], record["fingerprint"], cfg)
    tensor_path = record_path.with_name(record["file"])
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path}: no such file (named by {record_path})")
    if _sha256(tensor_path) != record["sha256"]:
        raise CheckpointError(f"{tensor_path}: corrupt: checksum mismatch (sha256 recorded in "
                              f"{record_path.name})")
    try:
        tensors = load_file(tensor_path, device=str(map_location))
    except SafetensorError as e:
        raise CheckpointError(f"{tensor_path}: corrupt: not a readable safetensors file ({e})") from None
    try:
        state = unflatten_state(tensors, record["skeleton"])
    except CheckpointError as e:
        raise CheckpointError(f"{record_path}: {e}") from None
    return state, {**record["meta"], "step": record["step"]}


def _check_architecture(source: Path, saved_cfg: dict, saved_fp: str, cfg: Config) -> None:
    """Refuse a file whose architecture differs from `cfg`'s, naming the first differing field."""
    if saved_fp == fingerprint(cfg):
        return
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as the saved copy has them
    for section in ARCHITECTURE_SECTIONS:
        saved, current = saved_cfg.get(section, {}), now[section]
        for name in [*current, *(k for k in saved if k not in current)]:
            a, b = saved.get(name, "(absent)"), current.get(name, "(absent)")
            if a != b:
                raise CheckpointError(f"{source}: {section}.{name} = {json.dumps(a)} in the "
                                      f"checkpoint but {json.dumps(b)} in the config")
    raise CheckpointError(f"{source}: architecture fingerprint {saved_fp} in the checkpoint but "
                          f"{fingerprint(cfg)} in the config")


# --- exported weights --------------------------------------------------------------------------

def export_weights(path: Union[str, Path], state_dict: dict[str, torch.Tensor], cfg: Config,
                   dtype: torch.dtype = torch.bfloat16, meta: Optional[dict] = None) -> Path:
    """One self-describing safetensors file of a model's weights, small enough to commit.

    Floating-point tensors are cast to `dtype`; the config, its fingerprint and `meta`
    (JSON-able) go into the file's metadata.
    """
    bad = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise TypeError(f"export_weights takes a flat state_dict of tensors; not: {bad[:3]}")
    tensors = {k: _cpu_copy(v, dtype if v.is_floating_point() else None) for k, v in state_dict.items()}
    metadata = {"format": WEIGHTS_FORMAT, "fingerprint": fingerprint(cfg),
                "config": json.dumps(cfg.to_dict()), "meta": json.dumps(meta or {}),
                "torch": torch.__version__}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def import_weights(path: Union[str, Path], cfg: Optional[Config] = None) -> tuple[dict, dict, dict]:
    """Read `export_weights`' file: (float32 state_dict, config dict, meta).

    With `cfg`, a file of another architecture is refused naming the first differing field;
    `models.config.from_dict(cfg_dict)` rebuilds the config the weights were trained with.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt: not a readable safetensors file ({e})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: not an exported weights file (format "
                              f"{metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r})")
    try:
        cfg_dict, meta = json.loads(metadata["config"]), json.loads(metadata["meta"])
        saved_fp = metadata["fingerprint"]
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e!r})") from None
    if cfg is not None:
        _check_architecture(path, cfg_dict, saved_fp, cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return state, cfg_dict, meta


# --- randomness --------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU, CUDA when present) as tensors and
    plain values, ready for `save_checkpoint`."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (after a checkpoint round trip too)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # a run resumed on fewer GPUs restores the ones it has
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"][:torch.cuda.device_count()]])


def sample_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, *keys), e.g. (seed, step, sample_index).

    Drawing each sample's noise from its own generator makes a run's numbers independent of how
    the batch is split over processes. sha256, not `hash()`, so the seed is the same in every
    process and Python version.
    """
    ints = [operator.index(k) for k in (seed, *keys)]
    digest = hashlib.sha256(("sparsedsl.sample:" + ",".join(map(str, ints))).encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little"))
    return g
