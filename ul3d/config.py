"""Run configurations: YAML files in ``configs/`` over ``configs/defaults.yaml``, plus ``key=value`` overrides.

A config is a nested dict. ``load_config("configs/prostate.yaml", ["train.iterations=100"])`` reads the
defaults, merges the file over them (``base:`` in a file names another file to merge first), then applies
each override (dotted key, YAML value: ``data.spacing=[1,1,2]``, ``network.variant=M``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CONFIG_DIR", "ConfigError", "load_config", "apply_overrides", "merge", "get", "find_config"]

#: The repository's ``configs/`` folder (ul3d is installed in editable mode by scripts/bootstrap.sh).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: values of ``over`` win; nested dicts merge."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def find_config(name: str | os.PathLike) -> Path:
    """A config path as given, or ``configs/<name>[.yaml]`` of the repository."""
    p = Path(name)
    for cand in (p, CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config {str(name)!r} not found (looked in the current folder and {CONFIG_DIR})")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read YAML config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        data = merge(_read_yaml((path.parent / base), seen + (path,)), data)
    return data


def apply_overrides(config: dict, overrides: Sequence[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a copy of ``config``."""
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.iterations=1000)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        node = config
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                if p in node and node[p] is not None:
                    raise ConfigError(f"override {item!r}: {p!r} is not a section")
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return config


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | None = None) -> dict:
    """Defaults, then the file at ``path`` (if any), then ``overrides``."""
    config = _read_yaml(CONFIG_DIR / "defaults.yaml")
    if path is not None:
        config = merge(config, _read_yaml(find_config(path)))
    return apply_overrides(config, overrides)


def get(config: dict, dotted: str, default: Any = None) -> Any:
    """``get(cfg, "train.roi_size")``."""
    node: Any = config
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node
