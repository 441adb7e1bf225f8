"""GPU checks and timings of the compiled program (select + attention), in one run.

    cd /work/main && PYTHONPATH=. python3 bench/gpu_program.py

1. correctness at Self-Forcing's spatial geometry (30 x 52 tokens, 8x8 and 8x16 tiles, D=128,
   bf16 and fp32): the full program (visit tables, fused select, generated forward and backward)
   against float64 attention on the visited blocks, and its Top-K against the reference's;
2. the selection cost: query representatives + representative attention + Top-K, written
   straight into the visit table, at the paper's profile point and at Self-Forcing's geometry,
   next to the attention forward it feeds and to FlexAttention's per-step BlockMask build.
Writes $OUT/program.md when OUT is set.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import triton

import sparsedsl as sd
from codegen import select as select_ops
from codegen.attention.autograd import pbsa_attention
from codegen.check import check_rollout
from codegen.attention.kernel_spec import AttentionKernelSpec

lines: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    lines.append(text)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def correctness() -> None:
    say("## Correctness on the GPU (program vs float64 reference)")
    say("")
    say("| pattern | tile | heads | dtype | steps | result | seconds |")
    say("|---|---|---|---|---|---|---|")
    cases = [("sparse-forcing", (8, 8), torch.bfloat16), ("sparse-forcing", (8, 16), torch.bfloat16),
             ("sparse-forcing", (8, 8), torch.float32), ("sliding-tile", (8, 8), torch.bfloat16),
             ("moba", (8, 16), torch.float16)]
    for name, tile, dtype in cases:
        layout = sd.VideoLayout(30, 52, tile, 3)
        overrides = {"layout": layout}
        if name == "sparse-forcing":
            overrides.update(window_frames=3, capacity=24)
        if name == "moba":
            overrides.update(k=8)
        schedule = sd.lower(sd.presets.get(name, **overrides), num_heads=2, num_kv_heads=1,
                            head_dim=128, dtype="float32")
        start = time.time()
        try:
            check_rollout(schedule, "triton", dtype, seed=1, steps=4, batch=1, device="cuda")
            result = "PASS"
        except AssertionError as exc:
            result = f"FAIL: {exc}"
        say(f"| {name} | {tile[0]}x{tile[1]} | 2 (kv 1) | {str(dtype)[6:]} | 4 | {result} | "
            f"{time.time() - start:.1f} |")
    say("")


def selection_cost() -> None:
    say("## Selection cost vs the attention it feeds (bf16, B=1, H=12, D=128)")
    say("")
    say("| geometry | window blocks | Top-K | select algo | q reps ms | select ms | attention fwd ms | "
        "select share of step | Flex BlockMask build ms |")
    say("|---|---|---|---|---|---|---|---|---|")
    dev = "cuda"
    from torch.nn.attention.flex_attention import BlockMask
    for label, nqb, bt, n_persist, n_window, frac in [
            ("paper point (65K KV)", 36, 128, 32, 444, 0.0625),
            ("paper point (65K KV)", 36, 128, 32, 444, 0.25),
            ("Self-Forcing 8x8 tiles", 84, 64, 64, 168, 0.25)]:
        B, H, D = 1, 12, 128
        k = -(-int(frac * 10000) * n_window // 10000)
        nslots = n_persist + n_window
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, H, nqb, bt, D, device=dev, dtype=torch.bfloat16, generator=g)
        kc = torch.randn(B, H, nqb, bt, D, device=dev, dtype=torch.bfloat16, generator=g)
        kp = torch.randn(B, H, nslots, bt, D, device=dev, dtype=torch.bfloat16, generator=g)
        cur_valid = torch.full((nqb,), bt, dtype=torch.int32, device=dev)
        slot_valid = torch.full((B, H, nslots), bt, dtype=torch.int32, device=dev)
        k_rep = select_ops.block_representatives(kp, slot_valid)
        window_slots = (n_persist + torch.arange(n_window, device=dev, dtype=torch.int32)
                        ).expand(B, H, n_window).contiguous()
        static_pos = torch.zeros(nqb, 1, dtype=torch.int32, device=dev)
        static_count = torch.zeros(nqb, dtype=torch.int32, device=dev)
        maxv = -(-(n_persist + k) // 16) * 16
        base_slots = torch.zeros(B, H, nqb, maxv, dtype=torch.int32, device=dev)
        base_slots[..., :n_persist] = torch.arange(n_persist, dtype=torch.int32, device=dev)
        base_count = torch.full((B, H, nqb), n_persist, dtype=torch.int32, device=dev)
        spec = AttentionKernelSpec(block_tokens=bt, head_dim=D, num_heads=H, num_kv_heads=H,
                                   dtype="bfloat16", chunk_frames=3, blocks_per_frame=nqb // 3,
                                   current="dense", max_cached_visits=maxv, has_padding=False)
        for algo in ("rounds", "sort"):
            select_ops.SELECT_TOPK_ALGO = algo
            t_rep = bench(lambda: select_ops.block_representatives(q, cur_valid, check_values=False))
            q_rep = select_ops.block_representatives(q, cur_valid)

            def run_select():
                vs, vc = base_slots.clone(), base_count.clone()
                select_ops.select_topk(q_rep, k_rep, window_slots, n_window, static_pos,
                                       static_count, "union", k, vs, vc, check_values=False)
                return vs, vc

            t_clone = bench(lambda: (base_slots.clone(), base_count.clone()))
            t_sel = max(bench(run_select) - t_clone, 0.0)
            vs, vc = run_select()
            t_att = bench(lambda: pbsa_attention(spec, q, kc, kc, cur_valid, kp, kp, slot_valid,
                                                 vs, vc, validate=False))
            # FlexAttention would rebuild its BlockMask from the same visits every step
            n_keys = nqb + nslots
            kv_idx = torch.zeros(B, H, nqb, n_keys, dtype=torch.int32, device=dev)
            kv_idx[..., :maxv] = vs + nqb
            kv_num = vc + 0
            t_flex = bench(lambda: BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=bt))
            share = (t_rep + t_sel) / (t_rep + t_sel + t_att)
            say(f"| {label} | {n_window} | {k} ({frac:.2%}) | {algo} | {t_rep:.4f} | {t_sel:.4f} | "
                f"{t_att:.4f} | {share:.1%} | {t_flex:.4f} |")
    select_ops.SELECT_TOPK_ALGO = "auto"
    say("")


def steady_step(tile):
    """One steady-state step of the sparse-forcing preset at Self-Forcing geometry (30x52
    tokens in `tile` tiles, H=12, D=128, bf16): a one-layer cache after 8 commits of random
    chunks, the next chunk's q/k/v, its kernel inputs and the FLOPs of its visited pairs."""
    from types import SimpleNamespace

    from codegen.program import PBSAProgram
    layout = sd.VideoLayout(30, 52, tile, 3)
    schedule = sd.lower(sd.presets.get("sparse-forcing", layout=layout), num_heads=12,
                        head_dim=128, dtype="bfloat16")
    program = PBSAProgram(schedule, backend="triton")
    cache = program.new_cache(batch=1, num_layers=1, device="cuda", dtype=torch.bfloat16)
    lay = schedule.layout
    n = lay.chunk_blocks * lay.block_tokens
    valid = lay.valid_token_mask(lay.chunk_frames).cuda()[None, None, :, None]
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: (torch.randn(1, 12, n, 128, device="cuda", generator=g) * valid).to(torch.bfloat16)  # noqa: E731
    for _ in range(8):
        cache.commit(0, mk(), mk(), mk())
    tables = cache.tables(0)
    q, k, v = mk(), mk(), mk()
    qb, kb, vb = program._blocks(q), program._blocks(k), program._blocks(v)
    vs, vc = program.visit_tables(qb, tables, tables.step, validate=False)
    spec = program.kernel_spec(tables.step, "bfloat16")
    flops = 4 * spec.block_tokens ** 2 * 128 * float(vc.sum().item() + 12 * lay.chunk_blocks ** 2)
    return SimpleNamespace(program=program, tables=tables, layout=lay, spec=spec, q=q, k=k, v=v,
                           qb=qb, kb=kb, vb=vb, vs=vs, vc=vc, cur_valid=program.cur_valid("cuda"),
                           flops=flops)


