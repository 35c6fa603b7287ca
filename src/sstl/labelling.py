"""Which unlabelled photos to label next (a labelling queue), and taking the labels back in.

`label-queue` scores the photo folder's unlabeled/ pool with a trained checkpoint and ranks it:

- `margin`: the smallest gap between the two most probable classes first (the model hesitates
  between two classes: a label there moves its decision boundary most);
- `entropy`: the highest predictive entropy first (uncertain over all the classes);
- `diverse`: the CANDIDATES_PER_PICK x n smallest margins, k-means on their backbone features into n
  clusters, the smallest margin of each cluster: uncertain photos that are not all near-copies of
  one confusing kind (a burst of 50 shots of the same coat would fill a margin queue).

The queue is a folder: copies of the chosen photos under images/ and queue.csv (rank order, one row
per photo, an empty `label` column for the labeller). `label-import` reads that CSV back, checks every
label and path first, then moves each labelled photo from unlabeled/ to labeled/<class>/ and appends
what it did to <folder>/label-imports.csv (prepare reads only the split folders, never the root).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from sstl.errors import SstlError
from sstl.files import atomic_path, check_writable, read_csv
from sstl.images import IMAGE_SUFFIXES, UnreadableImage, children, decode, is_hidden, read_file, walk
from sstl.inference import Tta, infer
from sstl.models import Classifier, load_checkpoint
from sstl.runtime import CPU, Runtime

STRATEGIES = ("margin", "entropy", "diverse")
CANDIDATES_PER_PICK = 5  # diverse: k-means over this many x n of the most uncertain photos
QUEUE_CSV = "queue.csv"
IMAGES = "images"
QUEUE_FIELDS = ("rank", "image", "source", "guess", "guess_probability", "second_guess", "score", "label")
RECORD = "label-imports.csv"  # at the photo folder's root: prepare never reads it (only the split folders)
RECORD_FIELDS = ("time", "source", "destination", "label", "guess", "queue")
CHUNK = 256  # images decoded at once: a pool of 100,000 photos never sits in memory whole

Features = Callable[[np.ndarray], np.ndarray]  # pool indices (k,) -> backbone features (k, D)


# ---------------------------------------------------------------- scoring and ranking


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


# ---------------------------------------------------------------- scoring the pool


def pool_files(folder: Path) -> list[Path]:
    """Image files under <folder>/unlabeled/ as prepare finds them (any nesting, hidden entries left out)."""
    pool = Path(folder) / "unlabeled"
    if not pool.is_dir():
        raise SstlError(
            f"{pool} not found: pass --folder, the photo folder that holds unlabeled/ "
            "(or set data.folder in params.yaml)"
        )
    files = [p for p, problem in walk(pool) if not problem and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SstlError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {pool}: nothing to queue")
    return files


def read_images(
    paths: Sequence[Path], size: int, interpolation: str, on_skip: Callable[[Path, str], None]
) -> tuple[np.ndarray, list[Path]]:
    """uint8 (k, size, size, 3) of the readable paths, decoded exactly as predict (and prepare) does."""
    images, readable = [], []
    for path in paths:
        try:
            images.append(decode(read_file(path), size, interpolation))
            readable.append(path)
        except UnreadableImage as err:
            on_skip(path, str(err))
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stack, readable


def report_skip(path: Path, reason: str) -> None:
    print(f"skipped {path}: {reason}", file=sys.stderr)


@dataclass
class Scored:
    """The readable pool photos and the model's probabilities (N, C) for them."""

    paths: list[Path]
    probs: np.ndarray
    skipped: int = 0


def score_pool(
    model: Classifier,
    paths: Sequence[Path],
    image_size: int,
    *,
    interpolation: str,
    runtime: Runtime = CPU,
    tta: Tta = "none",
    on_skip: Callable[[Path, str], None] = report_skip,
) -> Scored:
    """Softmax of `infer`'s logits for every readable photo, a chunk of CHUNK photos at a time."""
    out = Scored([], np.zeros((0, 0), np.float32))
    parts = []

    def skip(path: Path, reason: str) -> None:
        out.skipped += 1
        on_skip(path, reason)

    for a in range(0, len(paths), CHUNK):
        images, readable = read_images(paths[a : a + CHUNK], image_size, interpolation, skip)
        if readable:
            logits = infer(model, torch.from_numpy(images), runtime=runtime, desc="score", tta=tta)
            parts.append(logits.softmax(1).numpy())
            out.paths += readable
    if not parts:
        raise SstlError(f"none of the {len(paths)} unlabelled images could be read: see the lines above")
    out.probs = np.concatenate(parts)
    return out


