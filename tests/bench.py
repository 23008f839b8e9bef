"""GPU benchmark: our DiT and VAE against diffusers', same random weights, same inputs, one table.

    python tests/bench.py [--only dit,attn,vae] [--quick] [--tiny]

Not collected by pytest (needs CUDA and diffusers==0.42.1). Sizes are DF-1.3B's at 540P: 97 frames = 25x68x120
latents = 51,000 tokens, text length 512, random bf16 weights (float32 for the VAE). Each figure is the median of
several CUDA-event timings after warm-up; peak memory is what the call adds over the weights and inputs. Outputs are
compared with diffusers' (relative error), so a fast path that changes numerics shows it.

--tiny runs every part at tiny sizes on the CPU (tests/test_benchmarks.py does, so an API change breaks a test): what
needs a GPU is stood in, with a `note:` line: flash-attn-4's kernels by SDPA, the CUDA profiler by the CPU's; and
torch.compile is left out (the compiled rows run eager). Each part's output begins with a line "--- PART" and ends
with "PART done in ..." or, if it raised, "PART failed: <traceback>"; the others go on, and the exit status is then 1.
"""
import argparse
import dataclasses
import gc
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import vae as V  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16
DF13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
             text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, inject_sample_info=True)
LAT = (1, 16, 25, 68, 120)
DF14B = dict(DF13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
VAE_SIZE, TEXT_SIZE = "wan2.1", "umt5-xxl"  # V.CONFIGS, text.CONFIGS
FRAME_TOKENS = 34 * 60  # a 540P latent frame's tokens; one attention layer's inputs are 25 frames of them
FULL = (544, 960, 97)  # height, width, frames of the end-to-end runs
STREAM = (256, 448, (97, 257, 737), 97, 17)  # height, width, frames, base_num_frames, overlap_history

TINY = False
ROWS = []


def set_tiny():
    global DEV, LAT, TINY, VAE_SIZE, TEXT_SIZE, FRAME_TOKENS, FULL, STREAM
    DEV, TINY, LAT, VAE_SIZE, TEXT_SIZE, FRAME_TOKENS = "cpu", True, (1, 16, 10, 4, 6), "tiny", "tiny", 6
    FULL, STREAM = (32, 48, 17), (32, 48, (17, 37, 57), 17, 5)
    DF13B.update(num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2,
                 rope_max_seq_len=64)
    DF14B.update(DF13B)


def log(*a):
    print(*a, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench.log"), "a") as f:
            print(*a, file=f)


def row(name, ref=None, ours=None, note=""):
    ROWS.append((name, ref, ours, note))
    log(f"  {name}: diffusers {ref}  ours {ours}  {note}")


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def wall(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def timed(fn, warmup=2, runs=5):
    if DEV != "cuda":
        return wall(fn)[0]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def peak(fn):
    """(GiB the call adds at its peak over what was allocated before, its output)."""
    if DEV != "cuda":
        return 0.0, fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30, out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a, b):  # video in [-1, 1]
    mse = ((a.float() - b.float()) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-20))


def dit_flops(L=51000, D=1536, ffn=8960, text=512, layers=30):
    per = 4 * 2 * L * D * D + 2 * 2 * L * L * D + 2 * 2 * L * D * D + 2 * 2 * text * D * D + 2 * 2 * L * text * D \
        + 2 * 2 * L * D * ffn
    return per * layers


def sdpa_prefer(*names):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, n) for n in names] + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def free_memory():  # GPU memory of what a part dropped (phase_peaks' wrappers hold a pipeline in a reference cycle)
    if DEV == "cuda":  # not on the CPU: a collection there takes longer than a tiny run
        gc.collect()
        torch.cuda.empty_cache()


def note(message):  # what --tiny stands in for, or leaves out
    log(f"  note: {message}")


def df_window(dit, frames, h, w, steps=10, block=5, guidance=6.0):
    """One diffusion-forcing window of `frames` latent frames of h x w, through the pipeline's own door: the checked
    Settings (ar_step 5 with causal blocks, else synchronous; shift 8, fps 24, CFG at `guidance`) and plan_windows'
    window, so that the benchmark runs what generate runs."""
    import skyreels

    n = (frames - 1) * 4 + 1
    s = skyreels.check_settings("df", dit.config, skyreels.Settings(
        "a cat", height=8 * h, width=8 * w, num_frames=n, base_num_frames=n, num_inference_steps=steps,
        guidance_scale=guidance, shift=8.0, ar_step=5 if block > 1 else 0, causal_block_size=block, seed=0))
    return s, skyreels.plan_windows(s)[0]


def whole_window(pipe, x, w, s):
    """The AttentionContext of one pass over all of window w (latents x), as the loop builds it with no shortcuts:
    full attention for a synchronous window, else its causal blocks."""
    import skyreels

    return skyreels.Shortcuts(pipe, x, w, s, on=False).plan(w.update[0])[2][0]


def compile_blocks(dit, **options):
    """Each DiT block compiled, as load(compile=True) does. --tiny leaves it out: tracing alone (dynamo, no kernels)
    would take most of a CPU smoke run, so the compiled rows run eager there."""
    if TINY:
        return note("torch.compile left out: the compiled rows run eager")
    for b in dit.blocks:
        b.compile(**options)


def flash_attn_4(name="flash_attn_func"):
    """flash-attn-4's flash_attn_func (or its private _flash_attn_fwd). --tiny: no Hopper GPU, so an SDPA stand-in of
    the same call: (B, L, H, Dh) in, (out, None) back, tile options ignored."""
    if not TINY:
        from flash_attn.cute import interface

        return getattr(interface, name)
    note(f"flash-attn-4's {name} stood in by SDPA (no Hopper GPU): its kernel is not measured")

    def sdpa(q, k, v, **tiles):
        return F.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v))).transpose(1, 2), None
    return sdpa


def use_flash_attention_4():
    """model.FLASH as load() sets it (skyreels.use_flash_attention_4). --tiny: the SDPA stand-in, which model.attention
    passes over on the CPU (it takes FLASH for CUDA tensors only): SDPA runs either way."""
    import skyreels

    if TINY:
        M.FLASH = flash_attn_4()
    else:
        skyreels.use_flash_attention_4(torch.device(DEV))
    return M.FLASH


# ------------------------------------------------------------------------------------------------------------------


def build_dits():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    with torch.device(DEV):
        ref = SkyReelsV2Transformer3DModel(**DF13B)
    with torch.no_grad():
        for p in ref.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)  # diffusers zero-initialises some parameters
    keep = ref._keep_in_fp32_modules
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    rope = {k: v.clone() for k, v in ref.rope.named_buffers()}
    ref.to(BF16)
    for k, v in rope.items():  # from_pretrained keeps the rope tables in float32 too (to() would round them)
        setattr(ref.rope, k, v)
    for name, p in ref.named_parameters():  # diffusers' from_pretrained keeps these in float32 (unrounded)
        if any(k in name.split(".") for k in keep):
            p.data = state[name].clone()
    with torch.device("meta"):
        ours = M.DiT(M.DiTConfig.from_config(DF13B))
    ours.load_state_dict({k: v.to(torch.float32 if any(s in k for s in ours.keep_fp32) else BF16)
                          for k, v in state.items()}, strict=True, assign=True)
    del state
    return ref.eval(), ours.eval()


