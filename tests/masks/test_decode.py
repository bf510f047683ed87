"""masks/decode.py: the DCT-scaled decode shared by training and serving, and the batched
decode meant for a device, run here on the CPU (its geometry is the device's)."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from piggyback_serve.masks import data
from piggyback_serve.masks.decode import (
    TooManyPixels,
    decode_jpegs_on_device,
    exif_orientation,
    fit,
    is_jpeg,
    open_image,
    orient,
)


def photo(size: tuple[int, int] = (451, 300)) -> Image.Image:
    """scikit-image's cat photo (451x300), resized as asked."""
    from skimage import data as samples

    image = Image.fromarray(samples.chelsea())
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def phone() -> bytes:
    """A 4032x3024 JPEG, as a phone takes it."""
    return jpeg(photo((4032, 3024)))


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_a_phone_photo_decodes_at_one_eighth_and_its_pixels_stay_close(phone):
    scaled = open_image(io.BytesIO(phone), 224)
    assert scaled.size == (504, 378)  # 1/8: the shorter side still covers 224
    whole = open_image(io.BytesIO(phone))
    assert whole.size == (4032, 3024)
    a, b = data.to_pixels(scaled, 224), data.to_pixels(whole, 224)
    assert a.shape == b.shape == (3, 224, 224)
    assert mean_abs(a, b) < 1.5  # of 255 (measured 0.4)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        (224, (504, 378)),  # 1/8
        (400, (1008, 756)),  # 1/4: 1/8 would leave 378 < 400
        (1000, (2016, 1512)),  # 1/2
        (1600, (4032, 3024)),  # whole: 1/2 would leave 1512 < 1600
    ],
)
def test_the_smallest_scale_that_still_covers_the_size(phone, size, decoded):
    image = open_image(io.BytesIO(phone), size)
    assert image.size == decoded and min(image.size) >= size


