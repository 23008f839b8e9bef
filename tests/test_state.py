"""A film state you can trust (issue 30): the project writes over and removes only what it made, a state holds one
run's identity and refuses a window of any other, its records and the JSON say what made each window, every bound is
checked at the door, and every stop, kill -9 included, ends cleanly.

Each kind is driven through the command line (sample.main in this process, conftest's `cli`; real processes for
signals, which wait on a progress line, never a fixed time) with the flags as typed, and through the API where it has
the argument. Oracle for resumed and re-made videos: the film made uninterrupted, frame for frame (np.array_equal),
as in test_resume.py. tiny-df, float32 on the CPU: a film of 3 windows of one step each.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
import skyreels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILM = ["df", "--model", "tiny-df", "--prompt", "a cat", "--prompt", "a dog", "--height", "32", "--width", "48",
        "--num-frames", "41", "--base-num-frames", "17", "--overlap-history", "5", "--steps", "1", "--seed", "3"]
SETTINGS = dict(prompt=["a cat", "a dog"], height=32, width=48, num_frames=41, base_num_frames=17, overlap_history=5,
                num_inference_steps=1, seed=3)  # FILM's, through the API
LORA_KEY = "diffusion_model.blocks.0.self_attn.q"


def main(argv):  # sample.main for a module fixture, its signal handlers put back (the `cli` fixture does so too)
    handlers = {sig: signal.getsignal(sig) for sig in sample.SIGNALS}
    try:
        sample.main([str(a) for a in argv])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def api():
    return skyreels.load("tiny-df", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """The film made whole with --keep-state: v.mp4, v.json and v.state (3 finished windows)."""
    folder = tmp_path_factory.mktemp("film")
    main(FILM + ["--out", folder / "v.mp4", "--keep-state"])
    return folder


@pytest.fixture
def film(kept, tmp_path):
    """A copy of the kept film to spoil, in tmp_path/film (tmp_path itself stays free for other files)."""
    return shutil.copytree(kept, tmp_path / "film", symlinks=True)


@pytest.fixture(scope="module")
def others(api, tmp_path_factory):
    """States of runs that differ from FILM's in one thing: {what: state folder}, each whole (API)."""
    folder = tmp_path_factory.mktemp("others")
    for name, change in {"seed 4": dict(seed=4), "another first prompt": dict(prompt=["a bird", "a dog"])}.items():
        list(api.stream(**dict(SETTINGS, **change), state=str(folder / name)))
    return {name: folder / name for name in os.listdir(folder)}


def frames(path):
    return np.stack(imageio.mimread(path, memtest=False))


def contents(folder):  # every file under folder, by relative path: its bytes (links followed)
    files = [os.path.join(d, n) for d, _, names in os.walk(folder, followlinks=True) for n in names]
    return {os.path.relpath(f, folder): open(f, "rb").read() for f in files if os.path.isfile(f)}


def one_error(run, needle):  # exit 2, one error line (after the line a long run begins with, if it got that far)
    err = run.err.strip()
    lines = [line for line in err.splitlines() if not line.endswith("denoising steps")]
    assert run.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def lora(path, seed):
    """A rank-2 LoRA on one weight of the tiny DiT, in the original naming."""
    g = torch.Generator().manual_seed(seed)
    save_file({f"{LORA_KEY}.lora_down.weight": torch.randn(2, 24, generator=g),
               f"{LORA_KEY}.lora_up.weight": torch.randn(24, 2, generator=g)}, str(path))
    return str(path)


@pytest.fixture
def no_loading(monkeypatch):  # refusals come before any weight is read
    monkeypatch.setattr(skyreels, "load", lambda *a, **k: pytest.fail("loaded the weights"))


# ----------------------------------------------------------------------------------------------------------------
# 1. It writes over and removes only what it made


def symlink_to_nowhere(path):
    os.symlink(path + ".gone", path)


NOT_A_STATE = {  # what the user has at NAME.state
    "a folder of the user's": lambda path: os.makedirs(path) or open(os.path.join(path, "notes.txt"), "w").close(),
    "a file": lambda path: open(path, "w").close(),
    "a link to nowhere": symlink_to_nowhere,
}


