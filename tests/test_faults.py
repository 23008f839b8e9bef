"""Nothing silently wrong, nothing clobbered, every stop clean (issue 21): one test a kind of fault, through the API
and the CLI. Bad input is one line naming the argument (a ValueError; on the CLI `error:`, exit 2, the flag as
typed) before any work; a stopped run keeps its finished windows beside a complete video, never over it.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sample
import skyreels
from conftest import ROOT, signal_at

TINY = ["--model", "tiny-df", "--prompt", "a cat", "--height", "32", "--width", "48", "--steps", "1", "--seed", "0"]
LORA_KEY = "diffusion_model.blocks.0.self_attn.q"


@pytest.fixture(scope="module")
def df():
    return skyreels.load("tiny-df", device="cpu", dtype=torch.float32)


def lora(path, down=None, metadata=None):
    """A rank-2 LoRA on one weight of the tiny DiT (24 wide), in the original naming."""
    down = torch.randn(2, 24) if down is None else down
    save_file({f"{LORA_KEY}.lora_down.weight": down, f"{LORA_KEY}.lora_up.weight": torch.randn(24, 2)}, str(path),
              metadata=metadata)
    return str(path)


def cli(argv, capsys):
    """sample.main in this process: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        sample.main(argv)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


# 1. silently wrong numbers: refused at the door, or stopped at the step where they appear

BAD_LORAS = {
    "NaN in a LoRA": (dict(down=torch.full((2, 24), float("nan"))), "NaN or inf"),
    "an integer LoRA": (dict(down=torch.ones(2, 24, dtype=torch.int32)), "floating-point"),
    "metadata that is not JSON": (dict(metadata={"lora_adapter_metadata": "{not json"}), "not a JSON object"),
    "metadata that is not an object": (dict(metadata={"lora_adapter_metadata": "[1]"}), "not a JSON object"),
    "an alpha that is not a number": (dict(metadata={"lora_adapter_metadata": '{"lora_alpha": "8"}'}), "lora_alpha"),
}


@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_a_lora_that_cannot_be_right_is_one_line_naming_the_file(tmp_path, df, capsys, case):
    kwargs, needle = BAD_LORAS[case]
    path = lora(tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(ValueError, match=needle):
        df.load_lora(path)
    code, err = cli(["df"] + TINY + ["--lora", path, "--out", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and len(err) == 1 and "bad.safetensors" in err[0] and needle in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True], ids=["nan", "inf", "a string", "a bool"])
def test_a_lora_scale_that_is_not_a_finite_number_is_refused(tmp_path, df, scale):
    with pytest.raises(ValueError, match="scale"):
        df.load_lora(lora(tmp_path / "ok.safetensors"), scale=scale)


@pytest.mark.parametrize("flag,value", [("--guidance-scale", "1e308"), ("--shift", "1e308"),
                                        ("--addnoise-condition", "1e6"), ("--cache-budget", "1e300"),
                                        ("--fps", "1000000000"), ("--num-frames", "1000000000")])
def test_numbers_beyond_what_the_math_carries_are_refused_by_flag(tmp_path, capsys, flag, value):
    extra = ["--causal-block-size", "1"] if flag != "--cache-budget" else ["--causal-block-size", "3"]
    code, err = cli(["df"] + TINY + [flag, value, "--out", str(tmp_path / "v.mp4")] + extra, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} must be"), err
    assert os.listdir(tmp_path) == []


def test_latents_that_stop_being_finite_stop_the_run_naming_the_step_and_keep_finished_windows(tmp_path, monkeypatch,
                                                                                                capsys):
    """The last line of defence: a DiT that starts returning NaN in the second window (as a bad weight would)."""
    calls, forward = [0], skyreels.model.DiT.forward

    def nan_later(self, x, *a, **k):
        calls[0] += 1
        out = forward(self, x, *a, **k)
        return out * float("nan") if calls[0] > 4 else out  # 2 steps, CFG: 4 passes a window
    monkeypatch.setattr(skyreels.model.DiT, "forward", nan_later)
    code, err = cli(["df"] + TINY + ["--steps", "2", "--num-frames", "29", "--base-num-frames", "17",
                                     "--overlap-history", "5", "--out", str(tmp_path / "v.mp4")], capsys)
    assert code == 2 and err[-1].startswith("error: the latents stopped being finite (NaN or inf) at step 3"), err
    record = json.load(open(tmp_path / "v.partial.json"))
    assert record["partial"] and record["frames"] == 17 and not (tmp_path / "v.mp4").exists()


# 2. accepted and ignored: a flag that cannot apply is an error

@pytest.mark.parametrize("argv,needle", [
    (["--transformer", "{tmp}/dit.safetensors"], "--transformer: the tiny-* models"),
    (["--cache-budget", "1"], "--cache-budget is for the asynchronous shortcuts"),
    (["--fps", "30"], "--fps must be 16 or 24"),
], ids=["a one-file DiT for a tiny model", "a cache budget without causal blocks", "fps a DF model has no embedding for"])
def test_a_flag_that_cannot_apply_is_an_error(tmp_path, capsys, argv, needle):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "dit.safetensors"))
    code, err = cli(["df"] + TINY + [a.format(tmp=tmp_path) for a in argv] + ["--out", str(tmp_path / "v.mp4")],
                    capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_the_api_refuses_a_transformer_file_for_a_tiny_model(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "dit.safetensors"))
    with pytest.raises(ValueError, match="transformer"):
        skyreels.load("tiny-df", transformer=str(tmp_path / "dit.safetensors"))


