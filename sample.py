"""Generate a video: python sample.py {t2v,i2v,df,df-i2v,v2v} --model PATH --prompt TEXT [options] --out video.mp4

`python sample.py MODE --help` lists a mode's options; the original spellings (--model_id, --num_frames, ...) work
too. Bad input gets one `error:` line and exit code 2 before any weight is read. The mp4 and its JSON appear whole or
not at all; a stopped run leaves NAME.partial.mp4, and a diffusion-forcing one NAME.state for --resume (README.md)."""
import argparse
import ctypes
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

MODES = {  # mode: (the checkpoint kind it needs, what it makes)
    "t2v": ("t2v", "text to video"), "i2v": ("i2v", "image to video (a first, and optionally a last, frame)"),
    "df": ("df", "text to video of any length, by diffusion forcing"),
    "df-i2v": ("df", "image to video, by diffusion forcing"), "v2v": ("df", "video extension, by diffusion forcing")}
DEFAULTS = {  # skyreels.DEFAULTS (steps, guidance, shift), repeated so that --help imports no torch (a test compares)
    "t2v": (50, 6.0, 8.0), "i2v": (50, 5.0, 5.0), "df": (30, 6.0, 8.0), "df-i2v": (30, 5.0, 5.0), "v2v": (30, 5.0, 5.0)}
DTYPES = dict(bf16="bfloat16", fp16="float16", fp32="float32", **{t: t for t in ("bfloat16", "float16", "float32")})
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's: rank 0 writes
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each ends a run: exit 128 + its number
STOP = {"defer": False, "signal": None}  # a signal waits while ffmpeg is fed and while files are renamed (write)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as for every other bad input
        self.exit(2, f"error: {message} (see {self.prog} --help)\n" if RANK == 0 else None)


def parse_args(argv=None):  # flags named as skyreels.Settings' fields set those; the others: loading and writing
    p = Parser(description=__doc__.split("\n\n")[1].replace("\n", " "))
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (kind, about) in MODES.items():
        m = modes.add_parser(mode, help=about, description=f"{about}, with a {kind.upper()} checkpoint",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter, argument_default=argparse.SUPPRESS)
        add_flags(m, mode, kind == "df")
    args = p.parse_args(argv)
    typed = [str(t).split("=")[0] for t in (sys.argv[1:] if argv is None else argv)]
    args.flags = {}  # setting name (num_frames) and first spelling (--num-frames): the flag as typed (--num_frames)
    for a in modes.choices[args.mode]._actions:
        as_typed = next((t for t in reversed(typed) if t in a.option_strings), a.option_strings[0])  # the last wins
        args.flags.update({a.dest: as_typed, a.option_strings[0]: as_typed})
    return args


