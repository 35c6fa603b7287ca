"""model_card: worst classes and confused pairs worked out by hand, every section and figure in the card,
an absent test-add, and the data gathered from a real (tiny) prepared folder."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sstl.config.data import CorruptConfig
from sstl.data.prepare import prepare_folder
from sstl.eval.metrics import expected_calibration_error, reliability_bins
from sstl.eval.model_card import confused_pairs, gather_data, gather_params, model_card, worst_classes
from sstl.params import Params

# ---------------------------------------------------------------- figures


def test_worst_classes_lowest_first_ties_by_name() -> None:
    per_class = {"bee": 0.5, "ant": 1.0, "cat": 0.25, "dog": 0.5, "eel": 0.0}
    # eel 0.0 < cat 0.25 < bee 0.5 = dog 0.5 (bee first by name) < ant 1.0
    assert worst_classes(per_class, top=3) == [("eel", 0.0), ("cat", 0.25), ("bee", 0.5)]
    assert worst_classes(per_class, top=10)[-1] == ("ant", 1.0)


def test_worst_classes_leave_out_classes_without_images() -> None:
    per_class = {"bee": 0.5, "ant": 1.0, "cat": 0.25, "dog": 0.5, "eel": 0.0}
    support = {"ant": 3, "bee": 2, "cat": 4, "dog": 2}  # eel has no test image: its 0.0 means nothing
    assert worst_classes(per_class, support=support, top=3) == [("cat", 0.25), ("bee", 0.5), ("dog", 0.5)]


def rows_of(pairs: list[tuple[str, str, int]]) -> list[dict[str, str]]:
    return [{"actual": a, "predicted": p} for a, p, n in pairs for _ in range(n)]


def test_confused_pairs_by_hand() -> None:
    # a: 6 images (3 right, 2 as b, 1 as c); b: 4 (2 right, 2 as a); c: 2 (1 right, 1 as a)
    rows = rows_of([("a", "a", 3), ("a", "b", 2), ("a", "c", 1), ("b", "b", 2), ("b", "a", 2), ("c", "c", 1)])
    rows += rows_of([("c", "a", 1)])
    pairs = confused_pairs(rows, top=3)
    # counts 2, 2 (a->b before b->a by name), then 1 (a->c before c->a); shares of the true class
    assert [(p["actual"], p["predicted"], p["count"]) for p in pairs] == [("a", "b", 2), ("b", "a", 2), ("a", "c", 1)]
    assert [p["share"] for p in pairs] == pytest.approx([2 / 6, 2 / 4, 1 / 6])
    assert len(confused_pairs(rows)) == 4, "only the 4 mistaken pairs, never a correct one"


def test_confused_pairs_none_when_all_right() -> None:
    assert confused_pairs(rows_of([("a", "a", 3), ("b", "b", 1)])) == []


# ---------------------------------------------------------------- the card


def bins_case(seed: int = 0, n: int = 200, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), target] += 1.5
    return logits.softmax(1), target


def card_inputs(*, test_add: bool = True) -> dict[str, Any]:
    """Hand-built inputs with figures that appear nowhere else (0.8123, 0.00042, ...)."""
    splits = ("test", "test-add") if test_add else ("test",)
    probs, target = bins_case()
    rows = rows_of([("ant", "ant", 8), ("ant", "bee", 2), ("bee", "bee", 9), ("bee", "ant", 1), ("cat", "cat", 10)])
    metrics = {
        m: {s: {"accuracy": 0.8123, "macro_f1": 0.7771, "ece": 0.0456} for s in splits}
        for m in ("teacher", "student", "finetuned")
    }
    metrics["student"]["test"] = {"accuracy": 0.9012, "macro_f1": 0.8899, "ece": 0.0321}
    per_class = {m: {s: {"ant": 0.8, "bee": 0.9, "cat": 1.0} for s in splits} for m in metrics}
    source = "test-add/" if test_add else "absent (no test-add/ folder)"
    return {
        "metrics": metrics,
        "per_class": per_class,
        "confusion": {m: {s: rows for s in splits} for m in metrics},
        "reliability": {m: {s: reliability_bins(probs, target, 15) for s in splits} for m in metrics},
        "verdict": {
            "val_accuracy": {"teacher": 0.61, "student": 0.7345, "finetuned": 0.7},
            "use": "student",
            "warnings": ["finetuned below student on val: 0.7000 < 0.7345"],
            "absent_splits": [] if test_add else ["test-add"],
        },
        "data": {
            "folder": "data/zoo",
            "classes": 3,
            "splits": {
                "labeled": {"images": 30, "source": "labeled/"},
                "val": {"images": 9, "source": "val/"},
                "unlabeled": {"images": 777, "source": "unlabeled/"},
                "test": {"images": 30, "source": "test/"},
                "test-add": {"images": 30 if test_add else 0, "source": source},
            },
            "test_add": {"kind": "folder" if test_add else "absent", "corruptions": None},
            "skipped": [
                {"path": "data/zoo/labeled/ant/notes.txt", "reason": "not an image file (suffix '.txt')"},
                {"path": "data/zoo/unlabeled/u9.png", "reason": "duplicate of evaluation image data/zoo/test/a.png"},
                {"path": "data/zoo/unlabeled/u8.png", "reason": "duplicate of evaluation image data/zoo/test/b.png"},
            ],
            "near_duplicates": 0,
        },
        "params": gather_params(checkpoints(), Params().model_dump()),
        "environment": {"python": "3.11.7", "cpu": "Test CPU 9000", "torch": "2.99.0", "lock_sha256": "abc123def456"},
    }


def checkpoints() -> dict[str, dict[str, Any]]:
    """Payloads as save_checkpoint writes them (no state dict): the teacher's tuned lr is 0.00042."""
    teacher = {**Params().teacher.model_dump(), "lr": 0.00042, "arch": "convnet_s"}
    return {
        "teacher": {
            "model": {"arch": "convnet_s", "weights": "none"},
            "config": {"teacher": teacher, "seed": 42, "precision": "bf16"},
            "fit": {"epochs_run": 7},
        },
        "student": {
            "model": {"arch": "resnet34", "weights": "none"},
            "config": {"student": Params().student.model_dump(), "seed": 42, "precision": "fp32"},
        },
        "finetuned": {
            "model": {"arch": "resnet34", "weights": "none"},
            "config": {"finetune": {**Params().finetune.model_dump(), "lr": 0.000077}, "from": "models/student.pt"},
        },
    }


