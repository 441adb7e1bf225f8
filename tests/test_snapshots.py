"""Choosing a run's snapshot by its validation scores (models/train/snapshots.py and
`sparse-forcing export RUN --best`): the highest score wins, noisy snapshots are left out,
a comparison can restrict the steps, and bad input is named."""
import json

import pytest
import torch

from models.checkpoint import CheckpointError, export_weights, import_weights
from models.cli import main
from models.config import load_config
from models.dit import CausalDiT
from models.train.snapshots import best_snapshot, export_best, snapshot_path

TINY = load_config("tiny")


def make_run(tmp_path, scores, roughness, cfg=TINY):
    """A run folder with a snapshot per step of `scores` (val_sprites) and its history."""
    run = tmp_path / "run"
    for i, step in enumerate(scores):
        torch.manual_seed(i)
        export_weights(snapshot_path(run, step), CausalDiT(cfg).state_dict(), cfg,
                       meta={"step": step})
    history = {"val_sprites": [[s, v] for s, v in scores.items()],
               "val_psnr": [[s, 15.0] for s in scores],
               "val_roughness": [[s, roughness.get(s, 0.22)] for s in scores]}
    (run / "history.json").write_text(json.dumps(history))
    return run


def test_the_best_smooth_snapshot_wins(tmp_path):
    run = make_run(tmp_path, {10: 0.1, 20: 0.5, 30: 0.4, 40: 0.2}, roughness={20: 0.45})
    assert best_snapshot(run) == (30, snapshot_path(run, 30))    # 20 is noisy: left out
    assert best_snapshot(run, steps=[10, 40]) == (40, snapshot_path(run, 40))
    assert best_snapshot(run, max_roughness=1.0)[0] == 20
    # every snapshot noisy: the best of them all rather than nothing
    noisy = make_run(tmp_path / "n", {10: 0.1, 20: 0.3}, roughness={10: 0.5, 20: 0.6})
    assert best_snapshot(noisy)[0] == 20


def test_snapshots_that_lose_the_sprites_past_the_horizon_are_left_out(tmp_path):
    """With val_vivid_far in the history, the best val_sprites among the snapshots whose
    far-horizon sprite ratio is inside FAR_VIVID_RANGE (0.5-2) wins; none inside: all compete."""
    run = make_run(tmp_path, {10: 0.1, 20: 0.5, 30: 0.4, 40: 0.3}, roughness={})
    history = json.loads((run / "history.json").read_text())
    history["val_vivid_far"] = [[10, 0.9], [20, 0.2], [30, 2.5], [40, 1.1]]
    (run / "history.json").write_text(json.dumps(history))
    assert best_snapshot(run)[0] == 40          # 20 lost the sprites, 30 over-draws them
    assert best_snapshot(run, far_range=None)[0] == 20
    history["val_vivid_far"] = [[10, 0.1], [20, 0.2], [30, 2.5], [40, 3.0]]
    (run / "history.json").write_text(json.dumps(history))
    assert best_snapshot(run)[0] == 20


def test_export_best_copies_the_snapshot(tmp_path, capsys):
    run = make_run(tmp_path, {10: 0.1, 20: 0.5}, roughness={})
    step, out = export_best(run, TINY)
    assert step == 20 and out == run / "best.safetensors"
    assert out.read_bytes() == snapshot_path(run, 20).read_bytes()
    import_weights(out, TINY)
    assert main(["export", str(run), "--config", "tiny", "--best", "--out", str(tmp_path / "w.safetensors")]) == 0
    assert (tmp_path / "w.safetensors").read_bytes() == out.read_bytes()
    assert "step 20" in capsys.readouterr().out


def test_bad_input_is_named(tmp_path, capsys):
    run = make_run(tmp_path, {10: 0.1}, roughness={})
    with pytest.raises(ValueError, match="score = 'val_loss', allowed: val_sprites"):
        best_snapshot(run, "val_loss")
    with pytest.raises(ValueError, match="among steps"):
        best_snapshot(run, steps=[20])
    with pytest.raises(ValueError, match="no history.json"):
        best_snapshot(tmp_path / "nothing")
    assert main(["export", str(tmp_path / "nothing"), "--config", "tiny", "--best"]) == 2
    assert "no history.json" in capsys.readouterr().err
    # a snapshot of another config is refused before anything is written
    with pytest.raises(CheckpointError, match="step-00010.safetensors: video.height = 16 in the "
                                              "checkpoint but 64 in the config"):
        export_best(run, load_config("small"))
    assert not (run / "best.safetensors").exists()