def add_flags(m, mode, df):  # help where a flag's name (and README.md) is not enough, or to show its default
    add, (steps, guidance, shift) = m.add_argument, DEFAULTS[mode]
    add("--model", "--model_id", required=True, help="a -Diffusers folder, a Hugging Face id, or tiny-t2v/i2v/df")
    text = m.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", action="append", help="repeated: a prompt a window" if df else "the video's text")
    text.add_argument("--prompt-file", action="append", help="UTF-8 text, a prompt a line" + ", a window each" * df
                      + "; repeated: read in order")
    add("--negative-prompt", "--negative_prompt")
    if "i2v" in mode:
        add("--image", required=True)
        add("--last-image", "--end_image", "--last_image")
    if mode == "v2v":
        add("--video", "--video_path", required=True, help="num_frames - overlap_history frames are new")
    add("--resolution", help="540P, 720P or tiny, without --height/--width (default: 540P; tiny for tiny-*)")
    for flag in ("--height", "--width", "--seed"):
        add(flag, type=int)
    add("--num-frames", "--num_frames", type=int, default=97, help="rounded down to 1 + 4k")
    add("--steps", "--inference_steps", "--num_inference_steps", dest="num_inference_steps", type=int, default=steps,
        help="denoising steps")
    add("--guidance-scale", "--guidance_scale", type=float, default=guidance, help="1 or less: none")
    add("--shift", type=float, default=shift, help="flow shift")
    if df:
        add("--ar-step", "--ar_step", type=int, default=0, help="0: synchronous; 5: asynchronous")
        add("--causal-block-size", "--causal_block_size", type=int, default=1, help="5 with --ar-step 5")
        add("--base-num-frames", "--base_num_frames", type=int, help="frames a window holds: 97 (121 at 720P)")
        add("--overlap-history", "--overlap_history", type=int, required=mode == "v2v", help="17 or 37")
        add("--addnoise-condition", "--addnoise_condition", type=float, default=0, help="20: smoother joins")
        add("--cache-budget", type=float, help="GiB (default: the GPU's free memory)")
        add("--plan", nargs="?", const="", metavar="PNG", help="print the windows (and draw them), load nothing")
        add("--redo-from", type=int, metavar="K", help="keep windows 1 .. K-1 of the state's run")
    add("--fps", type=int, default=24, help="the mp4's" + " and the model's (16 or 24)" * df)
    add("--teacache", "--teacache_thresh", nargs="?", type=float, const=0.2, metavar="T", help="bare: 0.2")
    add("--use-ret-steps", "--use_ret_steps", action="store_true", help="TeaCache: the first 5 steps always run")
    add("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    add("--device", help="default: cuda if there is one")
    add("--offload", action="store_true", help="only the component at work on the GPU, the DiT's blocks streamed")
    add("--compile", action="store_true", help="torch.compile the DiT's blocks: faster on a GPU, slower to start")
    add("--fp8", action="store_true", help="quantize the DiT's and text encoder's Linear weights to fp8 as read")
    if df:
        add("--resume", action="store_true", help="continue the run kept in OUT's .state folder")
        add("--keep-state", action="store_true", help="keep the .state folder after a finished run")
    add("--lora", action="append", dest="loras", type=lora_arg, metavar="PATH[:SCALE]")
    add("--transformer", help="a one-file DiT (original Wan / ComfyUI or diffusers names, fp8 too)")
    add("--out", "--outdir", default="video.mp4", help="the mp4 (in a folder: video.mp4 there)")


def lora_arg(text):  # PATH[:SCALE]; a ':' not followed by a number (1e-3 is one) is part of the path
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def main(argv=None):
    args = parse_args(argv)  # instant: a Ctrl-C meanwhile is Python's own, as while this file is imported
    STOP.update(defer=False, signal=None)
    for sig in SIGNALS:
        signal.signal(sig, on_signal)
    try:
        run(args)
    except SystemExit as stop:  # a stop after the frames finished were written (Output.write)
        leave(stop.code)
    except KeyboardInterrupt:
        say("stopped before any frame was finished; nothing written")
        leave(128 + (STOP["signal"] or signal.SIGINT))
    except (ValueError, OSError, FloatingPointError) as e:  # skyreels.CheckpointError is a ValueError
        leave(2, as_flags((str(e) or type(e).__name__).splitlines()[0], args.flags) if RANK == 0 else None)
    except Exception as e:  # under torchrun, each failing rank says why in one line; torchrun then stops the others
        why = (str(e).splitlines() or [""])[0]
        if type(e).__name__ == "OutOfMemoryError":  # the finished windows are already kept (write)
            why = f"out of GPU memory ({why}): try --offload, a smaller --base-num-frames, or --cache-budget 0"
        elif WORLD == 1:
            raise
        else:
            why = f"{type(e).__name__}: {why}"
        leave(1, f"{f'rank {RANK}: ' * (WORLD > 1)}{why}")
    finally:  # join_ranks' group, if it was joined
        if WORLD > 1 and (dist := sys.modules.get("torch.distributed")) and dist.is_initialized():
            dist.destroy_process_group()


def on_signal(signum, frame):  # the first signal stops the run (once ffmpeg is fed or files renamed); later ones wait
    if STOP["signal"] is None:
        STOP["signal"] = signum
        if not STOP["defer"]:
            raise KeyboardInterrupt


def leave(code, error=None):  # every exit: signals ignored from here (one in the interpreter's shutdown would end it)
    STOP["defer"] = True
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if error:
        print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def as_flags(message, flags):  # skyreels' setting names (num_frames) and our flags (--out) as typed (--outdir)
    def flag(m):  # a setting's name with an underscore, or followed by "must", "and", "differs" or ":"
        return flags[m[1]] + (m[2] or "") if m[1] in flags and ("_" in m[1] or m[2]) else m[0]
    message = re.sub(r"(?<!-)\b([a-z]+(?:_[a-z]+)*)\b( must| and| differs|:)?", flag, message)
    return re.sub(r"--[\w-]+", lambda m: flags.get(m[0], m[0]), message)


def join_ranks(args):  # join torchrun's process group (NCCL on GPU LOCAL_RANK, or gloo) and take rank 0's seed
    import torch
    import torch.distributed as dist

    a = vars(args)
    if torch.cuda.is_available() and a.get("device", "cuda").startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if a.get("device", "cpu").startswith("cuda") else "gloo")
    if not ("resume" in a or "redo_from" in a):  # resuming: the state's seed
        seed = [a.get("seed", random.randrange(2**31))]  # --seed 0 is a seed
        dist.broadcast_object_list(seed, src=0)
        args.seed = seed[0]


