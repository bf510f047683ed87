"""Learning a task through the server: a folder of images in, a task served out, over HTTP.

Everything runs against `piggy-serve` in a subprocess (bench/procs.py): the demo backbone,
efficientnet_lite0 with its packaged weights, a folder registry in a temp folder, no admin
token, PIGGY_TRAIN_THREADS=1 (the default), the CPU. The data are the project's own: 5
classes x 80 of scikit-learn's digits (0-4, the first 80 of each in the training split of
masks/data.py's `digits(seed=0)`), upscaled to 64 px, written as PNG files, a folder per
class.

- wall time: from the start of `Client.train` (the folder packed as tar.gz and streamed to
  POST /tasks/{name}/train, input_size=64, seed 0, every other option the default) to the
  first /predict?task={name} answered 200, GET /jobs/{id} polled every 0.2 s meanwhile;
  with the server tree's CPU seconds over that time, and where the time went (the POST's
  answer, queued, training as the job's progress shows it, stored, first prediction);
- the same folder, seed and input size through `piggy-masks train` in a subprocess (its
  defaults: 1 torch thread, classifier-only compared too, as the job does): the held-out
  accuracies from the two artifacts' metrics (the job's from GET /jobs/{id}, the CLI's
  from its artifact's metadata, what `piggy-masks inspect` prints), the difference in
  points; and each side's training seconds, wall and CPU seconds, beside the cores the
  other processes kept busy;
- /predict's p99 with and without a job running: an open loop at RATE requests a second
  (bench/loadgen.py, latency from each request's schedule) on another task (the bundled
  demo task `mnist`, 64 px), 64 px PNGs, windows of WINDOW_S: without, during (a second
  job, from its first training step; two windows), without again (once that job is
  cancelled); p99 of each side's requests pooled, and the ratio;
- a zip bomb: a 10 MB zip whose 10 entries (`bomb/N.png`, each 0.9 MB of random bytes
  then zeros) expand to 1 GB. `server.jobs.archive.unpack` in this process with the server's
  default limits: the bytes written when it refused (`ExpandedTooLarge.written`); and over
  HTTP: the answer (422 expected), the bytes its message says were written, the most bytes
  seen under $PIGGY_HOME/jobs while the POST ran (sampled every 20 ms; an entry that is not
  an image is removed once written, so the disk holds the upload and one entry at most, while
  the bytes written count every entry), what is left there.

The machine may be shared: each phase records the load average and the cores other
processes kept busy meanwhile (bench/procs.py's machine-wide CPU less ours).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import psutil
from PIL import Image

from bench import loadgen, procs
from bench.stats import percentile
from piggyback_serve.masks import artifact, data, demo

BACKBONE = demo.DEMO_BACKBONE
SIZE = 64
CLASSES = 5
PER_CLASS = 80
TASK = "digits5"  # the learned task; the folder is named after it too (its metrics' data set)
OTHER = "mnist"  # the task /predict is measured on while a job runs (bundled demo task)
SEED = 0
RATE = 20.0  # /predict requests a second, open loop
WINDOW_S = 15.0
MAX_REQUESTS = 2_000  # per window
JOB_TIMEOUT_S = 420.0  # a job that has not ended by then fails the scenario
CLI_TIMEOUT_S = 420.0
POLL_S = 0.2
BOMB_ENTRIES = 10
BOMB_ENTRY_BYTES = 100_000_000  # 10 x 100 MB = 1 GB expanded
BOMB_RANDOM_BYTES = 900_000  # per entry: random bytes (the rest zeros), so that the zip is ~10 MB
QUICK = {"classes": 2, "per_class": 8, "options": {"epochs": 1, "min_steps": 2}, "window_s": 2.0,
         "bomb_limit": 4 << 20}  # fmt: skip

WALL = "folder of 400 images (5 classes, 64 px) → task served, over HTTP, wall time on 2 cores (s)"
ACCURACY = (
    "held-out accuracy of that task vs `piggy-masks train` on the same folder and seed "
    "(difference, points)"
)
P99 = "p99 of /predict during a job ÷ without (64 px, PIGGY_TRAIN_THREADS=1)"
BOMB = "a 10 MB zip that expands to 1 GB: bytes written before it is refused"
FIGURES = (WALL, ACCURACY, P99, BOMB)


# -- the data ----------------------------------------------------------------------------


def write_folder(root: Path, classes: int, per_class: int) -> dict:
    """The first `per_class` images of digits 0..classes-1 in masks.data.digits(seed=0)'s
    training split, upscaled to SIZE px (bilinear), as PNG files under root/<digit>/."""
    digits = data.digits(seed=SEED)
    images, targets = digits.train.images, digits.train.targets
    written = 0
    for label in range(classes):
        folder = root / digits.labels[label]
        folder.mkdir(parents=True, exist_ok=True)
        chosen = images[targets == label][:per_class]
        if len(chosen) < per_class:
            raise RuntimeError(f"digit {label}: {len(chosen)} images, not {per_class}")
        for i, item in enumerate(chosen):
            image = data.as_image(item).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
            path = folder / f"{label}_{i:03d}.png"
            image.save(path, format="PNG")
            written += path.stat().st_size
    return {"classes": classes, "per_class": per_class, "bytes": written}


def pngs(root: Path, n: int) -> list[bytes]:
    """`n` of the folder's PNGs, as /predict bodies."""
    return [p.read_bytes() for p in sorted(root.rglob("*.png"))[:n]]


