"""Tiny checkpoints in the exact official `-Diffusers` layout, written by the reference stack itself.

Every parity test in this suite compares our code with diffusers/transformers at the *same weights*. The weights
live in folders that diffusers' and transformers' own `save_pretrained` wrote, laid out like the official
Skywork/SkyReels-V2-*-Diffusers folders (model_index.json, transformer/, vae/, text_encoder/ sharded with its
index, tokenizer/spiece.model, and for I2V image_encoder/ and image_processor/). So loading is tested too.

Folders (session-scoped, built once, a few seconds in all):
  t2v    SkyReelsV2Pipeline                                 in_channels 16
  i2v    SkyReelsV2ImageToVideoPipeline   + CLIP tower      in_channels 36, image_dim, added_kv_proj_dim
  flf2v  SkyReelsV2ImageToVideoPipeline   + CLIP tower      as i2v plus pos_embed_seq_len (first-last frame)
  df     SkyReelsV2DiffusionForcingPipeline                 inject_sample_info=True (fps conditioning)

Everything else the test modules share lives here too, once: the images and the media folder the runs take
(`image`, `clip`, `media`), writable folder copies (`spoiled_copy`), our pipelines on those folders (`pipes`, one per
session), diffusers' (`references`, one per folder per module), the parity helpers, the CLI run in-process (`cli`),
and sample.py run in a process of its own until a line it prints, then signalled (`signal_at`). Every test gets back
the signal handlers it found (`signal_handlers`): sample.main installs its own in whatever process runs it.
"""
import collections
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A small multilingual corpus for the tokenizer: enough pieces that real prompts split into many tokens.
CORPUS = [
    "A cat and a dog baking a cake together in a kitchen.",
    "The cat is carefully measuring flour, while the dog is stirring the batter with a wooden spoon.",
    "The kitchen is cozy, with sunlight streaming through the window.",
    "CG animation style, a small blue bird takes off from the ground, flapping its wings.",
    "The camera follows the bird upward, capturing its flight and the vastness of the sky.",
    "A serene lake surrounded by towering mountains, with a few swans gracefully gliding across the water.",
    "一只猫和一只狗在厨房里一起烤蛋糕。阳光透过窗户洒进来，厨房里很温馨。",
    "镜头跟随小鸟向上飞，捕捉它的飞行和天空的辽阔。",
    "Le chat et le chien préparent un gâteau à la cuisine, près de la fenêtre ensoleillée.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Größe, schön.",
    "El pájaro azul despega del suelo, batiendo sus alas bajo el cielo despejado.",
    "青い鳥が地面から飛び立ち、空高く舞い上がる。カメラは鳥を追いかける。",
    "Кошка и собака пекут торт на кухне. Солнечный свет льётся через окно.",
    "고양이와 개가 부엌에서 함께 케이크를 굽고 있다.",
    "Ο γάτος και ο σκύλος ψήνουν ένα κέικ μαζί στην κουζίνα.",
    "Một con mèo và một con chó đang nướng bánh cùng nhau trong bếp.",
    "Bright colors, overexposed, static, blurred details, subtitles, worst quality, low quality, JPEG artifacts.",
    "ugly, incomplete, extra fingers, poorly drawn hands, deformed, disfigured, misshapen limbs, fused fingers.",
]

HEIGHT, WIDTH = 32, 48  # -> 4x6 latents -> 2x3 tokens per latent frame


def seed_sigmas(n):
    """The seed's (and the original SkyReels-V2's) unshifted sigma spacing: linspace(0.999, 0, n+1)[:-1]."""
    return np.linspace(0.999, 0.0, n + 1)[:-1]


