"""The self-forcing training step under each attention backend, and the attention's share.

    PYTHONPATH=. python bench/model_step.py --config small --patterns dense,sparse-forcing
    PYTHONPATH=. python bench/model_step.py --tiny          # CPU smoke test

For every pattern: the wall time of one self-forcing step as the stage runs it
(`models.train.self_forcing.SelfForcingStep`: the rollout through the pattern's cache,
the fake-score updates, the DMD update), median of --steps after one warm-up step, and the
same step with the rollout's attention replaced by returning v (the memory update and
every other kernel still run): the difference is the rollout attention's time and share.
Random weights (speed does not depend on them). Prints a markdown table with the device,
the date and the command; --out appends it to a file.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import tempfile
import time

import torch

from models.attention import ChunkCache, make_backend
from models.config import load_config
from models.train.common import StageRun
from models.train.self_forcing import SelfForcingStep


class _NoAttention:
    """A backend whose caches commit as usual but whose attention returns v."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def new_cache(self, *args, **kwargs) -> ChunkCache:
        cache = self.backend.new_cache(*args, **kwargs)
        cache.attend = lambda layer, q, k, v: v
        return cache


def time_steps(step_fn, steps: int, device) -> float:
    step_fn(0)   # warm-up: kernel compilation, allocator
    times = []
    for s in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step_fn(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--patterns", default="dense,sparse-forcing")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=None, help="default: the config's self_forcing.batch")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny config")
    p.add_argument("--out", default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.steps = "tiny", 1
    overrides = {} if args.batch is None else {"self_forcing.batch": args.batch}
    cfg = load_config(args.config, overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in args.patterns.split(","):
            result = {}
            for variant in ("full", "no-attention"):
                run = StageRun(cfg, "self_forcing", f"{tmp}/{pattern}-{variant}", progress=False)
                backend = make_backend(cfg, pattern, device=run.device, dtype=run.compute_dtype)
                if variant == "no-attention":
                    backend = _NoAttention(backend)
                gen, real = run.new_model(), run.new_model().requires_grad_(False)
                step = SelfForcingStep(run, backend, gen, real, copy.deepcopy(real).requires_grad_(True))
                result[variant] = time_steps(step, args.steps, run.device)
            full, rest = result["full"], result["no-attention"]
            rows.append((pattern, full, full - rest, (full - rest) / full))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    lines = [f"Self-forcing step, `{cfg.name}` config, batch {cfg.self_forcing.batch}, "
             f"{cfg.self_forcing.fake_updates} fake updates; {device}, "
             f"{datetime.date.today()}, `{' '.join(['python bench/model_step.py'] + sys.argv[1:])}`",
             "", "| rollout attention | step (median) | rollout attention time | share of the step |",
             "|---|---|---|---|"]
    lines += [f"| {p} | {t * 1e3:.0f} ms | {a * 1e3:.0f} ms | {s:.0%} |" for p, t, a, s in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
