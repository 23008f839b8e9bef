"""Bad input, faults and a new user's first hour (issue 14), class by class, through the API and the CLI.

The API raises one ValueError naming the argument (skyreels.CheckpointError for checkpoint files) before any work:
`Pipeline.stream` checks everything before it returns its generator, so a check that fails there has run no step.
The CLI prints one `error:` line, exits 2 and leaves nothing on disk. A run leaves its mp4 and JSON complete, or
neither; an interrupted one keeps the windows finished, readable, with "partial": true.
"""
import json
import os
import shutil
import signal
import sys

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

import sample
import schedule
import skyreels
from conftest import signal_at

SMALL = ["--height", "32", "--width", "48", "--steps", "1", "--seed", "0"]

IMAGE = np.zeros((32, 48, 3), np.uint8)
# (checkpoint kind, stream arguments, what the message must name)
API_CASES = {
    # 1. numbers that are not numbers, or out of range
    "nan guidance": ("df", dict(guidance_scale=float("nan")), "guidance_scale"),
    "inf shift": ("df", dict(shift=float("inf")), "shift"),
    "zero shift": ("t2v", dict(shift=0), "shift"),
    "nan addnoise_condition": ("df", dict(addnoise_condition=float("nan")), "addnoise_condition"),
    "causal_block_size 0": ("df", dict(causal_block_size=0), "causal_block_size"),
    "base_num_frames 0": ("df", dict(base_num_frames=0), "base_num_frames"),
    "fps 0": ("df", dict(fps=0), "fps"),
    "negative fps": ("t2v", dict(fps=-24), "fps"),
    "seed of 2**64": ("df", dict(seed=2**64), "seed"),
    "negative seed": ("df", dict(seed=-2), "seed"),
    # 2. frame arithmetic
    "df-i2v with 1 frame": ("df", dict(image=IMAGE, num_frames=1), "num_frames"),
    "first-last i2v with 1 frame": ("i2v", dict(image=IMAGE, last_image=IMAGE, num_frames=1), "num_frames"),
    "v2v num_frames not above overlap_history": ("df", dict(video=[IMAGE] * 13, overlap_history=9, num_frames=9),
                                                 "num_frames"),
    "base and overlap of one latent length": ("df", dict(num_frames=33, base_num_frames=16, overlap_history=14),
                                              "overlap_history"),
    "size beyond the rotary table": ("df", dict(height=1024, width=48), "rope_max_seq_len"),
    "v2v size beyond the rotary table": ("df", dict(video=[IMAGE] * 13, overlap_history=5, height=1024),
                                         "rope_max_seq_len"),
    # 3. types
    "float num_frames": ("df", dict(num_frames=17.0), "num_frames"),
    "string steps": ("df", dict(num_inference_steps="4"), "num_inference_steps"),
    "float height": ("df", dict(height=32.5), "height"),
    "bool width": ("df", dict(width=True), "width"),
    "string seed": ("df", dict(seed="0"), "seed"),
    "channels-first image": ("df", dict(image=np.zeros((3, 32, 48), np.uint8)), "image"),
    "tensor image": ("i2v", dict(image=torch.zeros(32, 48, 3)), "image"),
    "nan float image": ("i2v", dict(image=np.full((32, 48, 3), np.nan, np.float32)), "image"),
    "bogus output_type": ("t2v", dict(output_type="pil"), "output_type"),
    "lone surrogate prompt": ("t2v", dict(prompt="a cat \udcff"), "prompt"),
    "negative_prompt not a string": ("t2v", dict(negative_prompt=3), "negative_prompt"),
    "generator not a generator": ("t2v", dict(generator=0), "generator"),
    "empty video": ("df", dict(video=[], overlap_history=5), "video"),
    # 8. work refused before it starts
    "100000x100000": ("t2v", dict(height=100000, width=100000), "height"),
}


@pytest.mark.parametrize("kind,kwargs,needle", API_CASES.values(), ids=API_CASES.keys())
def test_every_bad_api_argument_is_one_value_error_naming_it_before_any_work(pipes, kind, kwargs, needle):
    """stream() raises before it returns its generator, so no step ran."""
    kwargs = dict(dict(prompt="a cat", height=32, width=48, num_frames=9, num_inference_steps=1), **kwargs)
    with pytest.raises(ValueError) as e:
        pipes[kind].stream(**kwargs)
    message = str(e.value)
    assert needle in message and len(message.splitlines()) == 1, message


def test_integers_may_be_numpy_ints_and_come_back_normalised():
    s = skyreels.check_settings("df", skyreels.model.CONFIGS["tiny"], skyreels.Settings("a cat", height=np.int64(32), width=48,
                                                            num_frames=np.int32(10)))
    assert (type(s.height), s.num_frames, s.num_inference_steps, s.shift) == (int, 9, 30, 8.0)
    assert s.mode == "df" and s.causal_block_size == 1


