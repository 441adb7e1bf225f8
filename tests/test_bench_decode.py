"""bench/decode.py --tiny: the decoding benchmark's code path (whole model, dense ring cache and
the sparse-forcing preset on the torch backend) runs on the CPU and prints one row per
(pattern, horizon); bounded caches report the same KV bytes at both horizons; bad options
fail fast with a one-line error naming the option; the ring cache equals the model's dense
cache."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.attention import DenseBackend
from models.config import load_config
from models.flow import denoising_times
from models.rollout import rollout

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "decode.py"
COLUMNS = ["pattern", "frames", "frames/s", "speedup", "chunk median", "last chunk",
           "attention / chunk (share)", "peak memory", "peak KV", "KV saving"]


def run(*args, cwd, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=False, env=env, cwd=cwd, timeout=timeout)


def table_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    assert columns == COLUMNS
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode")
    result = run("--tiny", "--frames", "9,12", "--json", str(tmp / "decode.json"),
                 "--out", str(tmp / "bench.md"), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp / "decode.json").read_text()), tmp


def test_tiny_prints_a_row_per_pattern_and_horizon(tiny):
    result, _, tmp = tiny
    rows = table_rows(result.stdout)
    assert [(r["pattern"], r["frames"]) for r in rows] == [
        ("dense", "9"), ("sparse-forcing", "9"), ("dense", "12"), ("sparse-forcing", "12")]
    for r in rows:
        assert float(r["frames/s"]) > 0
        assert r["speedup"].endswith("x") and r["chunk median"].endswith(("ms", " s"))
        assert r["peak memory"] == "—"                    # no CUDA: no max_memory_allocated
    assert [r["speedup"] for r in rows if r["pattern"] == "dense"] == ["1.00x", "1.00x"]
    assert "`tiny` config" in result.stdout and "torch.compile off" in result.stdout
    assert "`python bench/decode.py --tiny --frames 9,12" in result.stdout
    assert table_rows((tmp / "bench.md").read_text()) == rows      # --out appends the table


def test_bounded_caches_report_the_same_kv_at_both_horizons(tiny):
    _, data, _ = tiny
    runs = {(r["pattern"], r["frames"]): r for r in data["runs"]}
    # tiny sparse-forcing (1 sink frame, 3-frame window, 2 blocks of memory) reaches its steady
    # state at 9 frames: the pool is sized for it and never grows
    sparse9, sparse12 = runs["sparse-forcing", 9], runs["sparse-forcing", 12]
    assert sparse9["kv_peak_bytes"] == sparse12["kv_peak_bytes"] > 0
    assert len(set(sparse12["kv_bytes"])) == 1 and len(sparse12["kv_bytes"]) == 4
    # the dense ring: a fixed 9-frame buffer; it keeps the 6 frames before the chunk
    dense9, dense12 = runs["dense", 9], runs["dense", 12]
    assert dense9["kv_peak_bytes"] == dense12["kv_peak_bytes"]
    assert dense12["kv_kept_bytes"] == dense12["kv_peak_bytes"] * 6 // 9
    for r in data["runs"]:
        assert len(r["chunk_latencies_s"]) == r["frames"] // 3
        assert 0 < r["probe_s"] and 0 < r["probe_no_attention_s"]


@pytest.mark.parametrize("args, option", [
    (["--frames", "0"], "--frames"),
    (["--frames", "10"], "--frames"),
    (["--patterns", "dense,no-such-pattern"], "--patterns"),
    (["--layers", "0"], "--layers"),
])
def test_a_bad_option_is_one_line_naming_it(args, option, tmp_path):
    result = run("--tiny", *args, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "error" in lines[0], result.stderr


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ring_cache_computes_what_the_model_dense_cache_computes():
    """15 frames: the 9-frame ring wraps around (frames 9-14 overwrite slots 0-5)."""
    decode = _load_script()
    cfg, cpu = load_config("tiny"), torch.device("cpu")
    model = decode.build_model(cfg, cpu, torch.float32, seed=0)
    times = denoising_times(cfg.flow.denoising_steps, cfg.flow.shift)
    videos, caches = [], []
    for backend in (decode.RingDenseBackend(cfg), DenseBackend(cfg)):
        noise = decode.noise_source(cfg, cpu, torch.float32, seed=0)
        caches.append(backend.new_cache(1, cpu, torch.float32))
        with torch.no_grad():
            videos.append(rollout(model, caches[-1], noise, 15, times))
    assert videos[0].abs().max() > 0.1                   # the random gates reach the output
    torch.testing.assert_close(videos[0], videos[1], atol=1e-5, rtol=1e-5)
    ring, dense = caches
    assert ring.frame_start == dense.frame_start == 15
    assert ring.kept_nbytes() == dense.nbytes()          # the same 6 frames kept between chunks
    assert decode.sdpa_agrees(ring, "math")              # --sdpa best's check, on the wrapped ring
