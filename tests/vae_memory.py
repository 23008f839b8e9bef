"""Peak memory of our VAE and diffusers' at the benchmark's sizes (540P, float32), measured on the CPU without compute.

    python tests/vae_memory.py [--frames 25] [--height 544 --width 960] [--only decode,encode] [--tiny]

Both models run on the meta device (shapes only, seconds per run) under a dispatch mode that tracks the storage of every
tensor an op creates and sums those still alive after each op: the peak of that sum is what the call adds over the
weights and input, as torch.cuda.max_memory_allocated would count it, less what cuDNN allocates inside a convolution
(its workspace) and the allocator's rounding. Meta convolutions return contiguous tensors where CUDA (and the CPU) keep
the input's channels-last layout, so the meter gives convolution outputs their input's layout, as a GPU would.
--tiny: 2 latent frames at 32x48 (the same models, fewer ops), a smoke run of this script.
"""
import argparse
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vae as V  # noqa: E402


class Meter(TorchDispatchMode):
    def __init__(self, exclude):
        super().__init__()
        self.skip = {t.untyped_storage()._cdata for t in exclude}
        self.live = {}  # storage id -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if func is torch.ops.aten.convolution.default and x.dim() == 4 \
                and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.skip and s._cdata not in self.live:
                    self.live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, sum(b for _, b in self.live.values()))
        return out


def peak(model, fn, x):
    meter = Meter([*model.parameters(), x])
    with torch.no_grad(), meter:
        fn(x)
    return meter.peak / 2**30


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=25, help="latent frames (video frames: 4 * frames - 3)")
    p.add_argument("--height", type=int, default=544, help="video height, a multiple of 8 (as --width)")
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--only", default="decode,encode")
    p.add_argument("--tiny", action="store_true", help="2 latent frames at 32x48: a smoke run of this script")
    args = p.parse_args()
    if args.tiny:
        args.frames, args.height, args.width = 2, 32, 48
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ours, ref = V.VAE(V.CONFIGS["wan2.1"]).eval(), AutoencoderKLWan().eval()
        z = torch.empty(1, 16, args.frames, args.height // 8, args.width // 8)
        video = torch.empty(1, 3, 4 * args.frames - 3, args.height, args.width)
    size = f"{args.height}x{args.width}"
    if "decode" in args.only:
        a, b = peak(ours, ours.decode, z), peak(ref, lambda z: ref.decode(z).sample, z)
        print(f"decode {args.frames} latent frames to {size}: ours {a:.2f} GiB, diffusers {b:.2f} GiB ({a / b:.2f}x)")
    if "encode" in args.only:
        a, b = peak(ours, ours.encode, video), peak(ref, lambda x: ref.encode(x).latent_dist.mode(), video)
        print(f"encode {4 * args.frames - 3} frames of {size}: ours {a:.2f} GiB, diffusers {b:.2f} GiB "
              f"({a / b:.2f}x)")


if __name__ == "__main__":
    main()