def randomize(module, home=None, pin=False):
    """Random weights for a module built on the meta device, made on the GPU (fast) and left on `home`: bf16 except
    the module's keep_fp32 parameters (the VAE: all float32). Norm weights near 1, the rest small."""
    import skyreels

    g = torch.Generator(DEV).manual_seed(0)
    state = {}
    for name, p in module.state_dict(keep_vars=True).items():
        dt = torch.float32 if isinstance(module, V.VAE) else skyreels.param_dtype(module, name, BF16)
        t = torch.randn(p.shape, device=DEV, generator=g, dtype=dt) * 0.02
        if "norm" in name or "gamma" in name:
            t += 1
        state[name] = t.to(home or DEV)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def random_dit(cfg, home=None):
    with torch.device("meta"):
        return randomize(M.DiT(M.DiTConfig.from_config(cfg)), home)


def random_pipeline(dit_cfg, offload, fp8=False):
    """A DF pipeline at the official sizes (UMT5-XXL, the DiT of dit_cfg, the Wan VAE) with random weights, built
    in memory: offloaded components wait on the CPU as load(offload=True) leaves them. fp8: the DiT's and the text
    encoder's Linears quantized as load(..., fp8=True) quantizes them (skyreels.use_fp8, on the GPU, layer by layer)."""
    import skyreels
    import text as T

    home = "cpu" if offload else DEV
    tok = skyreels.tiny_pipeline("tiny-df", torch.device("cpu"), torch.float32).tokenizer
    with torch.device("meta"):
        te = T.UMT5Encoder(T.CONFIGS[TEXT_SIZE])
        vae = V.VAE(V.CONFIGS[VAE_SIZE])
    if not fp8:
        return skyreels.Pipeline("df", tok, randomize(te, home), random_dit(dit_cfg, home), randomize(vae, home),
                                 None, None, torch.device(DEV), offload)
    te, dit = randomize(te), random_dit(dit_cfg)
    for m in (te, dit):
        skyreels.use_fp8(m, torch.device(DEV))
    return skyreels.Pipeline("df", tok, te.to(home), dit.to(home), randomize(vae, home), None, None,
                             torch.device(DEV), offload)


def bench_fp8(quick):
    """fp8 weights against bf16, DF-14B at 540P x 97 frames, 2 steps with CFG, end to end (text, DiT, VAE decode),
    random weights at the official sizes: resident (all on the GPU); the DiT and the VAE resident with the text encoder
    streamed as --offload streams it (a mode the pipeline has no switch for: built here); --offload. GPU peak and each
    phase's, time, PSNR of the fp8 video against the bf16 one, and the host memory of the offloaded DiT."""
    import skyreels

    hh, ww, nf, steps = (544, 960, 97, 2) if not TINY else (32, 48, 17, 2)
    log(f"== fp8 vs bf16: DF-14B {hh}x{ww}x{nf}, {steps} steps, CFG, end to end")
    videos, times = {}, {}
    runs = (("bf16 resident", False, False, False), ("fp8 resident", False, True, False),
            ("fp8 offload", True, True, False), ("bf16 offload", True, False, False),
            ("fp8 resident, text encoder streamed", False, True, True))
    only = os.environ.get("BENCH_FP8_RUNS")  # e.g. "bf16 resident,fp8 resident"
    for name, offload, fp8, text_only in [r for r in runs if not only or r[0] in only.split(",")]:
        t0 = time.perf_counter()
        pipe = random_pipeline(DF14B, offload, fp8)
        if text_only:
            blocks = pipe.text_encoder.encoder["block"]
            pipe.text_encoder.to("cpu")
            pipe.text_encoder.encoder["block"] = skyreels.StreamedBlocks(list(blocks.children()), pipe.device)
            pipe.offload = True  # on_device: the text encoder's turn; the DiT and the VAE never leave the GPU
        built = time.perf_counter() - t0
        dit = pipe.transformer
        host = ""
        if offload:
            pinned = sum(t.nbytes for copies in dit.blocks.host for t in copies)
            rest = sum(p.nbytes for p in skyreels.resident(dit))
            host = f", DiT host memory: pinned blocks {pinned / 2**30:.2f} GiB + the rest {rest / 2**30:.2f} GiB"
        if DEV == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30 if DEV == "cuda" else 0.0
        with torch.no_grad():  # warm-up: the first CUDA work of a process (handles, kernel choices) not timed
            pipe.generate("a cat", height=64, width=96, num_frames=5, num_inference_steps=1, seed=0)
        peaks = phase_peaks(pipe)
        with torch.no_grad():
            tt, out = wall(lambda: pipe.generate("a cat", height=hh, width=ww, num_frames=nf, base_num_frames=nf,
                                                 num_inference_steps=steps, seed=0))
        # phase_peaks resets the peak at each phase: the run's peak is the largest phase's
        mem = max([torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0, *peaks.values()])
        videos[name], times[name] = out, tt
        note = ", ".join(f"{k} {v:.2f}" for k, v in peaks.items())
        other = {"fp8 resident": "bf16 resident", "fp8 offload": "bf16 offload", "bf16 offload": "fp8 offload",
                 "fp8 resident, text encoder streamed": "bf16 resident"}.get(name)
        if other in times:
            mse = float(((out - videos[other]) ** 2).mean())
            note += (f"; time {tt / times[other]:.3f}x of {other}, PSNR vs {other} "
                     f"{10 * math.log10(1 / max(mse, 1e-20)):.1f} dB")
        row(f"DF-14B {name}", None, f"{tt:.1f}s, GPU peak {mem:.2f} GiB (weights {base:.2f} GiB){host}",
            f"built in {built:.0f}s; phase peaks GiB: {note}")
        del pipe, dit, peaks
        free_memory()


def phase_peaks(pipe):
    """Record the GPU peak of each phase of a generation (text, DiT passes, VAE decode): {phase: GiB}."""
    peaks = {}

    def wrap(name, fn):
        def run(*a, **k):
            if DEV == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = fn(*a, **k)
            if DEV == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated() / 2**30)
            return out
        return run
    pipe.encode_text = wrap("text", pipe.encode_text)
    pipe.predict = wrap("DiT", pipe.predict)
    decoder = pipe.decoder
    pipe.decoder = lambda latent: wrap("VAE decode", lambda z: list(decoder(latent)(z)))  # decoded whole, measured
    return peaks


def gpu_memory():  # what the default cache budget sees
    if DEV != "cuda":
        return "no GPU: the default budget is the whole window"
    free, total = torch.cuda.mem_get_info()
    return (f"free {free / 2**30:.1f} of {total / 2**30:.1f} GiB, reserved {torch.cuda.memory_reserved() / 2**30:.1f}, "
            f"allocated {torch.cuda.memory_allocated() / 2**30:.1f}")


