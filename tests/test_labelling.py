"""The labelling queue: strategies rank by what they claim, `label-queue` writes a queue a tool can
import, `label-import` moves the labelled photos (all or nothing) and records it."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image
from typer.testing import CliRunner

from sstl.cli.app import app
from sstl.core.files import read_csv
from sstl.data.scan import scan
from sstl.labelling.importer import RECORD
from sstl.labelling.queue import QUEUE_FIELDS
from sstl.labelling.rank import entropies, margins, rank

runner = CliRunner()
POOL = 12


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """labeled/<cat,dog,fox>/, unlabeled/ (12 photos, some nested, one name twice), test/; cwd without params.yaml."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)

    def photo(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)

    for c in CLASSES:
        photo(folder / "labeled" / c / "a.png")
        photo(folder / "test" / c / "t.png")
    for i in range(POOL - 2):
        photo(folder / "unlabeled" / f"u{i:02d}.{'jpg' if i % 2 else 'png'}")
    photo(folder / "unlabeled" / "day1" / "same.png")
    photo(folder / "unlabeled" / "day2" / "same.png")
    (folder / "unlabeled" / "notes.txt").write_text("not a photo")
    return folder


def queue(checkpoint: Path, folder: Path, *extra: str) -> tuple[int, str, str]:
    res = runner.invoke(app, ["label-queue", "--model", str(checkpoint), "--folder", str(folder), *extra])
    return res.exit_code, res.stdout, res.stderr


def one_line_error(res_code: int, stderr: str) -> None:
    assert res_code == 1, stderr
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr


# ---------------------------------------------------------------- the strategies


PROBS = np.array(
    [
        [0.90, 0.05, 0.05],  # confident: margin 0.85
        [0.45, 0.44, 0.11],  # torn between two: margin 0.01, entropy 0.97
        [0.34, 0.33, 0.33],  # torn between all three: margin 0.01, highest entropy
        [0.60, 0.30, 0.10],  # margin 0.30
        [0.50, 0.48, 0.02],  # margin 0.02, entropy below row 3's (two classes only)
    ]
)


def test_margin_ranks_the_smallest_gap_first() -> None:
    assert np.allclose(margins(PROBS), [0.85, 0.01, 0.01, 0.30, 0.02])
    assert rank(PROBS, "margin", 5).tolist() == [1, 2, 4, 3, 0]  # a tie keeps pool order: reproducible
    assert rank(PROBS, "margin", 2).tolist() == [1, 2]


def test_entropy_ranks_the_most_uncertain_first() -> None:
    e = entropies(PROBS)
    assert e[2] == pytest.approx(np.log(3), abs=1e-3)
    # row 4 is torn between two classes only: margin puts it before row 3, entropy after
    assert rank(PROBS, "entropy", 5).tolist() == list(np.argsort(-e)) == [2, 1, 3, 4, 0]


def test_n_larger_than_the_pool_takes_the_whole_pool() -> None:
    for strategy in ("margin", "entropy", "diverse"):
        picks = rank(PROBS, strategy, 50, features=lambda idx: np.eye(5)[idx])
        assert sorted(picks.tolist()) == [0, 1, 2, 3, 4]


def blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """40 photos in two far-apart feature blobs; blob A holds the most uncertain ones, blob B the next."""
    rng = np.random.default_rng(1)
    n = 20
    margin_a = 0.01 * np.arange(1, n + 1)  # 0.01 ... 0.20
    margin_b = margin_a + 0.015  # interleaved with A's from the third on: A, A, B, A, B, ...
    margin = np.concatenate([margin_a, margin_b])
    top = (1 + margin) / 2
    probs = np.stack([top, 1 - top, np.zeros_like(top)], axis=1)
    centre = np.zeros(16)
    centre[0] = 1.0
    other = np.zeros(16)
    other[1] = 1.0
    feats = np.concatenate([centre + 0.01 * rng.normal(size=(n, 16)), other + 0.01 * rng.normal(size=(n, 16))])
    blob = np.array([0] * n + [1] * n)
    return probs, feats, blob


def test_diverse_picks_span_the_clusters() -> None:
    probs, feats, blob = blobs()
    asked: list[int] = []

    def features(idx: np.ndarray) -> np.ndarray:
        asked.extend(idx.tolist())
        return feats[idx]

    assert set(blob[rank(probs, "margin", 2)]) == {0}  # margin alone takes both from blob A
    picks = rank(probs, "diverse", 2, features=features, seed=0)
    assert set(blob[picks]) == {0, 1}
    assert picks.tolist() == [0, 20]  # the most uncertain of each blob, most uncertain first
    assert len(asked) == 10  # only the 5 x n candidates are featurised, not the pool
    assert rank(probs, "diverse", 2, features=lambda i: feats[i], seed=0).tolist() == picks.tolist()


