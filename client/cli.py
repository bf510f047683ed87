"""piggy: the command line over the client ($PIGGY_URL, $PIGGY_TOKEN)."""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from client.client import Client
from client.errors import PiggyError


def _predict(client: Client, args) -> None:
    answer = client.predict(args.task, args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(answer, indent=2))
        return
    for image, result in zip(args.images, answer["results"], strict=True):
        labels = ", ".join(f"{t['label']} {t['score']:.3f}" for t in result["top"])
        print(f"{image}: {labels}")


def _tasks(client: Client, args) -> None:
    for task in client.tasks():
        print(f"{task['name']:20s} {len(task['labels']):4d} labels  {task['backbone']}")


def _upload(client: Client, args) -> None:
    client.upload(args.name, args.file)
    print(f"uploaded {args.name}")


def _delete(client: Client, args) -> None:
    client.delete(args.name)
    print(f"deleted {args.name}")


def _health(client: Client, args) -> None:
    print(json.dumps(client.health()))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piggy", description=__doc__)
    p.add_argument("--url", help="server URL (default $PIGGY_URL or http://127.0.0.1:8000)")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="classify images with a task")
    pr.add_argument("--task", required=True)
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--json", action="store_true")
    pr.add_argument("images", nargs="+")
    pr.set_defaults(func=_predict)
    sub.add_parser("tasks", help="list the registered tasks").set_defaults(func=_tasks)
    up = sub.add_parser("upload", help="upload a task artifact")
    up.add_argument("name")
    up.add_argument("file")
    up.set_defaults(func=_upload)
    de = sub.add_parser("delete", help="remove a task")
    de.add_argument("name")
    de.set_defaults(func=_delete)
    sub.add_parser("health", help="server readiness").set_defaults(func=_health)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.url) as client:
            args.func(client, args)
    except PiggyError as exc:
        print(f"piggy: {exc}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError) as exc:
        print(f"piggy: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
