"""The three training stages end to end on the tiny config (CPU, seconds each).

1. each stage's loss falls on a fixed seed (the checkpoint's logged history);
2. a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one
   (teacher), and a finished short run extended to more steps equals a straight run
   (self-forcing through the sparse-forcing pattern);
3. two Gloo processes under torchrun equal one process with the same global batch;
4. a run checkpointed by two processes resumes on one and ends where a one-process run
   does;
5. the pattern's rollout cache stays bounded over a rollout much longer than its window;
6. bad configs and checkpoints stop the CLI with exit code 2 and one line naming the
   file and field, leaving the files on disk untouched.

The CLI runs are subprocesses (`python -m models train ...`, `python -m
torch.distributed.run ...`) of the real command line; the rest calls the Python API.
Subprocess runs are shared through module-scoped fixtures where several tests need them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from models.attention import DenseBackend, make_backend
from models.checkpoint import flatten_state, latest_step, load_checkpoint
from models.cli import main
from models.config import load_config
from models.flow import denoising_times
from models.rollout import gaussian_noise, rollout
from models.train.common import load_stage_weights
from models.train.self_forcing import train_self_forcing
from models.train.student import train_student
from models.train.teacher import train_teacher

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 300          # seconds for one subprocess run (they take ~5-20 s)

# the teacher runs of tests 2-4: N steps, a checkpoint every 2
TEACHER_STEPS = 40
TEACHER_SET = ("teacher.checkpoint_every=2",)
KILL_AT = 4            # SIGKILL once latest.json names a step >= this


# --- helpers -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(stage: str, run_dir, *args: str, sets=(), nproc: int = 1) -> list[str]:
    """`python -m models train STAGE --config tiny ...`, under torchrun when nproc > 1."""
    if nproc == 1:
        head = [sys.executable, "-m", "models"]
    else:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "models"]
    cmd = head + ["train", stage, "--config", "tiny", "--run-dir", str(run_dir), "--no-progress",
                  *args]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, (f"{' '.join(cmd)}\nexit {r.returncode}\n--- stdout\n"
                               f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}")
    return r


def teacher_cmd(run_dir, steps: int = TEACHER_STEPS, nproc: int = 1) -> list[str]:
    return train_cmd("teacher", run_dir, sets=(f"teacher.steps={steps}", *TEACHER_SET),
                     nproc=nproc)


def checkpoint_tensors(run_dir) -> tuple[dict, dict]:
    """The last checkpoint as {path: tensor} (models, optimisers, EMA) and its meta."""
    state, meta = load_checkpoint(run_dir)
    tensors, _ = flatten_state(state)
    return tensors, meta


def assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensors {sorted(a.keys() ^ b.keys())[:5]}"
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or not torch.equal(a[k], b[k])]
    assert not differ, (f"{what}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:4]}; "
                        f"max |diff| of {differ[0]}: "
                        f"{(a[differ[0]].float() - b[differ[0]].float()).abs().max().item():.3g}")


def assert_close_states(a: dict, b: dict, what: str, rtol=1e-4, atol=1e-5) -> None:
    assert a.keys() == b.keys(), f"{what}: different tensors {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "weights.safetensors"))


def history(run_dir) -> dict:
    return load_checkpoint(run_dir)[1]["history"]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def mean(values) -> float:
    return sum(values) / len(values)


def assert_falls(curve, name: str, n: int = 5) -> None:
    """The mean of the last n logged values is below the mean of the first n."""
    values = [v for _, v in curve]
    assert len(values) >= 2 * n, f"{name}: only {len(values)} values logged"
    assert all(math.isfinite(v) for v in values), f"{name}: not finite: {values}"
    first, last = mean(values[:n]), mean(values[-n:])
    assert last < first, f"{name} does not fall: first {n} {first:.4g}, last {n} {last:.4g}: {values}"


def seeded_train(fn, *args, **kwargs):
    """Call a training function with the global torch RNG seeded (and restored after).

    The stages draw every random number of a step from generators keyed by (seed, step,
    sample), but CausalDiT's initial weights come from the global RNG (see the report on
    StageRun.new_model), so an in-process run is reproducible only with it seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fn(*args, **kwargs)


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- shared runs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny teacher and student (the bundled tiny config), trained once for the module."""
    root = tmp_path_factory.mktemp("stages")
    cfg = load_config("tiny")
    seeded_train(train_teacher, cfg, root / "teacher", progress=False)
    train_student(cfg, root / "student", root / "teacher", progress=False)
    return SimpleNamespace(cfg=cfg, teacher=root / "teacher", student=root / "student")


@pytest.fixture(scope="module")
def teacher_straight(tmp_path_factory):
    """An uninterrupted one-process teacher run of TEACHER_STEPS steps (the CLI)."""
    run_dir = tmp_path_factory.mktemp("teacher-straight") / "run"
    run_ok(teacher_cmd(run_dir))
    return run_dir


# --- 1. losses fall ----------------------------------------------------------------------
# Step counts and batches chosen so that the last-5 mean is well below the first-5 mean for
# every seed tried (0-7): the velocity loss weights the x0 error by 1/t^2, so single steps
# with a small flow time spike; larger batches average that out.
def test_teacher_loss_falls(tmp_path):
    cfg = load_config("tiny", overrides={"teacher.steps": 40, "teacher.batch": 16,
                                         "teacher.log_every": 1, "teacher.checkpoint_every": 40,
                                         "teacher.seed": 0})
    seeded_train(train_teacher, cfg, tmp_path / "teacher", progress=False)
    curve = history(tmp_path / "teacher")["loss"]
    assert [s for s, _ in curve] == list(range(1, 41))
    assert_falls(curve, "teacher loss")


def test_student_losses_fall(stages, tmp_path):
    cfg = load_config("tiny", overrides={"student.ar_steps": 30, "student.steps": 20,
                                         "student.batch": 16, "student.log_every": 1,
                                         "student.checkpoint_every": 50, "student.seed": 0})
    train_student(cfg, tmp_path / "student", stages.teacher, progress=False)
    h = history(tmp_path / "student")
    assert [s for s, _ in h["ar_loss"]] == list(range(1, 31))
    assert [s for s, _ in h["ode_loss"]] == list(range(31, 51))
    assert_falls(h["ar_loss"], "student ar_loss (teacher forcing)")
    assert_falls(h["ode_loss"], "student ode_loss (ODE regression)")


def test_self_forcing_fake_loss_falls(stages, tmp_path):
    cfg = load_config("tiny", overrides={"self_forcing.steps": 30, "self_forcing.batch": 8,
                                         "self_forcing.fake_updates": 5,
                                         "self_forcing.log_every": 1,
                                         "self_forcing.checkpoint_every": 30,
                                         "self_forcing.snapshot_every": 10,
                                         "self_forcing.seed": 0})
    out = train_self_forcing(cfg, tmp_path / "sf", stages.teacher, stages.student,
                             pattern="dense", progress=False)
    h = history(tmp_path / "sf")
    assert_falls(h["fake_loss"], "self-forcing fake_loss")
    dmd = [v for _, v in h["dmd_loss"]]     # DMD's loss need not fall
    assert len(dmd) == 30 and all(math.isfinite(v) for v in dmd), dmd
    # the curves also live in history.json, and every 10th step's weights in snapshots/
    assert json.loads((tmp_path / "sf" / "history.json").read_text())["dmd_loss"] == \
        [list(p) for p in h["dmd_loss"]]
    snaps = sorted(p.name for p in (tmp_path / "sf" / "snapshots").iterdir())
    assert snaps == ["step-00010.safetensors", "step-00020.safetensors", "step-00030.safetensors"]
    last, final = load_file(str(tmp_path / "sf" / "snapshots" / snaps[-1])), load_file(str(out))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)
    first = load_file(str(tmp_path / "sf" / "snapshots" / snaps[0]))
    assert any(not torch.equal(first[k], last[k]) for k in first)
    # each snapshot continued the held-out world clips: its scores are in the history
    for key in ("val_psnr", "val_ssim", "val_roughness", "val_vivid", "val_sprites", "val_vivid_far"):
        assert [s for s, _ in h[key]] == [10, 20, 30], key
        assert all(math.isfinite(v) for _, v in h[key]), h[key]
    assert all(-1 <= v <= 1 for _, v in h["val_ssim"]) and all(v > 0 for _, v in h["val_roughness"])
    assert all(v >= 0 for _, v in h["val_vivid"]) and all(0 <= v <= 1 for _, v in h["val_sprites"])
    assert all(v >= 0 for _, v in h["val_vivid_far"])


# --- 2. exact resume -----------------------------------------------------------------------
def test_a_run_does_not_depend_on_the_global_rng(tmp_path):
    """What exact resume across processes and rank agreement under torchrun rest on: a
    run's numbers come from its config and seed alone, not from the state of torch's global
    RNG (random per process here, and different on every rank)."""
    cfg = load_config("tiny", overrides={"teacher.steps": 1})
    states = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            train_teacher(cfg, tmp_path / f"run{seed}", progress=False)
        states.append(checkpoint_tensors(tmp_path / f"run{seed}")[0])
    assert_bitwise(states[0], states[1], "one teacher config trained under two global torch "
                                         "seeds (initial weights from the global RNG?)")


def test_teacher_sigkill_then_resume_is_bit_identical(teacher_straight, tmp_path):
    run_dir = tmp_path / "killed"
    latest = run_dir / "checkpoints" / "latest.json"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(teacher_cmd(run_dir), cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
        killed_after = None
        try:
            deadline = time.monotonic() + TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    step = json.loads(latest.read_text())["step"]
                except (FileNotFoundError, ValueError, KeyError):
                    step = None
                if step is not None and step >= KILL_AT:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_after = step
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None and killed_after is None:
                proc.kill()
            proc.wait(timeout=60)
    output = (tmp_path / "killed.log").read_text()[-3000:]
    assert killed_after is not None, f"the run ended (exit {proc.returncode}) before " \
                                     f"checkpoint {KILL_AT}:\n{output}"
    assert proc.returncode == -signal.SIGKILL, output
    resume_from = latest_step(run_dir)
    assert killed_after <= resume_from < TEACHER_STEPS
    assert not (run_dir / "weights.safetensors").exists()

    run_ok(teacher_cmd(run_dir))     # the same command resumes
    assert summary(run_dir)["steps_this_run"] == TEACHER_STEPS - resume_from

    assert_bitwise(weights(run_dir), weights(teacher_straight), "exported weights")
    resumed, meta = checkpoint_tensors(run_dir)
    straight, meta_straight = checkpoint_tensors(teacher_straight)
    assert meta["step"] == meta_straight["step"] == TEACHER_STEPS
    assert_bitwise(resumed, straight, "last checkpoint (model, optimiser)")
    assert meta["history"] == meta_straight["history"]


def test_self_forcing_resume_is_bit_identical(stages, tmp_path):
    def cmd(run_dir, steps):
        return train_cmd("self-forcing", run_dir, "--pattern", "sparse-forcing",
                         "--teacher", str(stages.teacher), "--student", str(stages.student),
                         sets=(f"self_forcing.steps={steps}", "self_forcing.ema=0.9"))

    run_ok(cmd(tmp_path / "straight", 4))
    run_ok(cmd(tmp_path / "resumed", 2))
    assert latest_step(tmp_path / "resumed") == 2
    run_ok(cmd(tmp_path / "resumed", 4))
    assert summary(tmp_path / "resumed")["steps_this_run"] == 2

    assert_bitwise(weights(tmp_path / "resumed"), weights(tmp_path / "straight"),
                   "exported generator")
    resumed, meta = checkpoint_tensors(tmp_path / "resumed")
    straight, meta_straight = checkpoint_tensors(tmp_path / "straight")
    assert meta["step"] == meta_straight["step"] == 4
    assert meta["pattern"] == "sparse-forcing"
    assert_bitwise(resumed, straight, "last checkpoint (generator, EMA, fake score, optimisers)")
    assert any(k.startswith("ema") for k in resumed), sorted(resumed)[:5]
    assert meta["history"] == meta_straight["history"]


def test_self_forcing_ema_is_the_kept_generator(stages, tmp_path):
    """With `self_forcing.ema`, the EMA of the generator is what the stage snapshots and
    exports: after one update its warm-up decay is min(ema, 1/10), so the EMA is 0.1 x the
    student + 0.9 x the updated generator."""
    cfg = load_config("tiny", overrides={"self_forcing.steps": 1, "self_forcing.fake_updates": 1,
                                         "self_forcing.ema": 0.9, "self_forcing.snapshot_every": 1,
                                         "self_forcing.checkpoint_every": 1})
    train_self_forcing(cfg, tmp_path / "sf", stages.teacher, stages.student, pattern="dense",
                       progress=False)
    state, _ = load_checkpoint(tmp_path / "sf")
    start = load_stage_weights(cfg, stages.student, "student", "cpu").state_dict()
    generator, ema = state["generator"], state["ema"]
    moved = [k for k in generator if not torch.equal(generator[k], start[k].float())]
    assert moved, "one DMD update left the generator unchanged: the test would prove nothing"
    for k in generator:
        expect = start[k].float().lerp(generator[k].float(), 0.9)
        torch.testing.assert_close(ema[k].float(), expect, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"ema {k}: {m}")
    exported = load_file(str(tmp_path / "sf" / "weights.safetensors"))
    snapshot = load_file(str(tmp_path / "sf" / "snapshots" / "step-00001.safetensors"))
    for k in generator:
        assert torch.equal(exported[k], ema[k].to(exported[k].dtype)), f"export is not the EMA: {k}"
        assert torch.equal(snapshot[k], exported[k]), f"snapshot is not the EMA: {k}"


# --- 3. torchrun: two Gloo processes = one process ---------------------------------------
def test_teacher_two_processes_equal_one(teacher_straight, tmp_path):
    run_ok(teacher_cmd(tmp_path / "two", nproc=2))
    two, meta = checkpoint_tensors(tmp_path / "two")
    one, meta_one = checkpoint_tensors(teacher_straight)
    assert meta["step"] == meta_one["step"] == TEACHER_STEPS
    assert [s for s, _ in meta["history"]["loss"]] == [s for s, _ in meta_one["history"]["loss"]]
    assert_close_states(two, one, "2 processes vs 1 (fp32 checkpoint)")
    # the exported file is bf16: one rounding step apart at most
    assert_close_states(weights(tmp_path / "two"), weights(teacher_straight),
                        "2 processes vs 1 (bf16 export)", rtol=1e-2, atol=1e-4)
    assert summary(tmp_path / "two")["processes"] == 2


def test_self_forcing_two_processes_equal_one(stages, tmp_path):
    run_ok(train_cmd("self-forcing", tmp_path / "two", "--pattern", "dense",
                     "--teacher", str(stages.teacher), "--student", str(stages.student),
                     nproc=2))
    train_self_forcing(stages.cfg, tmp_path / "one", stages.teacher, stages.student,
                       pattern="dense", progress=False)
    two, meta = checkpoint_tensors(tmp_path / "two")
    one, meta_one = checkpoint_tensors(tmp_path / "one")
    assert meta["step"] == meta_one["step"] == stages.cfg.self_forcing.steps
    assert_close_states(two, one, "self-forcing, 2 processes vs 1")


# --- 4. resume on another number of processes ---------------------------------------------
def test_teacher_resumes_on_fewer_processes(teacher_straight, tmp_path):
    run_dir = tmp_path / "run"
    run_ok(teacher_cmd(run_dir, steps=TEACHER_STEPS // 2, nproc=2))
    assert latest_step(run_dir) == TEACHER_STEPS // 2
    run_ok(teacher_cmd(run_dir, steps=TEACHER_STEPS, nproc=1))
    assert summary(run_dir)["steps_this_run"] == TEACHER_STEPS // 2
    resumed, meta = checkpoint_tensors(run_dir)
    straight, meta_straight = checkpoint_tensors(teacher_straight)
    assert meta["step"] == TEACHER_STEPS
    assert [s for s, _ in meta["history"]["loss"]] == list(range(1, TEACHER_STEPS + 1))
    assert_close_states(resumed, straight, "2 processes then 1 vs 1 throughout")


# --- 5. the rollout cache stays bounded ---------------------------------------------------
def cache_curve(model, backend, cfg, frames: int) -> tuple[list[int], list[int]]:
    """(cache.nbytes(), blocks held) after each chunk of a `frames`-frame rollout."""
    v = cfg.video
    cache = backend.new_cache(1, "cpu", torch.float32, max_frames=frames)
    sizes, held = [], []

    def record(i, x0):
        sizes.append(cache.nbytes())
        inner = getattr(cache, "cache", None)      # a PatternCache's RolloutCache
        if inner is not None:
            layers = inner.state_dict(copy=False)["layers"]
            held.append(sum(L["k_pool"].shape[2] - L["n_free"] for L in layers))

    noise = gaussian_noise((1, v.chunk_frames, v.channels, v.height, v.width),
                           torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = rollout(model, cache, noise, frames, denoising_times(cfg.flow.denoising_steps,
                                                                     cfg.flow.shift),
                        on_chunk=record)
    assert video.shape[1] == frames and torch.isfinite(video).all()
    return sizes, held


def test_rollout_cache_stays_bounded(stages):
    cfg = stages.cfg
    chunks = 8
    frames = chunks * cfg.video.chunk_frames         # 24 frames: the window is 3
    model = load_stage_weights(cfg, stages.student, "student", "cpu").eval()

    sizes, held = cache_curve(model, make_backend(cfg, "sparse-forcing"), cfg, frames)
    assert len(sizes) == len(held) == chunks
    # sink + window + persistent capacity: full after a few chunks, then constant
    assert len(set(sizes)) == 1 and sizes[0] > 0, sizes
    assert held[0] < held[-1] and max(held) == held[-1] and len(set(held[3:])) == 1, held

    dense, _ = cache_curve(model, DenseBackend(cfg, cache_frames=9), cfg, frames)
    assert dense[0] < dense[1] and len(set(dense[1:])) == 1, dense   # 6 frames + the chunk

    growing, _ = cache_curve(model, DenseBackend(cfg, cache_frames=10**6), cfg, frames)
    assert growing == [(i + 1) * growing[0] for i in range(chunks)], growing
    assert growing[-1] > dense[-1] and growing[-1] > sizes[-1]


def test_self_forcing_rollout_cache_is_bounded_inside_the_stage(stages, tmp_path, monkeypatch):
    """Stage c with a rollout of 8 chunks (frames >> window): the cache its rollout uses,
    measured after every chunk, is constant, and the logged cache_mib is that size."""
    import models.train.self_forcing as sf
    recorded = []

    def instrumented(model, cache, noise, frames, times, **kwargs):
        sizes = []
        recorded.append(sizes)
        return sf_rollout(model, cache, noise, frames, times,
                          on_chunk=lambda i, x0: sizes.append(cache.nbytes()), **kwargs)

    sf_rollout = sf.rollout
    monkeypatch.setattr(sf, "rollout", instrumented)
    cfg = load_config("tiny", overrides={"self_forcing.steps": 1, "self_forcing.fake_updates": 1,
                                         "self_forcing.rollout_frames": 24})
    train_self_forcing(cfg, tmp_path / "sf", stages.teacher, stages.student,
                       pattern="sparse-forcing", progress=False)
    assert len(recorded) == 1 and len(recorded[0]) == 8, recorded
    assert len(set(recorded[0])) == 1, recorded
    (step, mib), = history(tmp_path / "sf")["cache_mib"]
    assert mib == recorded[0][-1] / 2**20


def test_long_rollout_scores_one_horizon_window(stages, tmp_path, monkeypatch):
    """Self-Forcing++'s long rollout: the generator rolls out 24 frames (8 chunks, the dense
    window rolling past the start), but the fake score and DMD see one chunk-aligned window
    of the teacher's 9 frames, drawn per step; only the window's chunks carry gradient."""
    import models.train.self_forcing as sf
    exits, noised = [], []
    sf_rollout, sf_add_noise = sf.rollout, sf.add_noise

    def recording_rollout(model, cache, noise, frames, times, exit_steps=None, **kwargs):
        exits.append(list(exit_steps))
        return sf_rollout(model, cache, noise, frames, times, exit_steps=exit_steps, **kwargs)

    def recording_add_noise(x0, eps, t):
        noised.append(x0.shape[1])
        return sf_add_noise(x0, eps, t)

    monkeypatch.setattr(sf, "rollout", recording_rollout)
    monkeypatch.setattr(sf, "add_noise", recording_add_noise)
    cfg = load_config("tiny", overrides={"self_forcing.steps": 6, "self_forcing.fake_updates": 1,
                                         "self_forcing.rollout_frames": 24,
                                         "self_forcing.log_every": 1})
    train_self_forcing(cfg, tmp_path / "sf", stages.teacher, stages.student, pattern="dense",
                       progress=False)
    assert set(noised) == {9}, noised                  # the scores never see more than the horizon
    starts = []
    for e in exits:
        assert len(e) == 8
        graded = [i for i, x in enumerate(e) if x is not None]
        assert graded == list(range(graded[0], graded[0] + 3)), e     # 3 chunks in a row
        starts.append(graded[0])
    assert len(set(starts)) > 1, starts                # the window moves between steps
    assert all(math.isfinite(v) for _, v in history(tmp_path / "sf")["dmd_loss"])


# --- 6. bad configs and checkpoints --------------------------------------------------------
def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit with code 2 and one line of error on stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-forcing: error: "), err
    return lines[0]


TINY_TOML = str(REPO / "models" / "configs" / "tiny.toml")


@pytest.mark.parametrize("args, names", [
    (["--set", "modell.dim=3"], [TINY_TOML, "modell"]),
    (["--set", "model.dimm=3"], [TINY_TOML, "model.dimm", "a field of [model]"]),
    (["--set", 'teacher.steps="ten"'], [TINY_TOML, "teacher.steps", "'ten'", "an integer"]),
    (["--set", "teacher.steps=ten"], [TINY_TOML, "teacher.steps", "an integer"]),
    (["--set", "video.frames=10"], [TINY_TOML, "video.frames", "10", "chunk_frames = 3"]),
    (["--set", "teacher.steps"], ["--set", "KEY=VALUE"]),
    (["--set", "teacher.checkpoint_every=0"], [TINY_TOML, "teacher.checkpoint_every", "0", ">= 1"]),
    (["--set", "student.snapshot_every=-2"], [TINY_TOML, "student.snapshot_every", "-2", ">= 0"]),
    (["--set", "self_forcing.rollout_frames=6"],
     [TINY_TOML, "self_forcing.rollout_frames", "6", "at least video.frames = 9"]),
    (["--set", "self_forcing.rollout_frames=19"],
     [TINY_TOML, "self_forcing.rollout_frames", "19", "multiple of video.chunk_frames = 3"]),
    (["--set", "self_forcing.ema=1.0"], [TINY_TOML, "self_forcing.ema", "1.0", "[0, 1)"]),
], ids=["unknown-section", "unknown-key", "wrong-type", "bare-word", "cross-field", "no-value",
        "zero-checkpoint-interval", "negative-snapshot-interval", "rollout-shorter-than-horizon",
        "rollout-not-whole-chunks", "ema-decay-of-one"])
def test_bad_override(capsys, tmp_path, args, names):
    line = cli_error(capsys, "train", "teacher", "--config", "tiny", "--run-dir",
                     str(tmp_path / "run"), "--no-progress", *args)
    for name in names:
        assert name in line, line
    assert not (tmp_path / "run").exists()


def test_unknown_config_name(capsys, tmp_path):
    line = cli_error(capsys, "train", "teacher", "--config", "nope", "--run-dir",
                     str(tmp_path / "run"), "--no-progress")
    assert "--config" in line and "'nope'" in line and "tiny" in line, line
    line = cli_error(capsys, "train", "teacher", "--config", str(tmp_path / "nope.toml"),
                     "--run-dir", str(tmp_path / "run"), "--no-progress")
    assert str(tmp_path / "nope.toml") in line, line


@pytest.mark.parametrize("edit, names", [
    (lambda text: text.replace("[teacher]\nsteps = 6", '[teacher]\nsteps = "ten"'),
     ["teacher.steps", "'ten'", "an integer"]),
    (lambda text: text + "\n[modell]\ndim = 3\n", ["modell"]),
    (lambda text: text.replace("[model]\npatch = 4", "[model]\npatch = 4\ndimm = 3"),
     ["model.dimm"]),
    (lambda text: text.replace("\nframes = 9", "\nframes = 10"), ["video.frames", "chunk_frames"]),
    (lambda text: text + "\n[broken\n", ["valid TOML"]),
], ids=["wrong-type", "unknown-section", "unknown-key", "cross-field", "not-toml"])
def test_bad_config_file(capsys, tmp_path, edit, names):
    text = Path(TINY_TOML).read_text()
    bad = edit(text)
    assert bad != text, "the edit did not apply: tiny.toml changed?"
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    line = cli_error(capsys, "train", "teacher", "--config", str(path), "--run-dir",
                     str(tmp_path / "run"), "--no-progress")
    for name in [str(path), *names]:
        assert name in line, line


def test_unknown_pattern(capsys, stages, tmp_path):
    line = cli_error(capsys, "train", "self-forcing", "--config", "tiny", "--pattern", "nope",
                     "--run-dir", str(tmp_path / "run"), "--teacher", str(stages.teacher),
                     "--student", str(stages.student), "--no-progress")
    assert "attention.pattern" in line and "'nope'" in line and "sparse-forcing" in line, line


def test_teacher_of_another_config(capsys, stages, tmp_path):
    line = cli_error(capsys, "train", "student", "--config", "tiny", "--set", "model.dim=48",
                     "--run-dir", str(tmp_path / "run"), "--teacher", str(stages.teacher),
                     "--no-progress")
    assert str(stages.teacher / "weights.safetensors") in line, line
    assert "model.dim = 32 in the checkpoint but 48 in the config" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_teacher(capsys, tmp_path):
    line = cli_error(capsys, "train", "student", "--config", "tiny", "--run-dir",
                     str(tmp_path / "run"), "--teacher", str(tmp_path / "nowhere"), "--no-progress")
    assert str(tmp_path / "nowhere") in line and "train it first" in line, line


def test_teacher_init_continues_from_weights(stages, tmp_path):
    """`--init WEIGHTS` starts the teacher (and its EMA) from trained weights with a fresh
    optimiser: after one step every weight is within one Adam step (lr, plus the bf16
    rounding of the export) of the start; a run without it starts from the initial weights,
    which the trained teacher left far behind."""
    cfg = load_config("tiny", overrides={"teacher.steps": 1, "teacher.checkpoint_every": 1})
    start = weights(stages.teacher)
    seeded_train(train_teacher, cfg, tmp_path / "init", progress=False, init=str(stages.teacher))
    seeded_train(train_teacher, cfg, tmp_path / "fresh", progress=False)

    def outside_one_step(run) -> float:
        after, out, total = weights(run), 0, 0
        for k, w in start.items():
            bound = 1.01 * cfg.teacher.lr + w.float().abs() * 2 ** -7 + 1e-6
            out += ((after[k].float() - w.float()).abs() > bound).sum().item()
            total += w.numel()
        return out / total

    assert outside_one_step(tmp_path / "init") == 0
    assert outside_one_step(tmp_path / "fresh") > 0.1


def test_init_is_for_the_teacher_only(capsys, stages, tmp_path):
    line = cli_error(capsys, "train", "student", "--config", "tiny", "--run-dir",
                     str(tmp_path / "run"), "--init", str(stages.teacher), "--no-progress")
    assert "--init" in line and "teacher" in line, line


def corrupt_run(stages, tmp_path, damage) -> tuple[Path, Path, dict]:
    """A copy of the tiny teacher's run with `damage(checkpoints_dir)` applied; returns (run
    dir, the damaged file, every file of the run's checkpoints before the resume)."""
    run_dir = tmp_path / "run"
    shutil.copytree(stages.teacher, run_dir)
    damaged = damage(run_dir / "checkpoints")
    return run_dir, damaged, files_of(run_dir)