def run(args):  # check everything, then load, generate and write (rank 0; the other ranks share the work)
    import torch  # only now: --help and bad flags are instant

    import skyreels

    if WORLD > 1:
        join_ranks(args)
    a = vars(args)  # the flags given, and those with a default
    device = skyreels.check_device(a.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, DTYPES[a.get("dtype", "fp32" if device.type == "cpu" else "bf16")])
    model = args.model if args.model.startswith("tiny-") or os.path.isdir(args.model) else skyreels.download(args.model)
    if (kind := skyreels.kind_of(model)) != MODES[args.mode][0]:  # all is checked before the weights are read
        raise ValueError(f"{args.mode} needs a {MODES[args.mode][0].upper()} checkpoint; {model} is {kind.upper()}")
    out = Output(args.out, kind == "df" and "plan" not in a, a.get("plan"))
    media = {k: a.get(k) for k in ("image", "last_image", "video")}  # the JSON names them as given
    out.check([model if os.path.isdir(model) else None, a.get("transformer"), *a.get("prompt_file", []),
               *media.values()] + [path for path, _ in a.get("loras", [])])
    s = skyreels.check_settings(kind, skyreels.dit_config(model), settings_of(args, out, skyreels))
    windows = skyreels.plan_windows(s) if kind == "df" else []
    if "plan" in a:
        return show_plan(s, windows, skyreels, a["plan"])
    if s.num_frames != args.num_frames:
        say(f"num_frames {args.num_frames} is rounded down to {s.num_frames} (the VAE makes 1 + 4k frames)")
    if len(windows) > 1:  # a long run says how long, first
        say(f"{len(windows)} windows, {sum(len(w.matrix) for w in windows)} denoising steps")
    ffmpeg()
    pipe = skyreels.load(model, device=device, dtype=dtype, offload="offload" in a, compile="compile" in a,
                         loras=a.get("loras", []), transformer=a.get("transformer"), fp8="fp8" in a)
    chunks = pipe.run(dataclasses.replace(s, progress=progress(pipe.dit_passes) if RANK == 0 else None))
    if RANK > 0:
        for _ in chunks:
            pass
        return
    record = {k: v for k, v in vars(s).items() if k not in ("generator", "progress", "resume", "state")}
    record.update(model=args.model, dtype=str(dtype)[6:], loras=a.get("loras", []), transformer=a.get("transformer"),
                  fp8=pipe.fp8, world_size=WORLD, **media)
    if kind == "df":  # what made each window (kept windows keep theirs), and where the state is kept
        made = s.state.made
        record.update(window_prompts=[w["prompt"] for w in made], window_seeds=[w["seed"] for w in made],
                      window_blocks=[list(w.blocks) for w in windows], state=out.state if "keep_state" in a else None)
    out.write(written(chunks, len(s.video or []) + s.num_frames), s.fps, record, len(s.video or []),  # v2v: input first
              None if "keep_state" in a else s.state, pipe.dit_passes)
    print(out.path)


