import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save

from piggyback_serve.masks import artifact, codec, inference
from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.masks.layers import PiggybackModel


@pytest.mark.parametrize("shape", [(1,), (7,), (9,), (13,), (3, 5, 7), (1000003,)])
def test_pack_round_trip_any_size(shape):
    mask = torch.rand(shape) < 0.5
    bits = artifact.pack_mask(mask).bits
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(artifact.unpack_mask(bits, shape), mask)


def test_packing_is_numpy_packbits_order():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    bits = artifact.pack_mask(mask).bits
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


def _same_masks(a, b, backbone) -> bool:
    return all(
        torch.equal(a.switched_off(n, w.numel()), b.switched_off(n, w.numel()))
        and torch.equal(a.mask(n, w.shape), b.mask(n, w.shape))
        for n, w in backbone.maskable().items()
    )


def test_write_read_round_trip(tmp_path, good, lite0):
    path = artifact.write(good, tmp_path / "t.safetensors")
    back = artifact.load(path, lite0)
    assert json.loads(back.metadata()["format"]) == 2
    assert back.metadata() == good.metadata()
    assert back.masks.keys() == good.masks.keys()
    assert _same_masks(back, good, lite0)
    assert torch.equal(back.head_weight, good.head_weight.float())
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write cleaned up


def test_format_1_reads_and_answers_the_same_as_format_2(good, lite0):
    one, two = artifact.to_bytes(good, "1"), artifact.to_bytes(good)
    assert artifact.read(one).metadata("1")["format"] == "1"
    from_one, from_two = artifact.load(one, lite0), artifact.load(two, lite0)
    assert _same_masks(from_one, from_two, lite0)
    params_one = inference.materialise(from_one, lite0)
    params_two = inference.materialise(from_two, lite0)
    assert params_one.keys() == params_two.keys()
    assert all(torch.equal(params_one[k], params_two[k]) for k in params_one)
    # and back: format 2 -> format 1 is the file format 1's writer made (safetensors orders
    # the metadata keys differently from call to call, so compare parsed)
    back = artifact.to_bytes(from_two, "1")
    assert _header(back) == _header(one) and len(back) == len(one)
    assert back[-1000:] == one[-1000:]


def _header(data: bytes) -> dict:
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_format_2_codes_each_mask_the_smaller_way(lite0):
    art = make_artifact(lite0)
    names = list(art.masks)
    art.masks[names[0]] = artifact.pack_mask(torch.ones(art.masks[names[0]].numel, dtype=bool))
    art.masks[names[1]] = artifact.pack_mask(torch.rand(art.masks[names[1]].numel) < 0.5)
    table = json.loads(art.metadata()["masks"])
    assert list(table) == [codec.BITMAP, codec.ELIAS_FANO]  # the streams' order
    assert [e[0] for e in table[codec.BITMAP]] == [names[1]]  # half off: the bitmap is smaller
    elias_fano = {name: (count, numel) for name, count, numel in table[codec.ELIAS_FANO]}
    assert elias_fano[names[0]][0] == 0 and names[2] in elias_fano  # none and 20% off
    tensors = art.tensors()
    assert not [k for k in tensors if k.startswith(("mask.", "off."))]
    sizes = [codec.coded_size(c, n, u) for c, entries in table.items() for _, n, u in entries]
    assert tensors["masks"].numel() == sum(sizes)
    bitmap = art.masks[names[1]].bits
    assert torch.equal(tensors["masks"][: bitmap.numel()], bitmap)  # the bitmaps come first
    reordered = replace(art, masks=dict(reversed(art.masks.items())))
    assert reordered.metadata() == art.metadata()  # sorted by name: the same task, the same file
    assert torch.equal(reordered.tensors()["masks"], tensors["masks"])
    back = artifact.load(artifact.to_bytes(art), lite0)
    assert back.switched_off(names[0], art.masks[names[0]].numel).numel() == 0
    assert _same_masks(back, art, lite0)


def test_format_2_without_a_stream_leaves_the_tensor_out_and_reads_an_empty_one(lite0):
    art = make_artifact(lite0)
    art.masks = {
        n: artifact.pack_mask(torch.ones(m.numel, dtype=bool)) for n, m in art.masks.items()
    }
    assert "masks" not in art.tensors()
    empty = _retensor(art, "2", masks=torch.zeros(0, dtype=torch.uint8))
    for data in (artifact.to_bytes(art), empty):
        back = artifact.load(data, lite0)
        assert all(back.switched_off(n, m.numel).numel() == 0 for n, m in art.masks.items())


