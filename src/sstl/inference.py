"""The one inference loop: uint8 images in, fp32 logits (or backbone features) out, batch by batch.

Pseudo-labelling, evaluation, prediction, near-duplicate search and the feature cache all call it,
so device placement, precision and preprocessing are decided in one place.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from sstl.models import Classifier
from sstl.runtime import CPU, Runtime


def batch_outputs(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    *,
    runtime: Runtime = CPU,
    batch_size: int = 256,
    start: int = 0,
    stop: int | None = None,
    features: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images [start, stop) of uint8 (N, H, W, 3) (a memory-mapped array is read a batch at a time)
    -> (fp32 CPU outputs (b, C) logits or (b, D) features, index (b,)), in order."""
    stop = len(images) if stop is None else stop
    model.to(runtime.device).eval()  # left in eval mode: callers that train set their own mode each epoch
    # an empty range still gives one (0, C) batch, so an empty split has outputs of the right width
    for a in range(start, stop, batch_size) if stop > start else [start]:
        b = min(a + batch_size, stop)
        batch = images[a:b] if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images[a:b]))
        with torch.inference_mode(), runtime.autocast():
            x = model.preprocess(runtime.put(batch))
            out = model.features(x) if features else model(x)
        yield out.float().cpu(), torch.arange(a, b)


def infer(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    *,
    runtime: Runtime = CPU,
    batch_size: int = 256,
    desc: str = "infer",
    features: bool = False,
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> fp32 logits (N, C), or pooled backbone features (N, D) with `features`."""
    n_batches = -(-len(images) // batch_size)
    outs = batch_outputs(model, images, runtime=runtime, batch_size=batch_size, features=features)
    return torch.cat([out for out, _ in tqdm(outs, total=n_batches, desc=desc, unit="batch", disable=None)])
