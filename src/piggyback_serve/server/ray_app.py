"""The same app as a Ray Serve application: one engine per replica, one device each.

`piggy-serve --ray [--replicas N]` (run() below) starts a local Ray or joins the cluster
in RAY_ADDRESS; `serve run deploy/ray/serve.yaml` builds it with app() from the config.
Replicas share the registry: Redis, or a folder only where every replica sees the path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

from pydantic import BaseModel
from ray import serve

from piggyback_serve.server.app import create_app
from piggyback_serve.server.ray_metrics import RayMetricsBridge
from piggyback_serve.server.registry import REMOTE_SCHEMES
from piggyback_serve.server.settings import Settings

APP_NAME = "piggy"
DEPLOYMENT = "Piggy"
# Ray's HTTP proxy imports this to answer its own failures in our JSON error shape.
PROXY_CALLBACK = (
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
    "piggyback_serve.server.ray_proxy.middlewares",
)


class RayConfigError(ValueError):
    """A Ray deployment that cannot work as configured (said before anything starts)."""


def check_registry(registry_url: str, max_replicas: int, shared: bool) -> None:
    """More than one replica needs a registry they all see: Redis, or a declared shared folder."""
    if max_replicas <= 1 or registry_url.startswith(REMOTE_SCHEMES) or shared:
        return
    raise RayConfigError(
        f"{max_replicas} replicas with the folder registry {registry_url!r}: replicas on "
        "other nodes would not see it. Use PIGGY_REGISTRY=redis://host:6379/0, or, if the "
        "folder is on a path every node mounts, say so with shared_registry: true "
        "(serve.yaml args); a local `piggy-serve --ray` is one node and needs neither."
    )


def max_replicas(config: Any) -> int:
    """The most replicas a deployment config can run (autoscaling's max, else num_replicas)."""
    autoscaling = getattr(config, "autoscaling_config", None)
    if autoscaling is not None:
        return autoscaling.max_replicas
    return config.num_replicas or 1


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=128,
    health_check_period_s=2,
    # The first check waits for the backbone to load: slow disks and busy hosts need time.
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=10,
)
@serve.ingress()
class PiggyReplica:
    """One replica: create_app() over the settings, built in the replica's own process."""

    def __init__(self, settings: dict | None = None, shared_registry: bool = False):
        self.settings = replica_settings(Settings(**(settings or {})))
        config = serve.get_replica_context()._deployment_config
        check_registry(self.settings.registry_url, max_replicas(config), shared_registry)
        self.metrics_bridge: RayMetricsBridge | None = None

    def __serve_build_asgi_app__(self):
        return create_app(self.settings)

    async def check_health(self) -> None:
        """Ready before Ray routes here (the first check waits for the backbone); a replica
        whose startup failed is unhealthy. A registry outage is not: tasks keep serving.
        Each check also hands our metrics to Ray's (server/ray_metrics.py)."""
        svc = self.app.state.services
        while not svc.ready:
            if svc.startup_error:
                raise RuntimeError(f"startup failed: {svc.startup_error}")
            await asyncio.sleep(0.05)
        if self.metrics_bridge is None:
            self.metrics_bridge = RayMetricsBridge(svc.metrics.registry)
        self.metrics_bridge.export()


def replica_settings(settings: Settings) -> Settings:
    """A replica's engine workers default to the CPUs Ray gave it (one per CPU, one torch
    thread each), not to every core of its node: replicas never oversubscribe a node.
    On a GPU, one worker per device the replica sees, as anywhere."""
    if settings.engine_workers is not None:
        return settings
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return settings.model_copy(update={"engine_workers": max(1, int(cpus))})


class AppArgs(BaseModel):
    """serve.yaml's `args:` for app(); PIGGY_ settings come from the runtime environment."""

    shared_registry: bool = False


def app(args: dict) -> serve.Application:
    """The application builder that deploy/ray/serve.yaml names in its `import_path`."""
    return PiggyReplica.bind(**AppArgs.model_validate(args).model_dump())


def actor_options(replica_cpus: float, gpus: float) -> dict:
    """One device per replica: a GPU where the cluster has them, else `replica_cpus` CPUs."""
    options: dict = {"num_cpus": replica_cpus}
    if gpus >= 1:
        options["num_gpus"] = 1
    return options


def deployment(
    settings: Settings,
    replicas: int,
    options: dict,
    log_level: str = "info",
):
    """The CLI's deployment: fixed replica count; settings travel with it (not the env)."""
    fields = settings.model_dump(include=settings.model_fields_set)
    level = log_level.upper()
    return PiggyReplica.options(
        num_replicas=replicas,
        ray_actor_options=options,
        # Access lines per request only at info or debug, as uvicorn's.
        logging_config={"log_level": level, "enable_access_log": level in ("INFO", "DEBUG")},
        # Enough requests in flight per replica for the batcher to fill its batches.
        max_ongoing_requests=max(64, 4 * settings.max_batch_size),
    ).bind(settings=fields, shared_registry=True)


def run(
    settings: Settings,
    replicas: int,
    replica_cpus: float,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM/SIGINT; stop what we started (or only our app on a joined cluster)."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or None
    # A local Ray is one node: a folder there is seen by every replica.
    check_registry(settings.registry_url, replicas, shared=address is None)
    name, value = PROXY_CALLBACK
    os.environ.setdefault(name, value)  # the local proxy inherits it; a cluster sets its own
    # "local": a new Ray of our own, never one found running on this machine (whose other
    # Serve applications our shutdown would take down).
    ray.init(address=address or "local", include_dashboard=False, configure_logging=False)
    try:
        options = actor_options(replica_cpus, ray.cluster_resources().get("GPU", 0))
        serve.start(
            http_options={
                "host": settings.host,
                "port": settings.port,
                # Past our own timeout (504) plus a margin: Ray's proxy never holds a request
                # forever, even when its replica is gone.
                "request_timeout_s": settings.request_timeout_s + 5,
            }
        )
        app = deployment(settings, replicas, options, log_level)
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(
            f"piggy-serve: {replicas} Ray Serve replica(s) {options} on "
            f"http://{settings.host}:{settings.port}",
            flush=True,
        )
        _wait_for_signal()
    finally:
        if address is None:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
