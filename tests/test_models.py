"""Model factory: archs, head, freezing, backbone weights (none, local file, ImageNet cache), checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from sstl.config.model import ModelConfig
from sstl.core.errors import SstlError
from sstl.models.architectures import ARCHS
from sstl.models.checkpoint import load_checkpoint, save_checkpoint
from sstl.models.classifier import fit_whitening, set_trainable
from sstl.models.factory import create_model

PROXY_VARS = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def cfg(arch: str = "resnet18", **kw: object) -> ModelConfig:
    return ModelConfig(arch=arch, **kw)


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory, resnet18_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(resnet18_state, path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("head_layers", [0, 2])
def test_logits_shape(arch: str, head_layers: int) -> None:
    model = create_model(cfg(arch, head_layers=head_layers, hidden_size=16), num_classes=5)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5)
    assert out.dtype == torch.float32
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert len(linears) == head_layers + 1
    assert linears[-1].out_features == 5


def test_head_activation_and_dropout() -> None:
    model = create_model(cfg(head_layers=1, activation="gelu", dropout=0.3), 2)
    assert any(isinstance(m, nn.GELU) for m in model.head)
    assert all(m.p == 0.3 for m in model.head if isinstance(m, nn.Dropout))


def test_unknown_arch_lists_valid_ones() -> None:
    with pytest.raises(SstlError) as info:
        create_model(cfg("resnet19"), 3)
    msg = str(info.value)
    assert "resnet19" in msg and "\n" not in msg
    for arch in ARCHS:
        assert arch in msg


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("n", [0, 1, 3, 100])
def test_set_trainable_top_blocks(arch: str, n: int) -> None:
    model = create_model(cfg(arch), 3)
    set_trainable(model, n)
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        flags = {p.requires_grad for p in block.parameters()}
        if not flags:
            continue  # a parameter-free block
        assert flags == {i >= len(blocks) - n}, (i, n)
    assert all(p.requires_grad for p in model.head.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(p.numel() for p in model.head.parameters())
    expected += sum(p.numel() for b in blocks[max(len(blocks) - n, 0) :] for p in b.parameters())
    assert trainable == expected


def test_set_trainable_can_refreeze() -> None:
    model = create_model(cfg(), 3)
    set_trainable(model, 5)
    set_trainable(model, 1)
    assert not any(p.requires_grad for p in model.blocks[0].parameters())
    assert all(p.requires_grad for p in model.blocks[-1].parameters())


def test_resnet_has_five_blocks() -> None:
    assert len(create_model(cfg(), 2).blocks) == 5


def test_local_weights_file(resnet18_file: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    model = create_model(cfg(weights=str(resnet18_file)), 4)
    conv1 = model.blocks[0][0]
    assert torch.equal(conv1.weight, resnet18_state["conv1.weight"])
    assert torch.equal(model.blocks[-1][1].conv2.weight, resnet18_state["layer4.1.conv2.weight"])
    assert torch.equal(model.blocks[0][1].running_var, resnet18_state["bn1.running_var"])


def test_local_weights_wrapped_in_state_dict_key(tmp_path: Path, resnet18_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": resnet18_state, "epoch": 3}, path)
    model = create_model(cfg(weights=str(path)), 4)
    assert torch.equal(model.blocks[0][0].weight, resnet18_state["conv1.weight"])


def test_local_weights_with_other_head_size(tmp_path: Path) -> None:
    state = torchvision.models.resnet18(num_classes=7).state_dict()
    path = tmp_path / "r18_7.pth"
    torch.save(state, path)
    model = create_model(cfg(weights=str(path)), 3)
    assert torch.equal(model.blocks[0][0].weight, state["conv1.weight"])


def test_weights_for_another_arch_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(SstlError) as info:
        create_model(cfg(weights=str(path)), 3)
    assert "resnet18" in str(info.value) and "\n" not in str(info.value)


def test_deeper_resnet_weights_are_rejected_for_resnet18(tmp_path: Path) -> None:
    """resnet34's state dict holds every resnet18 key with the same shape, plus extra blocks:
    loading it into resnet18 silently mixes blocks; it must be refused like any other arch."""
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(SstlError):
        create_model(cfg("resnet18", weights=str(path)), 3)


def test_shallower_resnet_weights_are_rejected_for_resnet34(resnet18_file: Path) -> None:
    with pytest.raises(SstlError, match="resnet34"):
        create_model(cfg("resnet34", weights=str(resnet18_file)), 3)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(SstlError) as info:
        create_model(cfg(weights=str(tmp_path / "nope.pth")), 3)
    assert "nope.pth" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("payload", ["garbage", "list"])
def test_unusable_weights_file_is_an_sstl_error(tmp_path: Path, payload: str) -> None:
    """A weights file that is not a state dict is a user mistake: one SstlError line, no traceback."""
    path = tmp_path / "bad.pth"
    if payload == "garbage":
        path.write_bytes(b"this is not a torch file")
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(SstlError):
        create_model(cfg(weights=str(path)), 3)


def test_imagenet_weights_from_torch_home_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet18_file: Path, resnet18_state: dict[str, torch.Tensor]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in PROXY_VARS:  # no network needed, and none possible
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cache = tmp_path / "hub" / "checkpoints" / name
    cache.parent.mkdir(parents=True)
    cache.write_bytes(resnet18_file.read_bytes())
    model = create_model(cfg(weights="imagenet"), 3)
    assert torch.equal(model.blocks[0][0].weight, resnet18_state["conv1.weight"])


def test_imagenet_weights_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in PROXY_VARS:  # the download fails at once: nothing listens on port 9
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(SstlError) as info:
        create_model(cfg(weights="imagenet"), 3)
    msg = str(info.value)
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    assert "\n" not in msg
    assert name in msg
    assert str(tmp_path / "hub" / "checkpoints" / name) in msg, "says where to put the file"
    assert "local file" in msg


def test_checkpoint_round_trip(tmp_path: Path, resnet18_file: Path) -> None:
    torch.manual_seed(0)
    model_cfg = cfg(weights=str(resnet18_file), head_layers=1, hidden_size=32, activation="silu")
    model = create_model(model_cfg, 3)
    # make the BatchNorm statistics non-trivial, then compare in eval mode
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, model_cfg, ["a", "b", "c"], 32, note="hello")
    copy = tmp_path / "weights_gone.pth"
    resnet18_file.rename(copy)  # the checkpoint must not need the backbone file any more
    try:
        loaded, payload = load_checkpoint(path)
    finally:
        copy.rename(resnet18_file)
    assert payload["classes"] == ["a", "b", "c"]
    assert payload["image_size"] == 32
    assert payload["note"] == "hello"
    assert payload["model"]["activation"] == "silu"
    assert not loaded.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SstlError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("payload", [{"weight": torch.zeros(2)}, {"disabled": True}, [1, 2]])
def test_load_checkpoint_refuses_what_is_not_an_sstl_checkpoint(tmp_path: Path, payload: object) -> None:
    """A plain state_dict, pretrain's "disabled" marker, any other tensor file: one line, not a KeyError."""
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(SstlError, match="other.pt is not an sstl checkpoint"):
        load_checkpoint(path)


