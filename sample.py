"""Generate a video from the command line.

  python sample.py {t2v,i2v,df,df-i2v,v2v} --model PATH --prompt TEXT [options] --out video.mp4

`python sample.py MODE --help` lists a mode's options and defaults; the original SkyReels-V2 spellings (--model_id,
--num_frames, --inference_steps, --end_image, --video_path, ...) work too. Everything is checked before any work
(before a local folder's weights are read): bad input gets one `error:` line and exit code 2, and nothing is written.
The mp4 is written as frames are finished, under a temporary name; it is read back, then renamed with the JSON of its
settings beside it. Ctrl-C or SIGTERM keeps the frames finished, with "partial": true in the JSON.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback

import torch

import skyreels

MODES = {"t2v": ("t2v", "text to video"), "i2v": ("i2v", "image to video (a first, and optionally a last, frame)"),
         "df": ("df", "text to video of any length, by diffusion forcing"), "df-i2v": ("df", "image to video, by "
         "diffusion forcing"), "v2v": ("df", "video extension, by diffusion forcing")}  # mode -> checkpoint kind
RESOLUTIONS = {"540P": (544, 960), "720P": (720, 1280), "tiny": (64, 96)}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
SIGNALS = {"defer": False, "pending": False}  # Ctrl-C / SIGTERM wait while ffmpeg is fed (see on_signal)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as for every other bad input
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[2].replace("\n", " "))
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (kind, about) in MODES.items():
        steps, guidance, shift = skyreels.DEFAULTS[mode]
        m = modes.add_parser(mode, help=about, description=f"{about}, with a {kind.upper()} checkpoint",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
        add = m.add_argument
        add("--model", "--model_id", required=True, help="an official -Diffusers folder, a Hugging Face id "
            "(owner/name), or tiny-t2v / tiny-i2v / tiny-df")
        add("--prompt", required=True, help="what the video shows")
        add("--negative-prompt", "--negative_prompt", help="what it should not show")
        if "i2v" in mode:
            add("--image", required=True, help="the first frame")
            add("--last-image", "--end_image", "--last_image", help="the last frame")
        if mode == "v2v":
            add("--video", "--video_path", required=True, help="the video to extend")
        add("--resolution", choices=list(RESOLUTIONS), help="without --height/--width: 540P is 544x960, 720P "
            "720x1280, tiny 64x96" + (" at the image's aspect" * ("i2v" in mode)) + " (default: 540P; tiny for tiny-*)")
        add("--height", type=int, help="a multiple of 16, with --width")
        add("--width", type=int, help="a multiple of 16, with --height")
        add("--num-frames", "--num_frames", type=int, default=97, help="rounded down to 1 + 4k" + (
            "; the frames after the input video, which begin with its last overlap_history frames again: num_frames "
            "- overlap_history frames are new" if mode == "v2v" else ""))
        add("--steps", "--inference_steps", "--num_inference_steps", dest="num_inference_steps", type=int,
            default=steps, help="denoising steps")
        add("--guidance-scale", "--guidance_scale", type=float, default=guidance, help="1 or less: none")
        add("--shift", type=float, default=shift, help="flow shift")
        add("--seed", type=int, help="default: random, recorded in the JSON beside the video")
        if kind == "df":
            add("--ar-step", "--ar_step", type=int, default=0, help="0: synchronous; 5: asynchronous")
            add("--causal-block-size", "--causal_block_size", type=int, default=1, help="5 with --ar-step 5")
            add("--base-num-frames", "--base_num_frames", type=int, help="frames a window holds: 97 (121 at 720P)")
            add("--overlap-history", "--overlap_history", type=int, required=mode == "v2v",
                help="frames each window continues (17 or 37); needed above --base-num-frames")
            add("--addnoise-condition", "--addnoise_condition", type=float, default=0, help="20: smoother joins")
            add("--cache-budget", type=float, help="GiB for the asynchronous shortcuts' key/value cache (0: none; "
                "default: what the GPU has free)")
        add("--fps", type=int, default=24, help="the mp4's" + (" and the model's (16 or 24)" * (kind == "df")))
        add("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
        add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
        add("--offload", action="store_true", help="keep only the component in use on the GPU")
        add("--compile", action="store_true", help="torch.compile the DiT blocks (faster, slower start)")
        add("--lora", action="append", type=lora_arg, metavar="PATH[:SCALE]", help="fold a LoRA into the DiT "
            "(repeatable; scale 1 by default)")
        add("--transformer", help="a one-file DiT (original Wan / ComfyUI or diffusers names) for the folder's")
        add("--out", "--outdir", default="video.mp4", help="the mp4 (in a folder: video.mp4 there)")
    return p.parse_args(argv)


def lora_arg(text):  # PATH[:SCALE]; a ':' not followed by a number is part of the path
    path, _, scale = text.rpartition(":")
    return (path, float(scale)) if path and scale.lstrip("-").replace(".", "", 1).isdigit() else (text, 1.0)


def image_size(image_path, resolution):
    """The image's aspect ratio at the resolution's area, in multiples of 16 (the seed's `aspect_ratio_resize`)."""
    image = skyreels.to_pil(image_path, "--image")
    h, w = RESOLUTIONS[resolution]
    size = (round(math.sqrt(h * w * image.height / image.width)) // 16 * 16,
            round(math.sqrt(h * w * image.width / image.height)) // 16 * 16)
    if min(size) < 16:
        raise ValueError(f"--image is {image.width}x{image.height}: its aspect ratio is too extreme for a video of "
                         f"{resolution}'s area (it would be {size[1]}x{size[0]}); pass --height and --width")
    return size


def output_paths(out, inputs):
    """--out's mp4, JSON and short temporary names, refused now (not after the denoising) if they cannot be written."""
    if os.path.isdir(out):
        out = os.path.join(out, "video.mp4")
    if not out.lower().endswith(".mp4"):
        raise ValueError(f"--out must name an .mp4 file: {out}")
    sidecar, folder = out[:-4] + ".json", os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(folder, f".sample-{os.getpid()}.mp4")  # short: out's own name may be at the length limit
    tmp_json = tmp[:-4] + ".json"
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {out}: {folder} {'is a file' if os.path.exists(folder) else 'does not exist'}")
    if os.path.isdir(sidecar) or len(os.path.basename(sidecar).encode()) > 255:
        raise ValueError(f"cannot write {sidecar}: {'a folder' if os.path.isdir(sidecar) else 'name too long'}")
    if any(p and os.path.realpath(p) in (os.path.realpath(out), os.path.realpath(sidecar)) for p in inputs):
        raise ValueError(f"--out {out} would overwrite an input file")
    try:  # prove that the folder takes files
        open(tmp_json, "w").close()
        os.remove(tmp_json)
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror}") from None
    return out, sidecar, tmp, tmp_json


def say(message):  # a line on stderr, of its own even after a progress line
    print(("\n" if sys.stderr.isatty() else "") + message, file=sys.stderr)


def progress(step, total, start=[None]):
    now = time.time()
    if step == 0 or start[0] is None:
        start[0] = now
    done = step + 1
    eta = f"{(now - start[0]) / step * (total - done):.0f}s" if step else "?"
    line = f"step {done}/{total}  {now - start[0]:.0f}s elapsed  ETA {eta}"
    tty = sys.stderr.isatty()  # a terminal gets one line, redrawn; a log file a line a step
    sys.stderr.write(f"\r{line}   " + ("\n" if done == total else "") if tty else line + "\n")
    sys.stderr.flush()


def on_signal(signum, frame):  # Ctrl-C and SIGTERM stop the run, but not while ffmpeg is fed (see write)
    SIGNALS["pending"] = True
    if not SIGNALS["defer"]:
        raise KeyboardInterrupt


def main(argv=None):
    rank = int(os.environ.get("RANK", "0"))  # torchrun's ranks all get the same input: rank 0 alone reports it
    with contextlib.redirect_stderr(sys.stderr if rank == 0 else open(os.devnull, "w")):
        args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    SIGNALS.update(defer=False, pending=False)
    dist = None
    try:
        dist = join_ranks(args)
        run(args, rank)
    except KeyboardInterrupt:
        say("stopped before any frame was finished; nothing written")
        sys.exit(130)
    except (ValueError, OSError, skyreels.CheckpointError) as e:
        if rank == 0:
            print(f"error: {(str(e) or type(e).__name__).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except torch.OutOfMemoryError as e:  # finished windows are already kept (write)
        print(f"error: {f'rank {rank}: ' * (dist is not None)}out of GPU memory ({str(e).splitlines()[0]}): try "
              f"--offload, a smaller --base-num-frames, or --cache-budget 0", file=sys.stderr)
        sys.exit(1)
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
    seed = [getattr(args, "seed", random.randrange(2**31))]  # --seed 0 is a seed
    dist.broadcast_object_list(seed, src=0)
    args.seed = seed[0]
    return dist


def run(args, rank=0):
    a = vars(args)  # the flags given, and those with a default
    device = skyreels.check_device(args.device)
    height, width = a.get("height"), a.get("width")
    if (height is None) != (width is None):
        raise ValueError("give both --height and --width, or neither")
    resolution = a.get("resolution", "tiny" if args.model.startswith("tiny-") else "540P")
    if height is None:
        height, width = image_size(a["image"], resolution) if "image" in a else RESOLUTIONS[resolution]
    paths = output_paths(args.out, [a.get("image"), a.get("last_image"), a.get("video")]) if rank == 0 else None
    dtype = DTYPES[a["dtype"]] if "dtype" in a else torch.float32 if device.type == "cpu" else torch.bfloat16
    # check_settings takes the flags named as stream's arguments, and stream's defaults for the rest.
    settings = dict(a, height=height, width=width, seed=a.get("seed", random.randrange(2**31)),
                    base_num_frames=a.get("base_num_frames", 121 if resolution == "720P" else 97))
    ffmpeg()
    model = args.model if args.model.startswith("tiny-") or os.path.isdir(args.model) else skyreels.download(args.model)
    kind, rope = skyreels.kind_of(model), skyreels.rope_limit(model)  # all is checked before the weights are read
    if kind != MODES[args.mode][0]:
        raise ValueError(f"{args.mode} needs a {MODES[args.mode][0].upper()} checkpoint; {model} is {kind.upper()}")
    checked = skyreels.check_settings(kind, rope, settings)
    if checked["num_frames"] != args.num_frames:
        say(f"num_frames {args.num_frames} is rounded down to {checked['num_frames']} (the VAE makes 1 + 4k frames)")
    budget = a.get("cache_budget")
    if budget is not None and not 0 <= budget < math.inf:
        raise ValueError(f"--cache-budget must be a finite number of GiB >= 0, got {budget}")
    record = dict(mode=args.mode, model=args.model, dtype=str(dtype).replace("torch.", ""), loras=a.get("lora", []),
                  transformer=a.get("transformer"), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    record.update(checked, image=a.get("image"), last_image=a.get("last_image"), video=a.get("video"))  # as named
    del record["generator"], record["progress"]
    pipe = skyreels.load(model, device=device, dtype=dtype, offload="offload" in a, compile="compile" in a,
                         loras=a.get("lora", []), transformer=a.get("transformer"))
    pipe.cache_budget = None if budget is None else int(budget * 2**30)
    checked.pop("mode")  # the rest are stream's arguments, the images and the video already read
    chunks = pipe.stream(**dict(checked, progress=progress if rank == 0 else None))
    if rank > 0:  # the other ranks share the work; rank 0 alone writes
        for _ in chunks:
            pass
        return
    write(chunks, *paths, args.fps, record, len(checked["video"] or []))
    print(paths[0])


def write(chunks, out, sidecar, tmp, tmp_json, fps, record, new_from=0):
    """Frame chunks to `tmp` as they come, read back, then renamed to `out` with `record` as JSON beside it: both
    complete, or neither. Stopped part-way (Ctrl-C, SIGTERM, an error in a later window), it keeps the frames
    finished so, with "partial": true, if any is new (v2v's output begins with the input's `new_from` frames)."""
    import imageio.v2 as imageio
    import numpy as np

    writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1)
    written, stop = 0, None
    try:
        for chunk in chunks:
            SIGNALS["defer"] = True  # imageio kills ffmpeg when interrupted while feeding it: the mp4 gets no index
            for frame in chunk:
                writer.append_data((np.clip(frame, 0, 1) * 255).round().astype(np.uint8))
            written += len(chunk)
            SIGNALS["defer"] = False
            if SIGNALS["pending"]:
                raise KeyboardInterrupt
    except BaseException as e:
        stop = e
    SIGNALS["defer"] = True
    try:
        writer.close()
        if written > new_from:
            if frames_in(tmp) != written:  # ffmpeg failed (a full disk, say), and imageio does not tell
                raise OSError(f"writing {out} failed: ffmpeg did not finish a readable video (is the disk full?)")
            with open(tmp_json, "w") as f:
                json.dump(dict(record, frames=written, partial=stop is not None), f, indent=1)
            os.replace(tmp, out)
            os.replace(tmp_json, sidecar)
    finally:
        SIGNALS["defer"] = False
        for path in (tmp, tmp_json):
            if os.path.exists(path):
                os.remove(path)
    if stop is not None:  # an error (not Ctrl-C) then gets its own line
        say("stopped; " + (f"{out} holds the {written} frames finished" if written > new_from else "nothing written"))
        raise SystemExit(130) if isinstance(stop, KeyboardInterrupt) else stop


def ffmpeg():  # the mp4s are read and written by imageio-ffmpeg's binary: without it, say so before any work
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise OSError(f"no ffmpeg to write the mp4 with ({type(e).__name__}: {e}): pip install imageio-ffmpeg") from None


def frames_in(path):  # the frames an mp4 holds as ffmpeg decodes it (out of Ctrl-C's reach); 0 if it cannot
    decoded = subprocess.run([ffmpeg(), "-i", path, "-map", "0:v:0", "-f", "null", "-"],
                             capture_output=True, text=True, start_new_session=True)
    counts = re.findall(r"frame=\s*(\d+)", decoded.stderr)
    return int(counts[-1]) if decoded.returncode == 0 and counts else 0


if __name__ == "__main__":
    main()