SECTIONS = ("# Model card", "## Data", "## Params", "## Metrics", "## Calibration", "## Where student fails")
SECTIONS += ("## Health", "## Environment")


def test_card_holds_every_section_and_figure() -> None:
    inputs = card_inputs()
    card = model_card(**inputs)
    for heading in SECTIONS:
        assert f"\n{heading}\n" in f"\n{card}", heading
    for figure in ("0.8123", "0.7771", "0.0456", "0.9012", "0.8899", "0.0321", "0.7345"):
        assert figure in card, figure
    for text in ("data/zoo", "| unlabeled | 777 |", "Test CPU 9000", "abc123def456", "2.99.0", "0.00042", "7.7e-05"):
        assert text in card, text
    assert "| teacher | convnet_s | none |" in card and "models/student.pt" in card
    assert "| bf16 |" in card, "the precision each model was trained in, from its checkpoint"
    assert "**WARNING**: finetuned below student on val" in card
    assert "Model to use: **student**" in card
    assert "| student * | test | 0.9012 | 0.8899 | 0.0321 |" in card, "the model in use is marked"


def test_card_data_section_summarises_skips() -> None:
    card = model_card(**card_inputs())
    assert "Skipped entries: 3" in card
    assert "| duplicate of an evaluation image | 2 |" in card
    assert "| not an image file | 1 |" in card
    assert "| data/zoo/labeled/ant/notes.txt | not an image file (suffix '.txt') |" in card
    assert "test-add: a folder of its own, `data/zoo/test-add/`" in card


def test_card_errors_of_the_used_model() -> None:
    card = model_card(**card_inputs())
    # worst classes: ant 0.8 (10 images) then bee 0.9 (10); confused: ant->bee 2 of 10, bee->ant 1 of 10
    assert "| test | ant | 0.8000 | 10 |" in card and "| test | bee | 0.9000 | 10 |" in card
    assert "| test | ant | bee | 2 | 0.2000 |" in card and "| test | bee | ant | 1 | 0.1000 |" in card
    assert "| test-add | ant | bee | 2 | 0.2000 |" in card


def test_card_reliability_reproduces_ece() -> None:
    probs, target = bins_case()
    card = model_card(**card_inputs())
    assert f"ECE from these bins: {expected_calibration_error(probs, target, 15):.4f}" in card
    assert "Reliability of student on test (200 images, 15 equal-width confidence bins)" in card
    assert "1.0000]" in card, "the last bin is closed at 1"


def test_card_is_deterministic() -> None:
    assert model_card(**card_inputs()) == model_card(**card_inputs())


