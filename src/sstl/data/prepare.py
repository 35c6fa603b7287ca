"""Ingest an image folder into packed splits (the seeds' TFRecords step, as .npy arrays).

Layout read: labeled/<class>/**, unlabeled/** (any nesting), test/<class>/**, and optionally
val/<class>/** (else a seeded stratified split of labeled) and test-add/<class>/**.

Users' folders hold more than photos: broken links, FIFOs, sockets, unreadable files are skipped and
listed in skipped.csv with the reason; hidden entries (.DS_Store, .git, __MACOSX, ...) are ignored.
DVC cannot hash such a folder (it stops on a broken link, hangs on a FIFO), so the prepare stage
depends on the folder's fingerprint, data/inventory.json, instead: see refresh_inventory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sstl.config.data import CorruptConfig, NearDupConfig
from sstl.core.errors import SstlError
from sstl.core.files import atomic_folder, write_csv, write_json
from sstl.data.corruptions import corrupt
from sstl.data.dataset import MANIFEST_FIELDS, SPLITS, save_images
from sstl.data.images import UnreadableImage, decode, read_file
from sstl.data.neardup import REPORT_FIELDS as NEARDUP_FIELDS
from sstl.data.neardup import find_near_duplicates, report_rows
from sstl.data.scan import EVAL_SPLITS, SKIPPED, Entry, relative, scan, skip


@dataclass
class PrepareSummary:
    counts: dict[str, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates_dropped: int = 0
    classes: list[str] = field(default_factory=list)
    near_duplicates_dropped: int = 0
    inventory: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 or "skipped: reason"
    sources: dict[str, str] = field(default_factory=dict)  # split -> where its images came from

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


def skip_report(skipped: list[dict[str, str]], where: Path | str, limit: int = 5) -> list[str]:
    """A count and the first few skipped entries, for the console; the full list is in `where`."""
    if not skipped:
        return []
    lines = [f"prepare: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} (all listed in {where}):"]
    lines += [f"  {row['path']}: {row['reason']}" for row in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return lines


def prepare_folder(
    root: Path,
    out: Path,
    *,
    image_size: int,
    val_fraction: float,
    seed: int,
    neardup: NearDupConfig | None = None,
    corrupt_test: CorruptConfig | None = None,
    interpolation: str = "bicubic",
) -> PrepareSummary:
    """Decode, check, de-duplicate and split `root`; write <split>.npy, manifest.csv, skipped.csv,
    neardup.csv, classes.json, packing.json and splits.json (each split's count and source).

    With `neardup` (enabled), unlabelled near-duplicates of val/test/test-add images are dropped too and
    listed in neardup.csv (unlabeled_path, eval_path, eval_split, similarity; paths relative to `root`,
    most similar first); without it neardup.csv is written empty. skipped.csv is written before the
    checks, so a refused folder still shows which entries were skipped and why. The folder is written
    whole or not at all: a failed or killed run leaves the previous one as it was (but for skipped.csv,
    the refused folder's skip list).
    """
    root, out = Path(root), Path(out)
    with atomic_folder(out) as tmp:
        return _prepare(root, tmp, image_size, val_fraction, seed, neardup, corrupt_test, interpolation, out)


@contextmanager
def _listed_if_refused(final: Path, skipped: list[dict[str, str]]) -> Iterator[None]:
    """A check that refuses the folder: its skip list goes where the message points (`final`), the rest
    of the previous output stays as it was."""
    try:
        yield
    except SstlError:
        write_csv(final / "skipped.csv", skipped, ("path", "reason"))
        raise


def _prepare(
    root: Path,
    out: Path,
    image_size: int,
    val_fraction: float,
    seed: int,
    neardup: NearDupConfig | None,
    corrupt_test: CorruptConfig | None,
    interpolation: str,
    final: Path,
) -> PrepareSummary:
    found = scan(root)
    skipped = list(found.skipped)
    inventory = {relative(root, r["path"]): SKIPPED + r["reason"] for r in skipped}
    kept, arrays = _read_all(root, found.entries, image_size, interpolation, skipped, inventory)
    note = f" ({len(skipped)} skipped entries are listed in {final / 'skipped.csv'})" if skipped else ""
    listed = list(skipped)  # what a refusal lists (the note counts these), before de-duplication adds to it
    with _listed_if_refused(final, listed):
        classes = _check_classes(root, kept, found.class_dirs, note)

    val_from_folder = any(e.split == "val" for e in kept)
    if not val_from_folder:  # split val off first, so de-duplication covers it too
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
            skipped.append(skip(e.path, f"duplicate of evaluation image {eval_hashes[e.sha256]}"))
            dropped += 1
        else:
            order.append(i)

    # Nor may near-duplicates (re-encoded, resized, cropped, brightened copies): see sstl.data.neardup.
    near_rows: list[dict[str, str]] = []
    if neardup is not None and neardup.enabled:
        pool_idx = [i for i in order if kept[i].split == "unlabeled"]
        ref_idx = [i for i in order if kept[i].split in EVAL_SPLITS]
        matches = find_near_duplicates([arrays[i] for i in pool_idx], [arrays[i] for i in ref_idx], neardup)
        near_rows = report_rows(
            matches,
            [relative(root, kept[i].path) for i in pool_idx],
            [relative(root, kept[i].path) for i in ref_idx],
            [kept[i].split for i in ref_idx],
        )
        near = {pool_idx[m.pool_index] for m in matches}
        order = [i for i in order if i not in near]

    test_add_from_folder = any(kept[i].split == "test-add" for i in order)
    if corrupt_test is not None:
        if test_add_from_folder:
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

    by_split = {split: [i for i in order if kept[i].split == split] for split in SPLITS}
    counts = {split: len(idx) for split, idx in by_split.items()}
    with _listed_if_refused(final, listed):
        _check_counts(root, counts, note)
    write_csv(out / "skipped.csv", skipped, ("path", "reason"))  # with the dropped duplicates
    rows = []
    for split, idx in by_split.items():
        stack = np.stack([arrays[i] for i in idx]) if idx else np.zeros((0, image_size, image_size, 3), np.uint8)
        save_images(out / f"{split}.npy", stack)
        for i in idx:
            e = kept[i]
            rows.append(
                {
                    "path": relative(root, e.path),
                    "split": split,
                    "label": e.label,
                    "label_index": classes.index(e.label) if e.label else -1,
                    "sha256": e.sha256,
                }
            )
    sources = split_sources(
        root,
        counts,
        val_from_folder=val_from_folder,
        test_add_corrupted=corrupt_test is not None,
        val_fraction=val_fraction,
    )
    write_csv(out / "manifest.csv", rows, MANIFEST_FIELDS)
    write_csv(out / "neardup.csv", near_rows, NEARDUP_FIELDS)
    write_json(out / "classes.json", classes)
    write_json(out / "packing.json", {"image_size": image_size, "interpolation": interpolation})
    write_json(out / "splits.json", {s: {"images": counts[s], "source": sources[s]} for s in SPLITS})
    return PrepareSummary(counts, skipped, dropped, classes, len(near_rows), inventory, sources)


def _read_all(
    root: Path,
    entries: list[Entry],
    image_size: int,
    interpolation: str,
    skipped: list[dict[str, str]],
    inventory: dict[str, str],
) -> tuple[list[Entry], list[np.ndarray]]:
    """Read and decode every candidate; an unreadable file or image joins `skipped` instead of stopping.

    `inventory` gets each file's sha256 (or its skip reason), as folder_inventory computes it, so the
    fingerprint the stage records is that of the bytes actually packed."""
    kept: list[Entry] = []
    arrays: list[np.ndarray] = []
    for entry in tqdm(entries, desc="decode", unit="img", disable=None):
        try:
            data = read_file(entry.path)
        except UnreadableImage as err:
            skipped.append(skip(entry.path, str(err)))
            inventory[relative(root, entry.path)] = SKIPPED + str(err)
            continue
        entry.sha256 = hashlib.sha256(data).hexdigest()
        inventory[relative(root, entry.path)] = entry.sha256
        try:
            arrays.append(decode(data, image_size, interpolation))
        except UnreadableImage as err:
            skipped.append(skip(entry.path, str(err)))
            continue
        kept.append(entry)
    return kept, arrays


def _check_classes(root: Path, kept: list[Entry], class_dirs: list[str], note: str) -> list[str]:
    """The classes (labeled/ folders with a readable image); refuse an empty class, fewer than two
    classes (one class trains a model that is trivially always right), or an evaluation-only class."""
    classes = sorted({e.label for e in kept if e.split == "labeled"})
    for name in class_dirs:
        if name not in classes:
            raise SstlError(
                f"class {name!r} has no readable labelled image: add images to labeled/{name}/ or remove it{note}"
            )
    if len(classes) < 2:
        found = f"only {len(classes)} class ({classes[0]})" if classes else "no class folder with a readable image"
        raise SstlError(
            f"{root / 'labeled'} has {found}: add at least 2 classes, one folder of photos per class "
            f"(labeled/<class>/){note}"
        )
    for split in ("val", "test", "test-add"):
        unknown = sorted({e.label for e in kept if e.split == split} - set(classes))
        if unknown:
            raise SstlError(
                f"{split}/ has classes not in labeled/: {', '.join(unknown)}; add them to labeled/ or remove them"
            )
    return classes


def _check_counts(root: Path, counts: dict[str, int], note: str) -> None:
    """Every split the pipeline needs has images. An empty pool is refused rather than run: the
    student would train on the labelled images alone and pretrain (when enabled) has nothing to learn."""
    for split in ("labeled", "val", "test"):
        if counts[split] == 0:
            raise SstlError(f"no readable image in {split}: check the folder {root}{note}")
    if counts["unlabeled"] == 0:
        raise SstlError(
            f"no usable image in {root / 'unlabeled'} (none readable, or all copies of val/test images): "
            f"add unlabelled photos there, in any subfolders; sstl pseudo-labels them to train the student{note}"
        )


def split_sources(
    root: Path, counts: dict[str, int], *, val_from_folder: bool, test_add_corrupted: bool, val_fraction: float
) -> dict[str, str]:
    """Where each split came from, for splits.json; an absent test-add is recorded as such, not as an error."""
    sources = {split: f"{split}/" for split in SPLITS}
    if not val_from_folder:
        sources["val"] = f"held out from labeled/ (data.val_fraction={val_fraction})"
    if test_add_corrupted:
        sources["test-add"] = "test/ under corruptions (data.test_add_corruptions)"
    elif counts["test-add"] == 0:
        folder = root / "test-add"
        sources["test-add"] = "test-add/ has no readable image" if folder.is_dir() else "absent (no test-add/ folder)"
    return sources