@pytest.mark.parametrize("what", list(NOT_A_STATE))
def test_anything_but_a_state_at_its_name_is_refused_before_any_work_and_left_as_it_is(tmp_path, api, cli, no_loading,
                                                                                        what):
    state = str(tmp_path / "v.state")
    NOT_A_STATE[what](state)
    before = sorted(os.listdir(tmp_path)), contents(tmp_path)
    one_error(cli(FILM + ["--out", tmp_path / "v.mp4"]), f"{state} exists and is not a state folder")
    with pytest.raises(ValueError, match="is not a state folder"):
        api.stream(**SETTINGS, state=state)
    assert (sorted(os.listdir(tmp_path)), contents(tmp_path)) == before


@pytest.mark.parametrize("state", ["", 7], ids=["an empty path", "not a path"])
def test_a_state_that_is_no_path_is_refused(api, state):
    with pytest.raises(ValueError, match="state must be a folder's path"):
        api.stream(**SETTINGS, state=state)


@pytest.mark.parametrize("flag", ["--prompt-file", "--image"])
def test_an_input_inside_the_state_folder_is_refused(film, cli, no_loading, flag):
    """The state folder is written and, once the film is whole, removed: nothing in it may be an input."""
    inside = film / "v.state" / ("shots.txt" if flag == "--prompt-file" else "first.png")
    if flag == "--prompt-file":
        inside.write_text("a cat\n")
        argv = [a for a in FILM if a not in ("--prompt", "a cat", "a dog")] + [flag, inside]
    else:
        Image.new("RGB", (48, 32)).save(inside)
        argv = ["df-i2v"] + FILM[1:] + [flag, inside]
    before = contents(film)
    one_error(cli(argv + ["--out", film / "v.mp4", "--resume"]), f"over the input {inside}")
    assert contents(film) == before


def users_notes(state):
    (state / "notes.txt").write_text("mine")


def linked_elsewhere(state):
    shutil.move(state, state.parent.parent / "elsewhere.state")
    os.symlink(state.parent.parent / "elsewhere.state", state)


@pytest.mark.parametrize("change,left", [(users_notes, ["notes.txt"]), (linked_elsewhere, [])],
                         ids=["the user's notes in it stay, and so does the folder", "a link to it stays"])
def test_a_finished_run_removes_only_the_files_it_wrote(film, kept, cli, change, left):
    change(film / "v.state")
    run = cli(FILM + ["--out", film / "v.mp4", "--resume"])
    assert run.code == 0, run.err
    assert np.array_equal(frames(film / "v.mp4"), frames(kept / "v.mp4"))
    assert sorted(os.listdir(film / "v.state")) == left


def test_a_plan_over_an_input_is_refused(tmp_path, cli):
    Image.new("RGB", (48, 32)).save(tmp_path / "first.png")
    run = cli(["df-i2v"] + FILM[1:] + ["--image", tmp_path / "first.png", "--out", tmp_path / "v.mp4", "--plan",
                                       tmp_path / "first.png"])
    one_error(run, "would overwrite")


# ----------------------------------------------------------------------------------------------------------------
# 2. No film mixed from two runs: the checkpoint's files by content, each window checksummed and chained


def flip_a_bit_of_its_latents(path, others):
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["latents"].view(torch.int32)[0, 0, 0, 0, 0] ^= 1
    save_file(tensors, path, metadata=metadata)


