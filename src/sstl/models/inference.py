"""The one inference loop: uint8 images in, fp32 logits (or backbone features) out, batch by batch.

Pseudo-labelling, evaluation, prediction, near-duplicate search and the feature cache all call it,
so device placement, precision, preprocessing and test-time augmentation are decided in one place.

Test-time augmentation (`tta`, airbench's levels 1 and 2), logits averaged in fp32 on the device:

- `none`: the image as it is;
- `flip`: the mean of the logits of the image and of its horizontal mirror;
- `flip_translate`: 0.5 x flip(image) + 0.25 x flip(image shifted by +1 px) + 0.25 x flip(image
  shifted by -1 px), both shifts diagonal (down-right, up-left): the image is reflect-padded by
  1 px and the (H, W) windows at (0, 0) and (2, 2) of the padded image are taken.

Each view is its own forward pass over the batch (peak memory as without TTA; `flip` costs 2 passes,
`flip_translate` 6), and the plain view is exactly the `none` pass, so `tta` changes nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sstl.config.runtime import TTA_MODES, Tta
from sstl.models.classifier import Classifier
from sstl.runtime.device import Runtime


def flip_mean(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """Normalised (b, 3, H, W) -> fp32 mean of the logits of x and of its horizontal mirror."""
    return 0.5 * model(x).float() + 0.5 * model(x.flip(-1)).float()


def shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, 3, H, W) -> x shifted by +1 px and by -1 px in both axes, the border reflected."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[..., 0:h, 0:w], padded[..., 2 : h + 2, 2 : w + 2]


def tta_logits(model: Classifier, x: torch.Tensor, tta: Tta = "none") -> torch.Tensor:
    """Normalised (b, 3, H, W) -> logits (b, C), averaged over the views of `tta` (module docstring)."""
    if tta == "none":
        return model(x)
    if tta == "flip":
        return flip_mean(model, x)
    if tta == "flip_translate":
        plus, minus = shifted(x)
        return 0.5 * flip_mean(model, x) + 0.25 * flip_mean(model, plus) + 0.25 * flip_mean(model, minus)
    raise ValueError(f"unknown tta {tta!r}: choose one of {', '.join(TTA_MODES)}")


def batch_outputs(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    *,
    runtime: Runtime,
    batch_size: int = 256,
    start: int = 0,
    stop: int | None = None,
    features: bool = False,
    tta: Tta = "none",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images [start, stop) of uint8 (N, H, W, 3) (a memory-mapped array is read a batch at a time)
    -> (fp32 CPU outputs (b, C) logits or (b, D) features, index (b,)), in order.

    `tta` averages the logits over flipped / shifted views (module docstring); features are always
    those of the image itself, so `features` takes no `tta`."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta {tta!r}: choose one of {', '.join(TTA_MODES)}")
    if features and tta != "none":
        raise ValueError("test-time augmentation averages logits: features are of the image itself (tta='none')")
    stop = len(images) if stop is None else stop
    model.to(runtime.device).eval()  # left in eval mode: callers that train set their own mode each epoch
    # an empty range still gives one (0, C) batch, so an empty split has outputs of the right width
    for a in range(start, stop, batch_size) if stop > start else [start]:
        b = min(a + batch_size, stop)
        batch = images[a:b] if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images[a:b]))
        with torch.inference_mode(), runtime.autocast():
            x = model.preprocess(runtime.put(batch))
            out = model.features(x) if features else tta_logits(model, x, tta)
        yield out.float().cpu(), torch.arange(a, b)


def infer(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    *,
    runtime: Runtime,
    batch_size: int = 256,
    desc: str = "infer",
    features: bool = False,
    tta: Tta = "none",
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> fp32 logits (N, C) (averaged over the `tta` views), or pooled backbone
    features (N, D) with `features`."""
    n_batches = -(-len(images) // batch_size)
    outs = batch_outputs(model, images, runtime=runtime, batch_size=batch_size, features=features, tta=tta)
    return torch.cat([out for out, _ in tqdm(outs, total=n_batches, desc=desc, unit="batch", disable=None)])
