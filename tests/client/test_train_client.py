"""Training jobs and registry restore from the client, against a scripted server
(an httpx transport): the archive a folder is packed into, the query options, the events
stream, wait() and its fallback to polling, the errors, and `piggy train/jobs/job/cancel/
registry restore`; then the same against a real server that trains (the live fixture)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from piggyback_serve.client import Client, Job, JobCancelled, JobFailed, JobTimeout, Retry
from piggyback_serve.client import cli as cli_module
from piggyback_serve.client.errors import (
    Conflict,
    InvalidArchive,
    InvalidArtifact,
    NotFound,
    TransportError,
)
from piggyback_serve.client.results import as_json

JOB_ID = "3f2a" * 8
URL = "http://piggy.test"


def job_json(state: str = "queued", step: int = 0, **extra) -> dict:
    """A Job as the server's JSON (the contract's shape)."""
    data = {
        "id": JOB_ID,
        "task": "flowers",
        "state": state,
        "progress": {"step": step, "steps": 4, "epoch": 1, "epochs": 2, "loss": None},
        "result": None,
        "error": None,
        "created": "2026-12-07T06:40:00Z",
        "started": None if state == "queued" else "2026-12-07T06:40:01Z",
        "finished": None,
        "options": {"epochs": 2},
        "data": {"classes": ["a", "b"], "images": 8, "skipped": 0},
        "replica": "host:1",
        "updated": 1.5,
        "trainer": None if state == "queued" else "process 1234",
    }
    if step:
        data["progress"]["loss"] = 1.0 / step
    if state == "succeeded":
        data["finished"] = "2026-12-07T06:40:13Z"
        data["result"] = {
            "accuracy": 0.93,
            "baseline_accuracy": 0.88,
            "size_bytes": 51234,
            "sparsity": 0.12,
        }
    if state in ("failed", "cancelled"):
        data["finished"] = "2026-12-07T06:40:05Z"
        code = "training_failed" if state == "failed" else "cancelled"
        data["error"] = {"code": code, "message": f"the job {state}: loss is nan"}
    data.update(extra)
    return data


def sse(*jobs: dict, ping: bool = True) -> bytes:
    parts = [": ping\n\n"] if ping else []
    parts.append("event: other\ndata: {}\n\n")  # not a job event: skipped
    parts += [f"event: job\ndata: {json.dumps(j)}\n\n" for j in jobs]
    return "".join(parts).encode()


class Dropped(httpx.SyncByteStream):
    """An events stream that sends `body` and then loses its connection."""

    def __init__(self, body: bytes):
        self.body = body

    def __iter__(self):
        yield self.body
        raise httpx.RemoteProtocolError("peer closed connection")


class FakeServer(httpx.BaseTransport):
    """A scripted piggyback-serve as an httpx transport (not MockTransport, which reads a
    request whole first): records each request and the chunks its body came in; `events`
    is the events stream's body (bytes, a stream, or a status code), `polls` the
    GET /jobs/{id} answers in turn."""

    def __init__(self):
        self.requests: list[tuple[httpx.Request, bytes]] = []
        self.chunks: list[int] = []  # sizes of the chunks the train upload came in
        self.train_answers: list[httpx.Response] = []
        self.events: bytes | httpx.SyncByteStream | int = sse(
            job_json("queued"),
            job_json("running", 1),
            job_json("running", 4),
            job_json("succeeded", 4),
        )
        self.polls: list[dict] = []
        self.restore = {"restored": ["a", "b"], "failed": {}, "registry": "file:///reg"}
        self.cancel: httpx.Response = httpx.Response(200, json=job_json("cancelled"))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = b""
        if request.method == "POST":
            for chunk in request.stream:
                self.chunks.append(len(chunk))
                body += chunk
        self.requests.append((request, body))
        path, method = request.url.path, request.method
        if method == "POST" and path.endswith("/train"):
            if self.train_answers:
                return self.train_answers.pop(0)
            return httpx.Response(202, json=job_json(), headers={"Location": f"/jobs/{JOB_ID}"})
        if path == f"/jobs/{JOB_ID}/events":
            if isinstance(self.events, int):
                error = {"error": {"code": "overloaded", "message": "busy"}}
                return httpx.Response(self.events, json=error)
            headers = {"Content-Type": "text/event-stream"}
            if isinstance(self.events, bytes):
                return httpx.Response(200, headers=headers, content=self.events)
            return httpx.Response(200, headers=headers, stream=self.events)
        if path.endswith("/events"):
            error = {"error": {"code": "job_not_found", "message": "no job 'x'"}}
            return httpx.Response(404, json=error)
        if path == f"/jobs/{JOB_ID}" and method == "GET":
            return httpx.Response(200, json=self.polls.pop(0) if self.polls else job_json())
        if path == f"/jobs/{JOB_ID}" and method == "DELETE":
            return self.cancel
        if path == "/jobs":
            return httpx.Response(200, json={"jobs": [job_json("running", 2), job_json()]})
        if path == "/registry/restore" and method == "POST":
            return httpx.Response(200, json=self.restore)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})

    def last(self, method: str, path: str) -> tuple[httpx.Request, bytes]:
        return [(r, b) for r, b in self.requests if (r.method, r.url.path) == (method, path)][-1]


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(server):
    retry = Retry(attempts=3, backoff_s=0.01)
    with Client(URL, token="tok", transport=server, retry=retry) as c:
        yield c


def image_folder(root: Path, classes=("a", "b"), per_class: int = 2, size: int = 100) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(bytes([i]) * size + c.encode())
    return root


def members(body: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        out = {}
        for m in tar.getmembers():
            assert m.isreg(), m.name  # regular files only: no links, no folders
            out[m.name] = tar.extractfile(m).read()
        return out


# --- Client.train: the archive and the request --------------------------------------------


def test_a_folder_is_packed_with_its_class_folders_at_the_root(client, server, tmp_path):
    folder = image_folder(tmp_path / "flowers")
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden: left out
    (folder / "a" / ".hidden.png").write_bytes(b"junk")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_bytes(b"junk")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"not yours")
    os.symlink(outside, folder / "b" / "link.png")  # a link: left out, not followed
    os.symlink(tmp_path, folder / "loop")  # a link to a folder: not followed either

    job = client.train("flowers", folder, epochs=1, min_steps=2, input_size=32)

    request, body = server.last("POST", "/tasks/flowers/train")
    assert members(body) == {
        f"{c}/{i}.png": bytes([i]) * 100 + c.encode() for c in "ab" for i in range(2)
    }
    assert request.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in request.headers
    assert request.headers["authorization"] == "Bearer tok"
    assert dict(request.url.params) == {"epochs": "1", "min_steps": "2", "input_size": "32"}
    assert isinstance(job, Job) and job.id == JOB_ID and job.state == "queued" and not job.done
    assert job.data["classes"] == ["a", "b"] and job.progress.steps == 4


def test_every_option_given_goes_as_a_query_parameter(client, server, tmp_path):
    folder = image_folder(tmp_path / "f")
    client.train(
        "flowers",
        folder,
        epochs=3,
        min_steps=200,
        batch_size=32,
        lr_mask=1e-4,
        lr_head=1e-3,
        threshold=5e-3,
        train_norm=False,
        input_size=64,
        held_out=0.2,
        seed=0,
        description="a flower photo",
    )
    request, _ = server.last("POST", "/tasks/flowers/train")
    assert dict(request.url.params) == {
        "epochs": "3",
        "min_steps": "200",
        "batch_size": "32",
        "lr_mask": "0.0001",
        "lr_head": "0.001",
        "threshold": "0.005",
        "train_norm": "false",
        "input_size": "64",
        "held_out": "0.2",
        "seed": "0",
        "description": "a flower photo",
    }
    client.train("flowers", folder, train_norm=True)
    assert dict(server.last("POST", "/tasks/flowers/train")[0].url.params) == {"train_norm": "true"}
    client.train("a.b/../c", folder)  # the name cannot change the path
    assert server.requests[-1][0].url.raw_path.startswith(b"/tasks/a%2Eb%2F%2E%2E%2Fc/train")


def test_a_big_folder_is_streamed_in_chunks(client, server, tmp_path):
    folder = tmp_path / "big"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            (folder / c / f"{i}.bin").write_bytes(os.urandom(200_000))  # incompressible
    client.train("big", folder)
    _, body = server.last("POST", "/tasks/big/train")
    assert len(body) > 1_000_000 and len(members(body)) == 6
    assert len(server.chunks) >= 10 and max(server.chunks) <= 1 << 16, server.chunks[:5]


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz", ".tgz", ".TGZ"])
def test_an_archive_is_sent_as_it_is(client, server, tmp_path, suffix):
    archive = tmp_path / f"data{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("top/a/0.png", b"x")
    else:
        archive.write_bytes(os.urandom(5000))  # the server sniffs: sent whatever it holds
    client.train("flowers", archive)
    assert server.last("POST", "/tasks/flowers/train")[1] == archive.read_bytes()
    client.train("flowers", archive.read_bytes())  # or its bytes
    assert server.last("POST", "/tasks/flowers/train")[1] == archive.read_bytes()


def test_what_is_no_folder_or_archive_is_refused_before_any_request(client, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(ValueError, match=r"notes.txt: not a folder or a \.zip"):
        client.train("flowers", text)
    with pytest.raises(FileNotFoundError, match="missing"):
        client.train("flowers", tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no files to train on"):
        client.train("flowers", tmp_path / "empty")
    assert server.requests == []


def test_a_503_sends_the_whole_archive_again(client, server, tmp_path):
    busy = {"error": {"code": "overloaded", "message": "busy"}}
    server.train_answers = [httpx.Response(503, json=busy, headers={"Retry-After": "0"})]
    client.train("flowers", image_folder(tmp_path / "f"))
    (_, first), (_, second) = server.requests
    assert first == second and len(members(second)) == 4


def test_the_servers_errors_are_typed(client, server, tmp_path):
    folder = image_folder(tmp_path / "f")
    error = {"code": "invalid_archive", "message": "class 'b' has 1 image, under 2"}
    server.train_answers = [httpx.Response(422, json={"error": error})]
    with pytest.raises(InvalidArchive) as info:
        client.train("flowers", folder)
    assert isinstance(info.value, InvalidArtifact) and info.value.status == 422
    assert info.value.code == "invalid_archive" and "class 'b'" in info.value.message

    finished = {"error": {"code": "job_finished", "message": f"job {JOB_ID} already succeeded"}}
    server.cancel = httpx.Response(409, json=finished)
    with pytest.raises(Conflict) as info:
        client.cancel_job(JOB_ID)
    assert info.value.code == "job_finished"
    with pytest.raises(NotFound) as info:
        list(client.job_events("nope"))
    assert info.value.code == "job_not_found"


# --- Job, jobs, cancel, restore -----------------------------------------------------------


def test_job_json_is_typed_and_prints_back_as_it_came():
    data = job_json("succeeded", 4)
    job = Job.from_json(data)
    assert job.done and job.succeeded and job.result.accuracy == 0.93
    assert job.result.baseline_accuracy == 0.88 and job.progress.loss == 0.25
    assert as_json(job) == data
    assert job.raise_for_state() is job
    assert Job.from_json({**data, "new_field": 1}) == job  # extra fields are ignored

    failed = Job.from_json(job_json("failed"))
    assert failed.done and not failed.succeeded
    with pytest.raises(JobFailed) as info:
        failed.raise_for_state()
    assert info.value.job is failed and info.value.code == "training_failed"
    assert str(info.value) == (
        f"job {JOB_ID} (flowers) failed: training_failed: the job failed: loss is nan"
    )
    with pytest.raises(JobCancelled):
        Job.from_json(job_json("cancelled")).raise_for_state()
    running = Job.from_json(job_json("running", 1))
    assert not running.done and running.raise_for_state() is running
    with pytest.raises(TypeError, match="no client"):
        running.wait()  # made here, not by a Client


def test_jobs_job_cancel_and_restore(client, server):
    jobs = client.jobs()
    assert [j.state for j in jobs] == ["running", "queued"] and jobs[0].progress.step == 2
    assert client.job(JOB_ID).state == "queued"
    cancelled = client.cancel_job(JOB_ID)
    assert cancelled.state == "cancelled" and cancelled.error.code == "cancelled"
    assert server.requests[-1][0].method == "DELETE"
    assert client.restore_registry() == server.restore
    assert server.last("POST", "/registry/restore")[0].headers["authorization"] == "Bearer tok"
    assert client.job_url(JOB_ID) == f"{URL}/jobs/{JOB_ID}"


# --- events and wait ----------------------------------------------------------------------


def test_job_events_parses_the_stream_and_stops_at_the_final_state(client, server):
    events = list(client.job_events(JOB_ID))
    assert [(j.state, j.progress.step) for j in events] == [
        ("queued", 0),
        ("running", 1),
        ("running", 4),
        ("succeeded", 4),
    ]
    request, _ = server.last("GET", f"/jobs/{JOB_ID}/events")
    assert request.headers["accept"] == "text/event-stream"
    assert events[-1].result.sparsity == 0.12


def test_wait_follows_the_events_and_returns_the_final_job(client, server, tmp_path):
    job = client.train("flowers", image_folder(tmp_path / "f"))
    seen = []
    final = job.wait(timeout=10, on_update=seen.append)
    assert final.state == "succeeded" and final.result.accuracy == 0.93
    assert [j.progress.step for j in seen] == [0, 1, 4, 4]
    assert not any(r.url.path == f"/jobs/{JOB_ID}" for r, _ in server.requests)  # no polling


def test_wait_returns_a_failed_job_and_raise_for_state_raises(client, server):
    server.events = sse(job_json("running", 1), job_json("failed", 1))
    final = client.wait_job(JOB_ID)
    assert final.state == "failed" and final.error.message == "the job failed: loss is nan"
    with pytest.raises(JobFailed, match="training_failed"):
        final.raise_for_state()


def test_wait_polls_when_the_stream_drops(client, server):
    server.events = Dropped(sse(job_json("running", 1)))
    server.polls = [job_json("running", 2), job_json("running", 3), job_json("succeeded", 4)]
    seen = []
    final = client.wait_job(JOB_ID, timeout=10, on_update=seen.append, poll_s=0.01)
    assert final.state == "succeeded"
    assert [j.progress.step for j in seen] == [1, 2, 3, 4]
    assert server.polls == []


@pytest.mark.parametrize("events", [503, "ends early"])
def test_wait_polls_when_the_stream_is_refused_or_ends_early(client, server, events):
    server.events = sse(job_json("running", 1)) if events == "ends early" else events
    server.polls = [job_json("running", 2), job_json("cancelled", 2)]
    final = client.wait_job(JOB_ID, timeout=10, poll_s=0.01)
    assert final.state == "cancelled"
    with pytest.raises(JobCancelled):
        final.raise_for_state()


def test_wait_gives_up_after_its_timeout(client, server):
    server.events = sse(job_json("running", 1))  # then polling answers "queued" for ever
    started = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        client.wait_job(JOB_ID, timeout=0.3, poll_s=0.05)
    took = time.monotonic() - started
    assert 0.25 <= took < 3, took
    assert info.value.job.state == "queued" and isinstance(info.value, TimeoutError)
    assert f"job {JOB_ID} not finished after 0.3 s, still queued" == str(info.value)


def test_an_unknown_job_is_not_waited_for(client):
    with pytest.raises(NotFound):
        client.wait_job("nope", timeout=5)


def test_a_bad_event_is_a_transport_error(client, server):
    server.events = b"event: job\ndata: {not json\n\n"
    with pytest.raises(TransportError, match="bad event"):
        list(client.job_events(JOB_ID))


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def piggy(server, monkeypatch, capsys):
    """`piggy ...` in-process, its Client talking to the scripted server."""

    def fake_client(url, token, **kwargs):
        return Client(url or URL, token, transport=server, **kwargs)

    monkeypatch.setattr(cli_module, "Client", fake_client)
    monkeypatch.setenv("PIGGY_TOKEN", "tok")

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_module.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_piggy_train_prints_the_job_and_its_url(piggy, server, tmp_path):
    folder = image_folder(tmp_path / "f")
    code, out, err = piggy("train", "flowers", str(folder), "--min-steps", "2", "--no-train-norm")
    assert code == 0, err
    assert out.splitlines() == [f"job {JOB_ID}: training flowers, queued", f"{URL}/jobs/{JOB_ID}"]
    request, _ = server.last("POST", "/tasks/flowers/train")
    assert dict(request.url.params) == {"min_steps": "2", "train_norm": "false"}
    code, out, _ = piggy("train", "flowers", str(folder), "--json")
    assert code == 0 and json.loads(out) == job_json()


def test_piggy_train_wait_shows_progress_then_the_results(piggy, server, tmp_path):
    code, out, err = piggy("train", "flowers", str(image_folder(tmp_path / "f")), "--wait")
    assert code == 0, err
    assert out.splitlines()[2:] == [
        "trained flowers in 12.0 s",
        "held-out accuracy  0.9300",
        "classifier only    0.8800  (a head on the frozen backbone)",
        "size               50.0 KiB",
        "sparsity           0.1200",
    ]
    assert "4/4" in err and "epoch 1/2" in err and "loss 0.2500" in err  # tqdm's last line


def test_piggy_train_wait_fails_with_the_jobs_error(piggy, server, tmp_path):
    server.events = sse(job_json("running", 1), job_json("failed", 1))
    folder = str(image_folder(tmp_path / "f"))
    code, out, err = piggy("train", "flowers", folder, "--wait")
    assert code == 1 and "trained" not in out
    assert err.splitlines()[-1] == (
        f"piggy: job {JOB_ID} (flowers) failed: training_failed: the job failed: loss is nan"
    )
    server.events = sse(job_json("cancelled"))
    code, out, err = piggy("train", "flowers", folder, "--wait", "--json")
    assert code == 1 and json.loads(out)["state"] == "cancelled"
    assert err.splitlines()[-1].startswith(f"piggy: job {JOB_ID} (flowers) cancelled: ")


def test_piggy_train_refuses_what_is_no_folder_or_archive(piggy, server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    code, _, err = piggy("train", "flowers", str(text))
    assert code == 2 and "not a folder or a .zip" in err
    code, _, err = piggy("train", "flowers", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    assert server.requests == []


def test_piggy_jobs_job_and_cancel(piggy, server):
    code, out, _ = piggy("jobs")
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["ID", "TASK", "STATE", "STEPS", "ACCURACY", "CREATED"]
    assert rows[0].split() == [JOB_ID, "flowers", "running", "2/4", "2026-12-07T06:40:00Z"]
    assert json.loads(piggy("jobs", "--json")[1]) == {"jobs": [job_json("running", 2), job_json()]}

    server.polls = [job_json("succeeded", 4)]
    code, out, _ = piggy("job", JOB_ID)
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and lines["state"] == "succeeded" and lines["task"] == "flowers"
    assert lines["progress"] == "step 4/4, epoch 1/2, loss 0.2500"
    assert lines["accuracy"] == "0.9300 held out" and lines["baseline"] == "0.8800 classifier only"
    assert lines["data"] == "2 classes (a, b), 8 images"

    server.polls = [job_json("failed")]
    code, out, _ = piggy("job", JOB_ID)  # showing a failed job is no error
    assert code == 0 and "error     training_failed: the job failed: loss is nan" in out

    code, out, _ = piggy("cancel", JOB_ID)
    assert (code, out) == (0, f"cancelled job {JOB_ID} (flowers)\n")
    assert server.requests[-1][0].method == "DELETE"
    server.cancel = httpx.Response(
        409, json={"error": {"code": "job_finished", "message": "job already succeeded"}}
    )
    code, _, err = piggy("cancel", JOB_ID)
    assert code == 1 and err == "piggy: job_finished: job already succeeded (HTTP 409)\n"


def test_piggy_job_wait_follows_a_running_job(piggy, server):
    server.polls = [job_json("running", 1)]
    code, out, err = piggy("job", JOB_ID, "--wait")
    assert code == 0, err
    assert "state     running" in out and "held-out accuracy  0.9300" in out

    server.polls = [job_json("failed")]
    server.events = sse(job_json("failed"))
    code, out, err = piggy("job", JOB_ID, "--wait")  # ended already: exits as it ended
    assert code == 1 and "state     failed" in out and "held-out" not in out
    assert err.splitlines()[-1].startswith(f"piggy: job {JOB_ID} (flowers) failed: ")


def test_piggy_registry_restore(piggy, server):
    code, out, _ = piggy("registry", "restore")
    assert code == 0 and out.splitlines() == ["registry file:///reg", "restored 2: a, b"]
    assert json.loads(piggy("registry", "restore", "--json")[1]) == server.restore

    server.restore = {"restored": [], "failed": {}, "registry": "file:///reg"}
    code, out, _ = piggy("registry", "restore")
    assert code == 0 and "nothing to restore" in out

    server.restore = {"restored": ["a"], "failed": {"c": "disk full"}, "registry": "r"}
    code, out, err = piggy("registry", "restore")
    assert code == 1 and "failed c: disk full" in out
    assert err == "piggy: 1 task not restored\n"
    code, out, err = piggy("registry", "restore", "--json")
    assert code == 1 and json.loads(out) == server.restore


# --- against a real server that trains (tests/client/live_server.py) ----------------------
# Kept tiny for the CPU: 2 classes x 4 PNGs of 32 px, 2 steps, on the random resnet18.

TINY = {"min_steps": 2, "epochs": 1, "input_size": 32}


def png_folder(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    from tests.client.live_server import png

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png(100 * k + i, size=(32, 32)))
    return root


@pytest.fixture
def admin(live):
    from tests.client.live_server import TOKEN

    with Client(live.url, token=TOKEN) as c:
        yield c


def test_live_train_wait_and_serve(admin, live, tmp_path):
    folder = png_folder(tmp_path / "photos")
    job = admin.train("live-trained", folder, description="a test pattern", **TINY)
    try:
        assert job.state in ("queued", "running") and len(job.id) == 32
        assert job.data["classes"] == ["a", "b"] and job.data["images"] == 8
        assert job.options["min_steps"] == 2 and job.options["input_size"] == 32
        seen: list[Job] = []
        final = job.wait(timeout=300, on_update=seen.append)
        assert final.raise_for_state() is final and final.state == "succeeded", final.error
        assert final.done and final.error is None and final.finished >= final.started
        assert final.progress.step == final.progress.steps >= 2 and final.progress.loss > 0
        assert any(j.state == "running" and j.progress.step >= 1 for j in seen), seen
        r = final.result
        assert 0 <= r.accuracy <= 1 and 0 <= r.baseline_accuracy <= 1 and 0 <= r.sparsity <= 1
        assert r.size_bytes > 0

        task = admin.task("live-trained")  # stored and served as an upload is
        assert task.labels == ["a", "b"] and task.input_size == 32
        assert task.description == "a test pattern" and task.size_bytes == r.size_bytes
        answer = admin.predict("live-trained", folder / "a" / "0.png", top_k=2)
        assert {s.label for s in answer.results[0].top} == {"a", "b"}

        assert admin.job(job.id).state == "succeeded"
        assert job.id in [j.id for j in admin.jobs()]
        assert [j.state for j in admin.job_events(job.id)] == ["succeeded"]  # ended: one
        with pytest.raises(Conflict) as info:
            admin.cancel_job(job.id)
        assert info.value.status == 409 and info.value.code == "job_finished"
    finally:
        admin.delete("live-trained")  # the live server's tasks are other tests' too


def test_live_cancel(admin, tmp_path):
    job = admin.train("live-cancelled", png_folder(tmp_path / "photos"), min_steps=100_000)
    cancelled = admin.cancel_job(job.id)
    assert cancelled.id == job.id and cancelled.state in ("queued", "running", "cancelled")
    final = admin.wait_job(job.id, timeout=120)
    assert final.state == "cancelled" and final.result is None
    with pytest.raises(JobCancelled):
        final.raise_for_state()
    with pytest.raises(NotFound):
        admin.task("live-cancelled")


def test_live_refusals_and_restore(admin, live, tmp_path):
    from piggyback_serve.client.errors import AuthError, BadRequest

    one_class = png_folder(tmp_path / "one", classes=("a",))
    with pytest.raises(InvalidArchive) as info:
        admin.train("nope", one_class, **TINY)
    assert info.value.status == 422 and info.value.code == "invalid_archive"
    assert "two class folders" in info.value.message
    few = png_folder(tmp_path / "few", per_class=1)
    with pytest.raises(InvalidArchive) as info:
        admin.train("nope", few, **TINY)
    assert "'a' (1), 'b' (1)" in info.value.message  # the message names the classes
    with pytest.raises(BadRequest) as info:
        admin.train("nope", png_folder(tmp_path / "ok"), epochs=0)
    assert "epochs" in info.value.message
    with Client(live.url) as anonymous, pytest.raises(AuthError):
        anonymous.train("nope", tmp_path / "ok")
    for call in (admin.job, admin.cancel_job, lambda i: list(admin.job_events(i))):
        with pytest.raises(NotFound) as info:
            call("0" * 32)
        assert info.value.code == "job_not_found"
    assert "nope" not in {t.name for t in admin.tasks()}

    answer = admin.restore_registry()  # nothing lost here: nothing to write back
    assert answer["restored"] == [] and answer["failed"] == {}
    assert answer["registry"].endswith(str(live.registry))
