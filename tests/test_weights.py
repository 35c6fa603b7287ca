"""sstl.weights: ImageNet weights found offline, and the lukemelas -> timm EfficientNet-Lite key mapping proven
on real photos (tests/data/photos, CC0): a mapped model puts shoes in shoe classes, an unmapped one does not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from timm.models import get_pretrained_cfg

from sstl.core.errors import SstlError
from sstl.models.weights import imagenet_state_dict, lite_to_timm, package_weights, verify_sha256

PHOTOS = Path(__file__).parent / "data" / "photos"
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]

# ImageNet-1k indices, each checked against timm's own class descriptions below
SHOES = {502: "clog", 514: "cowboy boot", 630: "Loafer", 770: "running shoe", 774: "sandal"}
HATS = {433: "bathing cap", 452: "bonnet", 515: "cowboy hat", 808: "sombrero"}
JEAN = {608: "jean"}
JERSEY = {610: "jersey"}
DRESSES = {578: "gown", 601: "hoopskirt", 689: "overskirt"}
# photo -> (ImageNet classes it must land in, how many top predictions may be looked at)
EXPECTED = {
    "shoes_1": (SHOES, 1),
    "shoes_2": (SHOES, 1),
    "hat_1": (HATS, 5),
    "pants_1": (JEAN, 1),
    "t-shirt_1": (JERSEY, 1),
    "dress_1": (DRESSES, 1),
}


def _raw(arch: str) -> dict[str, torch.Tensor]:
    path = package_weights(arch)
    assert path is not None, f"{arch} weight package not installed"
    return torch.load(path, map_location="cpu", weights_only=True)


def _photos(model: torch.nn.Module) -> torch.Tensor:
    """The photos (sorted by name) preprocessed exactly as timm's data config for the model says."""
    transform = create_transform(**resolve_data_config({}, model=model))
    return torch.stack([transform(Image.open(PHOTOS / f"{n}.jpg").convert("RGB")) for n in sorted(EXPECTED)])


def _topk(model: torch.nn.Module, x: torch.Tensor, k: int = 5) -> dict[str, list[int]]:
    """Top-k ImageNet classes per photo."""
    model.eval()
    with torch.no_grad():
        top = model(x).topk(k).indices
    return {n: row.tolist() for n, row in zip(sorted(EXPECTED), top, strict=True)}


def _one_line(err: pytest.ExceptionInfo[SstlError]) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_class_indices_are_timms() -> None:
    info = ImageNetInfo()
    for classes, _ in EXPECTED.values():
        for index, name in classes.items():
            assert info.index_to_description(index).split(",")[0] == name


@pytest.mark.parametrize("arch", LITES)
def test_mapped_weights_classify_real_photos(arch: str) -> None:
    raw = _raw(arch)
    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(lite_to_timm(raw, arch), strict=True)
    x = _photos(model)
    top = _topk(model, x)
    for photo, (classes, k) in EXPECTED.items():
        assert set(top[photo][:k]) & set(classes), f"{arch} {photo}: top-5 {top[photo]}"

    # negative control: the same weights NOT mapped match no key, the model stays random, the shoes get lost
    torch.manual_seed(0)
    unmapped = timm.create_model(arch, pretrained=False)
    result = unmapped.load_state_dict(raw, strict=False)
    assert set(result.unexpected_keys) == set(raw)
    assert {name for name, _ in unmapped.named_parameters()} <= set(result.missing_keys)
    top = _topk(unmapped, x)
    for photo in ("shoes_1", "shoes_2"):
        assert top[photo][0] not in SHOES, f"random {arch} {photo}: top-5 {top[photo]}"


def test_imagenet_state_dict_uses_the_package() -> None:
    state = imagenet_state_dict("tf_efficientnet_lite0")
    expected = lite_to_timm(_raw("tf_efficientnet_lite0"), "tf_efficientnet_lite0")
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_package_weights_covers_only_lite_archs() -> None:
    path = package_weights("tf_efficientnet_lite0")
    assert path is not None and path.name == "efficientnet-lite0-57934424.pth"
    assert package_weights("efficientnet_lite0") is None  # PyTorch-padding variant: the TF weights do not fit it
    assert package_weights("resnet18") is None


def test_verify_sha256_accepts_the_package_file_and_rejects_one_changed_byte(tmp_path: Path) -> None:
    real = package_weights("tf_efficientnet_lite0")
    assert real is not None
    verify_sha256(real)
    copy = tmp_path / real.name
    shutil.copyfile(real, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(SstlError) as err:
        verify_sha256(copy)
    msg = _one_line(err)
    assert str(copy) in msg and "57934424" in msg and "reinstall" in msg


def test_lite_to_timm_rejects_weights_of_another_size() -> None:
    with pytest.raises(SstlError) as err:
        lite_to_timm(_raw("tf_efficientnet_lite0"), "tf_efficientnet_lite2")
    msg = _one_line(err)
    assert "shape mismatch" in msg and "tf_efficientnet_lite2" in msg


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Torch hub and Hugging Face caches pointed at empty folders through the real environment variables."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def test_no_package_and_empty_caches_name_the_file_and_folder(empty_caches: Path) -> None:
    from huggingface_hub import constants

    flag = constants.HF_HUB_OFFLINE
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    with pytest.raises(SstlError) as err:
        imagenet_state_dict("resnet18")
    msg = _one_line(err)
    assert "resnet18_a1_0-d63eafa0.pth" in msg and str(folder) in msg and "local state-dict file" in msg
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is flag  # offline only for the call

    with pytest.raises(SstlError) as err:
        imagenet_state_dict("tf_efficientnet_lite0", packages=False)
    msg = _one_line(err)
    assert 'pip install "sstl[imagenet]"' in msg and "tf_efficientnet_lite0-0aa007d2.pth" in msg and str(folder) in msg


def test_unknown_arch_is_one_line(empty_caches: Path) -> None:
    with pytest.raises(SstlError) as err:
        imagenet_state_dict("no_such_net")
    assert "no_such_net" in _one_line(err)


def test_torch_hub_cache_file_is_loaded(empty_caches: Path) -> None:
    arch = "tf_efficientnet_lite0"
    state = lite_to_timm(_raw(arch), arch)
    url = get_pretrained_cfg(arch).url
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    assert folder == empty_caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / os.path.basename(url))
    got = imagenet_state_dict(arch, packages=False)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_hugging_face_cache_is_read_offline(empty_caches: Path) -> None:
    """A file in the HF cache layout (refs/main -> snapshots/<rev>/pytorch_model.bin) is found with the hub offline,
    in the folder the environment names now, though huggingface_hub read its variables at import."""
    arch = "tf_efficientnet_lite0"
    state = lite_to_timm(_raw(arch), arch)
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf" / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    torch.save(state, repo / "snapshots" / rev / "pytorch_model.bin")
    got = imagenet_state_dict(arch, packages=False)
    assert all(torch.equal(got[k], state[k]) for k in state)