def bench_14b(quick):
    """DF-14B (40 layers, 40 heads x 128, ffn 13824), resident on one GPU: the synchronous and causal forwards at
    540P and 720P, the asynchronous loop with the shortcuts under the default cache budget, and its first
    iterations at 720P."""
    import skyreels

    log("== DF-14B resident: forwards at 540P / 720P, async loop with the cache budget")
    dit = random_dit(DF14B)
    log(f"  weights {torch.cuda.memory_allocated() / 2**30 if DEV == 'cuda' else 0:.1f} GiB")
    pipe = skyreels.Pipeline("df", None, None, dit, None, None, None, torch.device(DEV), False)
    g = torch.Generator(DEV).manual_seed(0)
    texts = tuple(torch.randn(1, 512, DF14B["text_dim"], device=DEV, generator=g).to(BF16) for _ in range(2))
    sizes = {"540P": (25, 68, 120), "720P": (31, 90, 160)} if not TINY else {"540P": (25, 4, 6), "720P": (31, 4, 6)}
    if quick:  # 540P only
        del sizes["720P"]
    fwd_causal = {}
    with torch.no_grad():
        for res, (f, h, w) in sizes.items():
            x = torch.randn(1, 16, f, h, w, device=DEV, generator=g).to(BF16)
            t = torch.randint(0, 1000, (1, f), device=DEV, generator=g)
            for blk in (1, 5):
                ff = f - f % blk
                s, win = df_window(dit, ff, h, w, block=blk)
                attention = whole_window(pipe, x[:, :, :ff], win, s)
                fn = lambda: dit(x[:, :, :ff], t[:, :ff], texts[0], fps=24, attention=attention)  # noqa: E731
                mem, _ = peak(fn)
                tt = timed(fn, 0, 1 if res == "720P" else 2)
                fwd_causal[res, blk] = tt
                flops = dit_flops(ff * h * w // 4, 5120, 13824, 512, 40)
                row(f"DF-14B {res} forward, {ff} latent frames, blocks of {blk}", None, f"{tt:.2f}s +{mem:.2f}GiB",
                    f"{flops / tt / 1e12:.0f} TFLOP/s by the count")
        for res, steps, iters in (("540P", 4, None), ("720P", 4, 8))[:len(sizes)]:
            f, h, w = sizes[res]
            f -= f % 5
            s, win = df_window(dit, f, h, w, steps)
            if iters:
                win = dataclasses.replace(win, matrix=win.matrix[:iters], update=win.update[:iters])
            x0 = torch.randn(1, 16, f, h, w, device=DEV, generator=g)
            torch.cuda.empty_cache() if DEV == "cuda" else None
            limit = skyreels.cache_limit(pipe, x0, s, list(itertools.accumulate(win.blocks)))
            log(f"  {gpu_memory()}; cache limit {limit} frames")
            mem, (tt, _) = peak(lambda: wall(lambda: pipe.denoise_window(x0.clone(), win, s, texts)))
            n = len(win.matrix)
            off = 2 * n * fwd_causal[res, 5]
            row(f"DF-14B {res} async loop, ar 5, blocks of 5, {f} latent frames, {steps} steps, CFG, {n} iterations"
                f"{' (the first)' if iters else ''}", None, f"{tt:.1f}s, +{mem:.2f}GiB peak (cache included)",
                f"shortcuts off = {2 * n} x {fwd_causal[res, 5]:.2f}s = {off:.1f}s: {off / tt:.1f}x faster; "
                f"{tt / n:.2f}s/iteration")
    del dit, pipe
    torch.cuda.empty_cache() if DEV == "cuda" else None


def bench_budget(quick):
    """What the default cache budget sees for DF-14B at 540P and 720P (free memory, the limit in frames)."""
    import skyreels

    dit = random_dit(DF14B)
    pipe = skyreels.Pipeline("df", None, None, dit, None, None, None, torch.device(DEV), False)
    for f, h, w in ((25, 68, 120), (30, 90, 160)) if not TINY else ((25, 4, 6), (30, 4, 6)):
        x0 = torch.zeros(1, 16, f, h, w, device=DEV)
        (guided, win), (one, _) = (df_window(dit, f, h, w, guidance=scale) for scale in (6.0, 1.0))
        ends = list(itertools.accumulate(win.blocks))
        limits = [skyreels.cache_limit(pipe, x0, s, ends) for s in (guided, one)]
        log(f"  {f}x{h}x{w}: {gpu_memory()}; cache limit {limits[0]} frames (CFG), {limits[1]} (one pass)")
    del dit, pipe


def bench_offload_e2e(quick):
    """End to end (text, denoising with CFG, VAE decode) from random weights at the official sizes, resident and
    with --offload (DiT blocks streamed), with each phase's GPU peak: DF-1.3B and DF-14B at 540P x 97 frames,
    DF-14B at 720P x 121 frames (offload only, one step)."""
    runs = [("DF-1.3B 540P", DF13B, (544, 960, 97), 10, (False, True)),
            ("DF-14B 540P", DF14B, (544, 960, 97), 2, (False, True)),
            ("DF-14B 720P", DF14B, (720, 1280, 121), 1, (True,))]
    if TINY:
        runs = [(n, c, (32, 48, 17), 2, o) for n, c, _, _, o in runs]
    if quick:  # DF-1.3B only
        runs = runs[:1]
    for name, cfg, (hh, ww, nf), steps, modes in runs:
        log(f"== end to end {name}, {nf} frames, {steps} steps, CFG: resident vs --offload")
        result = {}
        for offload in modes:
            pipe = random_pipeline(cfg, offload)
            if DEV == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            peaks = phase_peaks(pipe)
            with torch.no_grad():
                tt, out = wall(lambda: pipe.generate("a cat", height=hh, width=ww, num_frames=nf,
                                                     base_num_frames=nf, num_inference_steps=steps, seed=0))
            # phase_peaks resets the peak counter at each phase: the run's peak is the largest phase peak
            mem = max([torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0, *peaks.values()])
            result[offload] = (tt, out)
            note = ", ".join(f"{k} {v:.2f}" for k, v in peaks.items())
            if offload and False in result:
                note += (f"; time {tt / result[False][0]:.2f}x of resident, max abs vs resident "
                         f"{abs(out - result[False][1]).max():.1e}")
            row(f"{name} end to end, offload={offload}", None, f"{tt:.1f}s, GPU peak {mem:.2f} GiB",
                f"phase peaks GiB: {note}")
            del pipe, out, peaks
            free_memory()


def bench_smoke(quick):
    """The same video with --offload as resident, and with the async shortcuts as without (bf16, DF-1.3B at a small
    size, causal blocks of 5): max abs 0.0 is expected for offload (the same kernels on the same weights); the
    shortcuts sum attention in another order, so they may differ by bf16 rounding."""
    settings = dict(height=256, width=448, num_frames=37, base_num_frames=37, num_inference_steps=3, ar_step=2,
                    causal_block_size=5, seed=0, output_type="latent")
    if TINY:
        settings.update(height=32, width=48)
    outs = {}
    for offload in (False, True):
        pipe = random_pipeline(DF13B, offload)
        for shortcuts in (True, False):
            pipe.shortcuts = shortcuts
            torch.manual_seed(0)
            with torch.no_grad():
                outs[offload, shortcuts] = pipe.generate("a cat", **settings).float().cpu()
        del pipe
        free_memory()
    base = outs[False, True]
    for key, out in outs.items():
        row(f"smoke: offload={key[0]}, shortcuts={key[1]}", None, f"max abs vs resident with shortcuts "
            f"{(out - base).abs().max().item():.2e}")


def bench_blocks(quick):
    """Asynchronous image-to-video that keeps its image (issue 29): DF-1.3B at 540P, 97 frames, ar_step 5, causal
    blocks of 5, 2 steps, CFG, random weights: df-i2v (blocks 1+5+5+5+5+4, the image's latent a block of its own)
    against t2v (5+5+5+5+5) in the same run, end to end to the latents; the first latent frame against the image's
    latent; df-i2v with the shortcuts on against off."""
    import numpy as np

    import skyreels

    size = (32, 48) if TINY else (544, 960)
    settings = dict(height=size[0], width=size[1], num_frames=97, num_inference_steps=2, ar_step=5,
                    causal_block_size=5, guidance_scale=5.0, seed=0, output_type="latent")
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    pipe = random_pipeline(DF13B, False)
    with torch.no_grad():
        pipe.generate("warm-up", **dict(settings, num_frames=9, num_inference_steps=1))
        times, outs = {}, {}
        for name, extra in (("t2v", {}), ("df-i2v", dict(image=image)), ("df-i2v", dict(image=image)),
                            ("t2v", {})):  # each twice, alternating: the second of each is kept
            torch.manual_seed(0)
            times[name], outs[name] = wall(lambda: pipe.generate("a cat", **settings, **extra))
        pipe.shortcuts = False
        torch.manual_seed(0)
        off = pipe.generate("a cat", **settings, image=image)
        pipe.shortcuts = True
        s = skyreels.check_settings("df", pipe.transformer.config, skyreels.Settings("a cat", **settings, image=image))
        known = pipe.known_latents(s)[0]
    blocks = "+".join(map(str, skyreels.plan_windows(s)[0].blocks))
    row("df-i2v / t2v, 540P 97 frames, ar 5, blocks of 5, 2 steps, CFG", None,
        f"{times['df-i2v']:.2f} s / {times['t2v']:.2f} s = {times['df-i2v'] / times['t2v']:.3f}", f"blocks {blocks}")
    row("df-i2v: first latent frame vs the image's latent", None,
        f"max abs {(outs['df-i2v'][:, :1] - known[0].to(outs['df-i2v'])).abs().max().item():.2e}")
    row("df-i2v: shortcuts on vs off", None, f"max abs {(outs['df-i2v'] - off).abs().max().item():.2e}",
        f"rel {rel(outs['df-i2v'], off):.1e}")
    del pipe
    free_memory()


def bench_accuracy(quick):
    """Each fast path against a float32 forward of the same weights (DF-1.3B 540P, synchronous): which is nearer the
    exact result, eager bf16, compiled bf16, or flash-attn-4 (where installed)?"""
    import copy

    dit = random_dit(DF13B)
    x, t, ctx, _ = dit_inputs()
    with torch.no_grad():
        exact = copy.deepcopy(dit).float()(x.float(), t, ctx.float(), fps=24).float()
        free_memory()
        out = {"eager bf16 (SDPA)": dit(x, t, ctx, fps=24)}
        try:
            M.FLASH = flash_attn_4()
            out["eager bf16, flash-attn-4"] = dit(x, t, ctx, fps=24)
        except Exception as e:  # noqa: BLE001
            log(f"  flash-attn-4 not installed here ({type(e).__name__}): not measured")
        M.FLASH = None
        compile_blocks(dit)
        out["compiled bf16 (SDPA)"] = dit(x, t, ctx, fps=24)
    for name, o in out.items():
        row(f"accuracy: {name} vs a float32 forward", None, f"rel err {rel(o, exact):.2e}")


def bench_resume(quick):
    """Issue 22's figures: DF-1.3B 540P, 737 frames, base 97, overlap 17, asynchronous (ar 5, blocks of 5), CFG.
    A run stopped after `stopped` windows, then resumed: the state's bytes a window, the time from the resumed
    stream to its first new step as a share of the time the finished windows took, and both runs' GPU peaks."""
    import shutil

    steps, stopped = (10, 3) if not quick else (4, 2)
    settings = dict(height=544, width=960, num_frames=737, base_num_frames=97, overlap_history=17, ar_step=5,
                    causal_block_size=5, num_inference_steps=steps, seed=0, addnoise_condition=20)
    if TINY:  # 4 windows of 10 latent frames, each later one continuing 5
        settings.update(height=32, width=48, num_frames=97, base_num_frames=37, overlap_history=17)
    pipe, folder = random_pipeline(DF13B, False), tempfile.mkdtemp()
    state = os.path.join(folder, "film.state")

    class Stop(Exception):
        pass

    def until(window_steps, marks):  # progress: note when each step ends; stop once `window_steps` have run
        def progress(step, total):
            sync()
            marks.append(time.perf_counter())
            if len(marks) == window_steps:
                raise Stop
        return progress

    import skyreels

    windows = skyreels.plan_windows(skyreels.check_settings("df", pipe.transformer.config,
                                                            skyreels.Settings("a", **settings)))
    per_window = [len(w.matrix) for w in windows]
    for resume in (False, True):
        torch.manual_seed(0)
        sync()
        torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
        marks, t0 = [], time.perf_counter()
        want = sum(per_window[:stopped + 1]) if not resume else per_window[stopped]  # both: to window stopped + 1's end
        try:
            with torch.no_grad():
                for _ in pipe.stream("a cat", state=state, resume=resume, progress=until(want, marks), **settings):
                    pass
        except Stop:
            pass
        mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
        if not resume:
            finished = marks[sum(per_window[:stopped]) - 1] - t0  # the finished windows' time (their last step)
            # keep only the first `stopped` windows, as a stop during the next one leaves them
            for name in sorted(os.listdir(state))[stopped + 1:]:
                os.remove(os.path.join(state, name))
            size = os.path.getsize(os.path.join(state, "window-0001.safetensors"))
            row("resume: the first run", None, f"{len(windows)} windows of {per_window[0]} iterations; "
                f"{stopped} windows finished in {finished:.1f} s; GPU peak {mem:.2f} GiB",
                f"state: {size / 2**20:.1f} MiB a window")
        else:
            first = marks[0] - t0
            row("resume: from stream() to its first new step", None, f"{first:.1f} s = {first / finished:.1%} of the "
                f"finished windows' time; GPU peak {mem:.2f} GiB")
    # The state's own cost a window (issue 30): read and verified (checksum, chain), and written (checksum, fsync)
    s = skyreels.check_settings("df", pipe.transformer.config,
                                skyreels.Settings("a cat", **settings, state=state, resume=True))
    film = s.state.begin(pipe, s.generator)  # verifies every kept window once, as a resume does
    t0 = time.perf_counter()
    x = film.load(0, s.generator)[0]
    t1 = time.perf_counter()
    film.save(0, x, s.generator)
    t2 = time.perf_counter()
    row("resume: a window's state", None, f"read and verified {t1 - t0:.2f} s, written {t2 - t1:.2f} s = "
        f"{(t2 - t0) / (finished / stopped):.2%} of a window's time")
    shutil.rmtree(folder)


def dit_inputs():  # latents, per-frame timesteps and text for the 540P forward, and the generator that made them
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(LAT, device=DEV, generator=g).to(BF16)
    t = torch.randint(0, 1000, (1, LAT[2]), device=DEV, generator=g)
    ctx = torch.randn(1, 512, DF13B["text_dim"], device=DEV, generator=g).to(BF16)
    return x, t, ctx, g


def block_attention(dit, x):
    """{1: the synchronous forward's AttentionContext, 5: causal blocks of 5's}, for latents x (1, 16, F, h, w)."""
    import skyreels

    pipe, attention = skyreels.Pipeline("df", None, None, dit, None, None, None, torch.device(DEV), False), {}
    for block in (1, 5):
        s, w = df_window(dit, *x.shape[2:], block=block)
        attention[block] = whole_window(pipe, x, w, s)
    return attention


def bench_dit(quick):
    log("== DiT forward, DF-1.3B, 25x68x120 latents (51,000 tokens), text 512, bf16")
    ref, ours = build_dits()
    x, t, ctx, g = dit_inputs()
    attention = block_attention(ours, x)
    flops = dit_flops()
    runs = 3 if quick else 5

    def ref_call(block):
        ref._set_ar_attention(block)
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, enable_diffusion_forcing=True, fps=[1],
                   return_dict=False)[0]

    variants = {"plain": lambda blk: ours(x, t, ctx, fps=24, attention=attention[blk])}

    def cudnn(blk):
        with sdpa_prefer("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            return ours(x, t, ctx, fps=24, attention=attention[blk])
    variants["cudnn"] = cudnn

    def flash(blk):
        with sdpa_prefer("FLASH_ATTENTION"):
            return ours(x, t, ctx, fps=24, attention=attention[blk])
    variants["flash"] = flash

    with torch.no_grad():
        for block in (1, 5):
            label = "synchronous" if block == 1 else f"causal blocks of {block}"
            mem_ref, out_ref = peak(lambda: ref_call(block))
            t_ref = timed(lambda: ref_call(block), 1, runs)
            row(f"DiT {label}: time s", f"{t_ref:.3f}", None, f"({flops / t_ref / 1e12:.0f} TFLOP/s by the count)")
            row(f"DiT {label}: peak GiB over weights", f"{mem_ref:.2f}")
            for name, fn in variants.items():
                mem, out = peak(lambda: fn(block))
                tt = timed(lambda: fn(block), 1, runs)
                row(f"DiT {label} [{name}]", f"{t_ref:.3f}s {mem_ref:.2f}GiB",
                    f"{tt:.3f}s {mem:.2f}GiB", f"ratio {tt / t_ref:.2f}x time {mem / max(mem_ref, 1e-9):.2f}x mem, "
                    f"rel err {rel(out, out_ref):.2e}, {flops / tt / 1e12:.0f} TFLOP/s")
                del out
            del out_ref
        if not quick:
            t0 = time.time()
            compile_blocks(ours)
            for block in (1, 5):
                cudnn(block)  # compile
                log(f"  compile + first call: {time.time() - t0:.0f}s")
                mem, out = peak(lambda: cudnn(block))
                tt = timed(lambda: cudnn(block), 1, runs)
                row(f"DiT block {block} [cudnn+compile]", None, f"{tt:.3f}s {mem:.2f}GiB",
                    f"{flops / tt / 1e12:.0f} TFLOP/s")
    del ref, ours
    torch.cuda.empty_cache()


def bench_attention(quick):
    L = LAT[2] * FRAME_TOKENS
    log(f"== one attention layer: (1, 12, {L}, 128) bf16")
    g = torch.Generator(DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 12, L, 128, device=DEV, generator=g).to(BF16) for _ in range(3))
    tokens, block = FRAME_TOKENS, 5
    ends = list(range(tokens * block, L + 1, tokens * block))  # each causal block's end, in tokens
    frame = torch.arange(L, device=DEV) // tokens // block
    with torch.no_grad():
        base = F.scaled_dot_product_attention(q, k, v)
        row("attn SDPA no mask (default)", f"{timed(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3:.1f}ms")
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_prefer(name):
                    out = F.scaled_dot_product_attention(q, k, v)
                    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
                row(f"attn SDPA no mask [{name}]", None, f"{ms:.1f}ms", f"rel vs default {rel(out, base):.1e}")
            except Exception as e:  # noqa: BLE001
                row(f"attn SDPA no mask [{name}]", None, "failed", repr(e)[:120])
        mask = (frame[None, :] <= frame[:, None])[None, None]
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        row("attn dense block-causal mask (diffusers)",
            f"{timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) * 1e3:.1f}ms")
        del mask
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            with sdpa_prefer(name):
                out = M.block_causal_attention(q, k, v, ends)
                ms = timed(lambda: M.block_causal_attention(q, k, v, ends)) * 1e3
            row(f"attn ours per-block prefix [{name}]", None, f"{ms:.1f}ms", f"rel vs dense {rel(out, dense):.1e}")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            bm = create_block_mask(lambda b, h, qi, ki: frame[ki] <= frame[qi], None, None, L, L, device=DEV)
            fa = torch.compile(flex_attention) if not TINY else flex_attention
            if TINY:
                note("flex attention not compiled: its unfused reference runs (compiling takes longer than the rest)")
            out = fa(q, k, v, block_mask=bm)
            row("attn flex block-causal", None, f"{timed(lambda: fa(q, k, v, block_mask=bm)) * 1e3:.1f}ms",
                f"rel vs dense {rel(out, dense):.1e}")
        except Exception as e:  # noqa: BLE001
            row("attn flex block-causal", None, "failed", repr(e)[:120])


