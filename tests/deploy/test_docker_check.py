"""deploy/docker-check.sh and what it uses, checked without Docker (the check itself runs
for real in .ci/run): the script parses, the local override only swaps image names for
images the script builds, and the probe's test image is the same bytes every time."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from deploy import docker_probe

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker-check.sh"


def test_script_parses_and_stops_what_it_starts():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "trap cleanup EXIT" in text
    assert 'kill "$DOCKERD_PID"' in text and 'kill "$HOST_PID"' in text
    assert "down -v --remove-orphans" in text
    for function in re.findall(r'^step "[^"]+" (\w+)', text, re.M):
        if function != "probe":
            assert re.search(rf"^{function}\(\) {{", text, re.M), function


def test_local_override_only_swaps_images_the_script_builds():
    override = yaml.safe_load((ROOT / "deploy" / "docker-compose.local.yml").read_text())
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(override) == {"services"}
    targets = re.findall(
        r"^FROM \S+ AS (\w+)$", (ROOT / "deploy/local-images/Dockerfile").read_text(), re.M
    )
    assert set(targets) == {"python", "redis", "nginx"}
    built = re.search(r"for target in ([\w ]+); do", SCRIPT.read_text()).group(1).split()
    assert built == targets
    for name, service in override["services"].items():
        assert name in services and set(service) == {"image"}
        repo, tag = service["image"].split(":")
        assert repo.removeprefix("piggy-local/") in targets and tag == "bookworm"
    assert "BASE_IMAGE=piggy-local/python:bookworm" in SCRIPT.read_text()


def test_every_probe_the_script_runs_exists():
    commands = set(docker_probe.parser()._subparsers._group_actions[0].choices)
    used = set(re.findall(r"\bprobe (\w+) --", SCRIPT.read_text()))
    assert used and used <= commands


def test_probe_image_is_deterministic_png():
    a, b = docker_probe.test_image(3), docker_probe.test_image(3)
    assert a == b and a.startswith(b"\x89PNG") and a != docker_probe.test_image(4)
