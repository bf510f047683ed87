"""What both peers share with each other (and with our server): decode, preprocess, top-k."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from bench.fixtures import FullModel, build_full_model
from piggyback_serve.masks.backbones import resolve
from piggyback_serve.masks.data import to_tensor


def load_full_model(path: Path, backbone: str, num_features: int, n_labels: int, device: str):
    """A full fine-tuned copy from its file: architecture on meta, then the tensors."""
    model: FullModel = build_full_model(backbone, num_features, n_labels)
    model.load_state_dict(load_file(str(path), device=device), assign=True)
    return model.eval()


def preprocess(data: bytes, backbone: str, input_size: int) -> torch.Tensor:
    spec = resolve(backbone)
    return to_tensor(Image.open(io.BytesIO(data)), input_size, spec.mean, spec.std)


def top_k(probs: torch.Tensor, labels: list[str], k: int = 5) -> dict:
    scores, indices = probs.topk(min(k, len(labels)))
    return {
        "top": [
            {"label": labels[i], "index": i, "score": s}
            for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
    }


def labels_of(model_id: str, n_labels: int) -> list[str]:
    return [f"{model_id}-{i}" for i in range(n_labels)]


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())
