"""The JSON bodies of the HTTP API (DESIGN.md), as pydantic models."""

from __future__ import annotations

from pydantic import BaseModel, Field

from server.catalog import Task


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
    name: str
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
    status: str
    backbone: str | None = None
    registry: str | None = None
    tasks: int | None = None
