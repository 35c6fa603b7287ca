"""Streaming pseudo-label selection: equal to the in-memory reference, resumable, shardable over processes."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sstl.config.model import ModelConfig
from sstl.config.pseudo import SelectConfig
from sstl.core.errors import SstlError
from sstl.data.dataset import ImageSet
from sstl.models.checkpoint import load_checkpoint, save_checkpoint
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model
from sstl.models.inference import infer
from sstl.pipeline.pseudolabel import pseudo_targets, pseudolabel
from sstl.pseudo.pool import clear_state, select_pool, select_pool_logits, state_file
from sstl.pseudo.select import balance_to_prior, select_threshold, select_topk, soft_targets
from sstl.pseudo.stream import Rows, Threshold, TopK, top_classes
from sstl.runtime.device import CPU

Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # as each torchrun worker (OMP_NUM_THREADS=1), so 1- and 2-process probabilities are bit-identical;
    # the networks here are tiny, and one thread avoids OpenMP spinning on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(got: Selection, want: Selection) -> None:
    for g, w, name in zip(got, want, ("index", "label", "score"), strict=True):
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), name


def random_probs(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * 2).softmax(1)


def stream_topk(probs: torch.Tensor, k: int, p: int, chunk: int, **kw: int) -> Selection:
    acc = TopK(probs.shape[1], k, p, **kw)
    for a in range(0, len(probs), chunk):
        acc.update(probs[a : a + chunk], torch.arange(a, min(a + chunk, len(probs))))
    return acc.result()


@pytest.mark.parametrize(
    ("k", "p", "chunk"),
    [(1, 1, 1), (5, 1, 37), (30, 2, 100), (13, 3, 64), (250, 2, 999), (1000, 1, 128), (7, 7, 50), (40, 10, 23)],
)
def test_topk_stream_equals_select_topk(k: int, p: int, chunk: int) -> None:
    probs = random_probs(1000, 7, seed=k * 100 + p)
    assert_same(stream_topk(probs, k, p, chunk), select_topk(probs, k, p))


@pytest.mark.parametrize(("budget", "block"), [(1, 1), (50, 64), (10_000, 1 << 22)])
def test_topk_compaction_schedule_does_not_change_the_result(budget: int, block: int) -> None:
    probs = random_probs(3000, 40, seed=3)
    want = select_topk(probs, 25, 2)
    assert_same(stream_topk(probs, 25, 2, chunk=97, budget=budget, block=block), want)


def test_threshold_stream_equals_select_threshold() -> None:
    probs = random_probs(1000, 5, seed=9)
    acc = Threshold(0.6)
    for a in range(0, 1000, 77):
        acc.update(probs[a : a + 77], torch.arange(a, min(a + 77, 1000)))
    assert_same(acc.result(), select_threshold(probs, 0.6))


def test_merge_is_order_independent() -> None:
    probs = random_probs(2000, 9, seed=5)
    want = select_topk(probs, 60, 2)
    parts = torch.randperm(2000, generator=torch.Generator().manual_seed(0)).chunk(5)  # disjoint, unordered

    def part(index: torch.Tensor) -> TopK:
        acc = TopK(9, 60, 2)
        acc.update(probs[index], index)
        return acc

    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [3, 4, 1, 0, 2]):
        acc = TopK(9, 60, 2)
        for i in order:
            acc.merge(part(parts[i]))
        assert_same(acc.result(), want)
    left, right = part(parts[0]), part(parts[3])  # a tree: (0 + 1 + 2) + (3 + 4)
    left.merge(part(parts[1]))
    left.merge(part(parts[2]))
    right.merge(part(parts[4]))
    right.merge(left)
    assert_same(right.result(), want)


def test_ties_break_by_index_whatever_the_chunks() -> None:
    # 4 score levels over 600 images: every class is full of ties at its k-th place
    g = torch.Generator().manual_seed(2)
    probs = torch.randint(1, 5, (600, 3), generator=g).float() / 8
    results = [stream_topk(probs, 50, 1, chunk) for chunk in (1, 7, 600)]
    for r in results[1:]:
        assert_same(r, results[0])
    index, label, score = results[0]
    for c in range(3):
        pairs = list(zip(score[label == c].tolist(), index[label == c].tolist(), strict=True))
        assert pairs == sorted(pairs, key=lambda t: (-t[0], t[1])), "score desc, then index asc"


def test_top_classes_ties_pick_lower_class() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    scores, classes = top_classes(probs, 2)
    assert [sorted(r) for r in classes.tolist()] == [[1, 2], [0, 3], [2, 3]]
    assert torch.equal(scores, probs.gather(1, classes))
    with pytest.raises(ValueError, match="probabilities"):
        top_classes(torch.tensor([[0.5, float("nan")]]), 1)


def test_memory_is_bounded_by_k_times_classes() -> None:
    acc = TopK(10, 5, 1, budget=200)
    for s in range(50):  # 50,000 images, never more than k x C kept + budget pending
        acc.update(random_probs(1000, 10, seed=s), torch.arange(s * 1000, (s + 1) * 1000))
        assert acc._pending < 200
        assert acc.keys.shape == (5, 10)
    assert len(acc.result()[0]) == 50


def test_rows_keep_the_wanted_images_and_give_them_in_any_order() -> None:
    values = torch.arange(40.0).view(10, 4)  # row i = image i's values
    rows = Rows(4)
    for a in (6, 0, 3):  # out of order, in pieces
        rows.add(values[a : a + 3 if a < 6 else 10], torch.arange(a, a + 3 if a < 6 else 10))
    assert len(rows) == 10
    rows.keep(torch.tensor([7, 2, 2, 9]))  # repeats allowed
    assert len(rows) == 3
    assert torch.equal(rows.take(torch.tensor([9, 2, 7, 2])), values[[9, 2, 7, 2]])
    assert rows.take(torch.empty(0, dtype=torch.int64)).shape == (0, 4)
    with pytest.raises(KeyError, match=r"\[3\]"):
        rows.take(torch.tensor([2, 3]))
    other = Rows(4)
    other.load_state_dict(rows.state_dict())  # a copy
    more = Rows(4)
    more.add(values[[0, 5]], torch.tensor([0, 5]))
    other.merge(more)
    assert torch.equal(other.take(torch.tensor([0, 2, 5, 7, 9])), values[[0, 2, 5, 7, 9]])
    with pytest.raises(ValueError, match="fed twice"):
        other.merge(more)
        other.take(torch.tensor([0]))
    with pytest.raises(ValueError, match="classes"):
        Rows(3).add(values, torch.arange(10))


# --- the pool driver: a real (small) network over a uint8 pool --------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Classifier, Path]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="resnet18"), 3).eval()
    path = tmp_path_factory.mktemp("model") / "teacher.pt"
    save_checkpoint(path, model, ModelConfig(arch="resnet18"), ["a", "b", "c"], 16)
    return model, path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder: unlabeled.npy (uint8 (96, 16, 16, 3)), manifest.csv, classes.json."""
    folder = tmp_path_factory.mktemp("prepared")
    blobs = np.random.default_rng(0).integers(0, 256, (96, 4, 4, 3), dtype=np.uint8)
    np.save(folder / "unlabeled.npy", blobs.repeat(4, axis=1).repeat(4, axis=2))  # 4x4-pixel colour blocks
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "label_index", "sha256"])
        for i in range(96):
            w.writerow([f"labeled/a/{i}.png", "labeled", "a", 0, ""])  # other splits interleave
            w.writerow([f"unlabeled/{i:04d}.png", "unlabeled", "", -1, ""])
    (folder / "classes.json").write_text(json.dumps(["a", "b", "c"]))
    return folder


