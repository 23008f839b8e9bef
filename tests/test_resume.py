"""A long film, shot by shot: a prompt per window, resuming after any stop, re-making from a window (issue 22).

Oracle: the same run uninterrupted, in the same process state (torch's global generator seeded alike: the re-noised
joins draw from it). Resumed and re-made videos must equal it exactly (np.array_equal), since the finished windows'
latents are kept in float32 and every random generator is restored; tiny models, float32 on the CPU.
"""
import json
import os
import signal

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
import skyreels
from conftest import kept_signal_handlers, signal_at

RNG = np.random.default_rng(0)
IMAGES = [RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(2)]
VIDEO = [RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(13)]
LONG = dict(height=32, width=48, num_frames=41, base_num_frames=17, overlap_history=5, num_inference_steps=2, seed=3)
MODES = {  # every diffusion-forcing mode, each over several windows
    "df sync, re-noised joins": dict(LONG, addnoise_condition=20),
    "df async with the shortcuts' cache": dict(LONG, ar_step=1, causal_block_size=2, num_frames=49,
                                                base_num_frames=21, overlap_history=9),
    "df-i2v with a last image": dict(LONG, image=IMAGES[0], last_image=IMAGES[1]),
    "v2v": dict(LONG, video=VIDEO, num_frames=37),
}


@pytest.fixture(scope="module")
def pipe():
    return skyreels.load("tiny-df", device="cpu", dtype=torch.float32)


class Stop(Exception):
    pass


def run(pipe, prompt, stop_at=None, **settings):
    """The run's frames; with `stop_at`, the run stops (an exception, as Ctrl-C raises one) after that many steps."""
    def progress(step, total):
        if step + 1 == stop_at:
            raise Stop
    torch.manual_seed(0)
    taken = []
    try:
        for chunk in pipe.stream(prompt, progress=progress, **settings):
            taken.append(chunk)
    except Stop:
        return None
    return np.concatenate(taken)


@pytest.fixture(scope="module")
def uninterrupted(pipe):
    return {mode: run(pipe, ["a cat", "a dog"], **settings) for mode, settings in MODES.items()}


def test_one_prompt_twice_is_the_one_prompt_bit_for_bit(pipe):
    assert np.array_equal(run(pipe, ["a cat", "a cat"], **LONG), run(pipe, "a cat", **LONG))


def test_a_second_prompt_changes_only_the_windows_after_the_first(pipe):
    one, two = run(pipe, "a cat", **LONG), run(pipe, ["a cat", "a dog"], **LONG)
    assert np.array_equal(one[:17], two[:17]) and not np.array_equal(one[17:], two[17:])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stop_at", [1, 3], ids=["in window 1", "in window 2"])  # the CLI's tests stop at the end
def test_a_resumed_run_is_the_uninterrupted_run(tmp_path, pipe, uninterrupted, mode, stop_at):
    """Stopped at a step (its window then unfinished, or finished at its last step), then resumed: the finished
    windows come back from the state, the rest are made, and the video is the same."""
    state = str(tmp_path / "state")
    steps = len(skyreels.plan_windows(skyreels.check_settings("df", skyreels.model.CONFIGS["tiny"], skyreels.Settings("a", **MODES[mode])))[0]
                .matrix)
    stop_at = {1: 1, 3: steps + 1}[stop_at]
    assert run(pipe, ["a cat", "a dog"], stop_at=stop_at, state=state, **MODES[mode]) is None
    resumed = run(pipe, ["a cat", "a dog"], state=state, resume=True, **MODES[mode])
    assert np.array_equal(resumed, uninterrupted[mode])


def test_redo_from_a_window_keeps_the_windows_before_it(tmp_path, pipe, uninterrupted):
    state, settings = str(tmp_path / "state"), MODES["df sync, re-noised joins"]
    run(pipe, ["a cat", "a dog"], state=state, **settings)
    same = run(pipe, ["a cat", "a dog"], state=state, redo_from=2, **settings)
    assert np.array_equal(same, uninterrupted["df sync, re-noised joins"])
    other = run(pipe, ["a cat", "a dog", "a bird"], state=state, redo_from=3, **settings)
    kept = 17 + 12  # windows 1 and 2 (5 latent frames each, the second continuing from 2)
    assert np.array_equal(other[:kept], same[:kept]) and not np.array_equal(other[kept:], same[kept:])


def finished_state(pipe, tmp_path):
    state = str(tmp_path / "state")
    run(pipe, ["a cat", "a dog"], stop_at=5, state=state, **LONG)  # windows of 2 steps: 2 finished
    return state


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(100)


def other_checkpoint(state):
    path = os.path.join(state, "settings.json")
    record = json.load(open(path))
    record["model"] = "SkyReels-V2-DF-14B-540P-Diffusers"
    json.dump(record, open(path, "w"))


def not_a_window(state):
    path = os.path.join(state, "window-0001.safetensors")
    save_file({k: v[:, :, :1].contiguous() if k == "latents" else v for k, v in load_file(path).items()}, path)


