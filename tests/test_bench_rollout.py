"""bench/rollout.py --tiny: the rollout benchmark's code path runs on the CPU (torch backend, eager
Flex) and prints one table per (preset, tile) with a row per timed step; bad options fail fast
with a one-line error naming the option."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "rollout.py"
COLUMNS = ["step", "program path", "frames", "visited frames", "visited blocks / query block",
           "real key tokens / query block", "program.attention ms", "kernel alone ms",
           "visit tables + select ms", "program.attention as a CUDA graph ms", "SDPA rolling 21 ms",
           "SDPA all frames ms", "SDPA visited frames ms", "Flex prebuilt mask ms",
           "Flex mask rebuilt ms", "speedup vs SDPA rolling 21", "slower than SDPA on visited frames"]
TIMED = ["program.attention ms", "kernel alone ms", "visit tables + select ms",
         "SDPA rolling 21 ms", "SDPA all frames ms", "SDPA visited frames ms",
         "Flex prebuilt mask ms", "Flex mask rebuilt ms"]


def run(*args, tmp_path, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", OUT=str(tmp_path))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=timeout)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{table title: rows as {column: cell}} of the markdown tables in `text`."""
    found = {}
    for part in text.split("### Rollout: ")[1:]:
        lines = [line for line in part.splitlines() if line.startswith("|")]
        columns = [c.strip() for c in lines[0].strip("|").split("|")]
        assert columns == COLUMNS
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
        assert all(len(row) == len(columns) for row in cells), cells
        found[part.splitlines()[0]] = [dict(zip(columns, row)) for row in cells]
    return found


def test_tiny_rollout_prints_a_row_per_timed_step(tmp_path):
    out_md = tmp_path / "bench.md"
    result = run("--tiny", "--out", str(out_md), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = tables(result.stdout)
    assert len(found) == 2, list(found)              # sparse-forcing and moba, 2x4 tiles
    assert any(title.startswith("sparse-forcing, 2x4") for title in found)
    assert any(title.startswith("moba, 2x4") for title in found)
    for title, rows in found.items():
        assert [r["step"] for r in rows] == ["0", "1", "2"], title
        assert [r["frames"] for r in rows] == ["3", "6", "9"], title
        for row in rows:
            for column in TIMED:   # eager Flex and every other alternative ran
                assert float(row[column]) > 0, (title, column, row[column])
            assert row["slower than SDPA on visited frames"] in ("no", "**yes**")
            assert row["program.attention as a CUDA graph ms"] == "n/a (CPU)"   # GPU only
    assert "command: `PYTHONPATH=. python bench/rollout.py --tiny --out" in result.stdout
    assert tables(out_md.read_text()) == found          # --out appends the same tables
    assert (tmp_path / "rollout.png").stat().st_size > 0   # the plot goes to $OUT by default


@pytest.mark.parametrize("args, option", [(["--steps", "0"], "--steps"),
                                          (["--presets", "no-such-preset"], "--presets"),
                                          (["--timed-steps", "5"], "--timed-steps"),
                                          (["--tiles", "8by8"], "--tiles")])
def test_bad_option_fails_with_one_line_naming_it(tmp_path, args, option):
    result = run("--tiny", *args, tmp_path=tmp_path, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0], result.stderr
    assert "### Rollout" not in result.stdout


@pytest.mark.parametrize("dense_path, keys, want", [("on", "one-buffer", ["dense"] * 3),
                                                    ("on", "cat", ["dense"] * 3),
                                                    ("off", "one-buffer", ["sparse"] * 3)])
def test_dense_path_option_forces_the_path(tmp_path, dense_path, keys, want):
    """--dense-path on takes the dense path at every step sink + window visits whole frames
    (all of them); off keeps the block kernels; the table's path column says which ran
    (with either --dense-keys)."""
    result = run("--tiny", "--presets", "sink-window", "--no-flex", "--plot", "none",
                 "--dense-path", dense_path, "--dense-keys", keys, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (rows,) = tables(result.stdout).values()
    assert [r["program path"] for r in rows] == want
