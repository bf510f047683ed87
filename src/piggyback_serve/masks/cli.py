"""piggy-masks: learn a task, inspect or convert an artifact, build or install the demo."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from piggyback_serve._pipes import quiet_when_the_reader_leaves
from piggyback_serve.masks import artifact, data, demo, samples, train
from piggyback_serve.masks.backbones import BACKBONES, LIBRARIES, load_backbone
from piggyback_serve.masks.errors import MasksError


def _train(args: argparse.Namespace) -> None:
    import torch

    # Checked first: a bad description fails now, not after minutes of training.
    description = artifact.check_description(args.description or "")
    threads = torch.get_num_threads()
    if args.threads:  # 0: torch's choice
        torch.set_num_threads(args.threads)
    try:
        _learn(args, description)
    finally:  # main() called in a process that goes on keeps its own setting
        torch.set_num_threads(threads)


def _learn(args: argparse.Namespace, description: str) -> None:
    backbone = load_backbone(args.backbone, args.weights)
    dataset = data.load_dataset(args.data, seed=args.seed)
    config = train.TrainConfig(
        mode=args.baseline or "piggyback",
        epochs=args.epochs,
        min_steps=args.min_steps,
        batch_size=args.batch_size,
        lr_mask=args.lr_mask,
        lr_head=args.lr_head,
        lr_finetune=args.lr_finetune,
        threshold=args.threshold,
        train_bn=args.train_bn,
        input_size=args.input_size or backbone.train_size,
        seed=args.seed,
        device=args.device,
    )
    warning = train.input_size_warning(config, backbone)
    if warning:
        print(warning, file=sys.stderr)
    print(f"training {train.settings_line(config, backbone, len(dataset.train.targets))}")
    task = args.task or dataset.name
    result = train.train(backbone, dataset, config, task)
    if args.baseline:
        _report(config.mode, result, len(dataset.test.targets))
        return
    out = Path(args.out or f"{task}.safetensors")
    # The bytes reported are the bytes written (format 2), not format 1's bitmaps.
    art = train.to_artifact(result, backbone, dataset, config, task, description)
    blob = artifact.to_bytes(art)
    _report(config.mode, replace(result, task_bytes=len(blob)), len(dataset.test.targets))
    if result.sparsity == 0:
        print(NOTHING_SWITCHED_OFF)
    if args.compare:
        baseline = train.train(backbone, dataset, replace(config, mode="classifier-only"), task)
        _report("classifier-only", baseline, len(dataset.test.targets))
        gain = 100 * (result.accuracy - baseline.accuracy)
        print(f"the mask's gain over classifier-only on the same split: {gain:+.2f} points")
    artifact.write_atomic(out, blob)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


# Torch's intra-op threads: one by default, measured faster than one per core on a small
# machine (docs/training.md).
DEFAULT_THREADS = 1

NOTHING_SWITCHED_OFF = (
    "note: no weight was switched off: the mask is all ones, so this task is the backbone "
    "with a new head (classifier-only). Train longer (--min-steps, --epochs) or raise "
    "--lr-mask to let the mask learn."
)


def _report(mode: str, result: train.TrainResult, test_size: int) -> None:
    print(
        f"{mode}: held-out accuracy {100 * result.accuracy:.2f}% on {test_size} images; "
        f"sparsity {100 * result.sparsity:.2f}%; {result.task_bytes:,} bytes per task; "
        f"{result.seconds:.0f}s"
    )


def _inspect(args: argparse.Namespace) -> None:
    data = Path(args.file).read_bytes()
    art = artifact.read(data)
    print(json.dumps(_typed_metadata(art, artifact.read_metadata(data)), indent=2))
    if art.bn:
        print(f"per-task BatchNorm: {len(art.bn)} tensors")
    if not args.no_backbone:
        backbone = load_backbone(art.backbone, args.weights)
        artifact.validate(art, backbone)  # also sizes a format-1 file's bitmaps
        print(f"valid for backbone {backbone.name} ({backbone.fingerprint[:16]}…)")
    print(_mask_table(art, artifact.read_metadata(data)["format"], len(data)))


def _typed_metadata(art: artifact.TaskArtifact, meta: dict[str, str]) -> dict:
    """The metadata strings as the JSON values the format defines (numbers, lists, objects),
    in the file's order; a field the format does not define stays the string it is."""
    typed = {
        "format": int(meta["format"]),
        "labels": art.labels,
        "threshold": art.threshold,
        "input_size": art.input_size,
        "mean": list(art.mean),
        "std": list(art.std),
        "metrics": art.metrics,
    }
    # format 2's table `masks` is shown per parameter below
    return {k: typed.get(k, v) for k, v in meta.items() if k != "masks"}


