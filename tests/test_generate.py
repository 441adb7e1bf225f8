"""`sparse-forcing generate` (models/generate.py) on the tiny config with random weights:
generation far past the horizon keeps a bounded backend's cache constant (and the check
can fail: an unbounded cache grows), it is deterministic per seed, the dense rolling cache
and the compiled sliding window agree through it, the prefix and the truth are the world's
frames, the outputs are written, and bad input fails with an error naming it."""
import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from models import generate as gen
from models.attention import DenseBackend, model_layout
from models.checkpoint import CheckpointError, export_weights, save_checkpoint
from models.config import load_config
from models.data import from_uint8
from models.dit import CausalDiT
from models.sampling import continue_video
from models.world import render
from sparsedsl import presets

CFG = load_config("tiny")
C = CFG.video.chunk_frames        # 3
HORIZON = CFG.video.frames        # 9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared 2-core machine: one thread is ~10x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """Every weight random (a fresh model predicts x0 = 0 whatever the attention)."""
    torch.manual_seed(0)
    m = CausalDiT(CFG)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    return export_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", model.state_dict(), CFG)


def run(model, **kw):
    kw.setdefault("progress", False)
    return gen.generate(model, CFG, **kw)


# --- past the horizon: a bounded cache stays bounded ----------------------------------
def test_sparse_forcing_far_past_the_horizon_keeps_its_cache_constant(model):
    long = run(model, pattern="sparse-forcing", frames=8 * C, prefix_frames=C, world_seed=0)
    assert long.video.shape == (1, 24, 16, 16, 3) and long.video.dtype == np.uint8
    assert long.frames / HORIZON > 2.5 and len(long.chunk_latencies_s) == 8
    assert len(long.cache_bytes) == 8 and long.cache_bytes[-1] > 0
    assert long.cache_constant_from_chunk <= 2           # constant once the window has filled
    short = run(model, pattern="sparse-forcing", frames=2 * C, prefix_frames=C, world_seed=0)
    assert short.cache_bytes[-1] == long.cache_bytes[-1]  # and independent of N
    assert long.cache_bounded is True
    assert all(t > 0 for t in long.chunk_latencies_s)
    assert long.frames_per_s > 0 and long.time_to_first_chunk_s >= long.chunk_latencies_s[0]
    assert long.peak_memory_method == "peak RSS" and long.peak_memory_bytes > 2**20


def test_dense_rolling_cache_fills_then_stays_while_unbounded_caches_grow(model):
    rolling = run(model, pattern="dense", frames=6 * C)          # cache_frames = 9: window 6
    b = rolling.cache_bytes
    assert b[0] < b[1] and len(set(b[1:])) == 1 and rolling.cache_constant_from_chunk == 1
    unbounded = run(model, pattern=DenseBackend(CFG, cache_frames=10**6), frames=6 * C)
    u = unbounded.cache_bytes
    assert all(x < y for x, y in zip(u, u[1:]))                 # the check above can fail
    assert unbounded.cache_constant_from_chunk == len(u) - 1
    assert u[-1] == 6 * b[0]
    # a pattern with an unbounded window: its pool is sized for the run, so it grows with N
    causal = [run(model, pattern="dense-causal", frames=n * C) for n in (2, 4)]
    assert causal[0].cache_bounded is False and "unbounded window" in gen.summary(causal[1])
    assert causal[0].cache_bytes[-1] < causal[1].cache_bytes[-1]


# --- determinism ------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["dense", "sparse-forcing"])
def test_deterministic_given_the_seed(model, pattern):
    a = run(model, pattern=pattern, frames=4 * C, prefix_frames=C, world_seed=1, seed=3)
    b = run(model, pattern=pattern, frames=4 * C, prefix_frames=C, world_seed=1, seed=3)
    other = run(model, pattern=pattern, frames=4 * C, prefix_frames=C, world_seed=1, seed=4)
    assert torch.equal(a.samples, b.samples) and np.array_equal(a.video, b.video)
    assert (a.samples - other.samples).abs().max() > 1e-2