# --- small CNNs and sstl checkpoints as weights -----------------------------------------------


def test_convnet_shapes_and_blocks() -> None:
    model = create_model(ModelConfig(arch="convnet_s", head_layers=0), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len(model.blocks) == 4  # stem + three groups


def test_sstl_checkpoint_backbone_is_reused(tmp_path: Path) -> None:
    src = create_model(ModelConfig(arch="convnet_s", head_layers=0), 4)  # e.g. a rotation pretext model
    path = tmp_path / "pretrain.pt"
    save_checkpoint(path, src, ModelConfig(arch="convnet_s", head_layers=0), ["0", "90", "180", "270"], 32)
    dst = create_model(ModelConfig(arch="convnet_s", weights=str(path), head_layers=1), 10)
    for a, b in zip(src.backbone.state_dict().values(), dst.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(SstlError, match="convnet_s backbone, not convnet_m"):
        create_model(ModelConfig(arch="convnet_m", weights=str(path)), 10)
    with pytest.raises(SstlError, match="no imagenet weights"):
        create_model(ModelConfig(arch="convnet_s", weights="imagenet"), 10)


# --- preprocessing travels with the backbone --------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "mean", "std"),
    [("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("tf_efficientnet_lite0", (0.5,) * 3, (0.5,) * 3)],
)
def test_preprocess_uses_the_backbones_mean_and_std(arch: str, mean: tuple, std: tuple) -> None:
    model = create_model(cfg(arch), 2)
    images = torch.zeros((2, 4, 5, 3), dtype=torch.uint8)
    images[1, 2, 3] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    x = model.preprocess(images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 5)
    want = [(1.0 - mean[0]) / std[0], (0.0 - mean[1]) / std[1], (128 / 255 - mean[2]) / std[2]]
    assert x[1, :, 2, 3].tolist() == pytest.approx(want, abs=1e-5)
    assert (images[0] == 0).all(), "the input is not modified"


def test_timm_data_config_is_recorded_and_restored(tmp_path: Path) -> None:
    model = create_model(cfg("tf_efficientnet_lite2", head_layers=0), 3)
    assert model.data.input_size == 260 and model.data.interpolation == "bicubic"
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, cfg("tf_efficientnet_lite2", head_layers=0), ["a", "b", "c"], 64)
    loaded, payload = load_checkpoint(path)
    assert payload["data"]["mean"] == [0.5, 0.5, 0.5] or tuple(payload["data"]["mean"]) == (0.5, 0.5, 0.5)
    assert loaded.data == model.data
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(model.preprocess(images)), loaded(loaded.preprocess(images)))


def test_resize_upsamples_inside_the_model_and_travels_with_the_checkpoint(tmp_path: Path) -> None:
    # a 32-px set read by a 64-px model: preprocess resizes after normalising, bilinear, to exactly 64 x 64
    small = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    config = cfg("convnet_s", head_layers=0, resize=64)
    model = create_model(config, 4).eval()
    x = model.preprocess(small)
    assert x.shape == (3, 3, 64, 64)
    plain = create_model(cfg("convnet_s", head_layers=0), 4).preprocess(small)
    assert plain.shape == (3, 3, 32, 32), "no resize unless asked"
    # bilinear 2x upsampling keeps the mean of each image channel within a rounding error
    assert x.mean(dim=(2, 3)) == pytest.approx(plain.mean(dim=(2, 3)), abs=0.02)
    assert model.preprocess(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)).shape == (1, 3, 64, 64)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, config, ["a", "b", "c", "d"], 32)
    loaded, _ = load_checkpoint(path)
    assert loaded.data.resize == 64
    with torch.no_grad():
        assert torch.equal(model(model.preprocess(small)), loaded(loaded.preprocess(small)))


