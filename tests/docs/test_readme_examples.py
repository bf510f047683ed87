"""The README's examples run as pasted from a fresh clone, against a real `piggy-serve --demo`.

Its shell blocks run line by line in an empty folder (with the clone's `src/` linked in, as
a fresh clone has it), `.venv/bin/` being this venv's and the port a free one; its Python
snippet runs as it is. Output the README shows under a command (`# ...` lines) must appear
in what the command prints. The lines that install, deploy or train for minutes are
SKIPPED below, each with why; every other line runs, every curl line included.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from piggyback_serve.masks import demo
from tests.server.test_e2e import piggy_serve

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # this venv's bin/: what `.venv/bin/` means in a clone
LINE_TIMEOUT_S = 120

# The README's shell lines that this test does not run, and why.
SKIPPED = {
    "python3 -m venv .venv && .venv/bin/pip install -e '.[server]' && .venv/bin/piggy-serve "
    "--demo": "the set-up: installs, then serves the demo (served here as it does: --demo)",
    "bash scripts/test": "the whole test suite",
    ".venv/bin/piggy train flowers path/to/images --wait --description 'a photo of one "
    "flower, centred'": "trains for minutes on the reader's folder (tests/client cover it)",
    ".venv/bin/piggy-masks train --data path/to/images --task flowers --out flowers.safetensors "
    "--description 'a photo of one flower, centred'": "trains for minutes on the reader's folder",
    ".venv/bin/piggy-masks inspect flowers.safetensors": "the file the training line writes",
    ".venv/bin/piggy upload flowers flowers.safetensors": "the file the training line writes",
    ".venv/bin/piggy-masks train --backbone timm:vit_small_patch16_224 --weights "
    "weights.safetensors --data path/to/images --task flowers": "the reader's ViT weights",
    "PIGGY_BACKBONE=timm:vit_small_patch16_224 PIGGY_BACKBONE_WEIGHTS=weights.safetensors "
    ".venv/bin/piggy-serve": "the reader's ViT weights (a second server)",
    "export PIGGY_ADMIN_TOKEN=$(openssl rand -hex 16)": "deploying: the Compose stack's token",
    "docker compose up -d --build": "deploying: builds and runs the Docker stack",
    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d": "deploying: GPUs",
    ".venv/bin/piggy-serve --ray --replicas 2": "deploying: starts a Ray cluster",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def commands() -> list[tuple[str, list[str]]]:
    """Each shell command of the README (continuations joined, trailing comment dropped)
    with the output lines the README shows under it."""
    out: list[tuple[str, list[str]]] = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            if line.startswith("# ") and out and line != "# ...":
                out[-1][1].append(line[2:])
            elif line and not line.startswith("#"):
                out.append((re.sub(r"\s+#\s.*$", "", line), []))
    return out


def test_every_skipped_line_is_in_the_readme():
    """SKIPPED stays honest: it names README lines, so an edited line runs or is named again."""
    lines = [command for command, _ in commands()]
    assert set(SKIPPED) <= set(lines), set(SKIPPED) - set(lines)


def as_run_here(command: str, port: int) -> str:
    command = command.replace(".venv/bin/", f"{BIN}/")
    command = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{port}", command)
    # Bounded, and an HTTP error fails the line (the README's curl prints it either way).
    return re.sub(r"^curl ", "curl --silent --show-error --fail-with-body --max-time 60 ", command)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(demo.BUNDLED_DIR.glob("*.safetensors")), reason="no bundled demo tasks built yet"
)
def test_readme_examples_run_as_pasted(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "src").symlink_to(ROOT / "src")  # the README's upload line names a clone's file
    with piggy_serve(tmp_path, "--demo") as client:
        port = client.base_url.port
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIGGY_")}
        env.update(PIGGY_HOME=str(tmp_path / "home"), PIGGY_URL=f"http://127.0.0.1:{port}")
        ran, curls = [], 0
        for command, shown in commands():
            if command in SKIPPED:
                continue
            done = subprocess.run(
                ["bash", "-c", as_run_here(command, port)],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=LINE_TIMEOUT_S,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            printed = re.sub(r"[ \t]+", " ", done.stdout)
            for line in shown:
                assert line in printed, f"{command}: the README shows {line!r}\n{done.stdout}"
            if command.startswith("curl "):
                curls += 1
                files = re.findall(r"@(\S+)", command)
                results = json.loads(done.stdout)["results"]
                assert len(results) == len(files)
                for path, result in zip(files, results, strict=True):
                    # The samples are named <label>_<n>.png.
                    assert result["top"][0]["label"] == Path(path).stem.rsplit("_", 1)[0]
            ran.append(command)
        assert curls == sum(c.startswith("curl ") for c, _ in commands()) >= 2
        assert any(" predict " in c for c in ran) and any(" upload " in c for c in ran)

        (snippet,) = blocks("python")
        code = snippet.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=LINE_TIMEOUT_S,
        )
        assert done.returncode == 0, done.stderr
        label, score = done.stdout.split()
        assert label == "7" and float(score) > 0.5, done.stdout
