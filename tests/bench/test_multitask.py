"""bench/scenarios/multitask.py and gpu.py run (tiny, CPU): tasks, the in-process figures,
the rows they reduce to."""

from __future__ import annotations

import torch

from bench.scenarios import gpu, multitask
from piggyback_serve.masks import artifact as artifacts


def test_switch_off_more_switches_off_more_bits():
    base = artifacts.read(multitask.DEMO / "mnist.safetensors")
    more = multitask.switch_off_more(base, 0.005, seed=1, name="m1")
    other = multitask.switch_off_more(base, 0.005, seed=2, name="m2")
    key = max(base.masks, key=lambda k: base.masks[k].numel)  # enough weights to switch off
    n = base.masks[key].numel
    on = [a.mask(key, (n,)) for a in (base, more, other)]
    assert not (on[1] & ~on[0]).any()  # only switches off
    assert on[1].sum() < on[0].sum()
    assert not torch.equal(on[1], on[2])  # a different set per task
    assert more.task == "m1"


def test_gpu_scenario_quick_on_cpu(quick_ctx):
    results = gpu.measure(quick_ctx)
    (bed,) = results.values()
    ip = bed["in_process"]
    assert ip["switch"]["switch_ms"][0] > 0 and ip["switch"]["forward_b1_ms"][0] > 0
    assert {"per-task 2x2", "one-pass 1x4", "corrections 2x2", "segments 4x1"} <= set(
        ip["mixed"]["ms"]
    )
    assert ip["mixed"]["layers_ms"]["segments 4x1"]["kxk"] > 0
    found = gpu.summarize(results)
    names = {f["figure"] for f in found["figures"]}
    assert {"task switch ÷ batch-1 forward", "engine ÷ plain model, one task, in-process"} <= names
    assert [row[1] for row in found["tables"]["mixed"]] == ["1x4", "2x2", "4x1"]
    http = bed["http"]
    assert http["one"][0]["images"] > 0 and http["many"][0]["images"] > 0
    assert not http["one"][0]["errors"] and not http["many"][0]["errors"]
    ons = {f["on"] for f in found["figures"] if f["figure"] == gpu.FIGURE}
    assert ons == {"resnet18, 1 task", "resnet18, 3 tasks"}
    assert len(found["tables"]["http"]) == 2


def test_figures_from_http_results(multitask_http):
    f = multitask.figures({"http": multitask_http})
    assert f["many ÷ one task, 200 tasks, HTTP"].median == 0.85
    assert f["mixed ÷ one task, 4 tasks, HTTP"].median == 0.96
    assert f["server memory per task ÷ artifact bytes (RSS)"] == 0.5
    assert f["task state bytes per task ÷ artifact bytes"] == 1.2
