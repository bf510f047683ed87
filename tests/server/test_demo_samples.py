"""The quick start for real: `piggy-serve --demo`, then the shipped sample images, over HTTP
and through `piggy predict`: each gets its true label as top-1 from its task."""

from __future__ import annotations

import pytest

from piggyback_serve.masks import demo, samples
from tests.server.test_e2e import piggy, piggy_serve

SHIPPED = samples.sample_files()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not any(demo.BUNDLED_DIR.glob("*.safetensors")), reason="no bundled demo tasks built yet"
    ),
]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with piggy_serve(tmp_path_factory.mktemp("demo"), "--demo") as client:
        yield client


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_each_sample_gets_its_true_label(demo_server, task):
    paths = SHIPPED[task]
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = demo_server.post("/predict", params={"task": task, "top_k": 1}, files=files)
    assert r.status_code == 200, r.text
    got = [result["top"][0]["label"] for result in r.json()["results"]]
    assert got == [samples.label_of(p) for p in paths]


def test_quick_start_piggy_predict_with_a_sample(demo_server, tmp_path):
    image = samples.SAMPLES_DIR / "mnist" / "7_0.png"
    out = piggy(str(demo_server.base_url), "predict", "--task", "mnist", "-k", "3", str(image))
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[1].split()
    assert first[:3] == [str(image), "1", "7"], out.stdout
    assert "task mnist, 1 image" in out.stdout
