"""Causal blocks that fit the video (issue 29): a df-i2v window's image latent is a causal block of its own, ready from
the start, so asynchronous image-to-video keeps its image; a window whose frames do not fill its last block gets a
shorter last block, so any frame count runs. The step matrix and the block-causal attention follow the same blocks.

Oracles: the image's latent itself (the first output latent frame must equal it, bit for bit: it is never updated);
the plan (every frame requested is made); the same run with the async shortcuts off (float32 on the CPU, within
test_shortcuts' 1e-5: the shortcuts only split the attention's sums differently); for whole blocks, the equal-block
step matrix the seed's table comes from (test_schedule), unchanged.
"""
import json

import numpy as np
import pytest
import torch

import model
import schedule
import skyreels
from conftest import HEIGHT, WIDTH, image

ASYNC = dict(ar_step=5, causal_block_size=5)
SMALL = dict(negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=3, seed=0)


def planned(**settings):
    s = skyreels.check_settings("df", model.CONFIGS["tiny"], skyreels.Settings("a cat", **{**SMALL, **settings}))
    return skyreels.plan_windows(s)


@pytest.fixture(scope="module")
def pipe():
    return skyreels.load("tiny-df", device="cpu", dtype=torch.float32)


def windows_made(pipe):
    """Wrap denoise_window to keep each window's final latents, the last image's latent included."""
    made, denoise = [], pipe.denoise_window

    def keeping(x, *args, **kw):
        made.append(denoise(x, *args, **kw))
        return made[-1]
    pipe.denoise_window = keeping
    return made


@pytest.mark.parametrize("last", [False, True], ids=["first image", "first and last image"])
@pytest.mark.parametrize("frames", [37, 97], ids=["37 frames", "97 frames"])
def test_asynchronous_image_to_video_keeps_the_image_latent_exactly(pipe, frames, last):
    first, end = image(0), image(1)
    made = windows_made(pipe)
    try:
        pipe.generate("a cat", **SMALL, **ASYNC, num_frames=frames, image=first, last_image=end if last else None,
                      output_type="latent")
    finally:
        del pipe.denoise_window
    s = skyreels.check_settings("df", pipe.transformer.config, skyreels.Settings(
        "a cat", **SMALL, num_frames=frames, image=first, last_image=end if last else None))
    known, end_latent = pipe.known_latents(s)
    assert torch.equal(made[0][:, :, :1], known)  # never updated: the image's own block was ready from the start
    if last:
        assert torch.equal(made[-1][:, :, -1:], end_latent)


def test_the_image_is_a_block_of_its_own_and_the_last_image_joins_the_last_block():
    assert [w.blocks for w in planned(num_frames=97, image=image(0), **ASYNC)] == [(1, 5, 5, 5, 5, 4)]
    assert [w.blocks for w in planned(num_frames=97, image=image(0), last_image=image(1), **ASYNC)] == \
        [(1, 5, 5, 5, 5, 5)]
    w = planned(num_frames=97, image=image(0), **ASYNC)[0]
    assert not w.update[:, 0].any() and (w.matrix[:, 0] == 0).all()  # ready from the start, never moved
    assert w.update[0, 1:6].all() and not w.update[0, 6:].any()  # the next block starts at once, then ar_step later


FRAME_COUNTS = {  # name: (settings, each window's blocks)
    "t2v 93 frames, blocks of 5": (dict(num_frames=93), [(5, 5, 5, 5, 4)]),
    "t2v 29 frames, blocks of 3": (dict(num_frames=29, causal_block_size=3), [(3, 3, 2)]),
    "long, a short last window": (dict(num_frames=57, base_num_frames=33, overlap_history=17),
                                  [(5, 4), (5, 4), (5, 2)]),
    "v2v, short blocks": (dict(num_frames=29, base_num_frames=25, overlap_history=17,
                               video=[np.asarray(image(i)) for i in range(17)]), [(5, 2), (5, 1)]),
}


