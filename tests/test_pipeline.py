"""End-to-end parity: skyreels.load(folder).generate(...) against the diffusers pipeline for each mode.

Oracle: diffusers 0.42.1's SkyReels-V2 pipelines on the same tiny official-layout folder, float32 on CPU, with the
seed's sigma spacing handed to its scheduler (conftest.diffusers_pipeline, one per folder for the module), the same
torch.Generator seed for the latent noise and the same global seed for `addnoise_condition` (both draw it from the
global RNG).
Tolerance: 1e-4 max abs on frames in [0, 1]; float32 reorderings (SDPA vs diffusers' attention, fused vs per-frame
solver) leave ~1e-6.
"""
import numpy as np
import pytest
import torch

import skyreels
from conftest import HEIGHT, WIDTH, clip, image, max_abs, parity_settings, run_both

TOL = 1e-4


def test_t2v_matches_diffusers(references, pipes):
    ours, ref = run_both(references("t2v"), pipes["t2v"], parity_settings(num_frames=9),
                         parity_settings(num_frames=9, shift=8.0))
    assert max_abs(ours, ref) <= TOL


@pytest.mark.parametrize("kind,last", [("i2v", False), ("flf2v", True)], ids=["first-frame", "first-last-frame"])
def test_i2v_matches_diffusers(references, pipes, kind, last):
    """Same weights and seed; CLIP preprocessing is identical to transformers' (same PIL resize), so the
    tolerance stays 1e-4."""
    extra = dict(image=image(0, (50, 37)), last_image=image(1, (50, 37)) if last else None)
    settings = parity_settings(num_frames=9, **extra)
    ours, ref = run_both(references(kind), pipes[kind], settings, dict(settings, shift=5.0))
    assert max_abs(ours, ref) <= TOL


DF_SHORT = {
    "synchronous": dict(num_frames=17),
    "fps 16, no CFG": dict(num_frames=17, fps=16, guidance_scale=1.0),
    "asynchronous, frame by frame": dict(num_frames=25, ar_step=2, causal_block_size=1),
    "asynchronous, causal blocks of 2": dict(num_frames=21, ar_step=1, causal_block_size=2),
}


DF_LONG = {
    "3 windows": dict(num_frames=41, base_num_frames=17, overlap_history=5),
    "noised prefix": dict(num_frames=41, base_num_frames=17, overlap_history=9, addnoise_condition=20),
    "asynchronous, noised prefix": dict(num_frames=45, base_num_frames=21, overlap_history=9, ar_step=1,
                                        causal_block_size=2, addnoise_condition=10),
}


@pytest.mark.parametrize("settings", [*DF_SHORT.values(), *DF_LONG.values()],
                         ids=[*DF_SHORT, *(f"long, {name}" for name in DF_LONG)])
def test_df_matches_diffusers(references, pipes, settings):
    settings = dict(parity_settings(), **settings)
    ours, ref = run_both(references("df"), pipes["df"], settings, dict(settings, shift=8.0))
    assert max_abs(ours, ref) <= TOL


DF_I2V = {
    "first frame": dict(num_frames=17),
    "first and last frame": dict(num_frames=17, last_image=True),
    "long, noised prefix": dict(num_frames=41, base_num_frames=17, overlap_history=5, addnoise_condition=20),
}


@pytest.mark.parametrize("settings", DF_I2V.values(), ids=DF_I2V.keys())
def test_df_i2v_matches_diffusers(references, pipes, settings):
    from diffusers import SkyReelsV2DiffusionForcingImageToVideoPipeline as Ref

    settings = dict(parity_settings(image=image(0)), **settings)
    if settings.pop("last_image", False):
        settings["last_image"] = image(1)
    ours, ref = run_both(references("df", Ref), pipes["df"], settings, dict(settings, shift=8.0))
    assert max_abs(ours, ref) <= TOL


V2V = {
    "one window": dict(num_frames=17, base_num_frames=17, overlap_history=5),
    "2 windows, noised prefix": dict(num_frames=33, base_num_frames=17, overlap_history=9, addnoise_condition=20),
}


@pytest.mark.parametrize("settings", V2V.values(), ids=V2V.keys())
def test_v2v_matches_diffusers(references, pipes, settings):
    from diffusers import SkyReelsV2DiffusionForcingVideoToVideoPipeline as Ref

    settings = dict(parity_settings(video=clip()), **settings)
    ours, ref = run_both(references("df", Ref), pipes["df"], settings, dict(settings, shift=8.0))
    assert max_abs(ours, ref) <= TOL


def test_df_i2v_long_with_last_image_runs_where_diffusers_fails(pipes):
    """diffusers 0.42.1 raises a shape error here; we do what the original SkyReels-V2 does: the last image's
    latent joins the last window, is never moved, and is dropped before decoding."""
    out = pipes["df"].generate(**parity_settings(image=image(0), last_image=image(1), num_frames=41,
                                                 base_num_frames=17, overlap_history=5, shift=8.0), seed=0)
    assert out.shape == (41, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v", "tiny-df"])
def test_tiny_models_run_in_bfloat16_with_float32_islands(name):
    """The in-memory tiny models are cast as loading casts: the keep_fp32 parameters stay float32."""
    pipe = skyreels.load(name, device="cpu", dtype=torch.bfloat16)
    assert pipe.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert pipe.transformer.proj_out.weight.dtype == torch.bfloat16
    extra = dict(image=image(0)) if name == "tiny-i2v" else {}
    out = pipe.generate("a cat", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2, seed=0, **extra)
    assert out.shape == (5, HEIGHT, WIDTH, 3) and np.isfinite(out).all()
