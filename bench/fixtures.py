"""Synthetic tasks, test images and full fine-tuned copies for the benchmarks.

The synthetic tasks switch off about 1 weight in 8 at random: the artifacts are byte for
byte the format real tasks use, and, since a task switch costs in proportion to the
weights a task switches off, they are heavier to switch than the demo tasks (which switch
off 0.04-1.2%, accuracy.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks import inference
from piggyback_serve.masks.artifact import TaskArtifact, packed_size
from piggyback_serve.masks.backbones import Backbone, load_backbone, resolve
from piggyback_serve.masks.codec import Mask
from piggyback_serve.masks.data import to_tensor

N_LABELS = 10


@dataclass(frozen=True)
class Config:
    """One benchmarked backbone: name, weights, input size, batch, concurrent clients."""

    backbone: str
    weights: str | None  # None: the real pretrained weights; "random": seeded init
    input_size: int
    batch: int
    clients: int

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.input_size}px b{self.batch}"


def backbone_for(config: Config) -> Backbone:
    return load_backbone(config.backbone, config.weights)


def task_name(i: int) -> str:
    return f"t{i:04d}"


def random_bits(numel: int, rng: np.random.Generator) -> torch.Tensor:
    """Packed mask bytes with ~87.5% of the bits set (masks are nearly dense in practice)."""
    n = packed_size(numel)
    a, b, c = (np.frombuffer(rng.bytes(n), dtype=np.uint8) for _ in range(3))
    return torch.from_numpy(a | b | c)


def make_artifact(backbone: Backbone, name: str, seed: int, input_size: int) -> TaskArtifact:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    masks = {
        n: Mask(w.numel(), bits=random_bits(w.numel(), rng)) for n, w in backbone.maskable().items()
    }
    head = torch.randn(N_LABELS, backbone.num_features, generator=g) / backbone.num_features**0.5
    return TaskArtifact(
        task=name,
        backbone=backbone.name,
        backbone_sha256=backbone.fingerprint,
        labels=[f"{name}-{i}" for i in range(N_LABELS)],
        masks=masks,
        head_weight=head,
        head_bias=torch.zeros(N_LABELS),
        threshold=5e-3,
        input_size=input_size,
        mean=backbone.mean,
        std=backbone.std,
        metrics={"accuracy": 0.0, "sparsity": 0.125, "dataset": "synthetic"},
    )


def write_registry(folder: Path, backbone: Backbone, n: int, input_size: int) -> list[str]:
    """`n` distinct synthetic tasks as NAME.safetensors in `folder`; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [task_name(i) for i in range(n)]
    for i, name in enumerate(names):
        path = folder / f"{name}.safetensors"
        if not path.exists():  # a scratch folder: no need for write_atomic's fsync
            path.write_bytes(artifacts.to_bytes(make_artifact(backbone, name, i, input_size)))
    return names


def ideal_task_bytes(backbone: Backbone, n_labels: int = N_LABELS) -> int:
    """What a task must carry at least: one bit per masked weight, plus a float32 head."""
    bits = sum(packed_size(w.numel()) for w in backbone.maskable().values())
    return bits + 4 * (n_labels * backbone.num_features + n_labels)


# ---------------------------------------------------------------------------------------
# Images


def _photos() -> list[np.ndarray]:
    try:
        from skimage import data

        return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except Exception:  # noqa: BLE001 - any sample missing: synthetic gradients will do
        ramp = np.linspace(0, 255, 256, dtype=np.uint8)
        return [np.stack([np.add.outer(ramp, ramp * k).astype(np.uint8)] * 3, -1) for k in (1, 2)]


def jpegs(size: int, n: int = 4) -> list[bytes]:
    """Natural photos resized to `size` px, JPEG quality 90: what a client would send."""
    out = []
    for i in range(n):
        photo = Image.fromarray(_photos()[i % len(_photos())]).convert("RGB")
        buf = io.BytesIO()
        photo.resize((size, size), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def tensor_batch(images: list[bytes], backbone: Backbone, size: int, batch: int) -> torch.Tensor:
    """The same images preprocessed exactly as the server does, stacked to `batch`."""
    tensors = [
        to_tensor(Image.open(io.BytesIO(b)), size, backbone.mean, backbone.std) for b in images
    ]
    return torch.stack([tensors[i % len(tensors)] for i in range(batch)])


# ---------------------------------------------------------------------------------------
# The peer's full fine-tuned copies


class FullModel(nn.Module):
    """A task as users ship it today: the whole network, fine-tuned, plus its head."""

    def __init__(self, backbone: nn.Module, num_features: int, n_labels: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_full_model(backbone_name: str, num_features: int, n_labels: int) -> FullModel:
    """The architecture on the meta device (no init cost); load weights with assign=True."""
    spec = resolve(backbone_name)
    with torch.device("meta"):
        net = spec.build()
        spec.strip(net)
        return FullModel(net, num_features, n_labels)


def full_state_dict(art: TaskArtifact, backbone: Backbone) -> dict[str, torch.Tensor]:
    """The fine-tuned copy equivalent to a task: every backbone tensor, masked, plus head."""
    params = inference.materialise(art, backbone, "cpu", torch.float32)
    state = {f"backbone.{k}": v for k, v in backbone.module.state_dict().items()}
    for name, tensor in params.items():
        key = name if name in inference.TASK_HEAD else f"backbone.{name}"
        state[key] = tensor
    return {k: v.contiguous() for k, v in state.items()}


def write_full_models(folder: Path, backbone: Backbone, n: int, input_size: int) -> int:
    """One full copy per task (same masks and heads as the artifacts); bytes per copy."""
    folder.mkdir(parents=True, exist_ok=True)
    size = 0
    for i in range(n):
        path = folder / f"{task_name(i)}.safetensors"
        if not path.exists():
            art = make_artifact(backbone, task_name(i), seed=i, input_size=input_size)
            save_file(full_state_dict(art, backbone), str(path))
        size = path.stat().st_size
    return size


PHONE = (4032, 3024)


def photo_jpegs() -> list[bytes]:
    """The natural photos at their own sizes (451x300 to 640x427), JPEG quality 90."""
    return [_jpeg(Image.fromarray(p).convert("RGB")) for p in _photos()]


def phone_jpegs(n: int = 4) -> list[bytes]:
    """Phone-camera photos: the natural photos upscaled to 4032x3024, JPEG quality 90. Made
    at run time (megabytes each), never stored."""
    photos = _photos()
    return [
        _jpeg(Image.fromarray(photos[i % len(photos)]).convert("RGB").resize(PHONE))
        for i in range(n)
    ]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
