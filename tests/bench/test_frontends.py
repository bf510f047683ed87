"""bench/scenarios/frontends.py: its figures and tables from made-up windows."""

from __future__ import annotations

import pytest

from bench.scenarios import SCENARIOS, frontends


def _window(images: int, main: float, fronts: float, engine: float, wall: float = 2.0) -> dict:
    cpu = {"main": main, "frontends": fronts, "helpers": 0.01, "engine": engine}
    return {
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "cpu_s": cpu,
        "errors": 0,
        "p50_ms": 10.0,
    }


def _raw() -> dict:
    bound = {
        "1": [_window(100, 1.8, 0.0, 0.1), _window(110, 1.8, 0.0, 0.1)],
        "2": [_window(180, 0.2, 3.0, 0.2), _window(176, 0.2, 3.0, 0.2)],
    }
    costs = {
        "default": {"photos": [_window(400, 0.8, 0.0, 2.2)] * 2, "phone": [_window(50, 0.5, 0, 1)]},
        "2": {"photos": [_window(380, 0.2, 0.6, 2.2)] * 2, "phone": [_window(50, 0.1, 0.4, 1)]},
    }
    return {
        "bound": {"config": "lite0 64", "runs": bound},
        "costs": {"config": "lite0 224", "runs": costs},
    }


def test_figures_from_made_up_windows():
    found = {(f["figure"], f["on"]): f["value"] for f in frontends.summarize(_raw())["figures"]}
    ratio = found[(frontends.RATIO, "lite0 64")]
    assert (ratio.low, ratio.high) == pytest.approx((176 / 110, 180 / 100))
    assert found[(frontends.PHOTOS, "1 process (default)")].median == pytest.approx(2.0)
    assert found[(frontends.PHOTOS, "2 front ends")].median == pytest.approx(800 / 380)
    assert found[(frontends.PHONE, "2 front ends")].median == pytest.approx(10.0)
    cores = found[(frontends.CORES, "1 process (default), default engine workers")]
    assert cores.median == pytest.approx((0.8 + 2.2 + 0.01) / 2.0)


def test_every_figure_and_table_is_declared():
    found = frontends.summarize(_raw())
    scenario = SCENARIOS["frontends"]
    assert {f["figure"] for f in found["figures"]} == set(scenario.figures)
    for key, rows in found["tables"].items():
        columns = scenario.tables[key].columns
        assert rows and all(len(row) == len(columns) for row in rows), key


def test_windows_beside_other_tenants_leave_the_figures():
    raw = _raw()
    busy = {**_window(40, 0.8, 0.0, 2.2, wall=4.0), "others_cores": 1.0}
    raw["costs"]["runs"]["default"]["photos"].append(busy)
    raw["bound"]["runs"]["1"].append({**_window(10, 1.0, 0.0, 0.1), "others_cores": 0.9})
    raw["bound"]["runs"]["2"].append(_window(900, 0.2, 3.0, 0.2))
    found = frontends.summarize(raw)
    values = {(f["figure"], f["on"]): f["value"] for f in found["figures"]}
    cores = values[(frontends.CORES, "1 process (default), default engine workers")]
    assert cores.n == 2 and cores.median == pytest.approx((0.8 + 2.2 + 0.01) / 2.0)
    assert values[(frontends.RATIO, "lite0 64")].n == 2  # the busy pair is left out
    rows = {(r[0], r[1], r[2]): r for r in found["tables"]["summary"]}
    assert rows[("224 px", "default", "photos")][3] == "2 of 3"
    assert len(found["tables"]["windows"]) == 3 + 3 + 3 + 1 + 2 + 1  # every window kept