def feature_reader(model: Classifier, paths: Sequence[Path], image_size: int, *, interpolation: str) -> Features:
    """features(indices) for `rank`: decodes those photos again and runs `infer(..., features=True)`."""

    def get(indices: np.ndarray) -> np.ndarray:
        chosen = [paths[i] for i in indices]
        images, readable = read_images(chosen, image_size, interpolation, report_skip)
        if len(readable) != len(chosen):
            raise SstlError("a photo became unreadable while the queue was being made: run label-queue again")
        return infer(model, torch.from_numpy(images), features=True, desc="features").numpy()

    return get


# ---------------------------------------------------------------- writing the queue


def copy_name(source: Path, pool: Path) -> str:
    """<stem>-<8 hex of its path in unlabeled/><suffix>: the same photo gets the same name in every queue,
    and two photos of the same name in different subfolders get different ones."""
    rel = Path(os.path.relpath(source, pool)).as_posix()
    return f"{source.stem}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}{source.suffix.lower()}"


def queue_rows(
    paths: Sequence[Path], probs: np.ndarray, picks: np.ndarray, strategy: str, classes: Sequence[str], pool: Path
) -> list[dict[str, str]]:
    """One CSV row per pick, best first: image (relative to the CSV), source, the model's two guesses, score."""
    score = scores(probs, strategy)
    rows = []
    for r, i in enumerate(picks.tolist(), start=1):
        order = np.argsort(-probs[i], kind="stable")
        second = classes[order[1]] if len(order) > 1 else ""
        rows.append(
            {
                "rank": str(r),
                "image": f"{IMAGES}/{copy_name(paths[i], pool)}",
                "source": os.path.abspath(paths[i]),
                "guess": classes[order[0]],
                "guess_probability": f"{probs[i, order[0]]:.4f}",
                "second_guess": second,
                "score": f"{score[i]:.4f}",
                "label": "",
            }
        )
    return rows


def check_output(out: Path, *, force: bool) -> None:
    """Before any work: `out` may be absent or an empty folder; a non-empty one only with --force."""
    if os.path.lexists(out) and not out.is_dir():
        raise SstlError(f"{out} exists and is not a folder: pass --out a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SstlError(f"{out}/ is not empty: pass --force to replace it, or --out another folder")


def write_queue(out: Path, rows: list[dict[str, str]], sources: Sequence[Path], *, force: bool) -> None:
    """Copies and queue.csv written into a temp folder beside `out`, then renamed into place: a killed or
    failed run leaves the old queue (or none), never half of one."""
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / IMAGES).mkdir()
        for row, source in zip(rows, sources, strict=True):
            shutil.copyfile(source, tmp / row["image"])  # the bytes, also when the pool holds symbolic links
        with (tmp / QUEUE_CSV).open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=QUEUE_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is first renamed aside, then removed."""
    old = None
    if out.is_dir():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old.")) / "queue"
        os.rename(out, old)
    os.rename(new, out)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


@dataclass
class QueueSummary:
    out: Path
    picked: int
    pool: int
    skipped: int


def label_queue(
    *,
    model_path: Path,
    folder: Path,
    out: Path,
    n: int,
    strategy: str,
    seed: int = 0,
    force: bool = False,
    tta: Tta = "none",
    runtime: Runtime = CPU,
) -> QueueSummary:
    """Score <folder>/unlabeled/ with the checkpoint, rank it by `strategy`, write the n best to `out`."""
    check_strategy(strategy)
    check_output(out, force=force)
    model, meta = load_checkpoint(model_path)
    files = pool_files(folder)
    size, interpolation = meta["image_size"], meta.get("interpolation") or model.data.interpolation
    scored = score_pool(model, files, size, interpolation=interpolation, runtime=runtime, tta=tta)
    features = feature_reader(model, scored.paths, size, interpolation=interpolation)
    picks = rank(scored.probs, strategy, n, features=features, seed=seed)
    rows = queue_rows(scored.paths, scored.probs, picks, strategy, meta["classes"], Path(folder) / "unlabeled")
    write_queue(out, rows, [scored.paths[i] for i in picks], force=force)
    return QueueSummary(out, len(rows), len(scored.paths), scored.skipped)


# ---------------------------------------------------------------- importing the labels


def folder_classes(folder: Path) -> list[str]:
    """The project's class names: the non-hidden folders of <folder>/labeled/, as prepare reads them."""
    labeled = Path(folder) / "labeled"
    if not labeled.is_dir():
        raise SstlError(f"{labeled} not found: pass --folder, the photo folder the queue was made from")
    return sorted(path.name for path, is_dir, _ in children(labeled) if is_dir)


