"""Garbage in, documented 4xx out: bad images, bad artifacts and bad parameters, each
followed by proof that the server still serves and the registry is untouched."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from urllib.parse import quote

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from piggyback_serve.masks import artifact as artifacts
from piggyback_serve.masks import codec
from piggyback_serve.server.errors import PayloadTooLarge
from piggyback_serve.server.preprocess import decode
from piggyback_serve.server.registry.dir import ID_FILE
from tests.server.server_support import make_artifact, png, png_header, serving, settings_for

pytestmark = pytest.mark.anyio
GOOD = png(7)
B64 = base64.b64encode(GOOD).decode()
RGB = Image.open(io.BytesIO(png(11, (40, 48)))).convert("RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def expect(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


async def predict(client, body: bytes, content_type: str = "image/png", task: str = "alpha"):
    return await client.post(
        f"/predict?task={task}", content=body, headers={"content-type": content_type}
    )


async def still_serves(client, reference) -> None:
    r = await predict(client, GOOD)
    assert r.status_code == 200, r.text
    reference.check("alpha", GOOD, r.json()["results"][0])


# --- images ----------------------------------------------------------------------------


def exif_rotated() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF Orientation 6, and what a viewer shows."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(RGB, "JPEG", quality=95, exif=exif)
    return data, Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)


def animated_gif(frames: int) -> bytes:
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L") for _ in range(frames)
    ]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=10)


def odd_modes() -> dict[str, tuple[bytes, Image.Image]]:
    """Well-formed images in unusual modes, and the 8-bit RGB picture each should become."""
    gray = np.asarray(RGB.convert("L"))
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # 0..65535: same picture
    cases = {
        "16-bit gray PNG": (encode(sixteen, "PNG"), Image.fromarray(gray, "L")),
        "CMYK JPEG": (cmyk := encode(RGB.convert("CMYK"), "JPEG", quality=95), None),
        "palette PNG": (encode(RGB.convert("P"), "PNG"), None),
        "LA PNG": (encode(RGB.convert("LA"), "PNG"), None),
        "1-bit PNG": (encode(RGB.convert("1"), "PNG"), None),
        "RGBA WEBP": (encode(RGB.convert("RGBA"), "WEBP", lossless=True), None),
        "EXIF-rotated JPEG": exif_rotated(),
    }
    del cmyk
    # None: Pillow's own decode + convert("RGB") is the expected picture.
    return {
        k: (data, seen if seen is not None else Image.open(io.BytesIO(data)))
        for k, (data, seen) in cases.items()
    }


async def test_odd_but_valid_images_are_converted_and_classified(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        for name, (data, seen) in odd_modes().items():
            r = await predict(client, data)
            assert r.status_code == 200, (name, r.text)
            reference.check("alpha", encode(seen.convert("RGB"), "PNG"), r.json()["results"][0])
        # A GIF with 2,000 frames: the first frame is classified, the rest never decoded.
        gif = animated_gif(2000)
        r = await predict(client, gif, "image/gif")
        assert r.status_code == 200, r.text
        first = encode(Image.open(io.BytesIO(gif)).convert("RGB"), "PNG")
        reference.check("alpha", first, r.json()["results"][0])
        # A content type that names another image format: the bytes decide.
        jpeg = encode(RGB, "JPEG")
        r = await predict(client, jpeg, "image/gif")
        assert r.status_code == 200, r.text
        reference.check("alpha", jpeg, r.json()["results"][0])
        r = await predict(client, GOOD, "application/octet-stream")
        assert r.status_code == 200, r.text


async def test_broken_images_get_their_documented_4xx(tmp_path, registry_dir, backbone, reference):
    settings = settings_for(tmp_path, registry_dir, max_images=3)
    jpeg, png_bytes = encode(RGB, "JPEG"), png(5, (300, 300))
    files = lambda n: [("file", (f"{i}.png", png(i), "image/png")) for i in range(n)]  # noqa: E731
    async with serving(settings, backbone) as client:
        expect(await predict(client, jpeg[: len(jpeg) // 2], "image/jpeg"), 415)
        expect(await predict(client, png_bytes[: len(png_bytes) // 2]), 415)
        err = expect(await predict(client, png_header(100_000, 100_000)), 413, "payload_too_large")
        assert err["message"] == (  # at the default limit: Pillow's bomb guard, in our words
            f"image has 10,000,000,000 pixels, over the limit of {settings.max_pixels:,} "
            "(PIGGY_MAX_PIXELS)"
        )
        expect(await predict(client, b"GIF89a" + b"\0" * 40, "image/gif"), 415)
        expect(await predict(client, b'{"not": "an image"}', "application/json"), 415)
        r = await client.post("/predict?task=alpha", files={"image": ("a.png", GOOD, "image/png")})
        err = expect(r, 400)  # multipart without a `file` field
        assert err["message"] == (
            "multipart body has no image: part 'image' is a file, but not named `file`. "
            "Send each image as a file part named `file` (curl -F file=@photo.jpg)"
        )
        r = await client.post(
            "/predict?task=alpha", data={"file": "just text"}, files={"x": ("x", b"")}
        )
        err = expect(r, 400)  # `file` present but not a file
        assert err["message"].startswith(
            "multipart body has no image: part 'file' is a text field, not a file; "
            "part 'x' is a file, but not named `file`."
        )
        r = await client.post("/predict?task=alpha", files={"file": (None, "just text")})
        err = expect(r, 400)  # the only part: a text field (curl -F file=text)
        assert err["message"] == (
            "multipart body has no image: part 'file' is a text field, not a file. "
            "Send each image as a file part named `file` (curl -F file=@photo.jpg)"
        )
        r = await client.post("/predict?task=alpha", files={"file": ("notes.txt", b"hi")})
        err = expect(r, 415)  # a file part, but not an image: which one it was
        assert err["message"].startswith(
            "part 1 of 1 (field `file`, filename 'notes.txt', text/plain): "
            "not a supported image (accepted: JPEG, PNG"
        )
        err = expect(await client.post("/predict?task=alpha", files=files(4)), 413)
        assert err["message"] == "more than 3 images in one request (PIGGY_MAX_IMAGES)"
        images = {"name": "image", "datatype": "BYTES", "shape": [4], "data": [B64] * 4}
        r = await client.post("/v2/models/alpha/infer", json={"inputs": [images]})
        assert r.status_code == 413 and r.json() == {
            "error": "4 images in one request; the server's limit is 3 (PIGGY_MAX_IMAGES)"
        }
        r = await client.post("/predict?task=alpha", files=files(3))
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        r = await predict(client, b"--b\r\nbroken", "multipart/form-data; boundary=b")
        expect(r, 400)
        await still_serves(client, reference)


def test_pixel_limits_above_pillows_bomb_guard_say_which_limit_held():
    pillow = Image.MAX_IMAGE_PIXELS
    with pytest.raises(PayloadTooLarge) as err:
        decode(png_header(100_000, 100_000), max_pixels=10**11)
    assert err.value.message == (
        f"image has 10,000,000,000 pixels, over Pillow's decompression-bomb limit of "
        f"{2 * pillow:,} (PIGGY_MAX_PIXELS can lower the limit, not raise it past that)"
    )
    assert "DOS attack" not in str(err.value)


async def test_bodies_past_the_limit_are_refused_before_being_read(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, max_body_bytes=100_000)
    async with serving(settings, backbone) as client:
        app = client.app
        for declared in (b"1000000000", None):  # a declared size, then chunked: counted
            pulled = []

            async def receive(pulled=pulled):
                pulled.append(1)
                if len(pulled) > 1000:  # 64 MiB: never reached when refused early
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": b"\0" * 65536, "more_body": True}

            sent = []

            async def send(message, sent=sent):
                sent.append(message)

            headers = [(b"content-type", b"image/png")]
            if declared:
                headers.append((b"content-length", declared))
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
                "query_string": b"task=alpha", "headers": headers, "server": ("piggy", 80),
                "client": ("127.0.0.1", 1), "root_path": "", "state": {},
            }  # fmt: skip
            await app(scope, receive, send)
            start = next(m for m in sent if m["type"] == "http.response.start")
            assert start["status"] == 413
            # Declared: refused from the header alone; chunked: right after the limit.
            assert len(pulled) <= (1 if declared else 100_000 // 65536 + 2), len(pulled)
        await still_serves(client, reference)


# --- artifacts -------------------------------------------------------------------------

MALICIOUS_PICKLE = b"cos\nsystem\n(S'touch /tmp/piggy-pwned'\ntR."  # protocol 0, by hand


def bad_artifacts(backbone) -> dict[str, tuple[bytes, str]]:
    """Upload body -> the field the 422 must name."""
    good = make_artifact(backbone, "alpha", seed=42)
    data = artifacts.to_bytes(good)
    first = next(iter(good.masks))
    n, features = len(good.labels), backbone.num_features

    def changed(version="2", **changes) -> bytes:
        tensors, meta = good.parts(version)
        for key, value in changes.items():
            if key.startswith("meta_") and value is None:
                del meta[key[5:]]
            elif key.startswith("meta_"):
                meta[key[5:]] = value
            elif value is None:
                del tensors[key.replace("__", ".")]
            else:
                tensors[key.replace("__", ".")] = value
        return save(tensors, metadata=meta)

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:  # the layout of torch.save's files
        z.writestr("archive/data.pkl", MALICIOUS_PICKLE)
        z.writestr("archive/version", "3\n")
    mask = f"mask.{first}"
    m = {mask.replace(".", "__"): None}
    bits = good.masks[first].bits
    return format_2_cases(good, changed) | {
        "pickle": (MALICIOUS_PICKLE, "file"),
        "zip (torch.save)": (zipped.getvalue(), "file"),
        "lying header length": ((10**12).to_bytes(8, "little") + data[8:], "file"),
        "header length one past the end": (
            (len(data) - 7).to_bytes(8, "little") + data[8:],
            "file",
        ),
        "header not JSON": ((6).to_bytes(8, "little") + b"{nope!" + b"\0" * 16, "file"),
        "v1 mask as float32": (changed("1", **{mask: bits.float()}), mask),
        "v1 mask too short": (changed("1", **{mask: bits[:-1].clone()}), mask),
        "v1 mask missing": (changed("1", **m), "mask."),
        "v1 extra mask": (
            changed("1", mask__nope__weight=torch.zeros(4, dtype=torch.uint8)), "mask.nope"
        ),
        "extra tensor": (changed(surprise=torch.zeros(1)), "surprise"),
        "head.weight int": (
            changed(head__weight=torch.zeros(n, features, dtype=torch.int32)), "head.weight"
        ),
        "head.weight shape": (changed(head__weight=torch.zeros(n + 1, features)), "head.weight"),
        "head.weight NaN": (
            changed(head__weight=torch.full((n, features), float("nan"))), "head.weight"
        ),
        "head.bias inf": (changed(head__bias=torch.full((n,), float("inf"))), "head.bias"),
        "head.bias missing": (changed(head__bias=None), "head.bias"),
        "labels not JSON": (changed(meta_labels="[not json"), "labels"),
        "labels empty": (changed(meta_labels="[]"), "labels"),
        "metrics not an object": (changed(meta_metrics="[1]"), "metrics"),
        "format from the future": (changed(meta_format="99"), "format"),
        "input_size negative": (changed(meta_input_size="-32"), "input_size"),
        "mean not 3 numbers": (changed(meta_mean=json.dumps([0.5])), "mean"),
        "another backbone": (changed(meta_backbone="resnet50"), "backbone"),
        "another backbone's weights": (changed(meta_backbone_sha256="f" * 64), "backbone_sha256"),
    }  # fmt: skip


def format_2_cases(good, changed) -> dict[str, tuple[bytes, str]]:
    """Format 2's coded masks, each wrong in one way; upload body -> the field to name."""
    first = min(good.masks)  # the writer sorts by name: its stream opens the tensor
    numel = good.masks[first].numel
    off = good.masks[first].switched_off(numel).numpy()
    field = f"mask.{first}"
    tensors, meta = good.parts()
    entries = json.loads(meta["masks"])[codec.ELIAS_FANO]
    assert json.loads(meta["masks"]) == {codec.ELIAS_FANO: entries}  # 10% off: all positions
    assert entries[0] == [first, off.size, numel]  # so first's stream opens the tensor
    streams = tensors["masks"]
    size = codec.coded_size(codec.ELIAS_FANO, off.size, numel)

    def table(value) -> bytes:
        return changed(meta_masks=json.dumps(value))

    def entry(value, **tensors) -> bytes:
        return changed(meta_masks=json.dumps({codec.ELIAS_FANO: [value, *entries[1:]]}), **tensors)

    def positions(bad: np.ndarray) -> bytes:  # the coder codes what it is given, unchecked
        stream = torch.from_numpy(codec.encode(codec.ELIAS_FANO, bad, numel))
        assert stream.numel() == size
        return changed(masks=torch.cat([stream, streams[size:]]))

    low = codec.low_bits(off.size, numel)
    past_end, repeated = off.copy(), off.copy()
    past_end[-1] = (((numel - 1) >> low) + 1) << low  # >= numel, yet fits the stream
    repeated[1] = repeated[0]
    return {
        "v2 position out of range": (positions(past_end), field),
        "v2 positions repeated": (positions(repeated), field),
        "v2 count disagrees": (entry([first, off.size // 2, numel]), "masks"),
        "v2 streams truncated": (changed(masks=streams[:-1].clone()), "masks"),
        "v2 streams missing": (changed(masks=None), "masks"),
        "v2 streams too long": (changed(masks=torch.cat([streams, streams])), "masks"),
        "v2 bomb: 10^15 weights declared": (entry([first, 10**14, 10**15]), "masks"),
        "v2 more off than weights": (entry([first, numel + 1, numel]), field),
        "v2 unknown coding": (table({"zstd": entries}), "masks"),
        "v2 listed twice": (table({codec.ELIAS_FANO: [*entries, entries[0]]}), field),
        "v2 numel not the backbone's": (
            entry([first, 0, numel + 8], masks=streams[size:].clone()),
            field,
        ),
        "v2 masks not JSON": (changed(meta_masks="{nope"), "masks"),
        "v2 masks missing": (changed(meta_masks=None), "masks"),
        "v2 unexpected tensor": (changed(off__nope__weight=streams), "off.nope.weight"),
    }


def registry_files(folder) -> list[tuple[str, int, bytes]]:
    """What a folder registry holds but its identity file (made as a server starts)."""
    return sorted(
        (p.name, p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.iterdir()
        if p.name != ID_FILE
    )


async def test_bad_artifacts_are_422_naming_the_problem_registry_unchanged(
    tmp_path, registry_dir, backbone, reference
):
    settings = settings_for(tmp_path, registry_dir, max_artifact_bytes=3 * 1024 * 1024)
    before = registry_files(registry_dir)
    cases = bad_artifacts(backbone)
    async with serving(settings, backbone) as client:
        for case, (data, field) in cases.items():
            for name in ("alpha", "fresh"):  # replacing a task, and a new one
                err = expect(
                    await client.put(f"/tasks/{name}", content=data), 422, "invalid_artifact"
                )
                assert field in err["message"], (case, err)
        over = b"\0" * (3 * 1024 * 1024 + 1)
        err = expect(await client.put("/tasks/fresh", content=over), 413, "payload_too_large")
        assert "limit of 3,145,728 bytes (PIGGY_MAX_ARTIFACT_BYTES)" in err["message"]
        err = expect(await client.put("/tasks/fresh", content=GOOD), 422, "invalid_artifact")
        assert err["message"].startswith(
            "file: not a safetensors task artifact (the file `piggy-masks train` writes); "
            "this looks like a PNG image (header length 727,905,341,920,923,785 exceeds"
        )
        # Not a byte written, not even a temp file left.
        assert registry_files(registry_dir) == before
        assert (await client.get("/tasks/fresh")).status_code == 404
        assert sorted(t["name"] for t in (await client.get("/tasks")).json()["tasks"]) == [
            "alpha",
            "beta",
        ]
        await still_serves(client, reference)
    assert len(cases) >= 20


# --- parameters ------------------------------------------------------------------------

NASTY_NAMES = [
    "../alpha", "..", "a/b", "..%2Falpha", "alpha/../beta", "\\alpha", "/etc/passwd",
    "аlpha",  # Cyrillic а
    "ａｌｐｈａ",  # full-width
    "alpha\u200b", "alpha\x00", "alpha\n", "ALPHA", " alpha", "alpha.safetensors",
    ".alpha", "x" * 10_000, "é" * 5_000, "%00", "*", "alpha;beta",
]  # fmt: skip


async def test_nasty_task_names_never_reach_the_filesystem(
    tmp_path, registry_dir, backbone, reference
):
    before = sorted(name for name, _, _ in registry_files(registry_dir))
    outside = registry_dir.parent
    outside_before = sorted(p.name for p in outside.iterdir())
    async with serving(settings_for(tmp_path, registry_dir), backbone) as client:

        async def check(name: str) -> None:
            r = await client.post("/predict", params={"task": name}, content=GOOD)
            expect(r, 404, "task_not_found")
            path = quote(name, safe="")
            for method in ("GET", "PUT", "DELETE"):
                r = await client.request(
                    method, f"/tasks/{path}", content=b"junk" if method == "PUT" else None
                )
                if not r.request.url.path.startswith("/tasks/"):
                    continue  # ".." normalised away by the client (GET / is the page)
                # 400 invalid name, 404 no such task (or a name with a slash in it matched
                # no route), 405 a path the client normalised onto another route, 422 a fine name
                # (say ALPHA, or a generated one) with a junk artifact.
                assert r.status_code in (400, 404, 405, 422), (method, name, r.text)
                expect(r, r.status_code)
            r = await client.get(f"/v2/models/{path}")
            if r.request.url.path.startswith("/v2/models/"):
                assert r.status_code in (400, 404), (name, r.text)

        for name in NASTY_NAMES:
            await check(name)

        @given(st.text(min_size=1, max_size=80).filter(lambda s: s not in ("alpha", "beta")))
        @examples(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def generated(name):
            names.append(name)

        names: list[str] = []
        generated()
        for name in names:
            await check(name)
        assert sorted(name for name, _, _ in registry_files(registry_dir)) == before
        # PIGGY_HOME is `outside` too: the local copies of the listed tasks, nothing else.
        assert sorted(p.name for p in outside.iterdir() if p.name != "artifacts") == outside_before
        copies = {p.name.split(".")[0] for p in (outside / "artifacts").glob("*")}
        assert copies <= {"alpha", "beta"}, copies
        await still_serves(client, reference)


async def test_top_k_zero_negative_huge_and_not_a_number(settings, backbone, reference):
    async with serving(settings, backbone) as client:
        for bad in (
            "0",
            "-1",
            "-99999999999999999999",
            "abc",
            "1e3",
            "2.5",
            "",
            "NaN",
            "0x10",
            "٣",
        ):
            r = await client.post("/predict", params={"task": "alpha", "top_k": bad}, content=GOOD)
            expect(r, 400, "bad_request")
        for huge in ("4", "1000", str(2**63), "9" * 100):  # clamped to the 4 labels
            r = await client.post("/predict", params={"task": "alpha", "top_k": huge}, content=GOOD)
            assert r.status_code == 200, (huge, r.text)
            reference.check("alpha", GOOD, r.json()["results"][0], top_k=4)
        for bad in (0, -1, "3", 2.5, True, None, [1]):
            body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}],
                    "parameters": {"top_k": bad}}  # fmt: skip
            r = await client.post("/v2/models/alpha/infer", json=body)
            assert r.status_code == 400 and isinstance(r.json()["error"], str), (bad, r.text)
        await still_serves(client, reference)
