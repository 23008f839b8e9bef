"""Every part of every benchmark script runs, at tiny sizes on the CPU (--tiny), so that a change of the API they call
breaks a test here and not a GPU run later: the README's Performance tables cite these scripts.

Oracle: none but running to the end; a tiny CPU run's figures mean nothing. What needs a GPU is stood in or left out,
each with a `note:` line (each script's docstring says which). Start-up is most of each run, so every script starts at
once, in a folder of its own (its working directory, TMPDIR and OUT: nothing is written to the shared /tmp), and
bench.py runs all its parts in one process, ending each with "PART done in ..." or "PART failed: <traceback>".
"""
import os
import re
import signal
import subprocess
import sys

import pytest

import bench

TESTS, PYTHON = os.path.dirname(os.path.abspath(__file__)), sys.executable
TIMEOUT = 600  # seconds a script may take; a tiny run takes seconds, start-up included
COMMANDS = {  # name: the command line
    "bench.py": [PYTHON, f"{TESTS}/bench.py", "--tiny", "--only", "all"],
    "bench_parallel.py": [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          f"{TESTS}/bench_parallel.py", "--tiny", "--loop", "--check"],  # gloo, 2 processes
    "bench_parallel.py --simulate": [PYTHON, f"{TESTS}/bench_parallel.py", "--simulate"],
    "bench_teacache.py": [PYTHON, f"{TESTS}/bench_teacache.py", "--tiny"],
    "bench_scaled_mm.py": [PYTHON, f"{TESTS}/bench_scaled_mm.py", "--tiny"],
    "vae_memory.py": [PYTHON, f"{TESTS}/vae_memory.py", "--tiny"],
}
PARTS = [  # (run, part, what the run prints once the part has run), for the scripts that stop at their first error
    ("bench_parallel.py", "one pass and guided step", "guided step (2 passes):"),
    ("bench_parallel.py", "--check", "rel. error vs one GPU"),
    ("bench_parallel.py", "--loop", "async loop ar 5 blocks of 5"),
    ("bench_parallel.py", "all-to-all", "all_to_all of"),
    ("bench_parallel.py --simulate", "plan", "14B 720P n=8 CFG"),
    ("bench_teacache.py", "one pass", "one DiT pass:"),
    ("bench_teacache.py", "guided window", "half skipped / off:"),
    ("bench_scaled_mm.py", "forwards", "relative error scaled_mm vs dequant"),
    ("bench_scaled_mm.py", "float32", "5 frames: bf16 dequant vs float32 dequant"),
    ("vae_memory.py", "decode", "decode 2 latent frames"),
    ("vae_memory.py", "encode", "encode 5 frames"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name): (exit code, output) of COMMANDS[name]; all are started at once, with one thread each (tiny
    operations gain nothing from threads, and on a busy machine OpenMP's waiting makes them many times slower)."""
    started, results = {}, {}
    for name, argv in COMMANDS.items():
        folder = tmp_path_factory.mktemp(re.sub(r"\W+", "-", name))
        env = dict(os.environ, TMPDIR=str(folder), OUT=str(folder), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        with open(folder / "output.txt", "w") as out:  # a file, not a pipe: a full pipe would stall a waiting run
            process = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        started[name] = process, folder / "output.txt"

    def result(name):
        process, output = started[name]
        if name not in results:
            try:
                process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # torchrun's workers too: the run's own session
                process.wait()
            results[name] = process.returncode, output.read_text()
        return results[name]

    yield result
    for process, _ in started.values():  # runs a failed test left waiting
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def printed_by(output, part):  # bench.py's lines from "--- PART" to the next part's or its table
    start = output.find(f"--- {part}\n")
    ends = [i for i in (output.find("\n--- ", start), output.find("\n| figure |", start)) if i >= 0]
    return output[start:min(ends, default=None)] if start >= 0 else output[-3000:]


@pytest.mark.parametrize("part", list(bench.PARTS), ids=[f"bench.py: {part}" for part in bench.PARTS])
def test_every_part_of_bench_py_runs(runs, part):
    printed = printed_by(runs("bench.py")[1], part)
    assert f"\n{part} done in" in printed, printed[-3000:]
    assert " failed" not in printed, printed  # nor a row that caught its own error (a kernel that did not run)


def test_bench_py_exits_0_and_prints_its_table(runs):
    code, output = runs("bench.py")
    assert code == 0 and "| figure | diffusers | ours | note |" in output, output[-3000:]


@pytest.mark.parametrize("run, part, printed", PARTS, ids=[f"{run}: {part}" for run, part, _ in PARTS])
def test_every_part_of_the_other_scripts_runs(runs, run, part, printed):
    code, output = runs(run)
    assert code == 0 and printed in output, output[-3000:]
