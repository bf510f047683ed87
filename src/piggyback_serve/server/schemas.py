"""The JSON bodies of the HTTP API (docs/serving.md), as pydantic models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from piggyback_serve.server.catalog import Task
from piggyback_serve.server.protocol import WorkerInfo


class Score(BaseModel):
    label: str
    index: int
    score: float


class ImageResult(BaseModel):
    top: list[Score] = Field(description="highest score first")


class Prediction(BaseModel):
    task: str
    results: list[ImageResult] = Field(description="one entry per image, in request order")
    latency_ms: float


class TaskInfo(BaseModel):
    name: str = Field(description="the name the task is served under (the URL's)")
    artifact_task: str = Field(description="the task name written in the artifact itself")
    description: str = Field(
        "", description="one line: what the task expects as input (empty when not given)"
    )
    labels: list[str]
    backbone: str
    size_bytes: int
    sparsity: float
    input_size: int
    metrics: dict

    @classmethod
    def of(cls, task: Task) -> TaskInfo:
        art = task.artifact
        return cls(
            name=task.name,
            artifact_task=art.task,
            description=art.description,
            labels=art.labels,
            backbone=art.backbone,
            size_bytes=task.size_bytes,
            sparsity=task.sparsity,
            input_size=art.input_size,
            metrics=art.metrics,
        )


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class Health(BaseModel):
    """GET /readyz when ready: status "ready", or "degraded" (serving, with `degraded`
    saying what is wrong)."""

    status: str
    degraded: str | None = Field(
        None, description="why the status is degraded: a registry reset (POST /registry/restore)"
    )
    held: int = Field(
        0, description="tasks served here that a registry reset took from the registry"
    )
    backbone: str
    registry: str
    tasks: int = Field(description="tasks listed from the registry (headers read)")
    tasks_loaded: int = Field(0, description="of those, with their state ready in memory")
    tasks_failed: int = Field(0, description="listed but not served: invalid artifacts")
    failed: dict[str, str] = Field(
        {}, description="the first failed tasks (at most 10), each with why"
    )
    workers: list[WorkerInfo] = []  # the pool's own record of each engine worker


class Liveness(BaseModel):
    """GET /healthz: the process answers; how the admin routes are guarded."""

    status: str
    admin: Literal["open", "token"] = Field(
        description="open: no PIGGY_ADMIN_TOKEN is set, anyone can upload and delete tasks"
    )
