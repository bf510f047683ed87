"""Learning a task: Piggyback masks (the method) and the paper's two baselines.

- piggyback:       scores for every backbone Conv2d/Linear weight + a new head
- classifier-only: the frozen backbone + a new head
- finetune:        every backbone weight + a new head (BN statistics stay frozen)

A caller that drives a run (the server's training jobs) passes `on_step`, called with a
`Progress` after every optimizer step (an exception it raises stops the run and propagates:
that is how a job is cancelled), and `checkpoint`, a safetensors file written after every
epoch with what the run needs to go on: the trained tensors, Adam's state, the lr schedule's
position, the shuffle's and the global RNG's states. `train` resumes from an existing
checkpoint after its last epoch, with the same result as a run never interrupted; a
checkpoint written by another run (config, data or backbone differ) raises `CheckpointError`.
The file stays when the run ends: the caller deletes it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch
from torch import nn
from tqdm.auto import tqdm

from piggyback_serve.masks import artifact as artifact_mod
from piggyback_serve.masks.backbones import Backbone
from piggyback_serve.masks.data import LabelledData, preprocess_all
from piggyback_serve.masks.device import resolve_device
from piggyback_serve.masks.errors import MasksError
from piggyback_serve.masks.layers import DEFAULT_THRESHOLD, PiggybackModel

Mode = Literal["piggyback", "classifier-only", "finetune"]
MODES: tuple[Mode, ...] = ("piggyback", "classifier-only", "finetune")


@dataclass
class TrainConfig:
    """Defaults follow the paper's code, except the head lr (docs/training.md says why)."""

    mode: Mode = "piggyback"
    epochs: int = 3
    # A mask bit needs ~50 Adam steps of one sign to cross the threshold (scores 1e-2,
    # threshold 5e-3, lr 1e-4): a small folder gets more epochs so that masks can learn.
    min_steps: int = 200
    batch_size: int = 32
    lr_mask: float = 1e-4
    lr_head: float = 1e-3
    lr_finetune: float = 1e-4  # backbone weights, finetune baseline only
    lr_decay: float = 0.1  # applied once, after half the epochs
    weight_decay: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    train_bn: bool = False
    input_size: int = 64
    seed: int = 0
    device: str = "cpu"  # or "auto": CUDA when present (the CLI's default), "cuda:1", ...
    progress: bool = True


@dataclass
class TrainResult:
    mode: Mode
    accuracy: float
    sparsity: float  # fraction of masked weights switched off (piggyback), else 0
    # What one more task costs to store in this mode; piggyback: the bytes of its artifact
    # file as written (format 2), the task named after the data set.
    task_bytes: int
    seconds: float
    model: nn.Module
    epochs: int = 0  # epochs actually run: config.epochs raised by min_steps


@dataclass(frozen=True)
class Progress:
    """After an optimizer step: `step` of `steps` over the whole run (from 1), `epoch` of
    `epochs` (from 1), the step's training loss."""

    step: int
    steps: int
    epoch: int
    epochs: int
    loss: float


class CheckpointError(MasksError):
    """A checkpoint file can't be read, or another run (config, data, backbone) wrote it."""


class _ClassifierOnly(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x):
        with torch.no_grad():
            features = self.backbone.module(x)
        return self.head(features)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.module.eval()
        return self


class _Finetune(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.features = copy.deepcopy(backbone.module).requires_grad_(True)
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x):
        return self.head(self.features(x))

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen BN statistics, as for Piggyback: small batches make poor estimates.
        for layer in self.features.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.eval()
        return self


def build_model(backbone: Backbone, num_classes: int, config: TrainConfig) -> nn.Module:
    if config.mode == "piggyback":
        return PiggybackModel(backbone, num_classes, config.threshold, train_bn=config.train_bn)
    if config.mode == "classifier-only":
        return _ClassifierOnly(backbone, num_classes)
    if config.mode == "finetune":
        return _Finetune(backbone, num_classes)
    raise ValueError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODES)}")


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": model.head.parameters(), "lr": config.lr_head}]
    if isinstance(model, PiggybackModel):
        groups.append({"params": model.scores.parameters(), "lr": config.lr_mask})
        if config.train_bn:
            groups.append({"params": model.bn.parameters(), "lr": config.lr_head})
    elif isinstance(model, _Finetune):
        groups.append({"params": model.features.parameters(), "lr": config.lr_finetune})
    return torch.optim.Adam(groups, weight_decay=config.weight_decay)


def effective_epochs(config: TrainConfig, train_size: int) -> int:
    """`config.epochs`, raised until the run makes at least `config.min_steps` steps."""
    steps_per_epoch = max(1, math.ceil(train_size / config.batch_size))
    return max(config.epochs, math.ceil(config.min_steps / steps_per_epoch))


