"""Streaming pseudo-label selection: accumulators fed shard by shard, memory bounded by what they keep.

`TopK(num_classes, k, p)` keeps, per class, the k best (score, image) pairs among the images whose
top-p classes include it; `Threshold(tau)` keeps the images whose top score is >= tau. Both take
`update(probs (n, C), index (n,))` any number of times, `merge(other)` another accumulator of the
same kind (fed with other images), and give `result() -> (index, label, score)` in the order of
`select_topk` / `select_threshold` (sstl.pseudo.select), the in-memory references.

Determinism: every (score, image) pair is packed into one int64 key,

    key = float32 bits of score << 32 | (2**32 - 1 - index)

so that keys order by score descending, then by index ascending, and no two differ only by a tie.
The result therefore depends on the set of images fed, never on how they were cut into shards,
chunks or processes, nor on the order of updates and merges. Scores must be >= 0 (probabilities)
and indices < 2**32. An image whose p-th and (p+1)-th scores are equal has its top-p classes chosen
by score, then by class index ascending.

`Rows(width)` keeps a row of floats per image (the teacher's logits) for the images an accumulator
still holds, so that the selected images come with their whole distribution (soft pseudo-labels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from typing_extensions import Self


INDEX_BITS = 32
INDEX_MAX = (1 << INDEX_BITS) - 1  # largest image index a key can hold
EMPTY = -1  # key of an empty slot: below every real key (real keys are >= 0)
MIN_BUDGET = 1 << 16  # pending candidates before a compaction, for small k x classes
BLOCK = 1 << 22  # keys sorted at once by a compaction: its temporaries stay ~100 MB
Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # index int64, label int64, score float32


class Accumulator(Protocol):
    """What the pool driver needs: feed, merge another of the same kind, read, save and restore."""

    def update(self, probs: torch.Tensor, index: torch.Tensor) -> None: ...
    def merge(self, other: Self) -> None: ...
    def result(self) -> Selection: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def encode(score: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """score float32 >= 0, index int64 in [0, 2**32) (broadcastable) -> int64 keys, larger = better."""
    bits = score.float().contiguous().view(torch.int32).clamp_min(0).long()  # -0.0 -> the bits of +0.0
    return (bits << INDEX_BITS) | (INDEX_MAX - index)


def decode(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys -> (index int64, score float32)."""
    score = (key >> INDEX_BITS).to(torch.int32).view(torch.float32)
    return INDEX_MAX - (key & INDEX_MAX), score


def check_batch(probs: torch.Tensor, index: torch.Tensor, num_classes: int | None = None) -> None:
    if probs.ndim != 2 or index.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (n, C) and index (n,), got {tuple(probs.shape)} and {tuple(index.shape)}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} classes, the accumulator {num_classes}")
    if index.numel():
        lo, hi = index.aminmax()
        if int(lo) < 0 or int(hi) > INDEX_MAX:
            raise ValueError(f"image indices must lie in [0, {INDEX_MAX}]")


def check_scores(scores: torch.Tensor) -> None:
    """Keys need scores >= 0 (NaN would rank first: torch.topk puts it above everything)."""
    if not bool((scores >= 0).all()):  # NaN >= 0 is False too
        raise ValueError("scores must be probabilities: >= 0 and not NaN")