def bench_fa4(quick):
    """flash-attn-4 (CuTe DSL), if installed: its kernel against SDPA (cuDNN) on one DF-1.3B / DF-14B attention layer
    at 540P, and through torch's SDPA registry (activate_flash_attention_impl)."""
    L = LAT[2] * FRAME_TOKENS
    log(f"== flash-attn-4 vs SDPA: one attention layer, {L:,} tokens, head dim 128, bf16")
    try:
        flash_attn_func = flash_attn_4()
    except Exception as e:  # noqa: BLE001
        row("flash-attn-4", None, "not importable", repr(e)[:200])
        return
    g = torch.Generator(DEV).manual_seed(0)
    for heads in (12, 40):
        q, k, v = (torch.randn(1, L, heads, 128, device=DEV, generator=g).to(BF16) for _ in range(3))
        qt, kt, vt = (a.transpose(1, 2) for a in (q, k, v))  # (B, H, L, D) views, as our model passes them
        with torch.no_grad(), sdpa_prefer("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            base = F.scaled_dot_product_attention(qt, kt, vt)
            ms = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt)) * 1e3
        flops = 4 * L * L * 128 * heads
        row(f"attn {heads} heads SDPA cuDNN", None, f"{ms:.1f}ms", f"{flops / ms / 1e9:.0f} TFLOP/s")
        try:
            t0 = time.time()
            out = flash_attn_func(q, k, v)
            out = out[0] if isinstance(out, tuple) else out
            log(f"  first call (JIT) {time.time() - t0:.0f}s")
            ms = timed(lambda: flash_attn_func(q, k, v)) * 1e3
            row(f"attn {heads} heads flash-attn-4", None, f"{ms:.1f}ms",
                f"{flops / ms / 1e9:.0f} TFLOP/s, rel vs cuDNN {rel(out.transpose(1, 2), base):.1e}")
        except Exception as e:  # noqa: BLE001
            row(f"attn {heads} heads flash-attn-4", None, "failed", repr(e)[:300])
        if TINY:
            note("torch's FA4 SDPA registration left out: it loads flash-attn-4's CUDA kernels")
            continue
        try:
            from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls

            log(f"  torch flash impls: {list_flash_attention_impls()}")
            activate_flash_attention_impl("FA4")
            with torch.no_grad(), sdpa_prefer("FLASH_ATTENTION"):
                out = F.scaled_dot_product_attention(qt, kt, vt)
                ms = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt)) * 1e3
            row(f"attn {heads} heads SDPA with FA4 registered", None, f"{ms:.1f}ms",
                f"{flops / ms / 1e9:.0f} TFLOP/s, rel vs cuDNN {rel(out, base):.1e}")
        except Exception as e:  # noqa: BLE001
            row(f"attn {heads} heads SDPA with FA4 registered", None, "failed", repr(e)[:300])


