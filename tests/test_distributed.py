"""Several processes (torchrun, gloo on the CPU) make the video of one process.

Oracle: the same pipeline in one process (pytest's own), same seeds and settings; float32, max abs <= 1e-5: every rank
does the same per-token arithmetic on its share of the rows, and attention is per head, so only a matmul's blocking
over a different number of rows could move the last bits. Two processes exercise CFG parallelism (one pass per
rank) and, with guidance 1, sequence parallelism; three processes exercise sequence parallelism that divides neither
the tiny DiT's 2 heads nor its 2 token rows per frame (zero heads and zero rows padded in). Start-up dominates, so
each world size runs every mode in one launch: this file, run by torchrun, is also the worker.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from conftest import HEIGHT, WIDTH  # noqa: E402

TOL = 1e-5
BLOCKS = dict(ar_step=1, causal_block_size=2)
CASES = {  # name: (tiny folder, settings)
    "t2v": ("t2v", dict(num_frames=9)),
    "t2v, guidance 1": ("t2v", dict(num_frames=9, guidance_scale=1.0)),
    "i2v": ("i2v", dict(num_frames=9, image="first")),
    "df, synchronous": ("df", dict(num_frames=17)),
    "df, async with shortcuts": ("df", dict(num_frames=21, **BLOCKS)),
    "df, async with shortcuts, guidance 1": ("df", dict(num_frames=21, guidance_scale=1.0, **BLOCKS)),
    "df, long, re-noised": ("df", dict(num_frames=45, base_num_frames=21, overlap_history=9, addnoise_condition=20,
                                       **BLOCKS)),
    "df-i2v, last image": ("df", dict(num_frames=17, image="first", last_image="last", **BLOCKS)),
    "v2v": ("df", dict(num_frames=25, base_num_frames=21, overlap_history=9, video="clip", **BLOCKS)),
    "t2v, TeaCache": ("t2v", dict(num_frames=9, teacache=1e30)),  # the middle step skipped
    "df, long, TeaCache": ("df", dict(num_frames=45, base_num_frames=21, overlap_history=9, teacache=1e30, **BLOCKS)),
}


def media(name):
    rng = np.random.default_rng({"first": 0, "last": 1, "clip": 2}[name])
    if name == "clip":
        return [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in range(13)]
    return Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def generate(pipe, settings, **override):
    import torch

    settings = {k: media(v) if k in ("image", "last_image", "video") else v for k, v in settings.items()}
    torch.manual_seed(7)  # re-noising draws from the global RNG
    return pipe.generate("a cat", negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=3,
                         **{"seed": 0, **settings, **override})


def worker(folders, out):
    """Every rank: each case through skyreels.load's distributed path; rank 0 keeps the frames."""
    import torch
    import torch.distributed as dist

    import skyreels

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pipes = {kind: skyreels.load(path, device="cpu", dtype=torch.float32) for kind, path in folders.items()}
    skips = {kind: record_skips(pipe) for kind, pipe in pipes.items()}  # TeaCache's decisions on this rank
    frames = {name: generate(pipes[kind], settings) for name, (kind, settings) in CASES.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, skips)
    if rank == 0:
        np.savez(os.path.join(out, "frames.npz"), **frames)
        json.dump(every, open(os.path.join(out, "skips.json"), "w"))
    try:
        generate(pipes["t2v"], CASES["t2v"][1], seed=rank)  # ranks that disagree on the seed
    except ValueError as e:
        with open(os.path.join(out, f"mismatch{rank}.txt"), "w") as f:
            f.write(str(e))
    dist.destroy_process_group()


def record_skips(pipe):
    """Wrap the DiT to record, pass by pass, whether TeaCache had it skip the blocks."""
    skips, forward = [], pipe.transformer.forward

    def recording(*args):
        skips.append(bool(args[6] and args[6]["skip"]))  # reuse: predict's last positional argument
        return forward(*args)
    pipe.transformer.forward = recording
    return skips


def torchrun(n, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_process(tiny_folders):
    import torch

    import skyreels

    pipes = {kind: skyreels.load(tiny_folders[kind], device="cpu", dtype=torch.float32) for kind in ("t2v", "i2v", "df")}
    return {name: generate(pipes[kind], settings) for name, (kind, settings) in CASES.items()}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n} processes")
def launch(request, tiny_folders, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ranks{request.param}")
    folders = json.dumps({kind: tiny_folders[kind] for kind in ("t2v", "i2v", "df")})
    run = torchrun(request.param, os.path.abspath(__file__), folders, str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    return request.param, out, dict(np.load(out / "frames.npz"))


@pytest.mark.parametrize("case", list(CASES))
def test_several_processes_make_the_video_of_one(launch, one_process, case):
    _, _, frames = launch
    assert frames[case].shape == one_process[case].shape
    err = float(np.abs(frames[case] - one_process[case]).max())
    assert err <= TOL, err


def test_teacache_decides_alike_on_every_rank(launch):
    skips = json.load(open(launch[1] / "skips.json"))
    assert all(rank == skips[0] for rank in skips) and any(skips[0]["t2v"]) and any(skips[0]["df"])


def test_ranks_given_other_seeds_all_stop_with_the_same_error(launch):
    n, out, _ = launch
    messages = {(out / f"mismatch{rank}.txt").read_text() for rank in range(n)}
    assert len(messages) == 1 and "ranks [1" in messages.pop()


def test_torchrun_sample_writes_one_video_with_world_size(tmp_path):
    run = torchrun(2, "sample.py", "t2v", "--model", "tiny-t2v", "--prompt", "a cat", "--height", "32", "--width",
                   "48", "--steps", "2", "--num-frames", "9", "--seed", "0", "--out", str(tmp_path / "v.mp4"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(tmp_path / "v.mp4")]  # rank 0 alone reports
    assert sorted(os.listdir(tmp_path)) == ["v.json", "v.mp4"]
    record = json.load(open(tmp_path / "v.json"))
    assert record["world_size"] == 2 and record["seed"] == 0  # --seed 0 is a seed, not "none given"


def test_a_bad_input_ends_every_rank_with_one_line(tmp_path):
    run = torchrun(2, "sample.py", "t2v", "--model", "tiny-t2v", "--prompt", "a cat", "--height", "33", "--width",
                   "48", "--out", str(tmp_path / "v.mp4"))
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if line.startswith("error:") or line.startswith("[rank")]
    assert ours == ["error: height and width must be multiples of 16, got 33x48"], run.stderr[-3000:]
    assert "exitcode  : 2" in run.stderr  # every rank ended as a bad input does (torchrun's summary)
    assert os.listdir(tmp_path) == []


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]), sys.argv[2])
