"""Evaluation of generators against the true continuation of the procedural world.

    from models.evaluate import evaluate
    summary = evaluate([("dense", "runs/small/self-forcing/weights.safetensors", "dense"),
                        ("sparse", "runs/small/self-forcing-sparse-forcing/weights.safetensors",
                         "sparse-forcing")],
                       seeds=8, prefix_frames=3, horizons=(1, 4, 12), cfg=cfg, device="cuda",
                       out_dir="out/eval")

    sparse-forcing evaluate --config small --entry dense=runs/.../weights.safetensors:dense \\
        --entry sparse=runs/.../weights.safetensors:sparse-forcing --seeds 8 --horizons 1,4,12

For every entry (a name, a weights file or a loaded model, a pattern) and every seed s, the
first `prefix_frames` frames of world s (`models.world.render`, from frame 0) are given to
the model (`models.sampling.continue_video`) and it generates `max(horizons)` training
horizons (`cfg.video.frames` frames each) after them; the same noise for every entry of one
seed (common random numbers: differences between entries are not noise draws). The
generated frames are compared with the world's true frames (`models/metrics.py`): per-frame
PSNR, SSIM and colour-histogram distance, identity recall of sprites that come back into
view, and drift (per-frame colour statistics, similarity of frames `gap` apart).

Written to `out_dir`: `results.md` (the table), `psnr_vs_horizon.png`, `metrics.json`
(every number), and `<entry>_seed<first seed>.gif` (truth | generated, prefix included).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import media
from . import metrics as M
from .checkpoint import CheckpointError, atomic_path, sample_generator
from .config import Config, ConfigError
from .data import HELD_OUT_WORLDS, from_uint8, to_uint8
from .world import render

DEFAULT_HORIZONS = (1, 4, 12)       # multiples of the training horizon (cfg.video.frames)
DEFAULT_GAPS = (2, 5, 10, 20, 50)
EVAL_STREAM = 0xE7A1                # the evaluation's noise stream in sample_generator
LEVEL = 0.95                        # confidence level of every interval
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class EvaluateError(ValueError):
    """Bad evaluation input (entries, seeds, horizons, prefix): a one-line message."""


Entry = tuple  # (name, weights path | torch.nn.Module, pattern | None)


# --- inputs ------------------------------------------------------------------------------
def _seed_list(seeds) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise EvaluateError(f"seeds = {seeds}: evaluate at least 1 seed")
        return list(range(HELD_OUT_WORLDS, HELD_OUT_WORLDS + int(seeds)))   # unseen worlds
    out = [int(s) for s in seeds]
    if not out:
        raise EvaluateError("seeds: evaluate at least 1 seed")
    if len(set(out)) != len(out) or min(out) < 0:
        raise EvaluateError(f"seeds = {out}: expected distinct seeds >= 0")
    return out


def _check(entries, seeds, prefix_frames: int, horizons, cfg: Config):
    if not entries:
        raise EvaluateError("no entry to evaluate")
    names = [str(e[0]) for e in entries]
    for e in entries:
        if len(e) != 3:
            raise EvaluateError(f"entry {e!r}: expected (name, weights or model, pattern)")
        if not NAME.fullmatch(str(e[0])):
            raise EvaluateError(f"entry name {e[0]!r}: use letters, digits and . _ + - "
                                "(it names files)")
    if len(set(names)) != len(names):
        raise EvaluateError(f"entry names {names} repeat: each needs its own name")
    seeds = _seed_list(seeds)
    c = cfg.video.chunk_frames
    if isinstance(prefix_frames, bool) or not isinstance(prefix_frames, (int, np.integer)) \
            or prefix_frames < 0 or prefix_frames % c:
        raise EvaluateError(f"prefix = {prefix_frames}: expected a multiple of "
                            f"video.chunk_frames = {c} (>= 0)")
    horizons = sorted({int(h) for h in horizons}) if horizons else []
    if not horizons or horizons[0] < 1:
        raise EvaluateError(f"horizons = {horizons}: expected multiples >= 1 of the training "
                            f"horizon ({cfg.video.frames} frames)")
    return seeds, int(prefix_frames), horizons


def _device(device) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_model(weights, cfg: Config, device: torch.device):
    """The given module, or a generator loaded by `models.generate.load_generator` (an
    exported weights file or a run folder, checked against `cfg`)."""
    if isinstance(weights, torch.nn.Module):
        return weights.to(device).eval()
    from .generate import load_generator
    model, _ = load_generator(weights, cfg, device)
    return model.eval()


def _numerics(cfg: Config, device: torch.device):
    """(cache dtype, autocast) as in training: bf16 autocast on CUDA when the config says so."""
    if device.type == "cuda" and cfg.precision == "bf16":
        return torch.bfloat16, torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.float32, contextlib.nullcontext()


# --- one rollout --------------------------------------------------------------------------
def _generate(model, backend, cfg: Config, prefix_u8: np.ndarray, frames: int, seed: int,
              device: torch.device, on_chunk=None) -> np.ndarray:
    dtype, autocast = _numerics(cfg, device)
    from .sampling import continue_video
    prefix = from_uint8(prefix_u8)[None].to(device)
    video = continue_video(model, backend, cfg, prefix, frames,
                           generator=sample_generator(seed, EVAL_STREAM), dtype=dtype,
                           autocast=autocast, on_chunk=on_chunk)
    return to_uint8(video[0])


def _seed_metrics(gen: np.ndarray, truth: np.ndarray, meta, prefix_meta, cfg: Config,
                  gaps) -> dict:
    stats_gen, stats_truth = M.frame_stats(gen), M.frame_stats(truth)
    return {
        "psnr": M.psnr_per_frame(gen, truth),
        "ssim": M.ssim_per_frame(gen, truth),
        "hist": M.color_histogram_distance(gen, truth),
        "mean_drift": np.abs(stats_gen["mean"] - stats_truth["mean"]).mean(axis=1),
        "frame_stats": {"gen": stats_gen, "truth": stats_truth},
        "gap_ssim": {"gen": M.gap_similarity(gen, gaps), "truth": M.gap_similarity(truth, gaps)},
        "recall": M.revisit_recall(gen, meta, cfg, context_meta=prefix_meta),
        "vivid": M.vivid_fraction(gen),
        "vivid_truth": M.vivid_fraction(truth),
        "sprites": M.sprite_visibility(gen, meta, cfg),
    }


# --- aggregation -------------------------------------------------------------------------
def _interval(values) -> dict:
    ci = M.confidence_interval(values, LEVEL)
    return {"mean": ci.mean, "half_width": ci.half_width, "n": ci.n}


def _interval_or_none(values) -> Optional[dict]:
    """The interval of `values`, None when there are none (no sprite in view, say)."""
    return _interval(values) if len(values) else None


def _aggregate(per_seed: list[dict], horizons: list[int], F: int) -> dict:
    """Over seeds: each horizon's window means, recall, drift, per-frame curves."""
    out: dict[str, Any] = {"horizons": {}}
    for h in horizons:
        window = slice((h - 1) * F, h * F)
        out["horizons"][f"{h}x"] = {
            "frames": [window.start, window.stop],
            **{k: _interval([float(np.mean(s[k][window])) for s in per_seed])
               for k in ("psnr", "ssim", "hist", "mean_drift")},
            # the share of sprite-coloured pixels (%), generated and true: a ratio of the two
            # per seed is unbounded where the true window shows no sprite
            "vivid": _interval([100 * float(np.mean(s["vivid"][window])) for s in per_seed]),
            "vivid_truth": _interval([100 * float(np.mean(s["vivid_truth"][window]))
                                      for s in per_seed]),
            "sprites": _interval_or_none([float(np.nanmean(s["sprites"][window]))
                                          for s in per_seed
                                          if np.isfinite(s["sprites"][window]).any()])}
    records = [r for s in per_seed for r in s["recall"]["records"] if r["score"] is not None]
    seed_scores = [s["recall"]["mean_score"] for s in per_seed
                   if s["recall"]["mean_score"] is not None]
    out["recall"] = {
        "revisits": len(records),
        "seeds_with_revisits": len(seed_scores),
        "score": _interval(seed_scores) if seed_scores else None,
        "success_rate": float(np.mean([r["success"] for r in records])) if records else None,
        "successes": int(sum(r["success"] for r in records)),
        "context_revisits": sum(r["seen_in_context"] for r in records),
        "context_success_rate": (float(np.mean([r["success"] for r in records
                                                if r["seen_in_context"]]))
                                 if any(r["seen_in_context"] for r in records) else None),
    }
    curves = {}
    for k in ("psnr", "ssim", "hist"):
        stack = np.stack([s[k] for s in per_seed])           # [seeds, frames]
        cis = [M.confidence_interval(col, LEVEL) for col in stack.T]
        curves[k] = {"mean": [c.mean for c in cis], "half_width": [c.half_width for c in cis]}
    out["per_frame"] = curves
    gaps = sorted(set.intersection(*(set(s["gap_ssim"]["gen"]) for s in per_seed)))
    out["gap_ssim"] = {side: {str(g): _interval([s["gap_ssim"][side][g] for s in per_seed])
                              for g in gaps} for side in ("gen", "truth")}
    return out


