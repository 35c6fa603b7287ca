"""The photo folder's fingerprint: the prepare stage's DVC dependency in place of the folder itself."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sstl.core.errors import SstlError
from sstl.core.files import read_json, write_json
from sstl.data.images import UnreadableImage, os_reason, read_file
from sstl.data.scan import SKIPPED, relative, scan

INVENTORY = Path("data/inventory.json")  # the prepare stage's DVC dependency in place of the folder
HASH_CACHE = Path(".sstl-state/inventory-cache.json")  # git-ignored, like DVC's own state db


def fingerprint(folder: Path, inventory: dict[str, str]) -> dict[str, Any]:
    """The small record DVC hashes for the prepare stage: it changes exactly when a photo's bytes, a
    photo's path or a skipped entry (and its reason) change; hidden files and mtimes do not count."""
    text = "".join(f"{path}\t{value}\n" for path, value in sorted(inventory.items()))
    n_skipped = sum(v.startswith(SKIPPED) for v in inventory.values())
    return {
        "folder": str(folder),
        "files": len(inventory) - n_skipped,
        "skipped": n_skipped,
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


class HashCache:
    """sha256 of files, kept while (size, mtime, ctime, inode) stay the same, as DVC's state db does:
    a refresh before each run re-reads only new or changed photos. chmod changes ctime, so a file
    that became unreadable is read again (and reported) rather than answered from the cache."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.known: dict[str, list[Any]] = {}
        self.seen: dict[str, list[Any]] = {}
        if path is not None and path.is_file():
            try:
                self.known = dict(read_json(path).get("files", {}))
            except (ValueError, AttributeError, OSError):
                self.known = {}  # a damaged cache is only a slower refresh

    def sha256(self, path: Path) -> str:
        try:
            st = os.stat(path)
        except OSError as err:
            raise UnreadableImage(os_reason(err, path)) from None
        key, stamp = os.path.abspath(path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = self.known.get(key)
        digest = hit[4] if hit and hit[:4] == stamp else hashlib.sha256(read_file(path)).hexdigest()
        self.seen[key] = [*stamp, digest]
        return digest

    def save(self, root: Path) -> None:
        """Keep other folders' entries; drop this folder's files that are gone."""
        if self.path is None:
            return
        prefix = os.path.join(os.path.abspath(root), "")
        kept = {k: v for k, v in self.known.items() if not k.startswith(prefix)}
        write_json(self.path, {"version": 1, "files": kept | self.seen})


def folder_inventory(root: Path, cache: Path | None = None) -> dict[str, str]:
    """relative path -> sha256 (or "skipped: reason") for what prepare would read; nothing is decoded."""
    root = Path(root)
    found = scan(root)
    inventory = {relative(root, r["path"]): SKIPPED + r["reason"] for r in found.skipped}
    hashes = HashCache(cache)
    for entry in found.entries:
        try:
            inventory[relative(root, entry.path)] = hashes.sha256(entry.path)
        except UnreadableImage as err:
            inventory[relative(root, entry.path)] = SKIPPED + str(err)
    hashes.save(root)
    return inventory


def refresh_inventory(folder: Path, out: Path = INVENTORY, cache: Path | None = HASH_CACHE) -> bool:
    """Rewrite `out` (data/inventory.json) from the folder as it is now; True when it changed.

    Run before `dvc repro` / `dvc status` (`sstl run` does): DVC then re-runs prepare exactly when the
    photos changed. A folder prepare would refuse is recorded as the error, so DVC still runs prepare
    and the user gets prepare's one-line message (e.g. data/demo before the demo stage made it)."""
    folder, out = Path(folder), Path(out)
    try:
        record = fingerprint(folder, folder_inventory(folder, cache))
    except SstlError as err:
        record = {"folder": str(folder), "error": str(err)}
    try:
        old = read_json(out) if out.is_file() else None
    except ValueError:
        old = None
    if record == old:
        return False
    write_json(out, record)
    return True
