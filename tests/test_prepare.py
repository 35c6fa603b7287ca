"""prepare: stratified split, and a whole image folder -> packed .npy splits, manifest, skip report."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, finishes, unprivileged
from PIL import Image

from sstl.core.errors import SstlError
from sstl.core.files import read_csv, read_json
from sstl.data.dataset import SPLITS, load_classes, load_split
from sstl.data.images import decode
from sstl.data.inventory import fingerprint, folder_inventory, refresh_inventory
from sstl.data.prepare import prepare_folder, skip_report, stratified_split

CLASSES = ("ant", "bee", "cat")
SIZE = 8


# ---------------------------------------------------------------- stratified_split


def expected_held(n: int, fraction: float) -> int:
    if n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_split_counts_per_class(fraction: float) -> None:
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3 + [3] * 2 + [4] * 1)
    keep, held = stratified_split(labels, fraction, seed=0)
    for c in np.unique(labels):
        n = int((labels == c).sum())
        assert int((labels[held] == c).sum()) == expected_held(n, fraction), (c, n)


def test_split_at_least_one_per_class() -> None:
    labels = np.array([0] * 3 + [1] * 4)
    _, held = stratified_split(labels, 0.01, seed=1)
    assert Counter(labels[held].tolist()) == {0: 1, 1: 1}


def test_split_disjoint_and_covering() -> None:
    labels = np.random.default_rng(0).integers(0, 4, 50)
    keep, held = stratified_split(labels, 0.3, seed=3)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(len(labels)))
    assert (np.diff(keep) > 0).all() and (np.diff(held) > 0).all(), "sorted index arrays"


def test_split_deterministic_per_seed() -> None:
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, 0.25, seed=7)
    b = stratified_split(labels, 0.25, seed=7)
    c = stratified_split(labels, 0.25, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == len(c[1])


# ---------------------------------------------------------------- prepare_folder


def png_bytes(rng: np.random.Generator, shape: tuple[int, int] = (10, 14)) -> bytes:
    arr = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def build(root: Path, n_labeled: int = 4, n_test: int = 2, seed: int = 0) -> Path:
    """labeled/<class>/*.png, unlabeled/ with nested folders, test/<class>/*.png; all distinct."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        for i in range(n_labeled):
            write(root / "labeled" / c / f"{c}{i}.png", png_bytes(rng))
        for i in range(n_test):
            write(root / "test" / c / f"t{c}{i}.png", png_bytes(rng))
    write(root / "unlabeled" / "u0.png", png_bytes(rng))
    write(root / "unlabeled" / "sub" / "u1.png", png_bytes(rng))
    write(root / "unlabeled" / "sub" / "deeper" / "u2.png", png_bytes(rng))
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return build(tmp_path / "images")


def test_prepare_writes_all_outputs(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)

    assert summary.classes == list(CLASSES)
    assert read_json(out / "classes.json") == list(CLASSES)
    assert load_classes(out) == list(CLASSES)
    # 4 labeled per class, round(4 * 0.25) = 1 per class moves to val
    assert summary.counts == {"labeled": 9, "val": 3, "unlabeled": 3, "test": 6, "test-add": 0}
    for split in SPLITS:
        arr = np.load(out / f"{split}.npy")
        assert arr.dtype == np.uint8
        assert arr.shape == (summary.counts[split], SIZE, SIZE, 3)

    rows = read_csv(out / "manifest.csv")
    assert len(rows) == sum(summary.counts.values())
    assert set(rows[0]) == {"path", "split", "label", "label_index", "sha256"}
    for row in rows:
        src = folder / row["path"]
        assert src.is_file(), "manifest paths are relative to the data folder"
        assert row["sha256"] == sha(src)
        if row["split"] == "unlabeled":
            assert row["label"] == "" and row["label_index"] == "-1"
        else:
            assert row["label"] == src.parent.name
            assert CLASSES[int(row["label_index"])] == row["label"]
    unl = {r["path"] for r in rows if r["split"] == "unlabeled"}
    assert unl == {"unlabeled/u0.png", "unlabeled/sub/u1.png", "unlabeled/sub/deeper/u2.png"}
    assert Counter(r["label"] for r in rows if r["split"] == "val") == dict.fromkeys(CLASSES, 1)
    assert summary.skipped == []
    assert read_csv(out / "skipped.csv") == []
    metrics = summary.as_metrics()
    assert metrics["n_test_add"] == 0 and metrics["n_classes"] == 3 and metrics["n_skipped"] == 0


def test_prepare_arrays_match_decoded_sources(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    for split in ("labeled", "val", "test", "unlabeled"):
        data = load_split(out, split)
        for img, path in zip(data.images.numpy(), data.paths, strict=True):
            np.testing.assert_array_equal(img, decode((folder / path).read_bytes(), SIZE))


def test_load_split_labels_match_class_folders(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    classes = load_classes(out)
    for split in ("labeled", "val", "test"):
        data = load_split(out, split)
        assert len(data) == data.images.shape[0] == data.labels.shape[0]
        assert data.images.shape[1:] == (SIZE, SIZE, 3)
        for label, path in zip(data.labels.tolist(), data.paths, strict=True):
            assert classes[label] == Path(path).parent.name
    unl = load_split(out, "unlabeled")
    assert (unl.labels == -1).all()
    with pytest.raises(SstlError):
        load_split(out, "training")
    with pytest.raises(SstlError):
        load_split(tmp_path / "elsewhere", "labeled")


def test_prepare_is_deterministic(folder: Path, tmp_path: Path) -> None:
    prepare_folder(folder, tmp_path / "a", image_size=SIZE, val_fraction=0.25, seed=5)
    prepare_folder(folder, tmp_path / "b", image_size=SIZE, val_fraction=0.25, seed=5)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    for split in SPLITS:
        np.testing.assert_array_equal(
            np.load(tmp_path / "a" / f"{split}.npy"), np.load(tmp_path / "b" / f"{split}.npy")
        )


def test_bad_files_are_skipped_and_reported(folder: Path, tmp_path: Path) -> None:
    corrupt = write(folder / "labeled" / "ant" / "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
    empty = write(folder / "unlabeled" / "sub" / "empty.png", b"")
    notes = write(folder / "labeled" / "bee" / "notes.txt", b"some notes")
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)

    skipped = {Path(r["path"]).name: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert set(skipped) == {"corrupt.jpg", "empty.png", "notes.txt"}
    assert "not a readable image" in skipped["corrupt.jpg"]
    assert "empty" in skipped["empty.png"]
    assert "not an image file" in skipped["notes.txt"]
    assert len(summary.skipped) == 3
    paths = {r["path"] for r in read_csv(out / "manifest.csv")}
    for bad in (corrupt, empty, notes):
        assert str(bad.relative_to(folder)) not in paths
    assert summary.counts["labeled"] + summary.counts["val"] == 12
    assert summary.counts["unlabeled"] == 3


def test_loose_file_in_labeled_is_skipped(folder: Path, tmp_path: Path) -> None:
    write(folder / "labeled" / "stray.png", png_bytes(np.random.default_rng(9)))
    summary = prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    assert [Path(s["path"]).name for s in summary.skipped] == ["stray.png"]
    assert "class folder" in summary.skipped[0]["reason"]


def test_unlabeled_duplicate_of_test_image_is_dropped(folder: Path, tmp_path: Path) -> None:
    test_img = folder / "test" / "cat" / "tcat0.png"
    dup = folder / "unlabeled" / "sub" / "copy_of_test.png"
    shutil.copyfile(test_img, dup)
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)

    assert summary.duplicates_dropped == 1
    assert summary.as_metrics()["n_duplicates_dropped"] == 1
    assert summary.counts["unlabeled"] == 3
    rows = read_csv(out / "manifest.csv")
    assert "unlabeled/sub/copy_of_test.png" not in {r["path"] for r in rows}
    reasons = {Path(r["path"]).name: r["reason"] for r in read_csv(out / "skipped.csv")}
    assert "duplicate" in reasons["copy_of_test.png"]
    assert np.load(out / "unlabeled.npy").shape[0] == 3


def test_no_unlabeled_image_duplicates_an_evaluation_image(folder: Path, tmp_path: Path) -> None:
    """Invariant: after prepare, no unlabeled image is byte-identical to a val/test/test-add image.

    Here val is split off labeled/ (there is no val/ folder) and every labeled image also sits in
    unlabeled/: the copies of the images that end up in val must be dropped like test duplicates.
    """
    for src in sorted((folder / "labeled").rglob("*.png")):
        shutil.copyfile(src, folder / "unlabeled" / f"copy_{src.parent.name}_{src.name}")
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)

    rows = read_csv(out / "manifest.csv")
    eval_hashes = {r["sha256"] for r in rows if r["split"] in ("val", "test", "test-add")}
    leaked = [r["path"] for r in rows if r["split"] == "unlabeled" and r["sha256"] in eval_hashes]
    assert leaked == [], f"unlabeled copies of val images leak into the pseudo-label pool: {leaked}"
    assert summary.duplicates_dropped == summary.counts["val"]


def test_explicit_val_folder_is_used(folder: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    for c in CLASSES[:2]:
        write(folder / "val" / c / f"v{c}.png", png_bytes(rng))
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.5, seed=0)

    assert summary.counts["labeled"] == 12, "nothing is split off labeled/ when val/ exists"
    assert summary.counts["val"] == 2
    val = [r for r in read_csv(out / "manifest.csv") if r["split"] == "val"]
    assert {r["path"] for r in val} == {"val/ant/vant.png", "val/bee/vbee.png"}


def test_test_add_folder(folder: Path, tmp_path: Path) -> None:
    write(folder / "test-add" / "bee" / "extra.png", png_bytes(np.random.default_rng(5)))
    summary = prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    assert summary.counts["test-add"] == 1
    assert np.load(tmp_path / "prepared" / "test-add.npy").shape == (1, SIZE, SIZE, 3)
    assert load_split(tmp_path / "prepared", "test-add").labels.tolist() == [1]


def test_mixed_formats_and_sizes(folder: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for fmt, suffix in (("JPEG", ".JPG"), ("BMP", ".bmp"), ("WEBP", ".webp")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)).save(buf, fmt)
        write(folder / "labeled" / "cat" / f"x{suffix}", buf.getvalue())
    summary = prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    assert summary.skipped == []
    assert summary.counts["labeled"] + summary.counts["val"] == 15


def test_class_with_only_corrupt_files_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "labeled" / "dog" / "bad.png", b"\x89PNG\r\n\x1a\n broken")
    write(folder / "labeled" / "dog" / "bad2.jpg", b"")
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_test_class_not_in_labeled_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "test" / "dog" / "d.png", png_bytes(np.random.default_rng(3)))
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_val_class_not_in_labeled_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "val" / "dog" / "d.png", png_bytes(np.random.default_rng(3)))
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_missing_test_folder_is_an_error(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "test")
    with pytest.raises(SstlError, match="test"):
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_empty_test_folder_is_an_error(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "test")
    (folder / "test").mkdir()
    with pytest.raises(SstlError, match="test"):
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SstlError, match="not found"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_errors_are_one_line(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "unlabeled")
    with pytest.raises(SstlError) as info:
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    assert "unlabeled" in str(info.value)
    assert "\n" not in str(info.value)


def test_test_add_built_from_corrupted_test_images(folder: Path, tmp_path: Path) -> None:
    from sstl.config.data import CorruptConfig

    out = tmp_path / "prepared"
    summary = prepare_folder(
        folder, out, image_size=16, val_fraction=0.25, seed=0, corrupt_test=CorruptConfig(severity=4, seed=1)
    )
    assert summary.counts["test-add"] == summary.counts["test"]
    test, add = load_split(out, "test"), load_split(out, "test-add")
    assert test.labels.tolist() == add.labels.tolist()
    assert all(a.startswith(t + "#") for t, a in zip(test.paths, add.paths, strict=True))
    assert (test.images != add.images).any()
    some_test = next((folder / "test").rglob("*.png"))
    write(folder / "test-add" / some_test.parent.name / "x.png", png_bytes(np.random.default_rng(9)))
    with pytest.raises(SstlError, match="one or the other"):
        prepare_folder(folder, tmp_path / "p2", image_size=16, val_fraction=0.25, seed=0, corrupt_test=CorruptConfig())


# ---------------------------------------------------------------- users' real folders: bad entries, litter


def make_socket(path: Path) -> None:
    """A Unix socket file at `path` (bound from its folder: AF_UNIX paths are limited to ~100 characters)."""
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def add_bad_entries(root: Path) -> dict[str, str]:
    """Broken links, a FIFO, a socket, a link loop and an unreadable-looking class link; {relative path: reason}."""
    (root / "labeled" / "ant" / "broken.jpg").symlink_to(root / "gone" / "photo.jpg")
    os.mkfifo(root / "unlabeled" / "sub" / "pipe.png")
    make_socket(root / "test" / "cat" / "sock.png")
    (root / "unlabeled" / "loop.png").symlink_to(root / "unlabeled" / "loop.png")
    (root / "labeled" / "ghost").symlink_to(root / "no-such-class")
    return {
        "labeled/ant/broken.jpg": "broken symbolic link",
        "unlabeled/sub/pipe.png": "not a regular file (a FIFO (named pipe))",
        "test/cat/sock.png": "not a regular file (a socket)",
        "unlabeled/loop.png": "symbolic link loop",
        "labeled/ghost": "broken symbolic link",
    }


def skipped_reasons(out: Path, root: Path) -> dict[str, str]:
    return {Path(r["path"]).relative_to(root).as_posix(): r["reason"] for r in read_csv(out / "skipped.csv")}


def test_broken_links_fifos_sockets_are_skipped_and_listed(folder: Path, tmp_path: Path) -> None:
    expected = add_bad_entries(folder)
    out = tmp_path / "prepared"
    summary = finishes(lambda: prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0))

    reasons = skipped_reasons(out, folder)
    assert set(reasons) == set(expected)
    for rel, reason in expected.items():
        assert reasons[rel].startswith(reason), (rel, reasons[rel])
    assert summary.classes == list(CLASSES), "a broken link is no class"
    assert summary.counts == {"labeled": 9, "val": 3, "unlabeled": 3, "test": 6, "test-add": 0}
    assert summary.as_metrics()["n_skipped"] == len(expected)


def test_links_inside_the_photo_folder_are_followed_links_out_are_listed(folder: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    outside = tmp_path / "elsewhere"
    for i in range(3):
        write(outside / "dogs" / f"d{i}.png", png_bytes(rng))
        write(folder / "store" / "dogs" / f"d{i}.png", png_bytes(rng))  # kept in the photo folder, linked in
    write(outside / "u.png", png_bytes(rng))
    write(folder / "store" / "u.png", png_bytes(rng))
    (folder / "labeled" / "dog").symlink_to(folder / "store" / "dogs")
    (folder / "labeled" / "wolf").symlink_to(outside / "dogs")
    (folder / "unlabeled" / "linked.png").symlink_to(folder / "store" / "u.png")
    (folder / "unlabeled" / "out.png").symlink_to(outside / "u.png")
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {
        "labeled/wolf": "symbolic link to a folder outside the photo folder: not followed",
        "unlabeled/out.png": "symbolic link to a file outside the photo folder: not read",
    }
    assert summary.classes == [*CLASSES, "dog"]  # wolf's photos are not the photo folder's
    paths = {r["path"] for r in read_csv(out / "manifest.csv")}
    assert "unlabeled/linked.png" in paths and {f"labeled/dog/d{i}.png" for i in range(3)} & paths
    assert not any("wolf" in p or "out.png" in p for p in paths)


def test_file_that_vanishes_after_the_scan_is_skipped(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sstl.data.prepare

    victim = folder / "unlabeled" / "sub" / "u1.png"
    real_scan = sstl.data.prepare.scan

    def scan_then_delete(root: Path) -> sstl.data.prepare.Scan:
        found = real_scan(root)
        victim.unlink()  # gone between listing and reading, as when a sync tool moves it away
        return found

    monkeypatch.setattr(sstl.data.prepare, "scan", scan_then_delete)
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {"unlabeled/sub/u1.png": "vanished while scanning"}
    assert summary.counts["unlabeled"] == 2


def test_unreadable_file_is_skipped(folder: Path, tmp_path: Path) -> None:
    """A real chmod 000 file. Root reads it anyway: then prepare runs under setpriv without root's
    permission-bypassing capabilities, or the test is skipped where that is not possible."""
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without a working setpriv: chmod 000 stays readable, nothing is denied")
    locked = folder / "labeled" / "bee" / "bee0.png"
    locked.chmod(0)
    out = tmp_path / "prepared"
    code = (
        "import sys\nfrom pathlib import Path\nfrom sstl.data.prepare import prepare_folder\n"
        "prepare_folder(Path(sys.argv[1]), Path(sys.argv[2]), image_size=8, val_fraction=0.25, seed=0)"
    )
    res = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(folder), str(out)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert skipped_reasons(out, folder) == {"labeled/bee/bee0.png": "unreadable: permission denied"}
    assert "labeled/bee/bee0.png" not in {r["path"] for r in read_csv(out / "manifest.csv")}


def test_unreadable_file_reason_without_privileges(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same skip where the real one cannot run: os.open fails with EACCES as for a normal user."""
    locked = folder / "test" / "ant" / "tant0.png"
    real_open = os.open

    def fake_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(file) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {"test/ant/tant0.png": "unreadable: permission denied"}
    assert summary.counts["test"] == 5


def test_hidden_folders_and_files_are_ignored(folder: Path, tmp_path: Path) -> None:
    baseline = prepare_folder(folder, tmp_path / "before", image_size=SIZE, val_fraction=0.25, seed=0)
    rng = np.random.default_rng(33)
    for rel in (
        "labeled/.ipynb_checkpoints/ant0-checkpoint.png",
        "labeled/__MACOSX/ant/._ant0.png",
        "labeled/ant/.DS_Store",
        "labeled/ant/._ant0.png",
        "test/.hidden_class/t.png",
        "unlabeled/.git/objects/ab.png",
        "unlabeled/__MACOSX/._u0.png",
        "unlabeled/.thumb.png",
        ".git/HEAD",
        ".DS_Store",
        "__MACOSX/labeled/._x.png",
    ):
        write(folder / rel, png_bytes(rng))
    (folder / "labeled" / ".Trash").mkdir()
    out = tmp_path / "after"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert summary.classes == list(CLASSES)
    assert summary.skipped == [] and read_csv(out / "skipped.csv") == []
    assert summary.counts == baseline.counts
    assert (out / "manifest.csv").read_bytes() == (tmp_path / "before" / "manifest.csv").read_bytes()


def test_single_class_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "one"
    rng = np.random.default_rng(2)
    for i in range(4):
        write(root / "labeled" / "cat" / f"c{i}.png", png_bytes(rng))
    write(root / "labeled" / ".ipynb_checkpoints" / "c-checkpoint.png", png_bytes(rng))  # not a second class
    write(root / "test" / "cat" / "t.png", png_bytes(rng))
    write(root / "unlabeled" / "u.png", png_bytes(rng))
    with pytest.raises(SstlError) as info:
        prepare_folder(root, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    message = str(info.value)
    assert str(root / "labeled") in message and "only 1 class (cat)" in message and "at least 2 classes" in message
    assert "\n" not in message
    assert not (tmp_path / "prepared" / "labeled.npy").exists(), "refused before packing anything"


def test_no_class_at_all_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "none"
    rng = np.random.default_rng(2)
    write(root / "labeled" / "loose.png", png_bytes(rng))
    write(root / "test" / "cat" / "t.png", png_bytes(rng))
    write(root / "unlabeled" / "u.png", png_bytes(rng))
    with pytest.raises(SstlError, match="no class folder with a readable image: add at least 2 classes"):
        prepare_folder(root, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)


def test_empty_unlabeled_pool_is_refused(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "unlabeled")
    (folder / "unlabeled" / "sub").mkdir(parents=True)
    (folder / "unlabeled" / ".DS_Store").write_bytes(b"litter")
    with pytest.raises(SstlError) as info:
        prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    message = str(info.value)
    assert str(folder / "unlabeled") in message and "add unlabelled photos there" in message
    assert "\n" not in message


def test_unlabeled_pool_of_only_bad_entries_is_refused_and_the_skips_are_kept(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "unlabeled")
    (folder / "unlabeled").mkdir()
    (folder / "unlabeled" / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    write(folder / "unlabeled" / "copy.png", (folder / "test" / "ant" / "tant0.png").read_bytes())
    out = tmp_path / "prepared"
    with pytest.raises(SstlError, match=r"no usable image in .*unlabeled .*1 skipped entries are listed in"):
        prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {"unlabeled/broken.jpg": "broken symbolic link (its target is missing)"}


def test_absent_test_add_is_recorded_as_absent(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    splits = read_json(out / "splits.json")
    assert splits["test-add"] == {"images": 0, "source": "absent (no test-add/ folder)"}
    assert splits["val"]["source"].startswith("held out from labeled/")
    assert {s: v["images"] for s, v in splits.items()} == summary.counts
    assert np.load(out / "test-add.npy").shape == (0, SIZE, SIZE, 3)
    assert len(load_split(out, "test-add")) == 0
    (folder / "test-add").mkdir()
    prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert read_json(out / "splits.json")["test-add"]["source"] == "test-add/ has no readable image"


def test_skip_report_prints_a_count_and_the_first_few() -> None:
    rows = [{"path": f"p{i}.png", "reason": "broken symbolic link"} for i in range(7)]
    lines = skip_report(rows, "data/prepared/skipped.csv", limit=3)
    assert lines[0] == "prepare: skipped 7 entries (all listed in data/prepared/skipped.csv):"
    assert lines[1:4] == [f"  p{i}.png: broken symbolic link" for i in range(3)]
    assert lines[4] == "  ... and 4 more"
    assert skip_report(rows[:1], "x.csv")[0] == "prepare: skipped 1 entry (all listed in x.csv):"
    assert skip_report([], "x.csv") == []


# ---------------------------------------------------------------- the folder's fingerprint (prepare's DVC dep)


def test_fingerprint_is_what_prepare_packed_and_changes_only_with_the_photos(folder: Path, tmp_path: Path) -> None:
    add_bad_entries(folder)
    summary = finishes(
        lambda: prepare_folder(folder, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    )
    first = fingerprint(folder, summary.inventory)
    assert finishes(lambda: fingerprint(folder, folder_inventory(folder))) == first
    assert first["files"] == 21 and first["skipped"] == 5

    photo = folder / "labeled" / "cat" / "cat1.png"
    os.utime(photo, ns=(1, 1))  # touched, copied without -p: same bytes
    write(folder / "labeled" / "cat" / ".DS_Store", b"Finder litter")
    write(folder / "__MACOSX" / "._x", b"more litter")
    assert fingerprint(folder, folder_inventory(folder)) == first

    for change in (
        lambda: write(photo, png_bytes(np.random.default_rng(99))),  # new bytes
        lambda: photo.rename(photo.with_name("renamed.png")),  # moved
        lambda: (folder / "unlabeled" / "dead.jpg").symlink_to(tmp_path / "nothing.jpg"),  # a new skip
        lambda: write(folder / "gone" / "photo.jpg", b"\xff\xd8 now the link resolves"),  # a skip fixed
    ):
        before = fingerprint(folder, folder_inventory(folder))
        change()
        assert fingerprint(folder, folder_inventory(folder)) != before


def test_refresh_rewrites_only_on_change_and_reads_only_changed_files(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sstl.data.inventory

    reads: list[str] = []
    real_read = sstl.data.inventory.read_file

    def counting_read(path: Path | str) -> bytes:
        reads.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(sstl.data.inventory, "read_file", counting_read)
    inventory, cache = tmp_path / "inventory.json", tmp_path / "state" / "cache.json"
    assert refresh_inventory(folder, inventory, cache) is True
    assert len(reads) == 21 and read_json(inventory)["files"] == 21
    reads.clear()
    assert refresh_inventory(folder, inventory, cache) is False
    assert reads == [], "unchanged files are answered from the cache"
    write(folder / "test" / "bee" / "tbee0.png", png_bytes(np.random.default_rng(5)))
    assert refresh_inventory(folder, inventory, cache) is True
    assert reads == ["tbee0.png"]
    reads.clear()
    (folder / "test" / "bee" / "tbee1.png").chmod(0o600)  # ctime moves: read again, as it may now be unreadable
    assert refresh_inventory(folder, inventory, cache) is False
    assert reads == ["tbee1.png"]


def test_refresh_records_a_folder_prepare_would_refuse(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.json"
    assert refresh_inventory(tmp_path / "not-yet", inventory, None) is True
    record = read_json(inventory)
    assert record["folder"] == str(tmp_path / "not-yet") and "not found" in record["error"]
    assert refresh_inventory(tmp_path / "not-yet", inventory, None) is False


# ---------------------------------------------------------------- the real DVC on a folder with bad entries


def run(cwd: Path, *cmd: str, prefix: list[str] | None = None) -> str:
    """A command in `cwd` with this interpreter's folder first on PATH (DVC stages call `python`); a
    hang (DVC hashing a FIFO) fails after the timeout instead of blocking the suite."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run([*(prefix or []), *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout + res.stderr


def dvc_project(tmp_path: Path, photos: Path) -> Path:
    """A git + DVC repo with the project's code, params (data.folder = `photos`) and only the real prepare stage."""
    from conftest import ROOT

    repo = tmp_path / "project"
    repo.mkdir()
    for item in ("stages", "src"):
        shutil.copytree(ROOT / item, repo / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"folder": str(photos), "image_size": SIZE, "interpolation": "bilinear"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["prepare"]}}, sort_keys=False))
    write(repo / "data" / "demo" / "README", b"stands in for the demo stage's output")
    run(repo, "git", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "init", "-q")
    run(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    return repo


@pytest.mark.e2e
def test_dvc_repro_and_status_with_bad_entries_in_the_photo_folder(folder: Path, tmp_path: Path) -> None:
    """Broken links, a FIFO, a socket, a link loop (and, where permissions can be denied, a chmod 000
    photo) in data.folder: `dvc repro` runs prepare, which lists them; `dvc status` is clean until a
    photo changes, touched files and hidden litter do not count, a new photo re-runs prepare."""
    expected = add_bad_entries(folder)
    prefix = unprivileged()
    if prefix is not None:  # else root reads everything: the unreadable case is covered by the tests above
        (folder / "labeled" / "bee" / "bee3.png").chmod(0)
        expected["labeled/bee/bee3.png"] = "unreadable: permission denied"
    repo = dvc_project(tmp_path, folder)

    def dvc(*args: str) -> str:
        return run(repo, sys.executable, "-m", "dvc", *args, prefix=prefix)

    def refresh() -> str:
        return run(repo, sys.executable, "stages/prepare.py", "--refresh", prefix=prefix)

    assert "updated" in refresh()
    out = dvc("repro")
    assert "Running stage 'prepare'" in out and "prepare: skipped" in out
    reasons = skipped_reasons(repo / "data" / "prepared", folder)
    assert set(reasons) == set(expected)
    assert all(reasons[rel].startswith(reason) for rel, reason in expected.items()), reasons
    assert "up to date" in dvc("status")

    os.utime(folder / "labeled" / "cat" / "cat0.png", ns=(10**9, 10**9))
    write(folder / "labeled" / "cat" / ".DS_Store", b"Finder litter")
    write(folder / ".ipynb_checkpoints" / "x.png", b"notebook litter")
    assert "unchanged" in refresh()
    assert "up to date" in dvc("status")
    assert "Running stage" not in dvc("repro")

    write(folder / "unlabeled" / "new.png", png_bytes(np.random.default_rng(77)))
    assert "updated" in refresh()
    status = dvc("status")
    assert "prepare" in status and "data/inventory.json" in status
    assert "Running stage 'prepare'" in dvc("repro")
    assert "unlabeled/new.png" in {r["path"] for r in read_csv(repo / "data" / "prepared" / "manifest.csv")}
    assert "up to date" in dvc("status")


def test_optional_split_that_is_a_broken_link_is_listed(folder: Path, tmp_path: Path) -> None:
    (folder / "test-add").symlink_to(tmp_path / "unmounted-drive" / "test-add")
    write(folder / "val", b"a file where the val/ folder should be")
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {
        "test-add": "broken symbolic link (its target is missing)",
        "val": "not a folder: val/ must be a folder",
    }
    assert summary.counts["test-add"] == 0 and summary.counts["val"] == 3


def test_load_classes_before_prepare_names_the_stage(tmp_path: Path) -> None:
    with pytest.raises(SstlError, match=r"classes.json not found: run the prepare stage first"):
        load_classes(tmp_path)


def test_lazy_split_subsets_like_the_eager_one_and_never_writes_the_file(folder: Path, tmp_path: Path) -> None:
    """The student's pool: memory-mapped copy-on-write; a subset equals the eager one; the .npy is untouched."""
    out = tmp_path / "prepared"
    prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    before = sha(out / "unlabeled.npy")
    eager, lazy = load_split(out, "unlabeled"), load_split(out, "unlabeled", lazy=True)
    index = torch.tensor([2, 0, 2])
    picked = lazy.subset(index)
    assert torch.equal(picked.images, eager.subset(index).images) and picked.paths == eager.subset(index).paths
    lazy.images[0].fill_(7)  # writable (torch needs it), private to this process
    assert sha(out / "unlabeled.npy") == before
    assert not torch.equal(load_split(out, "unlabeled").images[0], lazy.images[0])


@pytest.mark.parametrize("kind", ["absent", "file"])
def test_a_data_folder_that_is_no_folder_is_named_with_the_fix(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "photos.zip"
    if kind == "file":
        target.write_bytes(b"PK\x03\x04")  # an archive given where the folder goes
    with pytest.raises(SstlError) as info:
        prepare_folder(target, tmp_path / "prepared", image_size=SIZE, val_fraction=0.25, seed=0)
    said = "is a file, not a folder" if kind == "file" else "not found"
    assert f"data folder {target} {said}" in str(info.value) and "set data.folder" in str(info.value)
    assert not (tmp_path / "prepared").exists()  # nothing half-written


def test_a_refused_or_failing_prepare_leaves_the_previous_output_whole(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "skipped.csv"}
    write(folder / "unlabeled" / "new.png", png_bytes(np.random.default_rng(5)))  # would change the arrays
    shutil.rmtree(folder / "test")
    (folder / "test").mkdir()  # now empty: refused after every image was read
    with pytest.raises(SstlError, match="test"):
        prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "skipped.csv"} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]  # no temp folder left


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed(folder: Path, tmp_path: Path) -> None:
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes in a name: no UTF-8 CSV could hold it
    write(folder / "unlabeled" / bad, png_bytes(np.random.default_rng(6)))
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert skipped_reasons(out, folder) == {"unlabeled/caf\ufffd.png": "file name is not valid UTF-8: rename it"}
    assert summary.counts["unlabeled"] == 3


def test_an_unreadable_data_folder_is_one_line_for_sstl_run_and_status(folder: Path, tmp_path: Path) -> None:
    # chmod 000 on the photo folder; root reads it anyway, so the commands run without root's bypass
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without a working setpriv: chmod 000 stays readable, nothing is denied")
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(f"data: {{folder: {folder}}}\n")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    folder.chmod(0)
    try:
        for command in ("run", "status"):
            res = subprocess.run(
                [*prefix, sys.executable, "-m", "sstl.cli", command], cwd=project, capture_output=True, text=True
            )
            assert res.returncode == 1, res.stderr
            assert res.stderr.strip().splitlines() == [
                f"error: cannot read data folder {folder}: unreadable: permission denied: make it readable "
                "(chmod) or set data.folder in params.yaml to another folder"
            ]
    finally:
        folder.chmod(0o755)


def test_a_split_folder_that_is_a_link_to_another_disk_is_read(folder: Path, tmp_path: Path) -> None:
    # unlabeled/ as a link to a big pool elsewhere is the split itself, not a link out of it
    pool = tmp_path / "big-disk" / "pool"
    shutil.move(folder / "unlabeled", pool)
    (folder / "unlabeled").symlink_to(pool, target_is_directory=True)
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, image_size=SIZE, val_fraction=0.25, seed=0)
    assert summary.counts["unlabeled"] == 3 and skipped_reasons(out, folder) == {}
