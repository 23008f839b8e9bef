"""--plan: the windows as text, and with a .png the step matrices as a figure, before any weight is read.

The figure is read back as pixels: each panel's step matrix is outlined in sample.OUTLINE, so the outlines give the
panels' number, place and cell size; known frames and the legend's swatch for them are sample.KNOWN. tiny-df is
built in memory and --plan never loads it, so every case is instant.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "A cat and a dog baking a cake together in a kitchen."
SEED = ["df", "--model", "tiny-df", "--prompt", PROMPT, "--num-frames", "97", "--steps", "30", "--ar-step", "5",
        "--causal-block-size", "5"]  # the seed document's step-matrix example: 25 latent frames, 50 steps
FILM = SEED + ["--num-frames", "737", "--base-num-frames", "97", "--overlap-history", "17"]  # 9 windows; later wins


def matrices(path):
    """Each panel's step matrix as drawn, left to right: (left, top, width) inside its outline, in pixels."""
    picture = np.asarray(Image.open(path).convert("RGB"))
    red = np.all(picture == sample.OUTLINE, axis=-1)
    top = red.sum(1).argmax()  # the outlines' top edges share a row: the one with the most outline colour
    edges = np.flatnonzero(np.diff(np.r_[0, red[top].astype(int), 0]))  # where each run of it starts and ends
    return [(a + 2, top + 2, b - a - 4) for a, b in zip(edges[::2], edges[1::2]) if b - a > 30]  # not the legend's


def shade(path, frame, step):
    """The grey at the middle of one cell (latent frame, denoising step: from 1) of the seed's example's panel."""
    (left, top, width), = matrices(path)
    cell = width // 25
    return np.asarray(Image.open(path).convert("L"))[top + (step - 1) * cell + cell // 2,
                                                     left + (frame - 1) * cell + cell // 2]


@pytest.mark.parametrize("argv,frames", [
    (SEED, [25]),
    (FILM, [25, 25]),
    (SEED + ["--num-frames", "217", "--base-num-frames", "97", "--overlap-history", "17"], [25, 25, 15]),
], ids=["the seed's example: one window", "a 737-frame film: the first window, then 8 alike",
        "a film whose last window is shorter"])
def test_a_panel_per_distinct_window_readable_and_within_the_bound(tmp_path, cli, argv, frames):
    run = cli(argv + ["--out", tmp_path / "v.mp4", "--plan", tmp_path / "plan.png"])
    assert run.code == 0, run.err
    assert max(Image.open(tmp_path / "plan.png").size) <= sample.PICTURE_MAX
    widths = [width for _, _, width in matrices(tmp_path / "plan.png")]
    cell = widths[0] // frames[0]
    assert widths == [f * cell for f in frames] and cell >= 8  # 8 pixels a cell or more: each step a visible row


def test_a_cell_is_the_frames_timestep_after_its_rows_step_so_a_finished_frame_is_black(tmp_path, cli):
    """The seed's first block takes its 30 steps in rows 1-30, its last block in rows 21-50 (ar_step 5 apart)."""
    cli(SEED + ["--out", tmp_path / "v.mp4", "--plan", tmp_path / "plan.png"])
    picture = tmp_path / "plan.png"
    assert shade(picture, 1, 30) == 0 and shade(picture, 1, 29) > 0  # its last step's timestep is 216, not 0
    assert shade(picture, 25, 50) == 0 and shade(picture, 25, 49) > 0
    assert shade(picture, 25, 20) == 255  # not started: noise, timestep 999


def test_known_frames_and_the_legends_swatch_are_blue(tmp_path, cli):
    swatch = 19 * 15  # the legend's square beside "known frame"
    cli(SEED + ["--out", tmp_path / "v.mp4", "--plan", tmp_path / "one.png"])
    cli(FILM + ["--out", tmp_path / "v.mp4", "--plan", tmp_path / "film.png"])
    blue = [np.all(np.asarray(Image.open(tmp_path / name).convert("RGB")) == sample.KNOWN, axis=-1).sum()
            for name in ("one.png", "film.png")]
    cell = matrices(tmp_path / "film.png")[1][2] // 25
    assert blue == [swatch, swatch + (5 * cell) * (45 * cell)]  # windows 2-9: 5 latent frames known, 45 steps


def test_the_text_says_windows_denoising_steps_and_causal_blocks(tmp_path, cli):
    run = cli(SEED + ["--out", tmp_path / "v.mp4", "--plan", tmp_path / "Plan.PNG"])  # .png in any case
    assert run.out.splitlines() == [
        "1 window, 50 denoising steps",
        f"window 1: frames 1-97, 50 steps, 0 latent frames known, blocks 5+5+5+5+5, prompt: {PROMPT}",
        str(tmp_path / "Plan.PNG")]
    assert os.listdir(tmp_path) == ["Plan.PNG"]


@pytest.mark.parametrize("plan,extra,needle", [
    ("{tmp}/plan.jpg", [], "--plan must name a .png file"),
    ("{tmp}/folder.png", [], "--plan must name a .png file, not a folder"),
    ("{tmp}/missing/plan.png", [], "cannot write --plan"),
    ("{tmp}/first.png", ["--image", "{tmp}/first.png"], "--plan {tmp}/first.png would overwrite"),
    ("{tmp}/plan.png", ["--steps", "1000", "--causal-block-size", "1"], "--plan: the picture would be"),
], ids=["not a .png", "a folder", "a missing folder", "the input image", "a picture beyond the bound"])
def test_a_plan_path_that_cannot_be_written_is_one_line_naming_the_flag(tmp_path, cli, plan, extra, needle):
    (tmp_path / "folder.png").mkdir()
    Image.new("RGB", (48, 32)).save(tmp_path / "first.png")
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    argv = SEED + [a.format(tmp=tmp_path) for a in extra] + ["--out", tmp_path / "v.mp4", "--plan",
                                                             plan.format(tmp=tmp_path)]
    run = cli(["df-i2v" if extra[:1] == ["--image"] else "df"] + argv[1:])
    assert run.code == 2 and len(run.err.splitlines()) == 1 and needle.format(tmp=tmp_path) in run.err, run.err
    assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == before  # nothing written


def test_a_reader_that_stops_early_is_no_error_and_the_picture_is_written(tmp_path):
    """`--plan plan.png | head -3`: here the pipe is closed before the first line, so the write surely fails."""
    p = subprocess.Popen([sys.executable, "sample.py"] + FILM + ["--out", tmp_path / "v.mp4", "--plan",
                                                                 tmp_path / "plan.png"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    assert p.wait(timeout=120) == 0 and p.stderr.read() == ""
    assert os.listdir(tmp_path) == ["plan.png"]
