"""Importing the labels of a filled queue: the photos move from unlabeled/ to labeled/<class>/, with a record."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sstl.core.errors import SstlError
from sstl.core.files import atomic_path, check_writable, read_csv
from sstl.data.images import IMAGE_SUFFIXES, children, is_hidden

RECORD = "label-imports.csv"  # at the photo folder's root: prepare never reads it (only the split folders)
RECORD_FIELDS = ("time", "source", "destination", "label", "guess", "queue")
QUEUE_COLUMNS = ("rank", "image", "source", "guess", "guess_probability", "second_guess", "score", "label")
# a new class's name: a folder name on every system and a safe spreadsheet cell (no leading = + - @, no
# control, zero-width or other invisible characters); \w is Unicode-aware, so non-Latin names are fine
CLASS_NAME = re.compile(r"[^\W_](?:[\w .-]*[\w.-])?")


def folder_classes(folder: Path) -> list[str]:
    """The project's class names: the non-hidden folders of <folder>/labeled/, as prepare reads them."""
    labeled = Path(folder) / "labeled"
    if not labeled.is_dir():
        raise SstlError(f"{labeled} not found: pass --folder, the photo folder the queue was made from")
    return sorted(path.name for path, is_dir, _ in children(labeled) if is_dir)


@dataclass
class Move:
    row: int  # line in the CSV (the header is line 1)
    source: Path
    destination: Path
    label: str
    guess: str


@dataclass
class ImportPlan:
    moves: list[Move] = field(default_factory=list)
    unlabelled: int = 0  # rows with an empty label: left in unlabeled/
    already: int = 0  # rows recorded as imported before: a re-import skips them


def read_labels(path: Path) -> list[dict[str, str]]:
    """The rows of a labelled queue CSV; it must have one `source` and one `label` column, and a label
    in at least one row. A byte-order mark (Excel's "CSV UTF-8") is read past."""
    if not Path(path).is_file():
        raise SstlError(f"{path} not found: pass the queue.csv that label-queue wrote, with its label column filled")
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SstlError(f"{path} is not a readable CSV ({err}): export it as UTF-8 CSV") from None
    missing = [c for c in ("source", "label") if c not in header]
    if missing:
        raise SstlError(f"{path} has no {' or '.join(missing)} column: pass the queue.csv that label-queue wrote")
    for name in ("source", "label"):
        at = [i + 1 for i, c in enumerate(header) if c == name]
        if len(at) > 1:  # DictReader would keep the last one without a word
            raise SstlError(f"{path} has {len(at)} {name} columns (columns {', '.join(map(str, at))}): keep one")
    if rows and not any((r.get("label") or "").strip() for r in rows):
        filled = [c for c in header if c not in QUEUE_COLUMNS and any((r.get(c) or "").strip() for r in rows)]
        hint = f"; column {filled[0]!r} has values: is the answer there? rename it to label" if filled else ""
        raise SstlError(f"{path}: no row has a label (the label column is empty){hint}")
    return rows


