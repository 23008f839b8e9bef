"""The harness: the tiny checkpoints are folders in the official -Diffusers layout, and a test that runs the command
line in pytest's process leaves the next test pytest's signal handlers."""
import json
import os
import signal

from conftest import SESSION_HANDLERS, SIGNALS


def test_folders_have_the_official_layout(tiny_folders):
    for kind, path in tiny_folders.items():
        index = json.load(open(os.path.join(path, "model_index.json")))
        expected = {"t2v": "SkyReelsV2Pipeline", "i2v": "SkyReelsV2ImageToVideoPipeline",
                    "flf2v": "SkyReelsV2ImageToVideoPipeline", "df": "SkyReelsV2DiffusionForcingPipeline"}[kind]
        assert index["_class_name"] == expected
        for sub in ("transformer", "vae", "text_encoder", "scheduler"):
            assert os.path.isfile(os.path.join(path, sub, "config.json")) or sub == "scheduler"
        assert os.path.isfile(os.path.join(path, "tokenizer", "spiece.model"))
        assert os.path.isfile(os.path.join(path, "text_encoder", "model.safetensors.index.json"))
        if kind in ("i2v", "flf2v"):
            assert os.path.isfile(os.path.join(path, "image_encoder", "config.json"))
            assert os.path.isfile(os.path.join(path, "image_processor", "preprocessor_config.json"))


def handlers():
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


# Two tests, in this order: the first lets sample.main change the handlers and leaves them so; the second sees what
# conftest's `signal_handlers` put back. (Alone, the second checks only that no earlier test left handlers behind.)

def test_a_cli_run_in_this_process_changes_the_signal_handlers(tmp_path, cli):
    run = cli(["df", "--model", "tiny-df", "--prompt", "x", "--height", "33", "--width", "48", "--num-frames", "5",
               "--steps", "1", "--out", tmp_path / "v.mp4"])
    assert run.code == 2 and run.err.startswith("error: --height"), run.err  # an error after the handlers went in
    assert handlers() == {sig: signal.SIG_IGN for sig in SIGNALS}  # leave()'s: Ctrl-C would stop nothing


def test_the_next_test_has_the_handlers_pytest_started_with():
    assert handlers() == SESSION_HANDLERS
