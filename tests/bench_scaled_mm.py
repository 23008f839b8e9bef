# Run: python tests/bench_scaled_mm.py (one GPU with fp8 tensor cores, ~40 GiB free; ~80 s on an H200)
"""fp8 Linear layers through torch._scaled_mm (fp8 x fp8 on Hopper) vs the dequantizing FP8Linear, DF-14B at 544x960x97.
One DiT forward each (eager, bf16 compute), after a warm-up; and the relative error between the two outputs.
--tiny: the tiny DiT on the CPU, where torch._scaled_mm is a reference kernel (no tensor cores): a smoke run."""
import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import skyreels  # noqa: E402

bf16 = torch.bfloat16
dequant = skyreels.FP8Linear.forward


def scaled_mm(self, x):  # the activations quantized per tensor (absmax / 448), fp8 x fp8 -> bf16 on the tensor cores
    x2 = x.reshape(-1, x.shape[-1])
    sx = (x2.abs().amax().float() / 448).clamp(min=1e-12)
    xq = (x2 / sx.to(x2.dtype)).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale.float(), bias=self.bias,
                         out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], -1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the tiny DiT on the CPU: a smoke run of this script")
    tiny = parser.parse_args().tiny
    dev = torch.device("cpu" if tiny else "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    memory = lambda: torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0  # noqa: E731
    print(torch.cuda.get_device_name() if not tiny else "CPU", torch.__version__, time.strftime("%Y-%m-%d"), flush=True)
    if tiny:
        print("note: torch._scaled_mm on the CPU is a reference kernel, not fp8 tensor cores: times mean nothing")
    cfg = dataclasses.replace(model.CONFIGS["tiny" if tiny else "14B"], inject_sample_info=True)
    torch.manual_seed(0)
    with torch.device(dev):
        torch.set_default_dtype(bf16)
        dit = model.DiT(cfg)
        torch.set_default_dtype(torch.float32)
    for p in dit.parameters():  # weights of a trained scale: random init is ~U(-1/sqrt(in), 1/sqrt(in))
        p.requires_grad_(False)
    skyreels.place(dit, dev, bf16).eval()
    skyreels.use_fp8(dit, dev)  # the blocks' and fps projection's Linears -> FP8Linear (absmax / 448)
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    print(f"weights {torch.cuda.memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.2f} GiB", flush=True)

    g = torch.Generator(device=dev).manual_seed(1)
    h, w = (4, 6) if tiny else (68, 120)
    x = torch.randn(1, 16, 25, h, w, device=dev, generator=g, dtype=bf16)
    t = torch.full((1, 25), 700.0, device=dev)
    ctx = torch.randn(1, 512, cfg.text_dim, device=dev, generator=g, dtype=bf16)
    out, times = {}, {}
    with torch.no_grad():
        for name, fwd in (("dequant", dequant), ("scaled_mm", scaled_mm), ("dequant ", dequant),
                          ("scaled_mm ", scaled_mm)):
            skyreels.FP8Linear.forward = fwd
            dit(x[:, :, :5], t[:, :5], ctx, fps=24)  # warm-up at a small size
            sync()
            start = time.time()
            for _ in range(2):
                o = dit(x, t, ctx, fps=24)
            sync()
            times[name] = (time.time() - start) / 2
            out[name.strip()] = o.float()
            print(f"{name.strip():10s} forward {times[name]:.3f} s  peak {memory():.2f} GiB", flush=True)
    a, b = out["scaled_mm"], out["dequant"]
    print(f"scaled_mm / dequant time: {times['scaled_mm '] / times['dequant ']:.3f} (2nd pair), "
          f"{times['scaled_mm'] / times['dequant']:.3f} (1st pair)")
    print(f"relative error scaled_mm vs dequant: {((a - b).norm() / b.norm()).item():.3e}; "
          f"max abs {(a - b).abs().max().item():.3e}")
    # bf16 rounding for scale: the dequantizing path in float32 compute on a 5-frame input vs bf16
    skyreels.FP8Linear.forward = dequant
    xs, ts = x[:, :, :5], t[:, :5]
    with torch.no_grad():
        o16 = dit(xs, ts, ctx, fps=24).float()
        skyreels.FP8Linear.forward = scaled_mm
        omm = dit(xs, ts, ctx, fps=24).float()
        skyreels.FP8Linear.forward = dequant
        skyreels.place(dit, dev, torch.float32)
        for m in dit.modules():
            if isinstance(m, skyreels.FP8Linear) and m.bias is not None:
                m.bias.data = m.bias.data.float()
        o32 = dit(xs.float(), ts, ctx.float(), fps=24).float()
    print(f"5 frames: bf16 dequant vs float32 dequant {((o16 - o32).norm() / o32.norm()).item():.3e}; "
          f"bf16 scaled_mm vs float32 dequant {((omm - o32).norm() / o32.norm()).item():.3e}")


if __name__ == "__main__":
    main()
