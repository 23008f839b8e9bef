"""SkyReels-V2: checkpoint loading and the generation loops.

Loading is name alignment: our modules use the official parameter names, so a component is built on the meta
device (no memory), and each tensor is read from its safetensors shard, cast and placed as it is read, and
assigned in place. A 28 GB bf16 transformer therefore never exists twice in memory.
"""
import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import tempfile

import imageio.v2 as imageio
import numpy as np
import sentencepiece
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError, safe_open

import model
import schedule
import text
import vae


class CheckpointError(Exception):
    """A checkpoint that cannot be used. The message is one line and names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loading


def read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, or not JSON
        raise CheckpointError(f"cannot read {path} ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is valid JSON but not an object ({{...}})")
    return data


def read_config(cls, path):
    """Config dataclass `cls` from `path`, each value of its field's type (its default's; if None, int or null)."""
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


def weight_files(folder):
    """{tensor name: shard path} for a component folder: a sharded index, or a single safetensors file."""
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


def weights_bytes(folder, dtype):
    """The bytes a component's weights take in `dtype`, from the safetensors headers alone (no tensor is read)."""
    numel = 0
    for path in set(weight_files(folder).values()):
        with _open(path) as f:
            numel += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return numel * torch.finfo(dtype).bits // 8


def _open(path):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:  # missing, or not a (complete) safetensors file
        raise CheckpointError(f"cannot read {path} as safetensors ({e})") from None


def param_dtype(module, name, dtype):
    return torch.float32 if any(s in name for s in getattr(module, "keep_fp32", ())) else dtype


def place(module, device, dtype):
    """Move and cast a module built in memory as loading would have: keep_fp32 parameters stay float32."""
    for name, p in module.named_parameters():
        p.data = p.data.to(device, param_dtype(module, name, dtype))
    return module


def load_component(cls, config_cls, folder, dtype=torch.float32, device="cpu", single_file=None):
    """A component (model.DiT, model.CLIPVision, vae.VAE, text.UMT5Encoder) sized by `folder`'s config.json and
    filled from its safetensors, strictly, or from `single_file`, one .safetensors DiT in our or the original naming."""
    cfg = read_config(config_cls, os.path.join(folder, "config.json"))
    with torch.device("meta"):
        module = cls(cfg)
    if single_file is None:
        return load_weights(module, folder, weight_files(folder), dtype, device).eval()
    with _open(single_file) as f:
        names, keys = dit_names(module), list(f.keys())
    aliases = {k: names.get(canonical(k), k) for k in keys}  # to our naming, whichever the file's
    return load_weights(module, single_file, dict.fromkeys(keys, single_file), dtype, device, aliases).eval()


def load_weights(module, where, files, dtype, device, aliases=None):
    """Fill `module` from `files` ({checkpoint key: safetensors path}), strictly; `where` names them in errors.
    A module may declare checkpoint_aliases ({checkpoint key: our key}, used only where our key is not in the
    checkpoint: UMT5 files tie shared.weight and encoder.embed_tokens.weight either way), ignored_keys (checkpoint
    keys, or prefixes ending in '.', known and unused) and keep_fp32 (see param_dtype)."""
    expected = module.state_dict(keep_vars=True)
    aliases = aliases or getattr(module, "checkpoint_aliases", {})
    ignored = tuple(getattr(module, "ignored_keys", ()))
    plan = {}  # our key -> checkpoint key
    for key in files:
        ours = aliases.get(key, key)
        if ours in expected and (ours not in plan or key == ours):
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
                t = _tensor(f, path, key)
                if tuple(t.shape) != tuple(expected[ours].shape):
                    raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, but config.json implies "
                                          f"{tuple(expected[ours].shape)}")
                if t.is_floating_point() != expected[ours].is_floating_point():
                    raise CheckpointError(f"{path}: {key} is {t.dtype}, but {expected[ours].dtype} belongs there")
                state[ours] = t.to(device, param_dtype(module, ours, dtype) if t.is_floating_point() else t.dtype)
        module.load_state_dict(state, strict=False, assign=True)
    return module


def _tensor(f, path, key):
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError) as e:  # a key the index promised but the file lacks, or a truncated file
        raise CheckpointError(f"cannot read {key} from {path} ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# The original Wan 2.1 / SkyReels-V2 naming (also ComfyUI's, and most shared LoRAs'), for whole DiT files and LoRAs

# Original name -> ours (diffusers'): at the top level by name prefix, inside blocks.N segment by segment.
CE = "condition_embedder."
WAN_TOP = {
    "head.head": "proj_out", "head.modulation": "scale_shift_table", "time_projection.1": CE + "time_proj",
    "text_embedding.0": CE + "text_embedder.linear_1", "text_embedding.2": CE + "text_embedder.linear_2",
    "time_embedding.0": CE + "time_embedder.linear_1", "time_embedding.2": CE + "time_embedder.linear_2",
    "img_emb.proj.0": CE + "image_embedder.norm1", "img_emb.proj.1": CE + "image_embedder.ff.net.0.proj",
    "img_emb.proj.3": CE + "image_embedder.ff.net.2", "img_emb.proj.4": CE + "image_embedder.norm2",
    "img_emb.emb_pos": CE + "image_embedder.pos_embed",
    "fps_projection.0": "fps_projection.net.0.proj", "fps_projection.2": "fps_projection.net.2",
}
WAN_BLOCK = {
    "self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0",
    "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_k_img": "norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table",
    "norm3": "norm2",  # the original's norm3 is the cross-attention norm; its norm2 (the FFN's) has no weights
}
PREFIX = re.compile(r"^(model\.diffusion_model\.|diffusion_model\.|transformer\.|base_model\.model\.|lora_unet_)")


def wan_name(name):
    """Our DiT parameter name in the original naming."""
    table = WAN_BLOCK if name.startswith("blocks.") else WAN_TOP
    ours = {v: k for k, v in table.items()}
    segments = "|".join(map(re.escape, ours))
    start = r"(?<![^.])" if table is WAN_BLOCK else "^"  # whole dotted segments; top-level names from the start
    return re.sub(rf"{start}({segments})(?![^.])", lambda m: ours[m[1]], name)


def canonical(key):
    """A key without its prefix, '.' made '_': where ours, the original's and kohya's (lora_unet_blocks_0_...) meet."""
    return PREFIX.sub("", key).replace(".", "_")


def dit_names(dit):
    """{canonical name: our parameter name} in our naming and the original's (they never give a name two meanings)."""
    return {canonical(name): k for k in dit.state_dict() for name in (wan_name(k), k)}


# ----------------------------------------------------------------------------------------------------------------
# LoRA: low-rank weight deltas, folded into the DiT's weights once

# A LoRA key is <module>.<part>, the module in any naming (dit_names): diffusers/PEFT transformer.blocks.0.attn1.to_q,
# original Wan / ComfyUI diffusion_model.blocks.0.self_attn.q, kohya / musubi-tuner lora_unet_blocks_0_self_attn_q.
LORA_PARTS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
              "alpha": "alpha", "diff": "diff", "diff_b": "diff", "lora_B.bias": "diff"}
