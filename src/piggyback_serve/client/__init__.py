"""Python client for piggyback-serve (installs without torch): `Client`, `AsyncClient`."""

from piggyback_serve.client.client import AsyncClient, Client, Retry
from piggyback_serve.client.errors import APIError, PiggyError, TransportError
from piggyback_serve.client.results import Health, ImageResult, Prediction, Score, TaskInfo

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "Health",
    "ImageResult",
    "PiggyError",
    "Prediction",
    "Retry",
    "Score",
    "TaskInfo",
    "TransportError",
]
