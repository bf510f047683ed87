"""Untrusted training archives to a checked folder of images (torchvision's ImageFolder layout).

`receive` streams a request body to a file, refusing it (413) past `max_bytes`. `unpack` tells
zip, tar and tar.gz apart by their magic bytes and extracts entry by entry, refusing the
archive (422, InvalidArchive) at the first thing wrong, with what was written removed:

- every entry's name is checked (no absolute path, drive letter or `..`) and so is the path it
  resolves to: nothing is ever written outside `into`;
- only regular files and folders: a symlink, hardlink, device, fifo or anything else refuses;
- entries are counted (max_files), and bytes are counted as they are written, never from the
  headers' sizes (max_expanded_bytes); a tar's stream is capped too, so that entries skipped,
  and headers, can't make it decompress without end;
- each image's size comes from its header (nothing decoded) and must be within max_pixels;
- at least two class folders with images, each with at least min_class_images of them.

Only images are written: other files (by suffix, or that Pillow can't identify), hidden files
and __MACOSX are skipped and counted. The classes are the archive root's folders, or those of
its one top folder; images not inside a class folder are skipped and counted.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from piggyback_serve.masks.data import IMAGE_SUFFIXES
from piggyback_serve.server.errors import InvalidArchive, PayloadTooLarge
from piggyback_serve.server.sniff import HEAD, describe

CHUNK = 1 << 16
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # those server/preprocess.py decodes
# A tar's stream may hold this much beyond the bytes of its entries: each entry's header,
# padding and pax or long-name header, and the end-of-archive records.
TAR_BYTES_PER_ENTRY = 4096
TAR_BYTES_EXTRA = 4 * 10240
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    max_bytes: int  # the upload itself (PIGGY_MAX_ARCHIVE_BYTES)
    max_expanded_bytes: int  # bytes written when extracting (PIGGY_MAX_ARCHIVE_EXPANDED_BYTES)
    max_files: int  # entries, folders and skipped files included (PIGGY_MAX_ARCHIVE_FILES)
    max_pixels: int  # per image (PIGGY_MAX_PIXELS)
    min_class_images: int  # PIGGY_MIN_CLASS_IMAGES

    @classmethod
    def of(cls, settings) -> ArchiveLimits:
        return cls(
            max_bytes=settings.max_archive_bytes,
            max_expanded_bytes=settings.max_archive_expanded_bytes,
            max_files=settings.max_archive_files,
            max_pixels=settings.max_pixels,
            min_class_images=settings.min_class_images,
        )


@dataclass(frozen=True)
class ImageFolder:
    root: Path  # the folder whose sub-folders are the classes
    classes: list[str]  # sorted, as masks.data.image_folder orders them
    counts: dict[str, int]  # images per class
    skipped: int  # entries that were not images (or unreadable images), skipped and counted
    written: int  # bytes written while extracting

    @property
    def images(self) -> int:
        return sum(self.counts.values())


class ExpandedTooLarge(InvalidArchive):
    """The archive expands to more than max_expanded_bytes; `written` bytes had been written
    (at most the limit) when extraction stopped."""

    def __init__(self, written: int, limit: int):
        super().__init__(
            f"the archive expands to more than {limit:,} bytes "
            f"(PIGGY_MAX_ARCHIVE_EXPANDED_BYTES): stopped after writing {written:,}"
        )
        self.written = written


async def receive(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> int:
    """Stream a request body to `dest`; 413 as soon as more than `max_bytes` arrive. Returns
    the bytes received. `dest` is removed if anything goes wrong."""
    received = 0
    try:
        with open(dest, "wb") as out:
            async for chunk in chunks:
                received += len(chunk)
                if received > max_bytes:
                    raise PayloadTooLarge(
                        f"the archive is larger than {max_bytes:,} bytes (PIGGY_MAX_ARCHIVE_BYTES)"
                    )
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return received


def unpack(archive: Path, into: Path, limits: ArchiveLimits) -> ImageFolder:
    """Extract `archive` into `into` (created; must be empty) and check it is a folder per
    class; InvalidArchive otherwise, with `into` emptied."""
    into.mkdir(parents=True, exist_ok=True)
    if any(into.iterdir()):
        raise ValueError(f"{into} is not empty")
    run = _Extraction(into.resolve(), limits)
    try:
        kind = sniff(archive)
        with _reading(kind):
            if kind == "zip":
                _extract_zip(archive, run)
            else:
                _extract_tar(archive, run, gz=kind == "tar.gz")
        return _image_folder(run)
    except BaseException:
        _empty(into)
        raise


def sniff(archive: Path) -> str:
    """The kind of archive, "zip", "tar" or "tar.gz", from its first bytes; InvalidArchive
    for anything else."""
    with open(archive, "rb") as f:
        head = f.read(HEAD)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    raise InvalidArchive(f"not a zip, tar or tar.gz archive: the bytes look like {describe(head)}")


@contextmanager
def _reading(kind: str) -> Iterator[None]:
    """A corrupt or unsupported archive as InvalidArchive; the disk's own errors (those with
    an errno) stay what they are."""
    try:
        yield
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        RuntimeError,  # an encrypted zip entry; NotImplementedError: a compression method
        OSError,  # gzip.BadGzipFile, bz2's errors
    ) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise InvalidArchive(f"the {kind} archive is corrupt or unsupported: {exc}") from None


class _Extraction:
    """One archive being extracted: its entries checked and counted, its bytes counted."""

    def __init__(self, into: Path, limits: ArchiveLimits):
        self.into, self.limits = into, limits
        self.entries = self.skipped = self.written = 0

    def admit(self, name: str, kind: str) -> Path | None:
        """Count and check an entry: where to write it, or None for a folder or a skipped
        file. `kind` is "file", "dir", or what else the entry is ("symlink", ...)."""
        self.entries += 1
        if self.entries > self.limits.max_files:
            raise _too_many(self.limits.max_files)
        parts = _safe_parts(name)
        if kind not in ("file", "dir"):
            raise InvalidArchive(
                f"entry {name!r} is a {kind}: only regular files and folders are accepted"
            )
        if kind == "dir":
            return None
        if not parts:
            raise InvalidArchive(f"entry {name!r} has no name")
        if _hidden(parts) or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            self.skipped += 1
            return None
        return self._inside(name, parts)

    def _inside(self, name: str, parts: list[str]) -> Path:
        target = self.into.joinpath(*parts)
        if not target.resolve().is_relative_to(self.into):
            raise InvalidArchive(f"entry {name!r} would be written outside the archive's folder")
        return target

    def write(self, src: BinaryIO, target: Path, name: str) -> None:
        """Copy an entry's bytes, counting them against max_expanded_bytes as they are
        written, then keep it only if it is an image within max_pixels."""
        with _create(target, name) as out:
            while chunk := src.read(CHUNK):
                if self.written + len(chunk) > self.limits.max_expanded_bytes:
                    raise ExpandedTooLarge(self.written, self.limits.max_expanded_bytes)
                out.write(chunk)
                self.written += len(chunk)
        if not _is_image(target, name, self.limits.max_pixels):
            target.unlink()
            self.skipped += 1

    def too_large(self) -> ExpandedTooLarge:
        return ExpandedTooLarge(self.written, self.limits.max_expanded_bytes)


def _too_many(max_files: int) -> InvalidArchive:
    return InvalidArchive(
        f"the archive has more than {max_files:,} entries (PIGGY_MAX_ARCHIVE_FILES)"
    )


def _safe_parts(name: str) -> list[str]:
    """The entry's path components (`/` or `\\` between them); InvalidArchive for a path that
    is absolute, has a drive letter or a `..`."""
    if name.startswith(("/", "\\")):
        raise InvalidArchive(f"entry {name!r} has an absolute path: entries must be relative")
    if _DRIVE.match(name):
        raise InvalidArchive(f"entry {name!r} has a drive letter: entries must be relative")
    if "\x00" in name:
        raise InvalidArchive(f"entry {name!r} has a NUL character in its name")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArchive(
            f"entry {name!r} has a '..' component: entries must stay inside the archive"
        )
    return parts


def _hidden(parts: list[str]) -> bool:
    """.DS_Store, ._resource forks, .git and the like, and macOS's __MACOSX folder."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _create(target: Path, name: str) -> BinaryIO:
    """`target` opened for writing, its folders made; never an existing file or a link."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "xb")
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
            raise InvalidArchive(
                f"entry {name!r} cannot be written ({exc.strerror}): "
                f"is there another entry of the same name?"
            ) from None
        raise


def _is_image(path: Path, name: str, max_pixels: int) -> bool:
    """Whether Pillow identifies `path` as an image, from its header alone (nothing is
    decoded); InvalidArchive for one with more than `max_pixels` pixels."""
    try:
        with Image.open(path, formats=FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # over Pillow's own limit, checked while opening
        width, height = max_pixels + 1, 1
    except Exception:  # untrusted bytes: Pillow's plugins raise many kinds of errors
        return False
    if width * height > max_pixels:
        raise InvalidArchive(
            f"image {name!r} has {width * height:,} pixels, over the limit of {max_pixels:,} "
            f"(PIGGY_MAX_PIXELS)"
        )
    return True


def _extract_zip(archive: Path, run: _Extraction) -> None:
    with open(archive, "rb") as f:
        if _declared_entries(f) > run.limits.max_files:  # before ZipFile reads them all in
            raise _too_many(run.limits.max_files)
        with zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                target = run.admit(info.filename, _zip_kind(info))
                if target is not None:
                    with zf.open(info) as src:
                        run.write(src, target, info.filename)


def _declared_entries(f: BinaryIO) -> int:
    """The entry count the zip's end record declares (0 where there is none: ZipFile then
    refuses it), read before ZipFile loads every entry's record into memory."""
    end = zipfile._EndRecData(f)  # private, but in every Python 3: the stdlib's own reader
    return 0 if end is None else end[zipfile._ECD_ENTRIES_TOTAL]