def _mask_table(art: artifact.TaskArtifact, version: str, file_bytes: int) -> str:
    """Per parameter: size, switched off, coding, bytes; then bits per masked weight."""
    rows, masked = [], 0
    for name, mask in sorted(art.masks.items()):
        if mask.numel is None:  # format 1 without the backbone: size up to 7 bits over
            numel, off, coding, size = mask.bits.numel() * 8, "?", "bitmap", mask.bits.numel()
        else:
            numel, off = mask.numel, mask.switched_off(mask.numel).numel()
            coding = "bitmap" if version == "1" else mask.coded()[0]
            size = artifact.codec.coded_size(coding, off, numel)
        masked += numel
        rows.append(f"  {name:<40} {numel:>9,} {off!s:>8} {coding:<11} {size:>8,}")
    head = f"  {'parameter':<40} {'weights':>9} {'off':>8} {'coding':<11} {'bytes':>8}"
    bits = 8 * file_bytes / masked
    return "\n".join(
        [f"masks (format {version}):", head, *rows]
        + [f"{file_bytes:,} bytes for {masked:,} masked weights: {bits:.3f} bits per weight"]
    )


def _convert(args: argparse.Namespace) -> None:
    art = artifact.read(args.input)
    backbone = load_backbone(art.backbone, args.weights)
    artifact.validate(art, backbone)  # format 1's bitmaps need the backbone to know their size
    out = artifact.write(art, args.output, args.to)
    before, after = Path(args.input).stat().st_size, out.stat().st_size
    print(f"wrote {out} (format {args.to}): {before:,} -> {after:,} bytes")


def _demo(args: argparse.Namespace) -> None:
    backbone = demo.load_demo_backbone()
    target = Path(args.out) if args.out else demo.demo_tasks_dir()
    if args.rebuild:
        tasks = [t for t in demo.available_tasks() if not args.tasks or t.name in args.tasks]
        rows = demo.build(target, backbone, tasks=tasks, baselines=args.baselines)
        print(demo.accuracy_table(rows))
        if args.report:
            command = "piggy-masks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            Path(args.report).write_text(demo.report(rows, command))
            print(f"wrote {args.report}")
    else:
        installed = demo.install(target, backbone)
        print(f"installed {len(installed)} demo tasks into {target}")
    print(demo.table_from_artifacts(target))


def _samples(args: argparse.Namespace) -> None:
    if args.rebuild:
        tasks = [t for t in demo.available_tasks() if not args.tasks or t.name in args.tasks]
        paths = samples.generate(Path(args.out) if args.out else samples.SAMPLES_DIR, tasks)
        print(f"wrote {len(paths)} samples from the held-out splits")
    elif args.out:
        paths = samples.copy_to(Path(args.out))
        print(f"copied {len(paths)} samples into {args.out}")
    else:
        paths = [p for ps in samples.sample_files().values() for p in ps]
    print(samples.describe(paths))


