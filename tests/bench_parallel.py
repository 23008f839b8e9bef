"""GPU benchmark of the DiT on several GPUs: sequence and CFG parallelism against one GPU, random weights.

    python tests/bench_parallel.py [--size 1.3B|14B] [--frames 25] [--check]               # the one-GPU baseline
    torchrun --nproc_per_node 2 tests/bench_parallel.py [--size 1.3B|14B] [--frames 25] [--check]

Not collected by pytest. Each rank builds the same DF DiT with random bf16 weights directly on its GPU (seeded alike),
then times, as Pipeline.predict runs them in a synchronous DF step at 540P (25x68x120 latents = 51,000 tokens,
text 512): one pass with no guidance (sequence parallelism over every rank) and one guided step (conditional +
unconditional: CFG parallelism on an even number of ranks). --check compares both with one GPU's result (rank 0
recomputes it alone; bf16, so a relative error of ~1e-3 is rounding). --tiny: tiny sizes on the CPU with gloo.
"""
import argparse
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="1.3B", choices=["1.3B", "14B"])
    p.add_argument("--frames", type=int, default=25, help="latent frames (25: 97 video frames)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--check", action="store_true")
    p.add_argument("--loop", action="store_true", help="also time the asynchronous loop (denoise_window)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    n = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device("cpu" if args.tiny else f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if n > 1:
        dist.init_process_group("gloo" if args.tiny else "nccl")
    cfg, dtype = M.DIT_CONFIGS["tiny" if args.tiny else args.size], torch.float32 if args.tiny else torch.bfloat16
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
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(1, 16, args.frames, h, w, generator=g, device=dev).to(dtype)
    t = torch.full((1, args.frames), 700.0, device=dev)
    text, neg = (torch.randn(1, 512, cfg.text_dim, generator=g, device=dev).to(dtype) for _ in range(2))
    rank = dist.get_rank() if n > 1 else 0
    with torch.no_grad():
        for name, negative in (("one pass, no guidance", None), ("guided step (2 passes)", neg)):
            sec, out = timed(lambda: pipe.predict(x, t, text, negative, 5.0, fps=24), dev, args.runs)
            note = ""
            if args.check and n > 1:
                parallel, cfg_parallel, pipe.parallel, pipe.cfg_parallel = pipe.parallel, pipe.cfg_parallel, None, None
                ref = pipe.predict(x, t, text, negative, 5.0, fps=24) if rank == 0 else out
                pipe.parallel, pipe.cfg_parallel = parallel, cfg_parallel
                note = f"  rel. error vs one GPU {((out.float() - ref.float()).norm() / ref.float().norm()).item():.2e}"
            if rank == 0:
                mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0
                print(f"{args.size if not args.tiny else 'tiny'} x{args.frames} frames, {n} rank(s), {name}: "
                      f"{sec:.3f} s  (peak {mem:.1f} GiB){note}", flush=True)
        if args.loop:  # the asynchronous loop of bench.py's "loop" row: ar 5, blocks of 5, 10 steps, CFG
            import schedule

            ts, sigmas = schedule.timesteps(args.steps, 8.0)
            win = skyreels.plan_windows("df", (args.frames - 1) * 4 + 1, (args.frames - 1) * 4 + 1, None, 5, 5, ts,
                                        False, None)[0]
            x0 = torch.randn(1, 16, args.frames, h, w, generator=g, device=dev)
            warm = dict(win, matrix=win["matrix"][:2], update=win["update"][:2])
            pipe.denoise_window(x0.clone(), warm, text, neg, 6.0, sigmas, 5, 0, 24)
            sec, out = timed(lambda: pipe.denoise_window(x0.clone(), win, text, neg, 6.0, sigmas, 5, 0, 24), dev, 1)
            if rank == 0:
                mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0
                print(f"{args.size} async loop ar 5 blocks of 5, {args.frames} frames, {args.steps} steps, CFG, "
                      f"{len(win['matrix'])} iterations, {n} rank(s): {sec:.2f} s (peak {mem:.1f} GiB)", flush=True)
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