# --- backends that must agree do, through generate ---------------------------------------
@pytest.mark.parametrize("window", [3, 6])
def test_dense_rolling_cache_equals_compiled_sliding_window(model, window):
    dense = run(model, pattern="dense", cache_frames=window + C, frames=4 * C,
                prefix_frames=C, world_seed=2, batch=2)
    sliding = run(model, pattern=presets.sliding_window(model_layout(CFG), frames=window),
                  frames=4 * C, prefix_frames=C, world_seed=2, batch=2)
    assert sliding.pattern == "sliding-window" and "rolling" in dense.backend
    torch.testing.assert_close(sliding.samples, dense.samples, rtol=1e-4, atol=1e-4)


# --- the prefix and the truth -----------------------------------------------------------
def test_prefix_is_prefilled_and_truth_is_the_world_continuation(model):
    P, N = 2 * C, 3 * C
    r = run(model, pattern="dense", frames=N, prefix_frames=P, world_seed=5, seed=7, batch=2)
    prefix, _ = render(5, 0, P, CFG.video, CFG.world)
    truth, _ = render(5, P, N, CFG.video, CFG.world)
    assert np.array_equal(r.prefix, prefix) and np.array_equal(r.truth, truth)
    assert r.source == "world seed 5" and r.prefix_frames == P
    # exactly continue_video from those clean frames (the prefill is the cache's content)
    clean = from_uint8(prefix)[None].expand(2, -1, -1, -1, -1)
    ref = continue_video(model, DenseBackend(CFG), CFG, clean, N, torch.Generator().manual_seed(7))
    assert torch.equal(r.samples, ref)
    # the prefix matters, and the batch's samples continue it differently
    noise = run(model, pattern="dense", frames=N, seed=7, batch=2)
    assert noise.prefix is None and noise.truth is None and noise.source == "noise"
    assert (noise.samples - r.samples).abs().max() > 1e-2
    assert (r.samples[0] - r.samples[1]).abs().max() > 1e-2


def test_prefix_and_truth_from_a_video_folder(model, tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), np.uint8)
    np.save(tmp_path / "clip.npy", frames)
    r = run(model, frames=2 * C, prefix_frames=C, video_folder=tmp_path)
    assert np.array_equal(r.prefix, frames[:3]) and np.array_equal(r.truth, frames[3:9])
    assert r.source.endswith("clip.npy") and not r.notes
    short = run(model, frames=4 * C, prefix_frames=C, video_folder=tmp_path)
    assert np.array_equal(short.truth, frames[3:9])            # as far as the file goes
    assert any("6 of the 12 frames" in n for n in short.notes)


# --- outputs ------------------------------------------------------------------------------
def test_outputs_gif_mp4_stats_and_summary(model, tmp_path, capsys):
    P, N = C, 4 * C
    r = run(model, pattern="sparse-forcing", frames=N, prefix_frames=P, world_seed=0)
    paths = gen.write_outputs(r, tmp_path / "out")
    out = capsys.readouterr().out
    names = {p.name for p in paths}
    assert {"generated.gif", "stats.json"} <= names
    gif = Image.open(tmp_path / "out" / "generated.gif")
    assert gif.n_frames == P + N
    assert gif.size[0] > 2 * 128                               # truth | generated, upscaled
    try:
        import imageio_ffmpeg  # noqa: F401
        assert "generated.mp4" in names
    except ImportError:
        assert "no MP4 written" in out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    for key in ("frames_per_s", "time_to_first_chunk_s", "prefill_s", "chunk_latencies_s",
                "chunk_latency_median_s", "chunk_latency_max_s", "peak_memory_bytes",
                "peak_memory_method", "cache_bytes", "cache_bytes_first", "cache_bytes_last",
                "backend", "horizon_multiple"):
        assert key in stats, key
    assert len(stats["chunk_latencies_s"]) == 4 and stats["frames"] == N
    assert stats["truth_frames"] == N and stats["source"] == "world seed 0"
    for text in ("frames/s", "first chunk", "chunk latency median", "peak memory", "cache"):
        assert text in out


