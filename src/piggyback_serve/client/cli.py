"""piggy: the command line over the piggyback-serve client.

The server is $PIGGY_URL (default http://127.0.0.1:8000); every request sends $PIGGY_TOKEN
when set (the server's admin token for uploads and deletes, or its predict token).
Exit codes: 0 done, 1 the server answered with an error, 2 bad usage or an unreadable
local file, 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from piggyback_serve._pipes import quiet_when_the_reader_leaves
from piggyback_serve.client.client import DEFAULT_URL, Client, Retry
from piggyback_serve.client.errors import APIError, TransportError
from piggyback_serve.client.results import as_json

# What to do about a token the server wants (401) or refused (403).
TOKEN_HINTS = {
    401: "the server wants a token: pass --token TOKEN or set PIGGY_TOKEN "
    "(the server's PIGGY_ADMIN_TOKEN, or PIGGY_PREDICT_TOKEN for predict)",
    403: "the server refused the token: check --token or PIGGY_TOKEN "
    "(the server's PIGGY_ADMIN_TOKEN, or PIGGY_PREDICT_TOKEN for predict)",
}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Aligned columns; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _predict(client: Client, args) -> object:
    answer = client.predict(args.task, args.images, top_k=args.top_k)
    if args.json:
        return as_json(answer)
    rows = []
    for image, result in zip(args.images, answer.results, strict=True):
        for rank, score in enumerate(result.top, 1):
            rows.append((image if rank == 1 else "", rank, score.label, score.score))
    print(table(("IMAGE", "RANK", "LABEL", "SCORE"), rows))
    n = len(args.images)
    print(f"\ntask {answer.task}, {n} image{'s' * (n != 1)}, {answer.latency_ms:.1f} ms")
    return None


def _tasks(client: Client, args) -> object:
    tasks = client.tasks()
    if args.json:
        return {"tasks": as_json(tasks)}  # GET /tasks's own shape
    rows = [
        (
            t.name,
            len(t.labels),
            t.backbone,
            f"{t.size_bytes / 1024:.0f} KiB",
            t.sparsity,
            t.metrics.get("accuracy"),
            t.description,
        )
        for t in tasks
    ]
    headers = ("NAME", "LABELS", "BACKBONE", "SIZE", "SPARSITY", "ACCURACY", "DESCRIPTION")
    print(table(headers, rows))
    return None


def _upload(client: Client, args) -> object:
    task = client.upload(args.name, args.file)
    if args.json:
        return as_json(task)
    print(f"uploaded {task.name}: {len(task.labels)} labels, backbone {task.backbone}")
    if task.artifact_task and task.artifact_task != task.name:
        print(
            f"note: the artifact calls itself {task.artifact_task!r}; it is served as {task.name!r}"
        )
    return None


def _delete(client: Client, args) -> object:
    client.delete(args.name)
    if not args.json:  # DELETE answers 204 with no body: --json prints nothing
        print(f"deleted {args.name}")
    return None


def _health(client: Client, args) -> object:
    health = client.health()
    if args.json:
        return as_json(health)
    print(table(("STATUS", "BACKBONE", "REGISTRY", "TASKS"), [tuple(as_json(health).values())]))
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="piggy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help=f"server URL (default $PIGGY_URL or {DEFAULT_URL})")
    p.add_argument("--token", help="bearer token, admin or predict (default $PIGGY_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--retries", type=int, default=3, help="retries of a 503 answer (3)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer as it is")
    # --json also after the command; SUPPRESS keeps the global one when it is absent there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, parents=[common], help=help, description=help)
        c.set_defaults(func=func)
        return c

    pr = command("predict", _predict, "classify images with a task, labels highest score first")
    pr.add_argument("--task", "-t", required=True, help="task name")
    pr.add_argument("--top-k", "-k", type=int, default=5, help="labels per image (5)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    command("tasks", _tasks, "list the registered tasks")
    up = command("upload", _upload, "upload (or replace) a task artifact")
    up.add_argument("name", help="the task's name on the server")
    up.add_argument("file", help="a .safetensors task artifact")
    command("delete", _delete, "remove a task").add_argument("name")
    command("health", _health, "the server's readiness (exit 1 when not ready)")
    return p


def main(argv: list[str] | None = None) -> int:
    return quiet_when_the_reader_leaves(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    retry = Retry(attempts=max(args.retries, 0) + 1)
    try:
        with Client(args.url, args.token, timeout=args.timeout, retry=retry) as client:
            out = args.func(client, args)
    except APIError as exc:
        print(f"piggy: {exc.code}: {exc.message} (HTTP {exc.status})", file=sys.stderr)
        if exc.status in TOKEN_HINTS:
            print(f"piggy: {TOKEN_HINTS[exc.status]}", file=sys.stderr)
        return 1
    except TransportError as exc:
        print(f"piggy: cannot reach the server: {exc}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # stdout's reader left: not a local file's error
        raise
    except OSError as exc:
        print(f"piggy: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
