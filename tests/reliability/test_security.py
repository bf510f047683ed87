"""Security properties checked from the code and in-process: no unpickling anywhere,
tokens compared in constant time and never logged or echoed, CORS off unless asked."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

from tests.server.server_support import png, serving, settings_for

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("src", "bench", "deploy", "tests")
UNSAFE_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def python_files() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if ".venv" not in p.parts]


def unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            loads = name.endswith(("torch.load", "torch.serialization.load"))
            if loads and kwargs.get("weights_only") != "True":
                found.append(f"{where} {name} without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle") == "True":
                found.append(f"{where} {name}(allow_pickle=True)")
            if name in ("eval", "exec"):
                found.append(f"{where} {name}()")
    return found


def test_no_pickle_and_no_unsafe_torch_load_anywhere():
    files = python_files()
    assert len(files) > 50
    problems = [p for f in files for p in unsafe_calls(f)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nfrom dill import loads\nimport torch\nimport numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
        "torch.load('y', weights_only=True)\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(unsafe_calls(bad)) == 5, unsafe_calls(bad)
    finally:
        ROOT = saved


def test_tokens_are_compared_in_constant_time():
    source = (ROOT / "src" / "piggyback_serve" / "server" / "auth.py").read_text()
    assert "hmac.compare_digest" in source
    tree = ast.parse(source)
    for node in ast.walk(tree):  # no == / != / in on anything token-like
        if isinstance(node, ast.Compare) and not all(
            isinstance(op, ast.Is | ast.IsNot) for op in node.ops
        ):  # `token is None` is fine; an equality test would leak timing
            text = ast.unparse(node)
            assert not re.search(r"token|given|secret", text, re.I), text


TOKEN, PREDICT_TOKEN = "adm1n-t0ken-XYZ", "pr3dict-t0ken-QRS"


async def test_tokens_guard_their_routes_and_are_never_logged_or_echoed(
    tmp_path, registry_dir, backbone, reference, caplog
):
    settings = settings_for(tmp_path, registry_dir, admin_token=TOKEN, predict_token=PREDICT_TOKEN)
    data = (registry_dir / "beta.safetensors").read_bytes()
    image = png(3)
    caplog.set_level(logging.DEBUG)
    bodies = []
    async with serving(settings, backbone) as client:

        def auth(token):
            return {"Authorization": f"Bearer {token}", "content-type": "image/png"}

        async def call(method, url, status, **kw):
            r = await client.request(method, url, **kw)
            assert r.status_code == status, (method, url, r.text)
            bodies.append(r.text + str(r.headers))
            return r

        # Writes: the admin token only.
        await call("PUT", "/tasks/copy", 401, content=data)
        await call("PUT", "/tasks/copy", 403, content=data, headers=auth(PREDICT_TOKEN))
        await call("PUT", "/tasks/copy", 403, content=data, headers=auth(TOKEN + "x"))
        await call("PUT", "/tasks/copy", 403, content=data, headers=auth(TOKEN[:-1]))
        utf8 = {b"Authorization": "Bearer \u00e4dmin".encode()}  # non-ASCII bytes
        await call("PUT", "/tasks/copy", 403, content=data, headers=utf8)
        await call("DELETE", f"/tasks/beta?token={TOKEN}", 401)  # never from the URL
        await call("PUT", "/tasks/copy", 201, content=data, headers=auth(TOKEN))
        await call("DELETE", "/tasks/copy", 204, headers={"Authorization": f"bearer  {TOKEN} "})
        # Predictions: the predict token or the admin token.
        await call("POST", "/predict?task=alpha", 401, content=image)
        await call("POST", "/predict?task=alpha", 403, content=image, headers=auth("nope"))
        r = await call(
            "POST", "/predict?task=alpha", 200, content=image, headers=auth(PREDICT_TOKEN)
        )
        reference.check("alpha", image, r.json()["results"][0])
        await call("POST", "/predict?task=alpha", 200, content=image, headers=auth(TOKEN))
        infer = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 32, 32],
                             "data": [0.0] * 3072}]}  # fmt: skip
        r = await call("POST", "/v2/models/alpha/infer", 401, json=infer)
        assert isinstance(r.json()["error"], str)
        await call("POST", "/v2/models/alpha/infer", 200, json=infer, headers=auth(PREDICT_TOKEN))
        # Reading stays open.
        await call("GET", "/tasks", 200)
        await call("GET", "/healthz", 200)
        metrics = await call("GET", "/metrics", 200)
        assert TOKEN not in repr(client.app.state.services.settings)
        assert TOKEN not in metrics.text
    # Everything the server side logged (the test's own httpx client logs the URLs it sends).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "httpx")
    assert "ready: backbone" in logged  # the capture did see the server
    for secret in (TOKEN, PREDICT_TOKEN):
        assert secret not in logged
        assert not any(secret in b for b in bodies)


async def test_cors_is_off_by_default_and_opt_in(tmp_path, registry_dir, backbone):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with serving(settings_for(tmp_path, registry_dir), backbone) as client:
        r = await client.options("/predict?task=alpha", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = await client.get("/tasks", headers={"Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    settings = settings_for(tmp_path, registry_dir, cors_origins="https://app.example")
    async with serving(settings, backbone) as client:
        ok = {**preflight, "Origin": "https://app.example"}
        r = await client.options("/predict?task=alpha", headers=ok)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await client.options("/predict?task=alpha", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


def test_the_container_runs_as_a_non_root_user():
    """tests/deploy checks the last USER; here: it is set in the final stage, by name or a
    non-zero uid, and nothing after it switches back."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    final = lines[max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM ")) :]
    users = [ln.split(None, 1)[1].split(":")[0] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert not any("--user root" in ln or "--chown=root" in ln for ln in final)
