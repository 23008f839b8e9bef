"""GPU benchmark of the DiT on several GPUs: sequence and CFG parallelism against one GPU, random weights.

    python tests/bench_parallel.py [--size 1.3B|14B] [--frames 25] [--check]               # the one-GPU baseline
    torchrun --nproc_per_node 2 tests/bench_parallel.py [--size 1.3B|14B] [--frames 25] [--check]

Not collected by pytest. Each rank builds the same DF DiT with random bf16 weights directly on its GPU (seeded alike),
then times, as Pipeline.predict runs them in a synchronous DF step at 540P (25x68x120 latents = 51,000 tokens,
text 512): one pass with no guidance (sequence parallelism over every rank) and one guided step (conditional +
unconditional: CFG parallelism on an even number of ranks). --check compares both with one GPU's result (rank 0
recomputes it alone; bf16, so a relative error of ~1e-3 is rounding). --tiny: tiny sizes on the CPU with gloo
(tests/test_benchmarks.py runs `torchrun --nproc_per_node 2 tests/bench_parallel.py --tiny --loop --check`).
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import skyreels  # noqa: E402


def timed(fn, dev, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def simulate(bandwidth=288e9):
    """Issue 16's plan for 4 and 8 GPUs, on paper: per forward and rank, the all-to-all bytes of sequence parallelism
    (q, k, v to head shards and the output back: 4 x L x D x 2 bytes x (n-1)/n^2 per layer, plus the final gather),
    their time at `bandwidth` (measured: 288 GB/s sent per rank between 2 H100s), and the heads each rank computes.
    With CFG on an even n, each half of n/2 ranks makes one pass: sequence parallelism over n/2."""
    forward_s = {("14B", "540P"): 7.18, ("14B", "720P"): 24.75, ("1.3B", "540P"): 1.42}  # one H100, measured
    tokens, rows = {"540P": 25 * 34 * 60, "720P": 31 * 45 * 80}, {"540P": 34, "720P": 45}
    for (size, res), sec in forward_s.items():
        dim, heads, layers = (5120, 40, 40) if size == "14B" else (1536, 12, 30)
        for n in (2, 4, 8):
            for guided in (False, True):
                sp = n // 2 if guided else n  # ranks sharing one pass
                per_layer = 4 * tokens[res] * dim * 2 * (sp - 1) / sp**2 if sp > 1 else 0
                comm = layers * per_layer / bandwidth
                padded = -(-heads // sp) * sp if sp > 1 else heads
                rows_padded = -(-rows[res] // sp) * sp  # every rank holds rows_padded / sp token rows of each frame
                compute = sec / sp * padded / heads * rows_padded / rows[res]  # padding costs as if it were work
                print(f"{size} {res} n={n} {'CFG' if guided else 'one pass'}: SP over {sp}, heads {heads}->{padded}, rows "
                      f"{rows[res]}->{rows_padded}, "
                      f"all-to-all {layers * per_layer / 1e9:.2f} GB/rank/forward = {comm * 1e3:.0f} ms, compute "
                      f"~{compute:.2f} s per pass: comm {comm / (compute + comm):.1%}, speedup ~{sec * (1 + guided) / (compute + comm) / (1 + guided) * (2 if guided and n > 1 else 1) / (1 if not guided else 1):.1f}x")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.3B", choices=["1.3B", "14B"])
    p.add_argument("--frames", type=int, default=25, help="latent frames (25: 97 video frames)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--check", action="store_true")
    p.add_argument("--loop", action="store_true", help="also time the asynchronous loop (denoise_window)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--simulate", action="store_true", help="print the 4- and 8-GPU communication plan")
    args = p.parse_args()
    if args.simulate:
        return simulate()
    n = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device("cpu" if args.tiny else f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if n > 1:
        dist.init_process_group("gloo" if args.tiny else "nccl")
    cfg, dtype = M.CONFIGS["tiny" if args.tiny else args.size], torch.float32 if args.tiny else torch.bfloat16
    cfg = M.DiTConfig(**{**cfg.__dict__, "inject_sample_info": True})
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(dev), torch.no_grad():
        dit = skyreels.place(M.DiT(cfg), dev, dtype).eval()
    torch.set_default_dtype(torch.float32)
    pipe = skyreels.Pipeline("df", None, None, dit, None, None, None, dev, False)
    if n > 1:
        pipe.parallel, pipe.cfg_parallel = skyreels.split_ranks()
    h, w = (4, 6) if args.tiny else (68, 120)
    name = args.size if not args.tiny else "tiny"

    def settings(guidance, **more):  # checked as generate checks them: a synchronous or asynchronous DF window
        frames = (args.frames - 1) * 4 + 1
        return skyreels.check_settings("df", cfg, skyreels.Settings(
            "a cat", height=8 * h, width=8 * w, num_frames=frames, base_num_frames=frames,
            num_inference_steps=args.steps, guidance_scale=guidance, shift=8.0, seed=0, **more))
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, 16, args.frames, h, w, generator=g, device=dev).to(dtype)
    t = torch.full((1, args.frames), 700.0, device=dev)
    text, neg = (torch.randn(1, 512, cfg.text_dim, generator=g, device=dev).to(dtype) for _ in range(2))
    rank = dist.get_rank() if n > 1 else 0
    with torch.no_grad():
        s = settings(5.0)  # predict reads its guidance_scale and fps
        for step, negative in (("one pass, no guidance", None), ("guided step (2 passes)", neg)):
            sec, out = timed(lambda: pipe.predict(x, t, s, (text, negative)), dev, args.runs)
            note = ""
            if args.check and n > 1:
                parallel, cfg_parallel, pipe.parallel, pipe.cfg_parallel = pipe.parallel, pipe.cfg_parallel, None, None
                ref = pipe.predict(x, t, s, (text, negative)) if rank == 0 else out
                pipe.parallel, pipe.cfg_parallel = parallel, cfg_parallel
                note = f"  rel. error vs one GPU {((out.float() - ref.float()).norm() / ref.float().norm()).item():.2e}"
            if rank == 0:
                mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0
                print(f"{name} x{args.frames} frames, {n} rank(s), {step}: {sec:.3f} s  (peak {mem:.1f} GiB){note}",
                      flush=True)
        if args.loop:  # the asynchronous loop of bench.py's "loop" row: ar 5, blocks of 5, 10 steps, CFG
            s = settings(6.0, ar_step=5, causal_block_size=5)
            win = skyreels.plan_windows(s)[0]
            x0 = torch.randn(1, 16, args.frames, h, w, generator=g, device=dev)
            warm = dataclasses.replace(win, matrix=win.matrix[:2], update=win.update[:2])
            pipe.denoise_window(x0.clone(), warm, s, (text, neg))
            sec, out = timed(lambda: pipe.denoise_window(x0.clone(), win, s, (text, neg)), dev, 1)
            if rank == 0:
                mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0
                print(f"{name} async loop ar 5 blocks of 5, {args.frames} frames, {args.steps} steps, CFG, "
                      f"{len(win.matrix)} iterations, {n} rank(s): {sec:.2f} s (peak {mem:.1f} GiB)", flush=True)
        if n > 1:  # all-to-all bandwidth at the size of one layer's q, k, v shards
            part = torch.randn(3 * args.frames * h * w // 4 // n * cfg.dim, device=dev).to(dtype)
            sec, _ = timed(lambda: dist.all_to_all_single(torch.empty_like(part), part), dev, 5)
            if rank == 0:
                gb = part.numel() * part.element_size() * (n - 1) / n / 1e9
                print(f"all_to_all of {part.numel() * 2 / 2**20:.0f} MiB per rank: {sec * 1e3:.2f} ms, "
                      f"{gb / sec:.0f} GB/s sent per rank", flush=True)
    if n > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