def make_seed_spaced_scheduler_class():
    """diffusers >= 0.37 spaces flow sigmas as linspace(1, 1/1000, n+1)[:-1], which no longer reproduces the seed's
    step table (999, 995, 991, ...). The pipelines call `scheduler.set_timesteps(n)` with no sigmas, so for parity we
    give them a scheduler whose set_timesteps hands the seed's sigmas to diffusers' own `set_timesteps(sigmas=...)`.
    diffusers then applies the shift itself; nothing else about its solver changes."""
    from diffusers import UniPCMultistepScheduler

    class SeedSpacedUniPC(UniPCMultistepScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
            if sigmas is None:
                sigmas = seed_sigmas(num_inference_steps)
            super().set_timesteps(device=device, sigmas=sigmas, mu=mu)

    return SeedSpacedUniPC


def randomize_(module, seed):
    """diffusers zero-initialises some parameters (output projections, pos_embed); give every parameter non-zero
    random values so that every weight matters in a comparison. Scales keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("gamma") or ("norm" in name and name.endswith("weight")):
                v = 1.0 + 0.1 * r
            elif p.ndim >= 2:
                v = r / max(1.0, p[0].numel()) ** 0.5
            else:
                v = 0.1 * r
            p.copy_(v.to(p.dtype))
    return module


def train_spiece(path):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 8), model_writer=buf, vocab_size=400, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def tiny_text_config(vocab_size):
    from transformers import UMT5Config

    return UMT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)


TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                 patch_size=8, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-5)
CLIP_TOKENS = (32 // 8) ** 2 + 1


def _tokenizer(root):
    raw = os.path.join(root, "_spiece")
    os.makedirs(raw, exist_ok=True)
    train_spiece(os.path.join(raw, "spiece.model"))
    from transformers import T5Tokenizer

    tok = T5Tokenizer.from_pretrained(raw, extra_ids=0)
    return tok, os.path.join(raw, "spiece.model")


def build_folder(root, kind, tok, spiece):
    from diffusers import (AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline, SkyReelsV2ImageToVideoPipeline,
                           SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5EncoderModel

    torch.manual_seed(0)
    text_encoder = randomize_(UMT5EncoderModel(tiny_text_config(len(tok))), 1).eval()
    vae = randomize_(AutoencoderKLWan(**TINY_VAE), 2).eval()
    tcfg = dict(TINY_TRANSFORMER)
    shift = 5.0 if kind in ("i2v", "flf2v") else 8.0
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    extra = {}
    if kind in ("i2v", "flf2v"):
        inner = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
        tcfg.update(in_channels=36, image_dim=TINY_CLIP["hidden_size"], added_kv_proj_dim=inner)
        if kind == "flf2v":
            tcfg.update(pos_embed_seq_len=2 * CLIP_TOKENS)
        extra["image_encoder"] = randomize_(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)), 3).eval()
        extra["image_processor"] = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True, do_resize=True,
            resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
        cls = SkyReelsV2ImageToVideoPipeline
    elif kind == "df":
        tcfg.update(inject_sample_info=True)
        cls = SkyReelsV2DiffusionForcingPipeline
    else:
        cls = SkyReelsV2Pipeline
    transformer = randomize_(SkyReelsV2Transformer3DModel(**tcfg), 4).eval()
    pipe = cls(tokenizer=tok, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler, **extra)
    path = os.path.join(root, kind)
    pipe.save_pretrained(path)
    # Shard the text encoder (as the official 22 GB UMT5-XXL is) so every load exercises the index.
    shutil.rmtree(os.path.join(path, "text_encoder"))
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"), max_shard_size="20KB")
    # transformers 5 writes tokenizer.json only; the official folders carry spiece.model, which is what we read.
    shutil.copy(spiece, os.path.join(path, "tokenizer", "spiece.model"))
    return path


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """{kind: path} for the four tiny official-layout folders."""
    root = str(tmp_path_factory.mktemp("ckpt"))
    tok, spiece = _tokenizer(root)
    return {kind: build_folder(root, kind, tok, spiece) for kind in ("t2v", "i2v", "flf2v", "df")}


def diffusers_pipeline(path, cls=None):
    """The reference pipeline for a tiny folder (as `cls`, default the folder's own), float32 on CPU, with the seed's
    sigma spacing."""
    from diffusers import DiffusionPipeline

    pipe = (cls or DiffusionPipeline).from_pretrained(path, torch_dtype=torch.float32)
    pipe.scheduler = make_seed_spaced_scheduler_class().from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Our pipelines and diffusers' on the tiny folders


@pytest.fixture(scope="session")
def pipes(tiny_folders):
    """{kind: our pipeline} for the four tiny folders, float32 on the CPU, loaded once for the whole session. Tests
    only generate with them; a test that changes a pipeline (a LoRA, offloading) loads its own."""
    import skyreels

    return {kind: skyreels.load(path, device="cpu", dtype=torch.float32) for kind, path in tiny_folders.items()}


@pytest.fixture(scope="module")
def references(tiny_folders):
    """references(kind, cls=None): diffusers' pipeline for a tiny folder, loaded once per module on first use. A class
    other than the folder's own (the DF folder's image- and video-to-video pipelines) is built on the same components.

    diffusers' DF pipelines store a call's causal_block_size in the transformer's config, where a later call without
    one finds it; each hand-out puts the folder's value back, so every test gets the pipeline as loaded."""
    loaded = {}

    def reference(kind, cls=None):
        if kind not in loaded:
            pipe = diffusers_pipeline(tiny_folders[kind])
            loaded[kind] = pipe, pipe.transformer.config.num_frame_per_block
        pipe, block = loaded[kind]
        pipe.transformer.register_to_config(num_frame_per_block=block)
        if cls is not None:
            pipe = cls(**pipe.components)
            pipe.set_progress_bar_config(disable=True)
        return pipe

    return reference


# Parity runs: the same settings for diffusers' pipeline and ours, the same seeds.
PROMPT = "A cat and a dog baking a cake together in a kitchen."
NEGATIVE = "Bright colors, overexposed, static, blurred details"


def parity_settings(**kw):
    """The settings every parity run shares (4 steps, guidance 5, the tiny size), and the case's own."""
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                guidance_scale=5.0, **kw)


def run_both(reference, ours, ref_kwargs, our_kwargs, seed=0):
    """(our frames, diffusers' frames): the same torch.Generator seed for the latent noise, the same global seed for
    `addnoise_condition` (both draw it from the global RNG)."""
    torch.manual_seed(1234)
    ref = reference(generator=torch.Generator().manual_seed(seed), output_type="np", **ref_kwargs).frames[0]
    torch.manual_seed(1234)
    out = ours.generate(generator=torch.Generator().manual_seed(seed), **our_kwargs)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return out, ref


