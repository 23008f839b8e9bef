"""The DiT and the CLIP vision tower against diffusers / transformers at the same (tiny, randomised) weights.

Parity tolerance: relative error ||ours - ref|| / ||ref|| <= 1e-5 in float32. Both sides run the same math in float32
(measured: 0 to 1.5e-7); the tolerance leaves room only for a different summation order (SDPA kernel, matmul shapes).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import CLIP_TOKENS, TINY_CLIP, TINY_TRANSFORMER, image

import model
import skyreels

FRAMES, H, W = 6, 4, 6  # latent frames and size: 2x3 tokens per frame
TEXT_LEN = 512  # diffusers splits its context into image and text tokens at 512


def load_transformer(folder, dtype=torch.bfloat16):
    return skyreels.load_component(model.DiT, model.DiTConfig, folder, dtype)


def load_clip(folder):
    return skyreels.load_component(model.CLIPVision, model.CLIPVisionConfig, folder)


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def diffusers_transformer(folder, dtype=torch.float32):
    """diffusers' SkyReelsV2Transformer3DModel at the checkpoint's weights, as from_pretrained(torch_dtype=dtype)
    builds it: parameters in dtype, except those its _keep_in_fp32_modules name (matched by dotted name component),
    which stay float32, as do the rope tables. (from_pretrained itself requires `accelerate` for a model with
    float32 modules, and the test environment has none.)"""
    from diffusers import SkyReelsV2Transformer3DModel as Ref
    from safetensors.torch import load_file

    ref = Ref.from_config(Ref.load_config(folder))
    keep = lambda name: any(m in name.split(".") for m in Ref._keep_in_fp32_modules)  # noqa: E731
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    ref.load_state_dict({k: v.to(torch.float32 if keep(k) else dtype) for k, v in state.items()}, assign=True)
    return ref.eval()


def inputs(in_channels, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, in_channels, frames, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)


def image_tokens(n_images, seed=1):
    """CLIP penultimate hidden states of n images, (n, CLIP_TOKENS, hidden), as the diffusers pipeline hands them."""
    return torch.randn(n_images, CLIP_TOKENS, TINY_CLIP["hidden_size"], generator=torch.Generator().manual_seed(seed))


PER_FRAME_T = torch.tensor([[999.0, 937.5, 875.0, 500.0, 250.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------------
# The DiT


def test_named_tiny_configs_match_the_harness():
    assert model.DiTConfig.from_config(TINY_TRANSFORMER) == model.CONFIGS["tiny"]
    assert model.CLIPVisionConfig.from_config(TINY_CLIP) == model.CLIP_CONFIGS["tiny"]


@torch.no_grad()
def test_t2v_one_timestep_per_sample_matches_diffusers(tiny_folders):
    """Oracle: diffusers' transformer, float32; tolerance 1e-5 relative."""
    folder = os.path.join(tiny_folders["t2v"], "transformer")
    x, context = inputs(16)
    t = torch.tensor([987.5])
    ref = diffusers_transformer(folder)(x, t, context, return_dict=False)[0]
    assert rel_err(load_transformer(folder, torch.float32)(x, t, context), ref) <= 1e-5


@pytest.mark.parametrize("fps", [16, 24], ids=["fps 16", "fps 24"])
@torch.no_grad()
def test_diffusion_forcing_per_frame_timesteps_and_fps_match_diffusers(tiny_folders, fps):
    """Oracle: diffusers with enable_diffusion_forcing=True and its fps index (16 -> 0, else 1, as its DF pipeline
    maps it); float32; tolerance 1e-5 relative."""
    folder = os.path.join(tiny_folders["df"], "transformer")
    x, context = inputs(16)
    ref = diffusers_transformer(folder)(x, PER_FRAME_T, context, enable_diffusion_forcing=True,
                                        fps=[0 if fps == 16 else 1], return_dict=False)[0]
    assert rel_err(load_transformer(folder, torch.float32)(x, PER_FRAME_T, context, fps=fps), ref) <= 1e-5


