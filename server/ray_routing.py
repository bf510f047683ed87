"""Routing by task on Ray (`serve.multiplexed`, `--route-by-task N`): Ray's proxy names each
request's task in `serve_multiplexed_model_id` (NameTheTask), each replica tells Ray which
tasks it served lately (NoteTheTask), and Ray's router sends a task's requests to replicas
that have it: each replica then sees fewer tasks, so its weight cache holds more of them
and its per-task batches fill more."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote

from ray import serve

HEADER = b"serve_multiplexed_model_id"
_OIP_INFER = re.compile(r"^/v2/models/([^/]+)/(?:versions/[^/]+/)?infer$")


def task_of(scope) -> str | None:
    """The task a request names: `?task=` of /predict, or the model of a v2 infer."""
    path = scope.get("path", "")
    if path == "/predict":
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("task")
        return values[0] if values else None
    if match := _OIP_INFER.match(path):
        return unquote(match.group(1))
    return None


class NameTheTask:
    """Proxy-side pure ASGI middleware: the request's task as its multiplexed model id
    (a client's own header wins). Without replicas that report tasks, Ray routes as usual."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (task := task_of(scope)):
            headers = scope.get("headers", [])
            if all(key.lower() != HEADER for key, _ in headers):
                scope = {**scope, "headers": [*headers, (HEADER, task.encode())]}
        await self.app(scope, receive, send)


def tracker(max_tasks: int):
    """An async `note(task)` that Ray counts as loading model `task` (an LRU of max_tasks)."""

    async def task_model(task: str) -> str:
        return task  # nothing to load: the engine materialises on demand, as without Ray

    return serve.multiplexed(max_num_models_per_replica=max_tasks)(task_model)


class NoteTheTask:
    """Replica-side pure ASGI middleware: report the request's task to Ray's router."""

    def __init__(self, app, note) -> None:
        self.app = app
        self.note = note

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (task := serve.get_multiplexed_model_id()):
            await self.note(task)
        await self.app(scope, receive, send)
