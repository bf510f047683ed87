"""Python client for piggyback-serve (installs without torch): `Client`, `AsyncClient`."""

from client.client import AsyncClient, Client, Retry
from client.errors import APIError, PiggyError, TransportError
from client.results import Health, ImageResult, Prediction, Score, TaskInfo

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