def bench_fa4_tiles(quick):
    """flash-attn-4's SM90 forward at other tile shapes and flags than its default for head dim 128 (128x128,
    P.V from registers, intra-warpgroup overlap), through its private _flash_attn_fwd: is the default the fastest?"""
    L = LAT[2] * FRAME_TOKENS
    log(f"== flash-attn-4 tile sweep: one attention layer, {L:,} tokens, head dim 128, bf16")
    _flash_attn_fwd = flash_attn_4("_flash_attn_fwd")
    g = torch.Generator(DEV).manual_seed(0)
    for heads in (12, 40):
        q, k, v = (torch.randn(1, L, heads, 128, device=DEV, generator=g).to(BF16) for _ in range(3))
        flops = 4 * L * L * 128 * heads
        for tile_n in (128, 144, 160, 176, 192):
            for rs in (True, False):
                for overlap in (True, False):
                    fn = lambda: _flash_attn_fwd(q, k, v, tile_mn=(128, tile_n), mma_pv_is_rs=rs,  # noqa: E731
                                                 intra_wg_overlap=overlap)[0]
                    try:
                        ms = timed(fn, 1, 5) * 1e3
                        row(f"attn {heads} heads, tile 128x{tile_n}, rs {rs}, overlap {overlap}", None, f"{ms:.2f}ms",
                            f"{flops / ms / 1e9:.0f} TFLOP/s")
                    except Exception as e:  # noqa: BLE001  tiles past the shared memory fail to launch
                        row(f"attn {heads} heads, tile 128x{tile_n}, rs {rs}, overlap {overlap}", None, "failed",
                            repr(e)[:80])


