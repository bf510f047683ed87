"""The `piggy` CLI (client.cli.main, in-process) against a real server: tables, --json,
admin commands, and clear messages with distinct exit codes on errors."""

from __future__ import annotations

import json
import socket

import pytest

from piggyback_serve.client.cli import main
from tests.client.live_server import TOKEN, png


@pytest.fixture
def piggy(live, monkeypatch, capsys):
    monkeypatch.setenv("PIGGY_URL", live.url)
    monkeypatch.setenv("PIGGY_TOKEN", TOKEN)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_tasks_table_and_json(piggy):
    code, out, _ = piggy("tasks")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "NAME",
        "LABELS",
        "BACKBONE",
        "SIZE",
        "SPARSITY",
        "ACCURACY",
        "DESCRIPTION",
    ]
    assert [r.split()[:3] for r in rows] == [["alpha", "5", "resnet18"], ["beta", "7", "resnet18"]]
    code, out, _ = piggy("tasks", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)["tasks"]] == ["alpha", "beta"]


def test_predict_table_and_json(piggy, live, tmp_path):
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        images[-1].write_bytes(png(30 + i))
    code, out, err = piggy("predict", "--task", "beta", "--top-k", "2", *map(str, images))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "RANK", "LABEL", "SCORE"]
    for i, image in enumerate(images):
        labels = live.reference.artifacts["beta"].labels
        want = [labels[j] for j in live.reference.probs("beta", image.read_bytes()).topk(2)[1]]
        first, second = lines[1 + 2 * i].split(), lines[2 + 2 * i].split()
        assert first[:3] == [str(image), "1", want[0]] and second[:2] == ["2", want[1]]
    assert lines[-1].startswith("task beta, 2 images, ") and lines[-1].endswith(" ms")

    for args in (("--json", "predict", "-t", "beta"), ("predict", "--json", "-t", "beta")):
        code, out, _ = piggy(*args, str(images[0]))
        answer = json.loads(out)
        assert code == 0 and answer["task"] == "beta" and len(answer["results"][0]["top"]) == 5


def test_upload_delete_health(piggy, live):
    code, out, _ = piggy("upload", "cli-copy", str(live.artifacts["alpha"]))
    assert code == 0 and out.startswith("uploaded cli-copy: 5 labels")
    assert "cli-copy" in piggy("tasks")[1]
    assert piggy("delete", "cli-copy") == (0, "deleted cli-copy\n", "")
    code, out, _ = piggy("health")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["ready", "resnet18"]
    assert json.loads(piggy("health", "--json")[1])["status"] == "ready"


def test_errors_exit_non_zero_with_the_servers_message(piggy, live, tmp_path, monkeypatch):
    image = tmp_path / "img.png"
    image.write_bytes(png(1))
    code, out, err = piggy("predict", "--task", "nope", str(image))
    assert (code, out) == (1, "")
    assert err == (
        "piggy: task_not_found: no task named 'nope'; known tasks: alpha, beta "
        "(see GET /tasks) (HTTP 404)\n"
    )

    monkeypatch.delenv("PIGGY_TOKEN")
    code, _, err = piggy("delete", "alpha")
    assert code == 1 and "unauthorized" in err and "401" in err
    assert err.splitlines()[-1] == (  # what to do about it, in this CLI's own terms
        "piggy: the server wants a token: pass --token TOKEN or set PIGGY_TOKEN "
        "(the server's PIGGY_ADMIN_TOKEN, or PIGGY_PREDICT_TOKEN for predict)"
    )
    code, _, err = piggy("--token", "wrong", "delete", "alpha")
    assert code == 1 and "forbidden" in err and "(HTTP 403)" in err
    assert "piggy: the server refused the token: check --token or PIGGY_TOKEN" in err

    code, _, err = piggy("predict", "--task", "alpha", str(tmp_path / "missing.png"))
    assert code == 2 and "missing.png" in err

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = piggy("--url", f"http://127.0.0.1:{port}", "tasks")
    assert code == 3 and "cannot reach the server" in err

    with pytest.raises(SystemExit) as info:
        main(["predict", str(image)])  # --task missing: argparse's usage error
    assert info.value.code == 2


