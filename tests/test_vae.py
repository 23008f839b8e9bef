"""The causal video VAE: parity with diffusers' AutoencoderKLWan, decoding in pieces, latent normalisation, errors."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import skyreels
import vae as V
from conftest import HEIGHT, WIDTH

# float32 through ~30 layers with random weights: diffusers in float32 is itself ~1e-6 (relative) from a float64 run.
PARITY = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load_vae(folder, dtype=torch.float32):
    return skyreels.load_component(V.VAE, V.VAEConfig, folder, dtype)


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return os.path.join(tiny_folders["t2v"], "vae")


@pytest.fixture(scope="module")
def ours(folder):
    return load_vae(folder)


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32).eval()


def video(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, HEIGHT, WIDTH, generator=g) * 2 - 1


def latents(frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, frames, HEIGHT // 8, WIDTH // 8, generator=g)


def test_tiny_config_is_the_checkpoint_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        assert V.VAEConfig.from_config(json.load(f)) == V.CONFIGS["tiny"]


def test_load_fills_every_parameter_from_the_checkpoint(folder, ours):
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    params = dict(ours.named_parameters())
    assert params.keys() == state.keys()
    assert all(torch.equal(params[k], state[k]) for k in state)
    assert list(ours.buffers()) == []  # built on the meta device: only checkpoint tensors exist


@pytest.mark.parametrize("frames", [1, 5, 9, 13], ids=lambda n: f"{n} frame{'s' * (n > 1)}")
def test_encode_matches_diffusers(ours, reference, frames):
    """Oracle: diffusers' encode(x).latent_dist.mode() (the posterior mean the pipelines use), float32, same weights.
    Tolerance: relative L2 error <= 1e-5."""
    x = video(frames)
    with torch.no_grad():
        expected = reference.encode(x).latent_dist.mode()
    got = ours.encode(x)
    assert got.shape == expected.shape == (2, 16, 1 + (frames - 1) // 4, HEIGHT // 8, WIDTH // 8)
    assert rel(got, expected) <= PARITY


@pytest.mark.parametrize("frames", [1, 5, 9, 13], ids=lambda n: f"{n} frame{'s' * (n > 1)}")
def test_decode_matches_diffusers(ours, reference, frames):
    """Oracle: diffusers' decode(z).sample (clamped to [-1, 1]), float32, same weights. Tolerance: relative L2
    error <= 1e-5."""
    z = latents(1 + (frames - 1) // 4)
    with torch.no_grad():
        expected = reference.decode(z).sample
    got = ours.decode(z)
    assert got.shape == expected.shape == (2, 3, frames, HEIGHT, WIDTH)
    assert rel(got, expected) <= PARITY


@pytest.fixture(scope="module")
def four(ours):
    """Four latent frames and their decode in one call (13 frames)."""
    z = latents(4)
    return z, ours.decode(z)


@pytest.mark.parametrize("pieces", [(1, 3), (2, 2), (2, 1, 1)], ids=["1+3", "2+2", "2+1+1"])
def test_decoding_in_pieces_with_the_cache_equals_one_decode(ours, four, pieces):
    """Oracle: one decode of all four latent frames. Tolerance: max abs 1e-6 (each latent frame takes the same path
    either way, so in practice the frames are bitwise equal)."""
    z, whole = four
    cache = {}  # one cache, carried from piece to piece
    parts = [ours.decode(piece, cache) for piece in z.split(list(pieces), dim=2)]
    assert [p.shape[2] for p in parts] == [4 * n - 3 * (i == 0) for i, n in enumerate(pieces)]
    assert (torch.cat(parts, dim=2) - whole).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_normalisation_is_the_pipelines_arithmetic(ours, reference, dtype):
    """Oracle: the lines of diffusers' SkyReels-V2 pipelines (prepare_latents before the DiT, the end of __call__
    before decoding), written out with the checkpoint's config. Tolerance: none, bitwise equal."""
    cfg = reference.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to("cpu", dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to("cpu", dtype)
    z = latents(3).to(dtype)
    assert torch.equal(ours.normalize(z), (z - mean) * inv_std)
    assert torch.equal(ours.denormalize(z), z / inv_std + mean)


def test_normalisation_round_trips(ours):
    z = latents(3)
    assert (ours.denormalize(ours.normalize(z)) - z).abs().max() <= 1e-6


def test_bfloat16_stays_close_to_float32(folder, ours):
    """Oracle: our float32 VAE. Tolerance: relative L2 error <= 5e-2; bfloat16 keeps 8 mantissa bits, and diffusers'
    own bfloat16 run of this tiny model is ~2e-2 (decode) and ~1e-2 (encode) from its float32 run."""
    half = load_vae(folder, torch.bfloat16)
    z, x = latents(2), video(5)
    assert rel(half.decode(z.bfloat16()), ours.decode(z)) <= 5e-2
    assert rel(half.encode(x.bfloat16()), ours.encode(x)) <= 5e-2


@pytest.mark.parametrize("call, shape, message", [
    ("encode", (1, 3, 4, 32, 48), "1 \\+ 4k frames, got 4"),
    ("encode", (1, 4, 5, 32, 48), "shape \\(B, 3, F, H, W\\)"),
    ("encode", (1, 3, 5, 36, 48), "multiples of 8, got 36x48"),
    ("encode", (3, 5, 32, 48), "shape \\(B, 3, F, H, W\\)"),
    ("decode", (1, 4, 2, 4, 6), "shape \\(B, 16, T, h, w\\)"),
], ids=["encode 4 frames", "encode 4 channels", "encode height 36", "encode without batch", "decode 4 channels"])
def test_bad_input_raises_value_error(ours, call, shape, message):
    with pytest.raises(ValueError, match=message):
        getattr(ours, call)(torch.zeros(shape))


def test_config_disagreeing_with_tensors_raises_checkpoint_error(folder, tmp_path):
    bad = shutil.copytree(folder, tmp_path / "vae")
    config = json.loads((bad / "config.json").read_text())
    config["base_dim"] = 16
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(skyreels.CheckpointError, match="shape"):
        load_vae(str(bad))


def test_wan22_config_is_rejected():
    with pytest.raises(ValueError, match="Wan 2.2"):
        V.VAEConfig.from_config({"base_dim": 160, "z_dim": 48, "is_residual": True, "patch_size": 2})


@pytest.mark.parametrize("pieces", [(5,), (1, 4), (1, 1, 1, 2)], ids=["5 at once", "1+4", "1+1+1+2"])
def test_causal_conv_in_pieces_equals_one_zero_padded_conv3d(pieces):
    """Oracle: F.conv3d over the whole sequence with two zero frames in front (what diffusers computes). Our conv
    goes frame by frame, as a sum of 2D convolutions kept in the cache. Tolerance: 1e-5 relative (summation order)."""
    torch.manual_seed(0)
    conv = V.CausalConv3d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, sum(pieces), 7, 9)
    cache = {}
    with torch.no_grad():
        got = torch.cat([conv(piece, cache) for piece in x.split(list(pieces), dim=2)], dim=2)
        expected = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), conv.weight, conv.bias)
    assert rel(got, expected) <= 1e-5


def test_upsampling_conv_by_phases_equals_upsample_then_conv():
    """Oracle: nn.Upsample(2x, nearest-exact) then the 3x3 conv, as in diffusers' resample. We fold the upsampling into
    four 2x2 convolutions of the small image (one per output pixel phase). Tolerance: 1e-6 relative (the kernel taps
    that meet the same input pixel are summed before multiplying)."""
    torch.manual_seed(0)
    r = V.Resample(8, "upsample2d")
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        assert rel(V.upsample_conv(x, r.resample[1]), r.resample(x)) <= 1e-6
