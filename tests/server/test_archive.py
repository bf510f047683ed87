"""Untrusted training archives (server/jobs/archive.py): good ones become a folder per class;
unsafe, oversized or badly laid out ones are refused with nothing left behind."""

from __future__ import annotations

import asyncio
import gzip
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from piggyback_serve.server.errors import InvalidArchive, PayloadTooLarge
from piggyback_serve.server.jobs import archive as archive_module
from piggyback_serve.server.jobs.archive import (
    ArchiveLimits,
    ExpandedTooLarge,
    ImageFolder,
    receive,
    unpack,
)

MiB = 1 << 20
LIMITS = ArchiveLimits(
    max_bytes=10 * MiB,
    max_expanded_bytes=10 * MiB,
    max_files=100,
    max_pixels=64 * 64,
    min_class_images=2,
)


def png(color: int = 0, size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 0)).save(out, "PNG")
    return out.getvalue()


def two_classes(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": png(10 * i) for cls in ("cat", "dog") for i in range(3)}


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, entries: dict[str, bytes], gz: bool = False, special=()) -> Path:
    """A tar (gzip-compressed with `gz`) of `entries` and the TarInfo members in `special`."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in special:
            tar.addfile(info)
    return path


def member(name: str, type_: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, linkname
    return info


def refused(archive: Path, into: Path, limits: ArchiveLimits = LIMITS) -> InvalidArchive:
    """The refusal `unpack` raises; `into` must be left empty."""
    with pytest.raises(InvalidArchive) as caught:
        unpack(archive, into, limits)
    assert into.is_dir() and not any(into.iterdir()), list(into.rglob("*"))
    return caught.value


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# --- good archives --------------------------------------------------------------------------

MAKERS = {
    "zip": lambda path, entries: make_zip(path, entries),
    "tar": lambda path, entries: make_tar(path, entries),
    "tar.gz": lambda path, entries: make_tar(path, entries, gz=True),
}


@pytest.mark.parametrize("fmt", MAKERS)
@pytest.mark.parametrize("prefix", ["", "flowers/"], ids=["root", "nested"])
def test_good_archive_becomes_a_folder_per_class(tmp_path, fmt, prefix):
    # Named .bin: the format is sniffed from the bytes, not the name.
    archive = MAKERS[fmt](tmp_path / "upload.bin", two_classes(prefix))
    folder = unpack(archive, tmp_path / "out", LIMITS)
    assert isinstance(folder, ImageFolder)
    expected_root = tmp_path / "out" / prefix.rstrip("/") if prefix else tmp_path / "out"
    assert folder.root.resolve() == expected_root.resolve()
    assert folder.classes == ["cat", "dog"]
    assert folder.counts == {"cat": 3, "dog": 3}
    assert folder.images == 6 and folder.skipped == 0
    assert folder.written == sum(len(d) for d in two_classes().values())
    assert files(folder.root) == sorted(two_classes())
    with Image.open(folder.root / "cat" / "1.png") as image:
        assert image.size == (8, 8)


def test_non_images_hidden_files_and_loose_images_are_skipped_and_counted(tmp_path):
    entries = two_classes("top/") | {
        "top/cat/notes.csv": b"not an image",
        "top/dog/fake.png": b"not a png at all",  # image suffix, but Pillow can't identify it
        "top/dog/.DS_Store": b"\0\0\0\1Bud1",
        "top/.hidden/1.png": png(),
        "__MACOSX/top/cat/._1.png": png(),
        "top/loose.png": png(),  # an image outside any class folder
        "top/empty/fake.jpg": b"nope",  # a folder left with no images: not a class
        "readme.md": b"# my data set",
    }
    archive = make_zip(tmp_path / "a.zip", entries)
    folder = unpack(archive, tmp_path / "out", LIMITS)
    assert folder.classes == ["cat", "dog"]
    assert folder.counts == {"cat": 3, "dog": 3}
    assert folder.skipped == 8
    assert files(tmp_path / "out") == sorted(two_classes("top/"))


def test_class_folders_sort_as_image_folder_does(tmp_path):
    entries = {f"{cls}/{i}.png": png() for cls in ("b", "B", "a") for i in range(2)}
    folder = unpack(make_zip(tmp_path / "a.zip", entries), tmp_path / "out", LIMITS)
    assert folder.classes == ["B", "a", "b"]  # sorted(), as masks.data.image_folder


# --- refused: not an archive -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data, words",
    [
        (b'{"not": "an archive"}', "JSON"),
        (png(), "not a zip, tar or tar.gz"),
        (b"PK\x03\x04" + b"garbage" * 100, "zip archive is corrupt"),
        (gzip.compress(b"plain text, not a tar" * 50), "tar.gz archive is corrupt"),
        (b"", "empty"),
    ],
    ids=["json", "png", "corrupt-zip", "gzip-not-tar", "empty"],
)
def test_not_an_archive_is_refused(tmp_path, data, words):
    archive = tmp_path / "upload.zip"
    archive.write_bytes(data)
    assert words in refused(archive, tmp_path / "out").message


# --- refused: unsafe entries -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize(
    "name, words",
    [
        ("../evil.png", "'..' component"),
        ("cat/../../evil.png", "'..' component"),
        ("/tmp/evil.png", "absolute path"),
        ("\\evil.png", "absolute path"),
        ("C:/evil.png", "drive letter"),
        ("cat\\..\\..\\evil.png", "'..' component"),
    ],
)
def test_unsafe_names_are_refused(tmp_path, fmt, name, words):
    archive = MAKERS[fmt](tmp_path / "a.bin", two_classes() | {name: png()})
    work = tmp_path / "work"
    error = refused(archive, work / "out")
    assert words in error.message and repr(name) in error.message
    assert files(tmp_path) == ["a.bin"]  # nothing written anywhere, in `out` or outside it


@pytest.mark.parametrize(
    "special, words",
    [
        (member("cat/link.png", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        (member("cat/hard.png", tarfile.LNKTYPE, "cat/0.png"), "hardlink"),
        (member("cat/fifo.png", tarfile.FIFOTYPE), "device or fifo"),
        (member("cat/dev.png", tarfile.CHRTYPE), "device or fifo"),
        (member("cat/blk.png", tarfile.BLKTYPE), "device or fifo"),
        (member("cat/volume.png", b"V"), "special file"),
    ],
    ids=["symlink", "hardlink", "fifo", "char-device", "block-device", "volume-header"],
)
def test_tar_links_and_special_members_are_refused(tmp_path, special, words):
    archive = make_tar(tmp_path / "a.tar", two_classes(), special=[special])
    error = refused(archive, tmp_path / "out")
    assert words in error.message and special.name in error.message


@pytest.mark.parametrize(
    "mode, words",
    [(stat.S_IFLNK | 0o777, "symlink"), (stat.S_IFIFO | 0o644, "device or fifo")],
    ids=["symlink", "fifo"],
)
def test_zip_links_and_special_entries_are_refused(tmp_path, mode, words):
    archive = make_zip(tmp_path / "a.zip", two_classes())
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("cat/link.png")
        info.create_system = 3  # Unix
        info.external_attr = mode << 16
        zf.writestr(info, "/etc/passwd")
    error = refused(archive, tmp_path / "out")
    assert words in error.message and "cat/link.png" in error.message


def test_the_resolved_path_is_checked_too(tmp_path, monkeypatch):
    # Were a name to get past the checks on its components, the path it resolves to still
    # has to be inside the folder (`..` would also pass for a hidden name: not here).
    monkeypatch.setattr(archive_module, "_safe_parts", lambda name: name.split("/"))
    monkeypatch.setattr(archive_module, "_hidden", lambda parts: False)
    archive = make_zip(tmp_path / "a.zip", two_classes() | {"cat/../../evil.png": png()})
    error = refused(archive, tmp_path / "work" / "out")
    assert "outside the archive's folder" in error.message
    assert files(tmp_path) == ["a.zip"]


def test_an_entry_twice_is_refused(tmp_path):
    archive = make_tar(tmp_path / "a.tar", two_classes())
    with tarfile.open(archive, "a") as tar:  # the same name again, appended
        info = tarfile.TarInfo("cat/0.png")
        data = png(99)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert "cat/0.png" in refused(archive, tmp_path / "out").message


# --- refused: too large ----------------------------------------------------------------------


def test_zip_bomb_is_stopped_having_written_at_most_the_limit(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in two_classes().items():
            zf.writestr(name, data)
        zf.writestr("cat/zeros.png", bytes(50 * MiB))
    assert archive.stat().st_size < MiB  # 50 MiB of zeros compress to ~50 KiB
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 5 * MiB})
    error = refused(archive, tmp_path / "out", limits)
    assert isinstance(error, ExpandedTooLarge)
    assert 0 < error.written <= 5 * MiB
    assert "5,242,880" in error.message and "PIGGY_MAX_ARCHIVE_EXPANDED_BYTES" in error.message


def test_tar_gz_bomb_is_stopped_having_written_at_most_the_limit(tmp_path):
    archive = make_tar(
        tmp_path / "bomb.tgz", two_classes() | {"dog/zeros.jpg": bytes(20 * MiB)}, gz=True
    )
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 2 * MiB})
    error = refused(archive, tmp_path / "out", limits)
    assert isinstance(error, ExpandedTooLarge) and 0 < error.written <= 2 * MiB


def test_tar_gz_that_expands_into_skipped_entries_is_stopped_too(tmp_path):
    # Not one byte of it would be written (not an image), but it must still be decompressed
    # to get past it: the tar's stream is capped, not only what is written.
    archive = make_tar(
        tmp_path / "bomb.tgz", {"padding.bin": bytes(20 * MiB)} | two_classes(), gz=True
    )
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_expanded_bytes": 2 * MiB})
    error = refused(archive, tmp_path / "out", limits)
    assert isinstance(error, ExpandedTooLarge) and error.written == 0


@pytest.mark.parametrize("fmt", MAKERS)
def test_too_many_entries_are_refused(tmp_path, fmt):
    entries = two_classes() | {f"cat/extra{i}.csv": b"x" for i in range(5)}  # 11 entries
    archive = MAKERS[fmt](tmp_path / "a.bin", entries)
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_files": 10})
    error = refused(archive, tmp_path / "out", limits)
    assert "more than 10 entries" in error.message
    assert unpack(archive, tmp_path / "ok", LIMITS).counts == {"cat": 3, "dog": 3}


def test_zip_entry_count_is_checked_before_zipfile_reads_the_entries(tmp_path, monkeypatch):
    # A zip's central directory is read whole by ZipFile: millions of entries would take
    # gigabytes of memory. The count its end record declares is checked first.
    entries = two_classes() | {f"cat/extra{i}.csv": b"x" for i in range(5)}
    archive = make_zip(tmp_path / "a.zip", entries)

    def no_zipfile(*args, **kwargs):
        raise AssertionError("ZipFile opened before the entry count was checked")

    monkeypatch.setattr(zipfile, "ZipFile", no_zipfile)
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_files": 10})
    assert "more than 10 entries" in refused(archive, tmp_path / "out", limits).message


def test_an_image_over_max_pixels_is_refused(tmp_path):
    archive = make_zip(tmp_path / "a.zip", two_classes() | {"dog/big.png": png(size=65)})
    error = refused(archive, tmp_path / "out")
    assert "'dog/big.png' has 4,225 pixels" in error.message
    assert "PIGGY_MAX_PIXELS" in error.message


def test_an_image_over_pillows_own_limit_is_refused(tmp_path, monkeypatch):
    # Pillow refuses an image over twice its MAX_IMAGE_PIXELS while opening it: refused too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    archive = make_zip(tmp_path / "a.zip", two_classes())
    limits = ArchiveLimits(**{**LIMITS.__dict__, "max_pixels": 10**9})
    assert "over the limit" in refused(archive, tmp_path / "out", limits).message


# --- refused: not a folder per class ---------------------------------------------------------


def test_fewer_than_two_classes_is_refused(tmp_path):
    entries = {f"cat/{i}.png": png() for i in range(3)} | {"dog/notes.csv": b"no images"}
    error = refused(make_zip(tmp_path / "a.zip", entries), tmp_path / "out")
    assert "at least two class folders" in error.message and "'cat' (3)" in error.message


def test_images_at_the_root_only_are_refused(tmp_path):
    entries = {f"{i}.png": png() for i in range(4)}
    error = refused(make_tar(tmp_path / "a.tar", entries), tmp_path / "out")
    assert "at least two class folders with images, found none" in error.message


def test_a_class_under_the_minimum_is_named(tmp_path):
    entries = two_classes() | {"bird/0.png": png(), "fish/0.png": png(), "fish/1.csv": b""}
    limits = ArchiveLimits(**{**LIMITS.__dict__, "min_class_images": 2})
    error = refused(make_zip(tmp_path / "a.zip", entries), tmp_path / "out", limits)
    assert "'bird' (1), 'fish' (1)" in error.message and "'cat'" not in error.message
    assert "at least 2 images" in error.message


def test_into_must_be_empty(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.csv").write_text("mine")
    archive = make_zip(tmp_path / "a.zip", two_classes())
    with pytest.raises(ValueError, match="not empty"):
        unpack(archive, tmp_path / "out", LIMITS)
    assert (tmp_path / "out" / "keep.csv").read_text() == "mine"


def test_limits_of_settings():
    class Settings:
        max_archive_bytes, max_archive_expanded_bytes, max_archive_files = 1, 2, 3
        max_pixels, min_class_images = 4, 5

    assert ArchiveLimits.of(Settings) == ArchiveLimits(1, 2, 3, 4, 5)


# --- receive ---------------------------------------------------------------------------------


async def body(*chunks: bytes):
    for chunk in chunks:
        yield chunk


def test_receive_streams_the_body_to_a_file(tmp_path):
    dest = tmp_path / "upload"
    assert asyncio.run(receive(body(b"abc", b"", b"defg"), dest, max_bytes=7)) == 7
    assert dest.read_bytes() == b"abcdefg"


def test_receive_over_max_bytes_is_413_and_leaves_no_file(tmp_path):
    dest = tmp_path / "upload"
    written = []

    async def endless():
        for _ in range(1000):  # bounded, but far more than the limit
            written.append(1)
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge) as caught:
        asyncio.run(receive(endless(), dest, max_bytes=5000))
    assert caught.value.status == 413 and "PIGGY_MAX_ARCHIVE_BYTES" in caught.value.message
    assert not dest.exists()
    assert len(written) == 6  # stopped at the first chunk past the limit