def train(
    backbone: Backbone,
    data: LabelledData,
    config: TrainConfig,
    task: str | None = None,
    *,
    on_step: Callable[[Progress], None] | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train one model on data.train, report accuracy on data.test; the progress bar names
    `task` (default: the data set's name). `on_step` and `checkpoint`: the module's doc."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    backbone.module.to(device)
    model = build_model(backbone, len(data.labels), config).to(device)
    decode_on = device if device.type == "cuda" else None  # as the server decodes there
    train_set = preprocess_all(
        data.train, config.input_size, backbone.mean, backbone.std, decode_on
    )
    step_model = model
    if isinstance(model, _ClassifierOnly):
        # The backbone is frozen (BN too): its features are computed once, not every epoch.
        train_set = _features(backbone, train_set, device)
        step_model = model.head
    shuffle = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, generator=shuffle
    )
    optimizer = _optimizer(model, config)
    epochs = effective_epochs(config, len(train_set))
    milestone = math.ceil(epochs / 2) if epochs > 1 else epochs + 1
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [milestone], config.lr_decay)
    loss_fn = nn.CrossEntropyLoss()
    run = _Run(model, optimizer, schedule, shuffle, device)
    fingerprint = _fingerprint(config, epochs, data, backbone)
    done = run.resume(checkpoint, fingerprint) if checkpoint and checkpoint.exists() else 0
    steps, step = epochs * len(loader), done * len(loader)
    for epoch in range(done, epochs):
        model.train()
        bar = tqdm(
            loader,
            desc=f"{task or data.name} {config.mode} {epoch + 1}/{epochs}",
            disable=not config.progress,
            leave=False,
        )
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(step_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, value = step + 1, loss.item()
            bar.set_postfix(loss=f"{value:.3f}")
            if on_step is not None:
                on_step(Progress(step, steps, epoch + 1, epochs, value))
        schedule.step()
        if checkpoint is not None:
            run.save(checkpoint, fingerprint, epoch + 1)
    accuracy = evaluate(model, data, backbone, config, device)
    result = TrainResult(
        mode=config.mode,
        accuracy=accuracy,
        sparsity=model.sparsity() if isinstance(model, PiggybackModel) else 0.0,
        task_bytes=0,
        seconds=0.0,
        model=model,
        epochs=epochs,
    )
    result.task_bytes = _task_bytes(result, backbone, data, config)
    result.seconds = time.perf_counter() - start
    return result


CHECKPOINT_FORMAT = "piggyback-train-checkpoint/1"


def _fingerprint(config: TrainConfig, epochs: int, data: LabelledData, backbone: Backbone):
    """What a checkpoint must match to be resumed: everything that shapes the run."""
    targets = torch.as_tensor(data.train.targets).to(torch.int64).contiguous()
    run = {
        "config": {k: v for k, v in asdict(config).items() if k not in ("device", "progress")},
        "epochs": epochs,
        "train_size": len(targets),
        "train_targets": hashlib.sha256(targets.numpy().tobytes()).hexdigest(),
        "labels": list(data.labels),
        "backbone": backbone.name,
        "backbone_sha256": backbone.fingerprint,
    }
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()


@dataclass
class _Run:
    """The state a run carries from one epoch to the next, and its checkpoint file:
    tensors `model/<state_dict key>`, `bn_buffers/<name>` (piggyback with per-task BN),
    `optimizer/<param index>/<exp_avg|exp_avg_sq|step>`, `rng/shuffle`, `rng/torch`
    (`rng/cuda`); metadata `format`, `fingerprint`, `epoch` (epochs finished),
    `lrs` (the optimizer's param-group lrs) and `scheduler` (its position), as JSON."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    shuffle: torch.Generator
    device: torch.device

    def save(self, path: Path, fingerprint: str, epoch: int) -> None:
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        if isinstance(self.model, PiggybackModel):
            tensors.update({f"bn_buffers/{k}": v for k, v in self.model.bn_buffers.items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer/{index}/{k}": v for k, v in state.items()})
        tensors["rng/shuffle"] = self.shuffle.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        position = self.schedule.state_dict()
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "epoch": str(epoch),
            "lrs": json.dumps([group["lr"] for group in self.optimizer.param_groups]),
            "scheduler": json.dumps({k: position[k] for k in _SCHEDULE_POSITION}),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        artifact_mod.write_atomic(path, safetensors.torch.save(tensors, metadata), "ckpt")

    def resume(self, path: Path, fingerprint: str) -> int:
        """Load the checkpoint into this run; the number of epochs it had finished."""
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (safetensors.SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {path}: unreadable ({e})") from e
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint {path}: not a training checkpoint")
        if metadata.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written by another run (its config, data or backbone "
                "differ from this one's); delete it to start over"
            )
        part = {p: {} for p in ("model", "bn_buffers", "optimizer", "rng")}
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            part[kind][name] = tensor
        self.model.load_state_dict(part["model"])
        for name, tensor in part["bn_buffers"].items():
            self.model.bn_buffers[name].copy_(tensor)
        state = self.optimizer.state_dict()
        state["state"] = {}
        for key, tensor in part["optimizer"].items():
            index, _, name = key.partition("/")
            state["state"].setdefault(int(index), {})[name] = tensor
        for group, lr in zip(state["param_groups"], json.loads(metadata["lrs"]), strict=True):
            group["lr"] = lr
        self.optimizer.load_state_dict(state)
        self.schedule.load_state_dict(
            {**self.schedule.state_dict(), **json.loads(metadata["scheduler"])}
        )
        self.shuffle.set_state(part["rng"]["shuffle"])
        torch.set_rng_state(part["rng"]["torch"])
        if "cuda" in part["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(part["rng"]["cuda"], self.device)
        return int(metadata["epoch"])


_SCHEDULE_POSITION = ("last_epoch", "_step_count", "_last_lr")


@torch.no_grad()  # not inference_mode: the head's backward saves these features
def _features(backbone: Backbone, images: torch.utils.data.TensorDataset, device):
    xs, ys = images.tensors
    feats = [backbone.module(x.to(device)).cpu() for x in xs.split(128)]
    return torch.utils.data.TensorDataset(torch.cat(feats), ys)


def settings_line(config: TrainConfig, backbone: Backbone, train_size: int) -> str:
    """The settings a run actually uses, epochs and steps as raised by min_steps."""
    epochs = effective_epochs(config, train_size)
    steps = epochs * math.ceil(train_size / config.batch_size)
    lrs = f"lr head {config.lr_head:g}"
    if config.mode == "piggyback":
        lrs += f", lr mask {config.lr_mask:g}, threshold {config.threshold:g}"
    elif config.mode == "finetune":
        lrs += f", lr backbone {config.lr_finetune:g}"
    return (
        f"{config.mode} on {backbone.name}: {train_size} training images, input "
        f"{config.input_size} px, batch {config.batch_size}, {_count(epochs, 'epoch')} = "
        f"{_count(steps, 'step')} "
        f"(at least {config.min_steps}), Adam {lrs}, {_decay(config, epochs)}, "
        f"norms {'per task' if config.train_bn else 'frozen'}, "
        f"seed {config.seed}, {resolve_device(config.device)}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _decay(config: TrainConfig, epochs: int) -> str:
    if epochs < 2:
        return "no lr decay"
    return f"lr x{config.lr_decay:g} after epoch {math.ceil(epochs / 2)}"


def input_size_warning(config: TrainConfig, backbone: Backbone) -> str | None:
    """A warning when the input is far below the size the backbone was trained at."""
    if config.input_size * 4 > backbone.input_size:
        return None
    return (
        f"warning: input {config.input_size} px is far below the {backbone.input_size} px "
        f"{backbone.name} was trained at; accuracy can drop sharply (sklearn digits, 5 "
        "classes: 68% at 32 px, 98% at 64 px). Try --input-size 64 or more, even for small "
        "images (they are upscaled)."
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module, data: LabelledData, backbone: Backbone, config: TrainConfig, device=None
):
    """Top-1 accuracy on the held-out split."""
    device = device or resolve_device(config.device)
    model.eval()
    decode_on = device if torch.device(device).type == "cuda" else None
    test_set = preprocess_all(data.test, config.input_size, backbone.mean, backbone.std, decode_on)
    correct = 0
    for x, y in torch.utils.data.DataLoader(test_set, batch_size=128):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(test_set)


def _task_bytes(
    result: TrainResult, backbone: Backbone, data: LabelledData, config: TrainConfig
) -> int:
    model = result.model
    if isinstance(model, PiggybackModel):  # the file as written: coded masks, head, header
        return len(artifact_mod.to_bytes(to_artifact(result, backbone, data, config, data.name)))
    head = sum(p.numel() * 4 for p in model.head.parameters())
    if isinstance(model, _Finetune):
        return (
            sum(t.numel() * t.element_size() for t in model.features.state_dict().values()) + head
        )
    return head


def to_artifact(
    result: TrainResult,
    backbone: Backbone,
    data: LabelledData,
    config: TrainConfig,
    task: str,
    description: str = "",
) -> artifact_mod.TaskArtifact:
    """Pack a trained Piggyback model into a task artifact; `description`: one line on what
    the task expects as input (artifact.check_description)."""
    model = result.model
    if not isinstance(model, PiggybackModel):
        raise ValueError("only a piggyback model becomes a task artifact")
    masks = model.masks()
    return artifact_mod.TaskArtifact(
        task=task,
        backbone=backbone.name,
        backbone_sha256=backbone.fingerprint,
        labels=list(data.labels),
        masks={name: artifact_mod.pack_mask(mask) for name, mask in masks.items()},
        head_weight=model.head.weight.detach().cpu(),
        head_bias=model.head.bias.detach().cpu(),
        threshold=config.threshold,
        input_size=config.input_size,
        mean=backbone.mean,
        std=backbone.std,
        description=artifact_mod.check_description(description),
        bn={k: v.cpu() for k, v in model.bn_state().items()},
        metrics={
            "accuracy": round(result.accuracy, 6),
            "sparsity": round(result.sparsity, 6),
            "dataset": data.name,
            "train_size": len(data.train.targets),
            "test_size": len(data.test.targets),
            "masked_params": sum(m.numel() for m in masks.values()),
            # The epochs the run made (min_steps raises config.epochs for a small data set).
            "config": {
                **{k: v for k, v in asdict(config).items() if k not in ("device", "progress")},
                "epochs": result.epochs or config.epochs,
            },
        },
    )