# 3. outputs that would overwrite inputs: checked in one place, for every output path

@pytest.mark.parametrize("out,needle", [
    ("{ckpt}/model_index.mp4", "model_index"),
    ("{tmp}/style.mp4", "style"),
    ("{tmp}/first.mp4", "first"),
], ids=["its JSON over the checkpoint's model_index.json", "over a LoRA file", "its JSON over the image"])
def test_no_output_may_land_on_or_inside_an_input(tmp_path, tiny_folders, capsys, out, needle):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_folders["df"], ckpt)
    lora(tmp_path / "style.mp4")  # a LoRA file of any name
    Image.new("RGB", (48, 32)).save(tmp_path / "first.json", format="PNG")
    before = {p: os.path.getmtime(p) for p in (ckpt / "model_index.json", tmp_path / "style.mp4")}
    argv = ["df-i2v", "--model", str(ckpt), "--prompt", "a", "--image", str(tmp_path / "first.json"), "--lora",
            str(tmp_path / "style.mp4"), "--steps", "1", "--height", "32", "--width", "48", "--num-frames", "5",
            "--out", out.format(ckpt=ckpt, tmp=tmp_path)]
    code, err = cli(argv, capsys)
    assert code == 2 and len(err) == 1 and "over the input" in err[0] and needle in err[0], err
    assert {p: os.path.getmtime(p) for p in before} == before


# 4 and 5. signals: a stop never replaces a complete video; every signal ends in one line, 128 + its number

def signal_run(tmp_path, ready, sig, times=1, python=()):
    """A long tiny DF run (401 frames, windows of 17, one step each) signalled at its first stderr line that `ready`
    accepts (conftest.signal_at): (exit code, stderr lines)."""
    argv = list(python) + ["sample.py", "df"] + TINY + ["--num-frames", "401", "--base-num-frames", "17",
                                                        "--overlap-history", "5", "--out", tmp_path / "v.mp4"]
    return signal_at(argv, ready, sig, times)


@pytest.mark.parametrize("sig,times", [(signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGINT, 2),
                                       (signal.SIGINT, 30)],
                         ids=["SIGTERM", "SIGHUP (a closed terminal)", "a second Ctrl-C", "a storm of Ctrl-C"])
def test_a_stop_keeps_the_finished_windows_beside_an_older_complete_video(tmp_path, sig, times):
    (tmp_path / "v.mp4").write_bytes(b"an older complete video")
    (tmp_path / "v.json").write_text("{}")
    code, lines = signal_run(tmp_path, "step 2/", sig, times)
    assert code == 128 + sig and lines[-1].startswith("stopped; ") and "v.partial.mp4" in lines[-1], lines[-3:]
    assert not any("Traceback" in line for line in lines), lines
    assert (tmp_path / "v.mp4").read_bytes() == b"an older complete video"
    record = json.load(open(tmp_path / "v.partial.json"))
    assert record["partial"] and record["frames"] == len(imageio.mimread(tmp_path / "v.partial.mp4", memtest=False))
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4", "v.partial.json", "v.partial.mp4", "v.state"]


def importing_torch(line):
    """A line of `python -X importtime` for a torch module: one has been imported, so torch's import is under way
    (and sample.main, which imports it, has installed its handlers)."""
    return line.startswith("import time:") and line.rpartition("|")[2].strip().startswith("torch")


