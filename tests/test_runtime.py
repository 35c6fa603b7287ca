"""The runtime (device + precision, built once), bf16 autocast, and phase 1 on cached backbone features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_training import SCHEDULE, TRAIN, VAL, dark_vs_bright, new_model

from sstl.config.model import ModelConfig
from sstl.config.pseudo import SelectConfig
from sstl.config.train import AugmentConfig, TrainConfig
from sstl.core.errors import SstlError
from sstl.data.transforms import augmenter
from sstl.models.factory import create_model
from sstl.models.inference import infer
from sstl.params import parse_params
from sstl.pseudo.pool import select_pool
from sstl.runtime import device as rt
from sstl.runtime.device import CPU, Runtime, make_runtime, resolve_device
from sstl.train.loop import features, fit
from sstl.train.setup import FitSetup

POOL = torch.randint(0, 256, (96, 16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
CFG = SelectConfig(method="topk", top_k=15, top_p=2, batch_size=16, shard_size=16)  # 96 images: 6 shards
BF16 = Runtime(torch.device("cpu"), "bf16")


def scorer() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(arch="resnet18"), 3).eval()


# bf16 runs on any CPU (emulated, slower, with a warning, where it is not native): no skip
any_cpu = pytest.mark.filterwarnings("ignore:precision. bf16 on a CPU without")


# --- devices ------------------------------------------------------------------------------------


def test_auto_device_is_the_best_present() -> None:
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize(
    ("spec", "says"),
    [("gpu", "not a device"), ("cuda:99", "cuda"), ("mps", "mps"), ("xla", "not supported")],
)
def test_unusable_device_is_one_line_naming_it(spec: str, says: str) -> None:
    if spec == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS, so mps is usable here")
    with pytest.raises(SstlError) as info:
        resolve_device(spec)
    msg = str(info.value)
    assert spec in msg and says in msg.lower() and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_gpu_names_the_fix() -> None:
    with pytest.raises(SstlError, match="no CUDA GPU.*auto or cpu"):
        resolve_device("cuda")


def test_fp16_is_refused_on_the_cpu() -> None:
    with pytest.raises(SstlError, match="fp16 needs a GPU"):
        make_runtime("cpu", "fp16")


def test_params_build_the_runtime_once_per_part() -> None:
    p = parse_params({"device": "cpu", "precision": {"train": "bf16", "infer": "fp32"}})
    assert p.runtime("train") == Runtime(torch.device("cpu"), "bf16")
    assert p.runtime("infer") == Runtime(torch.device("cpu"), "fp32")
    assert p.runtime("train").describe() == {"device": "cpu", "device_name": "cpu", "precision": "bf16"}


# --- precision ----------------------------------------------------------------------------------


def test_autocast_runs_convolutions_in_bf16_only_when_asked() -> None:
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with CPU.autocast():
        assert conv(x).dtype == torch.float32
    with BF16.autocast():
        assert conv(x).dtype == torch.bfloat16
    assert conv.weight.dtype == torch.float32


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(SstlError, match="fp8.*fp32, bf16, fp16"):
        Runtime(torch.device("cpu"), "fp8")  # type: ignore[arg-type]


def test_emulated_bf16_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        BF16.autocast()


# 64 px: resnet18's last block sees 2x2 maps. On 16 px (1x1 maps) oneDNN's bf16 weight-gradient kernel
# leaves uninitialised values in the 3x3 taps that only meet zero padding: run-dependent weights, and NaN
# (NaN * 0 is NaN) when the garbage happens to be one, which the loop then stops on as a divergence.
TRAIN64, VAL64 = dark_vs_bright(40, 0, size=64), dark_vs_bright(20, 1, size=64)


@any_cpu
def test_bf16_fit_learns_keeps_fp32_weights_and_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        model = new_model()
        runs.append((model, fit(model, TRAIN64, VAL64, SCHEDULE, FitSetup(num_classes=2, seed=0, runtime=BF16))))
    (model_a, a), (model_b, b) = runs
    assert a.best_val_acc > 0.9
    assert all(p.dtype == torch.float32 for p in model_a.parameters())
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in r.history] for r in (a, b)]
    assert strip[0] == strip[1]
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), "the same weights, bit for bit"
    assert torch.equal(infer(model_a, VAL64.images, runtime=BF16), infer(model_b, VAL64.images, runtime=BF16))
    fp32 = fit(new_model(), TRAIN64, VAL64, SCHEDULE, FitSetup(num_classes=2, seed=0, runtime=CPU))
    assert a.history[0]["train_loss"] != fp32.history[0]["train_loss"], "bf16 must really change the arithmetic"


@any_cpu
def test_bf16_inference_returns_fp32_logits_close_to_fp32() -> None:
    model = scorer()
    full, half = infer(model, POOL, runtime=CPU), infer(model, POOL, runtime=BF16)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)
    # bf16 keeps 8 bits of mantissa: logits agree to about 1% of their spread, and so do decisions
    assert (half - full).abs().max() <= 0.05 * full.abs().max()
    assert (half.argmax(1) == full.argmax(1)).float().mean() >= 0.95


@any_cpu
def test_bf16_scores_never_resume_an_fp32_state(tmp_path: Path) -> None:
    model = scorer()
    select_pool(model, POOL, CFG, 3, state_dir=tmp_path, runtime=CPU)
    shards: list[int] = []
    got = select_pool(model, POOL, CFG, 3, state_dir=tmp_path, on_shard=shards.append, runtime=BF16)
    assert shards == list(range(6)), "a state scored in fp32 is not resumed by a bf16 run"
    want = select_pool(model, POOL, CFG, 3, runtime=BF16)
    assert got is not None and want is not None
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# --- phase 1 on cached features -----------------------------------------------------------------

HEAD_ONLY = TrainConfig(head_epochs=4, epochs=0, lr=3e-3, batch_size=8, patience=4, plateau_patience=1)


def test_head_on_features_learns_what_the_head_on_images_learns(tmp_path: Path) -> None:
    """Phase 1 with a frozen backbone: training the head on precomputed features gives the same
    head as pushing every batch through the backbone (the old path, still used under augmentation)."""
    # an augmentation that changes no pixel (every layer off): forces the image path
    no_op = augmenter(
        AugmentConfig(hflip=False, crop_scale=1, rotate=0, translate=0, color=0, blur_noise=0, erase=0), 16, 0
    )
    on_images, on_features = new_model(), new_model()
    a = fit(on_images, TRAIN, VAL, HEAD_ONLY, FitSetup(num_classes=2, seed=0, augment=no_op, runtime=CPU))
    b = fit(on_features, TRAIN, VAL, HEAD_ONLY, FitSetup(num_classes=2, seed=0, feature_cache=tmp_path, runtime=CPU))
    assert len(a.history) == len(b.history) == 4
    for ra, rb in zip(a.history, b.history, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4, abs=1e-6)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-4, abs=1e-6)
    for pa, pb in zip(on_images.head.parameters(), on_features.head.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.glob("*.pt"))) == 2, "train and val features cached"


def test_cached_features_are_reused_and_bit_identical(tmp_path: Path) -> None:
    model = new_model().eval()
    first = features(model, TRAIN.images, cache_dir=tmp_path, runtime=CPU)
    (cached,) = tmp_path.glob("*.pt")
    stamp = cached.stat().st_mtime_ns
    again = features(model, TRAIN.images, cache_dir=tmp_path, runtime=CPU)
    assert torch.equal(first, again) and cached.stat().st_mtime_ns == stamp, "read back, not recomputed"
    runs = [
        fit(new_model(), TRAIN, VAL, HEAD_ONLY, FitSetup(num_classes=2, seed=0, feature_cache=c, runtime=CPU))
        for c in (tmp_path, None)
    ]
    assert [r["val_loss"] for r in runs[0].history] == [r["val_loss"] for r in runs[1].history]


def test_feature_cache_is_invalidated_when_the_backbone_or_data_change(tmp_path: Path) -> None:
    model = new_model().eval()
    base = features(model, TRAIN.images, cache_dir=tmp_path, runtime=CPU)
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.5)  # another backbone: e.g. fine-tuned weights
    changed = features(model, TRAIN.images, cache_dir=tmp_path, runtime=CPU)
    assert not torch.equal(base, changed)
    assert torch.equal(changed, features(model, TRAIN.images, runtime=CPU))  # what the new backbone really computes
    features(model, VAL.images, cache_dir=tmp_path, runtime=CPU)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    head_only = model.head
    with torch.no_grad():
        next(head_only.parameters()).add_(1.0)  # the head is not part of the key: features do not depend on it
    assert torch.equal(changed, features(model, TRAIN.images, cache_dir=tmp_path, runtime=CPU))
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_inference_on_an_empty_split_has_the_right_width() -> None:
    """A folder without test-add/ packs an empty split: evaluate must get (0, C) logits, not fail."""
    model = scorer()
    empty = torch.zeros((0, 16, 16, 3), dtype=torch.uint8)
    assert infer(model, empty, runtime=CPU).shape == (0, 3)
    assert infer(model, empty, features=True, runtime=CPU).shape == (0, 512)