class _ShowDefaults(argparse.HelpFormatter):
    """Every default in --help, except where there is none or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="piggy-masks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = train.TrainConfig()

    t = sub.add_parser(
        "train",
        help="learn a task (masks + head) into an artifact",
        description="Learn a task (masks + head) into an artifact. The held-out split is 20% "
        "of each class, the same for Piggyback and the classifier-only comparison.",
        formatter_class=_ShowDefaults,
    )
    t.add_argument(
        "--data",
        required=True,
        help=f"an ImageFolder directory or a demo data set: {', '.join(data.DEMO_DATASETS)}",
    )
    t.add_argument(
        "--backbone",
        default=demo.DEMO_BACKBONE,
        help="frozen backbone: "
        + ", ".join(f"{lib}:<model>" for lib in LIBRARIES)
        + f", or one of {', '.join(BACKBONES)}",
    )
    t.add_argument(
        "--weights",
        help="local weights file (safetensors or state dict), or 'random' (default: the "
        "pretrained weights from the library's cache)",
    )
    t.add_argument("--task", help="task name (default: the data set's name)")
    t.add_argument(
        "--description",
        metavar="TEXT",
        help="one line on what the task expects as input, stored in the artifact and shown "
        "to its users, e.g. 'a handwritten digit, white on black, centred' (at most "
        f"{artifact.DESCRIPTION_MAX} characters)",
    )
    t.add_argument("--out", help="artifact path (default: TASK.safetensors)")
    t.add_argument(
        "--baseline",
        choices=["classifier-only", "finetune"],
        help="train a comparison model of the paper instead (no artifact)",
    )
    t.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train classifier-only on the same split and print both accuracies",
    )
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    t.add_argument(
        "--min-steps",
        type=int,
        default=d.min_steps,
        help="at least this many optimisation steps: a small folder gets more epochs",
    )
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    t.add_argument("--lr-mask", type=float, default=d.lr_mask, help="Adam lr of the mask scores")
    t.add_argument("--lr-head", type=float, default=d.lr_head, help="Adam lr of the new head")
    t.add_argument(
        "--lr-finetune", type=float, default=d.lr_finetune, help="backbone lr, finetune only"
    )
    t.add_argument(
        "--threshold", type=float, default=d.threshold, help="a weight is on where score > this"
    )
    t.add_argument(
        "--train-norm",
        "--train-bn",
        dest="train_bn",
        action="store_true",
        help="the task's own norm layers, in the artifact: BatchNorm (affine and statistics), "
        "LayerNorm and GroupNorm (affine)",
    )
    t.add_argument(
        "--input-size",
        type=int,
        help="pixels per side; images are resized to it (default: the library's size for "
        f"{'/'.join(f'{lib}:' for lib in LIBRARIES)} names, {d.input_size} for the built-in "
        "ones; far below 64, accuracy can drop sharply)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="split, init and shuffling")
    t.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (CUDA when present, else the CPU, as the server), cpu, cuda:N",
    )
    t.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch CPU threads; 0: torch's choice, one per core (docs/training.md: why one)",
    )
    t.set_defaults(func=_train)

    i = sub.add_parser("inspect", help="print an artifact's metadata and validate it")
    i.add_argument("file")
    i.add_argument("--weights", help="backbone weights file (default: pretrained)")
    i.add_argument("--no-backbone", action="store_true", help="skip the backbone check")
    i.set_defaults(func=_inspect)

    c = sub.add_parser("convert", help="rewrite an artifact in format 2 (or back to format 1)")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=artifact.FORMATS, default=artifact.FORMAT_VERSION)
    c.add_argument("--weights", help="backbone weights file (default: pretrained)")
    c.set_defaults(func=_convert)

    m = sub.add_parser("demo", help="install (or --rebuild) the demo tasks")
    m.add_argument("--rebuild", action="store_true", help="retrain the tasks from the data")
    m.add_argument(
        "--baselines",
        action="store_true",
        help="with --rebuild: also train classifier-only and finetune baselines",
    )
    m.add_argument("--report", help="with --rebuild: write the accuracy table here (markdown)")
    m.add_argument(
        "--tasks",
        nargs="+",
        choices=[t.name for t in demo.DEMO_TASKS],
        help="with --rebuild: only these tasks (default: every task whose data is installed)",
    )
    m.add_argument("--out", help="target folder (default: $PIGGY_HOME/demo/tasks)")
    m.set_defaults(func=_demo)

    s = sub.add_parser(
        "samples",
        help="list (or copy out) sample images for the demo tasks",
        description="Held-out images of each demo task's data, as the task saw them in "
        "training, named <label>_<n>.png: e.g. `piggy predict --task mnist SAMPLE`.",
    )
    s.add_argument("--out", help="copy them into this folder (one sub-folder per task)")
    s.add_argument(
        "--rebuild",
        action="store_true",
        help="regenerate them from the data sets (into --out, default: the package's folder)",
    )
    s.add_argument(
        "--tasks",
        nargs="+",
        choices=[t.name for t in demo.DEMO_TASKS],
        help="with --rebuild: only these tasks (default: every task whose data is installed)",
    )
    s.set_defaults(func=_samples)
    return p


def main(argv: list[str] | None = None) -> int:
    return quiet_when_the_reader_leaves(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except MasksError as exc:
        print(f"piggy-masks: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
