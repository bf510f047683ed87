"""bench/families.py: its quick mode end to end (two small families at 64 px, seconds),
the report's rows, and the section it adds to RESULTS.md."""

from __future__ import annotations

import json
import math

import pytest

from bench import families, report


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("families")
    assert families.main(["--quick", "--out", str(out)]) == 0
    return json.loads((out / "families.json").read_text()), (out / "families.md").read_text()


def test_quick_run_measures_every_family(quick):
    results, _ = quick
    assert results["failed"] == []
    assert list(results["beds"]) == list(families.QUICK)
    for bed in results["beds"].values():
        assert bed["input_size"] == families.QUICK_SIZE
        assert set(bed["engine_vs_plain"]) == {str(n) for n in families.BATCHES}
        f = families.figures(bed)
        for column in families.COLUMNS[1:]:
            assert math.isfinite(f[column]) and f[column] > 0, (bed["family"], column)
        # ~1% of the mask bits off: far under a bit per weight for the masks themselves
        assert 0.005 < bed["switched_off"] / bed["maskable_weights"] < 0.02
        assert bed["head_bytes"] < bed["artifact_bytes"]
        assert f["bits/weight"] == pytest.approx(
            8 * bed["artifact_bytes"] / bed["maskable_weights"]
        )
        assert bed["task_state_bytes"] <= bed["task_state_bytes_one_pass"]


def test_report_has_a_row_per_family(quick):
    results, text = quick
    assert text.startswith("# Backbone families")
    assert "Command: `python -m bench.families --quick --out " in text
    assert "| " + " | ".join(families.COLUMNS) + " |" in text
    for family in families.QUICK:
        assert f"| {family} | {families.QUICK_SIZE} | " in text
    section = "\n".join(report._families({"families": results}))
    assert "## 9. Backbone families" in section
    assert all(f"| {family} |" in section for family in families.QUICK)


def test_a_failing_family_is_reported_not_fatal(monkeypatch):
    def boom(family, *args):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(families, "measure", boom)
    results = families.run(["timm:resnet10t"], repeats=1, window_s=0.1)
    assert results["beds"] == {}
    assert results["failed"] == ["timm:resnet10t: RuntimeError: no such layer"]
    assert "not measured: timm:resnet10t" in "\n".join(families.tables(results))