def test_json_prints_what_the_api_returns(piggy, live):
    import httpx

    api = httpx.get(f"{live.url}/tasks").json()
    code, out, _ = piggy("--json", "tasks")
    assert code == 0 and json.loads(out) == api  # {"tasks": [...]}, not a bare list
    code, out, _ = piggy("--json", "upload", "json-copy", str(live.artifacts["alpha"]))
    assert code == 0 and json.loads(out) == httpx.get(f"{live.url}/tasks/json-copy").json()
    assert piggy("--json", "delete", "json-copy") == (0, "", "")  # 204: no body


def test_upload_under_another_name_says_so(piggy, live):
    code, out, _ = piggy("upload", "renamed", str(live.artifacts["alpha"]))
    assert code == 0
    assert "note: the artifact calls itself 'alpha'; it is served as 'renamed'" in out
    assert piggy("delete", "renamed")[0] == 0
    code, out, _ = piggy("upload", "alpha", str(live.artifacts["alpha"]))
    assert code == 0 and "note:" not in out


@pytest.mark.parametrize("name", ["../etc", "..", "a/b", "bad.name", "a b"])
def test_path_like_names_get_the_invalid_name_error(piggy, live, name):
    for command in (("upload", name, str(live.artifacts["alpha"])), ("delete", name)):
        code, _, err = piggy(*command)
        assert code == 1 and "bad_request: invalid task name" in err and "(HTTP 400)" in err


def test_train_wait_jobs_job_and_restore(piggy, live, tmp_path):
    """`piggy train ARCHIVE --wait` trains for real (tiny: 2 classes x 4 PNGs, 2 steps)."""
    import zipfile

    import httpx

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:  # class folders inside one top folder
        for k, label in enumerate(("cat", "dog")):
            for i in range(4):
                z.writestr(f"photos/{label}/{i}.png", png(200 + 10 * k + i, size=(32, 32)))
    tiny = ("--min-steps", "2", "--epochs", "1", "--input-size", "32")
    try:
        code, out, err = piggy("train", "cli-trained", str(archive), *tiny, "--wait")
        assert code == 0, err
        first, url, done, accuracy, baseline, size, sparsity = out.splitlines()
        job_id = first.split()[1].rstrip(":")
        assert first.startswith(f"job {job_id}: training cli-trained, ") and len(job_id) == 32
        assert url == f"{live.url}/jobs/{job_id}"
        assert done.startswith("trained cli-trained in ") and done.endswith(" s")
        assert 0 <= float(accuracy.split()[-1]) <= 1 and accuracy.startswith("held-out accuracy")
        assert (
            baseline.startswith("classifier only") and "(a head on the frozen backbone)" in baseline
        )
        assert size.startswith("size") and size.endswith(" KiB")
        assert 0 <= float(sparsity.split()[-1]) <= 1
        assert "2/2" in err and "loss" in err  # the progress bar, on stderr
        assert piggy("tasks")[1].count("cli-trained") == 1

        code, out, _ = piggy("jobs")
        row = next(line.split() for line in out.splitlines() if line.startswith(job_id))
        assert code == 0 and row[1:4] == ["cli-trained", "succeeded", "2/2"]
        code, out, _ = piggy("job", job_id)
        assert code == 0 and "state     succeeded" in out
        assert "data      2 classes (cat, dog), 8 images" in out
        code, out, _ = piggy("--json", "job", job_id)
        assert code == 0 and json.loads(out) == httpx.get(url).json()
        code, _, err = piggy("cancel", job_id)
        assert code == 1 and "job_finished" in err and "(HTTP 409)" in err

        code, out, _ = piggy("registry", "restore")
        assert code == 0 and out.splitlines()[1] == (
            "nothing to restore: the registry holds every task served here"
        )
    finally:
        piggy("delete", "cli-trained")


def test_train_refusals(piggy, live, tmp_path):
    folder = tmp_path / "one"
    (folder / "cat").mkdir(parents=True)
    for i in range(3):
        (folder / "cat" / f"{i}.png").write_bytes(png(i))
    code, out, err = piggy("train", "nope", str(folder), "--wait")
    assert (code, out) == (1, "")
    assert err.startswith("piggy: invalid_archive: need at least two class folders")
    assert err.rstrip().endswith("(HTTP 422)")
    code, _, err = piggy("train", "nope", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    code, _, err = piggy("cancel", "0" * 32)
    assert code == 1 and "job_not_found" in err and "(HTTP 404)" in err
