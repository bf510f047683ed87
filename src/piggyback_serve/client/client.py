"""Clients for the piggyback-serve HTTP API over httpx: `Client` (sync) and `AsyncClient`.

Both take the same arguments and have the same methods; they build the same requests and
read the same answers (`_Api`), and differ only in how they send them. A 503 (overloaded,
not ready) is retried with exponential backoff, honouring the server's `Retry-After`.
Nothing here imports torch or Pillow: a PIL image is recognised by its `save` method.

Training jobs (`Client.train`, `job`, `jobs`, `cancel_job`, `job_events`, `wait_job`) are the
sync client's; AsyncClient has `job`, `jobs`, `cancel_job` and `restore_registry`.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import io
import json
import mimetypes
import os
import random
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar, Union
from urllib.parse import quote

import httpx
from httpx_sse import connect_sse

from piggyback_serve.client.errors import (
    JobTimeout,
    PiggyError,
    TransportError,
    Unavailable,
    api_error,
)
from piggyback_serve.client.results import Health, Job, Prediction, TaskInfo

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

    def _job_client(self) -> Any:
        """What a Job follows itself with (job.wait()): the sync client, None for async."""
        return None

    def _read_job(self, data: dict) -> Job:
        return Job.from_json(data, self._job_client())

    def _jobs(self) -> _Call:
        return _Call("GET", "/jobs", lambda d: [self._read_job(j) for j in d["jobs"]])

    def _job(self, job_id: str) -> _Call:
        return _Call("GET", job_path(job_id), self._read_job)

    def _cancel_job(self, job_id: str) -> _Call:
        return _Call("DELETE", job_path(job_id), self._read_job)

    def _restore_registry(self) -> _Call:
        return _Call("POST", "/registry/restore")

    def job_url(self, job_id: str) -> str:
        """The job's address on the server (GET it for its state)."""
        return self.url.rstrip("/") + job_path(job_id)

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


def job_path(job_id: str) -> str:
    """/jobs/ID, the id encoded like a task name (task_path)."""
    return "/jobs/" + quote(job_id, safe="").replace(".", "%2E")


# The training options of POST /tasks/{name}/train, as Client.train's keywords.
TRAIN_OPTIONS = (
    "epochs",
    "min_steps",
    "batch_size",
    "lr_mask",
    "lr_head",
    "threshold",
    "train_norm",
    "input_size",
    "held_out",
    "seed",
    "description",
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def pack_folder(folder: str | os.PathLike, out: IO[bytes]) -> int:
    """Write `folder` as a tar.gz to `out`: its class folders at the archive's root, regular
    files only (no links, devices or hidden files and folders, the names starting with a
    dot), owners and modes dropped. Returns how many files it holds. Streams: memory stays
    flat whatever the folder's size."""
    root = Path(folder)
    count = 0
    # compresslevel 1: images are compressed already; a higher level costs CPU for ~nothing.
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        for here, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                path = Path(here, name)
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode):
                    continue
                member = tarfile.TarInfo(path.relative_to(root).as_posix())
                member.size, member.mtime, member.mode = info.st_size, int(info.st_mtime), 0o644
                with open(path, "rb") as f:
                    tar.addfile(member, f)
                count += 1
    return count


