"""server/open_files.py: the soft limit raised at start, running out named."""

from __future__ import annotations

import subprocess
import sys

from piggyback_serve.server.open_files import exhausted, explain
from piggyback_serve.server.registry import RegistryError


def test_the_soft_limit_is_raised_to_the_hard_one():
    script = "from piggyback_serve.server.open_files import raise_soft_limit as r; print(r())"
    done = subprocess.run(
        ["prlimit", "--nofile=256:512", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "(512, 512)"


def test_running_out_of_open_files_is_named_through_a_wrapping_error():
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            raise RegistryError("dir:/tasks: [Errno 24] Too many open files") from exc
    except RegistryError as wrapped:
        assert exhausted(wrapped)
        assert explain(wrapped).startswith("out of open files (limit ")
    assert not exhausted(RegistryError("connection refused"))
    assert explain(RegistryError("connection refused")) == "connection refused"
