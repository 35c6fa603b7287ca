"""Near-duplicates of evaluation images in the unlabelled pool (Yalniz et al. 2019, supplement section 5).

Exact hashes catch byte-identical copies only; a re-encoded, resized, re-framed or brightened copy of
a val/test/test-add image left in the unlabelled pool leaks it into training through its pseudo-label.
The seed paper removes such images by nearest neighbours on L2-normalised features; so does this module:

1. `features`: each image -> one L2-normalised vector, one batch at a time (only a batch is ever held
   as floats). Two methods:

   - ``thumbnail`` (default, needs no weights): the image area-averaged to ``thumb_size`` x
     ``thumb_size`` pixels in RGB, minus its mean, divided by its norm. The cosine similarity of two
     such vectors is the Pearson correlation of the two thumbnails: blind to brightness and contrast
     (gain and offset), while the averaging washes out JPEG blocks, resampling and noise. Colour stays
     in (one mean over the three channels), which tells apart scenes that are alike in grey. A uniform
     image gives the zero vector: it matches nothing (only its exact copies are caught, by hash).
   - ``backbone``: the pooled features (`Classifier.features`) of a torchvision backbone from
     `create_model` with ``weights`` ``imagenet`` or a state-dict file: the paper's choice (ImageNet
     ResNet-18 pool5). Random weights (``none``) are refused: measured, their best match is the right
     source for under 2% of planted copies.

2. Re-framing: a cropped copy is shifted and rescaled, which costs a thumbnail much of its correlation
   (a 5-10% crop of a 32-pixel image: median 0.955, down to 0.75; 2 in 3 below 0.97). So each
   *reference* (evaluation) image is also described by its crops of side ``crop_scales`` at 16
   anchors (a 4 x 4 grid of offsets), resized back to the image size, and a pool image's similarity
   to a reference image is the best over those views.
   The pool side is left alone; the cost is 1 + 16 * len(crop_scales) reference rows per image (33).

3. `near_duplicates`: exact inner-product search in blocks of ``block_size`` pool rows x
   ``block_size`` reference images (memory O(block^2 x views)), with torch matrix products, which is
   what faiss's IndexFlatIP computes too. Exact search of 10^5 pool images against 10^4 evaluation
   images takes minutes on 2 CPU cores, so faiss would add a dependency for nothing here; it pays off
   with approximate indexes at the paper's scale (10^8 images).

Threshold (``thumbnail``: 0.97, cosine similarity). Measured on the benchmark of tests/test_neardup.py
(real digits and patches of real photos from scikit-learn, synthetic scenes; copies resized down and
up, JPEG q50-70, cropped 5-10%, brightness +-8-15%), 20 random draws of 60 test images, 120 planted
copies and 200 unrelated images each: copies score >= 0.976 against their source but for one
brightened, clipped copy at 0.966 (1 of 2,400), and are always paired with the right source; the best
match of an unrelated image is <= 0.967 (0 of 4,000 reach 0.97). At 64 and 96 pixels: copies >= 0.977,
unrelated <= 0.964. On real photos (500 CIFAR-10 test images planted with those edits among 20,000
CIFAR-10 training images, against all 10,000 test images) every planted copy scores >= 0.985, and 157
training images (0.8%) reach 0.97. Inspected by eye: all 8 sampled pairs >= 0.98 and 13 of 16 at
0.97-0.98 are CIFAR's own train/test near-duplicates (same photo, shifted or re-encoded), the others
small objects on a plain sky; at 0.96-0.97, 5 of 8 still are, so 0.96 finds more for about one false
drop in three. Limits: images with little detail (8x8 handwritten digits: on the
demo, 24% of the unlabelled digits match some test digit at >= 0.97, because two scans of one digit
are often indistinguishable at that resolution), and heavier edits (flips, rotations, crops over 10%,
overlays) are not caught. Every drop is listed with both paths (prepare's ``neardup.csv``), so a user
can look; lower the threshold to catch heavier edits at the price of more false drops (cheap: an
unlabelled image), raise it to drop only almost-identical copies. For ``backbone`` the scale differs
(pooled ReLU features are all positive, so unrelated images score higher); its 0.95 default could not
be calibrated here (no pretrained weights offline): check it against ``neardup.csv`` on your data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sstl.config.data import ANCHORS, NearDupConfig
from sstl.config.model import ModelConfig
from sstl.core.errors import SstlError
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model

Images = np.ndarray | torch.Tensor | Sequence[np.ndarray]
"""uint8 (N, H, W, 3) as an array or a tensor, or a sequence of uint8 (H, W, 3) arrays of one size."""


REPORT_FIELDS = ("unlabeled_path", "eval_path", "eval_split", "similarity")


class Match(NamedTuple):
    pool_index: int
    ref_index: int
    similarity: float


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, H, W, 3) tensors, one batch at a time."""
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.stack(list(chunk)))
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise SstlError(f"near-duplicate search needs uint8 (N, H, W, 3) images, got {tuple(batch.shape)}")
        yield batch