def settings_of(args, out, skyreels):  # skyreels.Settings from the flags named as its fields, and the prompts
    a = vars(args)
    settings = {f: a[f] for f in skyreels.Settings.__dataclass_fields__ if f in a}
    settings.update(prompt=a.get("prompt") or [p for path in a["prompt_file"] for p in read_prompts(path)],
                    seed=a.get("seed", None if "resume" in a or "redo_from" in a else -1),  # resuming: the state's
                    state=out.state, resolution=a.get("resolution", "tiny" if args.model.startswith("tiny-") else None),
                    base_num_frames=a.get("base_num_frames", 121 if a.get("resolution") == "720P" else 97))
    return skyreels.Settings(**settings)


PROMPT_FILE_MAX = 2**20  # bytes: a film's prompts take a few KiB; /dev/zero is refused, not read for ever


def read_prompts(path):  # --prompt-file: UTF-8 text (a byte-order mark dropped), a prompt a line, blank lines skipped
    try:
        with open(path, "rb") as f:
            data = f.read(PROMPT_FILE_MAX + 1)
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read --prompt-file {path} as UTF-8 text ({e})") from None
    control = re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", text)  # NUL and the like: not a text file
    if len(data) > PROMPT_FILE_MAX or control:
        why = f"over {PROMPT_FILE_MAX} bytes" if len(data) > PROMPT_FILE_MAX else f"it holds {control[0]!r}"
        raise ValueError(f"--prompt-file {path} is not a prompt file: {why}")
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path} holds no prompt")
    return prompts


def printable(text):  # control characters (a terminal's escape sequences, say) shown escaped, not obeyed
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_plan(s, windows, skyreels, picture):  # the windows, the frames each makes, its prompt; the matrices drawn
    first = len(s.video) if s.mode == "v2v" else 0  # v2v's output begins with the input video
    frames = []  # (first, last) video frame each window makes
    for k, w in enumerate(windows):
        made = 1 + 4 * (w.size - 1) if k == 0 else 4 * (w.size - w.new_from)
        frames.append((first + 1, first + made))
        first += made
    if picture:  # drawn first: `--plan plan.png | head -3` still gets its picture
        skyreels.atomic_write(picture, draw_plan(s, windows, frames))
    lines = [f"{len(windows)} window{'s' * (len(windows) > 1)}, {sum(len(w.matrix) for w in windows)} denoising steps"]
    for k, (w, (a, b)) in enumerate(zip(windows, frames)):
        blocks = f", blocks {'+'.join(map(str, w.blocks))}" if max(w.blocks) > 1 else ""
        lines.append(f"window {k + 1}: frames {a}-{b}, {len(w.matrix)} steps, {w.prefix} latent frames known{blocks}, "
                     f"prompt: {printable(w.prompt)}")
    try:
        print("\n".join(lines + [picture] * bool(picture)), flush=True)
    except BrokenPipeError:  # the reader has what it wanted; Python's advice, so that exiting flushes into nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# The plan's picture, in pixels: its longest side at most, a step-matrix cell's side (readable, never larger), the