def test_positions_come_back_without_a_bitmap(good, lite0):
    back = artifact.read(artifact.to_bytes(good))
    name = next(iter(back.masks))
    numel = lite0.maskable()[name].numel()
    assert back.masks[name].bits is None  # elias-fano at 20% off
    assert back.switched_off(name, numel) is back.switched_off(name, numel)


def test_per_task_batchnorm_travels_in_the_artifact(lite0):
    art = make_artifact(lite0, train_bn=True)
    back = artifact.load(artifact.to_bytes(art), lite0)
    assert len(back.bn) == 4 * sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in lite0.module.modules()
    )
    assert all(torch.equal(back.bn[k], v.float()) for k, v in art.bn.items())


def test_size_is_the_coded_masks_plus_head_plus_metadata(good, lite0):
    data = artifact.to_bytes(good)
    header = 8 + int.from_bytes(data[:8], "little")
    masked = sum(w.numel() for w in lite0.maskable().values())
    head = (good.head_weight.numel() + good.head_bias.numel()) * 4
    coded = 0
    for mask in good.masks.values():
        count = mask.switched_off(mask.numel).numel()
        coded += min(codec.coded_size(c, count, mask.numel) for c in codec.CODINGS)
    assert len(data) == coded + head + header
    # 20% switched off: Elias–Fano takes 2 + log2(5) = 4.3 bits per switched-off weight
    assert coded < 0.2 * masked * 4.4 / 8 < masked / 8
    assert len(artifact.to_bytes(good, "1")) <= 1.01 * (masked / 8 + head) + header


def _retensor(art, version="1", **changes):
    tensors, meta = art.parts(version)
    for key, value in changes.items():
        if key.startswith("meta:") and value is None:
            del meta[key[5:]]
        elif key.startswith("meta:"):
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
        f"mask.{first}": _retensor(good, **{f"mask.{first}": good.masks[first].bits[:-1].clone()}),
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
        "mask.dtype": _retensor(good, **{f"mask.{first}": good.masks[first].bits.float()}),
    }