def views(x: torch.Tensor, crop_scales: Sequence[float]) -> list[torch.Tensor]:
    """(B, C, H, W) -> [the images, then for each scale a crop at each of the 16 anchors] (crops not resized)."""
    h, w = x.shape[-2:]
    out = [x]
    for scale in crop_scales:
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        for top, left in ANCHORS:
            y, z = round((h - ch) * top), round((w - cw) * left)
            out.append(x[..., y : y + ch, z : z + cw])
    return out


def _thumbnail(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, h, w) float in [0, 1] -> (B, 3 * size * size), zero mean, unit norm (zeros if uniform)."""
    t = F.adaptive_avg_pool2d(x, size).flatten(1)
    t = t - t.mean(dim=1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-6)


def features(
    images: Images, cfg: NearDupConfig, reference: bool = False, model: Classifier | None = None
) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N * V, D), rows L2-normalised (all-zero for a uniform thumbnail).

    V = 1, or with `reference` V = cfg.n_views(True): each image's views (itself, then its crops) are
    consecutive rows. `model` overrides the backbone built from cfg.arch / cfg.weights.
    """
    scales = cfg.crop_scales if reference else ()
    if cfg.method == "backbone" and model is None:
        model = create_model(ModelConfig(arch=cfg.arch, weights=cfg.weights), num_classes=1)
    if model is not None:
        model.eval()
    out: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in _batches(images, cfg.batch_size):
            if cfg.method == "thumbnail":
                x = batch.permute(0, 3, 1, 2).float().div_(255.0)
                size = tuple(x.shape[-2:])
                rows = [_thumbnail(_resize(v, size), cfg.thumb_size) for v in views(x, scales)]
            else:
                assert model is not None
                x = model.preprocess(batch)
                size = tuple(x.shape[-2:])
                rows = [F.normalize(model.features(_resize(v, size)), dim=1) for v in views(x, scales)]
            out.append(torch.stack(rows, dim=1).flatten(0, 1))  # image-major: (B * V, D)
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def _resize(x: torch.Tensor, size: tuple[Any, ...]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def near_duplicates(
    pool: np.ndarray, ref: np.ndarray, threshold: float, block: int = 1024, n_views: int = 1
) -> list[Match]:
    """Pool rows whose best cosine similarity to a reference image is >= threshold, with that image.

    `pool` (N, D) and `ref` (M * n_views, D) hold L2-normalised rows; a reference image's similarity is
    the best over its `n_views` consecutive rows. Exact search over blocks of `block` pool rows and
    `block` reference images, so memory is O(block^2 x n_views) whatever N and M. Ties go to the
    lowest reference index; the result is sorted by pool index.
    """
    if block < 1 or n_views < 1:
        raise ValueError("block and n_views must be >= 1")
    if len(ref) % n_views:
        raise ValueError(f"{len(ref)} reference rows are not a whole number of {n_views} views")
    n_ref = len(ref) // n_views
    if len(pool) == 0 or n_ref == 0:
        return []
    if pool.shape[1] != ref.shape[1]:
        raise ValueError(f"pool has {pool.shape[1]} feature dimensions, the reference {ref.shape[1]}")
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    matches: list[Match] = []
    for start in range(0, len(pool), block):
        rows = torch.from_numpy(np.ascontiguousarray(pool[start : start + block], dtype=np.float32))
        best = torch.full((len(rows),), -np.inf)
        which = torch.zeros(len(rows), dtype=torch.long)
        for r0 in range(0, n_ref, block):
            part = ref_t[r0 * n_views : (r0 + block) * n_views]
            sims = (rows @ part.T).view(len(rows), -1, n_views).amax(dim=2)
            value, index = sims.max(dim=1)
            better = value > best  # strict: an equal score later keeps the earlier reference image
            best = torch.where(better, value, best)
            which = torch.where(better, index + r0, which)
        for i in torch.nonzero(best >= threshold).flatten().tolist():
            matches.append(Match(start + i, int(which[i]), float(best[i])))
    return matches


def find_near_duplicates(pool_images: Images, ref_images: Images, cfg: NearDupConfig) -> list[Match]:
    """Features of both sides (the reference with its crops), then the blocked search at cfg.cutoff()."""
    if len(pool_images) == 0 or len(ref_images) == 0:
        return []
    model = None
    if cfg.method == "backbone":
        model = create_model(ModelConfig(arch=cfg.arch, weights=cfg.weights), num_classes=1)
    pool = features(pool_images, cfg, model=model)
    ref = features(ref_images, cfg, reference=True, model=model)
    return near_duplicates(pool, ref, cfg.cutoff(), cfg.block_size, cfg.n_views(True))


def report_rows(
    matches: Sequence[Match], pool_paths: Sequence[str], ref_paths: Sequence[str], ref_splits: Sequence[str]
) -> list[dict[str, str]]:
    """One row per dropped pair, most similar first: both paths, so a user can look at them side by side."""
    rows = [
        {
            "unlabeled_path": str(pool_paths[m.pool_index]),
            "eval_path": str(ref_paths[m.ref_index]),
            "eval_split": ref_splits[m.ref_index],
            "similarity": f"{m.similarity:.4f}",
        }
        for m in sorted(matches, key=lambda m: (-m.similarity, m.pool_index))
    ]
    return rows
