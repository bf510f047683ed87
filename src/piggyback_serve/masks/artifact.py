"""The task artifact: one safetensors file per task (no pickle: uploads are untrusted).

Tensors
    masks          format 2: uint8, every masked parameter's coded mask (masks/codec.py),
                   the streams concatenated in the order of the metadata table `masks`; no
                   offsets are stored: each stream's length follows from its table entry
                   (codec.coded_size). Left out when no stream has a byte (every mask
                   Elias–Fano coded, none switched off); an empty tensor reads the same.
    mask.<param>   format 1: uint8, the 0/1 mask of backbone weight <param>, flattened in
                   row-major order and bit-packed like numpy.packbits (bitorder="big": the
                   first weight is the most significant bit of byte 0; the last byte is
                   zero-padded); one per masked parameter. Format 2's bitmap coding is the same.
    head.weight    float32 [num_labels, num_features]
    head.bias      float32 [num_labels]
    bn.<name>.{weight,bias,running_mean,running_var}   optional per-task norm layers:
                   BatchNorm (all four), LayerNorm and GroupNorm (weight, bias)
Metadata (all strings)
    format ("1" or "2"), task, backbone, backbone_sha256, labels (JSON list), threshold,
    input_size, mean, std (JSON lists), metrics (JSON object), created (ISO 8601);
    optional: description (one line, at most DESCRIPTION_MAX characters: what the task
    expects as input, shown to users; absent when empty, so older files read the same);
    format 2 adds masks: JSON {coding: [[param, switched-off count, numel], ...]} listing
    every masked parameter once, codings in codec.CODINGS order (bitmap, then elias-fano;
    a coding with no parameter left out); the tensor `masks` holds the streams in that order
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from piggyback_serve.masks import codec
from piggyback_serve.masks.backbones import NORM_LAYERS, Backbone
from piggyback_serve.masks.codec import Mask
from piggyback_serve.masks.errors import ArtifactError

FORMAT_VERSION = "2"  # what the writer writes
FORMATS = ("1", "2")  # what the reader reads
NO_BYTES = np.zeros(0, dtype=np.uint8)  # format 2's tensor masks left out: no stream has a byte
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
DESCRIPTION_MAX = 200


def pack_mask(mask: torch.Tensor) -> Mask:
    """A task's mask of one parameter from its bool tensor (True = weight kept)."""
    return Mask.from_bool(mask)


unpack_mask = codec.unpack_bits


