"""Generate a video from the command line.

  python sample.py {t2v,i2v,df,df-i2v,v2v} --model PATH --prompt TEXT [options] --out video.mp4

The original SkyReels-V2 spellings (--model_id, --num_frames, --inference_steps, --end_image, --video_path, ...)
are accepted too. Everything that can be checked is checked before the first denoising step; bad input gets one
line on stderr and a non-zero exit. Frames are written as they are finished, under a temporary name that is
renamed when the video is complete; the settings that reproduce it go beside it as JSON.
"""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import traceback

import torch

import skyreels

MODES = {"t2v": "t2v", "i2v": "i2v", "df": "df", "df-i2v": "df", "v2v": "df"}  # mode -> checkpoint kind
RESOLUTIONS = {"540P": (544, 960), "720P": (720, 1280)}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--model", "--model_id", required=True,
                   help="an official -Diffusers folder, a Hugging Face id, or tiny-t2v / tiny-i2v / tiny-df")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", "--negative_prompt", default="")
    p.add_argument("--image", help="first frame (i2v, df-i2v)")
    p.add_argument("--last-image", "--end_image", "--last_image", help="last frame (i2v, df-i2v)")
    p.add_argument("--video", "--video_path", help="video to extend (v2v)")
    p.add_argument("--resolution", choices=list(RESOLUTIONS), default="540P")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", "--num_frames", type=int, default=97)
    p.add_argument("--steps", "--inference_steps", "--num_inference_steps", type=int,
                   help="denoising steps (default: 30 for DF, 50 otherwise)")
    p.add_argument("--guidance-scale", "--guidance_scale", type=float, help="default: 6 for T2V/DF, 5 for I2V")
    p.add_argument("--shift", type=float, help="flow shift (default: 8 for T2V/DF, 5 for I2V)")
    p.add_argument("--seed", type=int, help="default: a random seed, recorded in the JSON beside the video")
    p.add_argument("--ar-step", "--ar_step", type=int, default=0, help="0: synchronous; 5: asynchronous")
    p.add_argument("--causal-block-size", "--causal_block_size", type=int)
    p.add_argument("--base-num-frames", "--base_num_frames", type=int,
                   help="frames per window (default: 97 at 540P, 121 at 720P)")
    p.add_argument("--overlap-history", "--overlap_history", type=int, help="17 or 37 for long videos")
    p.add_argument("--addnoise-condition", "--addnoise_condition", type=float, default=0)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", help="keep only the component in use on the GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (faster on GPU, slower start)")
    p.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="PATH[:SCALE]",
                   help="fold a LoRA into the DiT (repeatable; scale 1 by default)")
    p.add_argument("--transformer", help="a one-file DiT (original Wan / ComfyUI or diffusers names) for the folder's")
    p.add_argument("--out", "--outdir", default="video.mp4", help="output mp4 (a folder gets video.mp4 inside)")
    return p.parse_args(argv)


def lora_arg(text):  # PATH[:SCALE]; a ':' not followed by a number is part of the path
    path, _, scale = text.rpartition(":")
    return (path, float(scale)) if path and scale.lstrip("-").replace(".", "", 1).isdigit() else (text, 1.0)


def image_size(image_path, resolution):
    """Height and width for an image mode with no size given: the image's aspect ratio at the resolution's area,
    rounded down to multiples of 16, as the seed's `aspect_ratio_resize` does."""
    from PIL import Image

    with Image.open(image_path) as im:
        aspect = im.height / im.width
    h, w = RESOLUTIONS[resolution]
    return round(math.sqrt(h * w * aspect)) // 16 * 16, round(math.sqrt(h * w / aspect)) // 16 * 16


def output_paths(out):
    if os.path.isdir(out):
        out = os.path.join(out, "video.mp4")
    if not out.lower().endswith(".mp4"):
        raise ValueError(f"--out must name an .mp4 file: {out}")
    stem = out[:-4]
    tmp = stem + ".partial.mp4"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {out}: folder {folder} does not exist")
    try:  # prove now that the folder takes files, not after minutes of denoising
        with open(tmp, "wb"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror}") from None
    return out, tmp, stem + ".json"


