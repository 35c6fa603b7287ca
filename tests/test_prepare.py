"""prepare: stratified split, and a whole image folder -> packed .npy splits, manifest, skip report."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sstl.dataset import SPLITS, load_classes, load_split
from sstl.errors import SstlError
from sstl.files import read_csv, read_json
from sstl.images import decode
from sstl.prepare import prepare_folder, stratified_split

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
    summary = prepare_folder(folder, out, SIZE, 0.25, seed=0)

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
    prepare_folder(folder, out, SIZE, 0.25, seed=0)
    for split in ("labeled", "val", "test", "unlabeled"):
        data = load_split(out, split)
        for img, path in zip(data.images.numpy(), data.paths, strict=True):
            np.testing.assert_array_equal(img, decode((folder / path).read_bytes(), SIZE))


def test_load_split_labels_match_class_folders(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_folder(folder, out, SIZE, 0.25, seed=0)
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
    prepare_folder(folder, tmp_path / "a", SIZE, 0.25, seed=5)
    prepare_folder(folder, tmp_path / "b", SIZE, 0.25, seed=5)
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
    summary = prepare_folder(folder, out, SIZE, 0.25, seed=0)

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
    summary = prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)
    assert [Path(s["path"]).name for s in summary.skipped] == ["stray.png"]
    assert "class folder" in summary.skipped[0]["reason"]


def test_unlabeled_duplicate_of_test_image_is_dropped(folder: Path, tmp_path: Path) -> None:
    test_img = folder / "test" / "cat" / "tcat0.png"
    dup = folder / "unlabeled" / "sub" / "copy_of_test.png"
    shutil.copyfile(test_img, dup)
    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, SIZE, 0.25, seed=0)

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
    summary = prepare_folder(folder, out, SIZE, 0.25, seed=0)

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
    summary = prepare_folder(folder, out, SIZE, 0.5, seed=0)

    assert summary.counts["labeled"] == 12, "nothing is split off labeled/ when val/ exists"
    assert summary.counts["val"] == 2
    val = [r for r in read_csv(out / "manifest.csv") if r["split"] == "val"]
    assert {r["path"] for r in val} == {"val/ant/vant.png", "val/bee/vbee.png"}


def test_test_add_folder(folder: Path, tmp_path: Path) -> None:
    write(folder / "test-add" / "bee" / "extra.png", png_bytes(np.random.default_rng(5)))
    summary = prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)
    assert summary.counts["test-add"] == 1
    assert np.load(tmp_path / "prepared" / "test-add.npy").shape == (1, SIZE, SIZE, 3)
    assert load_split(tmp_path / "prepared", "test-add").labels.tolist() == [1]


def test_mixed_formats_and_sizes(folder: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for fmt, suffix in (("JPEG", ".JPG"), ("BMP", ".bmp"), ("WEBP", ".webp")):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)).save(buf, fmt)
        write(folder / "labeled" / "cat" / f"x{suffix}", buf.getvalue())
    summary = prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)
    assert summary.skipped == []
    assert summary.counts["labeled"] + summary.counts["val"] == 15


def test_class_with_only_corrupt_files_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "labeled" / "dog" / "bad.png", b"\x89PNG\r\n\x1a\n broken")
    write(folder / "labeled" / "dog" / "bad2.jpg", b"")
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_test_class_not_in_labeled_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "test" / "dog" / "d.png", png_bytes(np.random.default_rng(3)))
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_val_class_not_in_labeled_is_an_error(folder: Path, tmp_path: Path) -> None:
    write(folder / "val" / "dog" / "d.png", png_bytes(np.random.default_rng(3)))
    with pytest.raises(SstlError, match="dog"):
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_missing_test_folder_is_an_error(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "test")
    with pytest.raises(SstlError, match="test"):
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_empty_test_folder_is_an_error(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "test")
    (folder / "test").mkdir()
    with pytest.raises(SstlError, match="test"):
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SstlError, match="not found"):
        prepare_folder(tmp_path / "nowhere", tmp_path / "prepared", SIZE, 0.25, seed=0)


def test_errors_are_one_line(folder: Path, tmp_path: Path) -> None:
    shutil.rmtree(folder / "unlabeled")
    with pytest.raises(SstlError) as info:
        prepare_folder(folder, tmp_path / "prepared", SIZE, 0.25, seed=0)
    assert "unlabeled" in str(info.value)
    assert "\n" not in str(info.value)


def test_test_add_built_from_corrupted_test_images(folder: Path, tmp_path: Path) -> None:
    from sstl.corruptions import CorruptConfig

    out = tmp_path / "prepared"
    summary = prepare_folder(folder, out, 16, 0.25, 0, corrupt_test=CorruptConfig(severity=4, seed=1))
    assert summary.counts["test-add"] == summary.counts["test"]
    test, add = load_split(out, "test"), load_split(out, "test-add")
    assert test.labels.tolist() == add.labels.tolist()
    assert all(a.startswith(t + "#") for t, a in zip(test.paths, add.paths, strict=True))
    assert (test.images != add.images).any()
    some_test = next((folder / "test").rglob("*.png"))
    write(folder / "test-add" / some_test.parent.name / "x.png", png_bytes(np.random.default_rng(9)))
    with pytest.raises(SstlError, match="one or the other"):
        prepare_folder(folder, tmp_path / "p2", 16, 0.25, 0, corrupt_test=CorruptConfig())
