"""The three commands piped into `head -1` end quietly: no BrokenPipeError traceback when
the reader leaves early (Python's recipe in the `signal` docs, "Note on SIGPIPE")."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from piggyback_serve.masks import demo
from tests.client.live_server import live, live_artifacts  # noqa: F401 - fixtures

BUNDLED_MNIST = demo.BUNDLED_DIR / "mnist.safetensors"


def script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed next to {sys.executable}"
    return found


def into_head(command: list[str], tmp_path: Path) -> tuple[str, str, int]:
    """`COMMAND | head -1` in bash: head's line, the command's stderr and exit status."""
    err = tmp_path / "stderr"
    line = f"{shlex.join(command)} 2>{shlex.quote(str(err))} | head -1; exit ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120)
    return done.stdout, err.read_text(), done.returncode


def into_a_closed_pipe(command: list[str]) -> tuple[str, int]:
    """COMMAND writing into a pipe whose reader is already gone (every write fails, where
    `| head -1` fails only when head leaves before the last write): stderr, exit status."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    return done.stderr, done.returncode


@pytest.mark.skipif(not BUNDLED_MNIST.exists(), reason="no bundled demo tasks built yet")
def test_piggy_masks_inspect_into_head(tmp_path):
    # The metadata is printed before the backbone check and the mask table after it: head
    # has left by then.
    line, err, status = into_head([script("piggy-masks"), "inspect", str(BUNDLED_MNIST)], tmp_path)
    assert line == "{\n"
    assert err == "" and status == 1


@pytest.mark.parametrize(
    "args", [["samples"], ["inspect", str(BUNDLED_MNIST), "--no-backbone"], ["--help"]]
)
def test_piggy_masks_into_a_closed_pipe(args):
    err, status = into_a_closed_pipe([script("piggy-masks"), *args])
    assert err == "" and status in (0, 1)


def test_piggy_into_head_and_a_closed_pipe(live, tmp_path):  # noqa: F811 - the fixture
    tasks = [script("piggy"), "--url", live.url, "tasks"]
    line, err, status = into_head(tasks, tmp_path)
    assert line.split()[:2] == ["NAME", "LABELS"] and err == "" and status in (0, 1)
    for command in (tasks, [*tasks[:-1], "--json", "tasks"], [script("piggy"), "--help"]):
        err, status = into_a_closed_pipe(command)
        assert err == "" and status in (0, 1), command


def test_piggy_serve_help_into_head(tmp_path):
    line, err, status = into_head([script("piggy-serve"), "--help"], tmp_path)
    assert line.startswith("usage: piggy-serve") and err == "" and status == 0
    err, status = into_a_closed_pipe([script("piggy-serve"), "--help"])
    assert err == "" and status in (0, 1)