def test_ctrl_c_while_torch_imports_is_one_line_and_130(tmp_path):
    code, lines = signal_run(tmp_path, importing_torch, signal.SIGINT, python=["-X", "importtime"])
    err = "".join(line for line in lines if not line.startswith("import time:")).strip().splitlines()
    assert code == 130 and len(err) == 1 and err[0].startswith("stopped"), err
    assert os.listdir(tmp_path) == []


# 6. the API's arguments: one line naming the argument and what is accepted

@pytest.mark.parametrize("kwargs,needle", [
    (dict(path="tiny-xyz"), "tiny-t2v"), (dict(path=None), "path"), (dict(loras="style.safetensors"), "loras"),
    (dict(dtype="float32"), "dtype"), (dict(dtype=torch.int64), "dtype"), (dict(device="meta"), "meta"),
    (dict(device=0), "device 0" if not torch.cuda.is_available() else "?"), (dict(vae_dtype="fp32"), "vae_dtype"),
    (dict(fp8="no"), "fp8"), (dict(offload=1), "offload"), (dict(compile=None), "compile"),
], ids=["an unknown tiny model", "no path", "loras as one string", "dtype as a string", "an integer dtype",
        "the meta device", "device 0 on a machine without CUDA", "vae_dtype as a string", "fp8 as a string",
        "offload as a number", "compile as None"])
def test_load_refuses_arguments_it_cannot_use_in_one_line(kwargs, needle):
    if needle == "?":
        pytest.skip("this machine has a GPU")
    kwargs = dict(dict(path="tiny-df", device="cpu", dtype=torch.float32), **kwargs)
    with pytest.raises(ValueError) as e:
        skyreels.load(kwargs.pop("path"), **kwargs)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_a_lora_scale_in_e_notation_is_a_scale():
    assert sample.lora_arg("style.safetensors:1e-3") == ("style.safetensors", 1e-3)
    assert sample.lora_arg("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)


# 8. quiet surprises, said or fixed

def test_a_16_bit_grey_image_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((32, 48), 32768, np.uint16)).save(tmp_path / "grey.png")
    assert np.asarray(skyreels.to_pil(str(tmp_path / "grey.png"), "image"))[0, 0].tolist() == [128, 128, 128]


def test_seed_minus_one_is_a_random_seed_recorded_in_the_json(tmp_path, capsys):
    sample.main(["df"] + TINY[:-2] + ["--seed", "-1", "--num-frames", "5", "--out", str(tmp_path / "v.mp4")])
    assert 0 <= json.load(open(tmp_path / "v.json"))["seed"] < 2**31


def test_a_long_prompt_is_cut_once_with_a_note(df, capsys):
    df.generate("a cat " * 400, height=32, width=48, num_frames=5, num_inference_steps=1, seed=0)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cut to 512 tokens" in notes[0], notes


def test_a_tiny_model_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """Its tokenizer file goes through a temporary folder, which must go. The test's own temporary root, not the
    shared one: anything else on the machine may make folders there meanwhile."""
    root = tmp_path / "temporary"
    root.mkdir()
    monkeypatch.setenv("TMPDIR", str(root))
    monkeypatch.setattr(tempfile, "tempdir", str(root))  # read once and kept: the variable alone would not do
    skyreels.load("tiny-t2v", device="cpu", dtype=torch.float32)
    assert os.listdir(root) == []


# 9. the first hour

def test_the_api_and_the_cli_agree_on_a_tiny_models_default_size(df):
    assert df.generate("a cat", num_frames=5, num_inference_steps=1, seed=0).shape == (5, 64, 96, 3)


def test_help_does_not_import_torch():
    probe = "import sys, sample\ntry:\n    sample.parse_args(['df', '--help'])\nexcept SystemExit:\n    pass\n" \
            "print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_a_long_run_says_its_windows_and_steps_first_then_each_step_and_each_latent_frames_video_written(tmp_path,
                                                                                                       capsys):
    sample.main(["df"] + TINY + ["--num-frames", "29", "--base-num-frames", "17", "--overlap-history", "5",
                                 "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "2 windows, 2 denoising steps" and err[1].startswith("step 1/2 "), err
    frames = [f"frame {n}/29 written" for n in (1, 5, 9, 13, 17)]  # window 1: latent frames of 1, then 4 frames
    assert err[2:7] == frames and err[7].startswith("step 2/2 "), err
    assert err[8:] == [f"frame {n}/29 written" for n in (21, 25, 29)], err  # window 2: its 3 new latent frames


def test_the_clis_copy_of_the_mode_defaults_is_skyreels_own():
    """sample.py repeats skyreels.DEFAULTS so that --help need not import torch; the copy must not drift."""
    assert sample.DEFAULTS == skyreels.DEFAULTS
