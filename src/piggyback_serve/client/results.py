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


def as_json(value: Any) -> Any:
    """Plain JSON-able data from results (for `piggy --json`)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value