@pytest.mark.parametrize("case", list(FRAME_COUNTS))
def test_any_frame_count_makes_every_frame_requested(pipe, case):
    """Every latent frame the frame count needs is made (the VAE then makes 1 + 4k frames of them; decoding one
    case shows it)."""
    settings, blocks = FRAME_COUNTS[case]
    settings = {**ASYNC, **settings}
    assert [w.blocks for w in planned(**settings)] == blocks
    torch.manual_seed(0)
    latents = pipe.generate("a cat", **SMALL, **settings, output_type="latent")
    assert latents.shape[1] == skyreels.latent_frames(settings["num_frames"])  # (16, F, h, w)


def test_a_shorter_last_block_decodes_to_every_frame(pipe):
    out = pipe.generate("a cat", **SMALL, num_frames=29, ar_step=1, causal_block_size=3)
    assert out.shape == (29, HEIGHT, WIDTH, 3) and np.isfinite(out).all()


SHORTCUT_CASES = {
    "df-i2v, blocks of 2": dict(num_frames=21, ar_step=1, causal_block_size=2, image=image(0)),
    "df-i2v, last image, blocks of 3": dict(num_frames=29, ar_step=2, causal_block_size=3, image=image(0),
                                            last_image=image(1)),
    "t2v, a shorter last block": dict(num_frames=25, ar_step=1, causal_block_size=3),
    "long, cached prefix, shorter blocks": dict(num_frames=45, base_num_frames=25, overlap_history=9, ar_step=1,
                                                causal_block_size=3),
}


@pytest.mark.parametrize("case", list(SHORTCUT_CASES))
def test_the_shortcuts_give_the_same_video_on_unequal_blocks(pipe, case):
    runs = []
    for on in (True, False):
        pipe.shortcuts = on
        torch.manual_seed(7)
        try:
            runs.append(pipe.generate("a cat", **SMALL, **SHORTCUT_CASES[case], output_type="latent"))
        finally:
            pipe.shortcuts = True
    assert float((runs[0] - runs[1]).abs().max()) <= 1e-5


@pytest.mark.parametrize("frames,block,ar", [(25, 5, 5), (20, 2, 1), (12, 3, 2), (7, 1, 3)])
def test_equal_blocks_given_as_sizes_are_the_equal_block_matrix(frames, block, ar):
    """Whole blocks are what they were: the tuple path gives the int path's matrices, with and without a prefix."""
    ts = schedule.timesteps(10, 8.0)[0]
    for ready in (0, block):
        by_int = schedule.step_matrix(frames, ts, ar, ready, block)
        by_sizes = schedule.step_matrix(frames, ts, ar, ready, (block,) * (frames // block))
        assert all(torch.equal(a, b) for a, b in zip(by_int, by_sizes))


def test_block_causal_attention_follows_unequal_blocks():
    """With blocks (1, 3, 2) a frame sees its own block and those before: changing frames 4-5 leaves frames 0-3."""
    dit = skyreels.place(model.DiT(model.DiTConfig(**{**model.CONFIGS["tiny"].__dict__, "inject_sample_info": True})),
                         "cpu", torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 16, 6, 4, 6, generator=g), torch.randn(1, 8, 32, generator=g)
    y = x.clone()
    y[:, :, 4:] += 1
    t = torch.full((1, 6), 500)
    causal = model.AttentionContext(causal_blocks=(1, 3, 2))
    with torch.no_grad():
        a, b = (dit(v, t, context, fps=24, attention=causal) for v in (x, y))
        changed_first = dit(x.clone().index_fill_(2, torch.tensor([0]), 0.0), t, context, fps=24, attention=causal)
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    assert not torch.allclose(a[:, :, 1:4], changed_first[:, :, 1:4])  # the image's block is seen by the next


def test_the_plan_and_the_json_show_each_windows_blocks(tmp_path, cli):
    argv = ["df-i2v", "--model", "tiny-df", "--prompt", "a cat", "--height", "32", "--width", "48", "--steps", "1",
            "--num-frames", "29", "--ar-step", "1", "--causal-block-size", "3", "--image", str(tmp_path / "in.png")]
    image(0).save(tmp_path / "in.png")
    plan = cli(argv + ["--plan"])
    assert plan.code == 0 and "blocks 1+3+3+1" in plan.out.splitlines()[1], plan.out
    run = cli(argv + ["--out", str(tmp_path / "v.mp4")])
    assert run.code == 0, run.err
    assert json.load(open(tmp_path / "v.json"))["window_blocks"] == [[1, 3, 3, 1]]
