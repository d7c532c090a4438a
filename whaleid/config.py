"""One config for every stage: `config.yaml`, deep-merged overlays and typed `--set` overrides.

The defaults file defines the schema: a key that is not in it is an error naming the valid
keys, and an override must have the type of the default (an int is accepted for a float).
Maps listed in OPEN_MAPS take any key (they are keyed by crop-source name).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from whaleid.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config.yaml"
OPEN_MAPS = {"crop.box_source", "crop.box_files"}


class Config(dict):
    """A dict with attribute access (`cfg.train.epochs`), nested."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(f"config has no key {name!r}; valid: {sorted(self)}") from err

    def to_dict(self) -> dict:
        return _plain(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, dict):
        return Config({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_number_list(value: Any) -> bool:
    """A non-empty list of floats (not bools): its items are checked as float keys."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, float) and not isinstance(v, bool) for v in value)


def _check_type(key: str, default: Any, value: Any) -> Any:
    """Return `value` if it fits the type of `default`, else raise a UserError naming the key.

    null is accepted only where the default is null. For a float key a string that float()
    reads is accepted too: YAML 1.1 (PyYAML) reads `1e-3` as a string, `1.0e-3` as a float.
    """
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: reported below
            value = float(value)
    if isinstance(default, str) and isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        value = str(value)  # YAML reads `paths.outputs=2024` as a number and `2024-06-01` as a date
    if _is_number_list(default) and isinstance(value, list):
        value = [_check_type(f"{key}[{i}]", default[0], v) for i, v in enumerate(value)]
    if value is None:
        ok = False
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(
            f"config key {key!r} must be {_type_name(default)} (like {default!r}), "
            f"got {'null' if value is None else repr(value)}"
        )
    return value


def deep_merge(base: dict, overlay: dict, prefix: str = "") -> dict:
    """Merge `overlay` into a copy of `base`, key by key, checking names and types against `base`."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        path = f"{prefix}{key}"
        if prefix.rstrip(".") in OPEN_MAPS:
            out[key] = value
            continue
        if key not in base:
            raise UserError(f"unknown config key {path!r}; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"config key {path!r} is a section; give it a mapping, got {value!r}")
            out[key] = deep_merge(base[key], value, prefix=f"{path}.")
        else:
            out[key] = _check_type(path, base[key], value)
    return out


def parse_set(expr: str) -> dict:
    """Turn `train.epochs=3` into {'train': {'epochs': 3}}; the value is parsed as YAML."""
    if "=" not in expr:
        raise UserError(f"--set expects key=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {expr!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    overlays: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    base: str | Path = DEFAULT_CONFIG,
) -> Config:
    """Load the defaults, deep-merge each overlay file in order, then apply `--set` overrides."""
    cfg = _read_yaml(Path(base))
    for overlay in overlays:
        cfg = deep_merge(cfg, _read_yaml(Path(overlay)))
    for expr in sets:
        cfg = deep_merge(cfg, parse_set(expr))
    return _wrap(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a plain dict (e.g. the one stored in a checkpoint)."""
    return _wrap(copy.deepcopy(data))


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(_plain(cfg), sort_keys=False)
