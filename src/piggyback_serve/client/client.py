"""Clients for the piggyback-serve HTTP API over httpx: `Client` (sync) and `AsyncClient`.

Both take the same arguments and have the same methods; they build the same requests and
read the same answers (`_Api`), and differ only in how they send them. A 503 (overloaded,
not ready) is retried with exponential backoff, honouring the server's `Retry-After`.
Nothing here imports torch or Pillow: a PIL image is recognised by its `save` method.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import mimetypes
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar, Union
from urllib.parse import quote

import httpx

from piggyback_serve.client.errors import PiggyError, TransportError, api_error
from piggyback_serve.client.results import Health, Prediction, TaskInfo

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")

# A path, encoded bytes, an open binary file, or a PIL image.
Image = Union[str, os.PathLike, bytes, IO[bytes], Any]  # noqa: UP007 - alias, not annotation


@dataclass(frozen=True)
class Retry:
    """How 503 answers are retried: `attempts` tries in all, waits doubling from `backoff_s`
    (with jitter), or the server's Retry-After; no single wait longer than `max_wait_s`."""

    attempts: int = 4
    backoff_s: float = 0.25
    max_wait_s: float = 10.0

    def wait_s(self, attempt: int, response: httpx.Response) -> float:
        after = retry_after(response)
        if after is None:
            after = self.backoff_s * 2**attempt * random.uniform(0.5, 1.0)
        return min(max(after, 0.0), self.max_wait_s)


NO_RETRY = Retry(attempts=1)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return (when - datetime.now(UTC)).total_seconds()


@dataclass
class _Call:
    """One API call: the request, how its answer is read, and whether a 503 is retried."""

    method: str
    path: str
    read: Callable[[Any], Any] = lambda data: data
    kwargs: dict = field(default_factory=dict)
    retry: bool = True


class _Api:
    """The requests and answers shared by the sync and async clients."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
    ):
        self.url = url or os.environ.get("PIGGY_URL") or DEFAULT_URL
        token = token or os.environ.get("PIGGY_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.retry = retry or Retry()

    def _predict(self, task: str, images: Image | Sequence[Image], top_k: int) -> _Call:
        many = images if isinstance(images, list | tuple) else [images]
        if not many:
            raise ValueError("predict needs at least one image")
        files = [("file", encode_image(image, i)) for i, image in enumerate(many)]
        return _Call(
            "POST",
            "/predict",
            Prediction.from_json,
            {"params": {"task": task, "top_k": top_k}, "files": files},
        )

    def _tasks(self) -> _Call:
        return _Call("GET", "/tasks", lambda d: [TaskInfo.from_json(t) for t in d["tasks"]])

    def _task(self, name: str) -> _Call:
        return _Call("GET", task_path(name), TaskInfo.from_json)

    def _upload(self, name: str, artifact: str | os.PathLike | bytes) -> _Call:
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        kwargs = {"content": data, "headers": {"Content-Type": "application/octet-stream"}}
        return _Call("PUT", task_path(name), TaskInfo.from_json, kwargs)

    def _delete(self, name: str) -> _Call:
        return _Call("DELETE", task_path(name), lambda _: None)

    def _health(self) -> _Call:
        # Not retried: "not ready" is the answer the caller wants to see.
        return _Call("GET", "/readyz", Health.from_json, retry=False)

    def _policy(self, call: _Call) -> Retry:
        return self.retry if call.retry else NO_RETRY

    @staticmethod
    def _answer(call: _Call, response: httpx.Response) -> Any:
        if response.is_error:
            raise _error(response)
        return call.read(response.json() if response.content else None)


def task_path(name: str) -> str:
    """/tasks/NAME with every character of NAME that could change the path encoded.

    Dots too: httpx would resolve `..` and send `/tasks/../etc` as `/etc`. The server
    decides what a valid name is and answers a bad one with 400 invalid task name."""
    return "/tasks/" + quote(name, safe="").replace(".", "%2E")


def _error(response: httpx.Response):
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200] or response.reason_phrase
    return api_error(response.status_code, code, message, retry_after(response))


def encode_image(image: Image, i: int = 0) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) for a multipart `file` field."""
    if isinstance(image, bytes | bytearray):
        return f"image{i}", bytes(image), "application/octet-stream"
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.name, path.read_bytes(), ctype
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        try:
            image.save(buf, format="PNG")
        except OSError:  # modes PNG cannot hold (CMYK, ...)
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
        return f"image{i}.png", buf.getvalue(), "image/png"
    if hasattr(image, "read"):
        name = Path(getattr(image, "name", f"image{i}")).name
        return name, image.read(), "application/octet-stream"
    raise TypeError(f"not an image: {type(image).__name__} (a path, bytes, file or PIL image)")


class Client(_Api):
    """Synchronous client. `Client(url, token)`; they default to $PIGGY_URL and $PIGGY_TOKEN.

    Use as a context manager, or call close(). `transport` is httpx's (tests, proxies).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(url, token, timeout, retry)
        self._http = httpx.Client(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call) -> Any:
        policy = self._policy(call)
        for attempt in range(policy.attempts):
            try:
                response = self._http.request(call.method, call.path, **call.kwargs)
            except httpx.HTTPError as exc:
                raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
            if response.status_code != 503 or attempt + 1 == policy.attempts:
                return self._answer(call, response)
            time.sleep(policy.wait_s(attempt, response))
        raise PiggyError("unreachable")  # pragma: no cover

    def predict(self, task: str, images: Image | Sequence[Image], top_k: int = 5) -> Prediction:
        """Classify one image or a list of them (paths, bytes, files, PIL images) with `task`."""
        return self._run(self._predict(task, images, top_k))

    def tasks(self) -> list[TaskInfo]:
        """Every registered task."""
        return self._run(self._tasks())

    def task(self, name: str) -> TaskInfo:
        return self._run(self._task(name))

    def upload(self, name: str, artifact: str | os.PathLike | bytes) -> TaskInfo:
        """Upload (or replace) task `name` from an artifact file or its bytes."""
        return self._run(self._upload(name, artifact))

    def delete(self, name: str) -> None:
        self._run(self._delete(name))

    def health(self) -> Health:
        """The server's readiness; raises Unavailable (503) when it is not ready."""
        return self._run(self._health())


class AsyncClient(_Api):
    """The same API for asyncio: `async with AsyncClient(url) as c: await c.predict(...)`."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retry: Retry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(url, token, timeout, retry)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call) -> Any:
        policy = self._policy(call)
        for attempt in range(policy.attempts):
            try:
                response = await self._http.request(call.method, call.path, **call.kwargs)
            except httpx.HTTPError as exc:
                raise TransportError(f"{call.method} {self.url}{call.path}: {exc}") from exc
            if response.status_code != 503 or attempt + 1 == policy.attempts:
                return self._answer(call, response)
            await asyncio.sleep(policy.wait_s(attempt, response))
        raise PiggyError("unreachable")  # pragma: no cover

    async def predict(
        self, task: str, images: Image | Sequence[Image], top_k: int = 5
    ) -> Prediction:
        """Classify one image or a list of them (paths, bytes, files, PIL images) with `task`."""
        return await self._run(self._predict(task, images, top_k))

    async def tasks(self) -> list[TaskInfo]:
        return await self._run(self._tasks())

    async def task(self, name: str) -> TaskInfo:
        return await self._run(self._task(name))

    async def upload(self, name: str, artifact: str | os.PathLike | bytes) -> TaskInfo:
        return await self._run(self._upload(name, artifact))

    async def delete(self, name: str) -> None:
        await self._run(self._delete(name))

    async def health(self) -> Health:
        return await self._run(self._health())
