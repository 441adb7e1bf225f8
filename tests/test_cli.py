"""The `sparsedsl` command line and the block-mask picture, run in-process through `main([...])`."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sparsedsl as sd
from sparsedsl import plot
from sparsedsl.cli import demo_schedule, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL_PATTERN = """
import sparsedsl as sd

pattern = sd.Pattern(
    layout=sd.VideoLayout(8, 10, tile=(4, 4), chunk_frames=2),
    sink=sd.Sink(1),
    persistent=sd.Persistent(capacity=4),
    window=sd.LocalWindow(2, sd.Radius(1, 1, 1) | sd.TopK(k=2)),
    name="my-small-pattern",
)
"""


def write(tmp_path, text, name="pattern.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def assert_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


# --- explain ------------------------------------------------------------------------------
def test_explain_preset_with_custom_horizons(capsys):
    assert main(["explain", "sliding-tile", "--horizon", "21", "--horizon", "42"]) == 0
    out = capsys.readouterr().out
    assert "for 'sliding-tile'" in out
    assert "T=21" in out and "T=42" in out
    assert "5 s" not in out            # the default horizons are replaced, not extended
    assert "causal (nothing from the future): yes" in out


def test_explain_pattern_file_with_heads_and_head_dim(tmp_path, capsys):
    path = write(tmp_path, SMALL_PATTERN)
    assert main(["explain", path, "--heads", "4", "--head-dim", "32", "--horizon", "12"]) == 0
    out = capsys.readouterr().out
    assert "for 'my-small-pattern'" in out
    assert "heads 4 (kv 4) x 32" in out
    assert "T=12" in out


def test_explain_png_writes_a_picture(tmp_path, capsys):
    png = tmp_path / "pics" / "sf.png"
    assert main(["explain", "sparse-forcing", "--horizon", "21", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {png}" in out
    assert_png(png, min_bytes=30_000)


def test_explain_png_at_a_chosen_step_of_a_file_pattern(tmp_path, capsys):
    path = write(tmp_path, SMALL_PATTERN)
    png = tmp_path / "small.png"
    assert main(["explain", path, "--horizon", "8", "--png", str(png), "--step", "0"]) == 0
    assert_png(png)


# --- presets ------------------------------------------------------------------------------
def test_presets_lists_every_name_with_its_docstring(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(sd.presets.PRESETS)
    for line, (name, factory) in zip(lines, sd.presets.PRESETS.items()):
        assert line.startswith(name)
        assert factory.__doc__.strip().splitlines()[0] in line


# --- errors: one line on stderr, exit status 2, no traceback -------------------------------
def run_error(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    return captured.err


def test_unknown_preset(capsys):
    err = run_error(capsys, ["explain", "sparse-forcin"])
    assert "unknown preset 'sparse-forcin'" in err
    assert "sparse-forcing" in err      # the names that do exist
    assert len(err.strip().splitlines()) == 1


def test_missing_pattern_file(tmp_path, capsys):
    err = run_error(capsys, ["explain", str(tmp_path / "nope.py")])
    assert "does not exist" in err


def test_file_without_pattern(tmp_path, capsys):
    path = write(tmp_path, "import sparsedsl as sd\nlayout = sd.VideoLayout(8, 8)\n")
    err = run_error(capsys, ["explain", path])
    assert "defines no variable `pattern`" in err


def test_file_whose_pattern_is_not_a_pattern(tmp_path, capsys):
    path = write(tmp_path, "pattern = 'sparse-forcing'\n")
    err = run_error(capsys, ["explain", path])
    assert "not a sparsedsl.Pattern" in err


def test_pattern_error_in_the_file_names_the_field(tmp_path, capsys):
    path = write(tmp_path, """
        import sparsedsl as sd
        pattern = sd.Pattern(sd.VideoLayout(8, 8), window=sd.LocalWindow(frames=0))
    """)
    err = run_error(capsys, ["explain", path])
    assert "window.frames = 0" in err
    assert len(err.strip().splitlines()) == 1


def test_pattern_error_from_the_compile_options(capsys):
    err = run_error(capsys, ["explain", "sliding-tile", "--heads", "3", "--kv-heads", "2"])
    assert "num_kv_heads = 2" in err


def test_other_exception_in_the_file_is_one_line(tmp_path, capsys):
    path = write(tmp_path, "import sparsedsl as sd\npattern = sd.Pattern(sd.VideoLayot(8, 8))\n")
    err = run_error(capsys, ["explain", path])
    assert "AttributeError" in err and "VideoLayot" in err


def test_bad_option_value_is_a_usage_error(capsys):
    run_error(capsys, ["explain", "sliding-tile", "--horizon", "0"])


# --- demo ---------------------------------------------------------------------------------
def test_demo_passes_and_draws_the_full_size_picture(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "for 'sparse-forcing'" in out and "60 s" in out       # the full-size report
    assert out.count("PASS  step") == 12                          # 4 steps x 3 checks
    assert "FAIL" not in out
    assert_png(tmp_path / "sparse-forcing.png", min_bytes=30_000)


def test_demo_tiny_without_the_full_size_part(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--batch", "1",
                 "--seed", "3", "--no-full-size"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS  step") == 9
    assert not (tmp_path / "sparse-forcing.png").exists()


def test_demo_fails_loudly(tmp_path, capsys, monkeypatch):
    # A cache that holds one byte too many must fail the bytes check and the exit status.
    real = sd.reference.RolloutState.nbytes
    monkeypatch.setattr(sd.reference.RolloutState, "nbytes", lambda self, dtype: real(self, dtype) + 1)
    assert main(["demo", "--out", str(tmp_path), "--steps", "2", "--no-full-size"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  step 0: cache bytes" in out
    assert "FAIL: 2 of 6 checks failed" in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "sparsedsl", "presets"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "sparse-forcing" in result.stdout


# --- the picture's content ------------------------------------------------------------------
def test_default_step_is_the_first_steady_state_step():
    sf = sd.lower(sd.presets.get("sparse-forcing"))
    # 1 sink + 6 window frames + ceil(64 / 28) = 3 frames of evictions -> 10 frames -> step 4.
    assert plot.default_step(sf) == 4
    assert sf.shapes.max_visits_at(4) == sf.max_visits
    assert sf.shapes.max_visits_at(3) < sf.max_visits
    # Unbounded windows never settle: the step that ends the 5 s horizon.
    assert plot.default_step(sd.lower(sd.presets.get("dense-causal"))) == 6
    # Capped so the history stays drawable.
    big = sd.lower(sd.presets.sparse_forcing(capacity=100_000))
    history = (plot.default_step(big) + 1) * big.layout.chunk_blocks
    assert history <= plot.MAX_HISTORY_BLOCKS


@pytest.mark.parametrize("step", [0, 1, 2, 3, 5])
def test_segments_match_the_schedule(step):
    schedule = demo_schedule()
    pic = plot.block_mask_segments(schedule, step, head=1, seed=5)
    lay = schedule.layout
    nb = lay.blocks_per_frame
    assert pic.grid.shape == (lay.chunk_blocks, (step + 1) * lay.chunk_blocks)
    evicted = max(0, step * lay.chunk_frames - schedule.sink_frames - schedule.window.frames) * nb
    assert len(pic.persistent) == min(schedule.capacity, evicted)
    assert max(pic.visits) == schedule.shapes.max_visits_at(step)
    assert sum(pic.visits) == pic.attended
    code = {name: i for i, name in enumerate(plot.SEGMENTS, 1)}
    for qb in range(lay.chunk_blocks):
        row = pic.grid[qb]
        assert sorted(np.flatnonzero(row == code["current"])) == schedule.current_blocks(step, qb)
        assert sorted(np.flatnonzero(row == code["sink"])) == schedule.sink_blocks(step)
        assert sorted(np.flatnonzero(row == code["persistent"])) == list(pic.persistent)
        topk = list(np.flatnonzero(row == code["window-top-k"]))
        assert topk == list(pic.topk[qb])
        assert len(topk) == schedule.topk_count(step, qb)
        assert set(topk) <= set(schedule.topk_candidates(step, qb))


def test_topk_picks_the_highest_representative_scores():
    schedule = demo_schedule()
    step, head, seed = 3, 0, 11
    pic = plot.block_mask_segments(schedule, step, head=head, seed=seed)
    q, k = plot._representatives(schedule, step, seed)
    for qb in range(schedule.layout.chunk_blocks):
        cands = schedule.topk_candidates(step, qb)
        scores = {kb: float(q[head, qb] @ k[head, kb]) for kb in cands}
        cut = min(scores[kb] for kb in pic.topk[qb])
        assert all(scores[kb] <= cut for kb in cands if kb not in pic.topk[qb])


def test_picture_is_deterministic_and_seeded():
    schedule = demo_schedule()
    a = plot.block_mask_segments(schedule, 3, seed=1)
    b = plot.block_mask_segments(schedule, 3, seed=1)
    c = plot.block_mask_segments(schedule, 3, seed=2)
    assert np.array_equal(a.grid, b.grid)
    assert not np.array_equal(a.grid, c.grid)


def test_draw_without_path_returns_a_figure_and_bad_arguments_are_named():
    schedule = demo_schedule()
    fig = plot.draw_block_mask(schedule, step=2)
    assert "step 2" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="head"):
        plot.block_mask_segments(schedule, 1, head=schedule.num_heads)
    with pytest.raises(ValueError, match="step"):
        plot.block_mask_segments(schedule, -1)


def test_compile_writes_readable_source(tmp_path, capsys):
    assert main(["compile", "sparse-forcing", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob("sparse-forcing-*.py"))
    assert len(written) == 1
    text = written[0].read_text()
    assert "Pattern 'sparse-forcing'" in text and "def pbsa_fwd_kernel" in text
    assert str(written[0]) in capsys.readouterr().out


def test_check_passes_for_a_preset_and_reports(capsys):
    assert main(["check", "sink-window", "--examples", "2", "--backend", "torch"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_check_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU error cannot occur")
    assert main(["check", "sink-window", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_explain_rollout_draws_the_memory_over_time(tmp_path):
    png = tmp_path / "memory.png"
    assert main(["explain", "sparse-forcing", "--heads", "2", "--head-dim", "16",
                 "--rollout", "30", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_rollout_without_png_is_a_clear_error(capsys):
    assert main(["explain", "sparse-forcing", "--rollout", "30"]) == 2
    assert "--png" in capsys.readouterr().err


def test_bench_without_a_gpu_says_how_to_smoke_test(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the no-GPU hint cannot occur")
    assert main(["bench", "--memory"]) == 2
    assert "--tiny" in capsys.readouterr().err


def test_bench_lists_every_benchmark_and_each_exists(capsys):
    """`sparsedsl bench --list` is the one entry point: every name it lists has its module in
    bench/, and every module of bench/ has a name."""
    from pathlib import Path

    from sparsedsl.cli import BENCH_SCRIPTS
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    bench = Path(__file__).resolve().parent.parent / "bench"
    for name, (script, _) in BENCH_SCRIPTS.items():
        assert name in out and (bench / script).is_file(), name
    assert {s for s, _ in BENCH_SCRIPTS.values()} == {p.name for p in bench.glob("*.py")}
