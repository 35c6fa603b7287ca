"""Which photos to label next: uncertainty scores (margin, entropy) and diverse picks among the uncertain."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sstl.core.errors import SstlError

STRATEGIES = ("margin", "entropy", "diverse")

Features = Callable[[np.ndarray], np.ndarray]  # pool indices (k,) -> backbone features (k, D)
CANDIDATES_PER_PICK = 5  # diverse: k-means over this many x n of the most uncertain photos


def check_strategy(strategy: str) -> str:
    """The strategy, or one line naming the known ones (a str option, so a typo is one line, not a usage box)."""
    if strategy not in STRATEGIES:
        raise SstlError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return strategy


def margins(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities -> (N,) top-1 minus top-2 probability: near 0 = torn between two classes."""
    top = np.sort(probs, axis=1)[:, ::-1]
    return top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0.0)


def entropies(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities -> (N,) entropy in nats: log C = no idea at all, 0 = certain."""
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def scores(probs: np.ndarray, strategy: str) -> np.ndarray:
    """What the `score` column holds: the margin (margin, diverse: small first) or the entropy (large first)."""
    return entropies(probs) if check_strategy(strategy) == "entropy" else margins(probs)


def by_margin(probs: np.ndarray) -> np.ndarray:
    """Pool indices, smallest margin first; ties by index (a stable sort), so the order is reproducible."""
    return np.argsort(margins(probs), kind="stable")


def rank(probs: np.ndarray, strategy: str, n: int, *, features: Features | None = None, seed: int = 0) -> np.ndarray:
    """The min(n, N) pool indices most worth labelling, best first.

    `features(indices)` gives the backbone features of those pool rows: only `diverse` asks, and only
    for its candidates, so a large pool is featurised for a few x n photos, not whole."""
    check_strategy(strategy)
    n = min(n, len(probs))
    if strategy == "entropy":
        return np.argsort(-entropies(probs), kind="stable")[:n]
    order = by_margin(probs)
    if strategy == "margin" or n == 0:
        return order[:n]
    if features is None:
        raise ValueError("the diverse strategy needs the candidates' features")
    pool = order[: CANDIDATES_PER_PICK * n]
    if len(pool) <= n:
        return pool
    return pool[diverse_picks(features(pool), n, seed=seed)]


def diverse_picks(features: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """Positions of n rows of `features` (rows in uncertainty order, most uncertain first): the most
    uncertain row of each of n k-means clusters, in uncertainty order; should clusters come out
    empty (duplicate photos), the next most uncertain rows fill the queue up to n."""
    x = features.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)  # cosine geometry: backbone features
    labels = kmeans(x, n, seed=seed)
    firsts = np.unique(labels, return_index=True)[1]  # rows are in uncertainty order: the first is the best
    chosen = set(firsts.tolist())
    fill = [i for i in range(len(x)) if i not in chosen][: n - len(chosen)]
    return np.sort(np.concatenate([firsts, np.asarray(fill, dtype=np.int64)]))


def kmeans(x: np.ndarray, k: int, *, seed: int, iterations: int = 50) -> np.ndarray:
    """Cluster index (N,) of each row: k-means++ seeding from `seed`, then Lloyd's iterations.

    Written out (not scikit-learn) so that the same seed gives the same clusters everywhere."""
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for j in range(1, k):
        total = d2.sum()
        centres[j] = x[rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(1))
    labels = np.full(len(x), -1)
    for _ in range(iterations):
        dist = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None, :]
        new = dist.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels
