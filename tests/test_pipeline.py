"""End-to-end parity: skyreels.load(folder).generate(...) against the diffusers pipeline for each mode.

Oracle: diffusers 0.42.1's SkyReels-V2 pipelines on the same tiny official-layout folder, float32 on CPU, with the
seed's sigma spacing handed to its scheduler (conftest.diffusers_pipeline), the same torch.Generator seed for the
latent noise and the same global seed for `addnoise_condition` (both draw it from the global RNG).
Tolerance: 1e-4 max abs on frames in [0, 1]; float32 reorderings (SDPA vs diffusers' attention, fused vs per-frame
solver) leave ~1e-6.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import skyreels
from conftest import HEIGHT, WIDTH, diffusers_pipeline

PROMPT = "A cat and a dog baking a cake together in a kitchen."
NEGATIVE = "Bright colors, overexposed, static, blurred details"
TOL = 1e-4


@pytest.fixture(scope="module")
def ours(tiny_folders):
    return {k: skyreels.load(p, device="cpu", dtype=torch.float32) for k, p in tiny_folders.items()}


def run_both(ref_pipe, our_pipe, ref_kwargs, our_kwargs, seed=0):
    torch.manual_seed(1234)
    ref = ref_pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **ref_kwargs).frames[0]
    torch.manual_seed(1234)
    out = our_pipe.generate(generator=torch.Generator().manual_seed(seed), **our_kwargs)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.abs(out - ref).max())


def common(**kw):
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                guidance_scale=5.0, **kw)


def test_t2v_matches_diffusers(tiny_folders, ours):
    ref = diffusers_pipeline(tiny_folders["t2v"])
    err = run_both(ref, ours["t2v"], common(num_frames=9), common(num_frames=9, shift=8.0))
    assert err <= TOL


@pytest.mark.parametrize("kind,last", [("i2v", False), ("flf2v", True)])
def test_i2v_matches_diffusers(tiny_folders, ours, kind, last):
    """Same weights and seed; CLIP preprocessing is identical to transformers' (same PIL resize), so the
    tolerance stays 1e-4."""
    extra = dict(image=image(0, (50, 37)), last_image=image(1, (50, 37)) if last else None)
    settings = common(num_frames=9, **extra)
    ref = diffusers_pipeline(tiny_folders[kind])
    err = run_both(ref, ours[kind], settings, dict(settings, shift=5.0))
    assert err <= TOL


@pytest.mark.parametrize("settings", [
    dict(num_frames=17),                                               # synchronous
    dict(num_frames=17, fps=16, guidance_scale=1.0),                    # fps 16, no CFG
    dict(num_frames=25, ar_step=2, causal_block_size=1),                # asynchronous, frame by frame
    dict(num_frames=21, ar_step=1, causal_block_size=2),                # asynchronous, causal blocks of 2
])
def test_df_short_matches_diffusers(tiny_folders, ours, settings):
    settings = dict(common(), **settings)
    ref = diffusers_pipeline(tiny_folders["df"])
    err = run_both(ref, ours["df"], settings, dict(settings, shift=8.0))
    assert err <= TOL


@pytest.mark.parametrize("settings", [
    dict(num_frames=41, base_num_frames=17, overlap_history=5),                                  # 3 windows
    dict(num_frames=41, base_num_frames=17, overlap_history=9, addnoise_condition=20),           # noised prefix
    dict(num_frames=45, base_num_frames=21, overlap_history=9, ar_step=1, causal_block_size=2,
         addnoise_condition=10),                                                                  # async + long
])
def test_df_long_matches_diffusers(tiny_folders, ours, settings):
    settings = dict(common(), **settings)
    ref = diffusers_pipeline(tiny_folders["df"])
    err = run_both(ref, ours["df"], settings, dict(settings, shift=8.0))
    assert err <= TOL


def image(seed, size=(WIDTH, HEIGHT)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("settings", [
    dict(num_frames=17),
    dict(num_frames=17, last_image=True),
    dict(num_frames=41, base_num_frames=17, overlap_history=5, addnoise_condition=20),
])
def test_df_i2v_matches_diffusers(tiny_folders, ours, settings):
    from diffusers import SkyReelsV2DiffusionForcingImageToVideoPipeline as Ref

    settings = dict(common(image=image(0)), **settings)
    if settings.pop("last_image", False):
        settings["last_image"] = image(1)
    ref = diffusers_pipeline(tiny_folders["df"], cls=Ref)
    err = run_both(ref, ours["df"], settings, dict(settings, shift=8.0))
    assert err <= TOL


@pytest.mark.parametrize("settings", [
    dict(num_frames=17, base_num_frames=17, overlap_history=5),
    dict(num_frames=33, base_num_frames=17, overlap_history=9, addnoise_condition=20),
])
def test_v2v_matches_diffusers(tiny_folders, ours, settings):
    from diffusers import SkyReelsV2DiffusionForcingVideoToVideoPipeline as Ref

    video = [image(i) for i in range(13)]
    settings = dict(common(video=video), **settings)
    ref = diffusers_pipeline(tiny_folders["df"], cls=Ref)
    err = run_both(ref, ours["df"], settings, dict(settings, shift=8.0))
    assert err <= TOL


def test_df_i2v_long_with_last_image_runs_where_diffusers_fails(tiny_folders, ours):
    """diffusers 0.42.1 raises a shape error here; we do what the original SkyReels-V2 does: the last image's
    latent joins the last window, is never moved, and is dropped before decoding."""
    out = ours["df"].generate(**common(image=image(0), last_image=image(1), num_frames=41, base_num_frames=17,
                                       overlap_history=5, shift=8.0), seed=0)
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


def test_offload_gives_the_same_video(tiny_folders):
    """--offload only moves components (and the text encoder layer by layer) between devices."""
    settings = dict(prompt="a cat", height=HEIGHT, width=WIDTH, num_frames=9, num_inference_steps=2, seed=0)
    plain = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32).generate(**settings)
    offloaded = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, offload=True)
    assert np.array_equal(offloaded.generate(**settings), plain)