def off_positions(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted row-major positions (int64) of the switched-off weights of a packed mask."""
    return Mask(numel=numel, bits=bits).switched_off(numel)


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


@dataclass
class TaskArtifact:
    """Everything one task adds to the shared backbone."""

    task: str
    backbone: str
    backbone_sha256: str
    labels: list[str]
    masks: dict[str, Mask]  # param name -> its mask (a bare uint8 tensor: format 1's bits)
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    threshold: float
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict = field(default_factory=dict)
    bn: dict[str, torch.Tensor] = field(default_factory=dict)  # "<bn>.<suffix>" -> tensor
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    description: str = ""  # one line: what the task expects as input ("" when not given)

    def __post_init__(self):
        self.masks = {
            n: m if isinstance(m, Mask) else Mask(numel=None, bits=m) for n, m in self.masks.items()
        }

    def header(self) -> TaskArtifact:
        """This artifact's metadata alone, as `read_header` gives it (its tensors dropped)."""
        return replace(self, **_no_tensors(len(self.labels)))

    def switched_off(self, name: str, numel: int) -> torch.Tensor:
        """Sorted row-major positions (int64) of the weights of `name` this task switches off.

        The engine builds a task's sparse patch from these; `numel` is the weight's size.
        Positions-coded masks (format 2) return their decoded positions as they are.
        """
        return self.masks[name].switched_off(numel)

    def mask(self, name: str, shape: torch.Size | tuple[int, ...], device=None) -> torch.Tensor:
        """The mask of `name` as a bool tensor of `shape` (True = weight kept)."""
        return self.masks[name].dense(shape, device)

    def parts(self, version: str = FORMAT_VERSION) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of the file in format `version` ("1" or "2")."""
        if version not in FORMATS:
            raise ValueError(f"format {version!r}: choose one of {', '.join(FORMATS)}")
        out, meta = {}, self._metadata(version)
        if version == "1":
            out = {f"mask.{n}": _bitmap(m) for n, m in self.masks.items()}
        else:
            table, streams = _coded(self.masks)
            meta["masks"] = json.dumps(table, separators=(",", ":"))
            if streams.size:
                out["masks"] = torch.from_numpy(streams)
        out["head.weight"] = self.head_weight.detach().float().contiguous()
        out["head.bias"] = self.head_bias.detach().float().contiguous()
        out.update({f"bn.{n}": t.detach().float().contiguous() for n, t in self.bn.items()})
        return {k: v.cpu().contiguous() for k, v in out.items()}, meta

    def tensors(self, version: str = FORMAT_VERSION) -> dict[str, torch.Tensor]:
        return self.parts(version)[0]

    def metadata(self, version: str = FORMAT_VERSION) -> dict[str, str]:
        return self.parts(version)[1]

    def _metadata(self, version: str) -> dict[str, str]:
        return {
            "format": version,
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
        } | ({"description": self.description} if self.description else {})


def _coded(masks: dict[str, Mask]) -> tuple[dict[str, list], np.ndarray]:
    """Format 2's masks table and its streams, concatenated in the table's order.

    Parameters sorted by name: the same task makes the same file, whatever order its masks
    were read in (a format-1 file's tensors come back in no fixed order).
    """
    by_coding = {coding: [] for coding in codec.CODINGS}
    for name, mask in sorted(masks.items()):
        coding, count, stream = mask.coded()
        by_coding[coding].append(([name, count, mask.numel], stream))
    table = {coding: [entry for entry, _ in rows] for coding, rows in by_coding.items() if rows}
    streams = [stream for rows in by_coding.values() for _, stream in rows]
    return table, np.concatenate([NO_BYTES, *streams])


def _bitmap(mask: Mask) -> torch.Tensor:
    if mask.bits is not None:
        return mask.bits
    return torch.from_numpy(mask.coded(codec.BITMAP)[2])


def to_bytes(artifact: TaskArtifact, version: str = FORMAT_VERSION) -> bytes:
    """The artifact as a file of format `version`; format 2 needs every mask's size."""
    try:
        tensors, meta = artifact.parts(version)
    except ValueError as exc:
        raise ArtifactError("mask", str(exc)) from None
    return st_save(tensors, metadata=meta)


def write(artifact: TaskArtifact, path: str | Path, version: str = FORMAT_VERSION) -> Path:
    return write_atomic(Path(path), to_bytes(artifact, version))


def write_atomic(path: Path, data: bytes, tag: str = "") -> Path:
    """A temp file in the same folder (`.NAME.<tag>XXXX.tmp`), fsync, rename: readers see
    the old or the new file; the temp file goes on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}", suffix=".tmp")
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


def read_metadata(data: bytes) -> dict[str, str]:
    """The file's metadata strings as stored (format 2's masks table included)."""
    return _parse(data)[1]


def read_header(data: bytes) -> TaskArtifact:
    """The artifact's metadata alone, checked, from the safetensors header: no tensor is
    decoded. What listing a task and preparing its input need; masks and norms are left
    empty and the head tensors have no columns (`read` or `load` checks the rest)."""
    header = _header(data)
    entries = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    fields = _metadata_fields(header.get("__metadata__") or {})
    n = len(fields["labels"])
    shape = entries.get("head.weight", {}).get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or shape[0] != n:
        raise ArtifactError("head.weight", f"shape {shape} does not fit {n} labels")
    return TaskArtifact(**fields, **_no_tensors(n))


def _no_tensors(labels: int) -> dict:
    """A metadata-only artifact's tensor fields: no masks or norms, a head without columns."""
    return dict(masks={}, bn={}, head_weight=torch.empty(labels, 0), head_bias=torch.empty(labels))


def check_backbone(artifact: TaskArtifact, backbone: Backbone) -> None:
    """The artifact names this backbone and was learned on exactly its weights."""
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


NOT_AN_ARTIFACT = "not a safetensors task artifact (the file `piggy-masks train` writes)"


def _parse(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header = _header(data)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ArtifactError("file", f"{NOT_AN_ARTIFACT}{_looks_like(data)} ({exc})") from None
    return tensors, header.get("__metadata__") or {}


def _header(data: bytes) -> dict:
    """The safetensors header as a JSON object (tensors' entries and `__metadata__`)."""
    # Anything else uploaded by mistake (an image, a torch.save zip) fails here: say so first,
    # the safetensors detail after it.
    if len(data) < 8:
        raise ArtifactError("file", f"{NOT_AN_ARTIFACT} ({len(data)} bytes is too short)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise ArtifactError(
            "file",
            f"{NOT_AN_ARTIFACT}{_looks_like(data)} (header length {header_len:,} exceeds "
            f"the file's {len(data):,} bytes)",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError("file", f"{NOT_AN_ARTIFACT}{_looks_like(data)} ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError("file", f"{NOT_AN_ARTIFACT} (its header is not a JSON object)")
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise ArtifactError("file", f"{NOT_AN_ARTIFACT} (its metadata is not a JSON object)")
    return header


_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"PK\x03\x04": "a zip file (torch.save writes these)",
    b"\x80": "a pickle",
    b"\x1f\x8b": "a gzip file",
}


def _looks_like(data: bytes) -> str:
    """'; this looks like a PNG image' when the first bytes say what the file is instead."""
    if data[8:9] == b"{":  # a safetensors header's opening brace: damaged, not foreign
        return ""
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            return f"; this looks like {what}"
    return ""


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
    fields = _metadata_fields(meta)
    streams, bn, head = {}, {}, {}
    for key, tensor in tensors.items():
        kind, _, name = key.partition(".")
        if _is_mask_tensor(key, meta["format"]):
            if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                raise ArtifactError(key, f"must be a 1-D uint8 tensor, got {tensor.dtype}")
            streams[key] = tensor
        elif kind == "bn" and name.rpartition(".")[2] in BN_SUFFIXES:
            bn[name] = _float_tensor(key, tensor)
        elif key in ("head.weight", "head.bias"):
            head[key] = _float_tensor(key, tensor)
        else:
            raise ArtifactError(key, "unexpected tensor")
    for key in ("head.weight", "head.bias"):
        if key not in head:
            raise ArtifactError(key, "missing tensor")
    if meta["format"] == "1":
        masks = {key.removeprefix("mask."): Mask(numel=None, bits=t) for key, t in streams.items()}
    else:
        masks = _coded_masks(meta, streams.get("masks"))
    if not masks:
        raise ArtifactError("mask", "the artifact holds no masks")
    return TaskArtifact(
        **fields, masks=masks, head_weight=head["head.weight"], head_bias=head["head.bias"], bn=bn
    )


def _metadata_fields(meta: dict[str, str]) -> dict:
    """The TaskArtifact fields the metadata holds, checked."""
    for name in METADATA_FIELDS:
        if name not in meta:
            raise ArtifactError(name, "missing from the metadata")
        if not isinstance(meta[name], str):
            raise ArtifactError(name, "must be a string in the metadata")
    if meta["format"] not in FORMATS:
        raise ArtifactError(
            "format", f"version {meta['format']!r} is not supported (reads {', '.join(FORMATS)})"
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
    return dict(
        task=meta["task"],
        backbone=meta["backbone"],
        backbone_sha256=meta["backbone_sha256"],
        labels=labels,
        threshold=_number(meta, "threshold", float),
        input_size=_number(meta, "input_size", int),
        mean=tuple(mean),
        std=tuple(std),
        metrics=_json_field(meta, "metrics", dict),
        created=meta["created"],
        description=_description(meta),
    )


def check_description(text: str) -> str:
    """A task's description as artifacts store it: one line, at most DESCRIPTION_MAX chars."""
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise ArtifactError("description", "must be one line")
    if len(text) > DESCRIPTION_MAX:
        raise ArtifactError("description", f"must be at most {DESCRIPTION_MAX} characters")
    return text


def _description(meta: dict[str, str]) -> str:
    value = meta.get("description", "")
    if not isinstance(value, str):
        raise ArtifactError("description", "must be a string")
    return check_description(value)


def _is_mask_tensor(key: str, version: str) -> bool:
    """Format 1: a tensor mask.<param> per parameter; format 2: the one tensor masks."""
    if version == "1":
        return key.startswith("mask.") and key != "mask."
    return key == "masks"


def _coded_masks(meta: dict[str, str], streams: torch.Tensor | None) -> dict[str, Mask]:
    """Format 2: every parameter listed in `masks`, its stream cut from the tensor and decoded.

    The streams' lengths come from the table and are checked against the tensor's real
    length before anything is decoded: a lying table cannot make the reader allocate more.
    """
    entries = _mask_table(meta)
    sizes = [codec.coded_size(coding, count, numel) for _, coding, count, numel in entries]
    streams = torch.from_numpy(NO_BYTES) if streams is None else streams
    _check_length(streams.numel(), sum(sizes))
    masks, start = {}, 0
    for (name, coding, count, numel), size in zip(entries, sizes, strict=True):
        stream, start = streams[start : start + size], start + size
        try:
            off = codec.decode(coding, stream.numpy(), count, numel)
        except codec.CodingError as exc:
            raise ArtifactError(f"mask.{name}", str(exc)) from None
        bits = stream if coding == codec.BITMAP else None
        masks[name] = Mask(numel=numel, bits=bits, off=torch.from_numpy(off))
    return masks


def _check_length(actual: int, needed: int) -> None:
    if actual < needed:
        raise ArtifactError(
            "masks", f"tensor of {actual} bytes, the table needs {needed}: truncated"
        )
    if actual > needed:
        raise ArtifactError("masks", f"tensor has {actual - needed} bytes past the last mask")


def _mask_table(meta: dict[str, str]) -> list[tuple[str, str, int, int]]:
    """Format 2's masks table as (param, coding, count, numel) in stream order, each checked."""
    if "masks" not in meta:
        raise ArtifactError("masks", "missing from the metadata")
    table = _json_field(meta, "masks", dict)
    for coding, entries in table.items():
        if coding not in codec.CODINGS:
            known = ", ".join(codec.CODINGS)
            raise ArtifactError("masks", f"unknown coding {coding!r} (known: {known})")
        if not isinstance(entries, list):
            raise ArtifactError("masks", f"{coding} must list [param, count, numel] entries")
    listed = {}
    for coding in codec.CODINGS:
        for entry in table.get(coding, []):
            name, count, numel = _mask_entry(entry)
            if name in listed:
                raise ArtifactError(f"mask.{name}", "listed twice in masks")
            listed[name] = (name, coding, count, numel)
    return list(listed.values())


def _mask_entry(entry) -> tuple[str, int, int]:
    """[param, count, numel] from format 2's masks table, each checked."""
    if not isinstance(entry, list) or len(entry) != 3 or not isinstance(entry[0], str):
        raise ArtifactError("masks", f"entry must be [param, count, numel], got {entry!r}")
    name, count, numel = entry
    field = f"mask.{name}"
    if type(numel) is not int or numel < 1:
        raise ArtifactError(field, f"numel must be a positive integer, got {numel!r}")
    if type(count) is not int or not 0 <= count <= numel:
        raise ArtifactError(field, f"count must be an integer in 0..{numel}, got {count!r}")
    return name, count, numel


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
    """Check that the artifact was learned on exactly this backbone and fits it.

    Format-1 bitmaps learn their parameter's size here (the file cannot say it exactly).
    """
    check_backbone(artifact, backbone)
    weights = backbone.maskable()
    missing = sorted(set(weights) - set(artifact.masks))
    extra = sorted(set(artifact.masks) - set(weights))
    if missing:
        raise ArtifactError(f"mask.{missing[0]}", f"missing ({len(missing)} masks missing)")
    if extra:
        raise ArtifactError(f"mask.{extra[0]}", "no such maskable weight in the backbone")
    for name, weight in weights.items():
        artifact.masks[name] = _sized(name, artifact.masks[name], weight.numel())
    if artifact.head_weight.shape[1] != backbone.num_features:
        raise ArtifactError(
            "head.weight",
            f"{artifact.head_weight.shape[1]} inputs, backbone gives {backbone.num_features}",
        )
    _check_bn(artifact, backbone)


def _sized(name: str, mask: Mask, numel: int) -> Mask:
    """The mask, checked to cover `numel` weights; a format-1 bitmap learns its size here."""
    if mask.numel is None:
        expected = packed_size(numel)
        if mask.bits.numel() != expected:
            raise ArtifactError(
                f"mask.{name}",
                f"{mask.bits.numel() * 8} bits do not fit {numel} weights "
                f"(expected {expected} bytes)",
            )
        return mask.sized(numel)
    if mask.numel != numel:
        raise ArtifactError(
            f"mask.{name}", f"codes {mask.numel} weights, the backbone's parameter has {numel}"
        )
    return mask


def _check_bn(artifact: TaskArtifact, backbone: Backbone) -> None:
    if not artifact.bn:
        return  # the state dict costs more than decoding a task's masks
    state = backbone.module.state_dict()
    norms = {n for n, m in backbone.module.named_modules() if isinstance(m, NORM_LAYERS)}
    for name, tensor in artifact.bn.items():
        layer = name.rpartition(".")[0]
        if layer not in norms or name not in state or state[name].shape != tensor.shape:
            raise ArtifactError(
                f"bn.{name}",
                "does not match a norm tensor (BatchNorm, LayerNorm, GroupNorm) of the backbone",
            )


def load(source: str | Path | bytes, backbone: Backbone) -> TaskArtifact:
    """read + validate against the backbone."""
    artifact = read(source)
    validate(artifact, backbone)
    return artifact
