"""Lay out CIFAR-10 (the shared JPEG folders) as an sstl image folder with N labels per class.

    python benchmarks/cifar10_folder.py --labels-per-class 400 --out ~/.cache/sstl-data/cifar10-400

labeled/<class>/ gets N seeded images per class, unlabeled/ the rest of train under neutral names
(labels withheld), test/<class>/ the official test set. Files are symlinks into the unpacked archives.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tarfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
CACHE = Path.home() / ".cache" / "sstl-data" / "cifar10"


def unpack(shared: Path, cache: Path) -> None:
    for split in ("train", "test"):
        if not (cache / split).is_dir():
            archive = shared / f"{split}.tar.gz"
            if not archive.is_file():
                raise SystemExit(f"error: {archive} not found: CIFAR-10 archives are expected in {shared}")
            cache.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(cache, filter="data")


def link(src: Path, dst: Path) -> None:
    """A hard link (a copy across disks): sstl reads no symbolic link that leads out of the photo folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def layout(cache: Path, out: Path, labels_per_class: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"labeled": 0, "unlabeled": 0, "test": 0}
    for class_dir in sorted((cache / "train").iterdir()):
        files = sorted(class_dir.iterdir())
        rng.shuffle(files)
        for f in files[:labels_per_class]:
            link(f, out / "labeled" / class_dir.name / f.name)
        for f in files[labels_per_class:]:
            # a neutral name: the unlabelled pool must not leak its class through paths
            name = hashlib.sha1(f"{class_dir.name}/{f.name}".encode()).hexdigest()[:16]
            link(f, out / "unlabeled" / name[:2] / f"{name}.jpg")
        counts["labeled"] += min(labels_per_class, len(files))
        counts["unlabeled"] += max(len(files) - labels_per_class, 0)
    for class_dir in sorted((cache / "test").iterdir()):
        for f in sorted(class_dir.iterdir()):
            link(f, out / "test" / class_dir.name / f.name)
            counts["test"] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels-per-class", type=int, default=400)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    unpack(args.shared, args.cache)
    print(layout(args.cache, args.out.expanduser(), args.labels_per_class, args.seed))


if __name__ == "__main__":
    main()