def test_planning_a_million_frames_makes_a_handful_of_step_matrices(pipes, monkeypatch):
    """Windows of one size and prefix share one step matrix, so a very long video is planned at once. The work is
    counted, not timed (a clock measures the machine, too): 1,000,001 frames in windows of 97 with 17 overlapping
    are 12,500 windows, and planning them (stream() plans before it returns) makes at most three step matrices: the
    first window's, the one its followers share, and the last, shorter window's (one a window: over a minute)."""
    made, step_matrix = [], schedule.step_matrix

    def counted(*args, **kw):
        made.append(args)
        assert len(made) <= 3, "a step matrix a window"  # at the fourth, not after 12,500 of them
        return step_matrix(*args, **kw)
    monkeypatch.setattr(schedule, "step_matrix", counted)
    pipes["df"].stream("a cat", height=32, width=48, num_frames=1_000_001, base_num_frames=97, overlap_history=17)
    assert made


def test_a_decompression_bomb_is_refused_by_name(monkeypatch, media):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # so that a small image counts as a bomb
    with pytest.raises(ValueError, match="first.png"):
        skyreels.to_pil(str(media / "first.png"), "image")


def test_a_device_this_machine_lacks_is_a_value_error():
    with pytest.raises(ValueError, match="bogus"):
        skyreels.check_device("bogus")
    with pytest.raises(ValueError, match="cuda:99"):
        skyreels.check_device("cuda:99")


# 5. checkpoint folders that are malformed, not just missing

def edit_json(path, change):
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(change(data), f)


def break_weights(folder):
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["proj_out.weight"] = state["proj_out.weight"].to(torch.int32)
    save_file(state, path)


def garbage_spiece(folder):
    with open(os.path.join(folder, "tokenizer", "spiece.model"), "w") as f:
        f.write("not a sentencepiece model")


MALFORMED = {  # kind, how the copy is broken, what the one line must say
    "model_index.json not an object": ("df", lambda f: edit_json(f"{f}/model_index.json", lambda d: [d]),
                                       "not an object"),
    "a config value of the wrong type": ("df", lambda f: edit_json(f"{f}/transformer/config.json",
                                                                   lambda d: dict(d, num_layers="2")), "num_layers"),
    "an integer tensor for a float weight": ("df", break_weights, "proj_out.weight"),
    "a garbage spiece.model": ("df", garbage_spiece, "spiece.model"),
    "an image processor without size": ("i2v", lambda f: edit_json(
        f"{f}/image_processor/preprocessor_config.json", lambda d: {k: v for k, v in d.items() if k != "size"}),
        "size"),
}