def test_resize_downsamples_with_antialiasing() -> None:
    # 64 -> 16 px of pixel noise: an antialiased resize averages each output over its whole 8 x 8 footprint
    # (noise std / ~6); plain bilinear would read 2 x 2 of the 4 x 4 pixels it stands for (std / 2)
    noise = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    full = create_model(cfg("convnet_s", head_layers=0), 2).preprocess(noise)
    small = create_model(cfg("convnet_s", head_layers=0, resize=16), 2).preprocess(noise)
    assert small.shape == (4, 3, 16, 16)
    assert float(small.std()) < 0.3 * float(full.std())


def test_timm_arch_blocks_freeze_from_the_top() -> None:
    model = create_model(cfg("tf_efficientnet_lite0"), 4)
    assert len(model.blocks) == 8  # stem, 7 stages (the last with the head conv)
    set_trainable(model, 1)
    top = {id(p) for p in model.blocks[-1].parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == top | {id(p) for p in model.head.parameters()}
    set_trainable(model, 1000)
    assert all(p.requires_grad for p in model.parameters())


def test_taps_give_the_head_the_statistics_of_the_top_stages_outputs(tmp_path: Path) -> None:
    # Lite0's groups: stem, blocks.0 ... blocks.5, then blocks.6 with the head conv: taps 2 read what the
    # stages blocks.5 (192 channels) and blocks.6 (320) put out, per channel over space, beside the 1280
    # pooled features; std alone by default, mean and std with tap_stats mean_std
    x = torch.randn(2, 3, 64, 64)
    for stats, per_channel in (("std", 1), ("mean_std", 2)):
        config = cfg("tf_efficientnet_lite0", head_layers=0, taps=2, tap_stats=stats)
        model = create_model(config, 4).eval()
        out: list[torch.Tensor] = []
        grab = out.append
        hooks = [model.backbone.blocks[i].register_forward_hook(lambda _m, _a, y, g=grab: g(y)) for i in (5, 6)]
        with torch.no_grad():
            f = model.features(x)
        for hook in hooks:
            hook.remove()
        assert f.shape == (2, 1280 + per_channel * (192 + 320)) and model.head[-1].in_features == f.shape[1]
        with torch.no_grad():
            assert torch.equal(f[:, :1280], model.backbone(x))  # the pooled features first, as without taps
        at = 1280
        for a in out:  # blocks.5's statistics, then blocks.6's, each standardised per photo
            s = a.std((2, 3), unbiased=False)
            s = torch.cat([a.mean((2, 3)), s], 1) if stats == "mean_std" else s
            s = (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True)
            assert torch.allclose(f[:, at : at + s.shape[1]], s, atol=1e-4)
            at += s.shape[1]
        assert at == f.shape[1]
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, config, ["a", "b", "c", "d"], 64)
    loaded, payload = load_checkpoint(path)
    assert (payload["model"]["taps"], payload["model"]["tap_stats"]) == (2, "mean_std")
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(SstlError, match="taps is 5, but resnet18 has 4 groups above its stem: set taps to at most 4"):
        create_model(cfg("resnet18", taps=5), 4)  # layer1-4


