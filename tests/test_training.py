"""The training loop on a tiny separable problem: history, accuracy, determinism, early stopping."""

from __future__ import annotations

import copy

import pytest
import torch

from sstl.config.model import ModelConfig
from sstl.config.train import TrainConfig
from sstl.data.dataset import ImageSet
from sstl.models.factory import create_model
from sstl.runtime.device import CPU
from sstl.train.loop import FitResult, fit
from sstl.train.optim import Lookahead, class_weights, linear_factor, make_optimizer
from sstl.train.setup import FitSetup

SIZE = 16
SCHEDULE = TrainConfig(
    head_epochs=2, epochs=1, lr=3e-3, finetune_lr=1e-3, unfreeze_blocks=2, batch_size=20, patience=3, plateau_patience=1
)


def dark_vs_bright(n: int, seed: int, size: int = SIZE) -> ImageSet:
    """Class 0: dark noisy images; class 1: bright ones (`size` pixels square). Balanced, shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    labels = labels[torch.randperm(n, generator=g)]
    low = torch.randint(0, 90, (n, size, size, 3), generator=g)
    images = torch.where(labels.view(-1, 1, 1, 1) == 1, low + 165, low).to(torch.uint8)
    return ImageSet(images, labels.to(torch.int64), [f"img{i}.png" for i in range(n)])


TRAIN, VAL = dark_vs_bright(40, 0), dark_vs_bright(20, 1)


def new_model(arch: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(arch=arch, head_layers=1, hidden_size=16, dropout=0.1), 2)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, FitResult]:
    model = new_model()
    return model, fit(model, TRAIN, VAL, SCHEDULE, FitSetup(num_classes=2, seed=0, runtime=CPU))


def test_history_rows(trained: tuple[torch.nn.Module, FitResult]) -> None:
    _, result = trained
    assert 1 <= len(result.history) <= SCHEDULE.head_epochs + SCHEDULE.epochs
    for i, row in enumerate(result.history, start=1):
        assert {"epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"} <= set(row)
        assert row["epoch"] == i
        assert row["phase"] in (1, 2)
        assert row["train_loss"] >= 0 and row["val_loss"] >= 0
    phases = [row["phase"] for row in result.history]
    assert phases == sorted(phases)
    assert result.history[0]["lr"] == pytest.approx(SCHEDULE.lr)
    second = [row for row in result.history if row["phase"] == 2]
    assert second and second[0]["lr"] == pytest.approx(SCHEDULE.finetune_lr)
    assert result.images_seen == len(TRAIN) * len(result.history)
    assert result.images_per_second > 0


def test_learns_separable_problem(trained: tuple[torch.nn.Module, FitResult]) -> None:
    model, result = trained
    assert result.best_val_acc > 0.9
    assert result.best_val_loss <= min(row["val_loss"] for row in result.history) + 1e-6
    assert not model.training


def test_same_seed_same_history_and_weights(trained: tuple[torch.nn.Module, FitResult]) -> None:
    model_a, a = trained
    model_b = new_model()
    b = fit(model_b, TRAIN, VAL, SCHEDULE, FitSetup(num_classes=2, seed=0, runtime=CPU))

    def strip(history: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert strip(a.history) == strip(b.history)
    assert a.best_val_loss == b.best_val_loss
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping(patience: int) -> None:
    # lr so small that no weight moves: the val loss never improves after the first epoch
    cfg = TrainConfig(head_epochs=6, epochs=0, lr=1e-30, batch_size=20, patience=patience, plateau_patience=0)
    result = fit(new_model("mobilenet_v3_small"), TRAIN, VAL, cfg, FitSetup(num_classes=2, seed=0, runtime=CPU))
    assert len(result.history) == 1 + patience < cfg.head_epochs
    assert all(row["phase"] == 1 for row in result.history)


def test_class_weights_inverse_frequency() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    w = class_weights(labels, 3)
    assert w.shape == (3,)
    assert w.tolist() == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)])
    counts = torch.bincount(labels, minlength=3).float()
    assert (w * counts).tolist() == pytest.approx([2.0, 2.0, 2.0]), "every class weighs the same in total"


def test_class_weights_balanced_are_ones() -> None:
    assert class_weights(torch.tensor([0, 1, 2, 0, 1, 2]), 3).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_weights_absent_class_is_zero() -> None:
    w = class_weights(torch.tensor([0, 0, 1]), 3)
    assert w[2] == 0
    assert torch.isfinite(w).all()
    assert w[0] < w[1]


def test_class_weights_used_in_fit() -> None:
    train = TRAIN.subset(
        torch.cat([torch.nonzero(TRAIN.labels == 0).flatten(), torch.nonzero(TRAIN.labels == 1).flatten()[:5]])
    )
    cfg = TrainConfig(head_epochs=1, epochs=0, lr=1e-3, class_weights=True, batch_size=32)
    result = fit(new_model("mobilenet_v3_small"), train, VAL, cfg, FitSetup(num_classes=2, seed=0, runtime=CPU))
    assert len(result.history) == 1


AIRBENCH = TrainConfig(
    head_epochs=0,
    epochs=3,
    lr=0.5,
    finetune_lr=0.5,
    optimizer="sgd",
    momentum=0.85,
    lr_schedule="linear",
    label_smoothing=0.2,
    lookahead=True,
    bias_lr_scale=8,
    weight_decay=1e-3,
    batch_size=8,
    unfreeze_blocks=100,
    patience=1,
)


def test_linear_schedule_warms_up_then_decays() -> None:
    total = 100
    factors = [linear_factor(s, total, 0.23) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.2)
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 23
    assert factors[-1] == pytest.approx(0.07)
    assert all(a <= b for a, b in zip(factors[:23], factors[1:24], strict=True))  # rising
    assert all(a >= b for a, b in zip(factors[23:-1], factors[24:], strict=True))  # then falling


def test_optimizer_groups_scale_backbone_shifts_only() -> None:
    model = create_model(ModelConfig(arch="airbench_s", head_layers=0, dropout=0.0, widths=(8, 8, 8)), 2)
    opt = make_optimizer(model, AIRBENCH, 0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    weights, shifts = opt.param_groups
    assert shifts["lr"] == pytest.approx(4.0) and shifts["weight_decay"] == pytest.approx(1e-3 / 8)
    head_bias = model.head[-1].bias
    assert any(p is head_bias for p in weights["params"])  # the head's bias is not a backbone shift
    assert all(p.ndim == 1 for p in shifts["params"]) and len(shifts["params"]) == 1 + 6  # whitening + 6 BN
    plain = make_optimizer(model, TrainConfig(), 1e-3)
    assert isinstance(plain, torch.optim.Adam) and len(plain.param_groups) == 1


def test_lookahead_pulls_weights_to_their_average() -> None:
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    average = Lookahead(net, total=5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(4):
        average.step()
    assert torch.equal(net.weight, torch.ones(1, 2))  # no sync before the 5th step
    average.step()  # t = T: decay 0.95^5; the average moves 1 - 0.774 of the way, and the net restarts there
    assert torch.allclose(net.weight, torch.full((1, 2), 1 - 0.95**5))
    saved = copy.deepcopy(average.state_dict())
    with torch.no_grad():
        net.weight.fill_(3.0)
    average.finish()
    assert torch.allclose(net.weight, torch.full((1, 2), 1 - 0.95**5))  # finish: the network is the average
    average.load_state_dict(saved)
    assert average.t == 5


def test_linear_recipe_runs_every_epoch_and_keeps_the_last_weights() -> None:
    model = create_model(ModelConfig(arch="airbench_s", head_layers=0, dropout=0.0, widths=(8, 8, 8)), 2)
    result = fit(model, TRAIN, VAL, AIRBENCH, FitSetup(num_classes=2, seed=0, runtime=CPU))
    assert len(result.history) == AIRBENCH.epochs  # patience 1 does not stop a linear schedule
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == pytest.approx(0.5 * 0.2)  # logged at the start of each epoch: the warm-up's first step
    assert result.history[-1]["val_acc"] == pytest.approx(result.best_val_acc)  # last weights, not the best epoch
    assert result.best_val_acc > 0.9
    assert bool(model.backbone[0][0].ready)  # whitening fitted from the training images


def test_soft_targets_drive_the_loss() -> None:
    """Targets that contradict the labels: the network learns the targets; the labels only score accuracy."""
    flipped = torch.nn.functional.one_hot(1 - TRAIN.labels, 2).float()
    cfg = TrainConfig(head_epochs=0, epochs=4, finetune_lr=3e-3, unfreeze_blocks=100, batch_size=10, patience=10)
    model = new_model("convnet_s")
    result = fit(model, TRAIN, VAL, cfg, FitSetup(num_classes=2, seed=0, targets=flipped, runtime=CPU))
    assert result.history[-1]["train_acc"] < 0.2  # trained toward the flipped targets
    model_hard = new_model("convnet_s")
    hard = fit(model_hard, TRAIN, VAL, cfg, FitSetup(num_classes=2, seed=0, runtime=CPU))
    assert hard.history[-1]["train_acc"] > 0.8


def test_sgd_without_momentum_is_plain_sgd() -> None:
    """torch refuses Nesterov without momentum: momentum 0 (a valid param) must still train."""
    model = create_model(ModelConfig(arch="airbench_s", head_layers=0, dropout=0.0, widths=(8, 8, 8)), 2)
    opt = make_optimizer(model, AIRBENCH.model_copy(update={"momentum": 0.0}), 0.5)
    assert opt.defaults["momentum"] == 0.0 and not opt.defaults["nesterov"]
    result = fit(
        model,
        TRAIN,
        VAL,
        AIRBENCH.model_copy(update={"momentum": 0.0, "epochs": 1}),
        FitSetup(num_classes=2, seed=0, runtime=CPU),
    )
    assert len(result.history) == 1
