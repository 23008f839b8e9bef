"""Errors in the user's own words: each bad input through the command line is one `error:` line that names the flag
as the user typed it (both spellings where the original SkyReels-V2 CLI has one), and no flag that was not given.

sample.parse_args records the spelling typed for each setting; sample.as_flags puts it in place of the setting names in
skyreels' messages (num_frames) and of the first spellings in sample.py's own (--out).
"""
import os

import pytest

import sample

CASES = {  # id: (mode and the case's flags, what the line says, a flag it must not name)
    "--out not an mp4": (["df", "--out", "{tmp}/x.txt"], "--out must name an .mp4 file", "----out"),
    "--outdir not an mp4": (["df", "--outdir", "{tmp}/x.txt"], "--outdir must name an .mp4 file", "--out "),
    "--num-frames 0": (["df", "--num-frames", "0"], "--num-frames must be an integer", None),
    "--num_frames 0": (["df", "--num_frames", "0"], "--num_frames must be an integer", "--num-frames"),
    "--inference_steps 0": (["t2v", "--inference_steps", "0"], "--inference_steps must be an integer", "--steps"),
    "--teacache -1": (["df", "--teacache", "-1"], "--teacache must be a number", None),
    "--teacache_thresh -1": (["df", "--teacache_thresh", "-1"], "--teacache_thresh must be a number", "--teacache "),
    "a missing --image": (["df-i2v", "--image", "{tmp}/nope.png"], "--image: cannot read {tmp}/nope.png", None),
    "a missing --last-image": (["i2v", "--image", "{m}/first.png", "--last-image", "{tmp}/nope.png"],
                               "--last-image: cannot read", None),
    "a missing --end_image": (["i2v", "--image", "{m}/first.png", "--end_image", "{tmp}/nope.png"],
                              "--end_image: cannot read", "--last-image"),
    "a missing --video": (["v2v", "--overlap-history", "5", "--video", "{tmp}/nope.mp4"], "--video: cannot read", None),
    "a missing --video_path": (["v2v", "--overlap-history", "5", "--video_path", "{tmp}/nope.mp4"],
                               "--video_path: cannot read", "--video "),
    "a missing --lora": (["df", "--lora", "{tmp}/no.safetensors"], "--lora: no such file {tmp}/no.safetensors", None),
    "--resolution 540P on a tiny model": (["df", "--resolution", "540P"], "--resolution: 540P", "--height"),
    "--height without --width": (["df", "--height", "64"], "--height and --width must be given together",
                                 "--resolution"),
    "--redo-from 0": (["df", "--redo-from", "0"], "--redo-from must be an integer in [1,", "--resume"),
    "--use-ret-steps without --teacache": (["df", "--use-ret-steps"], "--teacache must be given for --use-ret-steps",
                                           "True or False"),
    "--use_ret_steps without --teacache": (["df", "--use_ret_steps"], "--teacache must be given for --use_ret_steps",
                                           "True or False"),
    "an --out name over 255 bytes": (["df", "--out", "{tmp}/" + "v" * 251 + ".mp4"], "cannot write --out", None),
    "an --out folder that is missing": (["df", "--out", "{tmp}/no/v.mp4"], "cannot write --out {tmp}/no/v.mp4", None),
    "an --outdir folder that is missing": (["df", "--outdir", "{tmp}/no/v.mp4"], "cannot write --outdir", "--out "),
}


def fail(cli, tmp_path, argv):
    """The run's one error line; nothing written beside it."""
    before = sorted(os.listdir(tmp_path))
    given = {"--out", "--outdir"} & set(argv)
    model = {"t2v": "tiny-t2v", "i2v": "tiny-i2v"}.get(argv[0], "tiny-df")
    run = cli(argv[:1] + ["--model", model, "--prompt", "a cat", "--steps", "1"]
              + ["--out", str(tmp_path / "v.mp4")] * (not given) + argv[1:])
    err = run.err.strip()
    assert run.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert sorted(os.listdir(tmp_path)) == before
    return err


@pytest.mark.parametrize("argv,said,unsaid", CASES.values(), ids=CASES.keys())
def test_an_error_names_the_flag_as_typed(tmp_path, media, cli, argv, said, unsaid):
    err = fail(cli, tmp_path, [a.format(tmp=tmp_path, m=media) for a in argv])
    assert said.format(tmp=tmp_path) in err, err
    assert unsaid is None or unsaid not in err, err


@pytest.mark.parametrize("flag", ["--out", "--outdir"])
def test_an_out_folder_that_takes_no_files_is_named_by_the_flag_as_typed(tmp_path, cli, monkeypatch, flag):
    """A read-only folder, as the file system answers it (these tests may run as root, whom no mode stops)."""
    def read_only(path, *args, **kw):
        if os.path.basename(path).startswith(".sample-"):  # Output.check's probe
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kw)
    monkeypatch.setattr(sample, "open", read_only, raising=False)
    err = fail(cli, tmp_path, ["df", flag, str(tmp_path / "v.mp4")])
    assert f"cannot write {flag} {tmp_path / 'v.mp4'}: {tmp_path}: permission denied" in err, err


def test_resume_after_a_finished_run_says_there_is_nothing_to_continue(tmp_path, cli):
    small = ["--height", "32", "--width", "48", "--num-frames", "5"]
    assert cli(["df", "--model", "tiny-df", "--prompt", "a cat", "--steps", "1", "--out", tmp_path / "v.mp4"]
               + small).code == 0
    err = fail(cli, tmp_path, ["df", "--resume"] + small)
    assert f"--resume: {tmp_path / 'v.state'} holds no run (no settings.json)" in err, err