BIAS_PARTS = ("diff_b", "lora_B.bias")  # deltas of the module's bias; the other parts are of its weight
LORA_KEY = re.compile(rf"(.+)\.({'|'.join(re.escape(p) for p in LORA_PARTS)})$")


def read_lora(path, dit):
    """[(our parameter name, coefficient, up, down)] of a LoRA file: its delta at scale 1 is coefficient * up @ down
    (alpha / rank; alpha: the pair's, the PEFT adapter's lora_alpha, or the rank), or up alone for a full delta (.diff,
    .diff_b, lora_B.bias; down None). A key that matches no parameter or does not fit its shape is a CheckpointError."""
    names, params = dit_names(dit), dict(dit.named_parameters())
    with _open(path) as f:
        tensors = {k: _tensor(f, path, k) for k in f.keys()}
        peft = {k.removeprefix("transformer."): v for k, v in json.loads(  # the adapter config diffusers saves
            (f.metadata() or {}).get("lora_adapter_metadata", "{}")).items()}
    if peft.get("alpha_pattern") or peft.get("use_rslora") or peft.get("use_dora"):
        raise CheckpointError(f"{path}: PEFT alpha_pattern, rSLoRA and DoRA adapters are not supported")
    parts = {}  # our parameter name -> {part: (key, tensor)}
    for key, t in tensors.items():
        m = LORA_KEY.match(key)
        ours = m and names.get(canonical(m[1]) + ("_bias" if m[2] in BIAS_PARTS else "_weight"))
        if ours is None:
            raise CheckpointError(f"{path}: {key} matches no weight of this transformer")
        parts.setdefault(ours, {})[LORA_PARTS[m[2]]] = (key, t)
    terms = []
    for ours, got in parts.items():
        shape = tuple(params[ours].shape)
        if ("down" in got) != ("up" in got) or ("alpha" in got and "down" not in got):
            raise CheckpointError(f"{path}: {next(iter(got.values()))[0]} has no matching lora_down/lora_up pair")
        rank = got["down"][1].shape[0] if "down" in got else 0
        # down (rank, in, *kernel), up (out, rank, 1, ...): convolutions too, as kohya writes them
        want = dict(down=(rank,) + shape[1:], up=(shape[0], rank) + (1,) * (len(shape) - 2), alpha=(), diff=shape)
        for part, (key, t) in got.items():
            if tuple(t.shape) != want[part]:
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, which does not fit {ours} "
                                      f"{shape} (a LoRA for another model?)")
        if "diff" in got:
            terms.append((ours, 1.0, got["diff"][1], None))
        if rank:
            alpha = float(got["alpha"][1]) if "alpha" in got else float(peft.get("lora_alpha", rank))
            terms.append((ours, alpha / rank, got["up"][1], got["down"][1]))
    return terms


def fold_loras(pipe, loras):
    """W += sum of scale * delta over [(path, scale), ...], in float32 on W's device, rounded once to W's dtype, after
    every file is read and checked. A weight's original is kept on the CPU (pipe.lora_originals) the first time a
    LoRA touches it, so that unload_loras restores it exactly: in bf16, W + d - d is not W."""
    terms = {}
    for path, scale in loras:
        for name, coefficient, up, down in read_lora(path, pipe.transformer):
            terms.setdefault(name, []).append((scale * coefficient, up, down))
    pipe.on_device(None)  # offload: every parameter back in its home copy
    for name, group in terms.items():
        p = pipe.transformer.get_parameter(name)
        delta = torch.zeros(p.shape, device=p.device)
        for coefficient, up, down in group:
            up = up.to(p.device, torch.float32)
            delta += coefficient * (up if down is None else (up.flatten(1) @ down.to(up).flatten(1)).view(p.shape))
        pipe.lora_originals.setdefault(name, p.data.to("cpu", copy=True))
        p.data.copy_(p.data.float() + delta)


# ----------------------------------------------------------------------------------------------------------------
# The pipeline: components, defaults, inputs

KINDS = {"SkyReelsV2Pipeline": "t2v", "SkyReelsV2ImageToVideoPipeline": "i2v",
         "SkyReelsV2DiffusionForcingPipeline": "df"}
# The seed's recommendations per mode: (steps, guidance scale, flow shift).
DEFAULTS = {"t2v": (50, 6.0, 8.0), "i2v": (50, 5.0, 5.0), "df": (30, 6.0, 8.0), "df-i2v": (30, 5.0, 5.0),
            "v2v": (30, 5.0, 5.0)}
TEMPORAL, SPATIAL = 4, 8  # the Wan VAE's compression


def latent_frames(num_frames):  # the VAE keeps the first frame alone and packs each next 4 into one latent frame
    return (num_frames - 1) // TEMPORAL + 1


def kind_of(path):
    """'t2v', 'i2v' or 'df', from model_index.json's _class_name (or a tiny-* name), without loading weights."""
    if path in ("tiny-t2v", "tiny-i2v", "tiny-df"):
        return path[5:]
    name = read_json(os.path.join(path, "model_index.json")).get("_class_name")
    if name not in KINDS:
        raise CheckpointError(f"{path}/model_index.json names {name}, not a SkyReels-V2 pipeline ({', '.join(KINDS)})")
    return KINDS[name]