def program_overhead() -> None:
    """Where a program step's time goes at Self-Forcing geometry: tables, select, kernel."""
    say("## One program step at Self-Forcing geometry (sparse-forcing, bf16, H=12, D=128, steady state)")
    say("")
    say("| tile (block tokens) | visits/query block | kernel only ms | visit tables + select ms | "
        "program.attention ms (validate=False) | program.attention ms (validate=True) | "
        "program.attention ms (default: cache tables trusted) | to_block_mask build ms | kernel TFLOP/s |")
    say("|---|---|---|---|---|---|---|---|---|")
    for tile in ((8, 8), (8, 16)):
        st = steady_step(tile)
        program, tables, lay, spec, vs, vc = st.program, st.tables, st.layout, st.spec, st.vs, st.vc
        q, k, v, qb, kb, vb, cur_valid = st.q, st.k, st.v, st.qb, st.kb, st.vb, st.cur_valid
        t_kernel = bench(lambda: pbsa_attention(spec, qb, kb, vb, cur_valid, tables.k_pool,
                                                tables.v_pool, tables.slot_valid, vs, vc,
                                                program.scale, validate=False))
        t_tables = bench(lambda: program.visit_tables(qb, tables, tables.step, validate=False))
        t_fast = bench(lambda: program.attention(q, k, v, tables, validate=False))
        t_checked = bench(lambda: program.attention(q, k, v, tables, validate=True))
        t_default = bench(lambda: program.attention(q, k, v, tables))
        t_mask = bench(lambda: program.to_block_mask(q, tables))
        visits = vc.float().mean().item() + (lay.chunk_blocks)
        say(f"| {tile[0]}x{tile[1]} ({lay.block_tokens}) | {visits:.0f} | {t_kernel:.3f} | {t_tables:.3f} | "
            f"{t_fast:.3f} | {t_checked:.3f} | {t_default:.3f} | {t_mask:.2f} | "
            f"{st.flops / t_kernel / 1e9:.0f} |")
    say("")