def test_unknown_timm_name_suggests_close_matches() -> None:
    with pytest.raises(SstlError) as info:
        create_model(cfg("efficientnet_lite_0"), 3)
    msg = str(info.value)
    assert "\n" not in msg and "did you mean" in msg and "efficientnet_lite0" in msg


def test_timm_prefix_selects_timm_over_torchvision() -> None:
    tv, tm = create_model(cfg("resnet18"), 2), create_model(cfg("timm/resnet18"), 2)
    assert "backbone.0.0.weight" in tv.state_dict() and "backbone.conv1.weight" in tm.state_dict()


def test_freeze_bn_keeps_every_batchnorm_in_eval_mode() -> None:
    from sstl.models.classifier import train_mode

    model = create_model(cfg("tf_efficientnet_lite0"), 3)
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    train_mode(model, 2)
    top = [m for m in model.blocks[-1].modules() if isinstance(m, nn.BatchNorm2d)]
    assert top and all(m.training for m in top), "unfrozen blocks normally update their statistics"
    assert not model.blocks[0][1].training, "frozen blocks never do"
    train_mode(model, 2, freeze_bn=True)
    assert not any(m.training for m in bns)
    assert model.head.training and model.blocks[-1][0].training


def test_whitening_decorrelates_patches() -> None:
    """The fitted 2x2 filters (first half) map the images' patches to unit covariance: whitened inputs."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, 17, 17, 3), generator=g, dtype=torch.uint8)
    images = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2).float(), size=32).permute(0, 2, 3, 1)
    images = images.to(torch.uint8)  # neighbouring pixels equal in pairs: strongly correlated patches
    model = create_model(ModelConfig(arch="airbench_s", head_layers=0, dropout=0.0), 10)
    whiten = model.backbone[0][0]
    assert not bool(whiten.ready)
    assert fit_whitening(model, images) is True
    assert bool(whiten.ready) and fit_whitening(model, images) is False  # fitted once, kept after
    x = model.preprocess(images)
    out = torch.nn.functional.conv2d(x, whiten.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    # the eps of 5e-4 shrinks the smallest directions a little; all others are whitened
    assert torch.allclose(cov.diagonal()[:8], torch.ones(8, dtype=torch.float64), atol=0.05)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.05
    assert torch.equal(whiten.weight[12:], -whiten.weight[:12])


def test_airbench_widths_and_checkpoint_keep_the_whitening(tmp_path: Path) -> None:
    cfg = ModelConfig(arch="airbench_s", head_layers=0, dropout=0.0, widths=(8, 16, 24))
    model = create_model(cfg, 3)
    images = torch.randint(0, 256, (20, 32, 32, 3), dtype=torch.uint8)
    fit_whitening(model, images)
    assert model.head[-1].in_features == 24
    assert model(model.preprocess(images)).shape == (20, 3)
    save_checkpoint(tmp_path / "m.pt", model, cfg, ["a", "b", "c"], 32)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.backbone[0][0].weight, model.backbone[0][0].weight)
    assert fit_whitening(loaded, images) is False  # a loaded network is never refitted
    loaded.eval(), model.eval()
    assert torch.equal(loaded(loaded.preprocess(images)), model(model.preprocess(images)))