def max_abs(a, b):
    return float(np.abs(a - b).max())


# ----------------------------------------------------------------------------------------------------------------
# Inputs: images, videos, folders


def image(seed, size=(WIDTH, HEIGHT)):
    """A random RGB image of `size` (width, height), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def clip(frames=13):
    """A random video of `frames` images at the tiny size (PIL images, as a video argument takes them)."""
    return [image(i) for i in range(frames)]


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """A folder of input files: first.png and last.png (50x37: an aspect ratio not the tiny size's), strip.png
    (4000x4: an extreme one), clip.mp4 (clip(): 13 frames, 48x32), and broken.png and broken.mp4 (text, not media)."""
    d = tmp_path_factory.mktemp("media")
    image(0, (50, 37)).save(d / "first.png")
    image(1, (50, 37)).save(d / "last.png")
    image(2, (4000, 4)).save(d / "strip.png")
    imageio.mimwrite(d / "clip.mp4", [np.asarray(im) for im in clip()], fps=24, macro_block_size=1)
    (d / "broken.png").write_text("not an image")
    (d / "broken.mp4").write_text("not a video")
    return d


@pytest.fixture
def spoiled_copy(tiny_folders, tmp_path):
    """spoiled_copy(kind, name, spoil=None): a copy of a tiny folder at tmp_path/name (a str), after spoil(path)."""
    def copy(kind, name, spoil=None):
        path = str(shutil.copytree(tiny_folders[kind], tmp_path / name))
        if spoil is not None:
            spoil(path)
        return path

    return copy


# ----------------------------------------------------------------------------------------------------------------
# Signal handlers: each test leaves pytest the ones it found

# sample.main installs its handler for these three, and on an error exit (leave) sets them to SIG_IGN; left so in
# pytest's process, Ctrl-C and `timeout` could no longer stop the suite.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SESSION_HANDLERS = {sig: signal.getsignal(sig) for sig in SIGNALS}  # what pytest started with (test_harness checks)


@contextlib.contextmanager
def kept_signal_handlers():
    """The SIGINT, SIGTERM and SIGHUP handlers of the block's start, put back at its end. For a fixture broader than
    a test that runs sample.main: it runs before a test's `signal_handlers` records them."""
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            if handler is not None:  # None: a handler not set from Python, which Python cannot set back
                signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def signal_handlers():
    """Every test: whatever it (or sample.main, in it) does to the handlers is undone when it ends. One place for the
    whole suite, so no caller of sample.main can forget."""
    with kept_signal_handlers():
        yield


# ----------------------------------------------------------------------------------------------------------------
# The command line, in this process

CliRun = collections.namedtuple("CliRun", "code out err")


@pytest.fixture
def cli(capsys):
    """cli(argv): sample.main(argv) in this process, as `python sample.py ARGV` runs it (the signal and torchrun tests
    run real processes); returns CliRun(code, out, err), code 0 for a run that returns. The handlers sample.main
    installs are put back by `signal_handlers`, as for any test."""
    import sample

    def run(argv):
        capsys.readouterr()
        try:
            sample.main([str(a) for a in argv])
            code = 0
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


# ----------------------------------------------------------------------------------------------------------------
# The command line, in a process of its own: real signals to a process group, as a terminal sends Ctrl-C


def signal_at(argv, ready, sig, times=1, timeout=180):
    """Run `python ARGV` (in the repository) in a process group of its own; at the first stderr line for which
    ready(line) holds (a string: a line that starts with it), send the group `sig`, `times` times. Returns
    (exit code, every stderr line). A line, not a sleep, says when: the signal lands where the test means on a machine
    of any speed, and no sooner than needed. Past `timeout` s (start-up included) the group is killed and the test
    fails, so a run that never prints the line, or never stops, cannot hang the suite."""
    def is_ready(line):
        return ready(line) if callable(ready) else line.startswith(ready)

    p = subprocess.Popen([sys.executable] + [str(a) for a in argv], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    expired = []

    def expire():
        expired.append(True)
        kill_group(p)
    watchdog = threading.Timer(timeout, expire)
    watchdog.start()
    lines, sent = [], False
    try:
        for line in p.stderr:
            lines.append(line)
            if is_ready(line):
                for _ in range(times):
                    os.killpg(p.pid, sig)
                sent = True
                break
        lines += p.stderr.readlines()  # to the end: the child's last words, after the signal
        code = p.wait()
    finally:
        watchdog.cancel()
        kill_group(p)  # only if the test itself was interrupted (a failure, Ctrl-C): no child outlives it
        p.stderr.close()
    assert not expired, f"killed after {timeout} s; its last lines: {lines[-5:]}"
    assert sent, f"the line to signal at never came; the run ended with {code}: {lines[-5:]}"
    return code, lines


def kill_group(p):
    """SIGKILL to p's process group while p has not been waited for: once it has, its number may be another's."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