def test_diverse_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=300)
    feats = rng.normal(size=(300, 8))
    first = rank(probs, "diverse", 20, features=lambda i: feats[i], seed=7)
    assert len(set(first.tolist())) == 20
    assert rank(probs, "diverse", 20, features=lambda i: feats[i], seed=7).tolist() == first.tolist()
    assert np.all(np.diff(margins(probs)[first]) >= 0)  # best first


# ---------------------------------------------------------------- label-queue


def read_queue(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("strategy", ["margin", "entropy", "diverse"])
def test_queue_writes_copies_and_a_csv(checkpoint: Path, photos: Path, tmp_path: Path, strategy: str) -> None:
    out = tmp_path / "queue"
    code, stdout, stderr = queue(checkpoint, photos, "--n", "5", "--strategy", strategy, "--out", str(out))
    assert code == 0, stderr
    assert "5 of 12 unlabelled photos" in stdout
    rows = read_queue(out / "queue.csv")
    assert list(rows[0]) == list(QUEUE_FIELDS)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert len({r["image"] for r in rows}) == 5
    for r in rows:
        copy, source = out / r["image"], Path(r["source"])
        assert copy.read_bytes() == source.read_bytes()
        assert source.parent.is_relative_to(photos / "unlabeled") and source.suffix in (".png", ".jpg")
        assert r["guess"] in CLASSES and r["second_guess"] in CLASSES and r["guess"] != r["second_guess"]
        assert 0 < float(r["guess_probability"]) <= 1 and r["label"] == ""
    score = [float(r["score"]) for r in rows]
    assert score == sorted(score, reverse=strategy == "entropy")
    assert sorted(os.listdir(tmp_path)) == ["photos", "queue"]  # no temp folder left behind

    again = tmp_path / "again"
    assert queue(checkpoint, photos, "--n", "5", "--strategy", strategy, "--out", str(again))[0] == 0
    assert read_queue(again / "queue.csv") == rows  # same model, pool and seed: the same queue


def test_queue_larger_than_the_pool_and_same_names(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "queue"
    code, stdout, stderr = queue(checkpoint, photos, "--n", "500", "--out", str(out))
    assert code == 0, stderr
    rows = read_queue(out / "queue.csv")
    assert len(rows) == POOL and len(os.listdir(out / "images")) == POOL  # day1/same.png and day2/same.png both
    assert sum(Path(r["image"]).name.startswith("same-") for r in rows) == 2


def test_force_replaces_only_a_queue_label_queue_wrote(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "queue"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    for force in ([], ["--force"]):  # a folder of anything else is never replaced, --force or not
        code, _, stderr = queue(checkpoint, photos, "--n", "3", "--out", str(out), *force)
        one_line_error(code, stderr)
        assert "label-queue did not write" in stderr and os.listdir(out) == ["mine.txt"]
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    code, _, stderr = queue(checkpoint, photos, "--n", "3", "--out", str(photos), "--force")  # the photos themselves
    one_line_error(code, stderr)
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before
    fresh = tmp_path / "fresh"
    assert queue(checkpoint, photos, "--n", "3", "--out", str(fresh))[0] == 0
    code, _, stderr = queue(checkpoint, photos, "--n", "3", "--out", str(fresh))  # an earlier queue: only with --force
    one_line_error(code, stderr)
    assert "--force" in stderr
    assert queue(checkpoint, photos, "--n", "2", "--out", str(fresh), "--force")[0] == 0
    assert sorted(os.listdir(fresh)) == [".sstl-label-queue", "images", "queue.csv"]
    assert len(read_queue(fresh / "queue.csv")) == 2
    assert sorted(os.listdir(tmp_path)) == ["fresh", "photos", "queue"]


def test_queue_bad_inputs_are_one_line_and_write_nothing(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "queue"
    empty = tmp_path / "empty"
    (empty / "unlabeled").mkdir(parents=True)
    for args, says in (
        (["--model", str(tmp_path / "none.pt")], "none.pt not found"),
        (["--folder", str(tmp_path / "nowhere")], "unlabeled not found"),
        (["--folder", str(empty)], "no image files"),
    ):
        res = runner.invoke(
            app, ["label-queue", "--model", str(checkpoint), "--folder", str(photos), "--out", str(out), *args]
        )
        one_line_error(res.exit_code, res.stderr)
        assert says in res.stderr and not out.exists()
    res = runner.invoke(app, ["label-queue", "--model", str(checkpoint), "--folder", str(photos), "--strategy", "odd"])
    assert res.exit_code == 2 and "odd" in res.output and "margin" in res.output and not out.exists()  # Typer's usage
    res = runner.invoke(app, ["label-queue", "--model", str(checkpoint), "--out", str(out)])  # no params.yaml here
    one_line_error(res.exit_code, res.stderr)
    assert "--folder" in res.stderr


# ---------------------------------------------------------------- label-import


def labelled(checkpoint: Path, photos: Path, tmp_path: Path, labels: list[str]) -> tuple[Path, list[dict[str, str]]]:
    """A queue of len(labels) photos with its label column filled in as a labeller would."""
    out = tmp_path / "queue"
    assert queue(checkpoint, photos, "--n", str(len(labels)), "--out", str(out), "--force")[0] == 0
    rows = read_queue(out / "queue.csv")
    for r, label in zip(rows, labels, strict=True):
        r["label"] = label
    with (out / "queue.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=QUEUE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return out / "queue.csv", rows


def import_(labels: Path, photos: Path, *extra: str) -> tuple[int, str, str]:
    res = runner.invoke(app, ["label-import", str(labels), "--folder", str(photos), *extra])
    return res.exit_code, res.stdout, res.stderr


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_import_moves_records_and_reimport_is_a_no_op(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    labels, rows = labelled(checkpoint, photos, tmp_path, ["dog", "", "cat", " fox ", "dog"])
    code, stdout, stderr = import_(labels, photos)
    assert code == 0, stderr
    assert "moved 4 photos" in stdout and "(cat 1, dog 2, fox 1)" in stdout and "1 rows without a label" in stdout
    for r in rows:
        source = Path(r["source"])
        if r["label"].strip():
            assert not source.exists() and (photos / "labeled" / r["label"].strip() / source.name).is_file()
        else:
            assert source.is_file()  # left where it was
    with (photos / RECORD).open(newline="", encoding="utf-8") as f:
        record = list(csv.DictReader(f))
    assert [r["label"] for r in record] == ["dog", "cat", "fox", "dog"]
    assert all(r["source"].startswith("unlabeled/") and r["destination"].startswith("labeled/") for r in record)
    assert record[0]["guess"] in CLASSES and record[0]["time"].endswith("+00:00")

    found = scan(photos)  # the record at the folder's root is neither a photo nor a class for prepare
    assert RECORD not in {p.name for p in [e.path for e in found.entries] + [Path(s["path"]) for s in found.skipped]}
    assert len([e for e in found.entries if e.split == "unlabeled"]) == POOL - 4

    before = tree(photos)
    code, stdout, stderr = import_(labels, photos)
    assert code == 0, stderr
    assert "moved 0 photos" in stdout and "4 rows already imported" in stdout
    assert tree(photos) == before and len((photos / RECORD).read_text().splitlines()) == 5


def test_import_unknown_class_names_row_and_classes(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    labels, _ = labelled(checkpoint, photos, tmp_path, ["dog", "wolf", "Cat"])
    before = tree(photos)
    code, _, stderr = import_(labels, photos)
    one_line_error(code, stderr)
    assert "row 3: unknown class 'wolf'" in stderr and "cat, dog, fox" in stderr and "--new-classes" in stderr
    assert tree(photos) == before  # nothing moved, no record

    code, _, stderr = import_(labels, photos, "--new-classes")  # 'Cat' beside 'cat': a twin, never a new class
    one_line_error(code, stderr)
    assert "row 4: 'Cat' differs from the class 'cat' only in case" in stderr and tree(photos) == before
    labels, _ = labelled(checkpoint, photos, tmp_path, ["dog", "wolf"])
    code, _, stderr = import_(labels, photos, "--new-classes")
    assert code == 0, stderr
    assert len(os.listdir(photos / "labeled" / "wolf")) == 1


def test_import_vanished_source_and_clash_move_nothing(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    labels, rows = labelled(checkpoint, photos, tmp_path, ["dog", "cat", "fox"])
    Path(rows[2]["source"]).unlink()
    before = tree(photos)
    code, _, stderr = import_(labels, photos)
    one_line_error(code, stderr)
    assert "row 4:" in stderr and "not found" in stderr and tree(photos) == before

    labels, rows = labelled(checkpoint, photos, tmp_path, ["dog", "cat"])
    clash = photos / "labeled" / "cat" / Path(rows[1]["source"]).name
    clash.write_bytes(b"another photo")
    before = tree(photos)
    code, _, stderr = import_(labels, photos)
    one_line_error(code, stderr)
    assert "row 3:" in stderr and "already exists" in stderr and clash.read_bytes() == b"another photo"
    assert tree(photos) == before


def test_import_bad_files_are_one_line(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    code, _, stderr = import_(tmp_path / "missing.csv", photos)
    one_line_error(code, stderr)
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("image,source\nimages/a.png,/x/a.png\n")
    code, _, stderr = import_(no_label, photos)
    one_line_error(code, stderr)
    assert "no label column" in stderr
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text(f"source,label\n{photos / 'test' / 'cat' / 't.png'},cat\n")
    code, _, stderr = import_(elsewhere, photos)
    one_line_error(code, stderr)
    assert "row 2:" in stderr and "is not in" in stderr


def test_import_into_the_project_folder_refreshes_the_inventory(checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    """With the folder as params.yaml's data.folder, data/inventory.json changes: `dvc repro` retrains."""
    (tmp_path / "params.yaml").write_text("data:\n  folder: photos\n")
    labels, _ = labelled(checkpoint, photos, tmp_path, ["dog", "cat"])
    res = runner.invoke(app, ["label-import", str(labels)])  # the folder from params.yaml
    assert res.exit_code == 0, res.output
    assert "moved 2 photos" in res.stdout and "data/inventory.json updated" in res.stdout
    inventory = json.loads((tmp_path / "data" / "inventory.json").read_text())
    assert inventory["files"] == 3 * 2 + POOL  # labeled + test + unlabeled: the moved photos counted once


def _pool(tmp_path: Path) -> Path:
    """A photo folder with classes cat and dog and two real photos in unlabeled/."""
    folder = tmp_path / "photos"
    for name in ("labeled/cat", "labeled/dog", "unlabeled/day1"):
        (folder / name).mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (folder / "unlabeled/day1" / name).write_bytes(b"a photo " + name.encode())
    return folder


def _labels(tmp_path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding=encoding)
    return path


def test_import_moves_only_photos_whose_real_path_is_in_the_pool(tmp_path: Path) -> None:
    folder = _pool(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "secret.jpg").write_bytes(b"not the user's photo")
    for i in range(3):
        (elsewhere / "sub" / f"{i}.jpg").write_bytes(b"x")
    (folder / "unlabeled/linked").symlink_to(elsewhere, target_is_directory=True)  # a folder link leading out
    (folder / "unlabeled/day1/link.jpg").symlink_to(elsewhere / "secret.jpg")  # a file link leading out
    (folder / "unlabeled/day1/notes.txt").write_text("not a photo")
    (folder / "unlabeled/day1/folder.jpg").mkdir()  # a folder named like a photo
    before = tree(folder) + tree(elsewhere)
    cases = {
        f"{folder}/unlabeled/linked/secret.jpg": "is not in",
        f"{folder}/unlabeled/linked/sub": "is not an image file",
        f"{folder}/unlabeled/day1/link.jpg": "is a symbolic link",
        f"{folder}/unlabeled/day1/notes.txt": "is not an image file",
        f"{folder}/unlabeled/day1/folder.jpg": "is not a regular file",
    }
    for source, says in cases.items():
        code, _, stderr = import_(_labels(tmp_path, f"source,label\n{source},cat\n"), folder)
        one_line_error(code, stderr)
        assert says in stderr and "row 2" in stderr, (source, stderr)
    assert tree(folder) + tree(elsewhere) == before  # nothing moved, from anywhere
    assert not (folder / "label-imports.csv").exists()


@pytest.mark.parametrize(
    ("label", "says"),
    [
        ("new\nline", "cannot be a class name"),
        ("zero\u200bwidth", "cannot be a class name"),
        ("=HYPERLINK(x)", "cannot be a class name"),
        ("+1", "cannot be a class name"),
        ("-rf", "cannot be a class name"),
        ("@me", "cannot be a class name"),
        ("nul\x00byte", "cannot be a class name"),
        ("Cat", "differs from the class 'cat' only in case"),
        ("../up", "cannot be a class name"),
    ],
)
def test_new_class_names_are_folder_and_spreadsheet_safe(tmp_path: Path, label: str, says: str) -> None:
    folder = _pool(tmp_path)
    rows = io.StringIO()
    csv.writer(rows).writerows([["source", "label"], [f"{folder}/unlabeled/day1/a.jpg", label]])
    before = tree(folder)
    code, _, stderr = import_(_labels(tmp_path, rows.getvalue()), folder, "--new-classes")
    one_line_error(code, stderr)
    assert says in stderr and "Traceback" not in stderr
    assert tree(folder) == before


def test_a_unicode_class_name_is_fine(tmp_path: Path) -> None:
    folder = _pool(tmp_path)
    code, _, stderr = import_(
        _labels(tmp_path, f"source,label\n{folder}/unlabeled/day1/a.jpg,chat noir\n"), folder, "--new-classes"
    )
    assert code == 0, stderr
    assert (folder / "labeled/chat noir/a.jpg").is_file()


def test_csv_shapes_that_would_import_the_wrong_thing_are_refused(tmp_path: Path) -> None:
    folder = _pool(tmp_path)
    source = f"{folder}/unlabeled/day1/a.jpg"
    for text, says in (
        (f"source,label,label\n{source},cat,dog\n", "has 2 label columns (columns 2, 3): keep one"),
        (f"source,label,choice\n{source},,cat\n", "no row has a label"),  # a Label Studio export
    ):
        code, _, stderr = import_(_labels(tmp_path, text), folder)
        one_line_error(code, stderr)
        assert says in stderr, stderr
    assert "'choice' has values" in stderr
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still `source`
    code, _, stderr = import_(_labels(tmp_path, f"source,label\n{source},cat\n", encoding="utf-8-sig"), folder)
    assert code == 0, stderr
    assert (folder / "labeled/cat/a.jpg").is_file()


def _slow_import(tmp_path: Path, labels: Path, folder: Path) -> subprocess.Popen[str]:
    """`sstl label-import` on a slow file system: every move takes a while, so a signal lands between two."""
    slow = tmp_path / "slow.py"
    slow.write_text(
        "import shutil, sys, time\n"
        "real = shutil.move\n"
        "def move(a, b):\n    time.sleep(0.05)\n    return real(a, b)\n"
        "shutil.move = move\n"
        "from sstl.cli.app import app\n"
        "sys.argv = ['sstl', 'label-import', sys.argv[1], '--folder', sys.argv[2]]\n"
        "app()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(slow), str(labels), str(folder)],
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a shell's background job (a CI runner's `cmd &`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not any((folder / "labeled/cat").iterdir()) and not any((folder / "labeled/dog").iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.3)
    return proc


def _forty(tmp_path: Path) -> tuple[Path, Path]:
    folder = _pool(tmp_path)
    for i in range(40):
        (folder / "unlabeled/day1" / f"p{i:02d}.jpg").write_bytes(b"photo %d" % i)
    rows = "".join(f"{folder}/unlabeled/day1/p{i:02d}.jpg,{'cat' if i % 2 else 'dog'}\n" for i in range(40))
    return folder, _labels(tmp_path, "source,label\n" + rows)


def test_ctrl_c_during_an_import_moves_everything_back_and_says_so(tmp_path: Path) -> None:
    folder, labels = _forty(tmp_path)
    before = tree(folder)
    proc = _slow_import(tmp_path, labels, folder)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: interrupted: the ")
        and "went back; nothing imported" in lines[0]
    )
    assert tree(folder) == before  # every photo back, no record


def test_an_import_killed_mid_move_is_resumed_by_the_next(tmp_path: Path) -> None:
    folder, labels = _forty(tmp_path)
    proc = _slow_import(tmp_path, labels, folder)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    moved = len(list((folder / "labeled").rglob("*.jpg")))
    assert 0 < moved < 40, moved  # killed half way
    code, stdout, stderr = import_(labels, folder)
    assert code == 0, stderr
    assert sorted(p.name for p in (folder / "labeled/cat").iterdir()) == [f"p{i:02d}.jpg" for i in range(1, 40, 2)]
    assert sorted(p.name for p in (folder / "labeled/dog").iterdir()) == [f"p{i:02d}.jpg" for i in range(0, 40, 2)]
    record = read_csv(folder / "label-imports.csv")
    assert sorted(r["source"] for r in record) == sorted(f"unlabeled/day1/p{i:02d}.jpg" for i in range(40))  # once each
    code, stdout, _ = import_(labels, folder)  # and once more: nothing left to do
    assert code == 0 and "40" in stdout