@contextmanager
def training_archive(source: str | os.PathLike | bytes) -> Iterator[tuple[IO[bytes], int]]:
    """(an open binary file, its size) to send as a training archive: a folder packed as
    tar.gz into a temporary file (removed after), a .zip/.tar/.tar.gz/.tgz file as it is,
    or an archive's bytes. ValueError for anything else; FileNotFoundError if missing."""
    if isinstance(source, bytes | bytearray):
        yield io.BytesIO(source), len(source)
        return
    path = Path(source)
    if path.is_dir():
        with tempfile.TemporaryFile(prefix="piggy-train-", suffix=".tar.gz") as tmp:
            if pack_folder(path, tmp) == 0:
                raise ValueError(f"{path}: no files to train on (one folder per class)")
            size = tmp.tell()
            tmp.seek(0)
            yield tmp, size
    elif path.is_file():
        if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(
                f"{path}: not a folder or a .zip, .tar, .tar.gz or .tgz archive of one folder "
                "per class"
            )
        with open(path, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
    else:
        raise FileNotFoundError(errno.ENOENT, "no such folder or archive", str(path))


class _Chunks:
    """A file's bytes in chunks, from its start each time it is iterated (a retried
    request sends it again), never all of it in memory."""

    def __init__(self, file: IO[bytes], chunk: int = 1 << 16):
        self._file, self._chunk = file, chunk

    def __iter__(self) -> Iterator[bytes]:
        self._file.seek(0)
        while chunk := self._file.read(self._chunk):
            yield chunk


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

    def _job_client(self) -> Client:
        return self

    def train(
        self,
        name: str,
        source: str | os.PathLike | bytes,
        *,
        epochs: int | None = None,
        min_steps: int | None = None,
        batch_size: int | None = None,
        lr_mask: float | None = None,
        lr_head: float | None = None,
        threshold: float | None = None,
        train_norm: bool | None = None,
        input_size: int | None = None,
        held_out: float | None = None,
        seed: int | None = None,
        description: str | None = None,
    ) -> Job:
        """Start training task `name` on the server from a folder of class folders (packed
        as tar.gz in a temporary file, streamed) or a .zip/.tar/.tar.gz/.tgz archive of one;
        the options left None are the server's defaults. Returns the queued Job at once:
        `job.wait()` follows it to the end. Needs the admin token."""
        options = dict(
            epochs=epochs,
            min_steps=min_steps,
            batch_size=batch_size,
            lr_mask=lr_mask,
            lr_head=lr_head,
            threshold=threshold,
            train_norm=train_norm,
            input_size=input_size,
            held_out=held_out,
            seed=seed,
            description=description,
        )
        params = {k: v for k, v in options.items() if v is not None}
        with training_archive(source) as (file, size):
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            kwargs = {"params": params, "content": _Chunks(file), "headers": headers}
            return self._run(_Call("POST", task_path(name) + "/train", self._read_job, kwargs))

    def jobs(self) -> list[Job]:
        """Every training job the server knows, newest first."""
        return self._run(self._jobs())

    def job(self, job_id: str) -> Job:
        return self._run(self._job(job_id))

    def cancel_job(self, job_id: str) -> Job:
        """Cancel a queued or running job; Conflict (409 job_finished) if it already ended."""
        return self._run(self._cancel_job(job_id))

    def restore_registry(self) -> dict:
        """Write the tasks this server serves but its registry lacks back into the registry:
        {"restored": [names], "failed": {name: why}, "registry": url}."""
        return self._run(self._restore_registry())

    def job_events(self, job_id: str, timeout: float | None = None) -> Iterator[Job]:
        """The job at once, then each time it changes, until its state is final (the
        server's Server-Sent Events). `timeout`: seconds to wait for the next event (None:
        no limit). A dropped stream raises TransportError."""
        path = job_path(job_id) + "/events"
        limits = httpx.Timeout(self.timeout, read=timeout)
        try:
            with connect_sse(self._http, "GET", path, timeout=limits) as source:
                response = source.response
                if response.is_error:
                    response.read()
                    raise _error(response)
                for event in source.iter_sse():
                    if event.event != "job":
                        continue
                    try:
                        job = self._read_job(json.loads(event.data))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise TransportError(f"GET {self.url}{path}: bad event: {exc}") from exc
                    yield job
                    if job.done:
                        return
        except httpx.HTTPError as exc:
            raise TransportError(f"GET {self.url}{path}: {exc}") from exc

    def wait_job(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 1.0,
    ) -> Job:
        """Follow job `job_id` until it is final and return the final Job, whatever its state
        (`.raise_for_state()` raises unless it succeeded). Follows the events stream; if that
        drops or is refused (503), polls GET /jobs/{id} every `poll_s`. `on_update(job)` is
        called with each new state. JobTimeout after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Job | None = None

        def left() -> float | None:
            return None if deadline is None else deadline - time.monotonic()

        def seen(job: Job) -> Job:
            nonlocal last
            if on_update is not None and job != last:
                on_update(job)
            last = job
            return job

        first = left()
        events = self.job_events(job_id, timeout=None if first is None else max(first, 0.001))
        try:
            with closing(events):
                for job in events:
                    if seen(job).done:
                        return job
                    if (remaining := left()) is not None and remaining <= 0:
                        raise JobTimeout(job_id, timeout, job)
        except (TransportError, Unavailable):
            pass  # the stream dropped or was refused: poll instead
        while True:
            job = seen(self.job(job_id))
            if job.done:
                return job
            remaining = left()
            if remaining is not None and remaining <= 0:
                raise JobTimeout(job_id, timeout, job)
            time.sleep(poll_s if remaining is None else min(poll_s, remaining))


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

    async def jobs(self) -> list[Job]:
        return await self._run(self._jobs())

    async def job(self, job_id: str) -> Job:
        return await self._run(self._job(job_id))

    async def cancel_job(self, job_id: str) -> Job:
        return await self._run(self._cancel_job(job_id))

    async def restore_registry(self) -> dict:
        return await self._run(self._restore_registry())
