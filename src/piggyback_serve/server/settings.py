"""Settings, read once from the environment (PIGGY_ prefix) and passed in, never global."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


def _default_home() -> Path:
    return Path.home() / ".cache" / "piggyback-serve"


class Settings(BaseSettings):
    """Every knob of the server; docs/settings.md lists them."""

    model_config = SettingsConfigDict(env_prefix="PIGGY_", extra="ignore")

    home: Path = Field(default_factory=_default_home)
    backbone: str = "efficientnet_lite0"
    # None: the pretrained weights (package or torchvision cache); a path; or "random".
    backbone_weights: str | None = None
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Where JPEGs are decoded: "device" (sent encoded, decoded in batches by the engine
    # worker on its device: nvJPEG on CUDA), "cpu" (by the front end, Pillow), or "auto":
    # the device on CUDA, the CPU elsewhere. Other formats always decode on the CPU.
    decode: Literal["auto", "cpu", "device"] = "auto"
    # "dir:/path" or "redis://host:port/db"; None: a folder under home.
    registry: str | None = None
    registry_rescan_s: float = Field(1.0, gt=0)
    # Redis registry: key prefix (deployments sharing one Redis use different ones), and
    # the socket timeout of every Redis command, so that a dead Redis never hangs a request.
    redis_prefix: str = "piggy:"
    redis_timeout_s: float = Field(2.0, gt=0)
    demo: bool = False

    max_batch_size: int = Field(32, ge=1)
    max_delay_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    # An engine worker silent on a batch this long is killed and replaced (its batch 503
    # worker_lost); None: automatic, from the batch times the pool has seen
    # (server/engine/pool.py's batch_timeout_s).
    worker_timeout_s: float | None = Field(None, gt=0)
    # A connection that has not sent a whole request head this long after it opened (or
    # after its previous answer) is closed (server/cli.py's DrainingHTTP).
    header_timeout_s: float = Field(10.0, gt=0)
    # How a batch that mixes tasks runs: "one-pass" (one forward, a sparse correction per
    # layer: server/engine/mixed.py), "per-task" (the batch split by task, the working copy patched
    # between the pieces) or "auto": per-task on the CPU, where it measured faster or
    # about as fast (bench/results/MULTITASK.md), one-pass elsewhere.
    mixed_batches: Literal["auto", "one-pass", "per-task"] = "auto"
    # Engine workers (server/engine/placement.py): on the CPU, processes with `engine_threads`
    # torch threads each, by default one per core; on CUDA, one per device.
    engine_workers: int | None = Field(None, ge=1)
    engine_threads: int = Field(1, ge=1)
    # HTTP front-end processes on one port, sharing one engine service (server/frontends.py);
    # None: enough to feed the device (server/engine/placement.py's frontend_count).
    frontends: int | None = Field(None, ge=1)
    # torch.compile each worker's module (inductor): costs tens of seconds per input shape at
    # start; measured in bench/results (the compile section).
    compile: bool = False

    # Task states kept ready in host memory (bytes), least recently used evicted past it
    # and read from the registry again on demand; None: a quarter of the memory available
    # at start. On CUDA each worker keeps device copies up to `device_state_bytes` (None: a
    # quarter of the device's free memory at start).
    host_state_bytes: int | None = Field(None, ge=0)
    device_state_bytes: int | None = Field(None, ge=0)
    # Task states built at once when a task is first used (each a registry read, a full
    # check and the engine's patch), the rest wait.
    task_loads: int = Field(2, ge=1)

    max_body_bytes: int = Field(16 * MiB, ge=1)
    max_artifact_bytes: int = Field(256 * MiB, ge=1)
    max_pixels: int = Field(Image.MAX_IMAGE_PIXELS or 89_478_485, ge=1)
    max_images: int = Field(64, ge=1)

    # Training jobs (POST /tasks/{name}/train, server/jobs): jobs run at once, each in a
    # process of its own (queued beyond); on the CPU each with `train_threads` torch threads,
    # so that serving keeps its cores.
    train_workers: int = Field(1, ge=1)
    train_threads: int = Field(1, ge=1)
    # Untrusted training archives (server/jobs/archive.py), checked while streaming: the
    # upload's size, what it expands to, how many entries, each image's pixels (max_pixels),
    # and the images each class needs at least.
    max_archive_bytes: int = Field(256 * MiB, ge=1)
    max_archive_expanded_bytes: int = Field(512 * MiB, ge=1)
    max_archive_files: int = Field(20_000, ge=1)
    min_class_images: int = Field(2, ge=1)
    # A copy of every artifact served here, kept on local disk (home/artifacts) up to this
    # many bytes, least recently used dropped: what a replica keeps serving, and writes back
    # with POST /registry/restore, when its registry comes back empty.
    artifact_cache_bytes: int = Field(1024 * MiB, ge=0)

    admin_token: SecretStr | None = None
    # When set, predictions (POST /predict, /v2/models/*/infer) need it (or the admin token).
    predict_token: SecretStr | None = None
    # Origins allowed to call the API from a browser page elsewhere ("*" for any), comma
    # separated; empty (the default): no CORS headers at all, browsers allow same origin only.
    cors_origins: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The Open Inference Protocol over gRPC (server/oip_grpc) on `host` and this port; 0: off.
    grpc_port: int = Field(8001, ge=0, le=65535)

    @field_validator("engine_workers", "frontends", "worker_timeout_s", mode="before")
    @classmethod
    def _empty_workers_are_auto(cls, value):
        return None if value in ("", "auto") else value

    @field_validator("backbone_weights")
    @classmethod
    def _empty_weights_are_pretrained(cls, value: str | None) -> str | None:
        return value or None  # PIGGY_BACKBONE_WEIGHTS= (empty, as compose passes it): default

    @field_validator("admin_token", "predict_token")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value and value.get_secret_value() else None

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def registry_url(self) -> str:
        if self.registry:
            return self.registry
        folder = self.home / "demo" / "tasks" if self.demo else self.home / "tasks"
        return f"dir:{folder}"
