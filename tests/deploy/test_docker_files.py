"""Dockerfile, compose files and nginx config, checked as far as a machine without a
Docker engine allows: they parse, and every command, port, path and setting they name
exists in the project (the replicas' environment is also run for real in
tests/redis/test_replicas.py)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from piggyback_serve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = set(Settings.model_fields)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def instructions(kind: str) -> list[str]:
    return [args for word, args in dockerfile() if word == kind]


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def default_of(value: str) -> str:
    """A compose value with its ${VAR:-default} interpolations replaced by the defaults."""
    return re.sub(r"\$\{[A-Za-z_0-9]+:?-([^}]*)\}", r"\1", str(value))


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def env_settings(env: dict[str, str]) -> list[str]:
    """PIGGY_ names that are no setting (a typo would be silently ignored by the server)."""
    return [k for k in env if k.startswith("PIGGY_") and k[6:].lower() not in SETTINGS]


def dockerignored() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


# --- Dockerfile -------------------------------------------------------------------------


def test_slim_python_base_by_build_argument_and_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_VERSION=3.11" in text
    assert "ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim" in text
    stages = {args.split()[-1] for args in instructions("FROM") if " AS " in args}
    for args in instructions("FROM"):
        assert args.split()[0] in {"${BASE_IMAGE}"} | stages, args
    # No `# syntax=` line: it would pull a frontend image from a registry.
    assert not re.search(r"^#\s*syntax=", text, re.M)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    user = instructions("USER")[-1]
    assert user not in ("root", "0") and re.search(rf"useradd .*\b{user}\b", str(dockerfile()))


def test_every_copied_path_exists_and_is_not_dockerignored():
    ignored = dockerignored()
    for args in instructions("COPY"):
        words = [w for w in args.split() if not w.startswith("--")]
        if "--from" in args:
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), source
            top = source.split("/")[0]
            assert top not in ignored, f"{source} is excluded by .dockerignore"
    for needed in ("src", "pyproject.toml", "README.md", "deploy"):
        assert needed not in ignored
    # The demo tasks travel as package data: the non-editable install must carry them.
    assert list((ROOT / "src" / "piggyback_serve" / "masks" / "demo_tasks").glob("*.safetensors"))


def test_dependency_layer_comes_before_the_source():
    steps = [f"{w} {a}" for w, a in dockerfile()]
    deps = next(i for i, s in enumerate(steps) if re.search(r"pip install .*'\.\[server\]'", s))
    source = next(i for i, s in enumerate(steps) if s.startswith("COPY src"))
    # pyproject.toml alone (a README edit must not rebuild the dependency layer).
    assert steps[deps - 1] == "COPY pyproject.toml ./" and deps < source
    assert "touch README.md" in steps[deps]
    assert "COPY README.md ./" in steps[deps + 1 : source]
    # Local wheels (deploy/wheels) go before PyPI; the folder exists for the bind mount.
    assert "source=deploy/wheels,target=/wheels" in steps[deps]
    assert "--find-links /wheels" in steps[deps]
    assert (ROOT / "deploy" / "wheels" / "README.md").is_file()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "server" in extras["optional-dependencies"]


def test_commands_exist_and_take_their_arguments():
    from piggyback_serve.masks.cli import parser as masks_parser
    from piggyback_serve.server.cli import parser as serve_parser

    cmd = exec_form(instructions("CMD")[-1])
    assert cmd[0] in console_scripts()
    serve_parser().parse_args(cmd[1:])
    demo = next(a for a in instructions("RUN") if a.startswith("piggy-masks"))
    words = shlex.split(demo.split("&&")[0])
    assert "chmod -R a+rX /opt/piggy" in demo  # readable by the non-root user that seeds them
    args = masks_parser().parse_args(words[1:])
    assert args.out == "/opt/piggy/demo-tasks"


def test_env_are_settings_and_the_healthcheck_hits_healthz_on_the_exposed_port():
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))))
    assert not env_settings(env)
    assert env["PIGGY_HOST"] == "0.0.0.0"
    port = env["PIGGY_PORT"]
    assert instructions("EXPOSE") == [port]
    check = instructions("HEALTHCHECK")[0]
    assert "/healthz" in check and f"'{port}'" in check
    assert Settings(host=env["PIGGY_HOST"], port=int(port)).port == int(port)


# --- docker-compose.yml -----------------------------------------------------------------


def test_compose_services_depend_on_services_that_exist():
    services = compose()["services"]
    assert {"redis", "piggy", "lb", "demo-seed"} <= set(services)
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        if name != "demo-seed":
            assert service["restart"] == "unless-stopped"
            assert service["healthcheck"]["test"], name
    declared = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), source
            else:
                assert source in declared, source


def test_replica_environment_is_valid_settings(monkeypatch):
    piggy = compose()["services"]["piggy"]
    env = {k: default_of(v) for k, v in piggy["environment"].items()}
    assert not env_settings(env)
    token = piggy["environment"]["PIGGY_ADMIN_TOKEN"]
    assert token.startswith("${PIGGY_ADMIN_TOKEN:?"), "the admin token must come from outside"
    env["PIGGY_ADMIN_TOKEN"] = "x"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # every value parses
    assert settings.backbone_weights is None  # empty: the pretrained weights
    registry = urlparse(settings.registry_url)
    assert registry.scheme == "redis" and registry.hostname in compose()["services"]
    assert registry.port == 6379 and "--port" not in compose()["services"]["redis"]["command"]
    assert int(piggy["deploy"]["replicas"].strip("${}").split(":-")[1]) >= 2
    assert "ports" not in piggy  # replicas are reached through the load balancer only


def test_replica_command_and_healthcheck():
    from piggyback_serve.server.cli import parser as serve_parser

    piggy = compose()["services"]["piggy"]
    assert piggy["command"][0] in console_scripts()
    args = serve_parser().parse_args(piggy["command"][1:])
    assert not args.demo and args.host is None and args.port is None  # the env decides
    port = piggy["environment"]["PIGGY_PORT"]
    check = " ".join(piggy["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in check


def test_load_balancer_points_at_the_replicas():
    services = compose()["services"]
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    port = services["piggy"]["environment"]["PIGGY_PORT"]
    # Resolved at run time (a variable in proxy_pass), so that scaled or restarted replicas
    # are found without a reload on any nginx version.
    upstream = re.search(r"set \$(\w+) http://piggy:(\d+);", conf)
    assert upstream and upstream.group(2) == port
    assert f"proxy_pass ${upstream.group(1)};" in conf and "resolver 127.0.0.11" in conf
    listen = re.search(r"listen (\d+);", conf).group(1)
    lb = services["lb"]
    assert lb["ports"][0].endswith(f":{listen}")
    assert any(v.endswith(":/etc/nginx/conf.d/default.conf:ro") for v in lb["volumes"])
    assert f"127.0.0.1:{listen}/lb-healthz" in " ".join(lb["healthcheck"]["test"])
    assert "location = /lb-healthz" in conf
    body = re.search(r"client_max_body_size (\d+)m;", conf).group(1)
    assert int(body) * 2**20 >= Settings().max_artifact_bytes
    assert conf.count("{") == conf.count("}")


def test_demo_seed_runs_a_script_the_image_carries():
    services = compose()["services"]
    seed = services["demo-seed"]
    script, folder = seed["command"][1], seed["command"][2]
    assert script == "/app/deploy/seed_demo.py"
    assert "COPY deploy/seed_demo.py ./deploy/seed_demo.py" in " ".join(
        f"COPY {a}" for a in instructions("COPY")
    )
    assert instructions("WORKDIR")[-1] == "/app" and (ROOT / "deploy" / "seed_demo.py").is_file()
    assert f"--out {folder}" in " ".join(instructions("RUN"))
    listen = re.search(r"listen (\d+);", (ROOT / "deploy" / "nginx.conf").read_text()).group(1)
    assert seed["environment"]["PIGGY_URL"] == f"http://lb:{listen}"
    assert seed["environment"]["PIGGY_TOKEN"].startswith("${PIGGY_ADMIN_TOKEN:?")


def test_gpu_override_reserves_an_nvidia_gpu():
    gpu = compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) <= set(compose()["services"])
    piggy = gpu["piggy"]
    assert not env_settings(piggy["environment"])
    assert Settings(device=piggy["environment"]["PIGGY_DEVICE"]).device == "cuda"
    (device,) = piggy["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_only_interpolate_known_forms(name):
    text = (ROOT / name).read_text()
    for match in re.finditer(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z_0-9]+(:?[-?].*)?", match.group(1)), match.group(0)