@dataclass
class Move:
    row: int  # line in the CSV (the header is line 1)
    source: Path
    destination: Path
    label: str
    guess: str


@dataclass
class ImportPlan:
    moves: list[Move] = field(default_factory=list)
    unlabelled: int = 0  # rows with an empty label: left in unlabeled/
    already: int = 0  # rows recorded as imported before: a re-import skips them


def read_labels(path: Path) -> list[dict[str, str]]:
    """The rows of a labelled queue CSV; it must have `source` and `label` columns."""
    if not Path(path).is_file():
        raise SstlError(f"{path} not found: pass the queue.csv that label-queue wrote, with its label column filled")
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise SstlError(f"{path} is not a readable CSV ({err}): export it as UTF-8 CSV") from None
    missing = [c for c in ("source", "label") if c not in header]
    if missing:
        raise SstlError(f"{path} has no {' or '.join(missing)} column: pass the queue.csv that label-queue wrote")
    return rows


def check_class_name(label: str, row: int, classes: Sequence[str], *, new_classes: bool) -> None:
    """A known class; a new one only with --new-classes, and then one a folder can be named."""
    if label in classes:
        return
    if not new_classes:
        near = [c for c in classes if c.casefold() == label.casefold()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SstlError(
            f"row {row}: unknown class {label!r}{hint}; known classes: {', '.join(classes)} "
            "(pass --new-classes to add it as a class)"
        )
    if label in (".", "..") or "/" in label or "\\" in label or is_hidden(label):
        raise SstlError(f"row {row}: {label!r} cannot be a class folder name: use letters, digits, - or _")


def imported(record: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Source (relative to the folder) -> its last import record."""
    return {r["source"]: r for r in record}


def plan_import(
    rows: list[dict[str, str]], folder: Path, *, new_classes: bool = False, record: list[dict[str, str]] | None = None
) -> ImportPlan:
    """Every check, before anything moves: labels, sources (present, in unlabeled/), destinations (free,
    distinct). A row that `record` shows imported with the same label is skipped: re-importing is a no-op."""
    classes = folder_classes(folder)
    pool = os.path.abspath(Path(folder) / "unlabeled")
    done = imported(record or [])
    plan, seen = ImportPlan(), dict[str, int]()
    for row, entry in enumerate(rows, start=2):
        label = (entry.get("label") or "").strip()
        if not label:
            plan.unlabelled += 1
            continue
        check_class_name(label, row, classes, new_classes=new_classes)
        source = Path(os.path.abspath(entry.get("source") or ""))
        if not in_pool(source, pool):
            raise SstlError(
                f"row {row}: source {source} is not in {pool}/: pass --folder, the photo folder the queue was made from"
            )
        destination = Path(folder) / "labeled" / label / source.name
        rel = relative_to(folder, source)
        if not os.path.lexists(source):
            if already_imported(done.get(rel), label, folder, row, source):
                plan.already += 1
                continue
            raise SstlError(
                f"row {row}: source {source} not found (moved or deleted since the queue was made): "
                "restore it or remove the row"
            )
        if os.path.lexists(destination):
            raise SstlError(f"row {row}: {destination} already exists: rename one of the two photos, then import again")
        for key, what in ((str(source), "source"), (str(destination), "destination")):
            if key in seen:
                raise SstlError(f"row {row}: same {what} as row {seen[key]} ({key}): keep one of the two rows")
            seen[key] = row
        plan.moves.append(Move(row, source, destination, label, entry.get("guess", "")))
    return plan


def in_pool(source: Path, pool: str) -> bool:
    """Whether `source` lies under the pool folder, also when one of the two was named through a link."""
    if str(source).startswith(pool + os.sep):
        return True
    parent, real_pool = os.path.realpath(source.parent), os.path.realpath(pool)
    return parent == real_pool or parent.startswith(real_pool + os.sep)


def already_imported(done: dict[str, str] | None, label: str, folder: Path, row: int, source: Path) -> bool:
    """True when the record shows this source imported as `label` and the photo is still there;
    an import under another label is an error (relabelling a moved photo is a move by hand)."""
    if done is None or not os.path.lexists(Path(folder) / done["destination"]):
        return False
    if done["label"] != label:
        raise SstlError(
            f"row {row}: {source} was already imported as {done['label']!r} ({done['destination']}): "
            f"move it to labeled/{label}/ by hand"
        )
    return True


def relative_to(folder: Path, path: Path) -> str:
    return Path(os.path.relpath(path, os.path.abspath(folder))).as_posix()


def move_all(moves: list[Move]) -> None:
    """Move every photo, or none: on a failure the ones already moved go back (class folders made for
    them removed again), and one line says why."""
    done: list[Move] = []
    made: list[Path] = []
    current = moves[0]
    try:
        for current in moves:
            if os.path.lexists(current.destination):  # appeared since the checks: never overwrite a photo
                raise SstlError(f"row {current.row}: {current.destination} appeared meanwhile: import again")
            if not current.destination.parent.is_dir():
                current.destination.parent.mkdir(parents=True)
                made.append(current.destination.parent)
            move(current.source, current.destination)
            done.append(current)
    except (OSError, SstlError) as err:
        for m in reversed(done):
            move(m.destination, m.source)
        for folder in reversed(made):
            folder.rmdir()
        if isinstance(err, SstlError):
            raise
        raise SstlError(
            f"row {current.row}: cannot move {current.source} to {current.destination} "
            f"({err.strerror or err}): nothing moved"
        ) from None


def move(source: Path, destination: Path) -> None:
    """A rename (shutil.move across file systems); a symbolic link with a relative target is re-pointed
    so that it still reaches its photo from the new folder."""
    if os.path.islink(source) and not os.path.isabs(target := os.readlink(source)):
        real = os.path.normpath(os.path.join(os.path.dirname(source), target))
        os.symlink(os.path.relpath(real, destination.parent), destination)
        os.remove(source)
        return
    shutil.move(source, destination)


def append_record(folder: Path, moves: list[Move], queue: Path, now: datetime | None = None) -> Path:
    """<folder>/label-imports.csv += one row per move (time, source, destination, label, guess, queue)."""
    path = Path(folder) / RECORD
    when = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    lines = [RECORD_FIELDS] if not path.is_file() else []
    lines += [
        (when, relative_to(folder, m.source), relative_to(folder, m.destination), m.label, m.guess, str(queue))
        for m in moves
    ]
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        f.write(old)
        csv.writer(f, lineterminator="\n").writerows(lines)
    return path


def read_record(folder: Path) -> list[dict[str, str]]:
    path = Path(folder) / RECORD
    return read_csv(path) if path.is_file() else []


@dataclass
class ImportSummary:
    moved: dict[str, int]  # class -> photos moved into it
    unlabelled: int
    already: int
    record: Path


def import_labels(csv_path: Path, *, folder: Path, new_classes: bool = False) -> ImportSummary:
    """Check every row, move the labelled photos into labeled/<class>/, record what came from where."""
    plan = plan_import(read_labels(csv_path), folder, new_classes=new_classes, record=read_record(folder))
    record = Path(folder) / RECORD
    if plan.moves:
        check_writable(record)  # a read-only folder fails here, before any move
        move_all(plan.moves)
        append_record(folder, plan.moves, Path(os.path.abspath(csv_path)))
    moved: dict[str, int] = {}
    for m in plan.moves:
        moved[m.label] = moved.get(m.label, 0) + 1
    return ImportSummary(moved, plan.unlabelled, plan.already, record)


def refresh_if_project(folder: Path, params_folder: str | None) -> bool:
    """Rewrite data/inventory.json when `folder` is the project's data.folder, so a plain `dvc repro`
    sees the moved photos and retrains; True when it changed."""
    if params_folder is None or os.path.abspath(params_folder) != os.path.abspath(folder):
        return False
    from sstl.prepare import refresh_inventory

    return refresh_inventory(Path(folder))