def _format_2_corruptions(good, lite0):
    """Format 2's own ways to be wrong; a v2 case names mask.<first> unless EXPECTED_FIELD."""
    first = min(lite0.maskable())  # the writer sorts by name: its stream opens the tensor
    numel = lite0.maskable()[first].numel()
    off = good.masks[first].switched_off(numel).numpy()
    tensors, meta = good.parts("2")
    entries = json.loads(meta["masks"])[codec.ELIAS_FANO]
    assert json.loads(meta["masks"]) == {codec.ELIAS_FANO: entries}  # 20% off: all positions
    assert entries[0] == [first, off.size, numel]  # so first's stream opens the tensor
    streams = tensors["masks"]
    size = codec.coded_size(codec.ELIAS_FANO, off.size, numel)

    def table(value):
        return _retensor(good, "2", **{"meta:masks": json.dumps(value)})

    def entry(value, **tensors):
        value = {codec.ELIAS_FANO: [value, *entries[1:]]}
        return _retensor(good, "2", **{"meta:masks": json.dumps(value)}, **tensors)

    def first_stream(stream):
        return _retensor(good, "2", masks=torch.cat([stream, streams[size:]]))

    low = codec.low_bits(off.size, numel)
    past_the_end = (((numel - 1) >> low) + 1) << low  # still fits the stream's length
    repeated = off.copy()
    repeated[1] = repeated[0]
    return {
        "masks truncated": _retensor(good, "2", masks=streams[:-1].clone()),
        "masks longer": _retensor(good, "2", masks=torch.cat([streams, streams[:1]])),
        "masks tensor missing": _retensor(good, "2", masks=None),
        "masks count lies": entry([first, off.size // 2, numel]),  # streams no longer fit
        "masks bomb": entry([first, 10**14, 10**15]),
        "masks unknown coding": table({"zstd": entries}),
        "masks coding not a list": table({codec.ELIAS_FANO: {first: [off.size, numel]}}),
        "masks entry shape": entry({"coding": "elias-fano"}),
        "masks entry name": entry([7, off.size, numel]),
        "v2 count": first_stream(_one_more(streams[:size].numpy(), off.size, numel)),
        "v2 count past numel": entry([first, numel + 1, numel]),
        "v2 count not int": entry([first, float(off.size), numel]),
        "v2 numel": entry([first, 0, numel - 1], masks=streams[size:].clone()),
        "v2 listed twice": table({codec.ELIAS_FANO: [*entries, entries[0]]}),
        "v2 listed under both codings": table(
            {codec.BITMAP: [[first, off.size, numel]], codec.ELIAS_FANO: entries}
        ),
        "v2 out of range": first_stream(_ef(off, numel, past_the_end)),
        "v2 repeated": first_stream(_ef_unsorted(repeated, numel)),
        "v2 unsorted": first_stream(_ef_unsorted(_swap_in_bucket(off, low), numel)),
        "v2 format 1's tensor": _retensor(good, "2", **{f"mask.{first}": good.masks[first].bits}),
        "masks": _retensor(good, "2", **{"meta:masks": "{not json"}),
        "masks not an object": table(["not", "an", "object"]),
        "masks metadata missing": _retensor(good, "2", **{"meta:masks": None}),
        "masks in format 1": _retensor(good, "1", masks=streams),
        "off.extra.weight": _retensor(
            good, "2", **{"off.extra.weight": torch.zeros(4, dtype=torch.uint8)}
        ),
    }


def _one_more(stream, count, numel):
    """An Elias–Fano stream with one more high bit set: it decodes to count + 1 positions."""
    low_bytes = (count * codec.low_bits(count, numel) + 7) // 8
    high = np.unpackbits(stream[low_bytes:])
    high[np.flatnonzero(high == 0)[0]] = 1
    return torch.from_numpy(np.concatenate([stream[:low_bytes], np.packbits(high)]))


def _ef(off, numel, last):
    bad = off.copy()
    bad[-1] = last
    return _ef_unsorted(bad, numel)


def _ef_unsorted(off, numel):
    """Elias–Fano of positions that need not be sorted (the coder does not check)."""
    return torch.from_numpy(codec.encode(codec.ELIAS_FANO, off, numel))


def _swap_in_bucket(off, low):
    """Two neighbours sharing their high part swapped: the stream decodes out of order."""
    bad = off.copy()
    i = next(i for i in range(off.size - 1) if off[i] >> low == off[i + 1] >> low)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return bad


EXPECTED_FIELD = {
    "mask.missing": "mask.",
    "mask.extra.weight": "mask.extra.weight",
    "head.weight.nan": "head.weight",
    "head.bias.missing": "head.bias",
    "labels.empty": "labels",
    "mask.dtype": "mask.",
}


def test_every_corruption_is_rejected_naming_the_field(good, lite0):
    first = min(lite0.maskable())  # the parameter _format_2_corruptions spoils
    cases = _corruptions(good, lite0) | _format_2_corruptions(good, lite0)
    for case, data in cases.items():
        with pytest.raises(ArtifactError) as err:
            artifact.load(data, lite0)
        default = f"mask.{first}" if case.startswith("v2") else case.split()[0]
        expected = EXPECTED_FIELD.get(case, default)
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
        assert str(err.value).startswith("file: not a safetensors task artifact"), case


def test_an_image_uploaded_as_an_artifact_is_called_what_it_is():
    png = bytes.fromhex("89504e470d0a1a0a") + b"\0" * 61  # a PNG's signature
    with pytest.raises(ArtifactError) as err:
        artifact.read(png)
    assert str(err.value) == (
        "file: not a safetensors task artifact (the file `piggy-masks train` writes); "
        "this looks like a PNG image (header length 727,905,341,920,923,785 exceeds "
        "the file's 69 bytes)"
    )


def test_missing_metadata_field_is_named(good):
    tensors, meta = good.tensors(), good.metadata()
    del meta["threshold"]
    with pytest.raises(ArtifactError, match="threshold"):
        artifact.read(save(tensors, metadata=meta))
    assert json.loads(good.metadata()["labels"]) == ["a", "b", "c"]


def test_description_travels_in_the_file_and_is_optional():
    from piggyback_serve.masks.artifact import DESCRIPTION_MAX, check_description
    from piggyback_serve.masks.demo import BUNDLED_DIR

    art = replace(artifact.read(BUNDLED_DIR / "mnist.safetensors"), description="")
    assert "description" not in art.metadata()  # absent when empty: older files read the same
    described = replace(art, description="a handwritten digit, white on black")
    meta = described.metadata()
    assert meta["description"] == "a handwritten digit, white on black"
    assert artifact.read(artifact.to_bytes(described)).description == meta["description"]
    with pytest.raises(ArtifactError, match="description"):
        check_description("two\nlines")
    with pytest.raises(ArtifactError, match="description"):
        check_description("x" * (DESCRIPTION_MAX + 1))
