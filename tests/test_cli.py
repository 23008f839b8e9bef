"""The command line: every mode end to end to an mp4, and every bad input answered with one line.

Videos are read back with imageio to check the frame count and size. The tiny-* models are random-weight models
built in memory (their videos are noise); one run goes through a tiny official-layout folder on disk. The command line
runs in this process (conftest.cli: sample.main(argv)); the runs that need a process of their own (signals, torchrun)
are in test_inputs.py and test_distributed.py.
"""
import json
import os
import signal

import imageio.v2 as imageio
import numpy as np
import pytest

import sample

SMALL = ["--height", "32", "--width", "48", "--steps", "2", "--seed", "0"]


def read_back(path):
    frames = imageio.mimread(path, memtest=False)
    return len(frames), frames[0].shape[:2]


MODES = {  # id: mode, model, its options, the frames the video holds
    "t2v": ("t2v", "tiny-t2v", ["--num-frames", "9"], 9),
    "i2v, first and last frame": ("i2v", "tiny-i2v", ["--num-frames", "9", "--image", "{m}/first.png",
                                                      "--last-image", "{m}/last.png"], 9),
    "df, asynchronous": ("df", "tiny-df", ["--num-frames", "17", "--ar-step", "1", "--causal-block-size", "1"], 17),
    "df, 3 windows, underscored flags": ("df", "tiny-df", ["--num_frames", "33", "--base_num_frames", "17",
                                                           "--overlap_history", "5"], 33),
    "df-i2v": ("df-i2v", "tiny-df", ["--num-frames", "9", "--image", "{m}/first.png"], 9),
    "v2v": ("v2v", "tiny-df", ["--num-frames", "9", "--video", "{m}/clip.mp4", "--overlap-history", "5"], 13 + 9),
}


@pytest.mark.parametrize("mode,model,extra,frames", MODES.values(), ids=MODES.keys())
def test_each_mode_writes_an_mp4_with_its_settings_beside_it(tmp_path, media, cli, mode, model, extra, frames):
    out = tmp_path / "video.mp4"
    run = cli([mode, "--model", model, "--prompt", "a cat", "--out", out] + SMALL + [a.format(m=media) for a in extra])
    assert run.code == 0, run.err
    assert run.out.split() == [str(out)]
    assert read_back(out) == (frames, (32, 48))
    settings = json.load(open(tmp_path / "video.json"))
    assert settings["mode"] == mode and settings["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["video.json", "video.mp4"]  # no temporary file left


def test_runs_from_an_official_layout_folder(tmp_path, tiny_folders, cli):
    out = tmp_path / "v.mp4"
    run = cli(["df", "--model", tiny_folders["df"], "--prompt", "a cat", "--num-frames", "9", "--out", out] + SMALL)
    assert run.code == 0, run.err
    assert read_back(out) == (9, (32, 48))


def truncate_weights(folder):
    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])


BAD = {
    "missing model folder": (["df", "--model", "/no/such/folder"], "/no/such/folder"),
    "folder that is no checkpoint": (["df", "--model", "{tmp}"], "model_index.json"),
    "checkpoint kind that does not fit the mode": (["i2v", "--model", "{t2v}", "--image", "{m}/first.png"], "I2V"),
    "height not a multiple of 16": (["df", "--model", "tiny-df", "--height", "40", "--width", "48"], "16"),
    "num_frames above base_num_frames without overlap_history":
        (["df", "--model", "tiny-df", "--num-frames", "33", "--base-num-frames", "17"], "--overlap-history"),
    "overlap_history not below base_num_frames":
        (["df", "--model", "tiny-df", "--num-frames", "33", "--base-num-frames", "17", "--overlap-history", "17"],
         "--overlap-history"),
    "ar_step too small": (["df", "--model", "tiny-df", "--ar-step", "-1"], "--ar-step"),
    "fewer than one step": (["df", "--model", "tiny-df", "--steps", "0"], "--steps"),
    "missing image": (["df-i2v", "--model", "tiny-df", "--image", "{m}/nope.png"], "nope.png"),
    "unreadable image": (["df-i2v", "--model", "tiny-df", "--image", "{m}/broken.png"], "broken.png"),
    "missing video": (["v2v", "--model", "tiny-df", "--video", "{m}/nope.mp4", "--overlap-history", "5"], "nope.mp4"),
    "unreadable video": (["v2v", "--model", "tiny-df", "--video", "{m}/broken.mp4", "--overlap-history", "5"],
                         "broken.mp4"),
    "video shorter than overlap_history":
        (["v2v", "--model", "tiny-df", "--video", "{m}/clip.mp4", "--overlap-history", "17", "--base-num-frames",
          "33"], "--overlap-history"),
    "corrupt safetensors file": (["df", "--model", "{corrupt}"], "{corrupt_name}"),
    "output path that cannot be written": (["df", "--model", "tiny-df", "--out", "/no/such/dir/v.mp4"], "/no/such/dir"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_clear_line_and_no_output(tmp_path, tiny_folders, media, spoiled_copy, cli, case):
    argv, needle = BAD[case]
    corrupt = spoiled_copy("df", "corrupt", truncate_weights) if "{corrupt}" in argv else ""
    empty = tmp_path / "empty"
    empty.mkdir()
    fill = dict(m=media, tmp=empty, t2v=tiny_folders["t2v"], corrupt=corrupt,
                corrupt_name="diffusion_pytorch_model.safetensors")
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", tmp_path / "out.mp4"]
    run = cli(argv[:1] + SMALL + ["--prompt", "a cat"] + argv[1:])  # the case's own options come last and win
    assert run.code != 0
    err = run.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle.format(**fill) in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(["empty"] + (["corrupt"] if corrupt else []))  # nothing written


def test_an_interrupted_run_keeps_the_finished_windows_as_a_playable_partial_mp4(tmp_path, capsys):
    """Ctrl-C in a later window leaves NAME.partial.mp4 of every window finished, a JSON that says so, and one line."""
    def windows():
        yield np.random.rand(9, 32, 48, 3).astype(np.float32)
        yield np.random.rand(8, 32, 48, 3).astype(np.float32)
        sample.STOP["signal"] = signal.SIGINT
        raise KeyboardInterrupt

    out = sample.Output(str(tmp_path / "v.mp4"), keeps_state=False)
    with pytest.raises(SystemExit) as stop:
        out.write(windows(), 24, dict(seed=0))
    assert stop.value.code == 130
    assert read_back(tmp_path / "v.partial.mp4") == (17, (32, 48))
    assert json.load(open(tmp_path / "v.partial.json")) == dict(seed=0, frames=17, partial=True)
    assert "17 frames" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["v.partial.json", "v.partial.mp4"]
