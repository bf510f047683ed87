"""The task artifact: one safetensors file per task (no pickle: uploads are untrusted).

Tensors
    mask.<param>   uint8, the 0/1 mask of backbone weight <param>, flattened in row-major
                   order and bit-packed like numpy.packbits (bitorder="big": the first
                   weight is the most significant bit of byte 0; the last byte is
                   zero-padded)
    head.weight    float32 [num_labels, num_features]
    head.bias      float32 [num_labels]
    bn.<name>.{weight,bias,running_mean,running_var}   optional per-task BatchNorm
Metadata (all strings)
    format, task, backbone, backbone_sha256, labels (JSON list), threshold,
    input_size, mean, std (JSON lists), metrics (JSON object), created (ISO 8601)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from masks.backbones import Backbone
from masks.errors import ArtifactError

FORMAT_VERSION = "1"
METADATA_FIELDS = (
    "format",
    "task",
    "backbone",
    "backbone_sha256",
    "labels",
    "threshold",
    "input_size",
    "mean",
    "std",
    "metrics",
    "created",
)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean tensor (any shape) into a flat uint8 tensor."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_mask: a bool tensor of `shape`, on the device `bits` lives on."""
    numel = math.prod(shape)
    # Unpacking on the device with shifts keeps a cold task cheap on a GPU.
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    unpacked = (bits.reshape(-1, 1) >> shifts) & 1
    return unpacked.reshape(-1)[:numel].reshape(shape).bool()