def bench_profile(quick):
    """Where the time of the compiled DF-1.3B synchronous forward goes (flash-attn-4 where installed): the CUDA
    kernels of one forward, by total time."""
    from torch.profiler import ProfilerActivity, profile

    log("== CUDA profile: DF-1.3B synchronous forward at 540P, compiled blocks")
    use_flash_attention_4()
    dit = random_dit(DF13B)
    compile_blocks(dit)
    x, t, ctx, _ = dit_inputs()
    where = "cuda" if DEV == "cuda" else "cpu"
    if TINY:
        note("the CPU's operators profiled in place of the CUDA kernels")
    with torch.no_grad():
        fn = lambda: dit(x, t, ctx, fps=24)  # noqa: E731
        row("DF-1.3B synchronous forward, compiled", None, f"{timed(fn, 2, 3):.3f}s", f"FLASH={M.FLASH is not None}")
        with profile(activities=[getattr(ProfilerActivity, where.upper())]) as prof:
            fn()
            sync()
    log(prof.key_averages().table(sort_by=f"{where}_time_total", row_limit=12, max_name_column_width=70))


def bench_fa4_dit(quick):
    """The DiT forward with its attention through flash-attn-4 (model.FLASH, as load() sets it on Hopper) against
    PyTorch's SDPA (cuDNN) and diffusers in the same run: DF-1.3B synchronous and causal blocks of 5 at 540P, then
    DF-14B at 540P; plain, then with the blocks compiled."""
    log("== DiT forward: SDPA (cuDNN) vs flash-attn-4, DF-1.3B and DF-14B at 540P")
    ref, ours = build_dits()
    x, t, ctx, g = dit_inputs()
    attention = block_attention(ours, x)  # DF-14B's are the same: one token grid
    fa4 = use_flash_attention_4()
    sizes = {"DF-1.3B": (dit_flops(), None), "DF-14B": (dit_flops(51000, 5120, 13824, 512, 40), None)}
    t_ref, out_ref = {}, {}
    with torch.no_grad():
        for block in (1, 5):
            ref._set_ar_attention(block)
            fn = lambda: ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx,  # noqa: E731
                             enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
            out_ref[block], t_ref[block] = fn(), timed(fn, 1, 3)
            row(f"DF-1.3B blocks of {block}", f"{t_ref[block]:.3f}s", None,
                f"{sizes['DF-1.3B'][0] / t_ref[block] / 1e12:.0f} TFLOP/s")
        del ref
        torch.cuda.empty_cache()

        def variants(name, dit, tag, kernels=(("SDPA", None), ("FA4", fa4))):
            flops, base = sizes[name]
            runs = 3 if name == "DF-1.3B" else 1
            outs = {}
            for kernel, M.FLASH in kernels:
                for block in (1, 5):
                    fn = lambda: dit(x, t, ctx, fps=24, attention=attention[block])  # noqa: E731
                    t0 = time.time()
                    out = fn()
                    first = time.time() - t0
                    mem, _ = peak(fn)
                    tt = timed(fn, 0, runs)  # the first call and peak's were the warm-up
                    outs[kernel, block] = out
                    note = f"{flops / tt / 1e12:.0f} TFLOP/s, first call {first:.0f}s"
                    if name == "DF-1.3B":
                        note += f", ratio {tt / t_ref[block]:.2f}x, rel err vs diffusers {rel(out, out_ref[block]):.2e}"
                    if kernel == "FA4" and ("SDPA", block) in outs:
                        note += f", rel vs SDPA {rel(out, outs['SDPA', block]):.1e}"
                    row(f"{name} blocks of {block} [{kernel}{tag}]", f"{t_ref[block]:.3f}s" if name == "DF-1.3B"
                        else None, f"{tt:.3f}s +{mem:.2f}GiB", note)
            M.FLASH = fa4

        variants("DF-1.3B", ours, "")
        dit14 = random_dit(DF14B)
        variants("DF-14B", dit14, "")
        if not quick:
            for dit, name in ((ours, "DF-1.3B"), (dit14, "DF-14B")):
                compile_blocks(dit)
                variants(name, dit, "+compile", (("FA4", fa4),) if name == "DF-14B" else (("SDPA", None), ("FA4", fa4)))