def check_class_name(label: str, row: int, classes: Sequence[str], *, new_classes: bool) -> None:
    """A known class; a new one only with --new-classes, and then one a folder can be named."""
    if label in classes:
        return
    if not new_classes:
        near = [c for c in classes if c.casefold() == label.casefold()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SstlError(
            f"row {row}: unknown class {label!r}{hint}; known classes: {', '.join(classes)} "
            "(pass --new-classes to add it as a class)"
        )
    twin = [c for c in classes if c.casefold() == label.casefold()]
    if twin:  # two folders on Linux, one on macOS and Windows, and a confusion everywhere
        raise SstlError(f"row {row}: {label!r} differs from the class {twin[0]!r} only in case: use {twin[0]!r}")
    if not CLASS_NAME.fullmatch(label) or label in (".", "..") or is_hidden(label):
        raise SstlError(
            f"row {row}: {label!r} cannot be a class name: use letters, digits, spaces, . - or _, "
            "starting with a letter or a digit"
        )


def imported(record: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Source (relative to the folder) -> its last import record."""
    return {r["source"]: r for r in record}


def plan_import(
    rows: list[dict[str, str]], folder: Path, *, new_classes: bool = False, record: list[dict[str, str]] | None = None
) -> ImportPlan:
    """Every check, before anything moves: labels, sources (present, in unlabeled/), destinations (free,
    distinct). A row that `record` shows imported with the same label is skipped: re-importing is a no-op."""
    classes = folder_classes(folder)
    pool = os.path.abspath(Path(folder) / "unlabeled")
    done = imported(record or [])
    plan, seen = ImportPlan(), dict[str, int]()
    for row, entry in enumerate(rows, start=2):
        label = (entry.get("label") or "").strip()
        if not label:
            plan.unlabelled += 1
            continue
        check_class_name(label, row, classes, new_classes=new_classes)
        source = Path(os.path.abspath(entry.get("source") or ""))
        if os.path.lexists(source):
            check_source(source, row)
        if not in_pool(source, pool):
            raise SstlError(
                f"row {row}: source {source} is not in {pool}/: pass --folder, the photo folder the queue was made from"
            )
        destination = Path(folder) / "labeled" / label / source.name
        rel = relative_to(folder, source)
        if not os.path.lexists(source):
            if already_imported(done.get(rel), label, folder, row, source):
                plan.already += 1
                continue
            raise SstlError(
                f"row {row}: source {source} not found (moved or deleted since the queue was made): "
                "restore it or remove the row"
            )
        if os.path.lexists(destination):
            raise SstlError(f"row {row}: {destination} already exists: rename one of the two photos, then import again")
        for key, what in ((str(source), "source"), (str(destination), "destination")):
            if key in seen:
                raise SstlError(f"row {row}: same {what} as row {seen[key]} ({key}): keep one of the two rows")
            seen[key] = row
        plan.moves.append(Move(row, source, destination, label, entry.get("guess", "")))
    return plan


def in_pool(source: Path, pool: str) -> bool:
    """Whether `source` lies in the pool by its real path: a linked folder inside unlabeled/ that leads
    elsewhere does not bring its files in (the photo folder itself may be named through a link)."""
    return os.path.realpath(source).startswith(os.path.realpath(pool) + os.sep)


def check_source(source: Path, row: int) -> None:
    """Only a photo moves: a regular file with an image suffix, not a link, a folder or a FIFO."""
    if source.suffix.lower() not in IMAGE_SUFFIXES:
        raise SstlError(
            f"row {row}: {source} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}): remove the row"
        )
    if os.path.islink(source):
        raise SstlError(f"row {row}: {source} is a symbolic link: label-import moves photos, not links; remove the row")
    if not os.path.isfile(source):
        raise SstlError(f"row {row}: {source} is not a regular file: only photos move, remove the row")


def already_imported(done: dict[str, str] | None, label: str, folder: Path, row: int, source: Path) -> bool:
    """True when the record shows this source imported as `label` and the photo is still there;
    an import under another label is an error (relabelling a moved photo is a move by hand)."""
    if done is None or not os.path.lexists(Path(folder) / done["destination"]):
        return False
    if done["label"] != label:
        raise SstlError(
            f"row {row}: {source} was already imported as {done['label']!r} ({done['destination']}): "
            f"move it to labeled/{label}/ by hand"
        )
    return True


def relative_to(folder: Path, path: Path) -> str:
    return Path(os.path.relpath(path, os.path.abspath(folder))).as_posix()


def move_all(moves: list[Move]) -> None:
    """Move every photo, or none: on a failure the ones already moved go back (class folders made for
    them removed again), and one line says why."""
    done: list[Move] = []
    made: list[Path] = []
    current = moves[0]
    try:
        for current in moves:
            if os.path.lexists(current.destination):  # appeared since the checks: never overwrite a photo
                raise SstlError(f"row {current.row}: {current.destination} appeared meanwhile: import again")
            if not current.destination.parent.is_dir():
                current.destination.parent.mkdir(parents=True)
                made.append(current.destination.parent)
            done.append(current)  # before the move: a Ctrl+C right after it still finds it to put back
            move(current.source, current.destination)
    except (OSError, SstlError, KeyboardInterrupt) as err:
        back = 0
        for m in reversed(done):
            if os.path.lexists(m.destination) and not os.path.lexists(m.source):
                move(m.destination, m.source)
                back += 1
            elif os.path.lexists(m.destination) and os.path.lexists(m.source):  # a copy across disks, cut short
                os.remove(m.destination)
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty (something else arrived): left as it is
                folder.rmdir()
        if isinstance(err, KeyboardInterrupt):
            raise SstlError(f"interrupted: the {back} photos moved so far went back; nothing imported") from None
        if isinstance(err, SstlError):
            raise
        raise SstlError(
            f"row {current.row}: cannot move {current.source} to {current.destination} "
            f"({err.strerror or err}): nothing moved"
        ) from None


def move(source: Path, destination: Path) -> None:
    """A rename (shutil.move across file systems)."""
    shutil.move(source, destination)


def append_record(folder: Path, moves: list[Move], queue: Path, now: datetime | None = None) -> Path:
    """<folder>/label-imports.csv += one row per move (time, source, destination, label, guess, queue),
    but for moves it already records (an import resumed after a kill records each move once)."""
    path = Path(folder) / RECORD
    when = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    known = {(r["source"], r["destination"]) for r in read_record(folder)}
    lines: list[tuple[str, ...]] = [RECORD_FIELDS] if not path.is_file() else []
    for m in moves:
        source, destination = relative_to(folder, m.source), relative_to(folder, m.destination)
        if (source, destination) not in known:
            lines.append((when, source, destination, m.label, m.guess, str(queue)))
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        f.write(old)
        csv.writer(f, lineterminator="\n").writerows(lines)
    return path


def read_record(folder: Path) -> list[dict[str, str]]:
    path = Path(folder) / RECORD
    return read_csv(path) if path.is_file() else []


@dataclass
class ImportSummary:
    moved: dict[str, int]  # class -> photos moved into it
    unlabelled: int
    already: int
    record: Path


def import_labels(csv_path: Path, *, folder: Path, new_classes: bool = False) -> ImportSummary:
    """Check every row, move the labelled photos into labeled/<class>/, record what came from where."""
    plan = plan_import(read_labels(csv_path), folder, new_classes=new_classes, record=read_record(folder))
    record = Path(folder) / RECORD
    if plan.moves:
        check_writable(record)  # a read-only folder fails here, before any move
        before = record.read_bytes() if record.is_file() else None
        # the record first: an import killed between two moves is resumed by the next one (the moved rows
        # are then recorded and gone from unlabeled/, the others move), never left unrecorded
        append_record(folder, plan.moves, Path(os.path.abspath(csv_path)))
        try:
            move_all(plan.moves)
        except SstlError:  # every photo went back: so does the record
            if before is None:
                record.unlink()
            else:
                with atomic_path(record) as tmp:
                    tmp.write_bytes(before)
            raise
    moved: dict[str, int] = {}
    for m in plan.moves:
        moved[m.label] = moved.get(m.label, 0) + 1
    return ImportSummary(moved, plan.unlabelled, plan.already, record)


def refresh_if_project(folder: Path, params_folder: str | None) -> bool:
    """Rewrite data/inventory.json when `folder` is the project's data.folder, so a plain `dvc repro`
    sees the moved photos and retrains; True when it changed."""
    if params_folder is None or os.path.abspath(params_folder) != os.path.abspath(folder):
        return False
    from sstl.data.inventory import refresh_inventory

    return refresh_inventory(Path(folder))
