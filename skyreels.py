"""SkyReels-V2: the generation method, then the checks at its door, then loading, then the extras a reader can skip.

Read `Settings`, `plan_windows`, then `Pipeline`: `run_lockstep` (every frame at one timestep) and
`run_diffusion_forcing` -> `denoise_window` -> `predict` (plan -> predict -> step). Loading is name alignment: each
tensor is read, cast and placed into a module built on the meta device, so a 28 GB DiT never exists twice in memory.

The extras (the last part) and the lines of the method each one touches, so that one can be deleted whole:
  offload (StreamedBlocks, on_device)   Pipeline.__init__; on_device(...) in predict and the four encoders/decoder
  LoRA (read_lora, fold_loras)          load(); pipe.load_lora / unload_loras are attached there
  async shortcuts (Shortcuts)           denoise_window: `frames = Shortcuts(...)`, `frames.plan(update)`, the pad
  resume state (State)                  check_state; run(): state.begin; run_diffusion_forcing: state.load, save
  several ranks (split_ranks, ...)      load(); run(): check_ranks_agree; predict: guided_pair_across_ranks
  TeaCache                              run_lockstep, denoise_window: `teacache = ...`; predict: teacache.reuse
  fp8 (FP8Linear, use_fp8)              load(), load_component, load_weights (a weight quantized as it is read)
  flash-attn-4                          load()
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import numbers
import os
import random
import re
import sys
import tempfile

import imageio.v2 as imageio
import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
import safetensors.torch
from safetensors import SafetensorError, safe_open

import model
import schedule
import text
import vae


# ================================================================================================================
# Generation

# The seed's recommendations per mode: (steps, guidance scale, flow shift).

DEFAULTS = {"t2v": (50, 6.0, 8.0), "i2v": (50, 5.0, 5.0), "df": (30, 6.0, 8.0), "df-i2v": (30, 5.0, 5.0),
            "v2v": (30, 5.0, 5.0)}

RESOLUTIONS = {"540P": (544, 960), "720P": (720, 1280), "tiny": (64, 96)}  # (height, width)

TEMPORAL, SPATIAL = 4, 8  # the Wan VAE's compression


def latent_frames(num_frames):  # the VAE keeps the first frame alone and packs each next 4 into one latent frame
    return (num_frames - 1) // TEMPORAL + 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """One generation's inputs, by name in Pipeline.generate and stream; check_settings normalises them."""
    prompt: str  # or a list, a prompt a window: diffusion-forcing window k uses prompt[min(k, len - 1)]
    negative_prompt: str = ""
    image: object = None  # the first frame (i2v, df-i2v): a PIL image, a path, or an (H, W, 3) array
    last_image: object = None  # the last frame (i2v, df-i2v)
    video: object = None  # the video to extend (v2v): a path, or a list of frames
    height: int = None  # with width; None: `resolution`'s size (at the image's aspect ratio for image-to-video)
    width: int = None
    resolution: str = None  # "540P", "720P" or "tiny" (RESOLUTIONS); None: the pipeline's (tiny for tiny-*)
    num_frames: int = 97  # rounded down to 1 + 4k
    num_inference_steps: int = None  # None: the mode's default (DEFAULTS), as are guidance_scale and shift
    guidance_scale: float = None  # 1 or less: no classifier-free guidance
    shift: float = None
    seed: int = None  # -1: a random seed, drawn here and recorded; None: torch's global generator
    ar_step: int = 0  # diffusion forcing: 0 synchronous, 5 asynchronous
    causal_block_size: int = 1  # latent frames per causal block (5 with ar_step 5); a window's: causal_blocks
    base_num_frames: int = 97  # frames a window holds (121 at 720P)
    overlap_history: int = None  # frames each window continues from the one before (17 or 37)
    addnoise_condition: float = 0.0  # noise on the known frames (20: smoother joins)
    fps: int = 24  # the frame rate diffusion-forcing models are conditioned on (16 or 24)
    max_sequence_length: int = 512  # text tokens
    mode: str = None  # t2v, i2v, df, df-i2v or v2v: from the checkpoint's kind and the inputs (check_settings)
    # Running it: how the frames are made, handed out and kept, not what they are
    generator: torch.Generator = None  # instead of seed
    progress: object = None  # progress(step, total), called after each denoising step
    output_type: str = "np"  # "np": frames; "latent": the final latents
    state: str = None  # diffusion forcing: a folder that keeps every finished window, to resume from (then a State)
    resume: bool = False  # continue the run kept in `state` from its last finished window
    redo_from: int = None  # keep windows 1 .. redo_from - 1 of the run kept in `state`, make the others again
    cache_budget: float = None  # GiB for the asynchronous shortcuts' key/value cache; None: what the GPU has free
    teacache: float = None  # step caching (TeaCache, an approximation): its threshold, 0.1 or 0.2; None: off
    use_ret_steps: bool = False  # TeaCache with retention steps: the first 5 steps always computed

    @property
    def images(self):
        return [im for im in (self.image, self.last_image) if im is not None]

    @property
    def prompts(self):
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


@dataclasses.dataclass(frozen=True)
class Window:
    """One window of a diffusion-forcing run, in latent frames."""
    size: int  # the latent frames it makes (a last image's latent not counted)
    prefix: int  # its first frames, known from the start: the previous window's end, the image, the input video's
    end: int  # 1 if the last image's latent follows its frames (df-i2v with a last image, last window)
    new_from: int  # its first frame not made by the window before
    overlap: int  # the frames the next window continues from
    prompt: str
    blocks: tuple  # latent frames per causal block, in order, over size + end frames
    matrix: torch.Tensor  # (iterations, size + end) int64: each frame's timestep at each iteration
    update: torch.Tensor  # (iterations, size + end) bool: the frames the solver moves at each iteration


def plan_windows(s):
    """A diffusion-forcing run's windows of base_num_frames frames at most, with their step matrices. Each later one
    (and v2v's first) begins with the last overlap_history frames made so far, known, in whole causal blocks; a
    window's causal blocks need not be equal (causal_blocks)."""
    block, total, base = s.causal_block_size, latent_frames(s.num_frames), latent_frames(s.base_num_frames)
    if s.overlap_history is not None and (s.num_frames > s.base_num_frames or s.mode == "v2v"):
        overlap = latent_frames(s.overlap_history)
        n = 2 + (total - base - 1) // (base - overlap)
        sizes = [min(total - k * (base - overlap), base) for k in range(n)]
    else:
        overlap, sizes = 0, [total]
    windows = []
    for k, size in enumerate(sizes):
        image = int(s.mode == "df-i2v" and k == 0)  # the image's latent frame leads
        # Known frames: the overlap, in whole blocks (v2v's first window too), or df-i2v's image latent.
        prefix = overlap - overlap % block if k > 0 or s.mode == "v2v" else image
        end = int(s.last_image is not None and k == len(sizes) - 1)
        blocks = causal_blocks(size, block, image, end)
        windows.append(Window(size, prefix, end, 0 if k == 0 else overlap, overlap,
                              s.prompts[min(k, len(s.prompts) - 1)], blocks,
                              *window_schedule(size + end, s.num_inference_steps, s.shift, s.ar_step, prefix, blocks,
                                               end)))
    return windows


