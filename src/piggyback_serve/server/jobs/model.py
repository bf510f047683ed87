"""A training job as the API shows it and the job store keeps it: one JSON document."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class TrainOptions(BaseModel):
    """Query parameters of POST /tasks/{name}/train; unset ones take `piggy-masks train`'s
    defaults (masks/train.py's TrainConfig), so that a job and the CLI learn the same task."""

    model_config = {"extra": "forbid"}

    epochs: int | None = Field(None, ge=1, le=1000, description="epochs (raised by min_steps)")
    min_steps: int | None = Field(None, ge=0, le=1_000_000, description="at least this many steps")
    batch_size: int | None = Field(None, ge=1, le=4096)
    lr_mask: float | None = Field(None, gt=0, le=1, description="Adam lr of the mask scores")
    lr_head: float | None = Field(None, gt=0, le=1, description="Adam lr of the new head")
    threshold: float | None = Field(None, gt=0, le=1, description="mask score threshold")
    train_norm: bool = Field(False, description="learn batch-norm parameters per task too")
    input_size: int | None = Field(
        None, ge=8, le=1024, description="pixels a side (default: the backbone's training size)"
    )
    held_out: float = Field(0.2, gt=0, lt=1, description="fraction of each class held out")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    description: str = Field("", max_length=200, description="one line: what the task expects")


class Progress(BaseModel):
    step: int = 0
    steps: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None


class JobResult(BaseModel):
    accuracy: float = Field(description="held-out accuracy of the learned task")
    baseline_accuracy: float = Field(
        description="held-out accuracy of the classifier-only baseline on the same split"
    )
    size_bytes: int = Field(description="bytes of the task's artifact")
    sparsity: float = Field(description="fraction of masked weights switched off")


class JobError(BaseModel):
    code: str
    message: str


class JobData(BaseModel):
    """What the archive held, as unpacked."""

    classes: list[str]
    images: int
    skipped: int = Field(0, description="entries that were not images, skipped")


class Job(BaseModel):
    id: str
    task: str
    state: State = "queued"
    progress: Progress = Progress()
    result: JobResult | None = None
    error: JobError | None = None
    created: str
    started: str | None = None
    finished: str | None = None
    options: TrainOptions = TrainOptions()
    data: JobData
    replica: str = Field(description="the replica that holds the job's images and runs it")
    trainer: str | None = Field(None, description='where it trains: "process PID", "ray task ID"')
    updated: float = Field(description="Unix time of the last word from the job's replica")

    @classmethod
    def new(cls, task: str, options: TrainOptions, data: JobData, replica: str) -> Job:
        return cls(
            id=uuid.uuid4().hex,
            task=task,
            created=now(),
            options=options,
            data=data,
            replica=replica,
            updated=time.time(),
        )

    @property
    def done(self) -> bool:
        return self.state in FINAL


class JobList(BaseModel):
    jobs: list[Job]


def now() -> str:
    """UTC, ISO 8601 to the second, as the API shows times."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