def without(key, sliced=None):
    def spoil(path, others):
        with safe_open(path, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors[key] = tensors[key][:sliced] if sliced else tensors.pop(key)
        save_file({k: v for k, v in tensors.items() if k != key or sliced}, path, metadata=metadata)
    return spoil


def from_another_run(run, window):
    def spoil(path, others):
        shutil.copy(others[run] / f"window-{window:04d}.safetensors", path)
    return spoil


def without_its_record(path, others):
    save_file(load_file(path), path)


BAD_WINDOWS = {  # (window, what is done to its file, what the error names)
    "a bit of its latents flipped": (1, flip_a_bit_of_its_latents, "checksum"),
    "copied from a run with another seed": (1, from_another_run("seed 4", 1), "its seed is 4, not 3"),
    "one that follows another run's window 1": (2, from_another_run("another first prompt", 2), "its follows is"),
    "without its RNG state": (2, without("rng"), "rng is missing"),
    "with a wrong-sized RNG state": (2, without("rng", 100), "rng is torch.uint8 (100,)"),
    "without its generator's state": (1, without("generator"), "generator is missing"),
    "without its record": (3, without_its_record, "no record"),
}


@pytest.mark.parametrize("case", list(BAD_WINDOWS))
def test_a_window_file_not_of_this_run_is_refused_before_any_frame_is_written(film, api, others, cli, case):
    """Each kept window is read whole and checked before the first frame: no NAME.partial.* comes of a bad state."""
    window, spoil, needle = BAD_WINDOWS[case]
    path = str(film / "v.state" / f"window-{window:04d}.safetensors")
    spoil(path, others)
    before = contents(film)
    run = cli(FILM + ["--out", film / "v.mp4", "--resume"])
    one_error(run, needle)
    assert path in run.err and contents(film) == before
    with pytest.raises(skyreels.CheckpointError, match=re.escape(needle)):
        api.stream(**SETTINGS, state=str(film / "v.state"), resume=True)


@pytest.mark.parametrize("rewrite,refused", [(True, True), (False, False)],
                         ids=["a LoRA rewritten at its path is refused", "one LoRA by a relative path is the same"])
def test_a_lora_is_known_by_its_content_not_its_path(tmp_path, cli, monkeypatch, rewrite, refused):
    path = lora(tmp_path / "style.safetensors", 0)
    argv = FILM + ["--out", tmp_path / "v.mp4", "--keep-state"]
    assert cli(argv + ["--lora", path]).code == 0
    first = frames(tmp_path / "v.mp4")
    if rewrite:
        lora(path, 1)
    monkeypatch.chdir(tmp_path)
    run = cli(argv + ["--lora", "style.safetensors", "--resume"])
    if refused:
        one_error(run, "--lora differs from the state's")
    else:
        assert run.code == 0 and np.array_equal(frames(tmp_path / "v.mp4"), first), run.err


def test_a_files_identity_is_its_content_and_a_folders_its_files_headers(tmp_path, tiny_folders):
    lora(tmp_path / "a.safetensors", 0)
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert skyreels.content_id(str(tmp_path / "a.safetensors")) == skyreels.content_id(str(tmp_path / "b.safetensors"))
    lora(tmp_path / "b.safetensors", 1)  # the same names and shapes: only the content tells
    assert skyreels.content_id(str(tmp_path / "a.safetensors")) != skyreels.content_id(str(tmp_path / "b.safetensors"))
    folder = shutil.copytree(tiny_folders["df"], tmp_path / "df")
    before = skyreels.content_id(str(folder))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v[:1].contiguous() if k.endswith("bias") else v for k, v in load_file(weights).items()}, weights)
    assert skyreels.content_id(str(folder)) != before


# ----------------------------------------------------------------------------------------------------------------
# 3. Records that tell the truth


def test_after_a_redo_the_json_and_the_state_say_what_made_each_window(film, cli):
    run = cli(FILM[:FILM.index("--seed")] + ["--prompt", "a bird", "--seed", "5", "--redo-from", "3", "--out",
                                             film / "v.mp4", "--keep-state"])
    assert run.code == 0, run.err
    record = json.load(open(film / "v.json"))
    assert record["window_prompts"] == ["a cat", "a dog", "a bird"] and record["window_seeds"] == [3, 3, 5]
    windows = json.load(open(film / "v.state" / "settings.json"))["windows"]
    assert windows == [dict(prompt="a cat", seed=3), dict(prompt="a dog", seed=3), dict(prompt="a bird", seed=5)]


@pytest.mark.parametrize("flags", [["--resume"], ["--redo-from", "2"]], ids=["--resume", "--redo-from 2"])
def test_the_passes_counted_are_the_whole_films(film, kept, cli, flags):
    assert cli(FILM + ["--out", film / "v.mp4"] + flags).code == 0
    assert json.load(open(film / "v.json"))["dit_passes"] == json.load(open(kept / "v.json"))["dit_passes"] == 6


def edit_settings(change):
    def spoil(state):
        path = state / "settings.json"
        record = json.load(open(path))
        change(record)
        path.write_text(json.dumps(record))
    return spoil


def nested(state):
    (state / "settings.json").write_text("[" * 100_000)