def _zip_kind(info: zipfile.ZipInfo) -> str:
    """What a zip entry is, from the Unix mode in its external attributes."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symlink"
    if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO):
        return "device or fifo"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    return "dir" if info.is_dir() else "file"


def _extract_tar(archive: Path, run: _Extraction, gz: bool) -> None:
    with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) if gz else raw as stream:
        capped = _Capped(stream, run)
        with tarfile.open(fileobj=capped, mode="r|") as tar:
            for member in tar:
                target = run.admit(member.name, _tar_kind(member))
                if target is not None:
                    run.write(tar.extractfile(member), target, member.name)


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr() or member.isblk() or member.isfifo():
        return "device or fifo"
    return "special file"


class _Capped:
    """A tar's (decompressed) stream, refused once more is read from it than the entries may
    write plus their headers: entries skipped and headers (a pax header is read whole into
    memory) go through here too."""

    def __init__(self, stream: BinaryIO, run: _Extraction):
        self.stream, self.run, self.read_bytes = stream, run, 0
        limits = run.limits
        self.cap = limits.max_expanded_bytes + TAR_BYTES_PER_ENTRY * (limits.max_files + 1)
        self.cap += TAR_BYTES_EXTRA

    def read(self, size: int = -1) -> bytes:
        left = self.cap + 1 - self.read_bytes
        data = self.stream.read(left if size < 0 else min(size, left))
        self.read_bytes += len(data)
        if self.read_bytes > self.cap:
            raise self.run.too_large()
        return data


def _image_folder(run: _Extraction) -> ImageFolder:
    """The classes once extracted: folders without images dropped, files outside a class
    folder skipped; InvalidArchive unless at least two classes have enough images."""
    root = _class_root(run.into)
    skipped = run.skipped + _drop_loose_files(run.into) + _drop_loose_files(root)
    counts = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sum(1 for p in folder.rglob("*") if p.is_file())
        if images:
            counts[folder.name] = images
        else:
            shutil.rmtree(folder)
    _check_classes(counts, run.limits.min_class_images)
    return ImageFolder(root, sorted(counts), counts, skipped, run.written)


def _class_root(into: Path) -> Path:
    """The archive's root, or its one top folder where that holds the class folders."""
    folders = [p for p in into.iterdir() if p.is_dir()]
    if len(folders) == 1 and any(p.is_dir() for p in folders[0].iterdir()):
        return folders[0]
    return into


def _drop_loose_files(folder: Path) -> int:
    """Remove the files directly in `folder` (not in a class folder); how many."""
    loose = [p for p in folder.iterdir() if p.is_file()]
    for path in loose:
        path.unlink()
    return len(loose)


def _check_classes(counts: dict[str, int], min_images: int) -> None:
    found = ", ".join(f"{name!r} ({n})" for name, n in counts.items()) or "none"
    if len(counts) < 2:
        raise InvalidArchive(
            f"need at least two class folders with images, found {found}: put one folder of "
            f"images per class at the archive's root or inside one top folder"
        )
    few = ", ".join(f"{name!r} ({n})" for name, n in counts.items() if n < min_images)
    if few:
        raise InvalidArchive(
            f"every class needs at least {min_images} images (PIGGY_MIN_CLASS_IMAGES); "
            f"these have fewer: {few}"
        )


def _empty(folder: Path) -> None:
    """Remove everything in `folder` (nothing in it is a link: extraction makes none)."""
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