@pytest.mark.parametrize("kind,spoil,needle", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_checkpoint_is_one_line_naming_the_file(spoiled_copy, kind, spoil, needle):
    folder = spoiled_copy(kind, "ckpt", spoil)
    with pytest.raises(skyreels.CheckpointError) as e:
        skyreels.load(folder, device="cpu", dtype=torch.float32)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_a_path_or_a_name_not_owner_slash_name_is_a_missing_folder_not_a_download():
    for name in ("no_such_folder", "./no/such", "/no/such/folder", "../x"):
        with pytest.raises(skyreels.CheckpointError, match=f"no model folder at {name}"):
            skyreels.load(name, device="cpu")
    with pytest.raises(skyreels.CheckpointError, match="hf download Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers"):
        skyreels.load("SkyReels-V2-DF-1.3B-540P-Diffusers", device="cpu")


def test_a_failed_download_says_what_failed_and_what_to_do(monkeypatch):
    import huggingface_hub

    def offline(name, **kw):
        raise OSError("Got: ConnectError [Errno -2] Name or service not known\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(skyreels.CheckpointError) as e:
        skyreels.load("Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers", device="cpu")
    assert "could not download Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers" in str(e.value)
    assert "hf download" in str(e.value) and len(str(e.value).splitlines()) == 1


# The CLI: every class above, plus devices and output files (one error line, exit 2, nothing on disk)

CLI_CASES = {
    "nan guidance": (["df", "--guidance-scale", "nan"], "--guidance-scale"),
    "fps 0": (["df", "--fps", "0"], "fps"),
    "seed above 2**64": (["df", "--seed", str(2**64)], "seed"),
    "df-i2v with 1 frame": (["df-i2v", "--image", "{m}/first.png", "--num-frames", "1"], "--num-frames"),
    "v2v num_frames not above overlap_history":
        (["v2v", "--video", "{m}/clip.mp4", "--overlap-history", "9", "--num-frames", "9"], "--overlap-history"),
    "v2v beyond the rotary table": (["v2v", "--video", "{m}/clip.mp4", "--overlap-history", "5", "--height", "1024"],
                                    "rope_max_seq_len"),
    "an extreme aspect ratio": (["df-i2v", "--image", "{m}/strip.png", "NOSIZE"], "aspect ratio"),
    "not an integer": (["df", "--num-frames", "9.5"], "--num-frames"),
    "an undecodable prompt": (["t2v", "--prompt", "a cat \udcff"], "prompt"),
    "a bogus device": (["df", "--device", "bogus"], "bogus"),
    "a CUDA device this machine lacks": (["df", "--device", "cuda:99"], "cuda:99"),
    "a malformed model_index.json": (["df", "--model", "{bad}"], "not an object"),
    "a relative folder that does not exist": (["df", "--model", "no_such_folder"], "no model folder at"),
    "a million by a million": (["t2v", "--height", "1000000", "--width", "1000000"], "height"),
    "--out under a file": (["df", "--out", "{m}/first.png/v.mp4"], "is a file"),
    "a sidecar name that is a folder": (["df", "--out", "{tmp}/taken.mp4"], "taken.json"),
    "--out equal to the input video": (["v2v", "--video", "{tmp}/in.mp4", "--overlap-history", "5",
                                        "--out", "{tmp}/in.mp4"], "overwrite"),
    "--out whose .json is too long a name": (["df", "--out", "{tmp}/" + "v" * 251 + ".mp4"], "over 255 bytes"),
    "a negative cache budget": (["df", "--cache-budget", "-1"], "--cache-budget"),
    "a missing LoRA": (["df", "--lora", "{tmp}/no_such_lora.safetensors"], "no such file"),
}


@pytest.mark.parametrize("argv,needle", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_the_cli_answers_bad_input_with_one_line_exit_2_and_nothing_written(tmp_path, media, spoiled_copy, cli, argv,
                                                                            needle):
    bad = spoiled_copy("df", "bad", lambda f: edit_json(f"{f}/model_index.json", lambda d: [1, 2]))
    (tmp_path / "taken.json").mkdir()
    shutil.copy(media / "clip.mp4", tmp_path / "in.mp4")
    before = sorted(os.listdir(tmp_path))
    model = ["--model", "tiny-i2v" if argv[0] == "i2v" else "tiny-t2v" if argv[0] == "t2v" else "tiny-df"]
    small = SMALL[4:] if "NOSIZE" in argv else SMALL  # without a size, the image's aspect ratio sets it
    full = [argv[0]] + model + ["--prompt", "a cat", "--out", str(tmp_path / "out.mp4")] + small + argv[1:]
    run = cli([a.format(m=media, tmp=tmp_path, bad=bad) for a in full if a != "NOSIZE"])
    err = run.err.strip()
    assert run.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_writer_that_fails_leaves_nothing_and_an_older_video_untouched(tmp_path, monkeypatch, cli):
    """A full disk: ffmpeg fails, imageio does not say so; reading the video back does, and nothing is renamed."""
    (tmp_path / "v.mp4").write_bytes(b"an older video")
    monkeypatch.setattr(sample, "frames_in", lambda path: 0)
    run = cli(["df", "--model", "tiny-df", "--prompt", "a cat", "--num-frames", "5", "--out", tmp_path / "v.mp4"]
              + SMALL)
    err = run.err.strip()
    assert run.code == 2 and err.splitlines()[-1].startswith("error: writing") and "disk full" in err, err
    assert sorted(os.listdir(tmp_path)) == ["v.mp4", "v.state"]  # the state: --resume writes the video again and (tmp_path / "v.mp4").read_bytes() == b"an older video"


def test_no_ffmpeg_is_one_line_before_any_work(tmp_path, monkeypatch, cli):
    """Without imageio-ffmpeg, imageio would hand the .mp4 to another plugin and fail after the whole run."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    monkeypatch.setattr(skyreels, "load", lambda *a, **k: pytest.fail("loaded the weights"))
    run = cli(["df", "--model", "tiny-df", "--prompt", "a cat", "--out", tmp_path / "v.mp4"] + SMALL)
    err = run.err.strip()
    assert run.code == 2 and len(err.splitlines()) == 1 and "pip install imageio-ffmpeg" in err, err
    assert os.listdir(tmp_path) == []


def test_a_json_that_cannot_be_written_leaves_no_video_either(tmp_path, monkeypatch, cli):
    def full_disk(*args, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample.json, "dump", full_disk)
    run = cli(["df", "--model", "tiny-df", "--prompt", "a cat", "--num-frames", "5", "--out", tmp_path / "v.mp4"]
              + SMALL)
    assert run.code == 2 and "No space left" in run.err
    assert os.listdir(tmp_path) == ["v.state"]  # no video; the finished windows, for --resume


def test_out_of_gpu_memory_is_one_line_naming_what_helps_and_keeps_the_finished_windows(tmp_path, monkeypatch, cli):
    """A long video whose second window runs out of GPU memory: one line naming the settings that would help, and the
    first window's frames stay, with a JSON that says they are partial."""
    windows, denoise = iter(range(100)), skyreels.Pipeline.denoise_window

    def second_fails(self, *args, **kw):
        if next(windows) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return denoise(self, *args, **kw)
    monkeypatch.setattr(skyreels.Pipeline, "denoise_window", second_fails)
    run = cli(["df", "--model", "tiny-df", "--prompt", "a cat", "--num-frames", "29", "--base-num-frames", "17",
               "--overlap-history", "5", "--out", tmp_path / "v.mp4"] + SMALL)
    last = run.err.strip().splitlines()[-1]
    assert run.code == 1 and last.startswith("error: out of GPU memory"), last
    assert "--offload" in last and "--base-num-frames" in last and "--cache-budget 0" in last
    record = json.load(open(tmp_path / "v.partial.json"))
    assert record["partial"] and record["frames"] == 17


# 9. a new user's first hour

def test_a_tiny_model_runs_at_its_own_default_size_and_the_json_records_what_was_made(tmp_path, media, cli):
    out = tmp_path / ("v" * 250 + ".mp4")  # a name at the file system's limit (its .json: 255 bytes) works too
    run = cli(["i2v", "--model", "tiny-i2v", "--prompt", "a cat", "--image", media / "first.png", "--num-frames", "6",
               "--steps", "1", "--out", out])
    assert run.code == 0 and run.err.count("rounded down to 5") == 1, run.err
    frames = imageio.mimread(out, memtest=False)
    assert (len(frames), frames[0].shape[:2]) == (5, (64, 80))  # 64x96's area at the image's aspect
    record = json.load(open(str(out)[:-4] + ".json"))
    assert (record["num_frames"], record["frames"], record["partial"]) == (5, 5, False)
    assert (record["num_inference_steps"], record["guidance_scale"], record["shift"]) == (1, 5.0, 5.0)


@pytest.mark.parametrize("mode,steps", [("t2v", 50), ("df", 30), ("v2v", 30)], ids=["t2v", "df", "v2v"])
def test_each_mode_has_its_own_help_with_true_defaults(capsys, mode, steps):
    with pytest.raises(SystemExit):
        sample.parse_args([mode, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {steps})" in text and "None" not in text
    assert ("--video" in text) == (mode == "v2v") and ("--ar-step" in text) == (mode != "t2v")
    assert mode != "v2v" or "num_frames - overlap_history frames are new" in text


# 7. signals, sent to the process group as a terminal sends Ctrl-C

def interrupt(tmp_path, mode_args, sig, after_steps):
    """Run sample.py in a process group of its own; once stderr shows `after_steps` steps, signal the group."""
    out = tmp_path / "v.mp4"
    argv = ["sample.py"] + mode_args[:1] + ["--model", "tiny-df", "--prompt", "a cat", "--height", "32", "--width",
                                            "48", "--out", out] + mode_args[1:]
    code, lines = signal_at(argv, f"step {after_steps}/", sig)
    return code, out, lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_keeps_the_finished_windows_readable_with_a_partial_json(tmp_path, sig):
    code, out, lines = interrupt(tmp_path, ["df", "--num-frames", "1001", "--base-num-frames", "17",
                                            "--overlap-history", "5", "--steps", "1"], sig, 3)
    assert code == 128 + sig
    assert all(line.startswith(("step ", "frame ")) for line in lines[1:-1])  # plain lines: stderr is no terminal
    assert lines[-1].startswith("stopped; ") and "frames finished" in lines[-1], lines[-1]
    record = json.load(open(tmp_path / "v.partial.json"))
    assert record["partial"] and record["frames"] == len(imageio.mimread(tmp_path / "v.partial.mp4",
                                                                         memtest=False)) >= 17
    assert sorted(os.listdir(tmp_path)) == ["v.partial.json", "v.partial.mp4", "v.state"]


def test_ctrl_c_before_any_new_frame_writes_nothing_and_says_so(tmp_path, media):
    """In v2v the input video comes first; it is not a new frame, so nothing is kept. (Ctrl-C comes at the first of
    the first window's 50 steps.)"""
    code, out, lines = interrupt(tmp_path, ["v2v", "--video", str(media / "clip.mp4"), "--overlap-history", "5",
                                            "--num-frames", "401", "--base-num-frames", "17", "--steps", "50"],
                                 signal.SIGINT, 1)
    assert code == 130 and lines[-1].startswith("stopped") and "nothing written" in lines[-1], lines
    assert os.listdir(tmp_path) == ["v.state"]  # the run's settings, no window finished: --resume starts it