def resume_error(capsys, run_dir) -> str:
    return cli_error(capsys, "train", "teacher", "--config", "tiny", "--run-dir", str(run_dir),
                     "--no-progress")


def flip_last_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def truncate(path: Path) -> Path:
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    return path


def latest_record(ckdir: Path) -> Path:
    return ckdir / json.loads((ckdir / "latest.json").read_text())["file"]


@pytest.mark.parametrize("damage, says", [
    (lambda ck: flip_last_byte(latest_record(ck).with_suffix(".safetensors")), "checksum mismatch"),
    (lambda ck: truncate(ck / "latest.json"), "not valid JSON"),
    (lambda ck: truncate(latest_record(ck)), "not valid JSON"),
    (lambda ck: (latest_record(ck).with_suffix(".safetensors").unlink(),
                 latest_record(ck).with_suffix(".safetensors"))[1], "no such file"),
], ids=["flipped-byte", "truncated-latest-json", "truncated-record", "missing-tensors"])
def test_damaged_checkpoint_is_refused_and_left_alone(capsys, stages, tmp_path, damage, says):
    run_dir, damaged, before = corrupt_run(stages, tmp_path, damage)
    line = resume_error(capsys, run_dir)
    assert str(damaged) in line and says in line, line
    after = files_of(run_dir)
    assert after.keys() == before.keys()
    changed = [str(p) for p in before if before[p] != after[p]]
    assert not changed, f"the failed resume rewrote {changed}"


