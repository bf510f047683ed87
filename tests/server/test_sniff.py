"""server/sniff.py: what a body that is not an image looks like, named in the 415."""

import io
import zipfile

import pytest

from piggyback_serve.server.sniff import describe


def zipped() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("a.txt", "hello")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "looks_like"),
    [
        (b"", "nothing (the body is empty)"),
        (b"a photo of a cat\n", "text"),
        (b"task=alpha&image=cat.jpg", "text"),
        ("naïve café".encode(), "text"),
        (b'  {"not": "an image"}', "JSON text"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "an HTML page"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG image"),
        (b"<note>hi</note>", "XML text"),
        (b"data:image/png;base64,iVBORw0KGgo=", "a data: URL"),
        (b"/9j/4AAQSkZJRgABAQ", "base64 text of an image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "a PDF document"),
        (zipped(), "a ZIP archive"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip-compressed data"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "a HEIC image (not supported"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "an AVIF image (not supported"),
        (len(b'{"a":1}').to_bytes(8, "little") + b'{"a":1}', "a safetensors file"),
        (bytes(range(200, 256)) * 4, "binary data of no known kind (it starts with c8 c9 ca"),
    ],
)
def test_describe_names_what_the_bytes_look_like(data, looks_like):
    assert describe(data).startswith(looks_like)
