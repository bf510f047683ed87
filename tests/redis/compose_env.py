"""What docker-compose.yml gives a replica: its command and environment, interpolated the
way `docker compose` does (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
REPLICA_SERVICE = "piggy"

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = variables.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"compose needs {name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return value or ""

    return _VAR.sub(one, text)


def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def replica(variables: dict[str, str], path: Path = COMPOSE) -> tuple[list[str], dict[str, str]]:
    """The replica service's command and environment, as compose would start it."""
    service = load(path)["services"][REPLICA_SERVICE]
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    environment = {k: interpolate(str(v), variables) for k, v in env.items()}
    command = [interpolate(str(word), variables) for word in service["command"]]
    return command, environment
