"""Pseudo-label selection rules on hand-made probabilities, and against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from sstl.pseudo.select import select_threshold, select_topk


def as_lists(sel: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[tuple[int, int, float]]:
    index, label, score = sel
    assert index.shape == label.shape == score.shape
    assert index.dtype == torch.int64 and label.dtype == torch.int64
    return list(zip(index.tolist(), label.tolist(), score.tolist(), strict=True))


def brute_topk(probs: torch.Tensor, k: int, p: int) -> list[tuple[int, int, float]]:
    """Per class c, the images whose top-p classes include c, best first, at most k of them."""
    rows = probs.tolist()
    n_classes = len(rows[0])
    out = []
    for c in range(n_classes):
        candidates = []
        for i, row in enumerate(rows):
            top = sorted(range(n_classes), key=lambda j, row=row: -row[j])[:p]
            if c in top:
                candidates.append((row[c], i))
        candidates.sort(key=lambda t: -t[0])
        out += [(i, c, s) for s, i in candidates[:k]]
    return out


PROBS = torch.tensor(
    [
        [0.60, 0.35, 0.05],  # 0: argmax 0, second choice 1
        [0.70, 0.20, 0.10],  # 1: argmax 0
        [0.10, 0.30, 0.60],  # 2: argmax 2, second choice 1
        [0.50, 0.10, 0.40],  # 3: argmax 0
        [0.05, 0.15, 0.80],  # 4: argmax 2
    ]
)


def test_threshold_keeps_rows_with_max_at_least_tau() -> None:
    index, label, score = select_threshold(PROBS, 0.6)
    assert index.tolist() == [0, 1, 2, 4], "0.60 >= 0.6 is kept (inclusive)"
    assert label.tolist() == [0, 0, 2, 2]
    assert score.tolist() == pytest.approx([0.6, 0.7, 0.6, 0.8])


def test_threshold_exact_boundary_and_extremes() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    assert select_threshold(probs, 0.5)[0].tolist() == [0, 1, 2]
    assert select_threshold(probs, 0.75)[0].tolist() == [1, 2]
    assert select_threshold(probs, 1.0)[0].tolist() == [2]
    assert select_threshold(probs, 0.0)[0].tolist() == [0, 1, 2]
    empty = select_threshold(torch.tensor([[0.4, 0.3, 0.3]]), 0.9)
    assert all(t.numel() == 0 for t in empty)


def test_threshold_random_matches_reference() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(100, 5, generator=g).softmax(1)
    index, label, score = select_threshold(probs, 0.3)
    expected = [i for i in range(100) if probs[i].max().item() >= 0.3]
    assert index.tolist() == expected
    assert label.tolist() == [int(probs[i].argmax()) for i in expected]
    assert torch.equal(score, probs.max(1).values[index])


def test_topk_p1_k1() -> None:
    sel = as_lists(select_topk(PROBS, k=1, p=1))
    # class 0: best of {0, 1, 3} is 1; class 1: nobody's argmax; class 2: best of {2, 4} is 4
    assert [(i, c) for i, c, _ in sel] == [(1, 0), (4, 2)]
    assert [s for *_, s in sel] == pytest.approx([0.7, 0.8])


def test_topk_at_most_k_per_class_best_first() -> None:
    sel = as_lists(select_topk(PROBS, k=2, p=1))
    assert [(i, c) for i, c, _ in sel] == [(1, 0), (0, 0), (4, 2), (2, 2)]
    per_class: dict[int, list[float]] = {}
    for _, c, s in sel:
        per_class.setdefault(c, []).append(s)
    for scores in per_class.values():
        assert len(scores) <= 2
        assert scores == sorted(scores, reverse=True)


def test_topk_p1_only_argmax_class() -> None:
    index, label, _ = select_topk(PROBS, k=10, p=1)
    for i, c in zip(index.tolist(), label.tolist(), strict=True):
        assert c == int(PROBS[i].argmax())
    assert sorted(index.tolist()) == list(range(len(PROBS))), "each image exactly once with p=1"


def test_topk_p2_second_class() -> None:
    sel = as_lists(select_topk(PROBS, k=1, p=2))
    # class 1 is image 0's second choice (0.35), image 2's (0.30) and image 1's (0.20): 0 wins
    assert [(i, c) for i, c, _ in sel] == [(1, 0), (0, 1), (4, 2)]
    sel3 = as_lists(select_topk(PROBS, k=5, p=2))
    chosen_for = {}
    for i, c, _ in sel3:
        chosen_for.setdefault(i, []).append(c)
    assert sorted(chosen_for[0]) == [0, 1], "with p=2 an image may be chosen for two classes"
    assert sorted(chosen_for[3]) == [0, 2]


def test_topk_p_larger_than_classes() -> None:
    sel = as_lists(select_topk(PROBS, k=2, p=10))
    assert [(i, c) for i, c, _ in sel] == [(1, 0), (0, 0), (0, 1), (2, 1), (4, 2), (2, 2)]


def test_topk_k_larger_than_n() -> None:
    sel = as_lists(select_topk(PROBS, k=1000, p=1))
    assert len(sel) == len(PROBS)
    assert [c for _, c, _ in sel] == sorted(c for _, c, _ in sel), "ordered by class"


def test_topk_single_row() -> None:
    sel = as_lists(select_topk(torch.tensor([[0.2, 0.8]]), k=3, p=1))
    assert [(i, c) for i, c, _ in sel] == [(0, 1)]


@pytest.mark.parametrize(("k", "p"), [(1, 1), (5, 1), (30, 1), (13, 2), (40, 3), (250, 2), (7, 7)])
def test_topk_matches_brute_force(k: int, p: int) -> None:
    g = torch.Generator().manual_seed(1234)
    probs = (torch.randn(200, 7, generator=g) * 2).softmax(1)
    got = as_lists(select_topk(probs, k, p))
    want = brute_topk(probs, k, p)
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in want]
    assert [s for *_, s in got] == pytest.approx([s for *_, s in want])
