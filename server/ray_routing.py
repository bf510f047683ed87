"""Routing by task on Ray (`serve.multiplexed`): each replica tells Ray which tasks it has
served lately, and Ray's router sends a request whose `serve_multiplexed_model_id`
header names a task to a replica that has it, so each replica sees fewer tasks."""

from __future__ import annotations

from ray import serve


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
