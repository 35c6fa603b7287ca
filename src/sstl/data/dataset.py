"""The packed dataset: one uint8 array per split plus a manifest; what every training stage reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sstl.core.errors import SstlError
from sstl.core.files import atomic_path, read_csv, read_json

SPLITS = ("labeled", "val", "unlabeled", "test", "test-add")
MANIFEST_FIELDS = ("path", "split", "label", "label_index", "sha256")


@dataclass
class ImageSet:
    """images: uint8 (N, H, W, 3); labels: int64 (N,), -1 where unknown; paths: N source paths."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], [self.paths[i] for i in index.tolist()])

    @staticmethod
    def concat(*sets: ImageSet) -> ImageSet:
        return ImageSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            [p for s in sets for p in s.paths],
        )


def save_images(path: Path, images: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, images)


def load_images(prepared: Path, split: str, mode: Literal["r", "c"] = "r") -> np.ndarray:
    """The split's packed uint8 (N, H, W, 3) array, memory-mapped: pages are read as they are touched.
    `mode` "c": copy-on-write, writable in memory (what torch.from_numpy needs), the file never changes."""
    npy = Path(prepared) / f"{split}.npy"
    if split not in SPLITS:
        raise SstlError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if not npy.is_file():
        raise SstlError(f"{npy} not found: run the prepare stage first (`dvc repro prepare`)")
    return np.load(npy, mmap_mode=mode)


def load_split(prepared: Path, split: str, *, lazy: bool = False) -> ImageSet:
    """Read one split of a prepared dataset into memory (images in manifest order). `lazy`: the images stay
    memory-mapped, and only the rows a `subset` takes are read (the student's pseudo-labelled share of a
    pool that may not fit in memory)."""
    packed = load_images(prepared, split, mode="c" if lazy else "r")
    images = torch.from_numpy(packed if lazy else np.array(packed))  # eager: a private, writable copy
    rows = [r for r in read_csv(Path(prepared) / "manifest.csv") if r["split"] == split]
    labels = torch.tensor([int(r["label_index"]) for r in rows], dtype=torch.int64)
    return ImageSet(images, labels.reshape(-1), [r["path"] for r in rows])


def load_labelled(prepared: Path, *, refit: bool = False) -> ImageSet:
    """The labelled rows a model trains on: labeled, and with `refit` val's rows after them (`data.refit`:
    once val has chosen what it chooses, every label trains)."""
    labeled = load_split(prepared, "labeled")
    return ImageSet.concat(labeled, load_split(prepared, "val")) if refit else labeled


def load_classes(prepared: Path) -> list[str]:
    path = Path(prepared) / "classes.json"
    if not path.is_file():
        raise SstlError(f"{path} not found: run the prepare stage first (`dvc repro prepare`)")
    return list(read_json(path))


def load_packing(prepared: Path) -> dict[str, int | str]:
    """How prepare packed the images ({image_size, interpolation}): what predict must repeat."""
    path = Path(prepared) / "packing.json"
    if not path.is_file():
        raise SstlError(f"{path} not found: re-run the prepare stage (`dvc repro prepare`)")
    return dict(read_json(path))