@pytest.mark.parametrize("block", [2, 3], ids=["blocks of 2", "blocks of 3"])
@torch.no_grad()
def test_block_causal_attention_matches_diffusers(tiny_folders, block):
    """Oracle: diffusers with _set_ar_attention(block) (a dense token mask); float32; tolerance 1e-5 relative."""
    folder = os.path.join(tiny_folders["df"], "transformer")
    x, context = inputs(16)
    ref_model = diffusers_transformer(folder)
    ref_model._set_ar_attention(block)
    ref = ref_model(x, PER_FRAME_T, context, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
    causal = model.AttentionContext(causal_blocks=(block,) * (FRAMES // block) + (FRAMES % block,) * (FRAMES % block > 0))
    ours = load_transformer(folder, torch.float32)(x, PER_FRAME_T, context, fps=24, attention=causal)
    assert rel_err(ours, ref) <= 1e-5


@torch.no_grad()
def test_i2v_image_tokens_match_diffusers(tiny_folders):
    """Oracle: diffusers with encoder_hidden_states_image; float32; tolerance 1e-5 relative."""
    folder = os.path.join(tiny_folders["i2v"], "transformer")
    x, context = inputs(36)
    t, image = torch.tensor([987.5]), image_tokens(1)
    ref = diffusers_transformer(folder)(x, t, context, encoder_hidden_states_image=image, return_dict=False)[0]
    ours = load_transformer(folder, torch.float32)(x, t, context, image_context=image)
    assert rel_err(ours, ref) <= 1e-5


@torch.no_grad()
def test_first_last_frame_takes_both_images_tokens_concatenated(tiny_folders):
    """Oracle: diffusers, which takes the two images as a batch of 2 (as its pipeline encodes [image, last_image])
    and folds them into one sequence of 2 x CLIP_TOKENS before its position table; ours takes that sequence.
    float32; tolerance 1e-5 relative."""
    folder = os.path.join(tiny_folders["flf2v"], "transformer")
    x, context = inputs(36)
    t, images = torch.tensor([987.5]), image_tokens(2)
    ref = diffusers_transformer(folder)(x, t, context, encoder_hidden_states_image=images, return_dict=False)[0]
    ours = load_transformer(folder, torch.float32)(x, t, context, image_context=images.reshape(1, -1, 32))
    assert rel_err(ours, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["df", "flf2v"])
@torch.no_grad()
def test_bfloat16_keeps_the_references_float32_islands_bit_for_bit(tiny_folders, kind):
    """Oracle: diffusers loaded in bfloat16 (its float32 modules kept). Same parameters in float32, and the same
    ops in the same dtypes, so the bfloat16 output is bit-identical. (Not so with causal blocks: per-block SDPA and
    diffusers' masked SDPA sum in different orders; their float32 parity is tested above.)"""
    folder = os.path.join(tiny_folders[kind], "transformer")
    ours, ref = load_transformer(folder, torch.bfloat16), diffusers_transformer(folder, torch.bfloat16)
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in ref.named_parameters()}
    x, context = inputs(ours.config.in_channels)
    x, context = x.bfloat16(), context.bfloat16()
    if kind == "df":
        a = ours(x, PER_FRAME_T, context, fps=24)
        b = ref(x, PER_FRAME_T, context, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
    else:
        images, t = image_tokens(2).bfloat16(), torch.tensor([987.5])
        a = ours(x, t, context, image_context=images.reshape(1, -1, 32))
        b = ref(x, t, context, encoder_hidden_states_image=images, return_dict=False)[0]
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@torch.no_grad()
def test_one_timestep_per_sample_equals_that_timestep_on_every_frame(tiny_folders):
    """Same math, different matmul shapes in the time embedding: tolerance 1e-6 relative."""
    dit = load_transformer(os.path.join(tiny_folders["df"], "transformer"), torch.float32)
    x, context = inputs(16)
    per_sample = dit(x, torch.tensor([500.0]), context, fps=16)
    assert rel_err(dit(x, torch.full((1, FRAMES), 500.0), context, fps=16), per_sample) <= 1e-6


# 5 frames: a trailing partial block (diffusers rejects it; we keep it a block)
@pytest.mark.parametrize("frames", [6, 5], ids=["whole blocks", "a trailing partial block"])
@torch.no_grad()
def test_block_causal_attention_hides_later_blocks(tiny_folders, frames):
    """Every op but self-attention is per token, so with blocks of 2 frames the output of frames 0-3 must not
    change when frames 4.. change, while without causal blocks it must."""
    dit = load_transformer(os.path.join(tiny_folders["df"], "transformer"), torch.float32)
    x, context = inputs(16, frames)
    t = PER_FRAME_T[:, :frames]
    y = x.clone()
    y[:, :, 4:] += 1.0
    blocks_of_2 = model.AttentionContext(causal_blocks=(2,) * (frames // 2) + (1,) * (frames % 2))
    a, b = dit(x, t, context, fps=24, attention=blocks_of_2), dit(y, t, context, fps=24, attention=blocks_of_2)
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    assert not torch.allclose(dit(x, t, context, fps=24)[:, :, :4], dit(y, t, context, fps=24)[:, :, :4])


def test_the_flash_attention_4_path_hands_the_kernel_tokens_first_and_returns_heads_first(monkeypatch):
    """flash-attn-4 takes (B, L, H, Dh); the model keeps (B, H, L, Dh). A stand-in kernel (SDPA, asserting its
    layout) checks the transposes both ways, on the CPU."""
    def kernel(q, k, v):
        assert q.shape == (1, 10, 3, 128) and k.shape == v.shape == (1, 7, 3, 128)
        return torch.nn.functional.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v))
                                                                ).transpose(1, 2), None
    monkeypatch.setattr(model, "FLASH", kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 3, 10, 128, generator=g), torch.randn(1, 3, 7, 128, generator=g), \
        torch.randn(1, 3, 7, 128, generator=g)
    assert torch.equal(model.flash_attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_flash_attention_4_is_taken_on_hopper_and_its_absence_is_one_line(monkeypatch, capsys):
    import sys
    import types

    monkeypatch.setattr(model, "FLASH", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    skyreels.use_flash_attention_4(torch.device("cuda"))  # an A100: not tried, nothing said
    assert model.FLASH is None and capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # not installed
    skyreels.use_flash_attention_4(torch.device("cuda"))
    err = capsys.readouterr().err
    assert model.FLASH is None and len(err.splitlines()) == 1 and "flash-attn-4" in err, err
    kernel = lambda q, k, v: None  # noqa: E731
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.SimpleNamespace(flash_attn_func=kernel))
    skyreels.use_flash_attention_4(torch.device("cuda"))
    assert model.FLASH is kernel and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------------
# The CLIP vision tower


@torch.no_grad()
def test_clip_penultimate_hidden_states_match_transformers(tiny_folders):
    """Oracle: transformers' CLIPVisionModelWithProjection, output_hidden_states=True, hidden_states[-2] (what the
    pipelines condition on); float32; tolerance 1e-5 relative."""
    from transformers import CLIPVisionModelWithProjection

    folder = os.path.join(tiny_folders["i2v"], "image_encoder")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = CLIPVisionModelWithProjection.from_pretrained(folder).eval()(pixels, output_hidden_states=True)
    assert rel_err(load_clip(folder)(pixels), ref.hidden_states[-2]) <= 1e-5


def test_clip_preprocess_matches_transformers_exactly(tiny_folders):
    """Oracle: transformers' CLIPImageProcessor (its PIL backend: torchvision is not installed). The same PIL
    resize and the same float64 rescale / float32 normalise, so the pixels are identical (tolerance 0)."""
    from transformers import CLIPImageProcessor

    folder = os.path.join(tiny_folders["i2v"], "image_processor")
    processor = CLIPImageProcessor.from_pretrained(folder)
    config = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    for seed, size in enumerate([(50, 37), (37, 50)]):  # non-square both ways: which side is shortest matters
        picture = image(seed, size)
        ref = processor(images=picture, return_tensors="pt").pixel_values
        assert torch.equal(model.clip_preprocess(picture, config), ref)
        assert torch.equal(model.clip_preprocess(np.asarray(picture), config), ref)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def test_tiny_folders_load_strictly(tiny_folders):
    for kind, path in tiny_folders.items():
        folder = os.path.join(path, "transformer")
        assert set(load_transformer(folder).state_dict()) == set(skyreels.weight_files(folder))
        if kind in ("i2v", "flf2v"):
            folder = os.path.join(path, "image_encoder")
            clip, ckpt = load_clip(folder), set(skyreels.weight_files(folder))
            assert set(clip.state_dict()) <= ckpt  # the rest: the layer after the penultimate, and the heads
            last = ("vision_model.encoder.layers.2.", "vision_model.post_layernorm.", "visual_projection.")
            assert all(k.startswith(last) for k in ckpt - set(clip.state_dict()))


def test_config_that_disagrees_with_the_tensors_is_a_checkpoint_error(tiny_folders, tmp_path):
    folder = shutil.copytree(os.path.join(tiny_folders["t2v"], "transformer"), tmp_path / "transformer")
    config = json.load(open(folder / "config.json"))
    json.dump(dict(config, ffn_dim=64), open(folder / "config.json", "w"))
    with pytest.raises(skyreels.CheckpointError) as e:
        load_transformer(str(folder))
    assert "ffn" in str(e.value) and "\n" not in str(e.value)