def top_classes(probs: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (n, C) -> (scores (n, P), classes (n, P)) of each row's top-P classes, P = min(p, C).

    The set is exact and deterministic: rows whose P-th and (P+1)-th scores tie are redone with
    (score, class ascending) keys instead of torch.topk's unspecified tie order.
    """
    n, c = probs.shape
    if p >= c:  # every class is eligible
        check_scores(probs)
        return probs, torch.arange(c).expand(n, c)
    vals, cls = probs.topk(p + 1, dim=1)  # (n, P+1), best first
    check_scores(vals[:, :p])
    tied = torch.nonzero(vals[:, p - 1] == vals[:, p]).flatten()
    vals, cls = vals[:, :p].contiguous(), cls[:, :p].contiguous()
    if tied.numel():
        rows = probs[tied]
        keys = encode(rows, torch.arange(c))  # (t, C): by score, then the lower class first
        cls[tied] = keys.topk(p, dim=1).indices
        vals[tied] = rows.gather(1, cls[tied])
    return vals, cls


def best_per_class(kept: torch.Tensor, classes: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """kept int64 (k, m), columns best first, EMPTY-padded, plus candidates (class int32 in [0, m), key)
    -> a new (k, m): each column's k largest keys of both, best first."""
    k, m = kept.shape
    slot, cls = torch.nonzero(kept != EMPTY, as_tuple=True)
    classes = torch.cat([cls.to(torch.int32), classes])
    keys = torch.cat([kept[slot, cls], keys])
    keys, order = keys.sort(descending=True)  # best first; equal keys only occur in different classes
    classes, order = classes[order].sort(stable=True)  # by class, each class still best first
    keys = keys[order]
    counts = torch.bincount(classes, minlength=m)
    rank = torch.arange(len(keys)) - (counts.cumsum(0) - counts).repeat_interleave(counts)  # place in its class
    top = rank < k
    out = torch.full((k * m,), EMPTY, dtype=torch.int64)
    out[rank[top] * m + classes[top]] = keys[top]
    return out.view(k, m)


class TopK:
    """Per class, the k best images among those that have the class in their top-p.

    State: `keys` int64 (k, C), column c = class c's best keys, best first, EMPTY-padded; new
    candidates wait in a pending buffer (dropped at once when below their class's current k-th
    key, `bar`) and are folded in by `compact` once the buffer holds max(k x C, 65536) of them.
    Memory: O(k x C) whatever the number of images fed.
    """

    def __init__(self, num_classes: int, k: int, p: int = 1, budget: int | None = None, block: int = BLOCK) -> None:
        """budget: pending candidates that trigger a compaction (default max(k x C, 65536));
        block: keys sorted at once by a compaction. Both trade memory for speed, not the result."""
        if min(num_classes, k, p, block) < 1 or (budget is not None and budget < 1):
            raise ValueError(f"num_classes, k, p, budget and block must be >= 1, got {num_classes}, {k}, {p}")
        self.num_classes, self.k, self.p = num_classes, k, p
        self.keys = torch.full((k, num_classes), EMPTY, dtype=torch.int64)
        self.bar = self.keys[-1].clone()  # (C,): a candidate must beat this key to matter
        self.budget = budget or max(k * num_classes, MIN_BUDGET)
        self.block = block
        self._classes: list[torch.Tensor] = []  # pending candidates: class int32 (m,), key int64 (m,)
        self._keys: list[torch.Tensor] = []
        self._pending = 0

    def update(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """probs float (n, C) of images `index` int64 (n,), fed once each (disjoint from any merged)."""
        check_batch(probs, index, self.num_classes)
        scores, classes = top_classes(probs, self.p)  # (n, P)
        keys = encode(scores, index.view(-1, 1)).flatten()
        classes = classes.flatten()
        keep = keys > self.bar[classes]
        self._add(classes[keep], keys[keep])

    def merge(self, other: TopK) -> None:
        """Fold in another accumulator over other images (same num_classes, k, p)."""
        if (other.num_classes, other.k, other.p) != (self.num_classes, self.k, self.p):
            raise ValueError("can only merge TopK accumulators with the same num_classes, k and p")
        classes, keys = other._entries()
        self._add(classes, keys)
        self.compact()

    def result(self) -> Selection:
        """(index, label, score), at most k per class, ordered by class, then score desc, index asc."""
        self.compact()
        keys = self.keys.T  # (C, k): row c = class c, best first
        kept = keys != EMPTY
        index, score = decode(keys[kept])
        label = torch.arange(self.num_classes).view(-1, 1).expand_as(keys)[kept]
        return index, label, score

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.compact()
        return {"keys": self.keys.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["keys"].shape) != (self.k, self.num_classes):
            raise ValueError(f"state holds {tuple(state['keys'].shape)} keys, expected {(self.k, self.num_classes)}")
        self._classes, self._keys, self._pending = [], [], 0
        self.keys = state["keys"].clone()
        self.bar = self.keys[-1].clone()

    def compact(self) -> None:
        """Fold the pending candidates into `keys`, a block of classes at a time (bounded temporaries)."""
        if not self._pending:
            return
        classes, order = torch.cat(self._classes).sort(stable=True)  # group by class (a radix sort on int32)
        self._classes = []
        keys = torch.cat(self._keys)[order]
        self._keys, self._pending = [], 0
        del order
        ends = torch.bincount(classes, minlength=self.num_classes).cumsum(0).tolist()
        step = max(1, self.block // (2 * self.k))  # classes per block: ~block kept + pending keys
        for lo in range(0, self.num_classes, step):
            hi = min(lo + step, self.num_classes)
            a, b = ends[lo - 1] if lo else 0, ends[hi - 1]
            if a < b:
                self.keys[:, lo:hi] = best_per_class(self.keys[:, lo:hi], classes[a:b] - lo, keys[a:b])
        self.bar = self.keys[-1].clone()

    def _add(self, classes: torch.Tensor, keys: torch.Tensor) -> None:
        self._classes.append(classes.to(torch.int32))
        self._keys.append(keys)
        self._pending += len(keys)
        if self._pending >= self.budget:
            self.compact()

    def _entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All candidates held, kept and pending: (class int32 (m,), key int64 (m,))."""
        slot, cls = torch.nonzero(self.keys != EMPTY, as_tuple=True)
        classes = torch.cat([cls.to(torch.int32), *self._classes])
        keys = torch.cat([self.keys[slot, cls], *self._keys])
        return classes, keys


class Threshold:
    """The images whose top score is >= tau, with that class; memory O(images selected)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self._parts: list[Selection] = []

    def update(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        check_batch(probs, index)
        score, label = probs.max(dim=1)  # ties: the first (lowest) class
        keep = score >= self.tau
        self._parts.append((index[keep], label[keep], score[keep].float()))

    def merge(self, other: Threshold) -> None:
        self._parts.append(other.result())

    def result(self) -> Selection:
        """(index, label, score) ordered by index, like select_threshold."""
        if not self._parts:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty.clone(), torch.empty(0)
        index, label, score = (torch.cat(t) for t in zip(*self._parts, strict=True))
        order = index.argsort(stable=True)
        self._parts = [(index[order], label[order], score[order])]
        return self._parts[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        index, label, score = self.result()
        return {"index": index, "label": label, "score": score}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._parts = [(state["index"], state["label"], state["score"])]


class Rows:
    """A row of floats per image (the teacher's logits), kept for the images an accumulator holds, so
    that the selection comes with each selected image's whole distribution (soft pseudo-labels).

    `add(values (n, D), index (n,))` any number of times (each image once), `keep(wanted)` drops the
    rows of images no longer wanted (the pool driver calls it after each shard with the images its
    accumulator holds: memory O(images held x D) plus one shard's rows), `take(index)` gives the rows
    of `index` in its order (an index may repeat). State: index int64 (m,) ascending, values (m, D).
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._index: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)]
        self._values: list[torch.Tensor] = [torch.empty(0, width)]

    def add(self, values: torch.Tensor, index: torch.Tensor) -> None:
        check_batch(values, index, self.width)
        self._index.append(index.long())
        self._values.append(values.float())

    def merge(self, other: Rows) -> None:
        """Fold in another store over other images (the same width)."""
        if other.width != self.width:
            raise ValueError(f"can only merge Rows of the same width, got {other.width} and {self.width}")
        index, values = other._sorted()
        self.add(values, index)

    def keep(self, wanted: torch.Tensor) -> None:
        """Drop the rows of every image not in `wanted` (int64, any order, repeats allowed)."""
        index, values = self._sorted()
        mask = torch.isin(index, wanted)
        self._index, self._values = [index[mask]], [values[mask]]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of images `index` (n,), in that order: (n, D); every image must have been added."""
        have, values = self._sorted()
        if not index.numel():
            return torch.empty(0, self.width)
        pos = torch.searchsorted(have, index).clamp_max(max(len(have) - 1, 0))
        if not len(have) or not torch.equal(have[pos], index):
            missing = index[~torch.isin(index, have)][:5].tolist()
            raise KeyError(f"no row kept for images {missing}")
        return values[pos]

    def state_dict(self) -> dict[str, torch.Tensor]:
        index, values = self._sorted()
        return {"index": index.clone(), "values": values.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        index, values = state["index"], state["values"]
        if values.ndim != 2 or values.shape != (len(index), self.width):
            raise ValueError(f"state holds {tuple(values.shape)} rows, expected ({len(index)}, {self.width})")
        self._index, self._values = [index.long()], [values.float()]

    def __len__(self) -> int:
        return sum(len(i) for i in self._index)

    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Consolidate into one index-ascending pair (an image fed twice is an error)."""
        if len(self._index) > 1:
            index, values = torch.cat(self._index), torch.cat(self._values)
            index, order = index.sort(stable=True)
            if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
                raise ValueError("an image was fed twice")
            self._index, self._values = [index], [values[order]]
        return self._index[0], self._values[0]
