"""Choosing a run's snapshot by its validation scores (`sparse-forcing export RUN --best`).

DMD does not get better monotonically (docs/training.md): a stage keeps bf16 snapshots every
`snapshot_every` steps, each scored on held-out world clips (models/train/validation.py), and
the weights to keep are the snapshot with the best score, not the last one. The default score
is `val_sprites` (the true sprites drawn where the world has them), because PSNR rewards the
blur of a mean prediction that loses them; snapshots whose `val_roughness` shows the
per-patch noise DMD can teach are left out, and so, where the history has `val_vivid_far`
(sprite pixels over the second horizon, generated / true), are those that have lost the
sprites past the horizon or over-draw them there (outside FAR_VIVID_RANGE): the rule fixed
before the ninth session's runs (docs/training.md).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

from .. import checkpoint as ckpt

SCORES = ("val_sprites", "val_vivid", "val_psnr", "val_ssim")   # higher is better
MAX_ROUGHNESS = 0.3   # the world's frames score 0.20, per-patch noise climbs past 0.3
FAR_VIVID_RANGE = (0.5, 2.0)   # val_vivid_far kept: sprites drawn past the horizon, not 2x over


def snapshot_path(run_dir, step: int) -> Path:
    """Where a run keeps the snapshot of `step` (written by `StageRun.snapshot`)."""
    return Path(run_dir) / "snapshots" / f"step-{step:05d}.safetensors"


def best_snapshot(run_dir, score: str = "val_sprites", steps: Optional[Sequence[int]] = None,
                  max_roughness: float = MAX_ROUGHNESS,
                  far_range: Optional[tuple[float, float]] = FAR_VIVID_RANGE) -> tuple[int, Path]:
    """(step, path) of the snapshot of `run_dir` with the highest `score` in its history
    (ties: the higher val_psnr, then the earlier step), among `steps` when given (e.g. the
    steps every run of a comparison reached), among those with val_roughness below
    `max_roughness` when any is, and of those among the ones with val_vivid_far inside
    `far_range` when any is (None: no such filter). Raises ValueError naming the run and
    what is missing."""
    run_dir = Path(run_dir)
    if score not in SCORES:
        raise ValueError(f"score = {score!r}, allowed: {', '.join(SCORES)}")
    history_file = run_dir / "history.json"
    if not history_file.is_file():
        raise ValueError(f"{run_dir}: no history.json; is it a training run folder?")
    history = json.loads(history_file.read_text())
    values = {k: {int(s): v for s, v in history.get(k, [])}
              for k in (score, "val_psnr", "val_roughness", "val_vivid_far")}
    have = {s for s in values[score] if snapshot_path(run_dir, s).is_file()}
    if steps is not None:
        have &= {int(s) for s in steps}
    if not have:
        raise ValueError(f"{run_dir}: no snapshot with a {score} score"
                         + ("" if steps is None else f" among steps {sorted(steps)}")
                         + " (snapshots are scored every snapshot_every steps)")
    smooth = {s for s in have if values["val_roughness"].get(s, 0.0) < max_roughness}
    pool = smooth or have
    if far_range is not None:
        lo, hi = far_range
        far = {s for s in pool if s in values["val_vivid_far"] and lo <= values["val_vivid_far"][s] <= hi}
        pool = far or pool
    best = max(pool, key=lambda s: (values[score][s], values["val_psnr"].get(s, 0.0), -s))
    return best, snapshot_path(run_dir, best)


def export_best(run_dir, cfg, out=None, score: str = "val_sprites") -> tuple[int, Path]:
    """Copy the best snapshot (`best_snapshot`) to `out` (default RUN_DIR/best.safetensors),
    atomically, after checking it is a weights file of `cfg`'s model (a snapshot is already
    the bf16 weights file a stage exports)."""
    step, src = best_snapshot(run_dir, score)
    ckpt.import_weights(src, cfg)      # a snapshot of another config fails here, naming it
    dest = Path(out) if out else Path(run_dir) / "best.safetensors"
    with ckpt.atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return step, dest