# margins, a text line, the step axis left of a panel, a panel's least width (its text) and the legend's column.
PICTURE_MAX, CELL_MIN, CELL_MAX = 4000, 4, 14
MARGIN, LINE, AXIS, TEXT_W, LEGEND_W, LEGEND_H = 24, 20, 52, 330, 260, 320
PANEL_LINES = 4  # windows listed above a panel; more are counted
KNOWN, OUTLINE, BLOCK_LINE = (60, 110, 220), (210, 40, 40), (150, 150, 150)


def plan_panels(windows, frames):  # [(window, [(k, first frame, last frame), ...])]: alike windows share one panel
    panels = {}
    for k, (w, (a, b)) in enumerate(zip(windows, frames)):
        key = (w.prefix, w.end, w.blocks, w.matrix.numpy().tobytes(), w.update.numpy().tobytes())
        panels.setdefault(key, (w, []))[1].append((k + 1, a, b))
    return list(panels.values())


def draw_plan(s, windows, frames):
    """The step matrices as PNG bytes: a panel per distinct window, a row per denoising step, a column per latent
    frame. A cell is the frame's timestep after that row's step (the one the next row sees; 0 after its last step),
    so white is noise and a finished frame is black; known frames (a prefix, the last image) are blue."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    panels = plan_panels(windows, frames)
    font, big = ImageFont.load_default(size=15), ImageFont.load_default(size=20)
    title = (f"Diffusion forcing: {s.num_frames} frames, {s.num_inference_steps} steps a frame, ar_step {s.ar_step}, "
             f"causal blocks of {s.causal_block_size}")
    listed = max(min(len(spans), PANEL_LINES) for _, spans in panels)  # the most windows a panel lists
    top, head = MARGIN + 2 * LINE + 16, LINE * (listed + 3) + 8  # the title's lines; a panel's text and frame axis

    def size(cell):  # the picture's (width, height) at this cell size
        width = sum(max(AXIS + w.matrix.shape[1] * cell, TEXT_W) + MARGIN for w, _ in panels) + MARGIN + LEGEND_W
        rows = max(len(w.matrix) for w, _ in panels)
        return max(width, int(big.getlength(title)) + 2 * MARGIN), top + head + max(rows * cell, LEGEND_H) + MARGIN

    cell = next((c for c in range(CELL_MAX, CELL_MIN - 1, -1) if max(size(c)) <= PICTURE_MAX), None)
    if cell is None:
        raise ValueError(f"--plan: the picture would be {'x'.join(map(str, size(CELL_MIN)))} pixels at {CELL_MIN}-pixel "
                         f"cells, over {PICTURE_MAX} a side; plan fewer steps or latent frames, or give --plan no file")
    image = Image.new("RGB", size(cell), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill="black", font=big)
    draw.text((MARGIN, MARGIN + LINE + 10), f"{len(windows)} window{'s' * (len(windows) > 1)}, "
              f"{sum(len(w.matrix) for w in windows)} denoising steps; a panel per distinct window", fill="black", font=font)
    x, y = MARGIN, top + head  # a panel's left edge; the step matrices' top
    for w, spans in panels:
        width = max(AXIS + w.matrix.shape[1] * cell, TEXT_W)
        text = [f"{k}: frames {a}-{b}, {windows[k - 1].prompt}" for k, a, b in spans]
        if len(text) > PANEL_LINES:
            text[PANEL_LINES - 1:] = [f"... and {len(text) - PANEL_LINES + 1} more, to frame {spans[-1][2]}"]
        named = f"window {spans[0][0]}" if len(spans) == 1 else f"windows {spans[0][0]}-{spans[-1][0]}"  # consecutive
        for i, line in enumerate([named] + text):
            while font.getlength(line) > width:  # a long prompt is cut to the panel's width, with an ellipsis
                line = line[:-4] + "..."
            draw.text((x, top + i * LINE), line, fill="black", font=big if i == 0 else font)
        after = np.concatenate([w.matrix.numpy()[1:], np.zeros_like(w.matrix.numpy()[:1])])  # after each row's step
        shade = np.repeat((after * 255 // 999).astype(np.uint8)[..., None], 3, axis=2)
        shade[:, ~w.update.numpy().any(0)] = KNOWN
        x0, (h, f) = x + AXIS, shade.shape[:2]  # x0: the matrix's left edge
        image.paste(Image.fromarray(shade).resize((f * cell, h * cell), Image.NEAREST), (x0, y))
        for edge in np.cumsum(w.blocks)[:-1]:
            draw.line([(x0 + edge * cell, y), (x0 + edge * cell, y + h * cell)], fill=BLOCK_LINE)
        draw.rectangle([x0 - 2, y - 2, x0 + f * cell + 1, y + h * cell + 1], outline=OUTLINE, width=2)
        for step in ticks(h, cell):
            draw.text((x0 - 5, y + (step - 0.5) * cell), str(step), fill="black", font=font, anchor="rm")
        for frame in ticks(f, cell):
            draw.text((x0 + (frame - 0.5) * cell, y - 5), str(frame), fill="black", font=font, anchor="md")
        draw.text((x0, y - LINE - 2), "latent frame", fill="black", font=font, anchor="ld")
        label = Image.new("L", (int(font.getlength("denoising step")) + 2, LINE))
        ImageDraw.Draw(label).text((0, 0), "denoising step", fill=255, font=font)
        image.paste((0, 0, 0), (x, max(y, y + (h * cell - label.width) // 2)), label.rotate(90, expand=True))
        x += width + MARGIN
    draw_legend(image, draw, font, x, y)
    png = io.BytesIO()
    image.save(png, format="PNG", optimize=True)
    return png.getvalue()


def draw_legend(image, draw, font, x, y):  # the shades from noise to clean, then the marks, from (x, y) down
    from PIL import Image

    image.paste(Image.linear_gradient("L").rotate(180).resize((18, 200)), (x, y))  # white (999) to black (0)
    draw.rectangle([x, y, x + 18, y + 200], outline="black")
    draw.text((x, y - 8), "timestep after the step", fill="black", font=font, anchor="ld")
    for t, word in ((999, " noise"), (750, ""), (500, ""), (250, ""), (0, " clean: done")):
        draw.text((x + 26, y + (999 - t) * 200 // 999), f"{t}{word}", fill="black", font=font, anchor="lm")
    marks = ["known frame, never updated:", "  (overlap, image or video)", "a window", "causal block boundary"]
    for i, mark in enumerate(marks):
        draw.text((x + 26, y + 240 + i * LINE), mark, fill="black", font=font, anchor="lm")
    draw.rectangle([x, y + 233, x + 18, y + 247], fill=KNOWN)  # beside marks 0, 2 and 3
    draw.rectangle([x, y + 273, x + 18, y + 287], outline=OUTLINE, width=2)
    draw.line([(x + 9, y + 293), (x + 9, y + 307)], fill=BLOCK_LINE)


def ticks(n, cell):  # 1 and every 5th, 10th, ... of n, at least 30 pixels apart
    every = next(e for e in (5, 10, 25, 50, 100, 250, 500, 1000, 2500) if e * cell >= 30)
    return [1, *range(every, n + 1, every)]


class Output:
    """Where a run writes: the mp4, NAME.partial.mp4 if stopped, a short temporary one, each with a JSON; NAME.state."""

    def __init__(self, out, keeps_state, plan=None):  # plan: --plan's picture, if any
        out = os.path.join(out, "video.mp4") if os.path.isdir(out) else out
        if not out.lower().endswith(".mp4"):
            raise ValueError(f"--out must name an .mp4 file: {out}")
        self.path, self.json, self.folder = out, out[:-4] + ".json", os.path.dirname(os.path.abspath(out))
        stem = os.path.join(self.folder, os.path.basename(out[:-4]).encode()[:242].decode(errors="ignore"))
        self.partial, self.partial_json = stem + ".partial.mp4", stem + ".partial.json"  # within the usual 255 bytes
        self.state = stem + ".state" if keeps_state else None
        tmp = os.path.join(self.folder, f".sample-{os.getpid()}")  # short: out's name may be at the limit
        self.tmp, self.tmp_json = tmp + ".mp4", tmp + ".json"
        self.plan = plan

    def check(self, inputs):  # refuse now, not after the denoising: an output over, in or holding an input, unwritable
        if self.plan and (os.path.isdir(self.plan) or not self.plan.lower().endswith(".png")):
            raise ValueError(f"--plan must name a .png file{', not a folder' * os.path.isdir(self.plan)}: {self.plan}")
        files = (self.path, self.json, self.partial, self.partial_json, self.tmp, self.tmp_json)
        outputs = [("--out", self.path, p) for p in files + (self.state,)] + [("--plan", self.plan, self.plan)]
        for flag, named, path in (o for o in outputs if o[2]):  # (flag, as given, a path it writes)
            if path != self.state and os.path.isdir(path) or len(os.path.basename(path).encode()) > 255:
                why = "is a folder" if os.path.isdir(path) else "has a name over 255 bytes"
                raise ValueError(f"cannot write {flag} {named}: {path} {why}")
            written = os.path.realpath(path) + os.sep
            for given in filter(None, inputs):  # the same path, or one inside it; or an input in the state folder
                read = os.path.realpath(given) + os.sep
                if written.startswith(read) or path == self.state and read.startswith(written):
                    raise ValueError(f"{flag} {named} would overwrite: it writes {path}, over the input {given}")
        for flag, named in dict.fromkeys((f, n) for f, n, _ in outputs if n):  # prove that each folder takes files
            probe = os.path.join(os.path.dirname(os.path.abspath(named)), os.path.basename(self.tmp_json))
            try:
                open(probe, "w").close()
                os.remove(probe)
            except OSError as e:
                folder = os.path.dirname(probe)
                why = "is a file" if os.path.isfile(folder) else e.strerror.lower()
                raise ValueError(f"cannot write {flag} {named}: {folder}: {why}") from None

    def write(self, chunks, fps, record, new_from=0, state=None, passes=None):
        """Frames to a temporary mp4, read back, renamed with their JSON: both or neither; stopped, NAME.partial.mp4.
        Complete, `state` (a skyreels.State) is removed."""
        for name in os.listdir(self.folder):  # the temporaries of runs killed (kill -9) before they could remove them
            if (killed := re.fullmatch(r"\.sample-(\d+)\.(mp4|json)", name)) and not alive(int(killed[1])):
                os.remove(os.path.join(self.folder, name))
        written, stop = self.feed(chunks, fps)
        final = (self.path, self.json) if stop is None else (self.partial, self.partial_json)
        try:
            if written > new_from:
                if frames_in(self.tmp) != written:  # ffmpeg failed (a full disk, say)
                    raise OSError(f"writing {final[0]} failed: ffmpeg made no readable video (is the disk full?)")
                with open(self.tmp_json, "w") as f:
                    json.dump(dict(record, **passes or {}, frames=written, partial=stop is not None), f, indent=1)
                os.replace(self.tmp, final[0])
                os.replace(self.tmp_json, final[1])
                if stop is None:
                    remove(self.partial, self.partial_json)
                    if state is not None:
                        state.remove()
        finally:  # signals wait from here on: the run is done, or stopping
            remove(self.tmp, self.tmp_json)
        if stop is not None:  # an error (not a signal) then gets its own line
            kept = f"{final[0]} holds the {written} frames finished" if written > new_from else "nothing written"
            say(f"stopped; {kept}" + (f"; --resume continues it from {self.state}" if self.state else ""))
            raise SystemExit(128 + STOP["signal"]) if isinstance(stop, KeyboardInterrupt) else stop

    def feed(self, chunks, fps):  # (frames written to the temporary mp4, what stopped it or None), signals deferred
        import numpy as np

        writer, written, stop = None, 0, None
        try:
            for chunk in chunks:
                STOP["defer"] = True  # frames go to ffmpeg whole: a signal meanwhile waits
                frames = (np.clip(chunk, 0, 1) * 255).round().astype(np.uint8)  # (F, H, W, 3)
                writer = writer or mp4_writer(self.tmp, frames.shape[2], frames.shape[1], fps)
                writer.stdin.write(frames.tobytes())  # raw rgb24, frame after frame
                written += len(chunk)
                STOP["defer"] = False
                if STOP["signal"]:
                    raise KeyboardInterrupt
        except BaseException as e:  # noqa: B036  a signal too: the frames finished are kept
            stop = e
        STOP["defer"] = True
        try:
            if writer is not None:
                writer.stdin.close()  # ffmpeg then finishes the mp4 (its index) and ends
                writer.wait()
        except OSError as e:  # ffmpeg ended early: a full disk, say; frames_in then finds the mp4 unreadable
            stop = stop or e
        return written, stop


def remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def say(line, redrawn=False):  # a line on stderr; on a terminal, a `redrawn` one (progress) is drawn over by the next
    sys.stderr.write(f"\r{line}\033[K" + "\n" * (not redrawn) if sys.stderr.isatty() else line + "\n")
    sys.stderr.flush()


def alive(pid):  # a process of this id runs (another user's too)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def progress(passes):  # show(step, total), called after each denoising step; passes: the DiT's, computed and skipped
    start = time.time()

    def show(step, total):
        now, done = time.time(), step + 1
        eta = f"{(now - start) / step * (total - done):.0f}s" if step else "?"
        line = f"step {done}/{total}  {now - start:.0f}s elapsed  ETA {eta}"
        if passes["dit_passes_skipped"]:  # TeaCache's
            line += f"  {passes['dit_passes_skipped']}/{sum(passes.values())} DiT passes skipped"
        say(line, redrawn=True)
    return show


def written(chunks, total):  # the chunks, each counted once the writer has it, before the next is decoded
    done = 0
    for chunk in chunks:
        yield chunk
        done += len(chunk)
        say(f"frame {done}/{total} written", redrawn=done < total)


def ffmpeg():  # the mp4s are read and written by imageio-ffmpeg's binary: without it, say so before any work
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as e:
        raise OSError(f"no ffmpeg to write mp4s with ({type(e).__name__}: {e}): pip install imageio-ffmpeg") from None


LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # for prctl, loaded before any fork


def dies_with_us():  # ffmpeg's preexec_fn: on Linux, SIGKILL when this process ends, kill -9 too
    if LIBC is not None:
        LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ffmpeg runs in a session of its own, so a Ctrl-C reaches only us (who then finish the mp4), and dies with us.
ALONE = dict(start_new_session=True, preexec_fn=dies_with_us)


def mp4_writer(path, width, height, fps):  # ffmpeg encoding rgb24 frames from its stdin, as imageio's writer does
    return subprocess.Popen([ffmpeg(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}",
                             "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264",
                             "-pix_fmt", "yuv420p", "-crf", "10", "-v", "quiet", path],  # imageio's quality 8: crf 10
                            stdin=subprocess.PIPE, **ALONE)


def frames_in(path):  # the frames an mp4 holds as ffmpeg decodes it; 0 if it cannot
    decoded = subprocess.run([ffmpeg(), "-i", path, "-map", "0:v:0", "-f", "null", "-"], capture_output=True,
                             text=True, **ALONE)
    counts = re.findall(r"frame=\s*(\d+)", decoded.stderr)
    return int(counts[-1]) if decoded.returncode == 0 and counts else 0


if __name__ == "__main__":
    main()
    leave(0)  # as every exit: no signal handler of ours left to interrupt the interpreter's shutdown
