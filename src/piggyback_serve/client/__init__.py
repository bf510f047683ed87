"""Python client for piggyback-serve (installs without torch): `Client`, `AsyncClient`."""

from piggyback_serve.client.client import AsyncClient, Client, Retry
from piggyback_serve.client.errors import (
    APIError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    PiggyError,
    TransportError,
)
from piggyback_serve.client.results import (
    Health,
    ImageResult,
    Job,
    JobProgress,
    JobResult,
    Prediction,
    Score,
    TaskInfo,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "Health",
    "ImageResult",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobProgress",
    "JobResult",
    "JobTimeout",
    "PiggyError",
    "Prediction",
    "Retry",
    "Score",
    "TaskInfo",
    "TransportError",
]
