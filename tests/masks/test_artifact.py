import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save

from masks import artifact
from masks.errors import ArtifactError
from masks.layers import PiggybackModel


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (13,), (3, 5, 7), (1000003,)])
def test_pack_round_trip_any_size(shape):
    mask = torch.rand(shape) < 0.5
    bits = artifact.pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(artifact.unpack_mask(bits, shape), mask)


def test_packing_is_numpy_packbits_order():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    bits = artifact.pack_mask(mask)
    assert bits.tolist() == [0b10000001, 0b10000000]
    assert bits.tolist() == np.packbits(mask.numpy()).tolist()


def make_artifact(backbone, labels=("a", "b", "c"), train_bn=False) -> artifact.TaskArtifact:
    model = PiggybackModel(backbone, len(labels), train_bn=train_bn)
    with torch.no_grad():
        for s in model.scores.values():
            s.copy_(torch.where(torch.rand_like(s) < 0.2, 0.0, 1e-2))
    return artifact.TaskArtifact(
        task="t",
        backbone=backbone.name,
        backbone_sha256=backbone.fingerprint,
        labels=list(labels),
        masks={n: artifact.pack_mask(m) for n, m in model.masks().items()},
        head_weight=model.head.weight.detach(),
        head_bias=model.head.bias.detach(),
        threshold=5e-3,
        input_size=64,
        mean=backbone.mean,
        std=backbone.std,
        bn=model.bn_state(),
        metrics={"accuracy": 0.5, "sparsity": model.sparsity()},
    )


@pytest.fixture(scope="module")
def good(lite0):
    return make_artifact(lite0)


def test_write_read_round_trip(tmp_path, good, lite0):
    path = artifact.write(good, tmp_path / "t.safetensors")
    back = artifact.load(path, lite0)
    assert back.metadata() == good.metadata()
    assert back.masks.keys() == good.masks.keys()
    for name, bits in good.masks.items():
        assert torch.equal(back.masks[name], bits)
    assert torch.equal(back.head_weight, good.head_weight.float())
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write cleaned up


def test_per_task_batchnorm_travels_in_the_artifact(lite0):
    art = make_artifact(lite0, train_bn=True)
    back = artifact.load(artifact.to_bytes(art), lite0)
    assert len(back.bn) == 4 * sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in lite0.module.modules()
    )
    assert all(torch.equal(back.bn[k], v.float()) for k, v in art.bn.items())


def test_size_is_masks_over_eight_plus_head_plus_metadata(good, lite0):
    data = artifact.to_bytes(good)
    header = 8 + int.from_bytes(data[:8], "little")
    masked = sum(w.numel() for w in lite0.maskable().values())
    head = (good.head_weight.numel() + good.head_bias.numel()) * 4
    assert len(data) <= 1.01 * (masked / 8 + head) + header


def _retensor(art, **changes):
    tensors, meta = art.tensors(), art.metadata()
    for key, value in changes.items():
        if key.startswith("meta:"):
            meta[key[5:]] = value
        elif value is None:
            del tensors[key]
        else:
            tensors[key] = value
    return save(tensors, metadata=meta)


def _corruptions(good, lite0):
    first = next(iter(lite0.maskable()))
    n = len(good.labels)
    return {
        "format": _retensor(good, **{"meta:format": "99"}),
        "backbone_sha256": _retensor(good, **{"meta:backbone_sha256": "0" * 64}),
        "backbone": _retensor(good, **{"meta:backbone": "resnet50"}),
        f"mask.{first}": _retensor(good, **{f"mask.{first}": good.masks[first][:-1].clone()}),
        "mask.missing": _retensor(good, **{f"mask.{first}": None}),
        "mask.extra.weight": _retensor(
            good, **{"mask.extra.weight": torch.zeros(4, dtype=torch.uint8)}
        ),
        "head.weight": _retensor(good, **{"head.weight": torch.zeros(n + 1, lite0.num_features)}),
        "head.bias": _retensor(good, **{"head.bias": torch.zeros(n + 2)}),
        "head.weight.nan": _retensor(
            good, **{"head.weight": torch.full((n, lite0.num_features), float("nan"))}
        ),
        "head.bias.missing": _retensor(good, **{"head.bias": None}),
        "surprise": _retensor(good, surprise=torch.zeros(1)),
        "labels": _retensor(good, **{"meta:labels": "[not json"}),
        "labels.empty": _retensor(good, **{"meta:labels": "[]"}),
        "metrics": _retensor(good, **{"meta:metrics": "[]"}),
        "input_size": _retensor(good, **{"meta:input_size": "-3"}),
        "mask.dtype": _retensor(good, **{f"mask.{first}": good.masks[first].float()}),
    }


EXPECTED_FIELD = {
    "mask.missing": "mask.",
    "mask.extra.weight": "mask.extra.weight",
    "head.weight.nan": "head.weight",
    "head.bias.missing": "head.bias",
    "labels.empty": "labels",
    "mask.dtype": "mask.",
}


def test_every_corruption_is_rejected_naming_the_field(good, lite0):
    for case, data in _corruptions(good, lite0).items():
        with pytest.raises(ArtifactError) as err:
            artifact.load(data, lite0)
        expected = EXPECTED_FIELD.get(case, case)
        assert err.value.field.startswith(expected), (case, str(err.value))
        assert expected.rstrip(".") in str(err.value)


def test_truncated_and_garbage_files_are_rejected(good, lite0):
    data = artifact.to_bytes(good)
    bad = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "lying header": (10**9).to_bytes(8, "little") + data[8:],
        "pickle": b"\x80\x04\x95" + b"\x00" * 64,
        "zip": b"PK\x03\x04" + b"\x00" * 64,
        "header not json": (5).to_bytes(8, "little") + b"nope!" + b"\x00" * 8,
    }
    for case, blob in bad.items():
        with pytest.raises(ArtifactError) as err:
            artifact.read(blob)
        assert err.value.field == "file", case


def test_missing_metadata_field_is_named(good):
    tensors, meta = good.tensors(), good.metadata()
    del meta["threshold"]
    with pytest.raises(ArtifactError, match="threshold"):
        artifact.read(save(tensors, metadata=meta))
    assert json.loads(good.metadata()["labels"]) == ["a", "b", "c"]
