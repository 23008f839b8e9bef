"""Step caching (TeaCache): opt-in, in every mode, and the code of today when off.

Oracle for the decisions: TeaCache's own loop (TeaCache4Wan2.1's teacache_forward), written out below pass by pass: a
counter over DiT calls, two per guided step and num_steps = 2 * steps of them, an accumulator each for the even
(conditional) and odd (unconditional) calls, the first ret_steps calls and those from cutoff_steps on always computed.
The tiny models' random time embeddings change far more from step to step than a trained model's, so the decision
tests map the change through the identity polynomial, with thresholds that make skips and computed passes alternate.
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import model
import sample
import skyreels
from conftest import HEIGHT, WIDTH

SMALL = dict(height=HEIGHT, width=WIDTH, num_inference_steps=6, seed=0, negative_prompt="blurry", output_type="latent")
TOL = 1e-5  # where TeaCache turns the exact async shortcuts off: test_shortcuts.py's tolerance for them


def image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


ASYNC = dict(ar_step=1, causal_block_size=2)
MODES = {  # name: (tiny model, settings)
    "t2v": ("t2v", dict(num_frames=9)),
    "t2v, guidance 1": ("t2v", dict(num_frames=9, guidance_scale=1.0)),
    "i2v, last image": ("i2v", dict(num_frames=9, image=image(0), last_image=image(1))),
    "df, synchronous": ("df", dict(num_frames=17)),
    "df, asynchronous": ("df", dict(num_frames=21, **ASYNC)),
    "df, long, 3 windows": ("df", dict(num_frames=45, base_num_frames=21, overlap_history=9, **ASYNC)),
    "df-i2v": ("df", dict(num_frames=17, image=image(0))),
    "v2v": ("df", dict(num_frames=25, base_num_frames=21, overlap_history=9, video=[image(k) for k in range(13)])),
}


@pytest.fixture(scope="module")
def pipes():
    return {kind: skyreels.load(f"tiny-{kind}", device="cpu", dtype=torch.float32) for kind in ("t2v", "i2v", "df")}


def generate(pipes, mode, **settings):
    kind, base = MODES[mode]
    return pipes[kind].generate("a cat", **{**SMALL, **base, **settings})


def skips_of(pipe, monkeypatch):
    """Wrap the DiT to record, for each pass, whether TeaCache had it skip the blocks."""
    skips, forward = [], pipe.transformer.forward

    def recording(*args):
        reuse = args[5].reuse  # predict hands DiT.forward its arguments by position; the AttentionContext last
        skips.append(bool(reuse and reuse["skip"]))
        return forward(*args)
    monkeypatch.setattr(pipe.transformer, "forward", recording)
    return skips


def teacache_reference(pipe, timesteps, threshold, use_ret_steps, fps=24):
    """TeaCache4Wan2.1's decisions for one run of guided steps at `timesteps` (rows of per-frame timesteps), a list
    of booleans (skipped) for the DiT calls in order: conditional, unconditional, conditional, ..."""
    num_steps, cnt = 2 * len(timesteps), 0
    ret_steps, cutoff_steps = (10, num_steps) if use_ret_steps else (2, num_steps - 2)
    accumulated, previous, skipped = [0.0, 0.0], [None, None], []
    for t in timesteps:
        e, e0 = pipe.transformer.time_modulation(t.reshape(1, -1), t.numel(), fps)
        modulated = (e0 if use_ret_steps else e).float()
        for parity in (0, 1):  # the step's two calls
            if cnt < ret_steps or cnt >= cutoff_steps:
                calc, accumulated[parity] = True, 0.0
            else:
                change = ((modulated - previous[parity]).abs().mean() / previous[parity].abs().mean()).item()
                accumulated[parity] += change  # the identity polynomial (the tests' TEACACHE)
                calc = accumulated[parity] >= threshold
                accumulated[parity] = 0.0 if calc else accumulated[parity]
            previous[parity] = modulated
            skipped.append(not calc)
            cnt += 1
    return skipped


@pytest.mark.parametrize("mode,threshold,use_ret_steps", [
    ("t2v", 1.5, False), ("t2v", 0.45, True), ("df, long, 3 windows", 0.3, False), ("df, long, 3 windows", 0.3, True),
], ids=["t2v", "t2v, retention steps", "df long", "df long, retention steps"])
def test_decisions_are_teacaches_pass_by_pass(pipes, monkeypatch, mode, threshold, use_ret_steps):
    """Each window is a run of its own: its step-matrix rows are the steps, and the counters restart."""
    kind, settings = MODES[mode]
    for key in skyreels.TEACACHE:
        monkeypatch.setitem(skyreels.TEACACHE, key, (1.0, 0.0))  # x -> x
    skips = skips_of(pipes[kind], monkeypatch)
    generate(pipes, mode, num_inference_steps=8, teacache=threshold, use_ret_steps=use_ret_steps)
    s = skyreels.check_settings(kind, skyreels.model.CONFIGS["tiny"], skyreels.Settings("a cat", **{**SMALL, **settings, "num_inference_steps": 8}))
    runs = [w.matrix for w in skyreels.plan_windows(s)] if kind == "df" else [skyreels.schedule.timesteps(8, 8.0)[0]]
    expected = [skip for timesteps in runs for skip in teacache_reference(pipes[kind], timesteps, threshold,
                                                                           use_ret_steps)]
    assert skips == expected
    assert 0 < sum(skips) < len(skips) - (10 if use_ret_steps else 4) * len(runs)  # skips and computed steps alternate


@pytest.mark.parametrize("use_ret_steps", [False, True], ids=["no retention steps", "retention steps"])
@pytest.mark.parametrize("mode", list(MODES))
def test_an_enormous_threshold_computes_only_the_retention_and_last_steps(pipes, mode, use_ret_steps):
    kind, settings = MODES[mode]
    generate(pipes, mode, teacache=1e30, use_ret_steps=use_ret_steps)
    s = skyreels.check_settings(kind, skyreels.model.CONFIGS["tiny"], skyreels.Settings("a cat", **{**SMALL, **settings}))
    rows = [len(w.matrix) for w in skyreels.plan_windows(s)] if kind == "df" else [SMALL["num_inference_steps"]]
    first = 5 if use_ret_steps else 1
    steps = sum(min(first, n) + (not use_ret_steps and n > first) for n in rows)  # the first, and the last
    passes = 1 + (s.guidance_scale > 1)
    assert pipes[kind].dit_passes == dict(dit_passes=steps * passes, dit_passes_skipped=(sum(rows) - steps) * passes)


@pytest.mark.parametrize("mode", list(MODES))
def test_threshold_zero_computes_every_pass_and_equals_off(pipes, mode):
    """Bit-identical where the shortcuts do not apply; where they give way (causal blocks), within their TOL."""
    off = generate(pipes, mode)
    passes = dict(pipes[MODES[mode][0]].dit_passes)
    zero = generate(pipes, mode, teacache=0)
    assert pipes[MODES[mode][0]].dit_passes == passes and passes["dit_passes_skipped"] == 0
    if MODES[mode][1].get("causal_block_size", 1) > 1:
        assert float((zero - off).abs().max()) <= TOL
    else:
        assert torch.equal(zero, off)


BAD = {
    "negative": dict(teacache=-0.1), "NaN": dict(teacache=float("nan")), "infinite": dict(teacache=float("inf")),
    "a string": dict(teacache="0.2"), "a bool": dict(teacache=True),
    "retention steps without teacache": dict(use_ret_steps=True), "retention steps not a bool": dict(use_ret_steps=1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_setting_is_one_line_naming_it(pipes, case):
    with pytest.raises(ValueError) as e:
        generate(pipes, "t2v", **BAD[case])
    assert len(str(e.value).splitlines()) == 1
    assert ("teacache" if "teacache" in BAD[case] else "use_ret_steps") in str(e.value), str(e.value)


I2V_14B = dataclasses.replace(model.CONFIGS["14B"], in_channels=36, image_dim=1280, added_kv_proj_dim=5120)


@pytest.mark.parametrize("config,height,width,name", [
    (model.CONFIGS["1.3B"], 544, 960, "1.3B"),
    (model.CONFIGS["14B"], 720, 1280, "14B"),
    (I2V_14B, 544, 960, "I2V-540P"),
    (I2V_14B, 720, 1280, "I2V-720P"),
    (I2V_14B, 1280, 720, "I2V-720P"),
], ids=["1.3B", "14B", "I2V 540P", "I2V 720P", "I2V 720P portrait"])
@pytest.mark.parametrize("use_ret_steps", [False, True], ids=["", "retention steps"])
def test_official_sizes_use_their_own_coefficients(capsys, config, height, width, name, use_ret_steps):
    skyreels.note.cache_clear()
    coefficients = skyreels.teacache_coefficients(config, min(height, width), use_ret_steps)
    assert coefficients == skyreels.TEACACHE[name, use_ret_steps]
    assert capsys.readouterr().err == ""


def test_other_sizes_borrow_the_nearest_and_say_so_once(pipes, capsys):
    skyreels.note.cache_clear()
    generate(pipes, "df, long, 3 windows", teacache=0.2, num_inference_steps=2)  # 3 windows; its size, the shortcuts
    generate(pipes, "t2v", teacache=0.2, num_inference_steps=2)
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: TeaCache: no coefficients fitted for a 2x24 DiT; 1.3B's (the nearest) stand in",
                     "note: TeaCache passes whole windows (a pass over some frames cannot reuse others'): no async "
                     "shortcuts"]


def test_offload_gives_the_same_skipped_video(tiny_folders):
    settings = dict(SMALL, prompt="a cat", num_frames=9, teacache=1e30)
    resident = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32).generate(**settings)
    offloaded = skyreels.load(tiny_folders["df"], device="cpu", dtype=torch.float32, offload=True).generate(**settings)
    assert torch.equal(resident, offloaded)


@pytest.mark.parametrize("flags,teacache,use_ret_steps", [
    ([], None, False), (["--teacache"], 0.2, False), (["--teacache", "0.1"], 0.1, False),
    (["--teacache", "--teacache_thresh", "0.3", "--use_ret_steps"], 0.3, True), (["--use-ret-steps"], None, True),
], ids=["off", "bare", "a threshold", "the original's spelling", "retention steps"])
def test_the_cli_flags(flags, teacache, use_ret_steps):
    args = vars(sample.parse_args(["t2v", "--model", "tiny-t2v", "--prompt", "a cat"] + flags))
    assert (args.get("teacache"), args.get("use_ret_steps", False)) == (teacache, use_ret_steps)


def test_the_cli_records_the_passes_and_shows_the_skips(tmp_path, capsys):
    sample.main(["t2v", "--model", "tiny-t2v", "--prompt", "a cat", "--height", "32", "--width", "48", "--num-frames",
                 "5", "--steps", "4", "--seed", "0", "--teacache", "1e30", "--out", str(tmp_path / "v.mp4")])
    record = json.load(open(tmp_path / "v.json"))
    assert (record["teacache"], record["dit_passes"], record["dit_passes_skipped"]) == (1e30, 4, 4)
    assert "4/8 DiT passes skipped" in capsys.readouterr().err
