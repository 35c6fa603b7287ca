"""Test-time augmentation in the one inference function: the views, their weights, and `none` unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sstl.config.model import DataConfig, ModelConfig
from sstl.config.runtime import Tta
from sstl.eval.predict import predict
from sstl.models.classifier import Classifier
from sstl.models.factory import create_model
from sstl.models.inference import batch_outputs, infer, shifted, tta_logits
from sstl.runtime.device import CPU

SIDE, CLASSES = 8, 4
IMAGES = torch.randint(0, 256, (10, SIDE, SIDE, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def linear_model(seed: int = 0) -> Classifier:
    """logits = W . (normalised image, flattened): every pixel of every view counts with its own weight,
    so a wrong view (vertical flip, wrong shift, wrong window) or a wrong weight changes the logits."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(3 * SIDE * SIDE, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, 3 * SIDE * SIDE, generator=g))
        head.bias.copy_(torch.randn(CLASSES, generator=g))
    backbone = nn.Flatten(1)
    return Classifier(backbone, [backbone], head, DataConfig(input_size=SIDE)).eval()


class LeftRight(nn.Module):
    """(N, 3, H, W) -> (N, 2): mean intensity of the left half, of the right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], dim=1)


def left_right_model() -> Classifier:
    backbone = LeftRight()
    return Classifier(backbone, [backbone], nn.Identity(), DataConfig(mean=(0, 0, 0), std=(1, 1, 1))).eval()


def plain(model: Classifier, images: np.ndarray) -> torch.Tensor:
    """The views' logits, each view given to the model as an ordinary image (tta none)."""
    return infer(model, torch.from_numpy(np.ascontiguousarray(images)), batch_size=4, runtime=CPU)


def test_none_is_the_plain_forward_pass_batch_by_batch() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="convnet_s"), 3).eval()
    want = torch.cat([model(model.preprocess(IMAGES[a : a + 4])) for a in range(0, len(IMAGES), 4)])
    got = infer(model, IMAGES, batch_size=4, tta="none", runtime=CPU)
    assert torch.equal(got, want)
    assert torch.equal(infer(model, IMAGES, batch_size=4, runtime=CPU), want), "none is the default"


def test_flip_averages_an_image_and_its_horizontal_mirror() -> None:
    model = left_right_model()
    # bright on the left: logits (left, right) = (1, 0); its mirror (0, 1); flip TTA sees both
    image = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    image[:, :, :2] = 255
    assert infer(model, image, runtime=CPU).tolist() == [[1.0, 0.0]]
    assert infer(model, image, tta="flip", runtime=CPU).tolist() == [[0.5, 0.5]]  # a vertical mirror would give (1, 0)


def test_flip_is_the_exact_mean_of_the_two_views() -> None:
    model = linear_model()
    images = IMAGES.numpy()
    want = 0.5 * plain(model, images) + 0.5 * plain(model, images[:, :, ::-1])  # (N, H, W, 3): W is axis 2
    got = infer(model, IMAGES, batch_size=4, tta="flip", runtime=CPU)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert not torch.allclose(got, plain(model, images), atol=1e-2), "the mirror counts"


def test_a_mirror_symmetric_image_is_unchanged_by_flip() -> None:
    model = linear_model()
    symmetric = torch.cat([IMAGES[:, :, :4], IMAGES[:, :, :4].flip(2)], dim=2)
    torch.testing.assert_close(
        infer(model, symmetric, tta="flip", runtime=CPU), infer(model, symmetric, runtime=CPU), rtol=0, atol=1e-4
    )


def test_flip_translate_is_airbench_level_2() -> None:
    """0.5 flip(x) + 0.25 flip(x shifted +1 px) + 0.25 flip(x shifted -1 px), shifts diagonal, reflected."""
    model = linear_model()
    images = IMAGES.numpy()
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")  # reflect: the edge not repeated
    views = {
        "x": images,
        "down_right": padded[:, 0:SIDE, 0:SIDE],  # pixel (i, j) = x(i - 1, j - 1)
        "up_left": padded[:, 2 : SIDE + 2, 2 : SIDE + 2],  # pixel (i, j) = x(i + 1, j + 1)
    }
    assert np.array_equal(views["down_right"][:, 1:, 1:], images[:, :-1, :-1])
    assert np.array_equal(views["up_left"][:, :-1, :-1], images[:, 1:, 1:])

    def flip_mean(v: np.ndarray) -> torch.Tensor:
        return 0.5 * plain(model, v) + 0.5 * plain(model, v[:, :, ::-1])

    want = 0.5 * flip_mean(views["x"]) + 0.25 * flip_mean(views["down_right"]) + 0.25 * flip_mean(views["up_left"])
    got = infer(model, IMAGES, batch_size=4, tta="flip_translate", runtime=CPU)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the shifted views matter: the flip mean alone is another answer
    assert not torch.allclose(got, infer(model, IMAGES, tta="flip", runtime=CPU), atol=1e-2)


def test_shift_windows_on_a_small_image() -> None:
    x = torch.arange(9.0).view(1, 1, 3, 3)  # [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    plus, minus = shifted(x)
    assert plus[0, 0].tolist() == [[4, 3, 4], [1, 0, 1], [4, 3, 4]]  # padded[0:3, 0:3]: moved down and right
    assert minus[0, 0].tolist() == [[4, 5, 4], [7, 8, 7], [4, 5, 4]]  # padded[2:5, 2:5]: moved up and left


def test_views_stay_in_fp32_and_on_one_batch() -> None:
    model = linear_model()
    x = model.preprocess(IMAGES[:3])
    for tta in ("none", "flip", "flip_translate"):
        out = tta_logits(model, x, tta)  # type: ignore[arg-type]
        assert out.dtype == torch.float32 and out.shape == (3, CLASSES)
    (empty, index), *_ = batch_outputs(model, IMAGES[:0], tta="flip_translate", runtime=CPU)
    assert empty.shape == (0, CLASSES) and index.numel() == 0


def test_features_take_no_tta_and_unknown_modes_are_refused() -> None:
    model = linear_model()
    with pytest.raises(ValueError, match="features are of the image itself"):
        infer(model, IMAGES, features=True, tta="flip", runtime=CPU)
    assert infer(model, IMAGES, features=True, runtime=CPU).shape == (len(IMAGES), 3 * SIDE * SIDE)
    with pytest.raises(ValueError, match="unknown tta 'mirror'"):
        infer(model, IMAGES, tta="mirror", runtime=CPU)  # type: ignore[arg-type]


def test_predict_takes_the_tta_of_evaluate(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # bright on the left
    Image.fromarray(pixels).save(tmp_path / "left.png")
    model = left_right_model()

    def probabilities(tta: Tta) -> list[float]:
        (row,) = predict(
            model, ["left", "right"], 8, [tmp_path / "left.png"], 2, interpolation="nearest", tta=tta, runtime=CPU
        )
        return [p["probability"] for p in sorted(row["predictions"], key=lambda p: p["class"])]

    assert probabilities("none") == [0.7311, 0.2689]  # softmax(1, 0)
    assert probabilities("flip") == [0.5, 0.5]