def load(path, device=None, dtype=torch.bfloat16, offload=False, vae_dtype=torch.float32, compile=False, loras=(),
         transformer=None):
    """A ready pipeline from an official -Diffusers folder (or a Hugging Face id, or tiny-t2v/i2v/df). loras: [(path,
    scale), ...] (fold_loras). transformer: a one-file DiT (ours or the original naming) for the folder's weights.
    compile: torch.compile the DiT's blocks, ~20% faster on an H100 and half the activation memory (fused elementwise
    work), after ~10-30 s per new latent shape. Under torchrun every rank calls this alike, each with its own device
    (e.g. cuda:LOCAL_RANK), and the ranks share the DiT's work (split_ranks)."""
    for file in ([transformer] if transformer else []) + [lora for lora, _ in loras]:  # at the door, not after loading
        if not os.path.isfile(file):
            raise CheckpointError(f"no such file: {file}")
    device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = tiny_pipeline(path, device, dtype) if path.startswith("tiny-") else \
        load_folder(path, device, dtype, offload, vae_dtype, transformer)
    fold_loras(pipe, loras)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        pipe.parallel, pipe.cfg_parallel = split_ranks()
    if device.type == "cuda":
        use_flash_attention_4(device)
    if compile:
        for block in pipe.transformer.blocks.children():
            block.compile()
    return pipe


def use_flash_attention_4(device):
    """The DiT's attention through flash-attn-4 (an optional extra, `pip install flash-attn-4`) on Hopper and
    Blackwell GPUs, where it is 1.2x faster than cuDNN's; one line says why not when it is not installed."""
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001  not installed, or installed without its CUDA libraries
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"note: attention runs on PyTorch SDPA; flash-attn-4 would be faster ({type(e).__name__}: {e})",
                  file=sys.stderr)
        return
    model.FLASH = flash_attn_func


def check_device(device):
    """A torch.device this machine has, or one ValueError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not (device.index or 0) < torch.cuda.device_count():
        raise ValueError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA devices; use cpu")
    return device


def rope_limit(path):  # the DiT's rotary table length per axis, without its weights
    config = os.path.join(path, "transformer", "config.json")
    dit = model.CONFIGS["tiny"] if path.startswith("tiny-") else read_config(model.DiTConfig, config)
    return dit.rope_max_seq_len


def load_folder(path, device, dtype, offload, vae_dtype, transformer_file=None):
    if not os.path.isdir(path):
        path = download(path)
    kind = kind_of(path)
    home = torch.device("cpu") if offload else device  # offloaded components wait on the CPU
    sub = lambda name: os.path.join(path, name)  # noqa: E731
    if device.type == "cuda" and not offload:  # say so now, not as an out-of-memory error after minutes of loading
        need = sum(weights_bytes(sub(c), dtype) for c in ("text_encoder", "transformer", "image_encoder")
                   if os.path.isdir(sub(c)))
        have = torch.cuda.get_device_properties(device).total_memory
        if need > 0.9 * have:
            raise ValueError(f"{path} takes {need / 2**30:.1f} GiB in {str(dtype)[6:]} and {device} has "
                             f"{have / 2**30:.1f} GiB: pass --offload (load(..., offload=True))")
    spiece = sub("tokenizer/spiece.model")
    if not os.path.isfile(spiece):
        raise CheckpointError(f"missing file: {spiece}")
    try:
        tokenizer = text.Tokenizer(spiece)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{spiece} is not a sentencepiece model ({str(e).splitlines()[0]})") from None
    clip = preprocess = None
    if kind == "i2v":
        clip = load_component(model.CLIPVision, model.CLIPVisionConfig, sub("image_encoder"), dtype, home)
        preprocess = read_json(sub("image_processor/preprocessor_config.json"))
        if not isinstance(preprocess.get("size"), dict) or not isinstance(preprocess.get("crop_size"), dict):
            raise CheckpointError(f"{sub('image_processor/preprocessor_config.json')} lacks size or crop_size")
    return Pipeline(kind, tokenizer,
                    load_component(text.UMT5Encoder, text.UMT5Config, sub("text_encoder"), dtype, home),
                    load_component(model.DiT, model.DiTConfig, sub("transformer"), dtype, home, transformer_file),
                    load_component(vae.VAE, vae.VAEConfig, sub("vae"), vae_dtype, home), clip, preprocess, device,
                    offload)


def download(name):
    """A Hugging Face id's local snapshot. A name that is not owner/name (a path, say) is a folder not found."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name):
        hint = "Skywork/" + os.path.basename(name) if "SkyReels-V2" in name else "OWNER/NAME"
        raise CheckpointError(f"no model folder at {name} (to download one: `pip install huggingface_hub`, then "
                              f"`hf download {hint} --local-dir {hint.split('/')[1]}`)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name)
    except Exception as e:  # huggingface_hub not installed, offline, no such repo, no access, disk full, ...
        raise CheckpointError(f"could not download {name} from the Hugging Face hub ({type(e).__name__}): check the "
                              f"id and the network, or `hf download {name} --local-dir DIR` and pass DIR") from None


TINY_CORPUS = ["A cat and a dog baking a cake together in a kitchen.", "The camera follows a small blue bird upward.",
               "一只猫和一只狗在厨房里一起烤蛋糕。", "Le chat et le chien préparent un gâteau.", "Bright colors, static."]


def tiny_pipeline(name, device, dtype):
    """tiny-t2v / tiny-i2v / tiny-df: random-weight tiny models built in memory, for a download-free smoke run and for
    stepping through the algorithm in a debugger. Their videos are noise."""
    kind = name[5:]
    spiece = os.path.join(tempfile.mkdtemp(), "spiece.model")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 4), model_prefix=spiece[:-6], vocab_size=200, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    torch.manual_seed(0)
    dit = model.CONFIGS["tiny"]
    clip = preprocess = None
    if kind == "i2v":
        clip_cfg = model.CLIP_CONFIGS["tiny"]
        dit = dataclasses.replace(dit, in_channels=36, image_dim=clip_cfg.hidden_size, added_kv_proj_dim=dit.dim)
        clip = place(model.CLIPVision(clip_cfg), device, dtype).eval()
        preprocess = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=3,
                          rescale_factor=1 / 255, image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711])
    if kind == "df":
        dit = dataclasses.replace(dit, inject_sample_info=True)
    return Pipeline(kind, text.Tokenizer(spiece),
                    place(text.UMT5Encoder(text.CONFIGS["tiny"]), device, dtype).eval(),
                    place(model.DiT(dit), device, dtype).eval(), vae.VAE(vae.CONFIGS["tiny"]).to(device).eval(),
                    clip, preprocess, device, False)


