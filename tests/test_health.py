"""Quiet failures made loud: collapse, pretext at chance, a model below its predecessor, choice on val."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sstl.eval.health import at_chance, beaten_p, check_models, collapse, model_to_use, recommend
from sstl.eval.report import summary_markdown

CLASSES = ["cat", "dog", "owl", "fox"]


def test_a_model_predicting_one_class_on_balanced_val_is_collapsed() -> None:
    labels = torch.arange(4).repeat(10)  # 40 val images, 10 per class
    assert "95% of val predictions are 'dog'" in collapse([1] * 38 + [0, 2], labels, CLASSES)
    assert collapse(labels.tolist(), labels, CLASSES) is None  # a perfect model


def test_one_class_is_no_collapse_when_val_is_mostly_that_class() -> None:
    labels = torch.tensor([2] * 37 + [0, 1, 3])  # 92% owls: predicting owl is not a collapse
    assert collapse([2] * 40, labels, CLASSES) is None


def test_rotation_pretext_at_chance_is_reported_and_a_learned_one_is_not() -> None:
    assert "at chance" in at_chance(0.27, 4)
    assert at_chance(0.60, 4) is None


def test_student_below_teacher_on_val_is_a_warning() -> None:
    warnings = check_models({"teacher": 0.80, "student": 0.70, "finetuned": 0.75}, {"student": "collapsed: x"})
    assert warnings == ["student: collapsed: x", "student below teacher on val: 0.7000 < 0.8000"]
    assert check_models({"teacher": 0.7, "student": 0.8, "finetuned": 0.8}, {}) == []


def right(n: int, of: int, first: int = 0) -> list[bool]:
    """`of` val photos, the n from `first` on right."""
    return [first <= i < first + n for i in range(of)]


def test_the_sign_test_counts_only_the_photos_the_two_disagree_on() -> None:
    assert beaten_p(right(43, 50), right(39, 50, first=8)) == pytest.approx(794 / 4096)  # 8 wins, 4 losses: 0.19
    assert beaten_p(right(43, 50), right(39, 50)) == pytest.approx(1 / 16)  # the same 43 and 39, nested: 4 wins
    assert beaten_p(right(10, 50), right(10, 50)) == 1.0  # the same photos right: no evidence at all
    assert beaten_p(right(0, 12), right(12, 12)) == 1.0
    assert beaten_p(right(12, 12), right(0, 12)) == pytest.approx(2**-12)


def test_the_model_to_use_is_the_latest_not_beaten_on_val_beyond_chance() -> None:
    # 50 val photos: the teacher's 43 right against the fine-tuned student's 39 is chance (p 0.19)
    chance = {"teacher": right(43, 50), "student": right(39, 50, first=8), "finetuned": right(39, 50, first=8)}
    assert recommend(chance) == "finetuned"
    # 45 against 30 of the same photos is not (p 3e-5): the clearly worse later models are never used
    clear = {"teacher": right(45, 50), "student": right(30, 50), "finetuned": right(31, 50)}
    assert recommend(clear) == "teacher"
    # the student beats the teacher and the fine-tuned student is not beaten by either
    assert recommend({"teacher": right(30, 50), "student": right(45, 50), "finetuned": right(44, 50)}) == "finetuned"
    assert recommend({"teacher": right(30, 50), "student": right(45, 50), "finetuned": right(30, 50)}) == "student"


def test_with_rounds_each_student_is_checked_against_the_one_before_it() -> None:
    order = ["teacher", "student", "student2", "finetuned"]
    val = {"teacher": 0.70, "student": 0.80, "student2": 0.78, "finetuned": 0.81}
    assert check_models(val, {}, order=order) == ["student2 below student on val: 0.7800 < 0.8000"]
    correct = {m: right(round(a * 100), 100) for m, a in val.items()}
    assert recommend(correct, order=order) == "finetuned"
    assert recommend({**correct, "finetuned": right(60, 100)}, order=order) == "student2"  # 78 vs 60: beaten


def test_summary_names_the_model_to_use_warnings_and_absent_splits() -> None:
    metrics = {"teacher": {"test": {"accuracy": 0.5, "macro_f1": 0.5, "ece": 0.1}}}
    verdict = {"val_accuracy": {"teacher": 0.6}, "use": "teacher", "warnings": ["w1"], "absent_splits": ["test-add"]}
    text = summary_markdown(metrics, verdict)
    assert "test-add" not in text.splitlines()[0]  # no NaN column for a split that has no images
    assert "**Use: teacher**" in text and "**WARNING**: w1" in text and "left out: test-add" in text


def test_the_model_to_use_is_the_one_health_json_names(tmp_path: Path) -> None:
    # one rule: the summary's "Use:", the registered model and predict's default all read this file
    health = tmp_path / "health.json"
    assert model_to_use(health) == Path("models/finetuned.pt")  # before evaluate has run
    health.write_text(json.dumps({"use": "teacher", "val_accuracy": {"teacher": 0.9, "finetuned": 0.8}}))
    assert model_to_use(health) == Path("models/teacher.pt")
