"""The exact shortcuts of asynchronous diffusion forcing: with block-causal attention, blocks not started yet are
left out of the forward pass and finished blocks' keys and values are cached. Oracle: the same pipeline with the
shortcuts off (every iteration a full pass over the window, as diffusers); float32 on CPU, max abs <= 1e-5 (the
attention splits its sums differently, nothing else changes).
"""
import numpy as np
import pytest
import torch

from conftest import HEIGHT, WIDTH, clip, image, max_abs

TOL = 1e-5


def frames_processed(pipe):
    """Wrap the DiT to count the latent frames it is given."""
    seen = []
    forward = pipe.transformer.forward

    def counting(x, *a, **k):
        seen.append(x.shape[2])
        return forward(x, *a, **k)
    pipe.transformer.forward = counting
    return seen, lambda: setattr(pipe.transformer, "forward", forward)


def run(pipe, shortcuts, cache_budget=None, **settings):
    """(frames, latent frames through the DiT summed over its forward passes) of one run of the shared DF pipeline
    with the shortcuts on or off (put back afterwards) and a cache budget in GiB (None: the default)."""
    seen, restore = frames_processed(pipe)
    pipe.shortcuts = shortcuts
    torch.manual_seed(7)
    try:
        out = pipe.generate("a cat", negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=4,
                            guidance_scale=5.0, shift=8.0, seed=0, cache_budget=cache_budget, **settings)
    finally:
        restore()
        pipe.shortcuts = True
    return out, sum(seen)


CASES = {
    "ar_step 1, blocks of 2": dict(num_frames=21, ar_step=1, causal_block_size=2),
    "ar_step 2, blocks of 3": dict(num_frames=21, ar_step=2, causal_block_size=3),
    "ar_step 4, blocks of 2": dict(num_frames=29, ar_step=4, causal_block_size=2),
    "long, 3 windows, cached prefix": dict(num_frames=45, base_num_frames=21, overlap_history=9, ar_step=1,
                                          causal_block_size=2),
    "long, re-noised prefix (no cache)": dict(num_frames=45, base_num_frames=21, overlap_history=9, ar_step=1,
                                             causal_block_size=2, addnoise_condition=20),
    "df-i2v": dict(num_frames=21, ar_step=1, causal_block_size=2, image=image(0)),
    "df-i2v, last image": dict(num_frames=17, ar_step=2, causal_block_size=2, image=image(0), last_image=image(1)),
    "v2v": dict(num_frames=25, base_num_frames=21, overlap_history=9, ar_step=1, causal_block_size=2, video=clip()),
    "v2v, re-noised prefix": dict(num_frames=25, base_num_frames=21, overlap_history=9, ar_step=1,
                                  causal_block_size=2, video=clip(), addnoise_condition=10),
}


@pytest.fixture(scope="module")
def pipe(pipes):
    return pipes["df"]


@pytest.mark.parametrize("case", list(CASES))
def test_shortcuts_give_the_same_video_with_less_work(pipe, case):
    out, work = run(pipe, True, **CASES[case])
    oracle, full_work = run(pipe, False, **CASES[case])
    assert max_abs(out, oracle) <= TOL
    assert work < full_work  # frames through the DiT, summed over iterations


def test_synchronous_runs_are_untouched(pipe):
    out, work = run(pipe, True, num_frames=17)
    oracle, full_work = run(pipe, False, num_frames=17)
    assert np.array_equal(out, oracle) and work == full_work


def test_a_cache_budget_that_holds_part_of_the_cache_changes_nothing_but_the_work(pipe):
    """The cache keeps at most what fits cache_budget (GiB, whole blocks); frames past it are recomputed. Every
    budget gives the video of shortcuts off; a bigger budget passes fewer frames through the DiT."""
    cfg = pipe.transformer.config
    block_bytes = 2 * 2 * cfg.num_layers * 2 * (HEIGHT // 16) * (WIDTH // 16) * cfg.dim * 4  # 2 frames, CFG, fp32
    settings = dict(num_frames=29, ar_step=1, causal_block_size=2)
    oracle, full_work = run(pipe, False, **settings)  # one oracle for every budget: shortcuts off cache nothing
    works = []
    for budget in (0, block_bytes, 2 * block_bytes + 1, None):
        out, work = run(pipe, True, cache_budget=budget and budget / 2**30, **settings)
        assert max_abs(out, oracle) <= TOL, budget
        works.append(work)
    assert full_work > works[0] > works[1] >= works[2] >= works[3], (full_work, works)
