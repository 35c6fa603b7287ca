"""Ingest an image folder into packed splits (the seeds' TFRecords step, as .npy arrays).

Layout read: labeled/<class>/**, unlabeled/** (any nesting), test/<class>/**, and optionally
val/<class>/** (else a seeded stratified split of labeled) and test-add/<class>/**.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sstl.corruptions import CorruptConfig, corrupt
from sstl.dataset import MANIFEST_FIELDS, SPLITS, save_images
from sstl.errors import SstlError
from sstl.files import write_csv, write_json
from sstl.images import IMAGE_SUFFIXES, UnreadableImage, decode
from sstl.neardup import REPORT_FIELDS as NEARDUP_FIELDS
from sstl.neardup import NearDupConfig, find_near_duplicates, report_rows

LABELLED_SPLITS = ("labeled", "val", "test", "test-add")
EVAL_SPLITS = ("val", "test", "test-add")


@dataclass
class Entry:
    path: Path
    split: str
    label: str  # "" for unlabelled images
    sha256: str = ""


@dataclass
class PrepareSummary:
    counts: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates_dropped: int = 0
    classes: list[str] = field(default_factory=list)
    near_duplicates_dropped: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {
            **{f"n_{s.replace('-', '_')}": n for s, n in self.counts.items()},
            "n_classes": len(self.classes),
            "n_skipped": len(self.skipped),
            "n_duplicates_dropped": self.duplicates_dropped,
            "n_near_duplicates_dropped": self.near_duplicates_dropped,
        }


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, move round(n * fraction) items (at least 1 when n >= 2) to the second part.

    Returns sorted index arrays (keep, held_out); the same labels and seed give the same split.
    """
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_out = min(max(round(len(idx) * fraction), 1 if len(idx) >= 2 else 0), len(idx) - 1)
        held.extend(rng.permutation(idx)[:n_out].tolist())
    held_arr = np.sort(np.asarray(held, dtype=np.int64))
    keep = np.setdiff1d(np.arange(len(labels)), held_arr)
    return keep, held_arr


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def scan(root: Path) -> tuple[list[Entry], list[dict[str, str]]]:
    """All candidate image files with split and label; files with a non-image suffix are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise SstlError(f"data folder {root} not found: set data.folder in params.yaml to your image folder")
    for required in ("labeled", "unlabeled", "test"):
        if not (root / required).is_dir():
            raise SstlError(f"{root / required} not found: the data folder needs labeled/, unlabeled/ and test/")
    entries: list[Entry] = []
    skipped: list[dict[str, str]] = []

    def add(path: Path, split: str, label: str) -> None:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            entries.append(Entry(path, split, label))
        else:
            skipped.append({"path": str(path), "reason": f"not an image file (suffix {path.suffix or 'none'!r})"})

    for split in LABELLED_SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        for item in sorted(folder.iterdir()):
            if item.is_dir():
                for path in _files(item):
                    add(path, split, item.name)
            else:
                skipped.append({"path": str(item), "reason": f"not inside a class folder of {split}/"})
    for path in _files(root / "unlabeled"):
        add(path, "unlabeled", "")
    return entries, skipped


def prepare_folder(
    root: Path,
    out: Path,
    image_size: int,
    val_fraction: float,
    seed: int,
    neardup: NearDupConfig | None = None,
    corrupt_test: CorruptConfig | None = None,
    interpolation: str = "bicubic",
) -> PrepareSummary:
    """Decode, check, de-duplicate and split `root`; write <split>.npy, manifest.csv, skipped.csv, classes.json.

    With `neardup` (enabled), unlabelled near-duplicates of val/test/test-add images are dropped too and
    listed in neardup.csv (unlabeled_path, eval_path, eval_split, similarity; paths relative to `root`,
    most similar first); without it neardup.csv is written empty.
    """
    entries, skipped = scan(root)
    arrays: list[np.ndarray] = []
    kept: list[Entry] = []
    for entry in tqdm(entries, desc="decode", unit="img", disable=None):
        data = entry.path.read_bytes()
        try:
            arrays.append(decode(data, image_size, interpolation))
        except UnreadableImage as err:
            skipped.append({"path": str(entry.path), "reason": str(err)})
            continue
        entry.sha256 = hashlib.sha256(data).hexdigest()
        kept.append(entry)

    classes = sorted({e.label for e in kept if e.split == "labeled"})
    class_dirs = sorted(p.name for p in (Path(root) / "labeled").iterdir() if p.is_dir())
    for name in class_dirs:
        if name not in classes:
            raise SstlError(
                f"class {name!r} has no readable labelled image: add images to labeled/{name}/ or remove it"
            )
    for split in ("val", "test", "test-add"):
        unknown = sorted({e.label for e in kept if e.split == split} - set(classes))
        if unknown:
            raise SstlError(
                f"{split}/ has classes not in labeled/: {', '.join(unknown)}; add them to labeled/ or remove them"
            )

    if not any(e.split == "val" for e in kept):  # split val off first, so de-duplication covers it too
        lab = [i for i, e in enumerate(kept) if e.split == "labeled"]
        labels = np.array([classes.index(kept[i].label) for i in lab])
        _, held = stratified_split(labels, val_fraction, seed)
        for j in held:
            kept[lab[j]].split = "val"

    # Exact duplicates of evaluation images must not leak into the unlabelled pool.
    eval_hashes = {e.sha256: e.path for e in kept if e.split in EVAL_SPLITS}
    order: list[int] = []
    dropped = 0
    for i, e in enumerate(kept):
        if e.split == "unlabeled" and e.sha256 in eval_hashes:
            skipped.append({"path": str(e.path), "reason": f"duplicate of evaluation image {eval_hashes[e.sha256]}"})
            dropped += 1
        else:
            order.append(i)

    # Nor may near-duplicates (re-encoded, resized, cropped, brightened copies): see sstl.neardup.
    near_rows: list[dict[str, str]] = []
    if neardup is not None and neardup.enabled:
        pool_idx = [i for i in order if kept[i].split == "unlabeled"]
        ref_idx = [i for i in order if kept[i].split in EVAL_SPLITS]
        matches = find_near_duplicates([arrays[i] for i in pool_idx], [arrays[i] for i in ref_idx], neardup)
        near_rows = report_rows(
            matches,
            [str(kept[i].path.relative_to(root)) for i in pool_idx],
            [str(kept[i].path.relative_to(root)) for i in ref_idx],
            [kept[i].split for i in ref_idx],
        )
        near = {pool_idx[m.pool_index] for m in matches}
        order = [i for i in order if i not in near]

    if corrupt_test is not None:
        if any(kept[i].split == "test-add" for i in order):
            raise SstlError("the folder has a test-add/ and data.test_add_corruptions is set: use one or the other")
        tests = [i for i in order if kept[i].split == "test"]
        images, kinds = corrupt([arrays[i] for i in tests], corrupt_test)
        for i, img, kind in zip(tests, images, kinds, strict=True):
            src = kept[i]
            kept.append(
                Entry(Path(f"{src.path}#{kind}"), "test-add", src.label, hashlib.sha256(img.tobytes()).hexdigest())
            )
            arrays.append(img)
            order.append(len(kept) - 1)

    out = Path(out)
    rows, counts = [], {}
    for split in SPLITS:
        idx = [i for i in order if kept[i].split == split]
        counts[split] = len(idx)
        stack = np.stack([arrays[i] for i in idx]) if idx else np.zeros((0, image_size, image_size, 3), np.uint8)
        save_images(out / f"{split}.npy", stack)
        for i in idx:
            e = kept[i]
            rows.append(
                {
                    "path": str(e.path.relative_to(root)),
                    "split": split,
                    "label": e.label,
                    "label_index": classes.index(e.label) if e.label else -1,
                    "sha256": e.sha256,
                }
            )
    for split in ("labeled", "val", "test"):
        if counts[split] == 0:
            raise SstlError(f"no readable image in {split}: check the folder {root}")
    write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)
    write_csv(out / "skipped.csv", skipped, ("path", "reason"))
    write_csv(out / "neardup.csv", near_rows, NEARDUP_FIELDS)
    write_json(out / "classes.json", classes)
    write_json(out / "packing.json", {"image_size": image_size, "interpolation": interpolation})
    return PrepareSummary(counts, skipped, dropped, classes, len(near_rows))