CFG = SelectConfig(method="topk", top_k=15, top_p=2, batch_size=16, shard_size=16)  # 96 images: 6 shards


def images_of(pool: Path) -> np.ndarray:
    return np.load(pool / "unlabeled.npy", mmap_mode="r")


def reference(model: Classifier, pool: Path, cfg: SelectConfig) -> Selection:
    """In memory: all probabilities, then select_topk / select_threshold."""
    probs = infer(model, torch.from_numpy(np.array(images_of(pool))), batch_size=cfg.batch_size, runtime=CPU).softmax(1)
    if cfg.method == "topk":
        return select_topk(probs, cfg.top_k, cfg.top_p)
    return select_threshold(probs, cfg.threshold)


def pool_logits(model: Classifier, pool: Path, cfg: SelectConfig) -> torch.Tensor:
    """In memory: the logits of the whole pool, in infer's batches (so the same bits as the stream's)."""
    return infer(
        model, torch.from_numpy(np.array(images_of(pool))), batch_size=cfg.batch_size, tta=cfg.tta, runtime=CPU
    )


def npy_bytes(probs: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, probs.numpy())
    return buf.getvalue()


class Killed(Exception):
    """Stands for the process dying after a shard."""


@pytest.mark.parametrize("cfg", [CFG, CFG.model_copy(update={"method": "threshold", "threshold": 0.34})])
def test_pool_stream_equals_in_memory_reference(
    teacher: tuple[Classifier, Path], pool: Path, cfg: SelectConfig
) -> None:
    model, _ = teacher
    got = select_pool(model, images_of(pool), cfg, 3, runtime=CPU)
    assert got is not None
    want = reference(model, pool, cfg)
    assert len(got[0]) > 0
    assert_same(got, want)  # the same batches as infer's, so the same bits


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        CFG.model_copy(update={"top_k": 60}),  # 3 x 60 picks of 96 images: some chosen for two classes
        CFG.model_copy(update={"method": "threshold", "threshold": 0.34}),
    ],
)
def test_selected_rows_come_with_their_own_logits(
    teacher: tuple[Classifier, Path], pool: Path, cfg: SelectConfig
) -> None:
    model, _ = teacher
    got = select_pool_logits(model, images_of(pool), cfg, 3, runtime=CPU)
    assert got is not None
    (index, label, score), logits, prior = got
    assert_same((index, label, score), reference(model, pool, cfg))
    assert logits.dtype == torch.float32 and logits.shape == (len(index), 3)
    assert torch.equal(logits, pool_logits(model, pool, cfg)[index]), "row i: image index[i]'s logits, bit for bit"
    everything = pool_logits(model, pool, cfg).softmax(1).double().mean(0).float()
    assert torch.allclose(prior, everything, atol=1e-6), "the prior: the mean softmax over the whole pool"
    if cfg.top_k == 60:
        assert len(set(index.tolist())) < len(index), "an image chosen for two classes: its logits in both rows"


