"""Decode any user image (JPEG, PNG, BMP, WebP; any size and mode) into a uint8 RGB square.

Also the safe way to find and read users' photos: folders hold broken links, FIFOs, sockets,
unreadable files and tool litter (.DS_Store, __MACOSX, .ipynb_checkpoints) beside the photos.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


class UnreadableImage(Exception):
    """The file cannot be used as an image; `str(err)` is the reason for the skip report."""


HIDDEN_NAMES = frozenset({"__MACOSX"})
SPECIAL_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def is_hidden(name: str) -> bool:
    """Dot-names (.DS_Store, .git, .ipynb_checkpoints, macOS ._IMG.jpg) and __MACOSX are tool litter:
    never a class, never a photo, not worth a line in the skip report."""
    return name.startswith(".") or name in HIDDEN_NAMES


def os_reason(err: OSError, path: Path | str) -> str:
    """A stable one-line reason for an OSError on `path`, without the path (the report names it)."""
    code = err.errno
    if code == errno.ENOENT:
        return "broken symbolic link (its target is missing)" if os.path.islink(path) else "vanished while scanning"
    if code in (errno.EACCES, errno.EPERM):
        return "unreadable: permission denied"
    if code == errno.ELOOP:
        return "symbolic link loop"
    if code == errno.ENXIO:
        return "not a regular file (a socket or device)"
    return f"unreadable: {os.strerror(code)}" if code else f"unreadable: {type(err).__name__}"


def special_kind(mode: int) -> str:
    """'' for a regular file, else what it is ("a FIFO (named pipe)", "a socket", ...)."""
    if stat.S_ISREG(mode):
        return ""
    return SPECIAL_KINDS.get(stat.S_IFMT(mode), "not a regular file")


def classify(path: Path) -> tuple[bool, str]:
    """(is a folder, problem) for one entry, following symbolic links; problem '' for a regular file.

    Only stat() is called: a FIFO is never opened here, so scanning cannot hang on one."""
    try:
        st = os.stat(path)
    except OSError as err:
        return False, os_reason(err, path)
    if stat.S_ISDIR(st.st_mode):
        return True, ""
    kind = special_kind(st.st_mode)
    return False, f"not a regular file ({kind})" if kind else ""


def printable(path: Path | str) -> str:
    """The path as text any file or terminal takes: a name that is not valid UTF-8 (os.listdir keeps
    its bytes as lone surrogates, which no UTF-8 writer accepts) shows its bad bytes as U+FFFD."""
    return os.fsencode(str(path)).decode("utf-8", "replace")


def children(folder: Path) -> Iterator[tuple[Path, bool, str]]:
    """(path, is a folder, problem) for each non-hidden entry of `folder`, sorted by name. A name that is
    not valid UTF-8 is reported, never followed or read: nothing downstream could write it."""
    for name in sorted(os.listdir(folder)):
        if is_hidden(name):
            continue
        if printable(name) != name:
            yield folder / name, False, "file name is not valid UTF-8: rename it"
            continue
        yield (folder / name, *classify(folder / name))


def inside(path: Path | str, boundaries: Sequence[str]) -> bool:
    """Whether `path`'s real path (links resolved) is one of `boundaries` (real paths) or under one."""
    real = os.path.realpath(path)
    return any(real == b or real.startswith(b.rstrip(os.sep) + os.sep) for b in boundaries)


def walk(folder: Path, *, within: Sequence[Path] = ()) -> Iterator[tuple[Path, str]]:
    """Every non-folder entry under `folder` (any depth, sorted) as (path, problem); problem '' = a regular file.

    Hidden entries are left out. Symbolic links are followed only where their real path stays inside
    `folder` or one of `within` (the photo folder, and a split folder that is itself a link, e.g.
    unlabeled/ on another disk; users link class folders in from elsewhere in the photo folder): a link
    out is reported, so a class folder linked to / scans nothing and no outside file becomes data.
    Each real folder is scanned once: a loop, or a second link to a folder, is reported instead of
    scanned again (a few dozen links could otherwise make millions of paths). An unreadable folder is
    reported as (folder, reason) rather than stopping the scan."""
    boundary = tuple(os.path.realpath(b) for b in (folder, *within))
    yield from _walk(Path(folder), boundary, {}, frozenset())


def _walk(
    folder: Path, boundary: tuple[str, ...], seen: dict[tuple[int, int], Path], ancestors: frozenset[tuple[int, int]]
) -> Iterator[tuple[Path, str]]:
    if not inside(folder, boundary):
        yield folder, "symbolic link to a folder outside the photo folder: not followed"
        return
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            yield folder, "symbolic link loop (a link to a folder that contains it)"
            return
        if key in seen:
            yield folder, f"symbolic link to a folder scanned already ({printable(seen[key])}): not scanned twice"
            return
        seen[key] = folder
        entries = list(children(folder))
    except OSError as err:
        yield folder, f"folder {os_reason(err, folder)}"
        return
    # real folders before links to folders: a link to a folder that is also reached directly is the
    # one reported as scanned already, never the folder itself (a stable sort keeps the names' order)
    for path, is_dir, problem in sorted(entries, key=lambda e: e[1] and os.path.islink(e[0])):
        if is_dir:
            yield from _walk(path, boundary, seen, ancestors | {key})
        elif not problem and os.path.islink(path) and not inside(path, boundary):
            yield path, "symbolic link to a file outside the photo folder: not read"
        else:
            yield path, problem


def read_file(path: Path | str) -> bytes:
    """The bytes of a regular file (or of the one a link points to), else UnreadableImage saying why.

    Opened non-blocking and checked with fstat before reading: a FIFO (or a file swapped for one after
    the scan) is refused at once instead of waiting forever for a writer; devices are never read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise UnreadableImage(os_reason(err, path)) from None
    try:
        kind = special_kind(os.fstat(fd).st_mode)
        if kind:
            raise UnreadableImage(f"not a regular file ({kind})")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as err:
        raise UnreadableImage(os_reason(err, path)) from None
    finally:
        os.close(fd)


def clean_message(message: str) -> str:
    """One line, without object reprs such as `<_io.BytesIO object at 0x7f...>` that PIL puts in its
    errors: they name no file, differ on every run and would make skipped.csv change each time."""
    return " ".join(_ADDRESS.sub("", message).split())


RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def decode(data: bytes, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """File bytes -> uint8 (size, size, 3): EXIF-rotated, converted to RGB, centre-cropped square,
    resized with the backbone's `interpolation` (bicubic, bilinear, nearest, lanczos)."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # let libjpeg decode at reduced scale: far faster
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"not a readable image ({type(err).__name__}: {clean_message(str(err))})") from None
    fitted = ImageOps.fit(rgb, (size, size), method=RESAMPLING[interpolation])
    return np.asarray(fitted, dtype=np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, CMYK and 16/32-bit modes -> 8-bit RGB (alpha over white)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F":  # float images carry no fixed range: stretch to their maximum
            top = max(float(arr.max()), 1e-12)
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")
