"""The model side's command line: `sparse-forcing` (the front end `sparsedsl` never imports
models/).

    sparse-forcing train teacher      --config small
    sparse-forcing train student      --config small            # from runs/small/teacher
    sparse-forcing train self-forcing --config small --pattern sparse-forcing
    sparse-forcing train self-forcing --config small --pattern dense
    sparse-forcing generate runs/small/self-forcing-sparse-forcing --pattern sparse-forcing --frames 240
    sparse-forcing evaluate --config small --entry sparse=WEIGHTS:sparse-forcing --entry dense=WEIGHTS:dense
    sparse-forcing configs

Run folders default to runs/<config>/<stage>[-<pattern>]; a stage started again in the
same folder resumes from its last checkpoint. Under torchrun every process runs the same
command (`torchrun --nproc-per-node 2 -m models train teacher --config small`).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError, bundled_configs, load_config, parse_overrides
from .data import HELD_OUT_WORLDS

STAGES = ("teacher", "student", "self-forcing")
EXIT_STOPPED = 3   # a stage stopped at its --time-limit: resumable, not finished


def cmd_train(args) -> int:
    from .train.common import default_run_dir
    cfg = load_config(args.config, parse_overrides(args.set))
    stage = args.stage.replace("-", "_")
    if args.init is not None and stage != "teacher":
        raise ConfigError("command line", "--init", args.init,
                          f"only with `train teacher`; the {args.stage} stage starts from "
                          "--teacher/--student")
    pattern = args.pattern
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(
        cfg, stage, pattern if stage == "self_forcing" else None)
    teacher = Path(args.teacher) if args.teacher else default_run_dir(cfg, "teacher")
    student = Path(args.student) if args.student else default_run_dir(cfg, "student")
    progress = not args.no_progress
    if args.compile:
        from .dit import compile_blocks
        compile_blocks()
    profiler = contextlib.nullcontext()
    if args.profile is not None:
        from .train.profiling import parse_profile, profile_steps
        try:
            skip, steps = parse_profile(args.profile)
        except ValueError as e:
            raise ConfigError("command line", "--profile", args.profile, str(e)) from None
        profiler = profile_steps(run_dir, skip, steps)
    with profiler:
        if stage == "teacher":
            from .train.teacher import train_teacher
            out = train_teacher(cfg, run_dir, progress=progress, time_limit=args.time_limit,
                                data=args.data, init=args.init)
        elif stage == "student":
            from .train.student import train_student
            out = train_student(cfg, run_dir, teacher, progress=progress,
                                time_limit=args.time_limit, data=args.data)
        else:
            from .train.self_forcing import train_self_forcing
            out = train_self_forcing(cfg, run_dir, teacher, student, pattern=pattern,
                                     progress=progress, time_limit=args.time_limit)
    print(f"{args.stage} done: weights in {out}, loss curve in {run_dir / 'loss.png'}, "
          f"samples in {run_dir / 'samples'}")
    return 0


def cmd_export(args) -> int:
    cfg = load_config(args.config, parse_overrides(args.set))
    if args.best:
        from .train.snapshots import export_best
        try:
            step, path = export_best(args.run_dir, cfg, args.out, args.best)
        except ValueError as e:
            print(f"sparse-forcing export: error: {e}", file=sys.stderr)
            return 2
        print(f"snapshot of step {step} of {args.run_dir} (the highest {args.best}) written to {path}")
        return 0
    from .train.common import export_run
    path = export_run(cfg, args.run_dir, args.out)
    print(f"weights of {args.run_dir}'s last checkpoint written to {path}")
    return 0


DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "checkpoints" / "small-sparse-forcing.safetensors"


def cmd_demo(args) -> int:
    """`generate` with the demo's choices: the shipped small generator continues a world
    prefix far past its training horizon through the compiled sparse-forcing pattern (the
    generated kernels on CUDA, the PyTorch backend on CPU), beside the true continuation."""
    weights = Path(args.weights) if args.weights else DEMO_WEIGHTS
    if not weights.exists():
        print(f"sparse-forcing: error: {weights}: no trained generator there"
              + ("" if args.weights else " (the shipped generator is part of the repository: "
                 "restore checkpoints/ from git, or pass --weights FILE)"),
              file=sys.stderr)
        return 2
    from .generate import cmd_generate
    argv = ["generate", str(weights), "--pattern", args.pattern, "--frames", str(args.frames),
            "--prefix", str(args.prefix), "--world-seed", str(args.world_seed), "--out", args.out]
    if args.no_progress:
        argv.append("--no-progress")
    return cmd_generate(build_parser().parse_args(argv))


def cmd_configs(args) -> int:
    for name in bundled_configs():
        cfg = load_config(name)
        print(f"{name:10s} {cfg.video.height}x{cfg.video.width}x{cfg.video.channels}, "
              f"{cfg.video.frames} frames in chunks of {cfg.video.chunk_frames}, "
              f"dim {cfg.model.dim} x {cfg.model.layers} layers, {cfg.tokens_per_frame} tokens/frame")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-forcing",
                                     description="Train the reference Sparse Forcing model, generate "
                                                 "with it and evaluate it.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run one training stage (resumes its run folder)")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", default="small",
                   help="a bundled config (" + ", ".join(bundled_configs()) + ") or a .toml file")
    p.add_argument("--pattern", default=None,
                   help="self-forcing: 'dense' (Self-Forcing's rolling window), a sparsedsl "
                        "preset or a .py file defining `pattern` (default: the config's)")
    p.add_argument("--run-dir", default=None, help="default runs/<config>/<stage>[-<pattern>]")
    p.add_argument("--teacher", default=None, help="teacher run folder or weights file")
    p.add_argument("--student", default=None, help="student run folder or weights file")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="teacher: start from these weights with a fresh optimiser (continue a "
                        "teacher across short GPU leases); ignored when the run folder resumes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set teacher.steps=100")
    p.add_argument("--data", default=None, metavar="FOLDER",
                   help="teacher/student: train on a folder of your own .npy/.npz/.mp4 videos "
                        "instead of the procedural world")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks' element-wise work and matmuls (GPU; the "
                        "first steps pay for compilation)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop at a checkpoint after MINUTES (exit code 3); the same command resumes")
    p.add_argument("--profile", default=None, metavar="SKIP:STEPS",
                   help="torch.profiler over STEPS steps after the first SKIP of this run: "
                        "profile.txt (wall vs device time per step, top ops) and profile.json "
                        "(Chrome trace) in the run folder")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", help="write the weights of a run's last checkpoint "
                                      "(e.g. a stage stopped by --time-limit)")
    p.add_argument("run_dir")
    p.add_argument("--config", default="small")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None,
                   help="default RUN_DIR/weights.safetensors (RUN_DIR/best.safetensors with --best)")
    p.add_argument("--best", nargs="?", const="val_sprites", default=None, metavar="SCORE",
                   help="instead of the last checkpoint, the snapshot with the highest "
                        "validation SCORE (default val_sprites; val_vivid, val_psnr, val_ssim), "
                        "leaving out noisy ones (val_roughness >= 0.3) and, where scored, "
                        "those that lose or over-draw the sprites past the horizon "
                        "(val_vivid_far outside 0.5-2)")
    p.set_defaults(func=cmd_export)
    from .generate import add_parser as add_generate_parser
    from .evaluate import add_parser as add_evaluate_parser
    add_generate_parser(sub)
    add_evaluate_parser(sub)
    p = sub.add_parser("demo", help="the shipped small generator: a long world continuation "
                                    "through the sparse-forcing pattern, with the truth beside it")
    p.add_argument("--weights", default=None, help=f"default {DEMO_WEIGHTS.name} in checkpoints/")
    p.add_argument("--pattern", default="sparse-forcing")
    p.add_argument("--frames", type=int, default=240, help="frames to generate (default 240)")
    p.add_argument("--prefix", type=int, default=3, help="true frames to continue (default 3)")
    p.add_argument("--world-seed", type=int, default=HELD_OUT_WORLDS,
                   help=f"the world to continue (default {HELD_OUT_WORLDS}, one no training stage saw)")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("configs", help="list the bundled configs")
    p.set_defaults(func=cmd_configs)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .train.common import TimeLimitReached
    from .video_files import VideoFileError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, VideoFileError) as e:
        print(f"sparse-forcing: error: {e}", file=sys.stderr)
        return 2
    except TimeLimitReached as e:
        print(f"sparse-forcing: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
