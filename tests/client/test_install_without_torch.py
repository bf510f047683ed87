"""The base install is the client alone: a fresh venv gets one import package,
`piggyback_serve`, and the base dependencies only (httpx, no torch or Pillow), then imports
the client and talks to a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.client.live_server import png

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str | Path, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_client_installs_and_runs_without_torch(tmp_path, live):
    # Build from a copy of what `pip install .` reads (the checkout may hold build leftovers).
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", ignore=leftovers)
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheels", src)
    (wheel,) = (tmp_path / "wheels").glob("piggyback_serve-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"piggyback_serve"}, tops
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(*pip, "--python", python, "install", "-q", wheel)  # the base dependencies: httpx

    names = "import importlib.metadata as m; print([d.name.lower() for d in m.distributions()])"
    installed = run(python, "-c", names)
    for heavy in ("torch", "torchvision", "pillow", "numpy", "fastapi"):
        assert f"'{heavy}'" not in installed, installed

    image = tmp_path / "img.png"
    image.write_bytes(png(7))
    script = f"""
import sys
from piggyback_serve.client import Client
with Client({live.url!r}) as c:
    answer = c.predict("alpha", {str(image)!r})
assert "torch" not in sys.modules and "PIL" not in sys.modules
import importlib.util
for generic in ("masks", "server", "client"):  # nothing of ours under a generic name
    assert importlib.util.find_spec(generic) is None, generic
print(answer.results[0].label)
"""
    assert run(python, "-c", script).strip().startswith("alpha-")
    assert "usage: piggy" in run(venv / "bin" / "piggy", "--help")
    assert "beta" in run(venv / "bin" / "piggy", "--url", live.url, "tasks")
