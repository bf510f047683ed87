"""A small synchronous client over httpx for the piggyback-serve HTTP API."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path

import httpx

from client.errors import PiggyError

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """`Client(url, token)`; url and token default to $PIGGY_URL and $PIGGY_TOKEN."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        url = url or os.environ.get("PIGGY_URL", DEFAULT_URL)
        token = token or os.environ.get("PIGGY_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            try:
                error = response.json()["error"]
                raise PiggyError(response.status_code, error["code"], error["message"])
            except (ValueError, KeyError, TypeError):
                raise PiggyError(response.status_code, "http_error", response.text[:200]) from None
        return response.json() if response.content else {}

    def predict(self, task: str, images: list[str | Path | bytes], top_k: int = 5) -> dict:
        """Classify images (paths or encoded bytes) with `task`; one result per image."""
        files = []
        for i, image in enumerate(images):
            if isinstance(image, bytes):
                files.append(("file", (f"image{i}", image, "application/octet-stream")))
            else:
                path = Path(image)
                ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                files.append(("file", (path.name, path.read_bytes(), ctype)))
        return self._call("POST", "/predict", params={"task": task, "top_k": top_k}, files=files)

    def tasks(self) -> list[dict]:
        return self._call("GET", "/tasks")["tasks"]

    def task(self, name: str) -> dict:
        return self._call("GET", f"/tasks/{name}")

    def upload(self, name: str, artifact: str | Path | bytes) -> dict:
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        return self._call(
            "PUT",
            f"/tasks/{name}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def delete(self, name: str) -> dict:
        return self._call("DELETE", f"/tasks/{name}")

    def health(self) -> dict:
        return self._call("GET", "/readyz")
