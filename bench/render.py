"""Every page under bench/results/, from the stored records alone (`python -m bench --render`).

A page holds, per scenario: the commit, date, machine and command of its record, its
figures with their goals, and its tables. RESULTS.md starts with every figure of every
page. Only what bench/scenarios declares today is rendered: a record of a scenario that is
gone, or a figure or table it no longer has, is left out.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench import record
from bench.scenarios import PAGES, SCENARIOS, Scenario

SUMMARY_PAGE = "RESULTS.md"
# The renderer's own words: everything else on a page comes from the records.
SUMMARY = "Summary"
FIGURE_COLUMNS = ("figure", "on", "goal", "value")
SUMMARY_COLUMNS = (*FIGURE_COLUMNS, "page", "commit")
RUN_COLUMNS = ("commit", "date", "machine", "command", "seconds")
DIRTY = "(dirty)"


def _digits(ref: float) -> int:
    a = abs(ref)
    return 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 1 else 3


def _num(value: float, digits: int) -> str:
    return "–" if math.isnan(value) else f"{value:,.{digits}f}"


def fmt(value) -> str:
    """A cell: a spread as median [min–max], numbers to a precision set by their size."""
    if value is None or value == "":
        return "–"
    if isinstance(value, dict) and "median" in value:
        median = float(value["median"])
        digits = _digits(median)
        if value.get("n", 1) > 1 and value["low"] != value["high"]:
            low, high = (_num(float(value[k]), digits) for k in ("low", "high"))
            return f"{_num(median, digits)} [{low}–{high}]"
        return _num(median, digits)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _num(value, _digits(value)) if not math.isnan(value) else "–"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items()) or "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(columns, rows) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def commit_of(meta: dict) -> str:
    short = (meta.get("commit") or "unknown")[:10]
    return f"{short} {DIRTY}" if meta.get("dirty") else short


def machine_of(meta: dict) -> str:
    m = meta.get("machine") or {}
    parts = [
        f"{m['cores']} cores" if m.get("cores") else None,
        f"{m['ram_gib']} GiB" if m.get("ram_gib") else None,
        m.get("cpu"),
        f"torch {m['torch']}" if m.get("torch") else None,
        m.get("device"),
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}" if m.get("omp_wait_policy") else None,
    ]
    return ", ".join(p for p in parts if p)


def run_row(meta: dict) -> list:
    return [
        commit_of(meta),
        meta.get("date"),
        machine_of(meta),
        f"`{meta.get('command')}`",
        meta.get("seconds"),
    ]


def current(records: dict[str, dict]) -> dict[str, tuple[Scenario, dict]]:
    """The records of scenarios that exist today, in the scenario list's order."""
    return {n: (s, records[n]) for n, s in SCENARIOS.items() if n in records}


def figures_of(scenario: Scenario, rec: dict) -> list[dict]:
    """The record's figures that the scenario still declares, in the declared order."""
    order = list(scenario.figures)
    found = [f for f in rec.get("figures", []) if f.get("figure") in scenario.figures]
    return sorted(found, key=lambda f: order.index(f["figure"]))


def section(scenario: Scenario, rec: dict, plotted: dict[str, list[str]]) -> list[str]:
    lines = ["", f"## {scenario.title}", "", *table(RUN_COLUMNS, [run_row(rec["meta"])])]
    figs = figures_of(scenario, rec)
    if figs:
        rows = [[f["figure"], f.get("on"), f.get("goal"), f.get("value")] for f in figs]
        lines += ["", *table(FIGURE_COLUMNS, rows)]
    for key, spec in scenario.tables.items():
        found = rec.get("tables", {}).get(key)
        if found and found.get("rows"):
            lines += ["", f"### {spec.title}", "", *table(spec.columns, found["rows"])]
    for name in plotted.get(scenario.name, ()):
        lines += ["", f"![{name}]({name})"]
    return lines


