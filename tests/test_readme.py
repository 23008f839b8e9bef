"""The README's commands run as printed, on the tiny models (no download, the CPU, seconds).

Each ```bash block whose `python sample.py` commands all name a tiny model (`--model tiny-`) runs line by line, and
each ```python block that loads a tiny model runs as a script: every block in a working folder of its own, as if it
were the checkout (a `docs/` folder in it). `python sample.py ...` runs in this process (conftest.cli); any other
`python` line (the one that makes first.png) as a process. The blocks for the official checkpoints, several GPUs and
installs are only read.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def blocks():
    """{id: (language, code)}: the runnable blocks, by their section's heading (and number, if it has several)."""
    found, heading = {}, None
    text = open(README, encoding="utf-8").read()
    for title, language, code in re.findall(r"^## ([^\n]+)$|^```(bash|python)\n(.*?)^```$", text, re.M | re.S):
        heading = title or heading
        runs = [c for c in commands(code) if c.startswith("python sample.py")]
        if language == "bash" and runs and all("--model tiny-" in c for c in runs) or \
                language == "python" and 'skyreels.load("tiny-' in code:
            n = sum(key.startswith(heading) for key in found)
            found[f"{heading} {n + 1}" if n else heading] = language, code
    return found


def commands(code):  # a bash block's commands: continued lines joined, comments and blank lines left out
    lines = code.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


BLOCKS = blocks()


def test_the_readme_has_a_runnable_block_for_each_way_in():
    assert {"Quick start", "One command per mode", "The API"} <= set(BLOCKS), list(BLOCKS)


@pytest.mark.parametrize("language,code", BLOCKS.values(), ids=BLOCKS.keys())
def test_a_readme_block_runs_as_printed(tmp_path, monkeypatch, cli, language, code):
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path)
    if language == "python":
        exec(compile(code, README, "exec"), {"__name__": "__main__"})
        return
    for command in commands(code):
        argv = shlex.split(command)
        assert argv[0] == "python", command  # nothing in a runnable block is left unrun
        if argv[1] == "sample.py":
            run = cli(argv[2:])
            assert run.code == 0, f"{command}\n{run.err}"
        else:
            subprocess.run([sys.executable] + argv[1:], check=True)
