"""One training job, in a process of its own or a Ray task (server/jobs/trainers.py): the
images the archive held, `piggy-masks train`'s own steps, progress and the artifact sent
back.

It learns exactly what `piggy-masks train FOLDER` learns with the same options and seed
(the same split, defaults and code, masks/train.py), then the classifier-only baseline on
the same split, as `--compare` does. After each epoch masks/train.py writes a checkpoint
in the job's folder, from which a job interrupted by a restart resumes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path


@dataclass(frozen=True)
class RunSpec:
    """What the trainer needs: the manager's settings and the job's options, resolved."""

    job_id: str
    task: str
    images: Path  # the folder of class folders (server/jobs/archive.py's ImageFolder.root)
    checkpoint: Path
    backbone: str
    weights: str | None
    device: str
    threads: int
    options: dict  # server/jobs/model.py's TrainOptions, dumped


# Child -> manager, over the pipe.
@dataclass(frozen=True)
class Stepped:
    step: int
    steps: int
    epoch: int
    epochs: int
    loss: float


@dataclass(frozen=True)
class Trained:
    artifact: bytes
    accuracy: float
    baseline_accuracy: float
    sparsity: float


@dataclass(frozen=True)
class Failed:
    code: str
    message: str


@dataclass(frozen=True)
class Checkpointed:
    """The checkpoint file's bytes, from a trainer whose disk is not the job's folder (a
    Ray task on another node): the manager keeps them there for a resume."""

    data: bytes


def main(conn: Connection, spec: RunSpec) -> None:
    """A spawned process's entry point (server/jobs/trainers.py): train, send the outcome."""
    # The manager stops a cancelled job with SIGTERM: exit at once, nothing to tidy.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        conn.send(run(spec, conn.send))
    finally:
        conn.close()


def run(spec: RunSpec, send: Callable[[object], None]) -> Trained | Failed:
    """Train; `send` takes each `Stepped`. Whatever goes wrong is the job's `Failed`."""
    try:
        return _train(send, spec)
    except Exception as exc:
        return Failed(_code(exc), f"{type(exc).__name__}: {exc}")


def _train(send: Callable[[object], None], spec: RunSpec) -> Trained:
    import torch

    from piggyback_serve.masks import artifact, data, train
    from piggyback_serve.masks.backbones import load_backbone

    torch.set_num_threads(spec.threads)
    options = spec.options
    backbone = load_backbone(spec.backbone, spec.weights)
    folder = data.image_folder(spec.images, seed=options["seed"], test_fraction=options["held_out"])
    dataset = replace(folder, name=spec.task)  # the artifact's metrics name the data set
    defaults = train.TrainConfig()
    config = train.TrainConfig(
        epochs=options["epochs"] or defaults.epochs,
        min_steps=_given(options["min_steps"], defaults.min_steps),
        batch_size=options["batch_size"] or defaults.batch_size,
        lr_mask=options["lr_mask"] or defaults.lr_mask,
        lr_head=options["lr_head"] or defaults.lr_head,
        threshold=options["threshold"] or defaults.threshold,
        train_bn=options["train_norm"],
        input_size=options["input_size"] or backbone.train_size,
        seed=options["seed"],
        device=spec.device,
        progress=False,
    )

    def report(p: train.Progress) -> None:
        send(Stepped(p.step, p.steps, p.epoch, p.epochs, float(p.loss)))

    result = train.train(
        backbone, dataset, config, spec.task, on_step=report, checkpoint=spec.checkpoint
    )
    baseline = train.train(backbone, dataset, replace(config, mode="classifier-only"), spec.task)
    task = train.to_artifact(result, backbone, dataset, config, spec.task, options["description"])
    return Trained(artifact.to_bytes(task), result.accuracy, baseline.accuracy, result.sparsity)


def _given(value, default):
    return default if value is None else value


def _code(exc: Exception) -> str:
    from piggyback_serve.masks.errors import MasksError

    if isinstance(exc, MasksError):
        return "invalid_data"
    if isinstance(exc, MemoryError):
        return "out_of_memory"
    return "training_failed"