BAD_SETTINGS = {  # what is done to settings.json, what the error names
    "a string seed": (edit_settings(lambda r: r["windows"][0].update(seed="3")), "settings.json: windows must be"),
    "a window without its prompt": (edit_settings(lambda r: r["windows"][1].pop("prompt")), "windows must be"),
    "100,000 nested brackets": (nested, "cannot read"),
    "another size": (edit_settings(lambda r: r.update(height=64)), "height differs from the state's"),
    "another checkpoint": (edit_settings(lambda r: r.update(model="SkyReels-V2-DF-14B-540P")), "model differs"),
    "not this project's format": (edit_settings(lambda r: r.pop("format")), "format is None"),
    "another count of windows": (edit_settings(lambda r: r["windows"].pop()), "2 windows' prompts"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_settings_json_that_does_not_fit_is_one_line_naming_the_file_or_field(film, api, cli, case):
    spoil, needle = BAD_SETTINGS[case]
    spoil(film / "v.state")
    before = contents(film)
    run = cli(FILM + ["--out", film / "v.mp4", "--resume"])
    one_error(run, needle.replace("height", "--height").replace("model", "--model"))
    assert contents(film) == before
    with pytest.raises(ValueError, match=needle):
        api.stream(**SETTINGS, state=str(film / "v.state"), resume=True)


def test_the_state_folder_is_read_once(film, api, monkeypatch):
    reads, read_json = [], skyreels.read_json
    monkeypatch.setattr(skyreels, "read_json", lambda path: reads.append(path) or read_json(path))
    list(api.stream(**SETTINGS, state=str(film / "v.state"), resume=True))
    assert [os.path.basename(path) for path in reads] == ["settings.json"]


# ----------------------------------------------------------------------------------------------------------------
# 4. Bounds and refusals at the door


def test_redo_from_past_the_last_window_is_refused(film, api, cli, no_loading):
    before = contents(film)
    one_error(cli(FILM + ["--out", film / "v.mp4", "--redo-from", "4"]), "--redo-from 4: ")
    with pytest.raises(ValueError, match="redo one of 1 .. 3"):
        api.stream(**SETTINGS, state=str(film / "v.state"), redo_from=4)
    assert contents(film) == before


BAD_PROMPT_FILES = {
    "NUL bytes": (b"\0\0\0\n", "it holds '\\x00'"),
    "not UTF-8": (b"\xff\xfea cat\n", "as UTF-8 text"),
    "over 1 MiB": (b"a cat\n" * 200_000, f"over {2**20} bytes"),
    "/dev/zero": (None, f"over {2**20} bytes"),
    "empty": (b"\n  \n", "holds no prompt"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPT_FILES))
def test_a_prompt_file_that_is_not_text_is_refused_in_one_line(tmp_path, cli, no_loading, case):
    data, needle = BAD_PROMPT_FILES[case]
    path = "/dev/zero" if data is None else tmp_path / "shots.txt"
    if data is not None:
        path.write_bytes(data)
    argv = [a for a in FILM if a not in ("--prompt", "a cat", "a dog")] + ["--prompt-file", path]
    run = cli(argv + ["--out", tmp_path / "v.mp4"])
    one_error(run, f"--prompt-file {path}")
    assert needle in run.err


PROMPT_FILES = {  # the files (bytes), the windows' prompts --plan prints
    "a byte-order mark is dropped": ([b"\xef\xbb\xbfa cat\r\na dog\r\n"], ["a cat", "a dog", "a dog"]),
    "given twice, read in order": ([b"a cat\n", b"a dog\na bird\n"], ["a cat", "a dog", "a bird"]),
}


@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_prompt_files(tmp_path, cli, case):
    files, prompts = PROMPT_FILES[case]
    argv = [a for a in FILM if a not in ("--prompt", "a cat", "a dog")]
    for i, data in enumerate(files):
        (tmp_path / f"{i}.txt").write_bytes(data)
        argv += ["--prompt-file", tmp_path / f"{i}.txt"]
    run = cli(argv + ["--out", tmp_path / "v.mp4", "--plan"])
    assert [line.split("prompt: ")[1] for line in run.out.splitlines()[1:]] == prompts, run.out


def test_control_characters_in_a_prompt_are_shown_escaped(tmp_path, cli):
    run = cli(FILM + ["--prompt", "a bird\x1b[2J", "--out", tmp_path / "v.mp4", "--plan"])
    assert run.out.splitlines()[-1].endswith("prompt: a bird\\x1b[2J") and "\x1b" not in run.out, run.out


def test_offload_on_a_tiny_model_is_a_note(capsys):
    skyreels.note.cache_clear()
    skyreels.load("tiny-df", device="cpu", dtype=torch.float32, offload=True)
    assert "note: offload is for model folders" in capsys.readouterr().err


def duplicate_key(path):  # a safetensors file whose header names its one tensor twice
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],' \
             b'"data_offsets":[0,4]}}'
    open(path, "wb").write(len(header).to_bytes(8, "little") + header + bytes(4))


def dit_with(extra):
    def write(path, folder):  # the tiny DF folder's DiT as one file (its own names), and `extra`
        save_file(dict(load_file(f"{folder}/transformer/diffusion_pytorch_model.safetensors"), **extra), path)
    return write


