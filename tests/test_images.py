"""decode(): any user image (format, mode, EXIF orientation) -> uint8 RGB square, or UnreadableImage;
read_file() and walk(): users' folders (broken links, FIFOs, sockets, hidden litter) read without hanging."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import finishes, unprivileged
from PIL import Image

from sstl.data.images import UnreadableImage, clean_message, decode, is_hidden, printable, read_file, walk

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def check(arr: np.ndarray, size: int) -> None:
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (size, size, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP"])
@pytest.mark.parametrize("size", [8, 24])
def test_formats_decode_to_rgb_square(fmt: str, size: int) -> None:
    im = Image.new("RGB", (30, 18), (200, 40, 40))
    out = decode(encode(im, fmt), size)
    check(out, size)
    # a flat colour survives every codec roughly unchanged
    assert np.abs(out.astype(int) - [200, 40, 40]).max() <= 12


def test_lossless_content_is_preserved() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(arr), "PNG"), 16)
    np.testing.assert_array_equal(out, arr)


def test_grayscale() -> None:
    im = Image.new("L", (20, 20), 77)
    out = decode(encode(im, "PNG"), 10)
    check(out, 10)
    assert (out == 77).all()


def test_grayscale_jpeg() -> None:
    im = Image.new("L", (20, 20), 150)
    out = decode(encode(im, "JPEG"), 10)
    check(out, 10)
    assert np.abs(out.astype(int) - 150).max() <= 3


def test_palette_with_transparency() -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    im.paste(1, (8, 0, 16, 16))  # right half is palette index 1 (green)
    data = encode(im, "PNG", transparency=0)  # index 0 (black, the left half) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode(data, 16)
    check(out, 16)
    assert (out[:, :8] == WHITE).all(), "transparent palette pixels become white"
    assert (out[:, 8:] == (10, 200, 30)).all()


def test_palette_without_transparency() -> None:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 200, 30] + [0] * (256 * 3 - 3))
    out = decode(encode(im, "PNG"), 8)
    check(out, 8)
    assert (out == (10, 200, 30)).all()


def test_rgba_transparent_pixels_become_white() -> None:
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 0, 255, 255), (0, 8, 16, 16))  # opaque blue bottom half
    out = decode(encode(im, "PNG"), 16)
    check(out, 16)
    assert (out[:8] == WHITE).all()
    assert (out[8:] == BLUE).all()


def test_rgba_half_transparent_blends_over_white() -> None:
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    out = decode(encode(im, "PNG"), 8)
    assert np.abs(out.astype(int) - 127).max() <= 2


def test_la_mode() -> None:
    im = Image.new("LA", (8, 8), (0, 0))
    out = decode(encode(im, "PNG"), 8)
    assert (out == 255).all()


def test_16bit_grayscale_png() -> None:
    arr = np.full((12, 12), 32768, dtype=np.uint16)
    arr[:, 6:] = 65535
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data, 12)
    check(out, 12)
    assert np.abs(out[:, :5].astype(int) - 128).max() <= 2, "mid-gray 32768 maps near 128"
    assert (out[:, 7:] == 255).all()


def test_16bit_dark_png_is_not_stretched() -> None:
    # a 16-bit image whose values are all <= 255 is very dark, not mid-gray
    arr = np.full((8, 8), 200, dtype=np.uint16)
    out = decode(encode(Image.fromarray(arr), "PNG"), 8)
    assert out.max() <= 2


def test_exif_rotated_jpeg() -> None:
    # 40 wide x 20 high, left half red, right half blue; orientation 6 = rotate 90 degrees clockwise
    # to display, which gives a 20 x 40 portrait image with the red half on top.
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(im, "JPEG", exif=exif, quality=95)
    raw = decode(data, 40)
    check(raw, 40)
    out = raw.astype(int)
    # centre square crop of the portrait: the top half red, the bottom half blue, for every column.
    # Without the EXIF transpose it would be the left half red instead.
    top, bottom = out[2:18], out[22:38]
    assert (top[..., 0] > 200).all() and (top[..., 2] < 60).all()
    assert (bottom[..., 2] > 200).all() and (bottom[..., 0] < 60).all()


def test_exif_orientation_8_is_the_other_way() -> None:
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display: red ends at the bottom
    out = decode(encode(im, "JPEG", exif=exif, quality=95), 40).astype(int)
    assert (out[22:38, :, 0] > 200).all()
    assert (out[2:18, :, 2] > 200).all()


def test_centre_crop_of_wide_image() -> None:
    # 30 x 10: left third red, middle blue, right third red; the centre square is the blue third
    im = Image.new("RGB", (30, 10), RED)
    im.paste(BLUE, (10, 0, 20, 10))
    out = decode(encode(im, "PNG"), 10)
    assert (out == BLUE).all()


def test_upscales_small_image() -> None:
    out = decode(encode(Image.new("RGB", (3, 5), (1, 2, 3)), "PNG"), 32)
    check(out, 32)
    assert (out == (1, 2, 3)).all()


def test_large_jpeg_uses_draft_but_keeps_size() -> None:
    im = Image.new("RGB", (800, 400), BLUE)
    im.paste(RED, (0, 0, 400, 400))
    raw = decode(encode(im, "JPEG", quality=90), 16)
    check(raw, 16)
    out = raw.astype(int)
    assert (out[:, :6, 0] > 200).all() and (out[:, 10:, 2] > 200).all()


def test_empty_bytes_unreadable() -> None:
    with pytest.raises(UnreadableImage, match="empty"):
        decode(b"", 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_garbage_bytes_unreadable(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(UnreadableImage):
        decode(data, 8)


def test_text_file_unreadable() -> None:
    with pytest.raises(UnreadableImage):
        decode(b"hello, this is not an image\n", 8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_image_unreadable(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), fmt)
    with pytest.raises(UnreadableImage):
        decode(data[: len(data) // 2], 8)


def test_unreadable_message_is_one_line() -> None:
    with pytest.raises(UnreadableImage) as info:
        decode(b"\xff\xd8\xff\xe0garbage", 8)
    assert str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- reading users' folders safely


def unblock(fifo: Path) -> None:
    """Let a reader stuck in open(fifo) go, so a failing test does not leave it blocked."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