# --- output ------------------------------------------------------------------------------
def _json_safe(x):
    """numpy -> lists; non-finite floats -> None (strict JSON has no inf or nan)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _fmt(ci: Optional[dict], digits: int = 2) -> str:
    if ci is None:
        return "n/a"
    m, hw = ci["mean"], ci["half_width"]
    if m is None or not math.isfinite(m):
        return "inf" if m is not None and m > 0 else "n/a"
    if hw is None or not math.isfinite(hw):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {hw:.{digits}f}"


def _results_md(summary: dict) -> str:
    hz, F = summary["horizons"], summary["training_horizon"]
    last = f"{hz[-1]}x"
    head = (["entry", "pattern"] + [f"PSNR {h}x" for h in hz] + [f"SSIM {h}x" for h in hz]
            + [f"sprite pixels % {h}x (truth)" for h in hz] + [f"sprites shown {h}x" for h in hz]
            + ["recall score", "recall success", f"hist. drift {last}"])
    rows = []
    for name, e in summary["entries"].items():
        agg = e["aggregate"]
        rec = agg["recall"]
        success = ("n/a (no revisit)" if rec["success_rate"] is None else
                   f"{100 * rec['success_rate']:.0f}% ({rec['successes']}/{rec['revisits']})")
        rows.append([name, e["pattern"]]
                    + [_fmt(agg["horizons"][f"{h}x"]["psnr"]) for h in hz]
                    + [_fmt(agg["horizons"][f"{h}x"]["ssim"], 3) for h in hz]
                    + [f'{_fmt(agg["horizons"][f"{h}x"]["vivid"])} '
                       f'({agg["horizons"][f"{h}x"]["vivid_truth"]["mean"]:.2f})' for h in hz]
                    + [_fmt(agg["horizons"][f"{h}x"]["sprites"], 3) for h in hz]
                    + [_fmt(rec["score"], 3), success, _fmt(agg["horizons"][last]["hist"], 3)])
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    gaps = sorted({g for e in summary["entries"].values()
                   for g in e["aggregate"]["gap_ssim"]["gen"]}, key=int)
    drift = ["| entry | " + " | ".join(f"gap {g}: gen / truth" for g in gaps) + " |",
             "|" + "---|" * (len(gaps) + 1)]
    for name, e in summary["entries"].items():
        g = e["aggregate"]["gap_ssim"]
        drift.append(f"| {name} | " + " | ".join(
            f"{_fmt(g['gen'].get(k), 3)} / {_fmt(g['truth'].get(k), 3)}" for k in gaps) + " |")
    seeds = summary["seeds"]
    intro = (f"{len(summary['entries'])} entries x {len(seeds)} seeds (world seeds {seeds}); "
             f"each continues the world's first {summary['prefix_frames']} frames for "
             f"{summary['frames_generated']} frames ({hz[-1]} x the training horizon of {F} "
             "frames), the same noise for every entry of a seed.")
    legend = (f"PSNR (dB) and SSIM at a horizon Nx are means over the frames of the last "
              f"training-horizon-length window ending there, i.e. generated frames "
              f"[(N-1)*{F}, N*{F}), then over seeds: mean ± the half width of the "
              f"{100 * LEVEL:.0f}% Student-t interval over seeds (no ± with one seed). "
              "Recall score: per seed the mean over revisits (a sprite back in view after "
              "leaving it, scored on the frames of its stay where it is not occluded) of the "
              f"fraction of its solid pixels within {M.RECALL_DISTANCE:.0f} (RGB distance) of "
              "its true colour, then mean ± CI over the seeds that have revisits; success: "
              f"revisits pooled over seeds scoring >= {M.RECALL_SUCCESS}. Histogram drift: "
              "total-variation distance of 8-bin per-channel colour histograms (0 = same "
              "colours, 1 = disjoint), window mean at the last horizon. Sprite pixels: the "
              "percentage of the window's pixels that are vivid (sprite-coloured; the world's "
              "backgrounds have none), generated, with the true video's mean in brackets: "
              "0 when the generator has lost the sprites, which PSNR, rewarding blur, does "
              "not show. Sprites shown: the share of the true sprites' solid pixels drawn "
              "in their colour where the world has them (frames with a sprite in view). "
              f"Metrics: {M.METRIC_BACKEND}.")
    return "\n".join([
        f"# Evaluation: {summary['config']}", "", intro, "", *table, "", legend, "",
        "## Drift: SSIM between frames t and t + gap (generated / true video)", "",
        ("A generated video that freezes scores above the truth at long gaps; one that "
         "dissolves into noise scores below it."), "",
        *drift, "",
        ("PSNR against frame index: `psnr_vs_horizon.png`; every number: `metrics.json`; "
         "GIFs (truth | generated) of the first seed: `<entry>_seed<seed>.gif`."), ""])


def _plot(path: Path, summary: dict) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    F = summary["training_horizon"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, e in summary["entries"].items():
        curve = e["aggregate"]["per_frame"]["psnr"]
        y = np.asarray(curve["mean"], np.float64)
        hw = np.asarray(curve["half_width"], np.float64)
        y = np.where(np.isfinite(y), y, np.nan)
        x = np.arange(1, len(y) + 1)
        (line,) = ax.plot(x, y, label=name, linewidth=1.2)
        if np.isfinite(hw).any():
            ax.fill_between(x, y - hw, y + hw, color=line.get_color(), alpha=0.2, linewidth=0)
    for h in summary["horizons"]:
        ax.axvline(h * F, color="grey", linestyle=":", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"generated frame (training horizon = {F} frames; dotted: evaluated horizons)")
    ax.set_ylabel("PSNR (dB)")
    band = f", band: {100 * LEVEL:.0f}% CI over seeds" if len(summary["seeds"]) > 1 else ""
    ax.set_title(f"{summary['config']}: PSNR vs horizon ({len(summary['seeds'])} seeds{band})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --- the evaluation ------------------------------------------------------------------------
def evaluate(entries: Sequence[Entry], seeds: Union[int, Sequence[int]], prefix_frames: int,
             horizons: Sequence[int], cfg: Config, device="auto",
             out_dir: Union[str, Path] = "out/eval", progress: bool = True,
             gaps: Sequence[int] = DEFAULT_GAPS) -> dict:
    """Evaluate every entry on every seed; write results.md, psnr_vs_horizon.png,
    metrics.json and the first seed's GIFs to `out_dir`; return the summary (metrics.json's
    content, with non-finite numbers as None).

    `entries`: (name, weights file or loaded model, pattern: "dense", a preset, a .py file,
    a Pattern, or None for the config's); `seeds`: a count (0..n-1) or the world seeds;
    `prefix_frames`: true frames given (a multiple of chunk_frames); `horizons`: multiples
    of the training horizon at which windows are reported. Inputs are checked and every
    model loaded and pattern compiled before the first rollout (EvaluateError, ConfigError,
    CheckpointError, FileNotFoundError)."""
    from .attention import make_backend
    seeds, prefix_frames, horizons = _check(entries, seeds, prefix_frames, horizons, cfg)
    M._need_backend()
    device = _device(device)
    F = cfg.video.frames
    frames = max(horizons) * F
    dtype, _ = _numerics(cfg, device)
    prepared = []
    for name, weights, pattern in entries:
        model = _load_model(weights, cfg, device)
        backend = make_backend(cfg, pattern, device=device, dtype=dtype)
        prepared.append((str(name), weights, pattern, model, backend))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    truths = {}
    for seed in seeds:
        video, meta = render(seed, 0, prefix_frames + frames, cfg.video, cfg.world)
        truths[seed] = (video, meta)
    summary: dict[str, Any] = {
        "config": cfg.name, "seeds": seeds, "prefix_frames": prefix_frames,
        "horizons": horizons, "training_horizon": F, "frames_generated": frames,
        "device": str(device), "metric_backend": M.METRIC_BACKEND, "confidence_level": LEVEL,
        "notes": ("per-frame arrays index the generated frames (0 = the first after the "
                  "prefix); null = not finite (PSNR of identical frames is +inf; a CI half "
                  "width is undefined for one seed)"),
        "entries": {}}
    bar = tqdm(total=len(prepared) * len(seeds), desc="evaluate", unit="rollout",
               disable=not progress, dynamic_ncols=True)
    chunks = frames // cfg.video.chunk_frames
    for name, weights, pattern, model, backend in prepared:
        per_seed = []
        for seed in seeds:
            video, meta = truths[seed]
            bar.set_postfix(entry=name, seed=seed)

            def on_chunk(i, _x, name=name, seed=seed):
                if (i + 1) % max(1, chunks // 10) == 0 or i + 1 == chunks:
                    bar.set_postfix(entry=name, seed=seed, chunk=f"{i + 1}/{chunks}")

            t0 = time.perf_counter()
            gen = _generate(model, backend, cfg, video[:prefix_frames], frames, seed, device,
                            on_chunk if progress else None)
            seconds = time.perf_counter() - t0
            truth = video[prefix_frames:]
            m = _seed_metrics(gen, truth, meta[prefix_frames:], meta[:prefix_frames], cfg, gaps)
            m["seed"], m["seconds"] = seed, seconds
            per_seed.append(m)
            if seed == seeds[0]:
                media.write_gif(out_dir / f"{name}_seed{seed}.gif",
                                [video, np.concatenate([video[:prefix_frames], gen])],
                                fps=8, scale=2, labels=["truth", name])
            bar.update(1)
        summary["entries"][name] = {
            "weights": None if isinstance(weights, torch.nn.Module) else str(weights),
            "pattern": backend.name,
            "backend": backend.describe(),
            "aggregate": _aggregate(per_seed, horizons, F),
            "per_seed": {str(m.pop("seed")): m for m in per_seed}}
    bar.close()
    safe = _json_safe(summary)
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(safe, indent=1, allow_nan=False) + "\n")
    with atomic_path(out_dir / "results.md") as tmp:
        tmp.write_text(_results_md(summary))
    _plot(out_dir / "psnr_vs_horizon.png", summary)
    return safe


# --- command line -------------------------------------------------------------------------
def parse_entry(text: str) -> tuple[str, str, Optional[str]]:
    """NAME=WEIGHTS[:PATTERN] -> (name, weights, pattern or None). The pattern is what
    follows the last ':' when that is a bare name (a preset, 'dense') or a .py file."""
    name, eq, rest = text.partition("=")
    if not eq or not name or not rest:
        raise EvaluateError(f"--entry {text!r}: expected NAME=WEIGHTS[:PATTERN], e.g. "
                            "sparse=runs/small/self-forcing-sparse-forcing/weights.safetensors"
                            ":sparse-forcing")
    weights, colon, pattern = rest.rpartition(":")
    if colon and weights and pattern and ("/" not in pattern or pattern.endswith(".py")):
        return name, weights, pattern
    if colon and not pattern:
        raise EvaluateError(f"--entry {text!r}: empty PATTERN after ':'")
    return name, rest, None


def parse_horizons(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise EvaluateError(f"--horizons {text!r}: expected comma-separated integers >= 1, "
                            "e.g. 1,4,12")
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `evaluate` subcommand of `sparse-forcing` (models/cli.py calls this)."""
    from .config import bundled_configs
    p = subparsers.add_parser(
        "evaluate", help="compare generators with the world's true continuation "
                         "(PSNR/SSIM vs horizon, revisit recall, drift)")
    p.add_argument("--config", default="small",
                   help="a bundled config (" + ", ".join(bundled_configs()) + ") or a .toml file")
    p.add_argument("--entry", action="append", default=[], metavar="NAME=WEIGHTS[:PATTERN]",
                   help="a generator to evaluate (repeat for each); PATTERN: 'dense', a "
                        "sparsedsl preset or a .py file (default: the config's)")
    p.add_argument("--seeds", type=int, default=8,
                   help=f"N held-out worlds, seeds {HELD_OUT_WORLDS} + 0..N-1 (worlds no training "
                        "stage draws; default 8)")
    p.add_argument("--prefix", type=int, default=3,
                   help="true frames given before generation (a multiple of chunk_frames)")
    p.add_argument("--horizons", default=",".join(map(str, DEFAULT_HORIZONS)),
                   help="multiples of the training horizon to report (default 1,4,12)")
    p.add_argument("--out", default="out/eval", help="output folder (default out/eval)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)
    return p


def cmd_evaluate(args) -> int:
    """Run the evaluation; bad input is one line on stderr and exit code 2."""
    try:
        from .config import load_config, parse_overrides
        if not args.entry:
            raise EvaluateError("no --entry given: pass NAME=WEIGHTS[:PATTERN] at least once")
        if args.seeds < 1:
            raise EvaluateError(f"--seeds {args.seeds}: evaluate at least 1 seed")
        cfg = load_config(args.config, parse_overrides(args.set))
        entries = [parse_entry(e) for e in args.entry]
        for name, weights, _ in entries:
            if not Path(weights).is_file():
                raise FileNotFoundError(f"--entry {name}: {weights}: no such weights file")
        summary = evaluate(entries, args.seeds, args.prefix, parse_horizons(args.horizons), cfg,
                           device=args.device or cfg.device, out_dir=args.out,
                           progress=not args.no_progress)
    except (EvaluateError, ConfigError, CheckpointError, FileNotFoundError,
            M.MetricsUnavailable) as e:
        print(f"sparse-forcing evaluate: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"evaluated {len(summary['entries'])} entries x {len(summary['seeds'])} seeds: "
          f"{out / 'results.md'}, {out / 'psnr_vs_horizon.png'}, {out / 'metrics.json'}")
    return 0
