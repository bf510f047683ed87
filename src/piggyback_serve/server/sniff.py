"""What a body that is not an image looks like, from its first bytes: the 415 that refuses it
says so ("the bytes look like JSON text"), so that a caller sees what they sent.

Image formats are Pillow's to identify (preprocess.py); this only names the usual mistakes.
"""

from __future__ import annotations

import codecs

HEAD = 1024  # bytes looked at: enough for every signature and a line of text
# (offset, prefix, what): checked in order.
SIGNATURES = (
    (0, b"%PDF-", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive"),
    (0, b"\x1f\x8b", "gzip-compressed data"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (0, b"\x7fELF", "an executable (ELF)"),
    (4, b"ftypheic", "a HEIC image (not supported: convert it to JPEG or PNG)"),
    (4, b"ftypheix", "a HEIC image (not supported: convert it to JPEG or PNG)"),
    (4, b"ftypmif1", "a HEIF image (not supported: convert it to JPEG or PNG)"),
    (4, b"ftypavif", "an AVIF image (not supported: convert it to JPEG or PNG)"),
    (4, b"ftyp", "an MP4/QuickTime video"),
    (0, b"\x00\x00\x01\x00", "a Windows icon (ICO, not supported)"),
)

# How base64 of a JPEG, PNG or GIF begins (lowercased, as _text_kind sees the text).
BASE64_IMAGES = ("/9j/", "ivborw0kggo", "r0lgod")


def describe(data: bytes) -> str:
    """What `data` looks like, as a noun phrase: "JSON text", "a ZIP archive", ..."""
    if not data:
        return "nothing (the body is empty)"
    head = data[:HEAD]
    for offset, prefix, what in SIGNATURES:
        if head[offset : offset + len(prefix)] == prefix:
            return what
    if _is_safetensors(head):
        return "a safetensors file (a task artifact? upload it with PUT /tasks/{name})"
    text = _text(head)
    if text is None:
        return f"binary data of no known kind (it starts with {head[:8].hex(' ')})"
    return _text_kind(text.lstrip().lower())


def _is_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header itself.
    return len(head) > 9 and head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < 1 << 27


def _text(head: bytes) -> str | None:
    """The head as UTF-8 text (a character cut at the end is fine), or None if it isn't."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    printable = sum(c.isprintable() or c in "\t\r\n" for c in text)
    return text if printable >= 0.95 * len(text) else None


def _text_kind(text: str) -> str:
    if text.startswith(("{", "[")):
        return "JSON text"
    if "<svg" in text[:512]:
        return "an SVG image (vector images are not supported: export it as PNG)"
    if text.startswith(("<!doctype html", "<html")):
        return "an HTML page"
    if text.startswith("<"):
        return "XML text"
    if text.startswith("data:image/"):
        return "a data: URL (send the image's bytes, not its base64 text)"
    if text.startswith(BASE64_IMAGES):
        return "base64 text of an image (send the image's bytes, not their base64)"
    return "text"