FP8_FILES = {  # how the file is made, as what it is given, what the error names
    "a header naming a key twice": (lambda path, folder: duplicate_key(path), "--lora", "names x twice"),
    "an input scale of no layer": (dit_with({"blocks.7.attn1.to_q.input_scale": torch.tensor(1.0)}), "--transformer",
                                   "is the input scale of no fp8 weight"),
    "the scaled_fp8 marker alone": (dit_with({"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}),
                                    "--transformer", "fp8 markers or scales but no fp8 weight"),
}


@pytest.mark.parametrize("case", list(FP8_FILES))
def test_a_weight_file_that_lies_is_refused_in_one_line(tmp_path, tiny_folders, cli, case):
    make, flag, needle = FP8_FILES[case]
    path = str(tmp_path / "file.safetensors")
    make(path, tiny_folders["df"])
    model = "tiny-df" if flag == "--lora" else tiny_folders["df"]
    argv = ["df", "--model", model, "--prompt", "a cat", "--height", "32", "--width", "48", "--num-frames", "5",
            "--steps", "1", flag, path, "--out", tmp_path / "v.mp4"]
    one_error(cli(argv), needle)
    assert sorted(os.listdir(tmp_path)) == ["file.safetensors"]


def test_a_plan_picture_beyond_the_bound_is_one_line(tmp_path, cli):
    run = cli(FILM + ["--steps", "1000", "--out", tmp_path / "v.mp4", "--plan", tmp_path / "plan.png"])
    one_error(run, "--plan: the picture would be")


# ----------------------------------------------------------------------------------------------------------------
# 5. Refused before the work, not after it


@pytest.mark.parametrize("folder", ["video.mp4", "v.partial.mp4"], ids=["the video", "the partial video"])
def test_an_output_that_is_a_folder_is_refused_before_any_work(tmp_path, cli, no_loading, folder):
    (tmp_path / folder).mkdir()
    out = tmp_path if folder == "video.mp4" else tmp_path / "v.mp4"  # --out a folder: video.mp4 in it
    one_error(cli(FILM + ["--out", out]), f": {tmp_path / folder} is a folder")


# ----------------------------------------------------------------------------------------------------------------
# 6. Every stop ends cleanly: a storm of signals, kill -9


LONG = FILM + ["--num-frames", "401"]  # 33 windows: time enough to stop it in the middle


def start(out):
    return subprocess.Popen([sys.executable, "sample.py"] + LONG + ["--out", str(out)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(p, line):
    for got in p.stderr:
        if got.startswith(line):
            return
    pytest.fail(f"no line {line!r}")


def test_a_storm_of_ctrl_c_through_the_stop_ends_in_130_with_a_whole_partial(tmp_path):
    p = start(tmp_path / "v.mp4")
    wait_for(p, "step 2/")

    def storm():  # Ctrl-C after Ctrl-C until the process has ended
        while p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
            except ProcessLookupError:
                break
            threading.Event().wait(0.001)
    sender = threading.Thread(target=storm)
    sender.start()
    err = p.stderr.read()
    sender.join()
    assert p.wait() == 130 and "Traceback" not in err and err.splitlines()[-1].startswith("stopped; "), err
    record = json.load(open(tmp_path / "v.partial.json"))
    assert record["partial"] and record["frames"] == len(frames(tmp_path / "v.partial.mp4")) >= 17


def ffmpegs_writing_in(folder):  # the processes writing a temporary file there (ffmpeg's command line names it)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{folder}/.sample-".encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(pid)
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dying with the parent is Linux's prctl")
def test_after_kill_9_no_ffmpeg_lives_on_and_a_resume_leaves_no_temporary_file(tmp_path):
    p = start(tmp_path / "v.mp4")
    wait_for(p, "step 2/")  # window 1 is in the mp4 being written: ffmpeg runs
    assert ffmpegs_writing_in(tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -9
    for _ in range(200):  # the kernel sends ffmpeg SIGKILL as we die; its exit may take a moment to show
        if not ffmpegs_writing_in(tmp_path):
            break
        threading.Event().wait(0.05)
    assert not ffmpegs_writing_in(tmp_path)
    assert any(name.startswith(".sample-") for name in os.listdir(tmp_path))  # what the killed run left
    live = tmp_path / f".sample-{os.getpid()}.json"  # a live process's temporary file is not touched
    live.write_text("{}")
    resumed = subprocess.run([sys.executable, "sample.py"] + LONG + ["--out", str(tmp_path / "v.mp4"), "--resume"],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(os.listdir(tmp_path)) == [live.name, "v.json", "v.mp4"]
