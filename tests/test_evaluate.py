"""models/evaluate.py end to end on the tiny config: two random-weight generators (dense and
sparse-forcing) through the CLI function, every output file written and readable; bad
input is one line on stderr and exit code 2."""
import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import export_weights
from models.data import HELD_OUT_WORLDS
from models.config import load_config
from models.dit import CausalDiT
from models.evaluate import (
    EvaluateError,
    add_parser,
    evaluate,
    parse_entry,
    parse_horizons,
)

TINY = load_config("tiny")


def random_model(seed: int = 0) -> CausalDiT:
    """A tiny model whose output is not the constant 0 of a fresh one (zero head)."""
    torch.manual_seed(seed)
    model = CausalDiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return export_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors",
                          random_model().state_dict(), TINY)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sparse-forcing")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *argv])
    return args.func(args)


def test_two_entries_two_seeds_end_to_end(weights, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = run_cli("--config", "tiny", "--entry", f"dense={weights}:dense",
                 "--entry", f"sparse={weights}:sparse-forcing", "--seeds", "2", "--prefix", "3",
                 "--horizons", "1,2", "--out", str(out), "--no-progress", "--device", "cpu")
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    first = HELD_OUT_WORLDS   # `--seeds N`: worlds no training stage draws
    assert names == [f"dense_seed{first}.gif", "metrics.json", "psnr_vs_horizon.png", "results.md",
                     f"sparse_seed{first}.gif"]                # no temporary file left
    summary = json.loads((out / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert summary["seeds"] == [first, first + 1]
    assert summary["frames_generated"] == 2 * TINY.video.frames
    assert summary["entries"]["sparse"]["pattern"] == "sparse-forcing"
    for name in ("dense", "sparse"):
        entry = summary["entries"][name]
        for seed in (str(first), str(first + 1)):
            s = entry["per_seed"][seed]
            for key in ("psnr", "ssim", "hist", "mean_drift"):
                values = np.array(s[key], dtype=float)          # None (non-finite) -> nan
                assert values.shape == (18,) and np.isfinite(values).all(), (name, key)
            assert all(0 <= h <= 1 for h in s["hist"])
            vivid, truth_vivid = np.array(s["vivid"], float), np.array(s["vivid_truth"], float)
            assert vivid.shape == truth_vivid.shape == (18,) and (vivid >= 0).all()
            shown = np.array([np.nan if x is None else x for x in s["sprites"]], float)
            assert shown.shape == (18,) and (shown[np.isfinite(shown)] <= 1).all()
            assert set(s["gap_ssim"]["gen"]) == {"2", "5", "10"}      # gaps that fit 18 frames
            assert len(s["frame_stats"]["gen"]["mean"]) == 18
            rec = s["recall"]
            assert rec["mean_score"] is None or 0 <= rec["mean_score"] <= 1
        agg = entry["aggregate"]
        assert set(agg["horizons"]) == {"1x", "2x"}
        assert agg["horizons"]["2x"]["frames"] == [9, 18]
        for h in ("1x", "2x"):
            for key in ("psnr", "ssim", "hist"):
                ci = agg["horizons"][h][key]
                assert ci["n"] == 2 and math.isfinite(ci["mean"]) and ci["half_width"] >= 0
        assert len(agg["per_frame"]["psnr"]["mean"]) == 18
        assert agg["recall"]["revisits"] > 0                    # tiny sprites come back often
    table = (out / "results.md").read_text()
    assert "| dense | dense |" in table and "| sparse | sparse-forcing |" in table
    for column in ("PSNR 1x", "PSNR 2x", "SSIM 2x", "sprite pixels % 2x (truth)", "sprites shown 1x",
                   "recall score", "recall success"):
        assert column in table
    with Image.open(out / "psnr_vs_horizon.png") as im:
        assert im.format == "PNG"
    with Image.open(out / f"dense_seed{first}.gif") as im:
        assert im.format == "GIF" and im.n_frames > 1
    assert "evaluated 2 entries x 2 seeds" in capsys.readouterr().out


def test_a_loaded_model_and_one_seed(tmp_path):
    summary = evaluate([("m", random_model(1), None)], [5], 0, [1], TINY, device="cpu",
                       out_dir=tmp_path, progress=False)
    agg = summary["entries"]["m"]["aggregate"]
    assert summary["seeds"] == [5] and summary["entries"]["m"]["weights"] is None
    assert agg["horizons"]["1x"]["psnr"]["half_width"] is None      # no interval from 1 seed
    assert (tmp_path / "m_seed5.gif").is_file()
    assert "no ±" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--entry", "a=missing.safetensors"], "no such weights file"),
    (["--entry", "a={w}", "--seeds", "0"], "--seeds 0"),
    (["--entry", "a{w}"], "NAME=WEIGHTS[:PATTERN]"),
    (["--entry", "a={w}:no-such-pattern"], "attention.pattern"),
    (["--entry", "a={w}", "--prefix", "2"], "multiple of video.chunk_frames"),
    (["--entry", "a={w}", "--horizons", "0,x"], "--horizons"),
    (["--entry", "a={w}", "--entry", "a={w}"], "repeat"),
    ([], "no --entry"),
])
def test_bad_input_is_one_line_and_exit_code_2(weights, tmp_path, capsys, argv, message):
    argv = [a.replace("{w}", str(weights)) for a in argv]
    rc = run_cli("--config", "tiny", "--out", str(tmp_path / "x"), "--no-progress", *argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("sparse-forcing evaluate: error:")
    assert message in err
    assert not (tmp_path / "x").exists()                        # refused before any work


def test_entry_and_horizon_parsing():
    assert parse_entry("a=w.safetensors") == ("a", "w.safetensors", None)
    assert parse_entry("a=runs/x/w.safetensors:sparse-forcing") == (
        "a", "runs/x/w.safetensors", "sparse-forcing")
    assert parse_entry("a=w.safetensors:patterns/mine.py") == ("a", "w.safetensors",
                                                               "patterns/mine.py")
    assert parse_entry("a=/odd:dir/w.safetensors") == ("a", "/odd:dir/w.safetensors", None)
    for bad in ("a", "=w", "a=", "a=w:"):
        with pytest.raises(EvaluateError):
            parse_entry(bad)
    assert parse_horizons("1,4,12") == [1, 4, 12]
    with pytest.raises(EvaluateError):
        parse_horizons("")