def to_pil(image, what):
    """A PIL RGB image from a PIL image, a path, or an (H, W, 3) array: uint8, or float in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:  # PIL refuses decompression bombs (over 179 Mpixels) here
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read {what} {image}: {str(e).splitlines()[0]}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and \
            (image.dtype == np.uint8 or image.dtype.kind == "f" and np.isfinite(image).all()):
        return Image.fromarray(image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round()
                               .astype(np.uint8))
    raise ValueError(f"{what} must be a PIL image, a file path, or an (H, W, 3) uint8 or finite float array; got "
                     f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))} {getattr(image, 'dtype', '')}")


def read_video(video):
    """A list of PIL frames from a video file or a list (or array) of frames."""
    if isinstance(video, (str, os.PathLike)):
        try:
            video = imageio.mimread(video, memtest=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot read video {video}: {str(e).splitlines()[0]}") from None
    if not hasattr(video, "__len__") or len(video) == 0:
        raise ValueError(f"video must be a file path or a non-empty list of frames, got {type(video).__name__}")
    return [to_pil(f, "a video frame") for f in video]


def pixels(images, height, width):
    """PIL images -> (1, 3, F, H, W) float32 in [-1, 1], resized as diffusers' VideoProcessor does (Lanczos)."""
    arrays = [np.asarray(im.resize((width, height), resample=Image.LANCZOS), dtype=np.float32) / 255.0 for im in images]
    return (2.0 * torch.from_numpy(np.stack(arrays)) - 1.0).permute(3, 0, 1, 2)[None]  # (1, 3, F, H, W)


def to_frames(video):
    """(1, 3, F, H, W) in [-1, 1] -> float32 numpy (F, H, W, 3) in [0, 1], as diffusers' output_type="np"."""
    return (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float().cpu().numpy()


class StreamedBlocks(torch.nn.ModuleList):
    """--offload for the DiT: its blocks wait in pinned host memory and are copied to the GPU in turn, each copy (on a
    side CUDA stream) overlapping the compute of the block before, so the GPU holds two blocks instead of the model
    (a 14B block is 0.67 GB). Iterating yields each block with its parameters on the GPU: DiT.forward is unchanged."""

    def __init__(self, blocks, device):
        super().__init__(blocks)
        self.cuda = device.type == "cuda"
        self.host = [[p.data.pin_memory() if self.cuda else p.data for p in b.parameters()] for b in blocks]
        self.slots = [[torch.empty_like(t, device=device) for t in self.host[0]] for _ in range(2)]  # every block's
        self.ready = [None, None]  # parameters have the same shapes: two slots, used by turns
        self.copier = torch.cuda.Stream(device) if self.cuda else None
        for block, host in zip(blocks, self.host):
            for p, data in zip(block.parameters(), host):
                p.data = data

    def fetch(self, i):
        """Start copying block i into its slot, once the block that used the slot before (i - 2) has finished."""
        if self.cuda:
            self.copier.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copier):  # no side stream on the CPU (None): a plain copy
            for slot, data in zip(self.slots[i % 2], self.host[i]):
                slot.copy_(data, non_blocking=self.cuda)
        if self.cuda:
            self.ready[i % 2] = self.copier.record_event()

    def __iter__(self):
        blocks = list(self.children())
        self.fetch(0)
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):  # the next block's copy overlaps this block's compute
                self.fetch(i + 1)
            if self.cuda:
                torch.cuda.current_stream().wait_event(self.ready[i % 2])
            for p, slot in zip(block.parameters(), self.slots[i % 2]):
                p.data = slot
            yield block  # the caller runs it: its kernels are queued before we go on
            for p, data in zip(block.parameters(), self.host[i]):
                p.data = data


def resident(module):
    """The parameters that --offload moves to the GPU for a component's turn: all but streamed DiT blocks'."""
    streamed = {id(p) for m in module.modules() if isinstance(m, StreamedBlocks) for p in m.parameters()}
    return [p for p in module.parameters() if id(p) not in streamed]


# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun) share the DiT's work. The text encoder, CLIP and the VAE run on every rank: the same
# inputs give the same results everywhere, so nothing needs broadcasting, and they are a small part of a run.