def test_cli_generates_past_the_horizon(weights, tmp_path, capsys):
    out = tmp_path / "gen"
    rc = gen.main(["generate", str(weights), "--config", "tiny", "--pattern", "sparse-forcing",
                   "--frames", "7", "--out", str(out), "--no-progress"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["frames"] == 9 and stats["prefix_frames"] == C          # rounded up; one chunk
    assert any("rounded up to 9" in n for n in stats["notes"])
    assert "rounded up" in capsys.readouterr().err
    assert Image.open(out / "generated.gif").n_frames == C + 9


# --- loading ------------------------------------------------------------------------------
def test_load_generator_from_file_and_run_folder(model, weights, tmp_path):
    loaded, cfg = gen.load_generator(weights)                        # config from the file
    assert cfg == CFG
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a.bfloat16().float(), msg=k)   # exported in bf16
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, {"generator": model.state_dict()}, {"stage": "self_forcing"}, CFG)
    (run_dir / "config.json").write_text(json.dumps(CFG.to_dict()))
    loaded, cfg = gen.load_generator(run_dir)
    assert cfg == CFG and all(torch.equal(a, b) for a, b in
                              zip(model.state_dict().values(), loaded.state_dict().values()))


# --- bad input ------------------------------------------------------------------------------
def test_missing_weights_file(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        gen.load_generator(missing)
    assert gen.main(["generate", str(missing), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-forcing: error:") and "nope.safetensors" in err
    assert len(err.splitlines()) == 1


def test_weights_of_another_config(weights, capsys):
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: video\.height = 16 in the "
                                              r"checkpoint but 64"):
        gen.load_generator(weights, "small")
    assert gen.main(["generate", str(weights), "--config", "small", "--no-progress"]) == 2
    assert "video.height" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(frames=0), "frames = 0"),
    (dict(frames=-3), "frames = -3"),
    (dict(prefix_frames=2, world_seed=0), "prefix_frames = 2: expected a multiple of chunk_frames"),
    (dict(prefix_frames=3), "prefix_frames = 3: needs a source"),
    (dict(prefix_frames=3, world_seed=0, video_folder="x"), "one prefix source"),
    (dict(video_folder="x"), "video_folder = 'x': needs prefix_frames"),
    (dict(pattern="no-such-pattern"), "pattern = 'no-such-pattern': expected 'dense', a sparsedsl"),
    (dict(pattern="sliding-window", cache_frames=6), "cache_frames = 6: only the 'dense'"),
    (dict(batch=0), "batch = 0"),
])
def test_bad_arguments_name_the_argument(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(model, **{"frames": C, **kwargs})


def test_pattern_file_without_pattern_is_a_one_line_cli_error(weights, tmp_path, capsys):
    bad = tmp_path / "no_pattern.py"
    bad.write_text(textwrap.dedent("""
        import sparsedsl as sd
        layout = sd.VideoLayout(4, 4, tile=(2, 2), chunk_frames=3)
    """))
    rc = gen.main(["generate", str(weights), "--pattern", str(bad), "--frames", "3",
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sparse-forcing: error: pattern:")
    assert "defines no variable `pattern`" in err
    assert not (tmp_path / "o").exists()
    assert gen.main(["generate", str(weights), "--pattern", str(tmp_path / "missing.py"),
                     "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the demo's extras: the memory picture and PSNR per training horizon -------------------
def test_a_patterns_memory_is_recorded_per_chunk_and_drawn(model, tmp_path, capsys):
    r = run(model, pattern="sparse-forcing", frames=6 * C, prefix_frames=C, world_seed=0)
    assert len(r.memory) == 6
    assert [m.frames for m in r.memory] == [C * (i + 2) for i in range(6)]   # prefix + chunks
    later = r.memory[-1]
    assert later.persistent and all(len(v) > 0 for v in later.persistent.values())
    paths = gen.write_outputs(r, tmp_path / "out")
    assert (tmp_path / "out" / "memory.png") in paths
    assert Image.open(tmp_path / "out" / "memory.png").size[0] > 400
    assert "PSNR vs the truth, per training horizon: 1.0x" in capsys.readouterr().out
    dense = run(model, pattern="dense", frames=2 * C, prefix_frames=C, world_seed=0)
    assert dense.memory == []


def test_revisits_are_marked_where_the_memory_held_the_last_frame_that_showed_them(model):
    """World 0's sprites leave the view and come back in the generated range; for each return,
    where the last frame that showed the sprite was in the memory of the chunk bringing it
    back follows from the pattern's own sink (1 frame) and window (3 frames at tiny)."""
    from models.world import revisits
    r = run(model, pattern="sparse-forcing", frames=6 * C, prefix_frames=C, world_seed=0)
    truth = revisits(0, 0, 7 * C, CFG.video, CFG.world)
    want = sorted((s, left, back) for s, pairs in truth.items() for left, back in pairs if back >= C)
    assert r.revisits == want and len(want) >= 3
    rows = gen.revisit_memory(r)
    window = CFG.attention.presets["sparse-forcing"]["window_frames"]
    scored = [(s, left, back) for s, left, back in want if (back - C) // C >= 1]
    assert [(x["sprite"], x["left"], x["back"]) for x in rows] == scored
    for row in rows:
        start = C + ((row["back"] - C) // C) * C          # first frame of the returning chunk
        seen = row["left"] - 1
        expected = ("sink" if seen < 1 else "window" if start - window <= seen < start else
                    "persistent" if row["blocks_kept"] > 0 else "dropped")
        assert row["where"] == expected, row
    assert {x["where"] for x in rows} - {"window"}, rows   # some return after leaving the window
    assert r.stats()["revisit_memory"] == rows


def test_psnr_by_horizon_windows_the_truth():
    frames, _ = render(0, 0, 20, CFG.video, CFG.world)
    r = gen.GenerationResult(
        video=frames[None].copy(), samples=torch.zeros(1), truth=frames, prefix=None,
        chunk_latencies_s=[1.0], time_to_first_chunk_s=1.0, frames_per_s=1.0,
        steady_frames_per_s=None, prefill_s=0.0, total_s=1.0, peak_memory_bytes=1,
        peak_memory_method="peak RSS", cache_bytes=[1], cache_bounded=True, backend="b",
        pattern="p", config="tiny", device="cpu", batch=1, frames=20, prefix_frames=0,
        chunk_frames=C, horizon_frames=HORIZON, seed=0, source="world seed 0")
    perfect = gen.psnr_by_horizon(r)
    n_windows = -(-20 // HORIZON)
    assert [m for m, _ in perfect][:-1] == [float(i + 1) for i in range(n_windows - 1)]
    assert perfect[-1][0] == pytest.approx(20 / HORIZON)
    assert all(db == 100.0 for _, db in perfect)                   # identical: capped inf
    r.video = r.video.copy()
    r.video[0, HORIZON:] = 255 - r.video[0, HORIZON:]             # the second window wrong
    worse = gen.psnr_by_horizon(r)
    assert worse[0][1] == 100.0 and worse[1][1] < 20.0
    r.truth = None
    assert gen.psnr_by_horizon(r) == []


def test_demo_command(weights, tmp_path, capsys):
    from models.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(weights), "--frames", "12", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "PSNR vs the truth" in text and "sparse-forcing" in text
    assert {"generated.gif", "stats.json", "memory.png"} <= {p.name for p in out.iterdir()}
    assert main(["demo", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "no trained generator there" in capsys.readouterr().err