def tune_small_blocks() -> None:
    """Launch configurations for 64-token blocks (the presets' 8x8 tiles) at Self-Forcing
    geometry: the defaults were tuned for 128-token blocks."""
    from codegen.attention.launch import default_config
    say("## Launch configurations for 64-token blocks (sparse-forcing, 8x8 tiles, bf16, H=12, D=128)")
    say("")
    say("| config | fwd ms | fwd TFLOP/s | fwd+bwd ms (q, k, v grads; pool detached) |")
    say("|---|---|---|---|")
    st = steady_step((8, 8))
    program, tables, spec, vs, vc, flops = st.program, st.tables, st.spec, st.vs, st.vc, st.flops
    qb, kb, vb, cur_valid = st.qb, st.kb, st.vb, st.cur_valid
    base = default_config(spec, qb.device)
    candidates = [("default", base)]
    if "--fwd" in sys.argv:  # the forward sweep that chose the defaults (4 warps, plain loads)
        for warps in (4, 8):
            for stages in (2, 3, 4):
                for variant in ("desc", "ptr"):
                    candidates.append((f"fwd {variant} w{warps} s{stages}",
                                       base.replace(variant=variant, fwd_warps=warps, fwd_stages=stages)))
    ordered = base.replace(bwd_dq="ordered")
    atomic = base.replace(bwd_dq="atomic", dkdv_block_m=64, dkdv_block_n=64, dkdv_warps=4, dkdv_stages=2)
    candidates += [("bwd ordered dQ (fused dQ + dK/dV programs)", ordered),
                   ("bwd atomic dQ, ptr 64x64 w4 s2", atomic),
                   ("bwd atomic dQ, ptr 64x64 w4 s3", atomic.replace(dkdv_stages=3)),
                   ("bwd atomic dQ, ptr 64x64 w8 s2", atomic.replace(dkdv_warps=8)),
                   ("bwd atomic dQ, ptr 32x64 w4 s2", atomic.replace(dkdv_block_m=32)),
                   ("bwd atomic dQ, desc 64x64 w4 s2, TMA adds",
                    atomic.replace(bwd_variant="desc", dq_atomic_tma=True))]
    for name, cfg in candidates:
        try:
            fwd = bench(lambda: pbsa_attention(spec, qb, kb, vb, cur_valid, tables.k_pool, tables.v_pool,
                                               tables.slot_valid, vs, vc, program.scale, validate=False,
                                               config=cfg))
            qg, kg, vg = (x.detach().clone().requires_grad_() for x in (qb, kb, vb))

            def fwd_bwd():
                o, _ = pbsa_attention(spec, qg, kg, vg, cur_valid, tables.k_pool, tables.v_pool,
                                      tables.slot_valid, vs, vc, program.scale, validate=False,
                                      config=cfg)
                o.sum().backward()
            both = bench(fwd_bwd)
            say(f"| {name} | {fwd:.3f} | {flops / fwd / 1e9:.0f} | {both:.3f} |")
        except Exception as exc:  # a configuration that does not compile is reported, not fatal
            say(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | |")
    say("")


def main() -> int:
    props = torch.cuda.get_device_properties(0)
    say(f"# Program checks and selection cost on {props.name}")
    say("")
    say(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"triton {triton.__version__}; command: `PYTHONPATH=. python3 bench/gpu_program.py`")
    say("")
    if not {"--no-check", "--overhead-only", "--tune64"} & set(sys.argv):
        correctness()
    if "--tune64" in sys.argv:
        tune_small_blocks()
    else:
        if "--overhead-only" not in sys.argv:
            selection_cost()
        program_overhead()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "program.md"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 1 if any("FAIL" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