def split_ranks():
    """(SequenceParallel over every rank, CFG parallelism) for the default process group. CFG parallelism, on an even
    number of ranks: (this half's SequenceParallel, None if one rank; the group of this rank and its twin in the
    other half; 0 if this half makes the conditional pass, 1 the unconditional one), else None."""
    n, rank = dist.get_world_size(), dist.get_rank()
    if n % 2:
        return model.SequenceParallel(dist.group.WORLD), None
    halves = [dist.new_group(list(range(k * n // 2, (k + 1) * n // 2))) for k in (0, 1)]  # every rank makes
    pairs = [dist.new_group([r, r + n // 2]) for r in range(n // 2)]  # every group, as new_group needs
    half = model.SequenceParallel(halves[rank // (n // 2)]) if n > 2 else None
    return model.SequenceParallel(dist.group.WORLD), (half, pairs[rank % (n // 2)], rank // (n // 2))


def check_ranks_agree(settings, device):
    """Ranks that disagree on a seed, a size or an input compute a garbled video together: compare a digest of the
    settings before any work (after their checks, which stop every rank alike), and stop every rank alike."""
    if settings["addnoise_condition"] > 0:  # re-noising draws from the device's global RNG
        settings["rng"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    h = hashlib.sha256()
    for value in settings.values():
        for v in value if isinstance(value, list) else [value]:  # a list: video frames
            v = v.get_state() if isinstance(v, torch.Generator) else v
            h.update(v.cpu().numpy().tobytes() if torch.is_tensor(v) else v.tobytes() if hasattr(v, "tobytes")  # PIL
                     else repr(v).encode())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, h.hexdigest())
    differ = [rank for rank, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"ranks {differ} were given other settings, inputs or random state than rank 0")


# Integer settings: the least and the most each may be. Python or numpy ints, never floats or bools.
INTEGERS = dict(height=(16, math.inf), width=(16, math.inf), num_frames=(1, math.inf), fps=(1, math.inf),
                num_inference_steps=(1, 1000), seed=(0, 2**64 - 1), ar_step=(0, math.inf),
                causal_block_size=(1, math.inf), base_num_frames=(1, math.inf), overlap_history=(1, math.inf),
                max_sequence_length=(1, math.inf))
MAX_TOKENS = 2**20  # a window's tokens: 9x a 720P window's (31x45x80), about what one 80 GB GPU can attend over


def check_settings(kind, rope_max_seq_len, settings):
    """Pipeline.stream's arguments (a dict; stream's defaults for those missing, other keys ignored), checked before
    any work for a `kind` checkpoint whose rotary table covers `rope_max_seq_len` positions a side: one ValueError
    naming the argument, or the settings normalised (mode and defaults filled in, num_frames 1 + 4k, media as PIL)."""
    s = {k: settings.get(k, p.default) for k, p in inspect.signature(Pipeline.stream).parameters.items() if k != "self"}
    image, last_image, video = s["image"], s["last_image"], s["video"]
    mode = kind if kind != "df" else "df-i2v" if image is not None else "v2v" if video is not None else "df"
    if image is None and (kind == "i2v" or last_image is not None):
        raise ValueError("an I2V checkpoint, and last_image, need image (the first frame)")
    if image is not None and (kind == "t2v" or video is not None) or video is not None and kind != "df":
        takes = {"t2v": "no image or video", "i2v": "an image, no video", "df": "an image or a video, not both"}
        raise ValueError(f"a {kind.upper()} checkpoint takes {takes[kind]}")
    defaults = dict(zip(("num_inference_steps", "guidance_scale", "shift"), DEFAULTS[mode]), causal_block_size=1)
    s.update({k: v for k, v in defaults.items() if s[k] is None}, mode=mode)
    for name, (low, high) in INTEGERS.items():
        v = s[name]
        if (v is not None or name not in ("seed", "overlap_history")) and (
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or not low <= v <= high):
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {v!r}")
        s[name] = None if v is None else int(v)
    for name in ("guidance_scale", "shift", "addnoise_condition"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf or not v and name == "shift":
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'shift' else '>= 0'}, got {v!r}")
        s[name] = float(v)
    if s["height"] % 16 or s["width"] % 16:
        raise ValueError(f"height and width must be multiples of 16, got {s['height']}x{s['width']}")
    for name in ("prompt", "negative_prompt"):
        if not isinstance(s[name], str) or s[name] != s[name].encode("utf-8", "replace").decode():
            raise ValueError(f"{name} must be a string of valid text (no lone surrogates), got {s[name]!r:.80}")
    if s["output_type"] not in ("np", "latent"):
        raise ValueError(f"output_type must be 'np' or 'latent', got {s['output_type']!r}")
    if not isinstance(s["generator"], (torch.Generator, type(None))) or \
            s["progress"] is not None and not callable(s["progress"]):
        raise ValueError("generator must be a torch.Generator and progress a function progress(step, total)")
    s.update({name: to_pil(s[name], name) for name in ("image", "last_image") if s[name] is not None})
    s["video"] = None if video is None else read_video(video)
    # Enough frames for the mode, windows that overlap less than they hold, a token grid the model can take.
    asked, base, overlap = s["num_frames"], s["base_num_frames"], s["overlap_history"]
    n = s["num_frames"] = (asked - 1) // TEMPORAL * TEMPORAL + 1  # rounded down to 1 + 4k, as diffusers does
    if (mode == "df-i2v" or last_image is not None) and n <= TEMPORAL:
        raise ValueError(f"num_frames must be at least 5 with an image (it takes a latent frame of 4), got {asked}")
    if mode == "v2v" and overlap is None:
        raise ValueError("video extension needs overlap_history (e.g. 17): the input frames the new ones continue")
    if kind == "df" and n > base and overlap is None:
        raise ValueError(f"num_frames ({n}) is above base_num_frames ({base}): set overlap_history (17 or 37) to "
                         f"make the video window by window")
    if kind == "df" and overlap is not None and latent_frames(overlap) >= latent_frames(base):
        raise ValueError(f"overlap_history must be at most {(latent_frames(base) - 1) * TEMPORAL} with "
                         f"base_num_frames {base} (each window adds a latent frame of 4 or more), got {overlap}")
    if mode == "v2v" and not (overlap <= len(s["video"]) and overlap < n):
        raise ValueError(f"overlap_history ({overlap}) must be at most the video's {len(s['video'])} frames and below "
                         f"num_frames ({n}), which counts the overlap_history input frames the new ones continue")
    f = latent_frames(min(n, base)) + (last_image is not None) if kind == "df" else latent_frames(n)
    grid = (f, s["height"] // SPATIAL // 2, s["width"] // SPATIAL // 2)  # the DiT's tokens: 1x2x2 latent patches
    if max(grid) > rope_max_seq_len or math.prod(grid) > MAX_TOKENS:
        raise ValueError(f"height {s['height']} and width {s['width']} make a {'x'.join(map(str, grid))} token grid a "
                         f"window, beyond rope_max_seq_len {rope_max_seq_len} or {MAX_TOKENS} tokens: choose less")
    if kind == "df":  # each window a whole number of causal blocks: planning says so, before the weights are read
        plan_windows(mode, n, base, overlap, s["causal_block_size"], s["ar_step"],
                     schedule.timesteps(s["num_inference_steps"], s["shift"])[0], last_image is not None)
    return s


class Pipeline:
    def __init__(self, kind, tokenizer, text_encoder, transformer, vae, clip, clip_preprocess, device, offload):
        self.shortcuts = True  # the exact async shortcuts (run_diffusion_forcing); off: diffusers' full passes
        self.cache_budget = None  # bytes for the shortcuts' key/value cache; None: what the GPU has free; 0: none
        self.on_cpu = {}  # offload: component -> its parameters' CPU tensors while it is on the GPU
        self.parallel = self.cfg_parallel = None  # several processes: split_ranks
        self.lora_originals = {}  # fold_loras: {DiT parameter name: its CPU original}
        self.kind, self.tokenizer, self.text_encoder, self.transformer = kind, tokenizer, text_encoder, transformer
        self.vae, self.clip, self.clip_preprocess, self.device, self.offload = vae, clip, clip_preprocess, device, offload
        for m in (text_encoder, transformer, vae, clip):  # inference only: no autograd graph keeps activations
            if m is not None:
                m.requires_grad_(False)
        if offload:  # UMT5-XXL's blocks too (11 GB in bf16)
            transformer.blocks = StreamedBlocks(transformer.blocks, device)
            text_encoder.encoder["block"] = StreamedBlocks(text_encoder.encoder["block"], device)

    def on_device(self, module):
        """With offload, only the component computing (None: none) is on the GPU. Its parameters go there for its
        turn; the others return to the CPU copies they left behind, so nothing is copied back."""
        if self.offload:
            for m in [m for m in self.on_cpu if m is not module]:
                for p, data in zip(resident(m), self.on_cpu.pop(m)):
                    p.data = data
            if module is not None and module not in self.on_cpu:
                self.on_cpu[module] = [p.data for p in resident(module)]
                for p in resident(module):
                    p.data = p.data.to(self.device)
        return module

    def load_lora(self, path, scale=1.0):
        """Fold a LoRA (diffusers/PEFT, original Wan / ComfyUI or kohya keys) into the DiT at `scale`; LoRAs add up."""
        fold_loras(self, [(path, scale)])

    def unload_loras(self):
        """The DiT's weights exactly as before the first LoRA."""
        for name in list(self.lora_originals):
            self.transformer.get_parameter(name).data.copy_(self.lora_originals.pop(name))

    def generate(self, prompt, negative_prompt="", image=None, last_image=None, video=None, height=544, width=960,
                 num_frames=97, num_inference_steps=None, guidance_scale=None, shift=None, generator=None, seed=None,
                 ar_step=0, causal_block_size=None, base_num_frames=97, overlap_history=None, addnoise_condition=0,
                 fps=24, max_sequence_length=512, output_type="np"):
        """float32 frames (F, H, W, 3) in [0, 1], or with output_type="latent" the final latents."""
        chunks = list(self.stream(**{k: v for k, v in locals().items() if k != "self"}))
        return torch.cat(chunks, dim=2) if output_type == "latent" else np.concatenate(chunks)

    def stream(self, prompt, negative_prompt="", image=None, last_image=None, video=None, height=544, width=960,
               num_frames=97, num_inference_steps=None, guidance_scale=None, shift=None, generator=None, seed=None,
               ar_step=0, causal_block_size=None, base_num_frames=97, overlap_history=None, addnoise_condition=0,
               fps=24, max_sequence_length=512, output_type="np", progress=None):
        """`generate` as an iterator of finished frame chunks (F_i, H, W, 3), window by window, so a long video can be
        written as it is made. Every setting is checked (check_settings) before this returns; `progress(step, total)`
        is called after each denoising step."""
        s = check_settings(self.kind, self.transformer.config.rope_max_seq_len,
                           {k: v for k, v in locals().items() if k != "self"})
        if s["generator"] is None and s["seed"] is not None:
            s["generator"] = torch.Generator().manual_seed(s["seed"])
        if self.parallel is not None:
            check_ranks_agree(dict(s, progress=None), self.device)
        ts, sigmas = schedule.timesteps(s["num_inference_steps"], s["shift"])
        images = [im for im in (s["image"], s["last_image"]) if im is not None]  # the first, and the last
        run = self.run_diffusion_forcing if self.kind == "df" else self.run_lockstep
        return run(s, images, ts, sigmas)

    # -- the pieces every mode shares -----------------------------------------------------------------------------

    def encode_text(self, prompt, negative_prompt, guidance, max_sequence_length):
        prompts = [prompt, negative_prompt] if guidance > 1 else [prompt]
        self.on_device(self.text_encoder)
        embeds = text.encode_prompts(self.tokenizer, self.text_encoder, prompts, max_sequence_length,
                                     self.device).to(self.transformer_dtype)
        return embeds[:1], embeds[1:] if guidance > 1 else None

    @property
    def transformer_dtype(self):  # the load dtype (its first parameter, scale_shift_table, is kept in float32)
        return self.transformer.patch_embedding.weight.dtype

    def noise(self, shape, generator):
        """Gaussian latents drawn as diffusers' randn_tensor draws them: on the generator's device, then moved."""
        where = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(self.device)

    def predict(self, x, t, context, negative, guidance, caches=(None, None), causal_block_size=1, keep=0, **kw):
        """The flow prediction, with classifier-free guidance when guidance > 1 (in the model's dtype, as diffusers).
        caches: the KVCaches of the conditional and the unconditional pass, which see different keys and values."""
        transformer = self.on_device(self.transformer)
        attention = model.AttentionContext(causal_block_size, caches[0], keep, self.parallel)
        if negative is None:
            return transformer(x, t, context, attention=attention, **kw)
        if self.cfg_parallel is not None:
            # Half the ranks make the conditional prediction, the other half the unconditional one, and each rank
            # swaps with its twin. A rank makes one pass, so caches[0] serves it, whichever pass it is.
            half, pair, index = self.cfg_parallel
            attention = dataclasses.replace(attention, parallel=half)
            mine = transformer(x, t, (context, negative)[index], attention=attention, **kw)
            v, u = torch.empty_like(mine), torch.empty_like(mine)
            dist.all_gather([v, u], mine, group=pair)
        else:
            v = transformer(x, t, context, attention=attention, **kw)
            u = transformer(x, t, negative, attention=dataclasses.replace(attention, cache=caches[1]), **kw)
        return u + guidance * (v - u)

    def encode_video(self, video):
        """(1, 3, F, H, W) pixels in [-1, 1] -> normalised latents (float32), as the pipelines feed the DiT."""
        vae = self.on_device(self.vae)
        dtype = next(vae.parameters()).dtype
        return vae.normalize(vae.encode(video.to(self.device, dtype)).float())

    def decoder(self, output_latent):
        """A function from finished latents (in order, any number at a time) to frames: the VAE carries its causal
        cache from piece to piece, so frames come out as soon as latents are final and match one whole decode."""
        if output_latent:
            return lambda z: z
        stream = self.vae.decoder_stream()

        def decode(z):  # a latent frame at a time: the GPU holds four frames of video, not a window's
            vae = self.on_device(self.vae)
            dtype = next(vae.parameters()).dtype
            return np.concatenate([to_frames(stream(vae.denormalize(frame.to(self.device, dtype))))
                                   for frame in z.split(1, dim=2)])
        return decode

    # -- text- and image-to-video: every latent frame at the same timestep -------------------------------------------

    def run_lockstep(self, s, images, ts, sigmas):
        context, negative = self.encode_text(s["prompt"], s["negative_prompt"], s["guidance_scale"],
                                             s["max_sequence_length"])
        image_context = None
        if self.kind == "i2v":  # neither draws random numbers: the noise is the same as without them
            image_context = self.encode_clip(images)
            condition = self.i2v_condition(images, s["num_frames"], s["height"], s["width"])
        num_latent = latent_frames(s["num_frames"])
        x = self.noise((1, 16, num_latent, s["height"] // SPATIAL, s["width"] // SPATIAL), s["generator"])
        state = schedule.unipc_init(sigmas, num_latent)
        every = torch.ones(num_latent, dtype=torch.bool)
        for i, t in enumerate(ts):
            inp = x if self.kind == "t2v" else torch.cat([x, condition], dim=1)
            v = self.predict(inp.to(self.transformer_dtype), t.expand(1).to(self.device), context, negative,
                             s["guidance_scale"], image_context=image_context)
            x = schedule.unipc_step(state, v, x, every)
            if s["progress"]:
                s["progress"](i, len(ts))
        yield self.decoder(s["output_type"] == "latent")(x)

    def encode_clip(self, images):
        clip = self.on_device(self.clip)
        pixels_ = torch.cat([model.clip_preprocess(im, self.clip_preprocess) for im in images])
        hidden = clip(pixels_.to(self.device, next(clip.parameters()).dtype))  # (N, 257, 1280)
        return hidden.reshape(1, -1, hidden.shape[-1]).to(self.transformer_dtype)  # first-last: both images' tokens

    def i2v_condition(self, images, num_frames, height, width):
        """The 20 conditioning channels of an I2V DiT: a 4-channel mask of the known frames (one channel per video
        frame a latent frame covers; the first latent covers one frame, repeated 4 times) and the latents of the
        video that is the first image, zeros, and the last image if given."""
        video = torch.zeros(1, 3, num_frames, height, width)
        video[:, :, [0, -1][:len(images)]] = pixels(images, height, width)
        latents = self.encode_video(video)
        mask = torch.zeros(1, TEMPORAL, *latents.shape[2:], device=self.device)  # (1, 4, F_lat, h, w)
        mask[:, :, 0] = 1
        if len(images) > 1:
            mask[:, -1, -1] = 1  # the last frame is the last latent frame's fourth
        return torch.cat([mask, latents], dim=1)

    # -- diffusion forcing: one loop for text-, image- and video-conditioned generation -------------------------------

    def run_diffusion_forcing(self, s, images, ts, sigmas):
        """Window by window (denoise_window): each window's first `prefix` latent frames are known (the image, the end
        of the input video, or the end of the previous window), the rest start as noise. Each window's new latents are
        final when it ends, so they are decoded and handed on at once."""
        context, negative = self.encode_text(s["prompt"], s["negative_prompt"], s["guidance_scale"],
                                             s["max_sequence_length"])
        decode = self.decoder(s["output_type"] == "latent")
        dtype, progress = self.transformer_dtype, s["progress"]
        known = end = None
        if s["mode"] == "df-i2v":  # the first (and last) image, encoded as one-frame videos
            cond = self.encode_video(torch.cat([pixels([im], s["height"], s["width"]) for im in images]))
            known, end = cond[:1], cond[1:]
        if s["mode"] == "v2v":
            video = pixels(s["video"], s["height"], s["width"])
            if s["output_type"] != "latent":  # the input first, as in diffusers (whose latents are the new ones only)
                yield to_frames(video)
            # The last overlap_history input frames, of which the VAE takes the first 1 + 4k.
            history = video[:, :, video.shape[2] - s["overlap_history"]:]
            known = self.encode_video(history[:, :, :(s["overlap_history"] - 1) // TEMPORAL * TEMPORAL + 1])
        windows = plan_windows(s["mode"], s["num_frames"], s["base_num_frames"], s["overlap_history"],
                               s["causal_block_size"], s["ar_step"], ts, len(images) > 1)
        done, total = 0, sum(len(w["matrix"]) for w in windows)  # steps, over all windows
        for w in windows:
            x = self.noise((1, 16, w["size"], s["height"] // SPATIAL, s["width"] // SPATIAL), s["generator"])
            p = w["prefix"]
            if p:
                x[:, :, :p] = known[:, :, :p].to(dtype)
            if w["end"]:
                x = torch.cat([x, end.to(dtype)], dim=2)
            x = self.denoise_window(x, w, context, negative, s["guidance_scale"], sigmas, s["causal_block_size"],
                                    s["addnoise_condition"], s["fps"],
                                    progress and (lambda i, d=done: progress(d + i, total)))
            done += len(w["matrix"])
            x = x[:, :, :w["size"]]  # without the last image's latent
            known = x[:, :, x.shape[2] - w["overlap"]:]  # the next window's prefix
            yield decode(x[:, :, w["new_from"]:])

    def denoise_window(self, x, w, context, negative, guidance, sigmas, block, addnoise_condition, fps, progress=None):
        """Diffusion forcing over one window: x (1, 16, F, h, w) float32 latents, its first w["prefix"] frames
        known, the rest noise; w's step matrix gives each frame its timestep at each iteration and its update mask
        the frames the per-frame solver moves; progress(i) after step i. Returns the denoised window."""
        dtype, p = self.transformer_dtype, w["prefix"]
        # diffusers and the original code step each frame on a view of the latents they then overwrite, so a
        # frame's second corrector starts from its new sample; reproduce that (schedule.py explains).
        state = schedule.unipc_init(sigmas, x.shape[2], alias_first_step=True)
        noised = addnoise_condition > 0 and p > 0
        # Exact shortcuts, with block-causal attention (causal blocks of block > 1 frames): blocks not started yet
        # cannot change the blocks before them and their prediction is unused, so they are left out; finished blocks
        # keep their keys and values in a cache. Re-noised known frames change every iteration: no cache then.
        shortcut = self.shortcuts and block > 1
        limit = self.cache_frames(x, block, negative is not None) if shortcut and not noised else 0
        layers = len(self.transformer.blocks)
        caches = (model.KVCache(layers, limit), model.KVCache(layers, limit)) if limit else (None, None)
        for i, (t, upd) in enumerate(zip(w["matrix"], w["update"])):
            lo, hi, keep = 0, x.shape[2], 0
            if shortcut:
                hi = -(-(int(upd.nonzero().max()) + 1) // block) * block
            if caches[0] is not None:  # leading frames that are final now join the cache in this pass
                lo = caches[0].frames
                keep = int(torch.cumprod(~upd[lo:hi], 0).sum()) // block * block
                keep = min(keep, limit - lo)  # past the budget, finished blocks are recomputed
            inp = x[:, :, lo:hi].to(dtype, copy=True)
            t = t[None, lo:hi].clone().to(self.device)
            if noised:
                # Known frames get a little fresh noise each iteration (and say so through their timestep):
                # it smooths the seam between windows. Drawn from the global RNG, as diffusers and the original.
                a = 0.001 * addnoise_condition
                inp[:, :, :p] = inp[:, :, :p] * (1.0 - a) + torch.randn_like(inp[:, :, :p]) * a
                t[:, :p] = addnoise_condition
            v = self.predict(inp, t, context, negative, guidance, caches, fps=fps, causal_block_size=block, keep=keep)
            v = torch.nn.functional.pad(v, (0, 0, 0, 0, lo, x.shape[2] - hi))  # frames left out: not updated now
            x = schedule.unipc_step(state, v, x, upd)
            if progress:
                progress(i)
        return x

    def cache_frames(self, x, block, guided):
        """How many latent frames of the window x the shortcuts may cache, in whole blocks: as many as fit
        `self.cache_budget` bytes. The default (None) is what the GPU has free less a forward's activations over the
        whole window and a margin, so the shortcuts fit wherever a run without them fits; 0 turns the cache off."""
        cfg, itemsize = self.transformer.config, torch.finfo(self.transformer_dtype).bits // 8
        tokens = x.shape[3] // cfg.patch_size[1] * x.shape[4] // cfg.patch_size[2]  # a latent frame's
        passes, sp = 1 + guided, self.parallel  # with several ranks, each caches its passes' heads only
        if guided and self.cfg_parallel:
            passes, sp = 1, self.cfg_parallel[0]
        heads = -(-cfg.num_attention_heads // (1 if sp is None else dist.get_world_size(sp.group)))
        per_frame = passes * cfg.num_layers * 2 * tokens * heads * cfg.attention_head_dim * itemsize  # K, V, layers
        budget = self.cache_budget
        if budget is None and self.device.type != "cuda":
            budget = per_frame * x.shape[2]
        elif budget is None:
            free = torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) \
                - torch.cuda.memory_allocated(self.device)
            # A forward's peak over its activations is below this (measured 0.6-0.7x at 1.3B and 14B, 540P).
            activations = x.shape[2] * tokens * (2 * cfg.ffn_dim + 10 * cfg.dim) * itemsize
            budget = free - activations - 2 * 2**30
        return min(x.shape[2], max(int(budget), 0) // per_frame) // block * block


def plan_windows(mode, num_frames, base_num_frames, overlap_history, block, ar_step, ts, has_last):
    """The windows of a diffusion-forcing run and their step matrices, for settings check_settings passed.

    A window holds at most base_num_frames frames. Later windows begin with the last `overlap_history` frames made
    so far (in latent frames, trimmed down to whole causal blocks): known frames the rest continues from. Video
    extension is the same with the input video as 'made so far'. Each window is its own base, so the step matrix's
    valid interval is always the whole window."""
    total, base = latent_frames(num_frames), latent_frames(base_num_frames)
    if overlap_history is not None and (num_frames > base_num_frames or mode == "v2v"):
        overlap = latent_frames(overlap_history)
        n = 2 + (total - base - 1) // (base - overlap)
        sizes = [min(total - k * (base - overlap), base) for k in range(n)]
    else:
        overlap, sizes = 0, [total]
    windows, matrices = [], {}  # a long video's windows are nearly all alike: one step matrix serves them
    for k, size in enumerate(sizes):
        # Known frames: the overlap, in whole blocks (v2v's first window too), or df-i2v's image latent.
        prefix = overlap - overlap % block if k > 0 or mode == "v2v" else int(mode == "df-i2v")
        end = int(has_last and k == len(sizes) - 1)
        frames = size + end
        if frames % block:
            raise ValueError(f"a window of {frames} latent frames is not a whole number of causal blocks of "
                             f"{block}; choose num_frames / base_num_frames / causal_block_size to fit")
        if (frames, prefix, end) not in matrices:
            matrix, update = schedule.step_matrix(frames, ts, ar_step, prefix, block)
            if end:  # the last image's latent is known from the start and never moves (as the original code)
                matrix[:, -1], update[:, -1] = 0, False
            matrices[frames, prefix, end] = matrix, update
        matrix, update = matrices[frames, prefix, end]
        windows.append(dict(size=size, prefix=prefix, end=end, matrix=matrix, update=update, overlap=overlap,
                            new_from=0 if k == 0 else overlap))
    return windows
