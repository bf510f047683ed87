"""`python -m bench`: measure the scenarios, store one JSON record each, render the pages.

Every measurement is bounded in time and in request count, and the run starts no new
scenario past --budget-s. `--render` measures nothing: it rewrites the pages from the
records in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import record, render
from bench.bed import Bed, Options
from bench.fixtures import Config
from bench.scenarios import SCENARIOS, Scenario


def configs(device: str, quick: bool) -> list[Config]:
    """The backbones of the per-bed scenarios; on a GPU the same at larger batches."""
    if quick:
        return [Config("resnet18", "random", 32, 4, 8)]
    if device.startswith("cuda"):
        return [
            Config("efficientnet_lite0", None, 224, 64, 128),
            Config("resnet18", "random", 64, 128, 256),
            Config("resnet50", "random", 224, 32, 64),
        ]
    return [
        Config("efficientnet_lite0", None, 224, 8, 16),
        Config("resnet18", "random", 64, 16, 32),
        Config("resnet50", "random", 224, 8, 16),
    ]


def options_for(args: argparse.Namespace) -> Options:
    if args.quick:
        base = Options(
            repeats=2,
            window_s=1.0,
            warmup_s=0.3,
            n_tasks=12,
            peer_models=3,
            scale_counts=(2, 5),
            cold_repeats=2,
            fairness_s=1.5,
            quick=True,
        )
    else:
        base = Options()
    changes = {"repeats": args.repeats, "window_s": args.window_s}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--out",
        type=Path,
        help="records and pages (default bench/results; with --quick a temporary folder)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny models and windows")
    p.add_argument(
        "--scenarios",
        help="comma-separated scenarios (default: those of the full run); known: "
        + ", ".join(n for n, s in SCENARIOS.items() if not s.recorded_by),
    )
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    p.add_argument("--backbones", help="comma-separated subset of the per-bed backbones")
    p.add_argument("--repeats", type=int, help="interleaved repeats per comparison")
    p.add_argument("--window-s", type=float, help="seconds per measurement")
    p.add_argument(
        "--budget-s",
        type=float,
        default=40 * 60,
        help="start no new scenario after this many seconds (default 40 min)",
    )
    p.add_argument("--render", action="store_true", help="measure nothing: rewrite the pages")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    return p


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chosen(args: argparse.Namespace, device: str) -> list[Scenario]:
    names = args.scenarios.split(",") if args.scenarios else None
    skip = set(filter(None, args.skip.split(",")))
    unknown = (set(names or ()) | skip) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    out = []
    for s in SCENARIOS.values():
        if s.name in skip or s.recorded_by or (names is not None and s.name not in names):
            continue
        if names is None and not s.in_full_run:
            continue
        if args.quick and names is None and not s.in_quick:
            continue
        if (s.cpu_only and device != "cpu") or (s.cuda_only and not device.startswith("cuda")):
            if names is not None:
                log(f"{s.name}: not on {device}")
            continue
        out.append(s)
    return out


@dataclasses.dataclass
class Context:
    """What a scenario may use: device, options, a scratch folder, the test beds."""

    device: str
    options: Options
    workdir: Path
    configs: list[Config]

    def __post_init__(self) -> None:
        self._beds: dict[str, Bed] = {}

    def bed(self, cfg: Config) -> Bed:
        """The test bed of `cfg` with its server running (one server at a time)."""
        for label, other in self._beds.items():
            if label != cfg.label:
                other.stop()
        if cfg.label not in self._beds:
            self._beds[cfg.label] = Bed(cfg, self.options, self.workdir, self.device)
        bed = self._beds[cfg.label]
        if bed.server is None:
            bed.start_server()
        return bed

    def close(self) -> None:
        for bed in self._beds.values():
            bed.stop()


def make_record(scenario: Scenario, raw: dict, meta: dict, seconds: float) -> dict:
    """The stored record: provenance, figures (each with its goal), tables, raw data."""
    found = scenario.module().summarize(raw)
    figures = [
        {**f, "goal": scenario.figures[f["figure"]]}
        for f in found.get("figures", [])
        if f["figure"] in scenario.figures
    ]
    tables = {
        key: {"columns": list(scenario.tables[key].columns), "rows": rows}
        for key, rows in found.get("tables", {}).items()
        if key in scenario.tables and rows
    }
    return {
        "scenario": scenario.name,
        "meta": {**meta, "seconds": round(seconds)},
        "figures": figures,
        "tables": tables,
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="piggy-bench-quick-")) if args.quick else record.RESULTS
    )
    if args.render:
        for path in render.write_pages(out):
            log(f"wrote {path}")
        return 0
    command = shlex.join(["python", "-m", "bench", *argv])
    cfgs = configs(device, args.quick)
    if args.backbones:
        cfgs = [c for c in cfgs if c.backbone in args.backbones.split(",")]
    started = time.perf_counter()
    failed: list[str] = []

    def over_budget(what: str) -> bool:
        if time.perf_counter() - started <= args.budget_s:
            return False
        log(f"skip {what}: past the {args.budget_s:.0f} s budget")
        failed.append(f"{what}: past the budget")
        return True

    def attempt(name: str, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not sink the run
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"{name} failed:\n{traceback.format_exc()}")
            return None
        log(f"{name} done in {time.perf_counter() - t0:.0f} s")
        return value

    def store(scenario: Scenario, raw: dict, meta: dict, seconds: float) -> None:
        rec = attempt(
            f"{scenario.name}: summary", lambda: make_record(scenario, raw, meta, seconds)
        )
        if rec is not None:
            record.write(out, scenario.name, rec)
            render.write_pages(out)  # the pages after every scenario, in case of a stop

    selected = chosen(args, device)
    with tempfile.TemporaryDirectory(prefix="piggy-bench-") as tmp:
        ctx = Context(device, options_for(args), Path(tmp), cfgs)
        # Scenarios on the test beds run bed by bed, so that each bed's server starts once.
        on_beds = [s for s in selected if s.per_bed]
        raws: dict[str, dict] = {s.name: {} for s in on_beds}
        metas = {s.name: record.provenance(device, command) for s in on_beds}
        took = dict.fromkeys(raws, 0.0)
        try:
            for i, cfg in enumerate(cfgs):
                for s in on_beds:
                    if (s.first_bed_only and i) or over_budget(f"{s.name} on {cfg.label}"):
                        continue
                    log(f"{s.name} on {cfg.label} ...")
                    t0 = time.perf_counter()
                    module = s.module()
                    raw = attempt(
                        f"{s.name} on {cfg.label}",
                        lambda m=module, c=cfg, first=i == 0: m.measure(ctx.bed(c), first=first),
                    )
                    took[s.name] += time.perf_counter() - t0
                    if raw is not None:
                        raws[s.name][cfg.label] = raw
        finally:
            ctx.close()
        for s in on_beds:
            if raws[s.name]:
                store(s, raws[s.name], metas[s.name], took[s.name])
        for s in (s for s in selected if not s.per_bed):
            if over_budget(s.name):
                continue
            log(f"{s.name} ...")
            meta, t0 = record.provenance(device, command), time.perf_counter()
            raw = attempt(s.name, lambda s=s: s.module().measure(ctx))
            if raw is not None:
                store(s, raw, meta, time.perf_counter() - t0)
    log(f"{out}: {time.perf_counter() - started:.0f} s")
    for line in failed:
        log(f"not recorded: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