# -- the server --------------------------------------------------------------------------


def start_server(work: Path, extra_env: dict[str, str]) -> procs.Proc:
    """piggy-serve on the demo backbone, a folder registry holding the demo task OTHER."""
    registry = work / "registry"
    registry.mkdir(parents=True)
    shutil.copyfile(demo.BUNDLED_DIR / f"{OTHER}.safetensors", registry / f"{OTHER}.safetensors")
    env = {
        "PIGGY_DEVICE": "cpu",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "PIGGY_TRAIN_THREADS": "1",
        **extra_env,
    }
    proc = procs.start_ours(work, registry, BACKBONE, None, 8, tag="training", extra_env=env)
    proc.wait_ready("/readyz", 600)
    return proc


def _get(proc: procs.Proc, path: str) -> dict:
    with urllib.request.urlopen(proc.url(path), timeout=30) as r:
        return json.loads(r.read())


def _post(proc: procs.Proc, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    req = urllib.request.Request(proc.url(path), body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _delete(proc: procs.Proc, path: str) -> int:
    req = urllib.request.Request(proc.url(path), method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Machine:
    """What a phase cost the server tree and what else ran on the machine meanwhile. A
    process of the tree that exits (a trainer) keeps the CPU seconds it had at the last
    `sample()` (the caller samples as it polls): a little of its last moments is lost."""

    def __init__(self, proc: procs.Proc):
        self.proc = proc
        self.t0, self.busy0 = time.perf_counter(), procs.machine_busy_s()
        self.start = self._tree()
        self.seen = dict(self.start)
        self.own0 = _own()
        self.load0 = os.getloadavg()[0]

    def _tree(self) -> dict[int, float]:
        found = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.popen.pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    found[p.pid] = t.user + t.system
        return found

    def sample(self) -> None:
        self.seen.update(self._tree())

    def done(self) -> dict:
        self.sample()
        wall = time.perf_counter() - self.t0
        server = sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())
        own = _own() - self.own0
        others = procs.machine_busy_s() - self.busy0 - server - own
        return {
            "wall_s": wall,
            "server_cpu_s": server,
            "bench_cpu_s": own,
            "others_cores": others / wall if wall else None,
            "load_before": self.load0,
            "load_after": os.getloadavg()[0],
        }


def _own() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def _children() -> float:
    """CPU seconds of this process's children that have been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# -- wall time: folder in, task served ---------------------------------------------------


def learn(proc: procs.Proc, folder: Path, options: dict, body: bytes) -> dict:
    """Client.train on `folder`, the job followed to its end, then /predict until a 200."""
    from piggyback_serve.client import Client

    machine = Machine(proc)
    t0 = time.perf_counter()
    with Client(proc.url(""), timeout=120) as client:
        job = client.train(TASK, folder, input_size=SIZE, seed=SEED, **options)
    posted = time.perf_counter() - t0
    seen: dict[str, float] = {"posted": posted}
    steps = []
    final = _follow(proc, job.id, t0, seen, steps, machine)
    answered = None
    predicts = 0
    if final["state"] == "succeeded":
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            predicts += 1
            status, _ = _post(proc, f"/predict?task={TASK}", body, "image/png")
            if status == 200:
                answered = time.perf_counter() - t0
                break
            time.sleep(0.05)
    return {
        "job": final,
        "seen_s": seen,  # first poll that saw each state, seconds from t0
        "steps": steps,  # (seconds from t0, step, steps, epoch, epochs) as polled
        "first_predict_s": answered,
        "predict_attempts": predicts,
        "machine": machine.done(),
    }


def _follow(proc, job_id: str, t0: float, seen: dict, steps: list, machine: Machine) -> dict:
    deadline = time.perf_counter() + JOB_TIMEOUT_S
    while True:
        machine.sample()
        job = _get(proc, f"/jobs/{job_id}")
        now = time.perf_counter() - t0
        seen.setdefault(job["state"], now)
        p = job["progress"]
        if p["step"] and (not steps or steps[-1][1] != p["step"]):
            steps.append([round(now, 2), p["step"], p["steps"], p["epoch"], p["epochs"]])
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        if time.perf_counter() > deadline:
            raise TimeoutError(f"job {job_id} not done after {JOB_TIMEOUT_S:.0f} s: {job}")
        time.sleep(POLL_S)


# -- the same folder through piggy-masks train -------------------------------------------


LINE = re.compile(r"^(piggyback|classifier-only): held-out accuracy ([\d.]+)% .*; (\d+)s$", re.M)


def cli(folder: Path, out: Path, options: dict) -> dict:
    """`piggy-masks train --data FOLDER --task TASK --seed 0 --input-size 64 --out OUT`."""
    script = Path(sys.executable).parent / "piggy-masks"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "piggyback_serve.masks"]
    argv += ["train", "--data", str(folder), "--task", TASK, "--seed", str(SEED)]
    argv += ["--input-size", str(SIZE), "--out", str(out)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    t0, busy0, own0, load0 = time.perf_counter(), procs.machine_busy_s(), _own(), _children()
    loadavg = os.getloadavg()[0]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    wall = time.perf_counter() - t0
    cpu = _children() - load0  # the CLI's process (and any child of it), once reaped
    others = procs.machine_busy_s() - busy0 - cpu - (_own() - own0)
    if done.returncode != 0:
        raise RuntimeError(f"piggy-masks train exited {done.returncode}:\n{done.stderr[-3000:]}")
    printed = {
        m[0]: {"accuracy_pct": float(m[1]), "s": int(m[2])} for m in LINE.findall(done.stdout)
    }
    metrics = artifact.read(out.read_bytes()).metrics  # what `piggy-masks inspect` shows
    return {
        "argv": ["piggy-masks", *argv[1:]] if script.exists() else argv,
        "wall_s": wall,
        "cpu_s": cpu,
        "others_cores": others / wall,
        "load_before": loadavg,
        "load_after": os.getloadavg()[0],
        "printed": printed,
        "metrics": metrics,
        "stdout": done.stdout[-2000:],
    }


# -- /predict with and without a job -----------------------------------------------------


def window(proc: procs.Proc, bodies: list[bytes], seconds: float, label: str, i: int) -> dict:
    reqs = [loadgen.Request.post(f"/predict?task={OTHER}", b, "image/png") for b in bodies]
    machine = Machine(proc)
    res = loadgen.run_open(
        proc.port, lambda rng: rng.choice(reqs), RATE, seconds, max_requests=MAX_REQUESTS, seed=i
    )
    return {
        "side": label,
        "latencies_ms": [round(1e3 * s, 3) for s in res.latencies_s],
        "requests": res.requests,
        "errors": res.errors,
        "p50_ms": res.p(50),
        "p99_ms": res.p(99),
        "machine": machine.done(),
    }


def p99_phase(proc: procs.Proc, folder: Path, bodies: list[bytes], options: dict, seconds: float):
    """without, (a job starts and reaches its first step) during, during, (cancelled)
    without; the job's progress at each during window's ends."""
    loadgen.run_open(proc.port, lambda rng: loadgen.Request.post(
        f"/predict?task={OTHER}", bodies[0], "image/png"), RATE, 1.0)  # fmt: skip
    windows = [window(proc, bodies, seconds, "without", 0)]
    from piggyback_serve.client import Client

    with Client(proc.url(""), timeout=120) as client:
        job = client.train(f"{TASK}-load", folder, input_size=SIZE, seed=SEED, **options)
    deadline = time.perf_counter() + 120
    while (j := _get(proc, f"/jobs/{job.id}"))["progress"]["step"] < 1:
        if j["state"] in ("succeeded", "failed", "cancelled") or time.perf_counter() > deadline:
            raise RuntimeError(f"the load job never started training: {j}")
        time.sleep(POLL_S)
    for k in (1, 2):
        before = _get(proc, f"/jobs/{job.id}")
        w = window(proc, bodies, seconds, "during", k)
        after = _get(proc, f"/jobs/{job.id}")
        w["job"] = {
            "state_after": after["state"],
            "step_before": before["progress"]["step"],
            "step_after": after["progress"]["step"],
            "steps": after["progress"]["steps"],
        }
        windows.append(w)
    cancelled = _delete(proc, f"/jobs/{job.id}")
    windows.append(window(proc, bodies, seconds, "without", 3))
    return {"windows": windows, "job_id": job.id, "cancel_status": cancelled}


# -- the zip bomb ------------------------------------------------------------------------


def make_bomb(path: Path, entries: int, entry_bytes: int, random_bytes: int) -> dict:
    """A zip of `entries` ZIP_DEFLATED files `bomb/N.png`: `random_bytes` random, then zeros."""
    rng = random.Random(SEED)
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n in range(entries):
            info = zipfile.ZipInfo(f"bomb/{n}.png")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as out:
                out.write(rng.randbytes(random_bytes))
                left = entry_bytes - random_bytes
                while left > 0:
                    out.write(zeros[: min(left, len(zeros))])
                    left -= len(zeros)
    return {"zip_bytes": path.stat().st_size, "expanded_bytes": entries * entry_bytes}


def bomb_in_process(path: Path, work: Path, limit: int | None) -> dict:
    """`limit`: the expanded bytes allowed, when not the server's default (--quick)."""
    from piggyback_serve.server.jobs import archive
    from piggyback_serve.server.settings import Settings

    limits = archive.ArchiveLimits.of(Settings())
    if limit is not None:
        limits = dataclasses.replace(limits, max_expanded_bytes=limit)
    into = work / "bomb-unpacked"
    t0 = time.perf_counter()
    try:
        archive.unpack(path, into, limits)
        refused, written, error = False, None, None
    except archive.ExpandedTooLarge as exc:
        refused, written, error = True, exc.written, str(exc)
    except archive.InvalidArchive as exc:
        refused, written, error = True, None, str(exc)
    left = _tree_bytes(into)
    shutil.rmtree(into, ignore_errors=True)
    return {
        "limit": limits.max_expanded_bytes,
        "refused": refused,
        "written": written,
        "error": error,
        "left_bytes": left,
        "seconds": time.perf_counter() - t0,
    }


def bomb_over_http(proc: procs.Proc, path: Path, jobs: Path) -> dict:
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_bytes(jobs))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        status, body = _post(proc, "/tasks/bomb/train", path.read_bytes(), "application/zip")
    finally:
        stop.set()
        sampler.join(5)
    seconds = time.perf_counter() - t0
    try:
        error = json.loads(body)
    except ValueError:
        error = {"raw": body[:500].decode(errors="replace")}
    message = json.dumps(error)
    m = re.search(r"stopped after writing ([\d,]+)", message)
    left = [str(p.relative_to(jobs)) for p in jobs.rglob("*")] if jobs.exists() else []
    jobs_listed = _get(proc, "/jobs")["jobs"]
    return {
        "status": status,
        "error": error,
        "written": int(m[1].replace(",", "")) if m else None,
        "peak_jobs_bytes": peak[0],
        "left_under_jobs": left,
        "bomb_jobs_listed": sum(1 for j in jobs_listed if j["task"] == "bomb"),
        "seconds": seconds,
    }


def _tree_bytes(root: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for dirpath, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# -- the scenario ------------------------------------------------------------------------


def measure(ctx) -> dict:
    quick = ctx.options.quick
    classes, per_class = (QUICK["classes"], QUICK["per_class"]) if quick else (CLASSES, PER_CLASS)
    options = QUICK["options"] if quick else {}
    seconds = QUICK["window_s"] if quick else WINDOW_S
    bomb_shape = (2, 8_000_000, 100_000) if quick else (
        BOMB_ENTRIES, BOMB_ENTRY_BYTES, BOMB_RANDOM_BYTES)  # fmt: skip
    bomb_limit = QUICK["bomb_limit"] if quick else None
    env = {"PIGGY_MAX_ARCHIVE_EXPANDED_BYTES": str(bomb_limit)} if quick else {}
    out: dict = {
        "backbone": BACKBONE,
        "input_size": SIZE,
        "options": options,
        "rate": RATE,
        "window_s": seconds,
        "load_at_start": os.getloadavg(),
        "cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="piggy-training-") as tmp:
        work = Path(tmp)
        folder = work / "data" / TASK
        out["data"] = write_folder(folder, classes, per_class)
        bodies = pngs(folder, 8)
        proc = start_server(work, env)
        try:
            out["server_ready_s"] = time.perf_counter() - proc.started
            _log("learning the task over HTTP ...")
            out["job"] = learn(proc, folder, options, bodies[0])
            _log(f"job: {_brief(out['job'])}")
            _log("/predict with and without a job ...")
            out["p99"] = p99_phase(proc, folder, bodies, options, seconds)
            _log("zip bomb ...")
            bomb = work / "bomb.zip"
            out["bomb"] = make_bomb(bomb, *bomb_shape)
            out["bomb"]["in_process"] = bomb_in_process(bomb, work, bomb_limit)
            out["bomb"]["http"] = bomb_over_http(proc, bomb, work / "home" / "jobs")
            bomb.unlink()
        finally:
            proc.stop()
            out["server_log_tail"] = proc.tail(2000)
        _log("the same folder through piggy-masks train ...")
        out["load_before_cli"] = os.getloadavg()
        out["cli"] = cli(folder, work / f"{TASK}.safetensors", options)
    out["load_at_end"] = os.getloadavg()
    try:
        summarize(out)
    except Exception:  # keep the minutes of measurement for a fixed summarize
        kept = Path(tempfile.gettempdir()) / "piggy-bench-training-raw.json"
        kept.write_text(json.dumps(out, default=str))
        _log(f"summarize failed: the raw data are in {kept}")
        raise
    return out


def _brief(job: dict) -> str:
    j = job["job"]
    return f"{j['state']}, result {j.get('result')}, first predict at {job['first_predict_s']}"


def _log(msg: str) -> None:
    print(f"[training] {msg}", file=sys.stderr, flush=True)


# -- the figures and tables --------------------------------------------------------------


def _p99(windows: list[dict], side: str) -> float:
    pooled = [ms for w in windows if w["side"] == side for ms in w["latencies_ms"]]
    return percentile(pooled, 99)


def summarize(raw: dict) -> dict:
    job = raw["job"]
    result = job["job"].get("result") or {}
    data_ = raw["data"]
    wall = job["first_predict_s"]
    job_acc, cli_acc = result.get("accuracy"), raw["cli"]["metrics"].get("accuracy")
    diff = None if job_acc is None or cli_acc is None else 100 * (job_acc - cli_acc)
    windows = raw["p99"]["windows"]
    without, during = _p99(windows, "without"), _p99(windows, "during")
    ratio = during / without if without else None
    inproc, http = raw["bomb"]["in_process"], raw["bomb"]["http"]
    written, limit = inproc["written"], inproc["limit"]
    bomb_ok = (
        written is not None
        and written <= limit
        and http["status"] == 422
        and not http["left_under_jobs"]
    )
    found = [
        (WALL, f"{BACKBONE}, {data_['classes']}x{data_['per_class']} PNGs, {raw['cores']} cores",
         wall, "≤ 180", wall is not None and wall <= 180),
        (ACCURACY, "job − CLI, seed 0, 64 px", diff, "0 (equal)",
         diff is not None and abs(diff) < 1e-6),
        (P99, f"{OTHER} (demo task), {raw['rate']:g} requests/s", ratio, "≤ 2",
         ratio is not None and ratio <= 2),
        (BOMB, "archive.unpack, the server's default limits; 422 over HTTP, nothing left",
         written, f"≤ {limit:,}", bomb_ok),
    ]  # fmt: skip
    return {
        "figures": [{"figure": f, "on": on, "value": v} for f, on, v, _, _ in found],
        "tables": {
            "checks": [[f, v, goal, "met" if ok else "missed"] for f, _, v, goal, ok in found],
            "wall": _timeline(job, wall),
            "accuracy": _accuracy(result, job, raw["cli"]),
            "cpu": [_cpu(job["machine"])],
            "p99": _p99_rows(windows, without, during),
            "bomb": _bomb_rows(inproc, http),
        },
    }


def _timeline(job: dict, wall) -> list[list]:
    seen, steps = job["seen_s"], job["steps"]
    first, last = (steps[0], steps[-1]) if steps else ([None, None], [None, None])
    return [
        ["POST answered (packed, uploaded, unpacked, checked)", seen.get("posted"), None],
        ["first seen running", seen.get("running"), None],
        ["first training step seen", first[0], first[1]],
        ["last training step seen", last[0], last[1]],
        ["first seen succeeded (classifier-only too, task stored)", seen.get("succeeded"), None],
        ["first /predict answered 200", wall, None],
    ]  # fmt: skip


def _accuracy(result: dict, job: dict, cli: dict) -> list[list]:
    printed, steps, m = cli["printed"], job["steps"], job["machine"]
    trained = steps[-1][0] - steps[0][0] if len(steps) > 1 else None
    return [
        ["job (GET /jobs/{id})", _pct(result.get("accuracy")),
         _pct(result.get("baseline_accuracy")), _pct(result.get("sparsity")), trained,
         job["first_predict_s"], m["server_cpu_s"], m["others_cores"]],
        ["piggy-masks train", _pct(cli["metrics"].get("accuracy")),
         printed.get("classifier-only", {}).get("accuracy_pct"),
         _pct(cli["metrics"].get("sparsity")), printed.get("piggyback", {}).get("s"),
         cli["wall_s"], cli.get("cpu_s"), cli.get("others_cores")],
    ]  # fmt: skip


def _cpu(m: dict) -> list:
    return [m["wall_s"], m["server_cpu_s"], m["server_cpu_s"] / m["wall_s"], m["others_cores"],
            m["load_before"], m["load_after"]]  # fmt: skip


def _p99_rows(windows: list[dict], without: float, during: float) -> list[list]:
    rows = []
    for w in windows:
        m, job = w["machine"], w.get("job")
        steps = f"{job['step_before']}→{job['step_after']} of {job['steps']}" if job else None
        rows.append(
            [w["side"], w["requests"], sum(w["errors"].values()), w["p50_ms"], w["p99_ms"],
             m["server_cpu_s"] / m["wall_s"], m["others_cores"], m["load_before"], steps]
        )  # fmt: skip
    rows.append(["pooled: without", None, None, None, without, None, None, None, None])
    rows.append(["pooled: during", None, None, None, during, None, None, None, None])
    return rows


def _bomb_rows(inproc: dict, http: dict) -> list[list]:
    error = http["error"].get("error") if isinstance(http["error"], dict) else None
    return [
        ["archive.unpack in process", None, inproc["written"], None, inproc["error"],
         inproc["left_bytes"], inproc["seconds"]],
        ["POST /tasks/bomb/train", http["status"], http["written"], http["peak_jobs_bytes"],
         (error or {}).get("message"), len(http["left_under_jobs"]), http["seconds"]],
    ]  # fmt: skip


def _pct(x):
    return None if x is None else 100 * x
