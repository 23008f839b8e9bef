"""GPU benchmark: our DiT and VAE against diffusers', same random weights, same inputs, one table.

    python tests/bench.py [--only dit,attn,vae] [--quick]

Not collected by pytest (needs CUDA and diffusers==0.42.1). Sizes are DF-1.3B's at 540P: 97 frames = 25x68x120
latents = 51,000 tokens, text length 512, random bf16 weights (float32 for the VAE). Each figure is the median of
several CUDA-event timings after warm-up; peak memory is what the call adds over the weights and inputs. Outputs are
compared with diffusers' (relative error), so a fast path that changes numerics shows it.
"""
import argparse
import math
import os
import statistics
import sys
import time

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
ROWS = []


def log(*a):
    print(*a, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench.log"), "a") as f:
            print(*a, file=f)


def row(name, ref=None, ours=None, note=""):
    ROWS.append((name, ref, ours, note))
    log(f"  {name}: diffusers {ref}  ours {ours}  {note}")


def timed(fn, warmup=2, runs=5):
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
    ref.to(BF16)
    for name, p in ref.named_parameters():  # diffusers' from_pretrained keeps these in float32 (unrounded)
        if any(k in name.split(".") for k in keep):
            p.data = state[name].clone()
    with torch.device("meta"):
        ours = M.DiT(M.DiTConfig.from_config(DF13B))
    ours.load_state_dict({k: v.to(torch.float32 if any(s in k for s in ours.keep_fp32) else BF16)
                          for k, v in state.items()}, strict=True, assign=True)
    del state
    return ref.eval(), ours.eval()


def bench_dit(quick):
    log("== DiT forward, DF-1.3B, 25x68x120 latents (51,000 tokens), text 512, bf16")
    ref, ours = build_dits()
    g = torch.Generator(DEV).manual_seed(0)
    x = torch.randn(LAT, device=DEV, generator=g).to(BF16)
    t = torch.randint(0, 1000, (1, 25), device=DEV, generator=g)
    ctx = torch.randn(1, 512, 4096, device=DEV, generator=g).to(BF16)
    flops = dit_flops()
    runs = 3 if quick else 5

    def ref_call(block):
        ref._set_ar_attention(block)
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, enable_diffusion_forcing=True, fps=[1],
                   return_dict=False)[0]

    variants = {"plain": lambda blk: ours(x, t, ctx, fps=24, causal_block_size=blk)}

    def cudnn(blk):
        with sdpa_prefer("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            return ours(x, t, ctx, fps=24, causal_block_size=blk)
    variants["cudnn"] = cudnn

    def flash(blk):
        with sdpa_prefer("FLASH_ATTENTION"):
            return ours(x, t, ctx, fps=24, causal_block_size=blk)
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
                    f"{tt:.3f}s {mem:.2f}GiB", f"ratio {tt / t_ref:.2f}x time {mem / mem_ref:.2f}x mem, "
                    f"rel err {rel(out, out_ref):.2e}, {flops / tt / 1e12:.0f} TFLOP/s")
                del out
            del out_ref
        if not quick:
            t0 = time.time()
            for b in ours.blocks:
                b.compile()
            for block in (1, 5):
                cudnn(block)  # compile
                log(f"  compile + first call: {time.time() - t0:.0f}s")
                mem, out = peak(lambda: cudnn(block))
                tt = timed(lambda: cudnn(block), 1, runs)
                row(f"DiT block {block} [cudnn+compile]", None, f"{tt:.3f}s {mem:.2f}GiB",
                    f"{flops / tt / 1e12:.0f} TFLOP/s")
    del ref, ours
    torch.cuda.empty_cache()


def bench_attention():
    log("== one attention layer: (1, 12, 51000, 128) bf16")
    g = torch.Generator(DEV).manual_seed(0)
    q, k, v = (torch.randn(1, 12, 51000, 128, device=DEV, generator=g).to(BF16) for _ in range(3))
    tokens, block = 2040, 5
    frame = torch.arange(51000, device=DEV) // tokens // block
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
                out = M.block_causal_attention(q, k, v, tokens * block)
                ms = timed(lambda: M.block_causal_attention(q, k, v, tokens * block)) * 1e3
            row(f"attn ours per-block prefix [{name}]", None, f"{ms:.1f}ms", f"rel vs dense {rel(out, dense):.1e}")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            bm = create_block_mask(lambda b, h, qi, ki: frame[ki] <= frame[qi], None, None, 51000, 51000, device=DEV)
            fa = torch.compile(flex_attention)
            out = fa(q, k, v, block_mask=bm)
            row("attn flex block-causal", None, f"{timed(lambda: fa(q, k, v, block_mask=bm)) * 1e3:.1f}ms",
                f"rel vs dense {rel(out, dense):.1e}")
        except Exception as e:  # noqa: BLE001
            row("attn flex block-causal", None, "failed", repr(e)[:120])


def bench_vae(quick):
    from diffusers import AutoencoderKLWan

    log("== VAE float32: decode 25 latent frames (-> 97 x 544 x 960), encode 97 frames")
    torch.manual_seed(0)
    with torch.device(DEV):
        ref = AutoencoderKLWan().eval()
    with torch.device("meta"):
        ours = V.VAE(V.CONFIGS["wan2.1"])
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
        row("VAE decode fp32", f"{t_ref:.2f}s {mem_ref:.2f}GiB", f"{tt:.2f}s {mem:.2f}GiB",
            f"ratio {tt / t_ref:.2f}x time {mem / mem_ref:.2f}x mem, rel err {rel(out, out_ref):.1e}")
        video = out_ref.clamp(-1, 1)
        del out, out_ref
        mem_ref, enc_ref = peak(lambda: ref.encode(video).latent_dist.mode())
        t_ref = timed(lambda: ref.encode(video).latent_dist.mode(), 1, runs)
        mem, enc = peak(lambda: ours.encode(video))
        tt = timed(lambda: ours.encode(video), 1, runs)
        row("VAE encode fp32", f"{t_ref:.2f}s {mem_ref:.2f}GiB", f"{tt:.2f}s {mem:.2f}GiB",
            f"ratio {tt / t_ref:.2f}x time {mem / mem_ref:.2f}x mem, rel err {rel(enc, enc_ref):.1e}")
        dec32 = ours.decode(z)
        ours.to(BF16)
        mem, dec16 = peak(lambda: ours.decode(z.to(BF16)))
        tt = timed(lambda: ours.decode(z.to(BF16)), 1, runs)
        row("VAE decode bf16 (ours)", None, f"{tt:.2f}s {mem:.2f}GiB", f"PSNR vs fp32 {psnr(dec16, dec32):.1f} dB")
        mem, enc16 = peak(lambda: ours.encode(video.to(BF16)))
        tt = timed(lambda: ours.encode(video.to(BF16)), 1, runs)
        row("VAE encode bf16 (ours)", None, f"{tt:.2f}s {mem:.2f}GiB", f"rel err vs fp32 {rel(enc16, enc):.1e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="attn,dit,vae")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    log(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}")
    for part in args.only.split(","):
        try:
            {"dit": lambda: bench_dit(args.quick), "attn": bench_attention, "vae": lambda: bench_vae(args.quick)}[part]()
        except Exception as e:  # noqa: BLE001  one failing part should not hide the others
            import traceback

            log(f"{part} failed: {traceback.format_exc()[-1500:]}")
        torch.cuda.empty_cache()
    log("\n| figure | diffusers | ours | note |\n|---|---|---|---|")
    for r in ROWS:
        log("| " + " | ".join("" if c is None else str(c) for c in r) + " |")


if __name__ == "__main__":
    main()
