"""Why is the student's teacher-forcing step slow? A diagnostic (docs/training.md).

    PYTHONPATH=. python bench/teacher_forcing_step.py [--config small] [--batch 32] [--tiny]

Times one training step's forward + backward (no data loading, no optimiser) of
1. the teacher: the clip bidirectional, one unmasked SDPA per layer;
2. the student's teacher forcing as it trains (`TeacherForcingAttention`: the clean copy
   and the noisy copy, 14 unmasked SDPA calls per layer for 7 chunks);
3. the same sequence under one SDPA with the boolean teacher-forcing mask;
4. the same sequence through FlexAttention (compiled) with the teacher-forcing block mask
   (CUDA only);
then profiles (2) and prints its most expensive CUDA ops.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from models.attention import SequenceAttention, TeacherForcingAttention, teacher_forcing_mask
from models.config import load_config
from models.dit import CausalDiT, compile_blocks
from models.flow import velocity_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny config")
    ap.add_argument("--compile", action="store_true",
                    help="also time the teacher and chunked teacher forcing with the blocks "
                         "compiled (train --compile); the first call pays for compilation")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile")
    args = ap.parse_args()
    cfg = load_config("tiny" if args.tiny else args.config)
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    B = 2 if args.tiny else args.batch
    v = cfg.video
    F_, c, n = v.frames, v.chunk_frames, cfg.tokens_per_frame
    model = CausalDiT(cfg).to(dev)
    x = torch.randn(B, F_, v.channels, v.height, v.width, device=dev)
    t = torch.rand(B, F_, device=dev)
    two_t = torch.cat([torch.zeros_like(t), t], 1)
    two_x = torch.cat([x, x], 1)
    positions = torch.cat([torch.arange(F_), torch.arange(F_)])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda)

    def step(inputs, times, attend, **kw):
        def run():
            with autocast:
                out = model(inputs, times, attend, **kw)
            velocity_loss(out[:, -F_:], x, t).backward()
        return run

    variants = {
        "teacher (bidirectional, 1 SDPA per layer)": step(x, t, SequenceAttention(None, n)),
        "teacher forcing, chunked SDPA (as trained)": step(two_x, two_t, TeacherForcingAttention(F_, c, n),
                                                           frame_positions=positions),
        "teacher forcing, one masked SDPA": step(two_x, two_t, SequenceAttention(teacher_forcing_mask(F_, c), n),
                                                 frame_positions=positions),
    }
    if cuda:
        variants["teacher forcing, FlexAttention block mask"] = step(
            two_x, two_t, flex_teacher_forcing(F_, c, n, dev), frame_positions=positions)
    print(f"# Teacher-forcing step (forward + backward), {torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"{datetime.date.today()}, `bench/teacher_forcing_step.py --config {cfg.name} --batch {B}`\n")
    print("| variant | ms per step |\n|---|---|")
    for name, fn in variants.items():
        try:
            print(f"| {name} | {1e3 * median_time(fn, args.steps, cuda):.1f} |", flush=True)
        except Exception as e:   # a diagnostic: report the variant's failure, time the rest
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |", flush=True)
    if args.compile:
        compile_blocks()
        for name in ("teacher (bidirectional, 1 SDPA per layer)",
                     "teacher forcing, chunked SDPA (as trained)"):
            t0 = time.perf_counter()
            variants[name]()
            first = time.perf_counter() - t0
            print(f"| {name}, blocks compiled (first call {first:.0f} s) | "
                  f"{1e3 * median_time(variants[name], args.steps, cuda):.1f} |", flush=True)
        compile_blocks(False)
    if cuda and not args.no_profile:
        fn = variants["teacher forcing, chunked SDPA (as trained)"]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
        print("\nchunked teacher forcing, 2 steps, top CUDA ops:\n")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def median_time(fn, steps: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flex_teacher_forcing(frames: int, chunk: int, tokens_per_frame: int, device):
    """The teacher-forcing mask as a FlexAttention block mask over [clean | noisy]."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    half = frames * tokens_per_frame
    per_chunk = chunk * tokens_per_frame

    def mask_mod(b, h, q, kv):
        q_noisy, kv_noisy = q >= half, kv >= half
        cq, ck = (q % half) // per_chunk, (kv % half) // per_chunk
        clean_rule = ~q_noisy & ~kv_noisy & (ck <= cq)
        noisy_rule = q_noisy & ((~kv_noisy & (ck < cq)) | (kv_noisy & (ck == cq)))
        return clean_rule | noisy_rule

    mask = create_block_mask(mask_mod, None, None, 2 * half, 2 * half, device=device)
    flex = torch.compile(flex_attention)
    return lambda layer, q, k, v: flex(q, k, v, block_mask=mask)


if __name__ == "__main__":
    main()