def bench_fa4_e2e(quick):
    """DF-1.3B end to end at 540P (text, 10 steps with CFG, VAE decode), random weights at the official sizes: the
    DiT's attention on SDPA, then through flash-attn-4 as load() sets it: time, GPU peak, and the videos' PSNR."""
    hh, ww, nf = FULL
    log(f"== DF-1.3B end to end, {nf} frames, 10 steps, CFG: SDPA vs flash-attn-4")
    pipe, videos = random_pipeline(DF13B, False), {}
    fa4 = use_flash_attention_4()
    for name, M.FLASH in (("SDPA", None), ("FA4", fa4)):
        torch.cuda.reset_peak_memory_stats() if DEV == "cuda" else None
        with torch.no_grad():
            tt, videos[name] = wall(lambda: pipe.generate("a cat", height=hh, width=ww, num_frames=nf,
                                                          base_num_frames=nf, num_inference_steps=10, seed=0))
        mse = float(((videos[name] - videos["SDPA"]) ** 2).mean())  # frames in [0, 1]
        psnr_ = f"PSNR vs SDPA {10 * math.log10(1 / max(mse, 1e-20)):.1f} dB" if name == "FA4" else ""
        mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
        row(f"DF-1.3B end to end [{name}]", None, f"{tt:.1f}s, GPU peak {mem:.2f} GiB", psnr_)


