"""bench/render.py: pages from records alone. A page names its commit, date, machine and
command; a record or a row whose scenario is gone is dropped; no page carries words that
are not in the records or the renderer's fixed headers."""

from __future__ import annotations

import json
import re

import pytest

from bench import record, render, run
from bench.scenarios import PAGES, SCENARIOS

META = {
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "dirty": True,
    "date": "2026-12-07T01:02:03+00:00",
    "machine": {"cores": 2, "ram_gib": 7.7, "cpu": "Some CPU", "torch": "2.9.0",
                "device": "cpu", "omp_wait_policy": "PASSIVE"},
    "command": "python -m bench --scenarios serving,compile",
    "seconds": 12,
}  # fmt: skip
SPREAD = {"median": 0.9, "low": 0.8, "high": 0.95, "n": 3}


def records() -> dict[str, dict]:
    serving = {
        "scenario": "serving",
        "meta": META,
        "figures": [
            {"figure": "serving ÷ raw, 1 task, HTTP", "on": "resnet18 64px b16",
             "goal": "≥ 0.95", "value": SPREAD},
            {"figure": "a figure this scenario no longer has", "on": None, "goal": "≥ 1",
             "value": 7.0},
        ],
        "tables": {
            "latency": {
                "columns": list(SCENARIOS["serving"].tables["latency"].columns),
                "rows": [["resnet18 64px b16", 1, 40.0, SPREAD, 12.5, 80.25, 300, 0]],
            },
            "a table it no longer has": {"columns": ["x"], "rows": [["stale cell"]]},
        },
        "raw": {},
    }  # fmt: skip
    compile_ = {
        "scenario": "compile",
        "meta": {**META, "commit": "fedcba9876543210fedcba9876543210fedcba98", "dirty": False},
        "figures": [],
        "tables": {
            "compile": {
                "columns": list(SCENARIOS["compile"].tables["compile"].columns),
                "rows": [["resnet18", 64, 1, 19.5, 3.25, 2.5, 1.3]],
            }
        },
        "raw": {},
    }
    gone = {
        "scenario": "a scenario that was removed",
        "meta": META,
        "figures": [{"figure": "the old engine's cache hit rate", "goal": "", "value": 1.0}],
        "tables": {},
        "raw": {},
    }
    return {"serving": serving, "compile": compile_, "gone": gone}


@pytest.fixture
def written(tmp_path) -> dict[str, str]:
    for name, rec in records().items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rec))
    (tmp_path / "not-a-record.json").write_text("[1, 2]")
    paths = render.write_pages(tmp_path)
    return {p.name: p.read_text() for p in paths}


def test_pages_are_rendered_from_the_records(written):
    assert set(written) == {"RESULTS.md", "compile.md"}
    assert written["compile.md"].startswith(f"# {PAGES['compile.md']}\n")
    assert "| resnet18 | 64 | 1 | 19.5 | 3.25 | 2.50 | 1.30 |" in written["compile.md"]
    results = written["RESULTS.md"]
    assert "| serving ÷ raw, 1 task, HTTP | resnet18 64px b16 | ≥ 0.95 | 0.900 [0.800–0.950] |" in (
        results
    )
    assert (
        "| resnet18 64px b16 | 1 | 40.0 | 0.900 [0.800–0.950] | 12.5 | 80.2 | 300 | 0 |" in results
    )


def test_every_page_names_its_commit_date_machine_and_command(written):
    for name, text in written.items():
        assert "0123456789" in text or "fedcba9876" in text, name
        assert META["date"] in text and META["command"] in text, name
        assert "2 cores, 7.7 GiB, Some CPU, torch 2.9.0, cpu" in text, name
    assert "0123456789 (dirty)" in written["RESULTS.md"]
    assert "fedcba9876 |" in written["compile.md"]


def test_stale_records_figures_and_tables_are_dropped(written):
    text = "\n".join(written.values())
    for stale in (
        "a figure this scenario no longer has",
        "a table it no longer has",
        "stale cell",
        "the old engine's cache hit rate",
    ):
        assert stale not in text


def _words(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(_words, value.keys()), *map(_words, value.values()))
    if isinstance(value, list | tuple):
        return set().union(*map(_words, value)) if value else set()
    return set(re.findall(r"[A-Za-z_]{2,}", str(value)))


def test_no_page_has_words_from_anywhere_but_the_records_and_the_fixed_headers(written):
    fixed = (
        [render.SUMMARY, render.DIRTY, *render.SUMMARY_COLUMNS, *render.RUN_COLUMNS]
        + [f"{k} {v}" for k, v in PAGES.items()]
        + [f"{s.title} {s.page}" for s in SCENARIOS.values()]
        + [
            f"{t.title} {' '.join(t.columns)}"
            for s in SCENARIOS.values()
            for t in s.tables.values()
        ]
        + ["cores GiB torch OMP_WAIT_POLICY"]  # the machine's field names
        + [filename for filename, _ in render.PLOTS.values()]
    )
    allowed = _words(records()) | _words(fixed)
    for name, text in written.items():
        extra = _words(text) - allowed
        assert not extra, (name, sorted(extra))


def test_a_record_carries_its_provenance(tmp_path):
    assert run.main(["--quick", "--scenarios", "accuracy", "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "accuracy.json").read_text())
    meta = rec["meta"]
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]) and isinstance(meta["dirty"], bool)
    assert meta["date"].endswith("+00:00")
    assert {"cores", "ram_gib", "cpu", "torch", "device"} <= set(meta["machine"])
    assert meta["command"] == f"python -m bench --quick --scenarios accuracy --out {tmp_path}"
    page = (tmp_path / "accuracy.md").read_text()
    assert meta["commit"][:10] in page and "held-out accuracy %" in page
    # bytes per task from the files themselves, every demo task
    sizes = {row[0]: row[6] for row in rec["tables"]["tasks"]["rows"]}
    assert sizes and all(10_000 < size < 200_000 for size in sizes.values())


def test_plain_turns_spreads_and_nan_into_json():
    from bench.stats import Spread

    assert record.plain({"a": Spread(1.0, 0.5, 2.0, 3), "b": float("nan")}) == {
        "a": {"median": 1.0, "low": 0.5, "high": 2.0, "n": 3},
        "b": None,
    }