PNG = encode(Image.new("RGB", (9, 7), RED), "PNG")


def test_read_file_reads_regular_files_and_links_to_them(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    assert read_file(tmp_path / "a.png") == PNG
    assert read_file(tmp_path / "link.png") == PNG


def test_read_file_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        with pytest.raises(UnreadableImage, match="not a regular file .*FIFO"):
            finishes(lambda: read_file(fifo))
    finally:
        unblock(fifo)


def test_read_file_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "folder.png").mkdir()
    monkeypatch.chdir(tmp_path)  # AF_UNIX paths are limited to ~100 characters: bind a short relative one
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    for name, reason in (
        ("broken.jpg", "broken symbolic link"),
        ("gone.jpg", "vanished while scanning"),
        ("folder.png", "not a regular file (a folder)"),
        ("sock.png", "not a regular file"),
        ("loop.png", "symbolic link loop"),
    ):
        with pytest.raises(UnreadableImage, match=re.escape(reason)) as info:
            finishes(lambda name=name: read_file(tmp_path / name))
        assert str(tmp_path) not in str(info.value), "the reason names no path: the report does"


def test_read_file_permission_denied_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for EACCES (what a chmod 000 file gives a normal user; see the real one below)."""
    path = tmp_path / "locked.png"
    path.write_bytes(PNG)
    real_open = os.open

    def fake_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    with pytest.raises(UnreadableImage, match="unreadable: permission denied"):
        read_file(path)


def test_read_file_permission_denied_for_real(tmp_path: Path) -> None:
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: chmod 000 files stay readable, nothing to deny")
    path = tmp_path / "locked.png"
    path.write_bytes(PNG)
    path.chmod(0)
    code = "import sys\nfrom sstl.data.images import read_file\n"
    code += "try:\n read_file(sys.argv[1])\nexcept Exception as e:\n print(e)"
    res = subprocess.run([*prefix, sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "unreadable: permission denied", res.stdout + res.stderr


def test_walk_skips_hidden_follows_links_inside_and_reports_loops_and_links_out(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    for rel in ("a.png", "sub/b.png", ".DS_Store", ".git/objects/x.png", "__MACOSX/._a.png", "sub/._b.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(PNG)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.png").write_bytes(PNG)
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    (root / "c.png").symlink_to(tmp_path / "elsewhere" / "c.png")
    (root / "alias").symlink_to(root / "sub")  # a second way into sub/: scanned once
    (root / "b.png").symlink_to(root / "sub" / "b.png")  # a link to a photo inside: read
    (root / "sub" / "up").symlink_to(root)
    (root / "broken.png").symlink_to(tmp_path / "missing.png")
    found = {p.relative_to(root).as_posix(): problem for p, problem in finishes(lambda: list(walk(root)))}
    assert found == {
        "a.png": "",
        "alias": f"symbolic link to a folder scanned already ({root / 'sub'}): not scanned twice",
        "b.png": "",
        "broken.png": "broken symbolic link (its target is missing)",
        "c.png": "symbolic link to a file outside the photo folder: not read",
        "linked": "symbolic link to a folder outside the photo folder: not followed",
        "sub/b.png": "",
        "sub/up": "symbolic link loop (a link to a folder that contains it)",
    }


def test_walk_is_bounded_by_links_to_the_root_and_by_many_links(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "everything").symlink_to("/")  # a class folder linked to the whole machine
    # 24 levels, each with two links to the next: 2^24 paths when every link is followed
    for level in range(24):
        here = root / "deep" / f"l{level}"
        here.mkdir(parents=True)
        (here / "x.png").write_bytes(PNG)
    for level in range(23):
        for name in ("left", "right"):
            (root / "deep" / f"l{level}" / name).symlink_to(root / "deep" / f"l{level + 1}")
    start = time.monotonic()
    found = finishes(lambda: list(walk(root)))
    assert time.monotonic() - start < 10
    assert (root / "cat" / "everything", "symbolic link to a folder outside the photo folder: not followed") in found
    assert sum(1 for p, problem in found if p.name == "x.png" and not problem) == 24  # each photo once


def test_a_file_name_that_is_not_utf8_is_reported_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    root.mkdir()
    (root / "ok.png").write_bytes(PNG)
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or a Windows zip writes them
    (root / bad).write_bytes(PNG)
    found = dict(walk(root))
    assert found[root / "ok.png"] == "" and found[root / bad] == "file name is not valid UTF-8: rename it"
    assert printable(root / bad).endswith("caf\ufffd.png")


def test_walk_reports_an_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(PNG)
    (tmp_path / "locked").mkdir()
    real_listdir = os.listdir

    def fake_listdir(path: Any) -> list[str]:
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", fake_listdir)
    found = {p.name: problem for p, problem in walk(tmp_path)}
    assert found == {"a.png": "", "locked": "folder unreadable: permission denied"}


@pytest.mark.parametrize("name", [".DS_Store", ".git", ".ipynb_checkpoints", "._IMG_1.jpg", "__MACOSX"])
def test_hidden_names(name: str) -> None:
    assert is_hidden(name)
    assert not is_hidden("IMG_1.jpg") and not is_hidden("cat") and not is_hidden("_MACOSX")


def test_pil_messages_lose_object_addresses() -> None:
    with pytest.raises(UnreadableImage) as info:
        decode(b"hello, this is not an image\n", 8)
    message = str(info.value)
    assert "cannot identify image file" in message
    assert "0x" not in message and "object at" not in message and "<" not in message
    assert clean_message("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c>\n  more") == (
        "cannot identify image file more"
    )