BAD_STATES = {  # (what to do to a state with two finished windows, the settings to resume with, what the error names)
    "a changed setting": (None, dict(shift=3.0), "shift"),
    "a changed prompt (without redo_from)": (None, dict(prompt=["a cat", "a bird"]), "prompt"),
    "a missing settings.json": (lambda s: os.remove(os.path.join(s, "settings.json")), {}, "settings.json"),
    "a corrupted window file": (lambda s: truncate(os.path.join(s, "window-0002.safetensors")), {},
                                "window-0002.safetensors"),
    "a window file of another run": (not_a_window, {}, "window-0001.safetensors"),
    "a state from another checkpoint": (other_checkpoint, {}, "model differs"),
    "redo from beyond the finished windows": (None, dict(redo_from=4), "redo_from"),
    "a new run over a kept state": (None, dict(resume=False), "finished windows"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_a_state_that_does_not_fit_is_one_line_and_nothing_is_lost(tmp_path, pipe, case):
    damage, change, needle = BAD_STATES[case]
    state = finished_state(pipe, tmp_path)
    if damage:
        damage(state)
    before = {name: open(os.path.join(state, name), "rb").read() for name in os.listdir(state)}
    settings = dict(dict(LONG, prompt=["a cat", "a dog"], state=state, resume=True), **change)
    with pytest.raises(ValueError) as e:
        list(pipe.stream(**settings))
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    assert {name: open(os.path.join(state, name), "rb").read() for name in os.listdir(state)} == before


# The command line: real signals, SIGKILL included, at several points of a run. The stopped run is a process of its
# own (a signal, a kill); the uninterrupted and the resumed run are this process's: what they read is on disk, so a
# process of their own would test nothing more and cost seconds of start-up each.

CLI = ["df", "--model", "tiny-df", "--prompt", "a cat", "--prompt", "a dog", "--height", "32", "--width", "48",
       "--num-frames", "41", "--base-num-frames", "17", "--overlap-history", "5", "--steps", "2", "--seed", "3",
       "--addnoise-condition", "20"]  # 3 windows of 2 steps: steps 1-2, 3-4, 5-6


def frames(path):
    return np.stack(imageio.mimread(path, memtest=False))


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "v.mp4"
    with kept_signal_handlers():  # set up before any test's own `signal_handlers`: it puts back what sample.main sets
        sample.main(CLI + ["--out", str(out)])
    return frames(out)


@pytest.mark.parametrize("sig,after", [(signal.SIGTERM, "step 1/"), (signal.SIGKILL, "step 3/"),
                                       (signal.SIGKILL, "step 5/"), (signal.SIGKILL, "step 6/6")],
                         ids=["SIGTERM in window 1", "SIGKILL in window 2", "SIGKILL in the last window",
                              "SIGKILL at the last step, while decoding and writing"])
def test_the_cli_resumes_after_any_stop_to_the_same_video(tmp_path, cli_reference, cli, sig, after):
    out = tmp_path / "v.mp4"
    code, _ = signal_at(["sample.py"] + CLI + ["--out", out], after, sig)
    assert code == (-9 if sig == signal.SIGKILL else 128 + sig)
    assert not out.exists() and os.path.isdir(tmp_path / "v.state")
    without_seed = CLI[:CLI.index("--seed")] + CLI[CLI.index("--seed") + 2:]  # resuming takes the state's seed
    resumed = cli(without_seed + ["--out", out, "--resume"])
    assert resumed.code == 0, resumed.err
    assert np.array_equal(frames(out), cli_reference)
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4"]  # the state, and a killed run's temporaries, removed


def test_keep_state_keeps_it_and_the_json_says_where(tmp_path, capsys):
    sample.main(CLI + ["--out", str(tmp_path / "v.mp4"), "--keep-state"])
    record = json.load(open(tmp_path / "v.json"))
    assert record["state"] == str(tmp_path / "v.state") and sorted(os.listdir(record["state"]))[-1] == \
        "window-0003.safetensors"
    assert record["window_prompts"] == ["a cat", "a dog", "a dog"]


def test_plan_prints_the_windows_and_draws_them_without_loading_weights(tmp_path, monkeypatch, capsys):
    """The figure itself is tests/test_plan.py's."""
    monkeypatch.setattr(skyreels, "load", lambda *a, **k: pytest.fail("loaded the weights"))
    sample.main(CLI + ["--out", str(tmp_path / "v.mp4"), "--plan", str(tmp_path / "plan.png")])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["3 windows, 6 denoising steps",
                     "window 1: frames 1-17, 2 steps, 0 latent frames known, prompt: a cat",
                     "window 2: frames 18-29, 2 steps, 2 latent frames known, prompt: a dog",
                     "window 3: frames 30-41, 2 steps, 2 latent frames known, prompt: a dog",
                     str(tmp_path / "plan.png")]
    assert imageio.imread(tmp_path / "plan.png").ndim == 3
    assert os.listdir(tmp_path) == ["plan.png"]


def test_a_prompt_file_gives_a_prompt_a_window(tmp_path, capsys):
    (tmp_path / "shots.txt").write_text("a cat\n\n  a dog  \n")
    argv = [a for a in CLI if a not in ("--prompt", "a cat", "a dog")] + ["--prompt-file", str(tmp_path / "shots.txt")]
    sample.main(argv + ["--out", str(tmp_path / "v.mp4"), "--plan"])
    assert capsys.readouterr().out.splitlines()[3].endswith("prompt: a dog")


@pytest.mark.parametrize("argv,needle", [
    (["t2v", "--model", "tiny-t2v", "--prompt", "a", "--prompt", "b"], "one pass"),
    (CLI + ["--prompt", "c", "--prompt", "d"], "4 prompts for 3 windows"),
    (CLI + ["--resume"], "--resume: {tmp}/v.state holds no run (no settings.json)"),
], ids=["several prompts for t2v", "more prompts than windows", "resume with no state"])
def test_prompts_and_resume_that_cannot_apply_are_one_line(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        sample.main(argv + ["--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and needle.format(tmp=tmp_path) in err, err
    assert os.listdir(tmp_path) == []
