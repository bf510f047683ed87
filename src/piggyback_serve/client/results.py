"""Typed results: what the server's JSON answers become (extra fields are ignored)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def _known(cls: type[T], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Score:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class ImageResult:
    top: list[Score]  # highest score first

    @property
    def label(self) -> str:
        """The best label."""
        return self.top[0].label

    @classmethod
    def from_json(cls, data: dict) -> ImageResult:
        return cls(top=[Score(**_known(Score, s)) for s in data["top"]])


@dataclass(frozen=True)
class Prediction:
    task: str
    results: list[ImageResult]  # one per image, in request order
    latency_ms: float

    @property
    def labels(self) -> list[str]:
        """The best label of each image."""
        return [r.label for r in self.results]

    @classmethod
    def from_json(cls, data: dict) -> Prediction:
        results = [ImageResult.from_json(r) for r in data["results"]]
        return cls(task=data["task"], results=results, latency_ms=data["latency_ms"])


@dataclass(frozen=True)
class TaskInfo:
    name: str  # the name it is served under
    labels: list[str]
    backbone: str
    artifact_task: str = ""  # the name written in the artifact (servers before 0.2: "")
    description: str = ""  # one line: what the task expects as input ("" when not given)
    size_bytes: int = 0
    sparsity: float = 0.0
    input_size: int = 0
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> TaskInfo:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Health:
    status: str  # "ready"
    backbone: str | None = None
    registry: str | None = None
    tasks: int | None = None

    @classmethod
    def from_json(cls, data: dict) -> Health:
        return cls(**_known(cls, data))


FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobProgress:
    step: int = 0
    steps: int = 0  # 0 until the trainer knows how many
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None  # the last training loss, once there is one


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job measured on its held-out images."""

    accuracy: float  # the trained task (mask + head)
    baseline_accuracy: float  # a classifier head alone on the frozen backbone
    size_bytes: int  # the task's artifact
    sparsity: float  # the share of the mask's weights that are off


@dataclass(frozen=True)
class JobErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    """A training job (POST /tasks/{name}/train). `done` once its state is final.

    A Job from `Client` knows that client: `job.wait()` follows it to the end and returns
    the final Job, whatever its state; `job.raise_for_state()` then raises JobFailed or
    JobCancelled unless it succeeded. Timestamps are the server's ISO 8601 UTC strings."""

    id: str
    task: str
    state: str  # queued | running | succeeded | failed | cancelled
    progress: JobProgress = field(default_factory=JobProgress)
    result: JobResult | None = None
    error: JobErrorInfo | None = None
    created: str | None = None
    started: str | None = None
    finished: str | None = None
    options: dict = field(default_factory=dict)  # the training options it was given
    data: dict = field(default_factory=dict)  # what the archive held: classes, images, skipped
    replica: str = ""  # the server replica that holds the job's images and trains it
    updated: float | None = None  # Unix time of the last word from that replica
    trainer: str | None = None  # where it trains: "process 1234", "ray task 5e0c..."
    _client: Any = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.state in FINAL_STATES

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @classmethod
    def from_json(cls, data: dict, client: Any = None) -> Job:
        known = _known(cls, data)
        known.pop("_client", None)
        known["progress"] = JobProgress(**_known(JobProgress, data.get("progress") or {}))
        if data.get("result"):
            known["result"] = JobResult(**_known(JobResult, data["result"]))
        if data.get("error"):
            known["error"] = JobErrorInfo(**_known(JobErrorInfo, data["error"]))
        return cls(**known, _client=client)

    def wait(self, timeout: float | None = None, on_update=None) -> Job:
        """Follow the job until it is final and return the final Job (also when it failed or
        was cancelled: see raise_for_state). Its events stream, or polling if that drops.
        `on_update(job)` is called with each new state. Raises JobTimeout after `timeout` s."""
        if self._client is None:
            raise TypeError("this Job has no client to follow it with: use Client.wait_job(id)")
        return self._client.wait_job(self.id, timeout, on_update=on_update)

    def raise_for_state(self) -> Job:
        """This job when it succeeded (or is not final yet); else raises JobFailed
        (failed) or JobCancelled (cancelled) carrying it and its error's code and message."""
        from piggyback_serve.client.errors import JobCancelled, JobFailed

        if self.state == "failed":
            raise JobFailed(self)
        if self.state == "cancelled":
            raise JobCancelled(self)
        return self


def as_json(value: Any) -> Any:
    """Plain JSON-able data from results (for `piggy --json`); fields named _x are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: as_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value
