"""Reading a photo folder: which files are images of which split and class, and which are skipped, with why."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sstl.core.errors import SstlError
from sstl.data.images import IMAGE_SUFFIXES, children, classify, inside, os_reason, printable, walk

LABELLED_SPLITS = ("labeled", "val", "test", "test-add")
EVAL_SPLITS = ("val", "test", "test-add")
SKIPPED = "skipped: "  # inventory value prefix for an entry that is not a readable file


@dataclass
class Entry:
    path: Path
    split: str
    label: str  # "" for unlabelled images
    sha256: str = ""


@dataclass
class Scan:
    """What a folder holds: candidate image files, entries skipped (with reasons), labeled/ class folders."""

    entries: list[Entry] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    class_dirs: list[str] = field(default_factory=list)


def skip(path: Path | str, reason: str) -> dict[str, str]:
    return {"path": printable(path), "reason": reason}


def check_folder(root: Path) -> None:
    """The photo folder exists, is a folder, can be read, and holds labeled/, unlabeled/ and test/;
    else one line naming what is wrong and the fix."""
    try:
        if root.exists() and not root.is_dir():
            raise SstlError(
                f"data folder {root} is a file, not a folder: set data.folder in params.yaml to the folder that "
                "holds labeled/, unlabeled/ and test/"
            )
        if not root.is_dir():
            raise SstlError(f"data folder {root} not found: set data.folder in params.yaml to your image folder")
        os.listdir(root)
        for required in ("labeled", "unlabeled", "test"):
            if not (root / required).is_dir():
                raise SstlError(f"{root / required} not found: the data folder needs labeled/, unlabeled/ and test/")
    except OSError as err:  # the folder (or one above it) cannot be read: permissions, a dead mount
        raise SstlError(
            f"cannot read data folder {root}: {os_reason(err, root)}: make it readable (chmod) or set data.folder "
            "in params.yaml to another folder"
        ) from None


def scan(root: Path) -> Scan:
    """All candidate image files with split and label, and every other entry with why it is skipped.

    Only stat() and listdir() are used: nothing is opened, so no FIFO can block the scan."""
    root = Path(root)
    check_folder(root)
    found = Scan()
    for split in LABELLED_SPLITS:
        is_dir, problem = classify(root / split)
        if is_dir:
            _scan_classes(root / split, split, found)
        elif os.path.lexists(root / split):  # e.g. test-add as a broken link: say so, not "absent"
            found.skipped.append(skip(root / split, problem or f"not a folder: {split}/ must be a folder"))
    for path, problem in walk(root / "unlabeled", within=[root]):
        _add(found, path, problem, "unlabeled", "")
    return found


def _scan_classes(folder: Path, split: str, found: Scan) -> None:
    """<split>/<class>/** : every non-hidden subfolder is a class; anything loose beside them is skipped."""
    # the photo folder, and the split folder itself (a link to another disk is fine): links may lead
    # anywhere inside them, not out
    allowed = [folder.parent, folder]
    boundaries = [os.path.realpath(b) for b in allowed]
    try:
        items = list(children(folder))
    except OSError as err:
        found.skipped.append(skip(folder, f"folder {os_reason(err, folder)}"))
        return
    for path, is_dir, problem in items:
        if not is_dir:
            _add(found, path, problem or f"not inside a class folder of {split}/", split, "")
            continue
        if not inside(path, boundaries):  # a class folder linked in from outside
            found.skipped.append(skip(path, "symbolic link to a folder outside the photo folder: not followed"))
            continue
        if split == "labeled":
            found.class_dirs.append(path.name)
        for file, file_problem in walk(path, within=allowed):
            _add(found, file, file_problem, split, path.name)


def _add(found: Scan, path: Path, problem: str, split: str, label: str) -> None:
    if problem:
        found.skipped.append(skip(path, problem))
    elif path.suffix.lower() not in IMAGE_SUFFIXES:
        found.skipped.append(skip(path, f"not an image file (suffix {path.suffix or 'none'!r})"))
    else:
        found.entries.append(Entry(path, split, label))


def relative(root: Path, path: Path | str) -> str:
    return Path(printable(path)).relative_to(printable(root)).as_posix()