def causal_blocks(frames, size, alone=0, end=0):
    """A window's causal blocks, in latent frames: its first `alone` (df-i2v's image latent, known) as a block of its
    own, so that it is ready from the start, then blocks of `size`, the last shorter where the frames do not fill it.
    The last image's latent (`end`) joins the last block: its frames see it there (as the original's whole blocks)."""
    rest = frames - alone
    blocks = (alone,) * (alone > 0) + (size,) * (rest // size) + (rest % size,) * (rest % size > 0)
    return blocks[:-1] + (blocks[-1] + end,)


@functools.lru_cache(maxsize=16)  # a long video's windows are nearly all alike: one step matrix serves them
def window_schedule(frames, steps, shift, ar_step, prefix, blocks, end):
    """A window's step matrix and update mask (shared by alike windows: read, never written)."""
    matrix, update = schedule.step_matrix(frames, schedule.timesteps(steps, shift)[0], ar_step, prefix, blocks)
    if end:  # the last image's latent is known from the start and never moves (as the original code)
        matrix[:, -1], update[:, -1] = 0, False
    return matrix, update


class Pipeline:
    def __init__(self, kind, tokenizer, text_encoder, transformer, vae, clip, clip_preprocess, device, offload):
        self.kind, self.tokenizer, self.text_encoder, self.transformer = kind, tokenizer, text_encoder, transformer
        self.vae, self.clip, self.clip_preprocess, self.device, self.offload = vae, clip, clip_preprocess, device, offload
        self.resolution = "540P"  # the size without height and width (tiny_pipeline: "tiny")
        self.checkpoint = {}  # what made its weights, the files by content (load, fold_loras): a State compares it
        self.dit_passes = dict(dit_passes=0, dit_passes_skipped=0)  # the last run's, computed and skipped (TeaCache)
        self.shortcuts = True  # the exact async shortcuts (Shortcuts); off: diffusers' full passes
        self.on_cpu, self.lora_originals = {}, {}  # the extras' own: offload's (on_device), the LoRAs' (fold_loras)
        self.parallel = self.cfg_parallel = None  # several processes: split_ranks
        for m in (text_encoder, transformer, vae, clip):  # inference only: no autograd graph keeps activations
            if m is not None:
                m.requires_grad_(False)
        if offload:
            stream_blocks(self)

    def generate(self, prompt, **settings):
        """float32 frames (F, H, W, 3) in [0, 1], or the final latents (16, F, h, w) (output_type="latent")."""
        chunks = list(self.stream(prompt, **settings))
        return torch.cat(chunks, dim=1) if settings.get("output_type") == "latent" else np.concatenate(chunks)

    def stream(self, prompt, **settings):
        """`generate` as chunks: frames as decoded (1, then 4 at a time) or a window's latents; all checked first."""
        try:
            s = Settings(prompt, **dict(dict(resolution=self.resolution), **settings))
        except TypeError as e:  # an argument Settings has no field for
            raise ValueError(str(e).replace("Settings.__init__()", "generate/stream")) from None
        return self.run(check_settings(self.kind, self.transformer.config, s))

    def run(self, s):
        if self.parallel is not None:
            check_ranks_agree(self, s)
        self.dit_passes.update(dit_passes=0, dit_passes_skipped=0)
        if self.kind != "df":
            return self.run_lockstep(s)
        windows = plan_windows(s)
        return self.run_diffusion_forcing(s, windows, s.state and s.state.begin(self, s.generator))

    # -- text- and image-to-video: every latent frame at the same timestep -------------------------------------------

    def run_lockstep(self, s):
        texts = self.encode_text(s)[s.prompt]
        image_context = condition = None
        if self.kind == "i2v":  # neither draws random numbers: the noise is the same as without them
            image_context, condition = self.encode_clip(s.images), self.i2v_condition(s)
        n = latent_frames(s.num_frames)
        x = self.noise((1, 16, n, s.height // SPATIAL, s.width // SPATIAL), s.generator)
        ts, sigmas = schedule.timesteps(s.num_inference_steps, s.shift)
        state, every, finite = schedule.unipc_init(sigmas, n), torch.ones(n, dtype=torch.bool), []
        teacache = TeaCache(self, s, len(ts)) if s.teacache is not None else None
        for i, t in enumerate(ts):
            inp = x if condition is None else torch.cat([x, condition], dim=1)
            v = self.predict(inp.to(self.transformer_dtype), t.expand(1).to(self.device), s, texts, image_context,
                             teacache=teacache)
            x = schedule.unipc_step(state, v, x, every)
            finite.append(torch.isfinite(x).all())
            if s.progress:
                s.progress(i, len(ts))
        yield from self.decoder(s.output_type)(stop_unless_finite(x, finite))

    # -- diffusion forcing: one loop for text-, image- and video-conditioned generation -------------------------------

    def run_diffusion_forcing(self, s, windows, state=None):
        """Window by window, its first `prefix` latent frames known, the rest noise; its new latents are final, so
        decoded at once. `state` keeps each finished window."""
        texts, decode = self.encode_text(s), self.decoder(s.output_type)
        known, end = self.known_latents(s)
        if s.mode == "v2v" and s.output_type != "latent":  # the input first, as diffusers (its latents: the new only)
            yield to_frames(pixels(s.video, s.height, s.width))
        done, total, generator = 0, sum(len(w.matrix) for w in windows), s.generator  # steps, over all windows
        for k, w in enumerate(windows):
            if state and k < state.finished:
                x, generator = state.load(k, generator)
            else:
                x = self.noise((1, 16, w.size, s.height // SPATIAL, s.width // SPATIAL), generator)
                if w.prefix:
                    x[:, :, :w.prefix] = known[:, :, :w.prefix].to(self.transformer_dtype)
                if w.end:
                    x = torch.cat([x, end.to(self.transformer_dtype)], dim=2)
                x = self.denoise_window(x, w, s, texts[w.prompt], done, total)[:, :, :w.size]  # no last image
                if state:
                    state.save(k, x, generator)
            done += len(w.matrix)
            known = x[:, :, x.shape[2] - w.overlap:]  # the next window's prefix
            yield from decode(x[:, :, w.new_from:])

    def known_latents(self, s):  # the first window's (df-i2v: the image; v2v: the video's end), and the last image's
        if s.mode == "df-i2v":  # the first (and last) image, encoded as one-frame videos
            cond = self.encode_video(torch.cat([pixels([im], s.height, s.width) for im in s.images]))
            return cond[:1], cond[1:]
        if s.mode == "v2v":  # the last overlap_history input frames, of which the VAE takes the first 1 + 4k
            history = pixels(s.video[len(s.video) - s.overlap_history:], s.height, s.width)
            return self.encode_video(history[:, :, :(s.overlap_history - 1) // TEMPORAL * TEMPORAL + 1]), None
        return None, None

    def denoise_window(self, x, w, s, texts, done=0, total=None):
        """x (1, 16, F, h, w) float32 latents denoised: at each iteration the step matrix gives every frame its
        timestep and the update mask the frames the per-frame solver moves."""
        # diffusers and the original code step each frame on a view of the latents they then overwrite, so a
        # frame's second corrector starts from its new sample; reproduce that (schedule.py explains).
        state = schedule.unipc_init(schedule.timesteps(s.num_inference_steps, s.shift)[1], x.shape[2],
                                    alias_first_step=True)
        teacache = TeaCache(self, s, len(w.matrix)) if s.teacache is not None else None  # anew for each window
        frames = Shortcuts(self, x, w, s, on=self.shortcuts and teacache is None)  # TeaCache: whole windows
        finite = []  # a flag a step, on the device: read once, when the window ends
        for i, (t, update) in enumerate(zip(w.matrix, w.update)):
            lo, hi, attention = frames.plan(update)  # frames lo:hi go through the DiT (all, without the shortcuts)
            inp = x[:, :, lo:hi].to(self.transformer_dtype, copy=True)
            t = t[None, lo:hi].clone().to(self.device)
            if s.addnoise_condition > 0 and w.prefix:
                # Known frames get a little fresh noise each iteration (and say so through their timestep):
                # it smooths the seam between windows. Drawn from the global RNG, as diffusers and the original.
                p, a = w.prefix, 0.001 * s.addnoise_condition
                inp[:, :, :p] = inp[:, :, :p] * (1.0 - a) + torch.randn_like(inp[:, :, :p]) * a
                t[:, :p] = s.addnoise_condition
            v = self.predict(inp, t, s, texts, attention=attention, teacache=teacache)
            v = F.pad(v, (0, 0, 0, 0, lo, x.shape[2] - hi))  # frames left out: not updated now
            x = schedule.unipc_step(state, v, x, update)
            finite.append(torch.isfinite(x).all())
            if s.progress:
                s.progress(done + i, total)
        return stop_unless_finite(x, finite, done)

    # -- the pieces every mode shares -----------------------------------------------------------------------------

    def predict(self, x, t, s, texts, image_context=None, attention=(model.AttentionContext(),) * 2, teacache=None):
        """The flow prediction, guided when texts holds a negative prompt's embedding (in the model's dtype, as
        diffusers); attention: the AttentionContexts of the two passes (they see different keys and values)."""
        transformer = on_device(self, self.transformer)
        if teacache is None:
            self.dit_passes["dit_passes"] += 1 + (texts[1] is not None)
        reuse = teacache.reuse(transformer, t, s.fps) if teacache else (None, None)  # it counts its own passes

        def one_pass(i, parallel=self.parallel):  # i: 0 the conditional pass, 1 the unconditional one
            context = dataclasses.replace(attention[i], parallel=parallel, reuse=reuse[i])
            return transformer(x, t, texts[i], image_context, s.fps, context)
        if texts[1] is None:
            return one_pass(0)
        v, u = guided_pair_across_ranks(one_pass, self.cfg_parallel) if self.cfg_parallel else map(one_pass, (0, 1))
        return u + s.guidance_scale * (v - u)

    def encode_text(self, s):  # {prompt: (its embedding, the negative prompt's or None)}, each prompt once
        guided, prompts = s.guidance_scale > 1, list(dict.fromkeys(s.prompts))
        longest = max(len(self.tokenizer.encode(text.clean_prompt(p))) + 1 for p in prompts + [s.negative_prompt])
        if longest > s.max_sequence_length:
            note(f"a prompt of {longest} tokens is cut to {s.max_sequence_length} tokens")
        encoder = on_device(self, self.text_encoder)
        embeds = text.encode_prompts(self.tokenizer, encoder, prompts + [s.negative_prompt] * guided,
                                     s.max_sequence_length, self.device).to(self.transformer_dtype)
        return {p: (embeds[i:i + 1], embeds[-1:] if guided else None) for i, p in enumerate(prompts)}

    def encode_clip(self, images):
        clip = on_device(self, self.clip)
        pixels_ = torch.cat([model.clip_preprocess(im, self.clip_preprocess) for im in images])
        hidden = clip(pixels_.to(self.device, next(clip.parameters()).dtype))  # (N, 257, 1280)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(self.transformer_dtype)  # first-last: both images' tokens

    def i2v_condition(self, s):
        """An I2V DiT's 20 conditioning channels: a mask of the known frames (4 a latent frame) and the latents of the
        video that is the first image, zeros, and the last image if given."""
        video = torch.zeros(1, 3, s.num_frames, s.height, s.width)
        video[:, :, [0, -1][:len(s.images)]] = pixels(s.images, s.height, s.width)
        latents = self.encode_video(video)
        mask = torch.zeros(1, TEMPORAL, *latents.shape[2:], device=self.device)  # (1, 4, F_lat, h, w)
        mask[:, :, 0] = 1
        if len(s.images) > 1:
            mask[:, -1, -1] = 1  # the last frame is the last latent frame's fourth
        return torch.cat([mask, latents], dim=1)

    def encode_video(self, video):  # (1, 3, F, H, W) pixels in [-1, 1] -> normalised float32 latents
        vae = on_device(self, self.vae)
        dtype = next(vae.parameters()).dtype
        return vae.normalize(vae.encode(video.to(self.device, dtype)).float())

    def decoder(self, output_type):
        """decode(finished latents, in order) -> their frames, a latent frame's at a time: the GPU holds four frames
        of video, not a window's, and a reader sees each as it comes."""
        if output_type == "latent":
            return lambda z: [z[0]]  # (16, F, h, w), unbatched as the frames are
        cache = {}  # the VAE's causal cache, carried from call to call

        def decode(z):
            vae = on_device(self, self.vae)
            dtype = next(vae.parameters()).dtype
            for frame in z.split(1, dim=2):
                yield to_frames(vae.decode(vae.denormalize(frame.to(self.device, dtype)), cache))
        return decode

    def noise(self, shape, generator):  # as diffusers' randn_tensor: drawn on the generator's device, then moved
        where = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(self.device)

    @property
    def transformer_dtype(self):  # the load dtype (its first parameter, scale_shift_table, is kept in float32)
        return self.transformer.patch_embedding.weight.dtype


def stop_unless_finite(x, finite, done=0):
    """The last defence against weights or settings no check could judge: stop at the first step that is not finite."""
    bad = (~torch.stack(finite)).nonzero()
    if len(bad):
        raise FloatingPointError(f"the latents stopped being finite (NaN or inf) at step {done + int(bad[0]) + 1}: "
                                 f"check the weights (LoRA, transformer file) and guidance_scale and shift")
    return x


# ================================================================================================================
# The checks at the door: every setting once, before any work, so the loops above can trust what they read


# Integer settings: the least and the most each may be. Python or numpy ints, never floats or bools.

INTEGERS = dict(height=(16, math.inf), width=(16, math.inf), num_frames=(1, 2**20), fps=(1, 1000),
                num_inference_steps=(1, 1000), seed=(-1, 2**64 - 1), ar_step=(0, math.inf),
                causal_block_size=(1, math.inf), base_num_frames=(1, math.inf), overlap_history=(1, math.inf),
                max_sequence_length=(1, math.inf), redo_from=(1, math.inf))


# Real settings: the least and the most, bounds the math carries (a shift of 1e308 makes every sigma 1).

REALS = dict(guidance_scale=(0, 1000), shift=(1e-3, 1000), addnoise_condition=(0, 999), cache_budget=(0, 2**20),
             teacache=(0, 1e30))


def is_integer(v, low, high=math.inf):  # a Python or numpy int, never a bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high


MAX_TOKENS = 2**20  # a window's tokens: 9x a 720P window's (31x45x80), about what one 80 GB GPU can attend over


def check_settings(kind, dit, s):
    """`s` normalised for a `kind` ('t2v', 'i2v', 'df') checkpoint whose DiT is sized `dit` (a model.DiTConfig), or one
    ValueError naming the setting."""
    if not isinstance(s, Settings):
        raise ValueError(f"settings must be skyreels.Settings, got {type(s).__name__}")
    mode = check_mode(kind, dit, s)
    defaults = dict(zip(("num_inference_steps", "guidance_scale", "shift"), DEFAULTS[mode]))
    s = dataclasses.replace(s, mode=mode, **{k: v for k, v in defaults.items() if getattr(s, k) is None})
    s = check_inputs(check_numbers(s))  # each trusts what the one before checked
    check_frames(kind, dit.rope_max_seq_len, s)
    return check_state(s)


def check_mode(kind, dit, s):  # from the checkpoint's kind and which media are given
    if s.image is None and (kind == "i2v" or s.last_image is not None):
        raise ValueError("an I2V checkpoint, and last_image, need image (the first frame)")
    if dit.pos_embed_seq_len is not None and s.last_image is None:  # its image tokens are two images'
        raise ValueError("a first-last-frame checkpoint needs last_image as well as image")
    if s.image is not None and (kind == "t2v" or s.video is not None) or s.video is not None and kind != "df":
        takes = {"t2v": "no image or video", "i2v": "an image, no video", "df": "an image or a video, not both"}
        raise ValueError(f"a {kind.upper()} checkpoint takes {takes[kind]}")
    return kind if kind != "df" else "df-i2v" if s.image is not None else "v2v" if s.video is not None else "df"


def check_numbers(s):  # num_frames is rounded down to 1 + 4k, as diffusers does
    checked = {}
    for name, (low, high) in {**INTEGERS, **REALS}.items():
        v, integer = getattr(s, name), name in INTEGERS
        if v is None and Settings.__dataclass_fields__[name].default is None:  # unset (the mode's defaults are in)
            continue
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(v, bool) or not isinstance(v, kind) or not low <= v <= high:
            raise ValueError(f"{name} must be {'an integer' if integer else 'a number'} in [{low}, {high}], got {v!r}")
        checked[name] = int(v) if integer else float(v)
    checked["num_frames"] = (checked["num_frames"] - 1) // TEMPORAL * TEMPORAL + 1
    for name in ("use_ret_steps", "resume"):
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(s, name)!r}")
    if s.use_ret_steps and s.teacache is None:
        raise ValueError("teacache must be given for use_ret_steps (the retention steps are TeaCache's)")
    return dataclasses.replace(s, **checked)


def check_state(s):  # the state folder read once (State), last: it compares the checked settings; -1 draws a seed
    if (s.resume or s.redo_from) and s.state is None:
        raise ValueError("resume and redo_from continue the run kept in a state folder: give state")
    if s.state is not None and s.mode in ("t2v", "i2v"):
        raise ValueError(f"state, resume and redo_from are for diffusion forcing; {s.mode} makes one pass")
    if s.state is not None and not (isinstance(s.state, (str, os.PathLike)) and os.fspath(s.state)):
        raise ValueError(f"state must be a folder's path, got {s.state!r}")
    state = State(s) if s.state is not None else None
    if (s.resume or s.redo_from) and s.seed in (None, -1):  # resuming without a seed: its last window's
        s = dataclasses.replace(s, seed=state.record["windows"][-1]["seed"])
    if s.seed == -1:  # as the original CLI and the UIs people use: a random seed, recorded
        s = dataclasses.replace(s, seed=random.randrange(2**31))
    if s.generator is None and s.seed is not None:
        s = dataclasses.replace(s, generator=torch.Generator().manual_seed(s.seed))
    return dataclasses.replace(s, state=state and state.plan(s))


def check_inputs(s):  # images and video read as PIL, the size chosen
    if not isinstance(s.prompt, (str, list, tuple)) or not s.prompt:
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {s.prompt!r:.80}")
    for name, v in [("prompt", p) for p in s.prompts] + [("negative_prompt", s.negative_prompt)]:
        if not isinstance(v, str) or v != v.encode("utf-8", "replace").decode():
            raise ValueError(f"{name} must be a string of valid text (no lone surrogates), got {v!r:.80}")
    s = dataclasses.replace(s, prompt=s.prompts[0] if len(s.prompts) == 1 else s.prompts)
    if s.output_type not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {s.output_type!r}")
    if not isinstance(s.generator, (torch.Generator, type(None))) or s.progress is not None and not callable(s.progress):
        raise ValueError("generator must be a torch.Generator and progress a function progress(step, total)")
    if s.resolution not in (None, *RESOLUTIONS):
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {s.resolution!r}")
    if (s.height is None) != (s.width is None):
        raise ValueError("height and width must be given together (or neither: the resolution's size)")
    media = {name: to_pil(getattr(s, name), name) for name in ("image", "last_image") if getattr(s, name) is not None}
    s = dataclasses.replace(s, **media, video=None if s.video is None else read_video(s.video),
                            resolution=s.resolution or "540P" if s.height is None else None)  # None: sized by height
    if s.height is None:
        s = dataclasses.replace(s, **dict(zip(("height", "width"), default_size(s, s.resolution))))
    if s.height % 16 or s.width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {s.height}x{s.width}")
    return s


def default_size(s, resolution):  # with an image: its aspect ratio at the resolution's area
    h, w = RESOLUTIONS[resolution]
    if s.image is None:
        return h, w
    size = (round(math.sqrt(h * w * s.image.height / s.image.width)) // 16 * 16,
            round(math.sqrt(h * w * s.image.width / s.image.height)) // 16 * 16)
    if min(size) < 16:
        raise ValueError(f"image is {s.image.width}x{s.image.height}: its aspect ratio is too extreme for a video of "
                         f"{resolution}'s area (it would be {size[1]}x{size[0]}); give height and width")
    return size


def check_frames(kind, rope_max_seq_len, s):
    n, base, overlap = s.num_frames, s.base_num_frames, s.overlap_history
    if (s.mode == "df-i2v" or s.last_image is not None) and n <= TEMPORAL:
        raise ValueError(f"num_frames must be at least 5 with an image (it takes a latent frame of 4), got {n}")
    if s.mode == "v2v" and overlap is None:
        raise ValueError("video extension needs overlap_history (e.g. 17): the input frames the new ones continue")
    if kind == "df" and n > base and overlap is None:
        raise ValueError(f"num_frames ({n}) is above base_num_frames ({base}): set overlap_history (17 or 37)")
    if kind == "df" and overlap is not None and latent_frames(overlap) >= latent_frames(base):
        raise ValueError(f"overlap_history must be under base_num_frames ({base}) by 4 or more, got {overlap}")
    if s.mode == "v2v" and not (overlap <= len(s.video) and overlap < n):
        raise ValueError(f"overlap_history ({overlap}) must be at most the video's frames and below num_frames ({n})")
    f = latent_frames(min(n, base)) + (s.last_image is not None) if kind == "df" else latent_frames(n)
    grid = (f, s.height // SPATIAL // 2, s.width // SPATIAL // 2)  # the DiT's tokens: 1x2x2 latent patches
    if max(grid) > rope_max_seq_len or math.prod(grid) > MAX_TOKENS:
        size = f"resolution: {s.resolution}," if s.resolution else "height and width:"  # whichever set the size
        raise ValueError(f"{size} {s.width}x{s.height} over {f} latent frames is a {'x'.join(map(str, grid))} token "
                         f"grid, beyond rope_max_seq_len {rope_max_seq_len} or {MAX_TOKENS} tokens: choose less")
    if kind == "df" and s.fps not in (16, 24):
        raise ValueError(f"fps must be 16 or 24 (the rates diffusion-forcing models are trained on), got {s.fps}")
    if s.cache_budget is not None and s.causal_block_size < 2:
        raise ValueError("cache_budget is for the asynchronous shortcuts' cache: it needs causal_block_size > 1")
    if kind != "df" and len(s.prompts) > 1:
        raise ValueError(f"prompt: a list of prompts is for diffusion forcing (one a window); {s.mode} makes one pass")
    if kind == "df" and len(s.prompts) > (windows := len(plan_windows(s))):  # planning checks the causal blocks
        raise ValueError(f"prompt: {len(s.prompts)} prompts for {windows} window{'s' * (windows > 1)} (one each)")


# ================================================================================================================
# Loading: folders, one-file DiTs, the original naming, the hub, the tiny models, media


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message is one line and names the file."""


KINDS = {"SkyReelsV2Pipeline": "t2v", "SkyReelsV2ImageToVideoPipeline": "i2v",
         "SkyReelsV2DiffusionForcingPipeline": "df"}


TINY = ("tiny-t2v", "tiny-i2v", "tiny-df")


def kind_of(path):  # 't2v', 'i2v' or 'df', from model_index.json's _class_name (or a tiny-* name), weights unread
    if path in TINY:
        return path[5:]
    name = read_json(os.path.join(path, "model_index.json")).get("_class_name")
    if name not in KINDS:
        raise CheckpointError(f"{path}/model_index.json names {name}, not a SkyReels-V2 pipeline ({', '.join(KINDS)})")
    return KINDS[name]


def load(path, device=None, dtype=torch.bfloat16, offload=False, vae_dtype=torch.float32, compile=False, loras=(),
         transformer=None, fp8=False):
    """A ready pipeline from a -Diffusers folder, a Hugging Face id or tiny-t2v/i2v/df. transformer: a one-file DiT for
    the folder's; fp8: quantize on load; compile: ~20% faster on an H100, half the activations, ~10-30 s a new shape."""
    check_load(path, (dtype, vae_dtype), loras, transformer, dict(offload=offload, compile=compile, fp8=fp8))
    if offload and path in TINY:  # built in memory, on the device
        note("offload is for model folders: a tiny model runs whole on the device")
    device = check_device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    path = path if path in TINY or os.path.isdir(path) else download(path)
    pipe = tiny_pipeline(path, device, dtype) if path in TINY else \
        load_folder(path, device, dtype, offload, vae_dtype, transformer, fp8)
    for module in (pipe.transformer, pipe.text_encoder) if fp8 and path in TINY else ():
        use_fp8(module, device)  # built in memory: quantized now
    pipe.fp8 = (transformer and fp8_layout(transformer)) or ("quantized on load" if fp8 else None)
    pipe.checkpoint = dict(model=path if path in TINY else content_id(path), loras=[],
                           transformer=transformer and content_id(transformer), dtype=str(dtype)[6:],
                           vae_dtype=str(vae_dtype)[6:], fp8=fp8)
    fold_loras(pipe, loras)  # LoRA
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        pipe.parallel, pipe.cfg_parallel = split_ranks()
    if device.type == "cuda":
        use_flash_attention_4(device)
    for block in pipe.transformer.blocks.children() if compile else ():
        block.compile()
    return pipe


def check_load(path, dtypes, loras, transformer, flags):  # at the door: one error naming the argument, before reading
    if not isinstance(path, (str, os.PathLike)) or str(path).startswith("tiny-") and path not in TINY:
        raise ValueError(f"path must be a model folder, a Hugging Face id or one of {', '.join(TINY)}, got {path!r}")
    for name, dtype in zip(("dtype", "vae_dtype"), dtypes):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            raise ValueError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if isinstance(loras, (str, os.PathLike)) or not all(isinstance(x, (tuple, list)) and len(x) == 2 for x in loras):
        raise ValueError(f"loras must be a list of (path, scale) pairs, got {loras!r:.80}")
    if transformer is not None and str(path).startswith("tiny-"):
        raise ValueError("transformer: the tiny-* models are built in memory; a one-file DiT needs a model folder")
    for name, file in [("transformer", transformer)] * bool(transformer) + [("loras", lora) for lora, _ in loras]:
        if not os.path.isfile(file):
            raise CheckpointError(f"{name}: no such file {file}")


def check_device(device):
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type != "cpu" and not (device.type == "cuda" and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"device {device} is not cpu or one of this machine's {torch.cuda.device_count()} GPUs")
    return device


def dit_config(path):  # the DiT's sizes (its rotary table, first-last-frame or not), without its weights
    return model.CONFIGS["tiny"] if path in TINY else read_config(model.DiTConfig, f"{path}/transformer/config.json")


def load_folder(path, device, dtype, offload, vae_dtype, transformer_file=None, fp8=False):
    kind = kind_of(path)
    home = torch.device("cpu") if offload else device  # offloaded components wait on the CPU
    sub = lambda name: os.path.join(path, name)  # noqa: E731
    if device.type == "cuda" and not offload:  # say so now, not as an out-of-memory error after minutes of loading
        need = sum(weights_bytes(sub(c), FP8[0] if fp8 else dtype)  # fp8: a little under (embeddings stay 16-bit)
                   for c in ("text_encoder", "transformer", "image_encoder") if os.path.isdir(sub(c))) / 2**30
        if need > 0.9 * (have := torch.cuda.get_device_properties(device).total_memory / 2**30):
            raise ValueError(f"{path} needs {need:.1f} GiB, {device} has {have:.1f} GiB: pass --offload")
    spiece = sub("tokenizer/spiece.model")
    try:
        tokenizer = text.Tokenizer(spiece)
    except (RuntimeError, OSError) as e:  # missing, or not a sentencepiece model
        raise CheckpointError(f"cannot read {spiece} as a sentencepiece model ({str(e).splitlines()[0]})") from None
    clip = preprocess = None
    if kind == "i2v":
        clip = load_component(model.CLIPVision, model.CLIPVisionConfig, sub("image_encoder"), dtype, home)
        preprocess = read_json(sub("image_processor/preprocessor_config.json"))
        if not all(isinstance(preprocess.get(k), dict) for k in ("size", "crop_size")):
            raise CheckpointError(f"{sub('image_processor/preprocessor_config.json')} lacks size or crop_size")
    umt5 = load_component(text.UMT5Encoder, text.UMT5Config, sub("text_encoder"), dtype, home, fp8=fp8)
    dit = load_component(model.DiT, model.DiTConfig, sub("transformer"), dtype, home, transformer_file, fp8)
    autoencoder = load_component(vae.VAE, vae.VAEConfig, sub("vae"), vae_dtype, home)
    return Pipeline(kind, tokenizer, umt5, dit, autoencoder, clip, preprocess, device, offload)


def read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # missing, unreadable, or not JSON (or nested too deep)
        raise CheckpointError(f"cannot read {path} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is valid JSON but not an object ({{...}})")
    return data


def read_config(cls, path):  # each value of its field's type: its default's; if None, int or null
    config = read_json(path)
    for f in dataclasses.fields(cls):
        want = {bool: bool, int: int, float: (int, float), str: str, tuple: (list, tuple)}.get(type(f.default), int)
        v = config.get(f.name, f.default)
        if not (v is None is f.default or isinstance(v, want) and (want is bool or not isinstance(v, bool))):
            raise CheckpointError(f"{path}: {f.name} is {v!r}, a value of the wrong type")
    try:
        return cls.from_config(config)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def weight_files(folder):  # {tensor name: shard path}, from a sharded index or a single safetensors file
    for name in ("diffusion_pytorch_model", "model"):
        index = os.path.join(folder, f"{name}.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            return {k: os.path.join(folder, v) for k, v in weight_map.items()}
        single = os.path.join(folder, f"{name}.safetensors")
        if os.path.isfile(single):
            with _open(single) as f:
                return {k: single for k in f.keys()}
    raise CheckpointError(f"no safetensors weights in {folder} (looked for *.safetensors and its index)")


def weights_bytes(folder, dtype):  # from the safetensors headers alone: no tensor is read
    numel = 0
    for path in set(weight_files(folder).values()):
        with _open(path) as f:
            numel += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return numel * torch.finfo(dtype).bits // 8


def _open(path):  # a safetensors file whose header names each tensor once (json.load would keep a repeat's last)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            json.loads(f.read(min(size, 100 * 2**20)), object_pairs_hook=unique_keys)
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError, RecursionError) as e:  # missing, not a (whole) safetensors file
        raise CheckpointError(f"cannot read {path} as safetensors ({e})") from None


def unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise ValueError(f"its header names {next(k for k in keys if keys.count(k) > 1)} twice")
    return dict(pairs)


def param_dtype(module, name, dtype):
    return torch.float32 if any(s in name for s in getattr(module, "keep_fp32", ())) else dtype


def place(module, device, dtype):  # a module built in memory, as loading would have: keep_fp32 stays float32
    for name, p in module.named_parameters():
        p.data = p.data.to(device, param_dtype(module, name, dtype))
    return module


def load_component(cls, config_cls, folder, dtype=torch.float32, device="cpu", single_file=None, fp8=False):
    """Sized by `folder`'s config.json, filled from its safetensors or from `single_file`, a one-file DiT."""
    with torch.device("meta"):
        module = cls(read_config(config_cls, os.path.join(folder, "config.json")))
    if fp8:
        use_fp8(module, device)
    if single_file is None:
        return load_weights(module, folder, weight_files(folder), dtype, device).eval()
    aliases = one_file_names(single_file, module, device)  # to our naming, whichever the file's
    load_weights(module, single_file, dict.fromkeys(aliases, single_file), dtype, device, aliases)
    check_input_scales(single_file, module)
    return module.eval()


def load_weights(module, where, files, dtype, device, aliases=None):
    """Fill `module` strictly from `files` ({key: path}); it may declare checkpoint_aliases, ignored_keys, keep_fp32."""
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_meta}  # not fp8 scales already set
    aliases = aliases or getattr(module, "checkpoint_aliases", {})
    ignored = tuple(getattr(module, "ignored_keys", ()))
    plan = {}  # our key -> checkpoint key
    for key in files:
        if (ours := aliases.get(key, key)) in expected and (ours not in plan or key == ours):
            plan[ours] = key
    missing = sorted(set(expected) - set(plan))
    unexpected = sorted(k for k in files if aliases.get(k, k) not in expected and not k.startswith(ignored))
    if missing or unexpected:
        what = "; ".join(f"{name} keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                         for name, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise CheckpointError(f"{where} does not fit {type(module).__name__} from its config.json: {what}")
    for path in sorted({files[key] for key in plan.values()}):  # shard by shard
        state = {}
        with _open(path) as f:
            for ours, key in ((o, k) for o, k in plan.items() if files[k] == path):
                t, want = _tensor(f, path, key), expected[ours]
                t = t.reshape(()) if want.dim() == 0 and t.numel() == 1 else t  # a scale written as (1,)
                if t.shape != want.shape:
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}; config.json: {tuple(want.shape)}")
                if t.is_floating_point() != want.is_floating_point() or t.dtype in FP8 and want.dtype not in FP8:
                    raise CheckpointError(f"{path}: {key} is {t.dtype}, but {want.dtype} belongs there"
                                          + " (only a Linear's weight may be fp8)" * (t.dtype in FP8))
                if want.dtype in FP8 and t.dtype not in FP8:  # --fp8: quantized as it is read
                    t, state[ours.removesuffix("weight") + "scale"] = quantize(t.to(device))
                if ours.endswith(".scale"):  # an fp8 weight's (FP8Linear)
                    check_scale(path, key, t)
                keep = t.dtype in FP8 or not t.is_floating_point()  # fp8 weights stay fp8
                state[ours] = t.to(device, t.dtype if keep else param_dtype(module, ours, dtype))
        module.load_state_dict(state, strict=False, assign=True)
    return module


def _tensor(f, path, key):  # refused if it holds NaN or inf: a NaN weight makes a black video
    try:
        t = f.get_tensor(key)
    except (SafetensorError, OSError) as e:  # a key the index promised but the file lacks, or a truncated file
        raise CheckpointError(f"cannot read {key} from {path} ({e})") from None
    if t.is_floating_point() and not torch.isfinite(t.float() if t.element_size() == 1 else t).all():
        raise CheckpointError(f"{path}: {key} holds NaN or inf")
    return t


# -- The original Wan 2.1 / SkyReels-V2 naming (also ComfyUI's and most LoRAs'), for whole DiT files and LoRAs --


# Ours -> the original's: top-level names by prefix, blocks.N by segment (its norm3 is our norm2; its norm2 has none)

CE = "condition_embedder."


WAN_TOP = {"proj_out": "head.head", "scale_shift_table": "head.modulation", CE + "time_proj": "time_projection.1",
           CE + "text_embedder.linear_1": "text_embedding.0", CE + "text_embedder.linear_2": "text_embedding.2",
           CE + "time_embedder.linear_1": "time_embedding.0", CE + "time_embedder.linear_2": "time_embedding.2",
           CE + "image_embedder.norm1": "img_emb.proj.0", CE + "image_embedder.ff.net.0.proj": "img_emb.proj.1",
           CE + "image_embedder.ff.net.2": "img_emb.proj.3", CE + "image_embedder.norm2": "img_emb.proj.4",
           CE + "image_embedder.pos_embed": "img_emb.emb_pos", "fps_projection.net.0.proj": "fps_projection.0",
           "fps_projection.net.2": "fps_projection.2"}


WAN_BLOCK = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "add_k_proj": "k_img", "add_v_proj": "v_img", "norm_added_k": "norm_k_img", "ffn.net.0.proj": "ffn.0",
             "ffn.net.2": "ffn.2", "scale_shift_table": "modulation", "norm2": "norm3"}


PREFIX = re.compile(r"^(model\.diffusion_model\.|diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_)")


def wan_name(name):  # ours -> the original's, by whole dotted segments (top-level names from the start)
    table, start = (WAN_BLOCK, r"(?<![^.])") if name.startswith("blocks.") else (WAN_TOP, "^")
    return re.sub(rf"{start}({'|'.join(map(re.escape, table))})(?![^.])", lambda m: table[m[1]], name)


def canonical(key):  # no prefix, '.' made '_': where ours, the original's and kohya's (lora_unet_blocks_0_...) meet
    return PREFIX.sub("", key).replace(".", "_")


def dit_names(dit):  # {canonical name: our name}, from ours and the original's (no name has two meanings)
    return {canonical(name): k for k in dit.state_dict() for name in (wan_name(k), k)}


# -- The hub, the tiny models, media ------------------------------------------------------------------------------


def download(name):  # a Hugging Face id's snapshot; a name that is not owner/name (a path, say) is a folder not found
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name):
        hint = os.path.basename(name) if "SkyReels-V2" in name else "NAME"
        raise CheckpointError(f"no model folder at {name}; to download: hf download Skywork/{hint} --local-dir {hint}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name)
    except Exception as e:  # huggingface_hub not installed, offline, no such repo, no access, disk full, ...
        raise CheckpointError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}): check the "
                              f"id and the network, or `hf download {name} --local-dir DIR` and pass DIR") from None


TINY_CORPUS = ["A cat and a dog baking a cake together in a kitchen.", "The camera follows a small blue bird upward.",
               "一只猫和一只狗在厨房里一起烤蛋糕。", "Le chat et le chien préparent un gâteau.", "Bright colors, static."]


def tiny_pipeline(name, device, dtype):  # random tiny models built in memory: to smoke-test or step through the method
    with tempfile.TemporaryDirectory() as folder:  # the tokenizer reads its model file once, at once
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(TINY_CORPUS * 4), model_prefix=os.path.join(folder, "spiece"), vocab_size=200,
            character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
        tokenizer = text.Tokenizer(os.path.join(folder, "spiece.model"))
    torch.manual_seed(0)
    dit = dataclasses.replace(model.CONFIGS["tiny"], inject_sample_info=name == "tiny-df")
    clip = preprocess = None
    if name == "tiny-i2v":
        clip = place(model.CLIPVision(model.CLIP_CONFIGS["tiny"]), device, dtype).eval()
        dit = dataclasses.replace(dit, in_channels=36, image_dim=clip.config.hidden_size, added_kv_proj_dim=dit.dim)
        preprocess = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
                          rescale_factor=1 / 255, image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711])
    pipe = Pipeline(name[5:], tokenizer, place(text.UMT5Encoder(text.CONFIGS["tiny"]), device, dtype).eval(),
                    place(model.DiT(dit), device, dtype).eval(), vae.VAE(vae.CONFIGS["tiny"]).to(device).eval(),
                    clip, preprocess, device, False)
    pipe.resolution = "tiny"
    return pipe


def to_pil(image, what):  # from a PIL image, a path, or an (H, W, 3) array: uint8, or float in [0, 1]
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:  # PIL refuses decompression bombs (over 179 Mpixels) here
                return to_pil(im, what)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{what}: cannot read {image}: {str(e).splitlines()[0]}") from None
    if isinstance(image, Image.Image) and image.mode.startswith("I"):  # 16/32-bit grey: RGB would clip it to white
        image = Image.fromarray((np.asarray(image, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and \
            (image.dtype == np.uint8 or image.dtype.kind == "f" and np.isfinite(image).all()):
        return Image.fromarray(image if image.dtype == np.uint8 else np.rint(image.clip(0, 1) * 255).astype(np.uint8))
    raise ValueError(f"{what} must be a PIL image, a file path, or an (H, W, 3) uint8 or finite float array; got "
                     f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))} {getattr(image, 'dtype', '')}")


def read_video(video):  # PIL frames from a video file or a list (or array) of frames
    if isinstance(video, (str, os.PathLike)):
        try:
            video = imageio.mimread(video, memtest=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"video: cannot read {video}: {str(e).splitlines()[0]}") from None
    if not hasattr(video, "__len__") or len(video) == 0:
        raise ValueError(f"video must be a file path or a non-empty list of frames, got {type(video).__name__}")
    return [to_pil(f, "a video frame") for f in video]


def pixels(images, height, width):  # PIL images resized as diffusers' VideoProcessor does (Lanczos), in [-1, 1]
    arrays = [np.asarray(im.resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0 for im in images]
    return (2.0 * torch.from_numpy(np.stack(arrays)) - 1.0).permute(3, 0, 1, 2)[None]  # (1, 3, F, H, W)


def to_frames(video):  # (1, 3, F, H, W) in [-1, 1] -> float32 numpy (F, H, W, 3) in [0, 1], as diffusers' "np"
    return (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu().numpy()


# ================================================================================================================
# Extras: offload (block streaming), LoRAs, the async shortcuts, resume state, several ranks, TeaCache, fp8,
# flash-attn-4. Each attaches through the few lines the module docstring lists.


# -- Offload (--offload): only the component at work is on the GPU; the DiT's and UMT5's blocks stream through it ----


def on_device(pipe, module):  # with offload, only `module` is on the GPU; the others get back their CPU copies
    if pipe.offload:
        for m in [m for m in pipe.on_cpu if m is not module]:
            for p, data in zip(resident(m), pipe.on_cpu.pop(m)):
                p.data = data
        if module is not None and module not in pipe.on_cpu:
            pipe.on_cpu[module] = [p.data for p in resident(module)]
            for p in resident(module):
                p.data = p.data.to(pipe.device)
    return module


class StreamedBlocks(torch.nn.ModuleList):
    """--offload: blocks wait in pinned host memory and are copied to the GPU in turn on a side stream, overlapping the
    block before's compute: the GPU holds two blocks (a 14B one is 0.67 GB). Iterating yields each block on the GPU."""

    def __init__(self, blocks, device):
        super().__init__(blocks)
        self.cuda = device.type == "cuda"
        for p in self.parameters():  # pinned once: made anew (stream_blocks), it keeps the pinned copies it finds
            p.data = p.data.pin_memory() if self.cuda and not p.data.is_pinned() else p.data
        self.host = [[p.data for p in b.parameters()] for b in blocks]
        # Two slots, used by turns: bytes for each parameter's largest copy (blocks a LoRA touched hold 16-bit weights)
        sizes = [max(t.nbytes for t in copies) for copies in zip(*self.host)]
        self.slots = [[torch.empty(n, dtype=torch.uint8, device=device) for n in sizes] for _ in range(2)]
        self.copier = torch.cuda.Stream(device) if self.cuda else None

    def fetch(self, i):  # copy block i into its slot after the work queued so far (its last user's included)
        if self.cuda:
            self.copier.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copier):  # no side stream on the CPU (None): a plain copy
            for slot, data in zip(self.slots[i % 2], self.host[i]):
                in_slot(slot, data).copy_(data, non_blocking=self.cuda)

    def __iter__(self):
        blocks = list(self.children())
        self.fetch(0)
        for i, block in enumerate(blocks):
            if self.cuda:  # wait for block i's copy, the only one queued yet (not the next, started below)
                torch.cuda.current_stream().wait_stream(self.copier)
            if i + 1 < len(blocks):  # the next block's copy overlaps this block's compute
                self.fetch(i + 1)
            for p, slot, data in zip(block.parameters(), self.slots[i % 2], self.host[i]):
                p.data = in_slot(slot, data)
            yield block  # the caller runs it: its kernels are queued before we go on
            for p, data in zip(block.parameters(), self.host[i]):
                p.data = data


def in_slot(slot, data):  # a slot's first bytes as a tensor of data's dtype and shape
    return slot[:data.nbytes].view(data.dtype).view(data.shape)


def stream_blocks(pipe):
    """--offload: the DiT's and UMT5's blocks stream through the GPU; the rest goes for its turn (on_device)."""
    for owner, name in ((pipe.transformer, "blocks"), (pipe.text_encoder.encoder, "block")):
        setattr(owner, name, StreamedBlocks(list(getattr(owner, name).children()), pipe.device))


def resident(module):  # the parameters --offload moves to the GPU for a component's turn: all but streamed blocks'
    streamed = {id(p) for m in module.modules() if isinstance(m, StreamedBlocks) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in streamed]


# -- LoRA: low-rank weight deltas, folded into the DiT's weights once --------------------------------------------


# A LoRA key is <module>.<part>, the module in any naming (dit_names): diffusers/PEFT transformer.blocks.0.attn1.to_q,
# original Wan / ComfyUI diffusion_model.blocks.0.self_attn.q, kohya / musubi-tuner lora_unet_blocks_0_self_attn_q.

LORA_PARTS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
              "alpha": "alpha", "diff": "diff", "diff_b": "diff", "lora_B.bias": "diff"}


BIAS_PARTS = ("diff_b", "lora_B.bias")  # deltas of the module's bias; the other parts are of its weight


LORA_KEY = re.compile(rf"(.+)\.({'|'.join(re.escape(p) for p in LORA_PARTS)})$")


def read_lora(path, dit):  # [(our parameter name, coefficient, up, down)]: a delta is coefficient * up @ down, or up
    names, params = dit_names(dit), dict(dit.named_parameters())
    with _open(path) as f:
        tensors = {k: _tensor(f, path, k) for k in f.keys()}
        metadata = (f.metadata() or {}).get("lora_adapter_metadata", "{}")  # the adapter config diffusers saves
    try:
        peft = {k.removeprefix("transformer."): v for k, v in json.loads(metadata).items()}
    except (ValueError, AttributeError):  # not JSON, or not an object
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not a JSON object") from None
    if not isinstance(peft.get("lora_alpha", 1), numbers.Real) or isinstance(peft.get("lora_alpha"), bool):
        raise CheckpointError(f"{path}: lora_alpha in its metadata is {peft['lora_alpha']!r}, not a number")
    if peft.get("alpha_pattern") or peft.get("use_rslora") or peft.get("use_dora"):
        raise CheckpointError(f"{path}: PEFT alpha_pattern, rSLoRA and DoRA adapters are not supported")
    parts = {}  # our parameter name -> {part: (key, tensor)}
    for key, t in tensors.items():
        if not t.is_floating_point():  # integers would be used as raw numbers
            raise CheckpointError(f"{path}: {key} is {t.dtype}; a LoRA holds floating-point tensors")
        m = LORA_KEY.match(key)
        ours = m and names.get(canonical(m[1]) + ("_bias" if m[2] in BIAS_PARTS else "_weight"))
        if ours is None:
            raise CheckpointError(f"{path}: {key} matches no weight of this transformer")
        parts.setdefault(ours, {})[LORA_PARTS[m[2]]] = (key, t)
    terms = []
    for ours, got in parts.items():
        if ("down" in got) != ("up" in got) or ("alpha" in got and "down" not in got):
            raise CheckpointError(f"{path}: {next(iter(got.values()))[0]} has no matching lora_down/lora_up pair")
        shape, rank = tuple(params[ours].shape), got["down"][1].shape[0] if "down" in got else 0
        # down (rank, in, *kernel), up (out, rank, 1, ...): convolutions too, as kohya writes them
        want = dict(down=(rank,) + shape[1:], up=(shape[0], rank) + (1,) * (len(shape) - 2), alpha=(), diff=shape)
        for part, (key, t) in got.items():
            if tuple(t.shape) != want[part]:
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, which does not fit {ours} {shape}")
        if "diff" in got:  # a full delta (.diff, .diff_b, lora_B.bias)
            terms.append((ours, 1.0, got["diff"][1], None))
        if rank:  # coefficient alpha / rank; alpha: the pair's, the PEFT adapter's lora_alpha, or the rank
            alpha = float(got["alpha"][1]) if "alpha" in got else float(peft.get("lora_alpha", rank))
            terms.append((ours, alpha / rank, got["up"][1], got["down"][1]))
    return terms


def fold_loras(pipe, loras):  # W += the scaled deltas in float32, rounded once to W's dtype, every file checked first
    terms = {}
    for path, scale in loras:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"a LoRA's scale must be a finite number, got {scale!r} for {path}")
        for name, coefficient, up, down in read_lora(path, pipe.transformer):
            terms.setdefault(name, []).append((scale * coefficient, up, down))
    pipe.checkpoint["loras"] = pipe.checkpoint.get("loras", []) + [[content_id(path), float(scale)]
                                                                   for path, scale in loras]
    on_device(pipe, None)  # offload: every parameter back in its home copy
    for name, group in terms.items():
        p = pipe.transformer.get_parameter(name)
        delta = torch.zeros(p.shape, device=p.device)
        for coefficient, up, down in group:
            up = up.to(p.device, torch.float32)
            delta += coefficient * (up if down is None else (up.flatten(1) @ down.to(up).flatten(1)).view(p.shape))
        pipe.lora_originals.setdefault(name, p.data.to("cpu", copy=True))  # for unload_loras: bf16 W + d - d is not W
        w, dtype, layer = p.data.float(), p.dtype, pipe.transformer.get_submodule(name.rpartition(".")[0])
        if isinstance(layer, FP8Linear) and name.endswith(".weight"):  # an fp8 weight: dequantized, and from now on
            pipe.lora_originals.setdefault(name[:-6] + "scale", layer.scale.data.to("cpu", copy=True))
            w, dtype = w * layer.scale, pipe.transformer_dtype  # held in the compute dtype, with scale 1
            layer.scale.data = torch.ones_like(layer.scale.data)
        p.data = (w + delta).to(dtype)
    if pipe.offload:  # blocks a LoRA touched have new weights (fp8 ones in another dtype): new host copies and slots
        stream_blocks(pipe)


def load_lora(pipe, path, scale=1.0):  # pipe.load_lora: diffusers/PEFT, original Wan / ComfyUI or kohya keys; add up
    fold_loras(pipe, [(path, scale)])


def unload_loras(pipe):  # pipe.unload_loras: the DiT's weights exactly as before the first LoRA (fp8 ones too)
    on_device(pipe, None)  # offload: every parameter back in its home copy
    for name in list(pipe.lora_originals):
        p = pipe.transformer.get_parameter(name)
        p.data = pipe.lora_originals.pop(name).to(p.device)
    pipe.checkpoint["loras"] = []
    if pipe.offload:
        stream_blocks(pipe)


Pipeline.load_lora, Pipeline.unload_loras = load_lora, unload_loras  # the API's methods, attached from here


# -- The exact shortcuts of asynchronous diffusion forcing ------------------------------------------------------


class Shortcuts:
    """Which frames of a window each iteration runs through the DiT. With block-causal attention (causal blocks of more
    than one frame) a block never changes an earlier one, so two shortcuts are exact: blocks not started yet are left
    out, and finished blocks (resting while a later one moves) keep their keys and values in a KVCache, up to `limit`
    frames, so later passes skip them. Re-noised known frames change every iteration: no cache then. Off (or without
    causal blocks), every pass covers the whole window, as diffusers'."""

    def __init__(self, pipe, x, w, s, on=True):
        self.blocks = w.blocks if s.causal_block_size > 1 else ()  # (): full attention
        self.ends = list(itertools.accumulate(w.blocks))  # each block's end, in latent frames
        self.on = on and bool(self.blocks)
        renoised = s.addnoise_condition > 0 and w.prefix > 0
        self.limit = cache_limit(pipe, x, s, self.ends) if self.on and not renoised else 0
        self.caches = [model.KVCache(len(pipe.transformer.blocks), self.limit) if self.limit else None
                       for _ in range(2)]  # one a pass: the two passes' keys and values differ
        self.cached = 0  # frames in the caches (a rank of CFG parallelism fills only its pass's)

    def plan(self, update):
        """(lo, hi, the passes' AttentionContexts) for an iteration moving the frames in `update`: frames lo:hi run
        (those before lo are cached); their first `keep` frames are finished blocks, which join the cache now."""
        if not self.on:
            return 0, len(update), [model.AttentionContext(self.blocks)] * 2
        lo = self.cached
        hi = next(e for e in self.ends if e > int(update.nonzero().max()))  # the last block moving now: later rest
        resting = lo + int(torch.cumprod(~update[lo:hi], 0).sum())  # frames from lo on that no longer move
        keep = max(e for e in [lo, *self.ends] if e <= min(resting, self.limit)) - lo  # whole blocks, within limit
        blocks = tuple(b for b, e in zip(self.blocks, self.ends) if lo < e <= hi)
        self.cached += keep
        return lo, hi, [model.AttentionContext(blocks, cache, keep) for cache in self.caches]


def cache_limit(pipe, x, s, ends):
    """Latent frames of window x the shortcuts may cache (whole blocks, `ends`): in s.cache_budget GiB, or by default
    what the GPU has free less a whole-window forward's activations and a margin: they fit where a run without does."""
    cfg, itemsize = pipe.transformer.config, torch.finfo(pipe.transformer_dtype).bits // 8
    guided = s.guidance_scale > 1
    tokens = x.shape[3] // cfg.patch_size[1] * x.shape[4] // cfg.patch_size[2]  # a latent frame's
    passes, sp = 1 + guided, pipe.parallel  # with several ranks, each caches its passes' heads only
    if guided and pipe.cfg_parallel:
        passes, sp = 1, pipe.cfg_parallel[0]
    heads = -(-cfg.num_attention_heads // (1 if sp is None else dist.get_world_size(sp.group)))
    per_frame = passes * cfg.num_layers * 2 * tokens * heads * cfg.attention_head_dim * itemsize  # K, V, layers
    if s.cache_budget is not None:
        budget = s.cache_budget * 2**30
    elif pipe.device.type != "cuda":
        budget = per_frame * x.shape[2]
    else:
        free = torch.cuda.mem_get_info(pipe.device)[0] + torch.cuda.memory_reserved(pipe.device) \
            - torch.cuda.memory_allocated(pipe.device)
        # A forward's peak over its activations is below this (measured 0.6-0.7x at 1.3B and 14B, 540P).
        activations = x.shape[2] * tokens * (2 * cfg.ffn_dim + 10 * cfg.dim) * itemsize
        budget = free - activations - 2 * 2**30
    frames = min(x.shape[2], max(int(budget), 0) // per_frame)
    return max(e for e in [0, *ends] if e <= frames)


# -- Resume and redo: a diffusion-forcing run keeps every finished window in a state folder -----------------------


SAME_ON_RESUME = ("mode", "negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                  "guidance_scale", "shift", "ar_step", "causal_block_size", "base_num_frames", "overlap_history",
                  "addnoise_condition", "fps", "max_sequence_length", "teacache", "use_ret_steps")


STATE_FORMAT = "skyreels-v2 state 1"  # settings.json's "format": the folder is this project's to write in

STATE_FILES = re.compile(r"(window-\d{4,}\.safetensors|settings\.json)(\.\d+\.tmp)?")  # what a State writes

PASSES = ("dit_passes", "dit_passes_skipped")  # Pipeline.dit_passes' counts, kept per window


class State:
    """A run's state folder. settings.json, written first, makes it this project's: the run's identity (its settings,
    the media's pixels and the checkpoint's files by content: identity, load) and each window's prompt and seed. Per
    finished window, window-K.safetensors: its latents (float32, exact), every random generator's state after it, its
    prompt, seed and DiT passes, and a checksum of all that and of the window before (of the identity for window 1):
    a flipped bit, or a window of another run, is refused. Each file is written whole (atomic_write). Resuming
    restores it all, so the video is the one an uninterrupted run makes; redo_from K keeps windows 1 .. K-1.
    The folder is read once, at the door (check_state: __init__, plan), and written from begin(), by rank 0."""

    def __init__(self, s):
        self.folder, self.record, self.kept = os.fspath(s.state), None, 0
        self.continuing, path = s.resume or s.redo_from is not None, os.path.join(self.folder, "settings.json")
        if os.path.lexists(self.folder):  # only a folder this project made is read, written in or removed
            if not os.path.isfile(path):
                raise ValueError(f"state {self.folder} exists and is not a state folder (no settings.json): it is "
                                 f"left as it is; remove it or choose another name")
            self.record = read_json(path)
            windows = self.record.get("windows")
            if self.record.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{path}: format is {self.record.get('format')!r}, not {STATE_FORMAT!r}")
            if not isinstance(windows, list) or not windows or not all(
                    isinstance(w, dict) and set(w) == {"prompt", "seed"} and isinstance(w["prompt"], str) and
                    (w["seed"] is None or is_integer(w["seed"], 0, 2**64 - 1)) for w in windows):
                raise CheckpointError(f"{path}: windows must be a list of each window's prompt (text) and seed (an "
                                      f"integer), got {windows!r}")
            self.kept = next(k for k in itertools.count() if not os.path.isfile(self.path(k)))  # finished windows
        if self.continuing and self.record is None:
            raise ValueError(f"{'resume' if s.resume else 'redo_from'}: {self.folder} holds no run (no settings.json)")
        if not self.continuing and self.kept:
            raise ValueError(f"{self.folder} holds {self.kept} finished windows of an earlier run: resume, redo, or "
                             f"remove it")

    def plan(self, s):
        """The run's windows, and the prompt and seed of each (kept windows keep theirs); a resumed or redone run's
        settings compared with the state's, and on resume each window's prompt and the seed of those to make."""
        self.windows, self.shape = plan_windows(s), (s.height // SPATIAL, s.width // SPATIAL)
        self.identity, n = identity(s), len(self.windows)
        self.made, self.finished = [dict(prompt=w.prompt, seed=s.seed) for w in self.windows], 0
        if self.continuing:
            self.compare(self.identity, self.record)
            old, self.finished = self.record["windows"], self.kept if s.resume else s.redo_from - 1
            if len(old) != n or self.kept > n:
                raise CheckpointError(f"{self.folder} holds {len(old)} windows' prompts and {self.kept} windows; the "
                                      f"run makes {n}")
            if s.redo_from and s.redo_from > min(self.kept + 1, n):
                raise ValueError(f"redo_from {s.redo_from}: {self.folder} holds {self.kept} finished windows of {n}; "
                                 f"redo one of 1 .. {min(self.kept + 1, n)}")
            if s.resume:  # every window's prompt, and the seed of those still to make (a kept one's may be a redo's)
                now, then = ({f"window {k + 1}": w if k >= self.finished else w["prompt"] for k, w in enumerate(ws)}
                             for ws in (self.made, old))
                self.compare(now, then, "resume with its prompts and seed, or redo from that window (redo_from)")
            self.made[:self.finished] = old[:self.finished]
        self.reseed = self.finished and self.made[self.finished - 1]["seed"] != s.seed  # a redo with another seed
        return self

    def compare(self, now, old, advice="resume with the same settings"):  # the first field that differs, named, whole
        for name, value in now.items():
            if old.get(name) != value:
                raise ValueError(f"{name} differs from the state's in {self.folder} ({old.get(name)!r} there, "
                                 f"{value!r} here): {advice}")

    def begin(self, pipe, generator):  # the checkpoint compared, the kept windows verified, settings.json written
        if self.continuing:
            self.compare(pipe.checkpoint, self.record)
        record = dict(format=STATE_FORMAT, **self.identity, **pipe.checkpoint, windows=self.made)
        self.chain = [hashlib.sha256(json.dumps(dict(record, windows=None)).encode()).hexdigest()]
        self.device, self.passes, self.counted = pipe.device, pipe.dit_passes, dict.fromkeys(PASSES, 0)
        for k in range(self.finished):  # each read whole before any frame is made
            self.read_window(k, generator)
        self.writer = not dist.is_initialized() or dist.get_rank() == 0  # rank 0 writes, every rank reads
        if self.writer:
            os.makedirs(self.folder, exist_ok=self.record is not None)  # a folder that came meanwhile: refused
            for k in reversed(range(self.finished, self.kept)):  # the windows to make again, last first
                os.remove(self.path(k))
            atomic_write(os.path.join(self.folder, "settings.json"), json.dumps(record, indent=1).encode())
        return self

    def path(self, k):
        return os.path.join(self.folder, f"window-{k + 1:04d}.safetensors")

    def save(self, k, x, generator):
        tensors = dict(latents=x.float().cpu().contiguous(), rng=torch.get_rng_state(),
                       generator=generator.get_state() if generator is not None else None,
                       cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        tensors = {name: t for name, t in tensors.items() if t is not None}
        record = dict(window=k + 1, follows=self.chain[k], **self.made[k],
                      **{n: self.passes[n] - self.counted[n] for n in PASSES})  # this window's passes
        self.counted, self.chain[k + 1:] = dict(self.passes), [checksum(tensors, record)]
        if self.writer:
            metadata = dict(window=json.dumps(dict(record, checksum=self.chain[k + 1])))
            atomic_write(self.path(k), safetensors.torch.save(tensors, metadata=metadata))

    def load(self, k, generator):
        """Window k's latents, and the generators as after it (the seeded one not, if a redo reseeds)."""
        t, record = self.read_window(k, generator)
        for n in PASSES:  # the whole film's passes: the kept windows' too
            self.passes[n] += record[n]
        self.counted = dict(self.passes)
        torch.set_rng_state(t["rng"])
        if "cuda_rng" in t and self.device.type == "cuda":
            torch.cuda.set_rng_state(t["cuda_rng"], self.device)
        if generator is not None and not self.reseed:
            generator.set_state(t["generator"])
        return t["latents"].to(self.device), generator

    def read_window(self, k, generator):  # (tensors, record): each tensor as this run's, the checksum and chain checked
        path = self.path(k)
        with _open(path) as f:
            t, record = {key: _tensor(f, path, key) for key in f.keys()}, (f.metadata() or {}).get("window")
        like = dict(latents=torch.empty(1, 16, self.windows[k].size, *self.shape, device="meta"),
                    rng=torch.get_rng_state(), generator=generator.get_state() if generator is not None else None)
        if "cuda_rng" in t and self.device.type == "cuda":
            like["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        for key, want in like.items():
            if want is not None and (key not in t or (t[key].dtype, t[key].shape) != (want.dtype, want.shape)):
                got = f"{t[key].dtype} {tuple(t[key].shape)}" if key in t else "missing"
                raise CheckpointError(f"{path}: {key} is {got}; window {k + 1} of this run needs {want.dtype} "
                                      f"{tuple(want.shape)}")
        try:
            record = json.loads(record)
            body = {key: v for key, v in record.items() if key != "checksum"}
        except (TypeError, ValueError, AttributeError, RecursionError):  # none, not JSON, or not an object
            raise CheckpointError(f"{path} has no record of its window") from None
        if record.get("checksum") != checksum(t, body) or not all(is_integer(body.get(n), 0) for n in PASSES):
            raise CheckpointError(f"{path} is damaged: its checksum does not match its contents")
        for name, value in dict(window=k + 1, follows=self.chain[k], **self.made[k]).items():
            if body.get(name) != value:
                raise CheckpointError(f"{path} is not window {k + 1} of this run: its {name} is {body.get(name)!r}, "
                                      f"not {value!r}")
        self.chain[k + 1:] = [record["checksum"]]
        return t, body

    def remove(self):  # this project's files (settings.json last), then the folder if that empties it
        for name in sorted(os.listdir(self.folder), key=lambda name: name.startswith("settings.json")):
            if STATE_FILES.fullmatch(name):
                os.remove(os.path.join(self.folder, name))
        try:
            os.rmdir(self.folder)
        except OSError:  # the user's own files in it, or a link to it: left as they are
            pass


def identity(s):
    """What a run's frames depend on besides its checkpoint and each window's prompt and seed: the settings, and the
    media by the digest of their pixels. A State keeps it, compared field by field; ranks compare it."""
    record = {name: getattr(s, name) for name in SAME_ON_RESUME}
    for name in ("image", "last_image", "video"):
        frames = getattr(s, name)
        frames = frames if isinstance(frames, list) else [frames] if frames is not None else []
        record[name] = hashlib.sha256(b"".join(im.tobytes() + repr(im.size).encode() for im in frames)).hexdigest()
    return record


def content_id(path, header=False):
    """A file's size and the sha256 of its bytes (header: of a safetensors file's header alone, its tensors' names,
    dtypes, shapes and offsets), or a checkpoint folder's of its files', each weight file by its header (hashing 28 GB
    at each start would take a minute). Kept in a state: a file rewritten at the same path is found, and one file
    under two names is one file."""
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(folder, name), path) for folder, _, names in os.walk(path)
                       for name in names if name.endswith((".json", ".model", ".safetensors")))
        ids = [[name, content_id(os.path.join(path, name), name.endswith(".safetensors"))] for name in files]
        return "sha256:" + hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    with open(path, "rb") as f:
        if header:
            digest = hashlib.sha256(f.read(8 + int.from_bytes(f.read(8), "little"))).hexdigest()  # length, then JSON
        else:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    return f"{os.path.getsize(path)} bytes, sha256:{digest}"


def checksum(tensors, record):  # a window's record and tensors (names, dtypes, shapes, bytes)
    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for name, t in sorted(tensors.items()):
        h.update(repr((name, t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy())
    return h.hexdigest()


def atomic_write(path, data):
    """Write bytes whole or not at all: to a temporary name beside `path`, flushed to disk, then renamed over it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- Several processes (torchrun) share the DiT's work ------------------------------------------------------------
# The text encoder, CLIP and the VAE run on every rank: the same inputs give the same results, so nothing is broadcast.


def split_ranks():
    """(SequenceParallel over all ranks, CFG parallelism: on an even number, (this half's SequenceParallel or None,
    this rank and its twin's group, 0 for the conditional pass or 1), else None)."""
    n, rank = dist.get_world_size(), dist.get_rank()
    if n % 2:
        return model.SequenceParallel(dist.group.WORLD), None
    halves = [dist.new_group(list(range(k * n // 2, (k + 1) * n // 2))) for k in (0, 1)]  # every rank makes
    pairs = [dist.new_group([r, r + n // 2]) for r in range(n // 2)]  # every group, as new_group needs
    half = model.SequenceParallel(halves[rank // (n // 2)]) if n > 2 else None
    return model.SequenceParallel(dist.group.WORLD), (half, pairs[rank % (n // 2)], rank // (n // 2))


def guided_pair_across_ranks(one_pass, cfg_parallel):
    """(conditional, unconditional): half the ranks make each and swap with their twins (one pass: one cache)."""
    half, pair, index = cfg_parallel
    mine = one_pass(index, parallel=half)
    v, u = torch.empty_like(mine), torch.empty_like(mine)
    dist.all_gather([v, u], mine, group=pair)
    return v, u


def check_ranks_agree(pipe, s):
    """Ranks that disagree on a seed, size or input make a garbled video together: compare digests before any work."""
    h = hashlib.sha256(json.dumps([identity(s), pipe.checkpoint, s.prompts, s.seed, s.output_type, s.cache_budget])
                       .encode())
    rng = torch.cuda.get_rng_state(pipe.device) if pipe.device.type == "cuda" else torch.get_rng_state()
    states = ([s.generator.get_state()] if s.generator is not None else []) + [rng] * (s.addnoise_condition > 0)
    for state in states:  # the seeded generator, and the global RNG that re-noising draws from
        h.update(state.numpy().tobytes())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, h.hexdigest())
    differ = [rank for rank, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"ranks {differ} were given other settings, inputs or random state than rank 0")


# -- Step caching (TeaCache): a step whose timestep modulation has barely moved reuses the blocks' last residual ----


# {(name, use_ret_steps): TeaCache's polynomial}, fitted per checkpoint by its authors, as SkyReels-V2 lists them

TEACACHE = {
    ("1.3B", False): (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
    ("1.3B", True): (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    ("14B", False): (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    ("14B", True): (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    ("I2V-540P", False): (-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01),
    ("I2V-540P", True): (2.57151496e+05, -3.54229917e+04, 1.40286849e+03, -1.35890334e+01, 1.32517977e-01),
    ("I2V-720P", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    ("I2V-720P", True): (8.10705460e+03, 2.13393892e+03, -3.72934672e+02, 1.66203073e+01, -4.17769401e-02),
}


class TeaCache:
    """TeaCache (Liu et al., 2024) over `steps` steps (a window's). The relative L1 change of the DiT's modulation
    (use_ret_steps) or time embedding since the step before, through the checkpoint's polynomial, adds to a sum; while
    it is below the threshold, each pass adds its last computed residual instead of running the blocks, else they run
    and the sum restarts. The first steps (5 with use_ret_steps, else 1) always run, and without use_ret_steps the last.
    Both passes see the same timesteps: one sum decides a step, on every rank alike."""

    def __init__(self, pipe, s, steps):
        self.coefficients = teacache_coefficients(pipe.transformer.config, min(s.height, s.width), s.use_ret_steps)
        self.first, self.last = (5, steps) if s.use_ret_steps else (1, steps - 1)  # steps before, and from, always run
        self.threshold, self.use_ret_steps, self.step = s.teacache, s.use_ret_steps, 0
        self.previous, self.sum, self.passes = None, 0.0, [{}, {}]  # passes: DiT.forward's `reuse`, each pass's
        self.counts, self.passes_a_step = pipe.dit_passes, 1 + (s.guidance_scale > 1)  # its own: computed, skipped
        if pipe.shortcuts and s.causal_block_size > 1:  # denoise_window then turns the shortcuts off
            note("TeaCache passes whole windows (a pass over some frames cannot reuse others'): no async shortcuts")

    def reuse(self, transformer, t, fps):  # this step's `reuse` arguments of DiT.forward, one for each pass
        temb, mod = transformer.time_modulation(t.reshape(1, -1), t.numel(), fps)
        now = (mod if self.use_ret_steps else temb).float()
        # Threshold 0 skips nothing: the polynomials dip below 0 for small changes (14B's at 0.1: -0.6).
        run = not self.first <= self.step < self.last or self.threshold == 0
        if not run:
            change = ((now - self.previous).abs().mean() / self.previous.abs().mean()).item()
            self.sum += np.polyval(self.coefficients, change)
            run = self.sum >= self.threshold
        self.previous, self.step, self.sum = now, self.step + 1, 0.0 if run else self.sum
        self.passes[0]["skip"] = self.passes[1]["skip"] = not run
        self.counts["dit_passes" if run else "dit_passes_skipped"] += self.passes_a_step
        return self.passes


def teacache_coefficients(cfg, side, use_ret_steps):
    """I2V's polynomial by resolution (by the short side: a portrait 960x544 is 540P), T2V's and DF's by size."""
    size = min(("1.3B", "14B"), key=lambda name: abs(math.log(model.CONFIGS[name].dim / cfg.dim)))
    name = ("I2V-540P" if side < 632 else "I2V-720P") if cfg.in_channels == 36 else size  # 632: between 544 and 720
    if (cfg.num_layers, cfg.dim) != (model.CONFIGS[size].num_layers, model.CONFIGS[size].dim):
        note(f"TeaCache: no coefficients fitted for a {cfg.num_layers}x{cfg.dim} DiT; {name}'s (the nearest) stand in")
    return TEACACHE[name, use_ret_steps]


# -- fp8 weights: a Linear's weight in float8_e4m3fn or float8_e5m2 times one float32 scale for the whole matrix --
# Shared one-file DiTs come in three layouts: plain (scale 1); ComfyUI's scaled one (a `scaled_fp8` marker,
# .scale_weight, optional .scale_input); its newer one (.weight_scale, optional .input_scale, .comfy_quant: JSON as
# uint8 bytes). They load through load_weights like any file: one_file_names only makes their Linears FP8Linear.

FP8, FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2), ("F8_E4M3", "F8_E5M2")  # safetensors' names for them

QUANTIZED = ("blocks.", "fps_projection.", "encoder.block.")  # --fp8's Linears (DiT, UMT5), as in the shared files

WEIGHT_SCALE = re.compile(r"\.(scale_weight|weight_scale)$")

INPUT_SCALE = re.compile(r"\.(scale_input|input_scale)$")  # for fp8 activations: we dequantize weights instead

MARKERS = (".comfy_quant", "scaled_fp8")


class FP8Linear(torch.nn.Module):
    """A Linear whose weight waits in fp8 (half of bf16's bytes), dequantized as it runs: float32 times the scale,
    rounded once to the input's dtype, for the ordinary F.linear."""

    def __init__(self, weight, scale, bias):
        super().__init__()
        self.weight, self.scale, self.bias = torch.nn.Parameter(weight, False), torch.nn.Parameter(scale, False), bias

    def forward(self, x):
        return F.linear(x, (self.weight.float() * self.scale).to(x.dtype), self.bias)


def quantize(w):  # -> float8_e4m3fn, float32 scale: the largest magnitude over 448, e4m3's largest value
    scale = (w.abs().max().float() / 448).clamp(min=torch.finfo(torch.float32).tiny)  # all zeros: any scale
    return (w.float() / scale).to(torch.float8_e4m3fn), scale


def use_fp8(module, device, layers=None, scaled=False):
    """Swap a component's nn.Linear modules `layers` (default: --fp8's, under QUANTIZED) for FP8Linear: on the meta
    device for the loader (load_weights quantizes a 16-bit weight as it reads it), or quantized now (tiny-*, bench)."""
    if layers is None:
        layers = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(QUANTIZED)]
    for name in layers:
        linear = module.get_submodule(name)
        if linear.weight.is_meta:  # the loader fills the weight, and the scale if the file has one (`scaled`)
            weight = torch.empty_like(linear.weight, dtype=FP8[0])
            scale = torch.ones((), device="meta" if scaled else device)
        else:
            weight, scale = quantize(linear.weight.data)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, FP8Linear(weight, scale, linear.bias))


def fp8_layout(path):
    """A one-file DiT's fp8 layout, from its keys and dtypes: 'comfyui-quant', 'comfyui-scaled', 'plain', or None."""
    with _open(path) as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    marks = {"comfyui-quant": (".weight_scale", ".comfy_quant"), "comfyui-scaled": (".scale_weight", "scaled_fp8")}
    found = [name for name, ends in marks.items() if any(key.endswith(ends) for key in dtypes)]
    return found[0] if found else "plain" if any(d in FP8_DTYPES for d in dtypes.values()) else None


def one_file_names(path, dit, device):
    """{key: our name} for a one-file DiT in any naming; the Linears its fp8 weights belong to made FP8Linear, their
    scales from the file unless its layout is plain. Input scales (check_input_scales) and layout markers left out."""
    layout, names = fp8_layout(path), dit_names(dit)
    with _open(path) as f:
        fp8 = [names[canonical(key)].removesuffix(".weight") for key in f.keys()
               if f.get_slice(key).get_dtype() in FP8_DTYPES and names.get(canonical(key), "").endswith(".weight")]
        linears = [layer for layer in fp8 if isinstance(dit.get_submodule(layer), (torch.nn.Linear, FP8Linear))]
        if layout not in (None, "plain") and not fp8:
            raise CheckpointError(f"{path} has {layout} fp8 markers or scales but no fp8 weight")
        if linears:
            use_fp8(dit, device, linears, scaled=layout != "plain")
        keys = [key for key in f.keys() if not (INPUT_SCALE.search(key) or key.endswith(MARKERS))]
    names = dit_names(dit)  # with the FP8Linears' scales
    return {key: names.get(canonical(WEIGHT_SCALE.sub(".scale", key)), key) for key in keys}


def check_input_scales(path, dit):  # scales for fp8 activations, unused (we dequantize weights): each an fp8 Linear's
    names = dit_names(dit)
    with _open(path) as f:
        for key in filter(INPUT_SCALE.search, f.keys()):
            if names.get(canonical(INPUT_SCALE.sub(".scale", key))) is None:
                raise CheckpointError(f"{path}: {key} is the input scale of no fp8 weight")
            check_scale(path, key, _tensor(f, path, key))


def check_scale(path, key, t):  # one finite scale > 0 for the whole matrix (_tensor has refused NaN and inf)
    if t.numel() != 1 or not t.is_floating_point() or not float(t) > 0:
        raise CheckpointError(f"{path}: {key} must be one finite scale > 0 for the whole matrix, got {t.dtype} "
                              f"{tuple(t.shape)}{f' {float(t)}' if t.numel() == 1 else ''}")


# -- flash-attn-4, and the notes every extra may print ------------------------------------------------------------


def use_flash_attention_4(device):
    """The DiT's attention through flash-attn-4 (optional) on Hopper and Blackwell: 1.2x faster than cuDNN's."""
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return
    try:
        from flash_attn.cute import flash_attn_func
        model.FLASH = flash_attn_func
    except Exception as e:  # noqa: BLE001  not installed, or installed without its CUDA libraries
        note(f"attention runs on PyTorch SDPA; flash-attn-4 would be faster ({type(e).__name__}: {e})")


@functools.lru_cache(maxsize=None)  # each note once in a process, as Python's warnings
def note(message):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"note: {message}", file=sys.stderr)
