"""Writing outputs safely: every file appears whole or not at all (temp file, then rename)."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sstl.core.errors import SstlError

# errors that mean "this folder cannot take the file" rather than a bug: reported in one line
WRITE_ERRORS = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "not permitted",
    errno.EROFS: "read-only file system",
}


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in WRITE_ERRORS:
            raise write_error(path, err.errno) from None
        raise
    except RuntimeError as err:  # torch.save reports a full disk as `unexpected pos ...` from its zip writer
        if "unexpected pos" in str(err) or "PytorchStreamWriter" in str(err):
            raise write_error(path, errno.ENOSPC) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` (the old one renamed aside, then
    removed), on error it is removed: readers see the old folder or the new one, never half of each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700): a folder as mkdir would make it
    try:
        yield tmp
        old = None
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.")) / path.name
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_error(path: Path, code: int) -> SstlError:
    """One line naming the folder, what went wrong and how much space is free there."""
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free / 2**20 if folder.exists() else 0.0
    fix = "free some space or move the project" if code in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return SstlError(
        f"cannot write {path}: {WRITE_ERRORS.get(code, os.strerror(code))} in {folder}/ ({free:.0f} MB free): {fix}"
    )


def check_writable(*paths: Path | str, need_mb: float = 0.0) -> None:
    """Before any work: every output's folder exists, takes a file, and has `need_mb` free (estimated
    by the caller), so a stage fails in a second rather than after its training."""
    for folder in sorted({Path(p).parent for p in paths}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".sstl-probe.")
            os.close(fd)
            os.remove(probe)
        except OSError as err:
            if err.errno not in WRITE_ERRORS:
                raise
            raise SstlError(f"cannot write to {folder}/: {WRITE_ERRORS[err.errno]}: make it writable") from None
        free = shutil.disk_usage(folder).free / 2**20
        if free < need_mb:
            raise SstlError(f"{folder}/ has {free:.0f} MB free, {need_mb:.0f} MB needed: free some space")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path | str, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> None:
    """Rows of dicts as CSV with a header; `fields` fixes the column order (default: first row's keys)."""
    fields = list(fields or (rows[0].keys() if rows else []))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes, read 1 MB at a time."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