def off_positions(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted row-major positions (int64) of the switched-off weights of a packed mask."""
    flat = np.unpackbits(bits.detach().cpu().numpy(), count=numel)
    return torch.from_numpy(np.flatnonzero(flat == 0))


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


@dataclass
class TaskArtifact:
    """Everything one task adds to the shared backbone."""

    task: str
    backbone: str
    backbone_sha256: str
    labels: list[str]
    masks: dict[str, torch.Tensor]  # param name -> packed uint8 bits
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    threshold: float
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict = field(default_factory=dict)
    bn: dict[str, torch.Tensor] = field(default_factory=dict)  # "<bn>.<suffix>" -> tensor
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def switched_off(self, name: str, numel: int) -> torch.Tensor:
        """Sorted row-major positions (int64) of the weights of `name` this task switches off.

        The engine builds a task's sparse patch from these; `numel` is the weight's size.
        """
        return off_positions(self.masks[name], numel)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"mask.{n}": b.contiguous() for n, b in self.masks.items()}
        out["head.weight"] = self.head_weight.detach().float().contiguous()
        out["head.bias"] = self.head_bias.detach().float().contiguous()
        out.update({f"bn.{n}": t.detach().float().contiguous() for n, t in self.bn.items()})
        return {k: v.cpu() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_VERSION,
            "task": self.task,
            "backbone": self.backbone,
            "backbone_sha256": self.backbone_sha256,
            "labels": json.dumps(self.labels),
            "threshold": repr(float(self.threshold)),
            "input_size": str(int(self.input_size)),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "metrics": json.dumps(self.metrics),
            "created": self.created,
        }


def to_bytes(artifact: TaskArtifact) -> bytes:
    return st_save(artifact.tensors(), metadata=artifact.metadata())


def write(artifact: TaskArtifact, path: str | Path) -> Path:
    return write_atomic(Path(path), to_bytes(artifact))


def write_atomic(path: Path, data: bytes) -> Path:
    """A temp file in the same folder, fsync, rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read(source: str | Path | bytes) -> TaskArtifact:
    """Parse an artifact and check its internal consistency (not yet against a backbone)."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else bytes(source)
    tensors, meta = _parse(data)
    artifact = _from_parts(tensors, meta)
    _check_head(artifact)
    return artifact


def _parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) < 8:
        raise ArtifactError("file", "too short to be a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise ArtifactError("file", f"header length {header_len} exceeds the file size")
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError("file", f"not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError("file", "safetensors header is not an object")
    meta = header.get("__metadata__") or {}
    return tensors, meta


def _json_field(meta: dict[str, str], name: str, kind: type):
    try:
        value = json.loads(meta[name])
    except (json.JSONDecodeError, TypeError):
        raise ArtifactError(name, "is not valid JSON") from None
    if not isinstance(value, kind):
        raise ArtifactError(name, f"must be a JSON {kind.__name__}")
    return value


def _number(meta: dict[str, str], name: str, kind: type):
    try:
        value = kind(meta[name])
    except (TypeError, ValueError):
        raise ArtifactError(name, f"must be a {kind.__name__}, got {meta[name]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ArtifactError(name, f"must be a positive number, got {meta[name]!r}")
    return value


def _from_parts(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> TaskArtifact:
    for name in METADATA_FIELDS:
        if name not in meta:
            raise ArtifactError(name, "missing from the metadata")
    if meta["format"] != FORMAT_VERSION:
        raise ArtifactError(
            "format", f"version {meta['format']!r} is not supported (expected {FORMAT_VERSION!r})"
        )
    labels = _json_field(meta, "labels", list)
    if not labels or not all(isinstance(label, str) for label in labels):
        raise ArtifactError("labels", "must be a non-empty list of strings")
    mean, std = _json_field(meta, "mean", list), _json_field(meta, "std", list)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
            raise ArtifactError(name, "must be a list of 3 numbers")
    if not all(v > 0 for v in std):
        raise ArtifactError("std", "must be positive")
    masks, bn, head = {}, {}, {}
    for key, tensor in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "mask" and name:
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise ArtifactError(key, f"must be a 1-D uint8 tensor, got {tensor.dtype}")
            masks[name] = tensor
        elif kind == "bn" and name.rpartition(".")[2] in BN_SUFFIXES:
            bn[name] = _float_tensor(key, tensor)
        elif key in ("head.weight", "head.bias"):
            head[key] = _float_tensor(key, tensor)
        else:
            raise ArtifactError(key, "unexpected tensor")
    for key in ("head.weight", "head.bias"):
        if key not in head:
            raise ArtifactError(key, "missing tensor")
    if not masks:
        raise ArtifactError("mask", "the artifact holds no masks")
    return TaskArtifact(
        task=meta["task"],
        backbone=meta["backbone"],
        backbone_sha256=meta["backbone_sha256"],
        labels=labels,
        masks=masks,
        head_weight=head["head.weight"],
        head_bias=head["head.bias"],
        threshold=_number(meta, "threshold", float),
        input_size=_number(meta, "input_size", int),
        mean=tuple(mean),
        std=tuple(std),
        metrics=_json_field(meta, "metrics", dict),
        bn=bn,
        created=meta["created"],
    )


def _float_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise ArtifactError(key, f"must be a floating-point tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ArtifactError(key, "holds non-finite values (NaN or inf)")
    return tensor.float()


def _check_head(artifact: TaskArtifact) -> None:
    weight, bias, n = artifact.head_weight, artifact.head_bias, len(artifact.labels)
    if weight.dim() != 2 or weight.shape[0] != n:
        raise ArtifactError(
            "head.weight", f"shape {tuple(weight.shape)} does not fit {n} labels ([{n}, features])"
        )
    if tuple(bias.shape) != (n,):
        raise ArtifactError("head.bias", f"shape {tuple(bias.shape)} does not fit {n} labels")


def validate(artifact: TaskArtifact, backbone: Backbone) -> None:
    """Check that the artifact was learned on exactly this backbone and fits it."""
    if artifact.backbone != backbone.name:
        raise ArtifactError(
            "backbone", f"artifact is for {artifact.backbone!r}, server runs {backbone.name!r}"
        )
    if artifact.backbone_sha256 != backbone.fingerprint:
        raise ArtifactError(
            "backbone_sha256",
            f"artifact was learned on weights {artifact.backbone_sha256[:16]}…, the loaded "
            f"backbone is {backbone.fingerprint[:16]}…",
        )
    weights = backbone.maskable()
    missing = sorted(set(weights) - set(artifact.masks))
    extra = sorted(set(artifact.masks) - set(weights))
    if missing:
        raise ArtifactError(f"mask.{missing[0]}", f"missing ({len(missing)} masks missing)")
    if extra:
        raise ArtifactError(f"mask.{extra[0]}", "no such maskable weight in the backbone")
    for name, weight in weights.items():
        expected = packed_size(weight.numel())
        if artifact.masks[name].numel() != expected:
            raise ArtifactError(
                f"mask.{name}",
                f"{artifact.masks[name].numel() * 8} bits do not fit {weight.numel()} weights "
                f"(expected {expected} bytes)",
            )
    if artifact.head_weight.shape[1] != backbone.num_features:
        raise ArtifactError(
            "head.weight",
            f"{artifact.head_weight.shape[1]} inputs, backbone gives {backbone.num_features}",
        )
    _check_bn(artifact, backbone)


def _check_bn(artifact: TaskArtifact, backbone: Backbone) -> None:
    state = backbone.module.state_dict()
    for name, tensor in artifact.bn.items():
        if name not in state or state[name].shape != tensor.shape:
            raise ArtifactError(f"bn.{name}", "does not match a BatchNorm tensor of the backbone")


def load(source: str | Path | bytes, backbone: Backbone) -> TaskArtifact:
    """read + validate against the backbone."""
    artifact = read(source)
    validate(artifact, backbone)
    return artifact