def summary(scenarios: dict[str, tuple[Scenario, dict]]) -> list[str]:
    rows = []
    for scenario, rec in scenarios.values():
        for f in figures_of(scenario, rec):
            link = f"[{scenario.page}]({scenario.page})"
            rows.append(
                [
                    f["figure"],
                    f.get("on"),
                    f.get("goal"),
                    f.get("value"),
                    link,
                    commit_of(rec["meta"]),
                ]
            )
    return ["", f"## {SUMMARY}", "", *table(SUMMARY_COLUMNS, rows)] if rows else []


def page(name: str, scenarios: dict[str, tuple[Scenario, dict]], plotted=None) -> str:
    lines = [f"# {PAGES[name]}"]
    if name == SUMMARY_PAGE:
        lines += summary(scenarios)
    for scenario, rec in scenarios.values():
        if scenario.page == name:
            lines += section(scenario, rec, plotted or {})
    return "\n".join(lines) + "\n"


def pages(records: dict[str, dict], plotted: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Page name -> markdown, for every page with at least one current record."""
    scenarios = current(records)
    used = {s.page for s, _ in scenarios.values()} | ({SUMMARY_PAGE} if scenarios else set())
    return {name: page(name, scenarios, plotted) for name in PAGES if name in used}


# ---------------------------------------------------------------------------------------
# Plots, from the same tables as the pages


def _column(rec: dict, key: str, column: str) -> list:
    found = rec["tables"].get(key) or {"columns": [column], "rows": []}
    i = found["columns"].index(column)
    return [row[i] for row in found["rows"]]


def _median(cell) -> float:
    if isinstance(cell, dict):
        return float(cell["median"])
    return math.nan if cell is None else float(cell)


def _plot_serving(rec: dict, plt):
    beds = _column(rec, "throughput", "backbone")
    sides = _column(rec, "throughput", "side")
    ratio = _column(rec, "throughput", "÷ raw_cl (CPU)")
    labels = list(dict.fromkeys(beds))
    shown = [v for v in ("engine", "http1", "http10", "http100") if v in sides]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(shown))
    for j, side in enumerate(shown):
        values = [
            next(
                (
                    _median(r)
                    for b, s, r in zip(beds, sides, ratio, strict=True)
                    if b == label and s == side
                ),
                math.nan,
            )
            for label in labels
        ]
        ax.bar([i + j * width for i in range(len(labels))], values, width, label=side)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.3 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("images per CPU-s ÷ raw_cl")
    ax.legend(fontsize=7)
    return fig


def _plot_scale(rec: dict, plt):
    tasks = _column(rec, "scale", "tasks")
    rss = [_median(v) for v in _column(rec, "scale", "RSS MB")]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t for t in tasks if t], [r for t, r in zip(tasks, rss, strict=True) if t], "o-")
    if tasks and not tasks[0]:
        ax.axhline(rss[0], color="gray", ls="--", lw=0.8, label="0 tasks")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("registered tasks")
    ax.set_ylabel("server RSS (MB)")
    return fig


def _plot_peers(rec: dict, plt):
    sides = _column(rec, "sides", "side")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(sides, [_median(v) for v in _column(rec, "sides", "images/CPU-s")])
    axes[0].set_ylabel("images per CPU-s")
    axes[1].bar(sides, [_median(v) for v in _column(rec, "sides", "p99 ms")])
    axes[1].set_ylabel("p99 ms")
    return fig


PLOTS = {
    "serving": ("serving_ratio.png", _plot_serving),
    "cost": ("task_memory.png", _plot_scale),
    "peers": ("peers.png", _plot_peers),
}


def plots(records: dict[str, dict], folder: Path) -> dict[str, list[str]]:
    """The PNGs beside the pages; scenario -> the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, list[str]] = {}
    for name, (_, rec) in current(records).items():
        if name not in PLOTS:
            continue
        filename, draw = PLOTS[name]
        try:
            fig = draw(rec, plt)
        except (KeyError, ValueError, IndexError):
            continue  # a record without the table a plot needs
        fig.tight_layout()
        fig.savefig(folder / filename, dpi=80)
        plt.close(fig)
        made[name] = [filename]
    return made


def write_pages(folder: Path) -> list[Path]:
    records = record.load(folder)
    written = []
    for name, text in pages(records, plots(records, folder)).items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_pages(record.RESULTS):
        print(path)
