"""metrics agree with scikit-learn; ECE on constructed calibration cases."""

from __future__ import annotations

import pytest
import sklearn.metrics as skm
import torch

from sstl.eval.metrics import (
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    macro_f1,
    reliability_bins,
)


def random_case(seed: int, n: int = 300, c: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), target] += 1.0  # better than chance, still many mistakes
    return logits, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(seed: int) -> None:
    logits, target = random_case(seed)
    pred = logits.argmax(1)
    cm = confusion_matrix(pred, target, 6)
    assert cm.shape == (6, 6)
    assert cm.tolist() == skm.confusion_matrix(target.numpy(), pred.numpy(), labels=list(range(6))).tolist()
    assert int(cm.sum()) == len(target)


def test_confusion_matrix_rows_are_truth() -> None:
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_report_matches_sklearn(seed: int) -> None:
    logits, target = random_case(seed)
    rep = classification_report(logits, target, 6)
    y, p = target.numpy(), logits.argmax(1).numpy()
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    assert rep["confusion"] == skm.confusion_matrix(y, p, labels=list(range(6))).tolist()
    assert rep["predictions"] == p.tolist()
    assert rep["per_class_accuracy"] == pytest.approx(
        skm.recall_score(y, p, average=None, labels=list(range(6)), zero_division=0).tolist()
    )
    assert 0.0 <= rep["ece"] <= 1.0


def test_macro_f1_with_absent_classes_matches_sklearn() -> None:
    # class 3 never appears; class 2 is only predicted, never true
    target = torch.tensor([0, 0, 1, 1, 1, 0])
    pred = torch.tensor([0, 2, 1, 0, 1, 0])
    cm = confusion_matrix(pred, target, 4)
    assert macro_f1(cm) == pytest.approx(skm.f1_score(target.numpy(), pred.numpy(), average="macro"))


def test_macro_f1_perfect_and_empty() -> None:
    t = torch.tensor([0, 1, 2, 2])
    assert macro_f1(confusion_matrix(t, t, 3)) == pytest.approx(1.0)
    assert macro_f1(torch.zeros(3, 3, dtype=torch.int64)) == 0.0


def test_ece_zero_for_confident_correct() -> None:
    target = torch.tensor([0, 1, 2, 1, 0])
    probs = torch.nn.functional.one_hot(target, 3).float()
    assert expected_calibration_error(probs, target, bins=15) == pytest.approx(0.0, abs=1e-7)


def test_ece_single_bin() -> None:
    # every prediction has confidence 0.8; 3 of 5 are right: ECE = |0.6 - 0.8| = 0.2
    probs = torch.tensor([[0.8, 0.2]] * 5)
    target = torch.tensor([0, 0, 0, 1, 1])
    for bins in (1, 10, 15):
        assert expected_calibration_error(probs, target, bins) == pytest.approx(0.2, abs=1e-6)


def test_ece_two_bins_weighted_by_share() -> None:
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.6, 0.4]])
    target = torch.tensor([0, 0, 1, 1, 0])
    # bin 0.9: acc 0.5, gap 0.4, share 0.8; bin 0.6: acc 1.0, gap 0.4, share 0.2
    assert expected_calibration_error(probs, target, 10) == pytest.approx(0.8 * 0.4 + 0.2 * 0.4, abs=1e-6)


def test_ece_in_report_matches_function() -> None:
    logits, target = random_case(5)
    rep = classification_report(logits, target, 6, bins=10)
    assert rep["ece"] == pytest.approx(expected_calibration_error(logits.softmax(1), target, 10))


# ---------------------------------------------------------------- reliability_bins


def ece_from_bins(bins: list[dict]) -> float:
    n = sum(b["count"] for b in bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])


@pytest.mark.parametrize(("seed", "bins"), [(0, 15), (1, 10), (2, 1), (3, 7)])
def test_reliability_bins_sum_to_count_and_reproduce_ece(seed: int, bins: int) -> None:
    logits, target = random_case(seed)
    probs = logits.softmax(1)
    rows = reliability_bins(probs, target, bins)
    assert len(rows) == bins
    assert sum(r["count"] for r in rows) == len(target)
    assert ece_from_bins(rows) == pytest.approx(expected_calibration_error(probs, target, bins), abs=1e-6)


def test_reliability_bins_by_hand() -> None:
    # four at confidence 0.9 (2 right), one at 0.65 (right); 10 bins of width 0.1
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.65, 0.35]])
    target = torch.tensor([0, 0, 1, 1, 0])
    rows = reliability_bins(probs, target, 10)
    assert [r["count"] for r in rows] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 4]
    assert (rows[6]["confidence"], rows[6]["accuracy"]) == (pytest.approx(0.65), 1.0)
    assert (rows[9]["confidence"], rows[9]["accuracy"]) == (pytest.approx(0.9), 0.5)
    assert (rows[6]["lower"], rows[6]["upper"]) == (pytest.approx(0.6), pytest.approx(0.7))
    assert rows[0]["confidence"] is None and rows[0]["accuracy"] is None, "an empty bin has no mean"
    assert ece_from_bins(rows) == pytest.approx(0.8 * 0.4 + 0.2 * 0.35, abs=1e-6)


def test_reliability_bins_full_confidence_in_last_bin() -> None:
    target = torch.tensor([0, 1, 2, 1])
    rows = reliability_bins(torch.nn.functional.one_hot(target, 3).float(), target, bins=5)
    assert [r["count"] for r in rows] == [0, 0, 0, 0, 4]
    assert rows[-1]["upper"] == pytest.approx(1.0) and rows[-1]["accuracy"] == 1.0


def test_report_reliability_matches_its_ece() -> None:
    logits, target = random_case(6)
    rep = classification_report(logits, target, 6, bins=12)
    assert rep["reliability"] == reliability_bins(logits.softmax(1), target, 12)
    assert ece_from_bins(rep["reliability"]) == pytest.approx(rep["ece"], abs=1e-6)