def test_roughness_separates_the_world_from_noise():
    """The number the self-forcing log and the snapshots' scores watch: the world's frames
    sit near 0.2, white noise near 1.4 (docs/training.md)."""
    from models.data import from_uint8
    from models.train.validation import roughness
    from models.world import render
    cfg = load_config("small")
    world = torch.stack([from_uint8(render(s, 0, 6, cfg.video, cfg.world)[0]) for s in range(4)])
    assert 0.1 < roughness(world) < 0.35
    noise = torch.randn(4, 6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert 1.2 < roughness(noise) < 1.6
    assert roughness(world + 0.3 * noise) > 2 * roughness(world)


# --- profiling ---------------------------------------------------------------------------
def test_profile_writes_step_times_and_ops(tmp_path):
    """`train --profile 1:2`: the two steps after the first are recorded; profile.txt gives
    their wall time per step and the ops (the model's matmuls among them), profile.json the
    trace; the run itself is unchanged (its checkpoint equals one without the profiler)."""
    runs = {}
    for name, extra in (("plain", []), ("profiled", ["--profile", "1:2"])):
        run_dir = tmp_path / name
        assert main(["train", "teacher", "--config", "tiny", "--run-dir", str(run_dir),
                     "--no-progress", "--set", "teacher.steps=4", "--set", "device=\"cpu\"",
                     *extra]) == 0
        runs[name] = checkpoint_tensors(run_dir)[0]
    text = (tmp_path / "profiled" / "profile.txt").read_text()
    assert text.startswith("2 steps recorded after 1 skipped: ") and "ms a step" in text
    assert "aten::" in text and "mm" in text
    assert json.loads((tmp_path / "profiled" / "profile.json").read_text())["traceEvents"]
    assert not (tmp_path / "plain" / "profile.txt").exists()
    assert_bitwise(runs["plain"], runs["profiled"], "with and without --profile")


@pytest.mark.parametrize("value", ["10", "a:b", "-1:3", "2:0", "1:2:3"])
def test_bad_profile_option(capsys, tmp_path, value):
    line = cli_error(capsys, "train", "teacher", "--config", "tiny", "--run-dir",
                     str(tmp_path / "run"), "--no-progress", f"--profile={value}")
    assert "--profile" in line and repr(value) in line and "SKIP:STEPS" in line
    assert not (tmp_path / "run").exists()