def bench_vae(quick):
    from diffusers import AutoencoderKLWan

    log("== VAE float32: decode 25 latent frames (-> 97 x 544 x 960), encode 97 frames")
    torch.manual_seed(0)
    cfg = V.CONFIGS[VAE_SIZE]
    with torch.device(DEV):
        ref = AutoencoderKLWan(base_dim=cfg.base_dim, dim_mult=list(cfg.dim_mult),
                               num_res_blocks=cfg.num_res_blocks).eval()
    with torch.device("meta"):
        ours = V.VAE(cfg)
    ours.load_state_dict({k: v.detach().clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    ours.eval()
    g = torch.Generator(DEV).manual_seed(0)
    z = torch.randn(LAT, device=DEV, generator=g)
    runs = 1 if quick else 3
    with torch.no_grad():
        mem_ref, out_ref = peak(lambda: ref.decode(z).sample)
        t_ref = timed(lambda: ref.decode(z).sample, 1, runs)
        mem, out = peak(lambda: ours.decode(z))
        tt = timed(lambda: ours.decode(z), 1, runs)
        t_ref_dec = t_ref
        row("VAE decode fp32", f"{t_ref:.2f}s {mem_ref:.2f}GiB", f"{tt:.2f}s {mem:.2f}GiB",
            f"ratio {tt / t_ref:.2f}x time {mem / max(mem_ref, 1e-9):.2f}x mem, rel err {rel(out, out_ref):.1e}")
        video = out_ref.clamp(-1, 1)
        del out, out_ref
        mem_ref, enc_ref = peak(lambda: ref.encode(video).latent_dist.mode())
        t_ref = timed(lambda: ref.encode(video).latent_dist.mode(), 1, runs)
        mem, enc = peak(lambda: ours.encode(video))
        tt = timed(lambda: ours.encode(video), 1, runs)
        row("VAE encode fp32", f"{t_ref:.2f}s {mem_ref:.2f}GiB", f"{tt:.2f}s {mem:.2f}GiB",
            f"ratio {tt / t_ref:.2f}x time {mem / max(mem_ref, 1e-9):.2f}x mem, rel err {rel(enc, enc_ref):.1e}")
        torch.backends.cudnn.benchmark = True  # the VAE runs the same conv shapes frame after frame: autotune
        ours.decode(z)
        tt = timed(lambda: ours.decode(z), 0, runs)
        row("VAE decode fp32, cudnn.benchmark", None, f"{tt:.2f}s", f"ratio {tt / t_ref_dec:.2f}x")
        ours.encode(video)
        tt = timed(lambda: ours.encode(video), 0, runs)
        row("VAE encode fp32, cudnn.benchmark", None, f"{tt:.2f}s", f"ratio {tt / t_ref:.2f}x")
        torch.backends.cudnn.benchmark = False
        dec32 = ours.decode(z)
        ours.to(BF16)
        mem, dec16 = peak(lambda: ours.decode(z.to(BF16)))
        tt = timed(lambda: ours.decode(z.to(BF16)), 1, runs)
        row("VAE decode bf16 (ours)", None, f"{tt:.2f}s {mem:.2f}GiB", f"PSNR vs fp32 {psnr(dec16, dec32):.1f} dB")
        mem, enc16 = peak(lambda: ours.encode(video.to(BF16)))
        tt = timed(lambda: ours.encode(video.to(BF16)), 1, runs)
        row("VAE encode bf16 (ours)", None, f"{tt:.2f}s {mem:.2f}GiB", f"rel err vs fp32 {rel(enc16, enc):.1e}")


def bench_loop(quick):
    """The whole denoising loop of an asynchronous run: ar_step 5, causal blocks of 5, 97 frames at 544x960,
    10 steps, CFG: 30 iterations, 60 forwards. diffusers' figure is 60 x its measured causal-block forward."""
    import skyreels

    log("== asynchronous denoising loop: ar_step 5, blocks of 5, 97 frames 544x960, 10 steps, CFG")
    ref, ours = build_dits()
    g = torch.Generator(DEV).manual_seed(0)
    texts = tuple(torch.randn(1, 512, DF13B["text_dim"], device=DEV, generator=g).to(BF16) for _ in range(2))
    ctx = texts[0]
    x0 = torch.randn(LAT, device=DEV, generator=g)
    with torch.no_grad():
        t = torch.randint(0, 1000, (1, LAT[2]), device=DEV, generator=g)
        ref._set_ar_attention(5)
        fwd = lambda: ref(hidden_states=x0.to(BF16), timestep=t, encoder_hidden_states=ctx,  # noqa: E731
                          enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
        t_fwd = timed(fwd, 1, 3)
    del ref
    torch.cuda.empty_cache() if DEV == "cuda" else None
    s, w = df_window(ours, *LAT[2:], steps=10)
    forwards = 2 * len(w.matrix)
    t_ref = forwards * t_fwd
    pipe = skyreels.Pipeline("df", None, None, ours, None, None, None, torch.device(DEV), False)
    outs = {}
    for name, on, comp in (("no shortcuts", False, False), ("shortcuts", True, False),
                           ("shortcuts+compile", True, True)):
        if comp:
            if quick:
                continue
            compile_blocks(ours, dynamic=True)
            with torch.no_grad():  # compile outside the timing
                pipe.denoise_window(x0.clone(), w, s, texts)
        pipe.shortcuts = on
        with torch.no_grad():
            mem, (tt, out) = peak(lambda: wall(lambda: pipe.denoise_window(x0.clone(), w, s, texts)))
        outs[name] = out
        note = f"ratio {tt / t_ref:.2f}x ({t_ref / tt:.1f}x faster), peak {mem:.2f} GiB"
        if name != "no shortcuts" and "no shortcuts" in outs:
            note += f", rel err vs no shortcuts {rel(out, outs['no shortcuts']):.1e}"
        row(f"async loop [{name}]", f"{t_ref:.1f}s (= {forwards} x {t_fwd:.2f}s)", f"{tt:.1f}s", note)


def bench_stream(quick):
    """Peak GPU and host memory of streamed long generation (windows decoded and handed on as they finish) at 97,
    257 and 737 frames, 256x448, base 97, overlap 17, DF-1.3B-sized DiT, the Wan VAE, random weights."""
    import resource

    import skyreels
    import text as T

    log("== streamed long video: memory at 97 / 257 / 737 frames (256x448, 2 steps, no CFG)")
    pipe = skyreels.load("tiny-df", device=DEV, dtype=BF16)
    _, pipe.transformer = None, build_dits()[1]
    torch.cuda.empty_cache() if DEV == "cuda" else None
    cfg = dataclasses.replace(T.CONFIGS["tiny"], d_model=DF13B["text_dim"], num_layers=1)
    pipe.text_encoder = skyreels.place(T.UMT5Encoder(cfg), DEV, BF16).eval()
    with torch.device(DEV):
        pipe.vae = V.VAE(V.CONFIGS[VAE_SIZE]).eval()
    height, width, lengths, base, overlap = STREAM
    for n in lengths[:2] if quick else lengths:
        made = [0]

        def run():
            for chunk in pipe.stream("a cat", height=height, width=width, num_frames=n, base_num_frames=base,
                                     overlap_history=overlap, num_inference_steps=2, guidance_scale=1.0, seed=0):
                made[0] += len(chunk)  # the CLI writes each chunk to the mp4 and drops it
        with torch.no_grad():
            mem, _ = peak(lambda: wall(run))
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        row(f"stream {n} frames", None, f"GPU peak {mem:.2f} GiB, host max RSS so far {host:.2f} GiB",
            f"{made[0]} frames")


def write_official_folder(path):
    """A DF-1.3B -Diffusers folder with random weights at the official sizes (UMT5-XXL, the DiT, the Wan VAE)."""
    import json

    from safetensors.torch import save_file

    import skyreels
    import text as T

    te = dataclasses.asdict(T.CONFIGS["tiny" if TINY else "umt5-xxl"])
    parts = {"text_encoder": (T.UMT5Encoder(T.UMT5Config.from_config(te)) if TINY else None, te, "model"),
             "transformer": (None, DF13B, "diffusion_pytorch_model"),
             "vae": (None, dict(zip(("base_dim", "dim_mult", "num_res_blocks"), (8, [1, 2, 2, 2], 1))) if TINY
                     else {}, "diffusion_pytorch_model")}
    with torch.device("meta"):
        mods = {"text_encoder": T.UMT5Encoder(T.UMT5Config.from_config(te)),
                "transformer": M.DiT(M.DiTConfig.from_config(DF13B)),
                "vae": V.VAE(V.VAEConfig.from_config(parts["vae"][1]))}
    g = torch.Generator(DEV).manual_seed(0)
    for sub, (_, cfg, stem) in parts.items():
        os.makedirs(os.path.join(path, sub), exist_ok=True)
        with open(os.path.join(path, sub, "config.json"), "w") as f:
            json.dump(cfg, f)
        m, tensors = mods[sub], {}
        for name, p in m.state_dict().items():
            dt = torch.float32 if sub == "vae" else skyreels.param_dtype(m, name, BF16)
            scale = 1.0 if ("norm" in name or "gamma" in name) else 0.02
            r = torch.randn(p.shape, device=DEV, generator=g, dtype=dt) * scale
            tensors[name] = (r + 1 if scale == 1.0 else r).cpu()
        save_file(tensors, os.path.join(path, sub, f"{stem}.safetensors"))
        del tensors
    os.makedirs(os.path.join(path, "tokenizer"), exist_ok=True)
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(skyreels.TINY_CORPUS * 4), model_prefix=os.path.join(path, "tokenizer", "spiece"),
        vocab_size=200, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "SkyReelsV2DiffusionForcingPipeline"}, f)


def bench_offload(quick):
    """--offload: DF-1.3B, 544x960, 97 frames end to end (text, 10 steps with CFG, decode) from a random-weight
    folder at the official sizes (written under TMPDIR, then removed); peak GPU memory and time, with and without
    offload."""
    import shutil

    import skyreels

    hh, ww, nf = FULL
    log(f"== --offload: DF-1.3B folder (random weights, official sizes), {hh}x{ww}, {nf} frames, 10 steps, CFG")
    path = tempfile.mkdtemp(prefix="df13b-")
    try:
        t_write, _ = wall(lambda: write_official_folder(path))
        log(f"  wrote {path} in {t_write:.0f}s")
        settings = dict(prompt="a cat", height=hh, width=ww, num_frames=nf, num_inference_steps=2 if quick else 10,
                        seed=0)
        result = {}
        for offload in (False, True):
            if DEV == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t_load, pipe = wall(lambda: skyreels.load(path, device=DEV, dtype=BF16, offload=offload))
            with torch.no_grad():
                tt, out = wall(lambda: pipe.generate(**settings))
            mem = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0.0
            result[offload] = (tt, out)
            row(f"end to end, offload={offload}", None, f"{tt:.1f}s, GPU peak {mem:.2f} GiB (load {t_load:.0f}s)",
                "" if not offload else f"time {tt / result[False][0]:.2f}x of no offload, "
                                       f"max abs vs no offload {abs(out - result[False][1]).max():.1e}")
            del pipe
    finally:
        shutil.rmtree(path, ignore_errors=True)


PARTS = {"dit": bench_dit, "attn": bench_attention, "vae": bench_vae, "loop": bench_loop, "stream": bench_stream,
         "offload": bench_offload, "14b": bench_14b, "e2e": bench_offload_e2e, "smoke": bench_smoke,
         "accuracy": bench_accuracy, "resume": bench_resume, "fa4dit": bench_fa4_dit, "fa4e2e": bench_fa4_e2e,
         "fa4tiles": bench_fa4_tiles, "profile": bench_profile, "fa4": bench_fa4, "budget": bench_budget,
         "fp8": bench_fp8, "blocks": bench_blocks}  # --only's names: each takes `quick`


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="attn,dit,vae,loop,stream,offload", help=f"all, or some of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: a smoke test of this script")
    args = p.parse_args()
    parts = list(PARTS) if args.only == "all" else args.only.split(",")
    if unknown := [part for part in parts if part not in PARTS]:
        p.error(f"--only: no part {', '.join(unknown)}; the parts are {', '.join(PARTS)}")
    if args.tiny:
        set_tiny()
    log(f"{torch.cuda.get_device_name() if DEV == 'cuda' else 'CPU'}  torch {torch.__version__}  "
        f"{time.strftime('%Y-%m-%d')}")
    failed = []
    for part in parts:
        log(f"--- {part}")
        t0 = time.perf_counter()
        try:
            PARTS[part](args.quick)
            log(f"{part} done in {time.perf_counter() - t0:.1f} s")
        except Exception:  # noqa: BLE001  one failing part should not hide the others
            failed.append(part)
            log(f"{part} failed: {traceback.format_exc()[-1500:]}")
        torch.cuda.empty_cache()
    log("\n| figure | diffusers | ours | note |\n|---|---|---|---|")
    for r in ROWS:
        log("| " + " | ".join("" if c is None else str(c) for c in r) + " |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