def test_tta_scores_the_pool(teacher: tuple[Classifier, Path], pool: Path) -> None:
    model, _ = teacher
    cfg = CFG.model_copy(update={"tta": "flip_translate"})
    got = select_pool_logits(model, images_of(pool), cfg, 3, runtime=CPU)
    assert got is not None
    (index, label, score), logits, _ = got
    probs = pool_logits(model, pool, cfg).softmax(1)
    assert_same((index, label, score), select_topk(probs, cfg.top_k, cfg.top_p))
    assert torch.equal(logits, pool_logits(model, pool, cfg)[index])
    plain = select_pool(model, images_of(pool), CFG, 3, runtime=CPU)
    assert plain is not None and not torch.equal(score, plain[2]), "the views change the scores"


def test_resume_after_a_kill(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    model, _ = teacher
    state = tmp_path / "state"
    done: list[int] = []

    def die_after_3(shard: int) -> None:
        done.append(shard)
        if len(done) == 3:
            raise Killed

    with pytest.raises(Killed):
        select_pool(model, images_of(pool), CFG, 3, state_dir=state, on_shard=die_after_3, runtime=CPU)
    saved = torch.load(state_file(state, 0, 1), weights_only=True)
    assert saved["last_shard"] == 2, "the state is saved before on_shard is told"

    resumed: list[int] = []
    got = select_pool_logits(model, images_of(pool), CFG, 3, state_dir=state, on_shard=resumed.append, runtime=CPU)
    assert resumed == [3, 4, 5], "the second run computes only the shards not yet finished"
    assert got is not None
    want = select_pool_logits(model, images_of(pool), CFG, 3, runtime=CPU)  # an uninterrupted run
    assert want is not None
    assert_same(got[0], want[0])
    assert npy_bytes(soft_targets(got[1])) == npy_bytes(soft_targets(want[1])), "the same soft targets, byte for byte"
    assert torch.equal(got.prior, want.prior), "the pool prior resumes with the state, bit for bit"

    other: list[int] = []  # a state from another run (other params) is ignored and overwritten
    changed = CFG.model_copy(update={"top_k": 5})
    got5 = select_pool(model, images_of(pool), changed, 3, state_dir=state, on_shard=other.append, runtime=CPU)
    assert other == list(range(6))
    assert got5 is not None
    assert_same(got5, select_pool(model, images_of(pool), changed, 3, runtime=CPU))
    clear_state(state)
    assert not state.exists()


def test_resume_with_another_temperature(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    """The state keeps logits, so the temperature of the soft targets needs no restart."""
    model, _ = teacher
    done: list[int] = []

    def die_after_2(shard: int) -> None:
        done.append(shard)
        if len(done) == 2:
            raise Killed

    with pytest.raises(Killed):
        select_pool_logits(model, images_of(pool), CFG, 3, state_dir=tmp_path, on_shard=die_after_2, runtime=CPU)
    resumed: list[int] = []
    hot = CFG.model_copy(update={"temperature": 4.0})
    got = select_pool_logits(model, images_of(pool), hot, 3, state_dir=tmp_path, on_shard=resumed.append, runtime=CPU)
    assert resumed == [2, 3, 4, 5]
    assert got is not None
    want = select_pool_logits(model, images_of(pool), CFG, 3, runtime=CPU)
    assert want is not None
    assert_same(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_state_without_the_logits_is_ignored(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    model, _ = teacher

    def die(shard: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        select_pool(model, images_of(pool), CFG, 3, state_dir=tmp_path, on_shard=die, runtime=CPU)
    path = state_file(tmp_path, 0, 1)
    state = torch.load(path, weights_only=True)
    state["logits"]["index"] = state["logits"]["index"][1:]  # an image held without its logits
    state["logits"]["values"] = state["logits"]["values"][1:]
    torch.save(state, path)
    shards: list[int] = []
    got = select_pool_logits(model, images_of(pool), CFG, 3, state_dir=tmp_path, on_shard=shards.append, runtime=CPU)
    assert shards == list(range(6)), "started afresh"
    assert got is not None
    assert torch.equal(got[1], pool_logits(model, pool, CFG)[got[0][0]])


def test_state_of_another_model_is_ignored(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    model, _ = teacher
    select_pool(model, images_of(pool), CFG, 3, state_dir=tmp_path, on_shard=None, runtime=CPU)
    torch.manual_seed(1)
    other_model = create_model(ModelConfig(arch="resnet18"), 3).eval()
    shards: list[int] = []
    select_pool(other_model, images_of(pool), CFG, 3, state_dir=tmp_path, on_shard=shards.append, runtime=CPU)
    assert shards == list(range(6))


def test_workflow_rows_carry_manifest_paths(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    model, _ = teacher
    out = pseudolabel(model, pool, CFG, ["a", "b", "c"], state_dir=tmp_path / "state", runtime=CPU)
    assert out is not None
    rows, counts, probs, ood = out
    assert ood == []  # ood_quantile off
    assert probs.shape == (len(rows), 3)
    index, label, _ = reference(model, pool, CFG)
    assert [r["index"] for r in rows] == index.tolist()
    assert [r["label_index"] for r in rows] == label.tolist()
    assert all(r["path"] == f"unlabeled/{r['index']:04d}.png" for r in rows)
    assert sum(c["count"] for c in counts) == len(rows)


def test_soft_targets_align_with_the_rows(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    model, _ = teacher
    cfg = CFG.model_copy(update={"top_p": 1})
    out = pseudolabel(model, pool, cfg, ["a", "b", "c"], state_dir=tmp_path / "state", runtime=CPU)
    assert out is not None
    rows, _, probs, _ = out
    assert len(rows) > 0 and probs.dtype == torch.float32 and probs.shape == (len(rows), 3)
    labels = torch.tensor([r["label_index"] for r in rows])
    assert torch.equal(probs.argmax(1), labels), "at temperature 1 with top_p 1 the label is the argmax"
    torch.testing.assert_close(probs.sum(1), torch.ones(len(rows)))
    scores = torch.tensor([r["score"] for r in rows])
    torch.testing.assert_close(probs.gather(1, labels.view(-1, 1)).flatten(), scores, rtol=0, atol=1e-6)

    hot = pseudolabel(model, pool, cfg.model_copy(update={"temperature": 3.0}), ["a", "b", "c"], runtime=CPU)
    assert hot is not None
    assert hot[0] == rows, "the temperature does not change the selection"
    flat = hot[2]
    torch.testing.assert_close(flat.sum(1), torch.ones(len(rows)))
    assert torch.equal(flat.argmax(1), labels)
    assert bool((flat.max(1).values < probs.max(1).values).all()), "a higher temperature flattens every row"

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum(1)

    assert bool((entropy(flat) > entropy(probs)).all())


def test_pseudo_targets_give_images_hard_and_soft_labels() -> None:
    pool = ImageSet(
        torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 2, 2, 3),
        torch.full((5,), -1),
        [f"unlabeled/{i}.png" for i in range(5)],
    )
    rows = [{"index": "3", "label_index": "1"}, {"index": "0", "label_index": "0"}, {"index": "3", "label_index": "2"}]
    probs = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.1, 0.5, 0.4]], dtype=np.float32)
    chosen, targets = pseudo_targets(pool, rows, probs)
    assert chosen.paths == ["unlabeled/3.png", "unlabeled/0.png", "unlabeled/3.png"]
    assert chosen.labels.tolist() == [1, 0, 2]
    assert chosen.images[:, 0, 0, 0].tolist() == [3, 0, 3]
    assert targets.dtype == torch.float32 and torch.equal(targets, torch.from_numpy(probs))
    with pytest.raises(SstlError, match="same pseudolabel run"):
        pseudo_targets(pool, rows[:2], probs)
    with pytest.raises(SstlError, match="class 2"):
        pseudo_targets(pool, rows, probs[:, :2])


SCRIPT = """
import sys
from pathlib import Path

import numpy as np
import torch

from sstl.config.pseudo import SelectConfig
from sstl.models.checkpoint import load_checkpoint
from sstl.pseudo.pool import select_pool_logits
from sstl.runtime.device import CPU
from sstl.runtime.distributed import distributed

checkpoint, images, state, out, cfg = sys.argv[1:]
model, _ = load_checkpoint(Path(checkpoint))
with distributed() as (rank, size):
    assert size == 2, size
    pool, select = np.load(images, mmap_mode="r"), SelectConfig.model_validate_json(cfg)
    sel = select_pool_logits(model, pool, select, 3, state_dir=Path(state), runtime=CPU)
    if rank == 0:
        torch.save(tuple(sel), out)
    else:
        assert sel is None
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_select_as_one(teacher: tuple[Classifier, Path], pool: Path, tmp_path: Path) -> None:
    _, checkpoint = teacher
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out, state = tmp_path / "selection.pt", tmp_path / "state"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), str(checkpoint), str(pool / "unlabeled.npy"), str(state), str(out), CFG.model_dump_json(),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert state_file(state, 0, 2).is_file() and state_file(state, 1, 2).is_file(), "one state per rank"
    two = torch.load(out, weights_only=True)
    model, _ = load_checkpoint(checkpoint)  # the same weights, as the processes loaded them
    one = select_pool_logits(model, images_of(pool), CFG, 3, runtime=CPU)
    assert one is not None
    assert_same(tuple(two[0]), one[0])
    assert torch.equal(two[1], one[1]), "each process's kept logits merged on rank 0"
    assert torch.allclose(two[2], one.prior, atol=1e-6), "each process's share of the prior summed on rank 0"


def test_balanced_selection_keeps_the_prior_on_a_skewed_pool() -> None:
    # a teacher confident on an easy class: 900 confident rows of class 0, 100 of class 1, 0 of class 2
    g = torch.Generator().manual_seed(0)
    label = torch.cat([torch.zeros(900, dtype=torch.int64), torch.ones(100, dtype=torch.int64)])
    score = torch.rand(1000, generator=g) * 0.1 + 0.9
    skewed = torch.bincount(label, minlength=3).float() / len(label)
    assert skewed[0] == 0.9  # what a plain threshold would teach the student
    for prior, want in (([1 / 3, 1 / 3, 1 / 3], [100, 100, 0]), ([0.6, 0.2, 0.2], [300, 100, 0])):
        keep = balance_to_prior(label, score, torch.tensor(prior))
        counts = torch.bincount(label[keep], minlength=3).tolist()
        assert counts == want, (prior, counts)
        assert keep.tolist() == sorted(set(keep.tolist())), "positions, each once, in order"
        for c in (0, 1):  # each class keeps its most confident rows
            kept = score[keep][label[keep] == c]
            dropped = score[torch.isin(torch.arange(1000), keep, invert=True) & (label == c)]
            assert len(dropped) == 0 or kept.min() >= dropped.max()
    assert len(balance_to_prior(label[:0], score[:0], torch.ones(3))) == 0
