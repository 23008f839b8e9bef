"""Several processes (torchrun, gloo on the CPU) make the video of one process.

Oracle: the same pipeline in one process (pytest's own), same seeds and settings; float32, max abs <= 1e-5: every rank
does the same per-token arithmetic on its share of the rows, and attention is per head, so only a matmul's blocking
over a different number of rows could move the last bits. Two processes exercise CFG parallelism (one pass per
rank) and, with guidance 1, sequence parallelism; three processes exercise sequence parallelism that divides neither
the tiny DiT's 2 heads nor its 2 token rows per frame (zero heads and zero rows padded in). Start-up dominates, so
each world size runs every mode in one launch: this file, run by torchrun, is also the worker. The same launch then
runs the command line on every rank (sample.main, what `torchrun sample.py` runs), once to a video and once with a
bad input, and keeps what each rank printed and how it exited.
"""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
from conftest import HEIGHT, WIDTH, clip, image  # noqa: E402

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
    "df-i2v, unequal blocks": ("df", dict(num_frames=29, image="first", ar_step=2, causal_block_size=3)),
    "v2v": ("df", dict(num_frames=25, base_num_frames=21, overlap_history=9, video="clip", **BLOCKS)),
    "t2v, TeaCache": ("t2v", dict(num_frames=9, teacache=1e30)),  # the middle step skipped
    "df, long, TeaCache": ("df", dict(num_frames=45, base_num_frames=21, overlap_history=9, teacache=1e30, **BLOCKS)),
}


MEDIA = {"first": lambda: image(0), "last": lambda: image(1), "clip": clip}
# The command line: a video, and a bad input (a height not a multiple of 16).
CLI = ["t2v", "--model", "tiny-t2v", "--prompt", "a cat", "--height", "32", "--width", "48", "--steps", "2",
       "--num-frames", "9", "--seed", "0"]
BAD_CLI = ["t2v", "--model", "tiny-t2v", "--prompt", "a cat", "--height", "33", "--width", "48"]


def generate(pipe, settings, **override):
    import torch

    settings = {k: MEDIA[v]() if k in ("image", "last_image", "video") else v for k, v in settings.items()}
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
    frames["resumed"] = stop_and_resume(pipes["df"], os.path.join(out, "state"))
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
    # sample.main joins a process group of its own, and torch names a new group as it named the last one: on
    # torchrun's store a second group would meet the first one's keys. So each run gets a store of its own, which
    # rank 0 hosts on a port it picks now.
    ports = [[free_port(), free_port()] if rank == 0 else None]
    dist.broadcast_object_list(ports, src=0)
    dist.destroy_process_group()
    runs = {}
    for (run, argv), port in zip((("video", CLI + ["--out", os.path.join(out, "video", "v.mp4")]),
                                  ("bad input", BAD_CLI + ["--out", os.path.join(out, "bad", "v.mp4")])), ports[0]):
        os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")
        runs[run] = cli(argv)
    with open(os.path.join(out, f"cli{rank}.json"), "w") as f:
        json.dump(runs, f)


class Stop(Exception):
    pass


def stop_and_resume(pipe, state):
    """The long re-noised case, stopped on every rank half-way (rank 0 keeps the state), then resumed."""
    import torch.distributed as dist

    def stop_half_way(step, total):
        if step == total // 2:
            raise Stop
    try:
        generate(pipe, CASES["df, long, re-noised"][1], state=state, progress=stop_half_way)
    except Stop:
        pass
    dist.barrier()  # rank 0's window files are written before any rank reads them
    return generate(pipe, CASES["df, long, re-noised"][1], state=state, resume=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv):
    """sample.main(argv) on this rank, as `torchrun sample.py ARGV` runs it: its exit code, stdout and stderr."""
    import sample

    os.makedirs(os.path.dirname(argv[-1]), exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sample.main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code
    return dict(code=code, out=out.getvalue(), err=err.getvalue())


def record_skips(pipe):
    """Wrap the DiT to record, pass by pass, whether TeaCache had it skip the blocks."""
    skips, forward = [], pipe.transformer.forward

    def recording(*args):
        skips.append(bool(args[5].reuse and args[5].reuse["skip"]))  # the AttentionContext: the last argument
        return forward(*args)
    pipe.transformer.forward = recording
    return skips


def torchrun(n, *argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def one_process(pipes):
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


def test_a_run_resumed_under_torchrun_is_the_uninterrupted_run(launch):
    _, out, frames = launch
    assert np.array_equal(frames["resumed"], frames["df, long, re-noised"])
    assert len([name for name in os.listdir(out / "state") if name.startswith("window-")]) == 3
def test_teacache_decides_alike_on_every_rank(launch):
    skips = json.load(open(launch[1] / "skips.json"))
    assert all(rank == skips[0] for rank in skips) and any(skips[0]["t2v"]) and any(skips[0]["df"])


def test_ranks_given_other_seeds_all_stop_with_the_same_error(launch):
    n, out, _ = launch
    messages = {(out / f"mismatch{rank}.txt").read_text() for rank in range(n)}
    assert len(messages) == 1 and "ranks [1" in messages.pop()


def cli_runs(out, n, run):
    return [json.load(open(out / f"cli{rank}.json"))[run] for rank in range(n)]


def test_torchrun_sample_writes_one_video_with_world_size(launch):
    n, out, _ = launch
    runs = cli_runs(out, n, "video")
    assert [r["code"] for r in runs] == [0] * n, [r["err"][-3000:] for r in runs]
    assert [r["out"].split() for r in runs] == [[str(out / "video" / "v.mp4")]] + [[]] * (n - 1)  # rank 0 alone reports
    assert sorted(os.listdir(out / "video")) == ["v.json", "v.mp4"]
    record = json.load(open(out / "video" / "v.json"))
    assert record["world_size"] == n and record["seed"] == 0  # --seed 0 is a seed, not "none given"


def test_a_bad_input_ends_every_rank_with_one_line(launch):
    n, out, _ = launch
    runs = cli_runs(out, n, "bad input")
    ours = [line for r in runs for line in r["err"].splitlines() if line.startswith(("error:", "[rank"))]
    assert ours == ["error: --height and --width must be multiples of 16, got 33x48"], [r["err"][-3000:] for r in runs]
    assert [r["code"] for r in runs] == [2] * n  # every rank ended as a bad input does
    assert os.listdir(out / "bad") == []


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]), sys.argv[2])
