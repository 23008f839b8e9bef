"""GPU benchmark of TeaCache's mechanism, not collected by pytest: `STEPS=12 python tests/bench_teacache.py` (with
--tiny, or without CUDA, a tiny smoke run on the CPU). DF-1.3B at 540P (544x960x97 = 25x68x120 latents), random bf16
weights built on the GPU: the cost of a skipped DiT pass as a share of a computed one, and a guided synchronous
window's DiT-loop time with half the steps' passes skipped (a forced pattern: every other step, after TeaCache's own
decision) against TeaCache off. The skip pattern of real weights cannot be measured with random ones."""
import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import skyreels  # noqa: E402

STEPS = int(os.environ.get("STEPS", "12"))
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a tiny smoke run of this script
TINY = DEV.type == "cpu"
OUT = os.environ.get("OUT", ".")


def set_tiny():
    global DEV, TINY
    DEV, TINY = torch.device("cpu"), True


def log(*a):
    print(*a, flush=True)
    with open(os.path.join(OUT, "teacache_gpu.log"), "a") as f:
        print(*a, file=f)


def random_dit(cfg):
    """As tests/bench.py: built on meta, random weights made on the GPU, bf16 except keep_fp32."""
    with torch.device("meta"):
        dit = model.DiT(cfg)
    g = torch.Generator(DEV).manual_seed(0)
    state = {}
    for name, p in dit.state_dict(keep_vars=True).items():
        t = torch.randn(p.shape, device=DEV, generator=g, dtype=skyreels.param_dtype(dit, name, torch.bfloat16)) * 0.02
        state[name] = t + 1 if "norm" in name else t
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.eval().requires_grad_(False)


def sync():
    if not TINY:
        torch.cuda.synchronize()


def timed(fn, reps):
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tiny DiT on the CPU: a smoke run of this script")
    if p.parse_args().tiny:
        set_tiny()
    gpu = "cpu" if TINY else torch.cuda.get_device_name(DEV)
    now = datetime.datetime.now(datetime.timezone.utc)
    log(f"{now:%Y-%m-%d %H:%M} UTC, {gpu}, torch {torch.__version__}, STEPS={STEPS}")
    cfg = dataclasses.replace(model.CONFIGS["tiny" if TINY else "1.3B"], inject_sample_info=True)
    dit = random_dit(cfg)
    pipe = skyreels.Pipeline("df", None, None, dit, None, None, None, DEV, False)
    if not TINY:
        skyreels.use_flash_attention_4(DEV)
    g = torch.Generator(DEV).manual_seed(1)
    size = (32, 48) if TINY else (544, 960)
    x = torch.randn(1, 16, 25, size[0] // 8, size[1] // 8, device=DEV, generator=g)
    texts = tuple(torch.randn(1, 512, cfg.text_dim, device=DEV, generator=g, dtype=torch.bfloat16) for _ in range(2))
    t = torch.full((1, 25), 500, device=DEV)

    # One pass: off (reuse None), computed with TeaCache (its residual kept), skipped (the residual added).
    reuse = {"skip": False}
    with torch.no_grad():
        dit(x.bfloat16(), t, texts[0], None, 24, model.AttentionContext(reuse=reuse))  # warm-up, and the residual to reuse
        off, _ = timed(lambda: dit(x.bfloat16(), t, texts[0], None, 24), 3)
        computed, _ = timed(lambda: dit(x.bfloat16(), t, texts[0], None, 24, model.AttentionContext(reuse=reuse)), 3)
        reuse["skip"] = True
        skipped, all_skipped = timed(lambda: dit(x.bfloat16(), t, texts[0], None, 24, model.AttentionContext(reuse=reuse)), 10)
    log(f"one DiT pass: off {off * 1e3:.1f} ms, computed (residual kept) {computed * 1e3:.1f} ms, skipped "
        f"{skipped * 1e3:.2f} ms (runs {[round(s * 1e3, 2) for s in all_skipped]}): skipped/computed "
        f"{skipped / computed:.4f}")

    # The DiT loop of a guided synchronous window: TeaCache off, then every other step skipped.
    s = skyreels.check_settings("df", cfg, skyreels.Settings(
        "a cat", height=size[0], width=size[1], num_frames=97, num_inference_steps=STEPS, guidance_scale=6.0, seed=0))
    window = skyreels.plan_windows(s)[0]
    decide = skyreels.TeaCache.reuse

    def forced(self, transformer, t, fps):  # TeaCache's own decision (its cost), then every other step skipped
        passes = decide(self, transformer, t, fps)
        passes[0]["skip"] = passes[1]["skip"] = self.step % 2 == 0  # self.step: the steps decided so far
        return passes
    skyreels.TeaCache.reuse = forced
    loops = {}
    with torch.no_grad():
        for name, settings in (("off", s), ("half skipped", dataclasses.replace(s, teacache=1e30))):
            loops[name], _ = timed(lambda: pipe.denoise_window(x.clone(), window, settings, texts), 1)
            log(f"DiT loop, {STEPS} guided steps, TeaCache {name}: {loops[name]:.2f} s, passes {pipe.dit_passes}")
            pipe.dit_passes.update(dit_passes=0, dit_passes_skipped=0)
    log(f"half skipped / off: {loops['half skipped'] / loops['off']:.3f}")
    if not TINY:
        log(f"peak memory {torch.cuda.max_memory_allocated(DEV) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