def progress(step, total, start=[None]):
    now = time.time()
    if step == 0 or start[0] is None:
        start[0] = now
    done = step + 1
    eta = f"{(now - start[0]) / step * (total - done):.0f}s" if step else "?"
    sys.stderr.write(f"\rstep {done}/{total}  {now - start[0]:.0f}s elapsed  ETA {eta}   ")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def main(argv=None):
    rank = int(os.environ.get("RANK", "0"))  # torchrun's ranks all get the same input: rank 0 alone reports it
    with contextlib.redirect_stderr(sys.stderr if rank == 0 else open(os.devnull, "w")):
        args = parse_args(argv)
    dist = join_ranks(args)
    try:
        run(args, rank)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, skyreels.CheckpointError) as e:
        if rank == 0:
            print(f"error: {(str(e) or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if dist is None:
            raise
        # One line for the run: torchrun stops every rank once one has ended, so only the rank that fails first and
        # speaks at once is heard. Rank 0 speaks at once, unless the failure surfaced in a collective (a peer gone).
        if rank > 0 or os.path.join("torch", "distributed") in traceback.extract_tb(e.__traceback__)[-1].filename:
            time.sleep(3)
        print(f"error: rank {rank}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist is not None:
            dist.destroy_process_group()


def join_ranks(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL, each rank on GPU LOCAL_RANK; gloo on the
    CPU) and agree on rank 0's random seed. skyreels.load then shares the work. Returns torch.distributed, or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    import torch.distributed as dist

    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    seed = [args.seed if args.seed is not None else random.randrange(2**31)]
    dist.broadcast_object_list(seed, src=0)
    args.seed = seed[0]
    return dist


def run(args, rank=0):
    mode = args.mode
    if mode in ("i2v", "df-i2v") and not args.image:
        raise ValueError(f"{mode} needs --image")
    if mode == "v2v" and not args.video:
        raise ValueError("v2v needs --video")
    if mode not in ("i2v", "df-i2v") and (args.image or args.last_image):
        raise ValueError(f"{mode} takes no --image/--last-image (use i2v or df-i2v)")
    if mode != "v2v" and args.video:
        raise ValueError(f"{mode} takes no --video (use v2v)")
    for flag, path in (("--image", args.image), ("--last-image", args.last_image), ("--video", args.video)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: no such file: {path}")
    height, width = args.height, args.width
    if (height is None) != (width is None):
        raise ValueError("give both --height and --width, or neither")
    if height is None:
        height, width = image_size(args.image, args.resolution) if args.image else RESOLUTIONS[args.resolution]
    base = args.base_num_frames or (121 if args.resolution == "720P" else 97)
    out, tmp, sidecar = output_paths(args.out) if rank == 0 else (None, None, None)  # rank 0 alone writes
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    local = os.path.isdir(args.model) or args.model.startswith("tiny-")
    if local:  # the kind is in model_index.json: check it before reading gigabytes of weights
        check_kind(mode, args.model, skyreels.kind_of(args.model))
    pipe = skyreels.load(args.model, device=args.device, dtype=dtype, offload=args.offload, compile=args.compile,
                         loras=args.lora, transformer=args.transformer)
    check_kind(mode, args.model, pipe.kind)
    settings = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
                    last_image=args.last_image, video=args.video, height=height, width=width,
                    num_frames=args.num_frames, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    shift=args.shift, seed=seed, ar_step=args.ar_step, causal_block_size=args.causal_block_size,
                    base_num_frames=base, overlap_history=args.overlap_history,
                    addnoise_condition=args.addnoise_condition, fps=args.fps)
    frames = pipe.stream(**settings, progress=progress if rank == 0 else None)  # validates every setting first
    if rank > 0:  # the other ranks share the work
        for _ in frames:
            pass
        return
    write(frames, out, tmp, args.fps)
    with open(sidecar, "w") as f:
        json.dump(dict(mode=mode, model=args.model, dtype=str(dtype).replace("torch.", ""), loras=args.lora,
                       transformer=args.transformer, world_size=int(os.environ.get("WORLD_SIZE", "1")), **settings),
                  f, indent=1)
    print(out)


def check_kind(mode, model, kind):
    if kind != MODES[mode]:
        raise ValueError(f"{mode} needs a {MODES[mode].upper()} checkpoint, but {model} is {kind.upper()}")


def write(frames, out, tmp, fps):
    """Write frame chunks to `tmp` as they come; rename to `out` when complete. If a long run stops part-way
    (Ctrl-C, an error in a later window), keep what was finished as a playable mp4 and say how much."""
    import imageio.v2 as imageio
    import numpy as np

    writer, written = None, 0
    try:
        for chunk in frames:
            if writer is None:
                writer = imageio.get_writer(tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1)
            for frame in chunk:
                writer.append_data((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
            written += len(chunk)
    except BaseException as e:
        if writer is not None:
            writer.close()
            if written:
                os.replace(tmp, out)
                print(f"stopped ({type(e).__name__}: {e}); {out} holds the {written} frames finished",
                      file=sys.stderr)
            else:
                os.remove(tmp)
        raise
    writer.close()
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
