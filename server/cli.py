"""piggy-serve: run the server with uvicorn, or as a Ray Serve application with `--ray`
(`--demo`: the bundled offline demo)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from masks.errors import MasksError
from server.registry import RegistryError, open_registry
from server.settings import Settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piggy-serve", description=__doc__)
    p.add_argument(
        "--demo",
        action="store_true",
        help="serve the demo backbone and tasks from $PIGGY_HOME/demo/tasks, "
        "installing them there first if absent",
    )
    p.add_argument("--host", help="listen address (default PIGGY_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default PIGGY_PORT or 8000)")
    p.add_argument(
        "--ray",
        action="store_true",
        help="run as a Ray Serve application: a local Ray, or the cluster in RAY_ADDRESS; "
        "--host/--port set Ray's HTTP proxy (needs the `ray` extra)",
    )
    p.add_argument("--replicas", type=int, help="with --ray: replicas, one engine each (1)")
    p.add_argument(
        "--replica-cpus",
        type=float,
        help="with --ray: CPUs Ray reserves per replica, fractions allowed (1; a GPU each "
        "where the cluster has GPUs)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.demo:
        from masks.demo import DEMO_BACKBONE

        overrides.update(demo=True, backbone=DEMO_BACKBONE)
    return Settings(**overrides)


def prepare_demo(settings: Settings):
    """Install the bundled demo tasks into the demo folder unless all are there; the backbone."""
    from pathlib import Path

    from masks import demo
    from masks.backbones import load_backbone

    backbone = load_backbone(settings.backbone, settings.backbone_weights)
    folder = Path(settings.registry_url.removeprefix("dir:"))
    have = {p.name for p in folder.glob("*.safetensors")}
    bundled = {p.name for p in demo.BUNDLED_DIR.glob("*.safetensors")}
    if settings.registry_url.startswith("dir:") and not (have and bundled <= have):
        installed = demo.install(folder, backbone)
        print(f"piggy-serve: installed {len(installed)} demo tasks into {folder}", flush=True)
    return backbone


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.ray and (args.replicas is not None or args.replica_cpus is not None):
        p.error("--replicas and --replica-cpus need --ray")
    if (args.replicas or 1) < 1 or (args.replica_cpus or 1) <= 0:
        p.error("--replicas must be at least 1 and --replica-cpus above 0")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from server.app import create_app

    settings = settings_from(args)
    backbone = None
    if settings.demo:
        try:
            backbone = prepare_demo(settings)
        except MasksError as exc:
            print(
                f"piggy-serve: error: {exc}\n(run `piggy-masks demo --rebuild` to build the "
                "demo tasks)",
                file=sys.stderr,
            )
            return 1
    try:
        open_registry(settings.registry_url)  # a bad PIGGY_REGISTRY fails here, not mid-startup
    except RegistryError as exc:
        print(f"piggy-serve: error: {exc}", file=sys.stderr)
        return 1
    if args.ray:
        return _run_ray(
            settings,
            args.replicas or 1,
            args.replica_cpus or 1.0,
            args.log_level,
        )
    app = create_app(settings, backbone)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (stops accepting, lets in-flight
    # requests finish, runs the lifespan's shutdown), then re-raises the signal to the
    # handler in place before it started: with these no-ops a clean stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _run_ray(settings: Settings, replicas: int, replica_cpus: float, log_level: str) -> int:
    """Each replica loads its own backbone: the one loaded here for --demo stays here."""
    try:
        from server import ray_app
    except ImportError as exc:
        print(f"piggy-serve: error: --ray needs the `ray` extra ({exc})", file=sys.stderr)
        return 1
    try:
        return ray_app.run(settings, replicas, replica_cpus, log_level)
    except ray_app.RayConfigError as exc:
        print(f"piggy-serve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