def test_card_without_test_add_says_it_is_absent() -> None:
    inputs = card_inputs(test_add=False)
    card = model_card(**inputs)
    for heading in SECTIONS:
        assert f"\n{heading}\n" in f"\n{card}", heading
    assert "- test-add: absent (no test-add/ folder)" in card
    assert "test-add: absent (no test-add/ folder and no data.test_add_corruptions)" in card
    assert "- left out: test-add" in card
    assert "| test-add | 0 | absent (no test-add/ folder) |" in card
    assert "| student * | test-add |" not in card and "| test-add | ant |" not in card, "no figures for it"
    assert "Reliability of student on test (" in card and "Reliability of student on test-add" not in card


# ---------------------------------------------------------------- gathering


def png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tiny_folder(root: Path) -> Path:
    """3 classes x 4 labelled, 2 test each, 3 unlabelled (one a copy of a test image), one text file."""
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat"):
        for i in range(4):
            (root / "labeled" / c).mkdir(parents=True, exist_ok=True)
            (root / "labeled" / c / f"{i}.png").write_bytes(png(rng))
        for i in range(2):
            (root / "test" / c).mkdir(parents=True, exist_ok=True)
            (root / "test" / c / f"{i}.png").write_bytes(png(rng))
    (root / "unlabeled").mkdir()
    for i in range(2):
        (root / "unlabeled" / f"u{i}.png").write_bytes(png(rng))
    (root / "unlabeled" / "copy.png").write_bytes((root / "test" / "bee" / "1.png").read_bytes())
    (root / "labeled" / "ant" / "notes.txt").write_text("not a photo")
    return root


def test_gather_data_from_a_prepared_folder(tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path / "images")
    summary = prepare_folder(folder, tmp_path / "prepared", image_size=8, val_fraction=0.25, seed=0)
    data = gather_data(tmp_path / "prepared", folder=str(folder))
    # 4 labelled per class, 1 each to val; the copy of a test image is dropped from the pool
    assert {s: v["images"] for s, v in data["splits"].items()} == summary.counts
    assert summary.counts == {"labeled": 9, "val": 3, "unlabeled": 2, "test": 6, "test-add": 0}
    assert data["classes"] == 3 and data["folder"] == str(folder)
    assert data["test_add"] == {"kind": "absent", "corruptions": None}
    skipped = {Path(r["path"]).name: r["reason"] for r in data["skipped"]}
    assert skipped["notes.txt"] == "not an image file (suffix '.txt')"
    assert skipped["copy.png"].startswith("duplicate of evaluation image") and "bee" in skipped["copy.png"]
    assert len(skipped) == 2
    card = model_card(**{**card_inputs(test_add=False), "data": data})
    assert "Skipped entries: 2" in card and "| not an image file | 1 |" in card


def test_gather_data_names_generated_test_add(tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path / "images")
    cfg = CorruptConfig(kinds=["jpeg", "contrast"], severity=2, seed=5)
    prepare_folder(folder, tmp_path / "prepared", image_size=8, val_fraction=0.25, seed=0, corrupt_test=cfg)
    data = gather_data(tmp_path / "prepared", folder=str(folder), test_add_corruptions=cfg.model_dump())
    assert data["splits"]["test-add"]["images"] == data["splits"]["test"]["images"] == 6
    assert data["test_add"]["kind"] == "corruptions"
    card = model_card(**{**card_inputs(), "data": data})
    assert "generated from test/ under seeded corruptions (jpeg, contrast; severity 2, seed 5)" in card


def test_gather_params_prefers_what_the_checkpoint_recorded() -> None:
    params = Params().model_dump()
    found = gather_params(checkpoints(), params)
    assert found["models"]["teacher"]["lr"] == 0.00042, "the tuned lr, not params.yaml's"
    assert found["models"]["teacher"]["precision"] == "bf16"
    assert found["models"]["teacher"]["epochs_run"] == 7
    assert found["models"]["finetuned"]["weights"] == "models/student.pt"
    assert found["models"]["finetuned"]["lr"] == found["models"]["finetuned"]["finetune_lr"] == 0.000077
    assert found["models"]["student"]["precision"] == "fp32"
    assert found["seed"] == params["seed"]
    assert set(found["pseudolabel"]) == {"method", "top_k", "top_p", "tta", "temperature", "student targets"}
    threshold = {**params, "pseudolabel": {**params["pseudolabel"], "method": "threshold"}}
    assert "threshold" in gather_params(checkpoints(), threshold)["pseudolabel"]
    bare = gather_params({"student": {}}, params)
    assert bare["models"]["student"]["arch"] == params["student"]["arch"], "params.yaml where nothing is recorded"