def drafts(blob: bytes, size: int) -> tuple[list, Image.Image]:
    """The sizes `open_image` asked the JPEG decoder to draft to, and the image."""
    from PIL import JpegImagePlugin

    asked = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        asked.append(size)
        return original(self, mode, size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
        return asked, open_image(io.BytesIO(blob), size)


@pytest.mark.parametrize("shorter", [300, 447])
def test_no_draft_below_twice_the_size(shorter):
    blob = jpeg(photo((shorter * 3 // 2, shorter)))
    asked, image = drafts(blob, 224)
    assert asked == []
    assert image.size == (shorter * 3 // 2, shorter)
    assert torch.equal(
        data.to_pixels(image, 224), data.to_pixels(Image.open(io.BytesIO(blob)), 224)
    )


def test_at_twice_the_size_it_halves():
    asked, image = drafts(jpeg(photo((672, 448))), 224)
    assert asked == [(224, 224)] and image.size == (336, 224)


def test_other_formats_are_decoded_whole():
    buf = io.BytesIO()
    photo((1600, 1200)).save(buf, format="PNG")
    assert open_image(io.BytesIO(buf.getvalue()), 224).size == (1600, 1200)


def test_exif_orientation_is_applied_after_the_scaled_decode(phone):
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer turns it 90 degrees clockwise
    blob = jpeg(photo((4032, 3024)), exif=exif)
    scaled = open_image(io.BytesIO(blob), 224)
    assert scaled.size == (378, 504)
    whole = ImageOps.exif_transpose(Image.open(io.BytesIO(blob)))
    assert mean_abs(data.to_pixels(scaled, 224), data.to_pixels(whole, 224)) < 1.5


def test_the_pixel_limit_is_checked_from_the_header(phone):
    with pytest.raises(TooManyPixels) as raised:
        open_image(io.BytesIO(phone), 224, max_pixels=4032 * 3024 - 1)
    assert (raised.value.width, raised.value.height) == (4032, 3024)


def test_training_decodes_a_file_as_the_server_decodes_an_upload(tmp_path, phone):
    from piggyback_serve.server.preprocess import prepare

    path = tmp_path / "cat" / "phone.jpg"
    path.parent.mkdir()
    path.write_bytes(phone)
    assert data.as_image(path, 224).size == (504, 378)
    split = data.Split(np.array([path], dtype=object), np.array([0]))
    mean, std = (0.5,) * 3, (0.5,) * 3
    trained, _ = data.TensorImages(split, 224, mean, std)[0]

    task = SimpleNamespace(input_size=224)  # all that prepare reads of an artifact
    (served,) = prepare([phone], task, 10**8)
    assert torch.equal(trained, data.normalise(served, mean, std))


def test_training_on_a_device_decodes_its_jpeg_files_there_as_the_engine_does(tmp_path):
    """preprocess_all(decode_device=...) (what training on CUDA passes): JPEG files through
    decode_jpegs_on_device, other files through the CPU path; here the device is the CPU."""
    folder = tmp_path / "cat"
    folder.mkdir()
    paths = []
    for i, size in enumerate([(451, 300), (300, 451), (640, 427)]):
        path = folder / f"{i}.jpg"
        path.write_bytes(jpeg(photo(size)))
        paths.append(path)
    png = folder / "3.png"
    photo().save(png)
    paths.append(png)
    split = data.Split(np.array(paths, dtype=object), np.array([0, 1, 0, 1]))
    mean, std = (0.5,) * 3, (0.5,) * 3
    on_cpu = data.preprocess_all(split, 64, mean, std)
    on_device = data.preprocess_all(split, 64, mean, std, decode_device="cpu")
    for i, path in enumerate(paths[:3]):
        pixels, failed = decode_jpegs_on_device([path.read_bytes()], 64, "cpu")
        assert not failed
        assert torch.equal(on_device.tensors[0][i], data.normalise(pixels[0], mean, std))
        assert mean_abs(on_device.tensors[0][i], on_cpu.tensors[0][i]) < 4 / 255 * 2
    assert torch.equal(on_device.tensors[0][3], on_cpu.tensors[0][3])  # the PNG: CPU path
    assert torch.equal(on_device.tensors[1], on_cpu.tensors[1])


# ---------------------------------------------------------------------------------------
# decode_jpegs_on_device, on the CPU


def test_is_jpeg():
    assert is_jpeg(jpeg(photo()))
    buf = io.BytesIO()
    photo().save(buf, format="PNG")
    assert not is_jpeg(buf.getvalue()) and not is_jpeg(b"") and not is_jpeg(b"\xff\xd8")


def test_the_device_decode_has_to_pixels_geometry():
    from skimage import data as samples

    sizes = [(451, 300), (640, 427), (300, 451), (64, 48), (512, 512)]
    blobs = [jpeg(photo(s), quality=95) for s in sizes]
    blobs.append(jpeg(Image.fromarray(samples.camera()).resize((400, 300))))  # grayscale
    for size in (32, 224):
        out, failed = decode_jpegs_on_device(blobs, size, "cpu")
        assert failed == {} and out.shape == (len(blobs), 3, size, size)
        assert out.dtype == torch.uint8
        for row, blob in zip(out, blobs, strict=True):
            cpu = data.to_pixels(Image.open(io.BytesIO(blob)), size)
            assert mean_abs(row, cpu) < 1.0, size  # the resize's rounding only


def test_a_failed_image_is_reported_and_its_row_is_zeros():
    good = jpeg(photo())
    truncated = good[: len(good) // 3]
    blobs = [good, b"\xff\xd8\xff\xe0not a jpeg at all", truncated, good]
    out, failed = decode_jpegs_on_device(blobs, 64, "cpu")
    assert set(failed) <= {1, 2} and 1 in failed
    assert all(isinstance(why, str) and why for why in failed.values())
    for i in failed:
        assert not out[i].any()
    assert torch.equal(out[0], out[3]) and out[0].any()
    assert decode_jpegs_on_device([], 64, "cpu")[0].shape == (0, 3, 64, 64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_applies_it(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = jpeg(photo((90, 60)), quality=100, exif=exif)
    assert exif_orientation(blob) == orientation
    decoded = np.asarray(Image.open(io.BytesIO(blob)))  # as stored
    turned = orient(torch.from_numpy(decoded.copy()).permute(2, 0, 1), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))))
    assert torch.equal(turned, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    out, _ = decode_jpegs_on_device([blob], 48, "cpu")
    assert mean_abs(out[0], data.to_pixels(open_image(io.BytesIO(blob)), 48)) < 1.0


def test_fit_upsamples_a_small_image_as_pillow_does():
    small = photo((40, 30))
    pixels = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)
    assert mean_abs(fit(pixels, 64), data.to_pixels(small, 64)) < 1.0
