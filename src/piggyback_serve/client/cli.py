"""piggy: the command line over the piggyback-serve client.

The server is $PIGGY_URL (default http://127.0.0.1:8000); every request sends $PIGGY_TOKEN
when set (the server's admin token for uploads, deletes, training and restore, or its
predict token).
Exit codes: 0 done, 1 the server answered with an error (or a followed training job failed,
was cancelled or outran --wait-timeout; restore could not write every task), 2 bad usage or
an unreadable local file, 3 the server could not be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime

from piggyback_serve._pipes import quiet_when_the_reader_leaves
from piggyback_serve.client.client import DEFAULT_URL, TRAIN_OPTIONS, Client, Retry
from piggyback_serve.client.errors import APIError, JobFailed, JobTimeout, TransportError
from piggyback_serve.client.results import Job, as_json

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


class Failed(Exception):
    """A command that ran but did not do all it should: `piggy: MESSAGE`, exit 1, after
    `out` (its --json answer) is printed."""

    def __init__(self, message: str, out: object = None):
        super().__init__(message)
        self.out = out


def _train(client: Client, args) -> object:
    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    job = client.train(args.name, args.source, **options)
    if not args.json:
        print(f"job {job.id}: training {job.task}, {job.state}")
        print(client.job_url(job.id))
    if args.wait:
        return _follow(client, job, args)
    return as_json(job) if args.json else None


def _follow(client: Client, job: Job, args) -> object:
    """Wait for `job` with a progress bar on stderr, then its results; Failed unless it
    succeeded."""
    bar = None if args.json else _ProgressBar()
    try:
        final = client.wait_job(job.id, args.wait_timeout, on_update=bar.update if bar else None)
    except KeyboardInterrupt:
        print(
            f"\npiggy: stopped following job {job.id}; it goes on on the server "
            f"(piggy job {job.id}, piggy cancel {job.id})",
            file=sys.stderr,
        )
        raise
    finally:
        if bar:
            bar.close()
    if args.json:
        if not final.succeeded:
            raise Failed(str(JobFailed(final)), out=as_json(final))
        return as_json(final)
    final.raise_for_state()
    r = final.result
    took = _seconds(final.started, final.finished)
    print(f"trained {final.task}" + (f" in {took:.1f} s" if took is not None else ""))
    if r is not None:
        print(f"held-out accuracy  {r.accuracy:.4f}")
        print(f"classifier only    {r.baseline_accuracy:.4f}  (a head on the frozen backbone)")
        print(f"size               {r.size_bytes / 1024:.1f} KiB")
        print(f"sparsity           {r.sparsity:.4f}")
    return None


class _ProgressBar:
    """tqdm on stderr: step/steps, the epoch and the last loss of a job being followed."""

    def __init__(self):
        from tqdm import tqdm  # only when a job is followed

        self._bar = tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, job: Job) -> None:
        p, bar = job.progress, self._bar
        if p.steps and bar.total != p.steps:
            bar.total = p.steps
        if job.state == "running" and p.epochs:
            bar.set_description(f"epoch {p.epoch}/{p.epochs}", refresh=False)
        else:
            bar.set_description(job.state, refresh=False)
        bar.set_postfix_str("" if p.loss is None else f"loss {p.loss:.4f}", refresh=False)
        bar.n = p.step
        bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _seconds(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def _progress(job: Job) -> str:
    p = job.progress
    return f"{p.step}/{p.steps}" if p.steps else ""


def _jobs(client: Client, args) -> object:
    jobs = client.jobs()
    if args.json:
        return {"jobs": as_json(jobs)}  # GET /jobs's own shape
    rows = [
        (
            j.id,
            j.task,
            j.state,
            _progress(j),
            j.result.accuracy if j.result else None,
            j.created,
        )
        for j in jobs
    ]
    print(table(("ID", "TASK", "STATE", "STEPS", "ACCURACY", "CREATED"), rows))
    return None


def _job(client: Client, args) -> object:
    job = client.job(args.id)
    if args.wait:  # exits as `train --wait` does, also for a job that already ended
        if not args.json:
            _show(job)
        return _follow(client, job, args)
    if args.json:
        return as_json(job)
    _show(job)
    return None


def _show(job: Job) -> None:
    p = job.progress
    lines = [("job", job.id), ("task", job.task), ("state", job.state)]
    if p.steps or p.step:
        loss = "" if p.loss is None else f", loss {p.loss:.4f}"
        lines.append(("progress", f"step {p.step}/{p.steps}, epoch {p.epoch}/{p.epochs}{loss}"))
    if job.data.get("classes"):
        classes = job.data["classes"]
        images = job.data.get("images")
        lines.append(
            ("data", f"{len(classes)} classes ({', '.join(map(str, classes))}), {images} images")
        )
    if job.result:
        r = job.result
        lines += [
            ("accuracy", f"{r.accuracy:.4f} held out"),
            ("baseline", f"{r.baseline_accuracy:.4f} classifier only"),
            ("size", f"{r.size_bytes / 1024:.1f} KiB"),
            ("sparsity", f"{r.sparsity:.4f}"),
        ]
    if job.error:
        lines.append(("error", f"{job.error.code}: {job.error.message}"))
    for name in ("created", "started", "finished"):
        if getattr(job, name):
            lines.append((name, getattr(job, name)))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")


def _cancel(client: Client, args) -> object:
    job = client.cancel_job(args.id)
    if args.json:
        return as_json(job)
    if job.state == "cancelled":
        print(f"cancelled job {job.id} ({job.task})")
    else:
        print(f"cancelling job {job.id} ({job.task}): {job.state}")
    return None


def _restore(client: Client, args) -> object:
    answer = client.restore_registry()
    restored, failed = answer.get("restored") or [], answer.get("failed") or {}
    if not args.json:
        print(f"registry {answer.get('registry', '')}")
        if restored:
            print(f"restored {len(restored)}: {', '.join(restored)}")
        elif not failed:
            print("nothing to restore: the registry holds every task served here")
        for name, why in failed.items():
            print(f"failed {name}: {why}")
    if failed:
        n = len(failed)
        raise Failed(f"{n} task{'s' * (n != 1)} not restored", out=answer if args.json else None)
    return answer if args.json else None


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

    tr = command(
        "train",
        _train,
        "train a task on the server from a folder with one folder of images per class "
        "(packed as tar.gz) or a .zip/.tar/.tar.gz/.tgz archive of one; prints the job",
    )
    tr.add_argument("name", help="the task's name on the server")
    tr.add_argument("source", metavar="FOLDER_OR_ARCHIVE")
    tr.add_argument("--epochs", type=int, help="passes over the data")
    tr.add_argument("--min-steps", type=int, help="at least this many steps, whatever epochs")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr-mask", type=float, help="the mask's learning rate")
    tr.add_argument("--lr-head", type=float, help="the classifier head's learning rate")
    tr.add_argument("--threshold", type=float, help="the mask's binarising threshold")
    tr.add_argument(
        "--train-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the backbone's normalisation layers too",
    )
    tr.add_argument("--input-size", type=int, help="image side in pixels")
    tr.add_argument("--held-out", type=float, help="share of the images kept to measure")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--description", help="one line: what the task expects as input")
    _wait_flags(tr, "follow the job with a progress bar until it ends, then its results")
    command("jobs", _jobs, "list the training jobs, newest first")
    jb = command("job", _job, "show a training job")
    jb.add_argument("id", help="the job's id")
    _wait_flags(jb, "follow the job until it ends")
    command("cancel", _cancel, "cancel a queued or running training job").add_argument("id")

    reg = sub.add_parser("registry", help="the task registry", description="the task registry")
    actions = reg.add_subparsers(dest="action", required=True, metavar="ACTION")
    restore = actions.add_parser(
        "restore",
        parents=[common],
        help="write the tasks this server serves but its registry lacks back into it",
    )
    restore.set_defaults(func=_restore)
    return p


def _wait_flags(c: argparse.ArgumentParser, help: str) -> None:
    c.add_argument("--wait", action="store_true", help=help)
    c.add_argument(
        "--wait-timeout", type=float, metavar="SECONDS", help="give up waiting after SECONDS"
    )


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
    except JobFailed as exc:  # a followed job (--wait) failed or was cancelled
        print(f"piggy: {exc}", file=sys.stderr)
        return 1
    except JobTimeout as exc:
        print(f"piggy: {exc} (piggy job {exc.job_id})", file=sys.stderr)
        return 1
    except Failed as exc:
        if exc.out is not None:
            print(json.dumps(exc.out, indent=2))
        print(f"piggy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left: not a local file's error
        raise
    except (OSError, ValueError) as exc:  # a missing file, a folder that is no archive
        print(f"piggy: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
