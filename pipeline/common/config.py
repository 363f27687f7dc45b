"""Frozen-dataclass configs loadable from YAML/JSON and overridable with ``a.b=value`` strings."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from pipeline.common.errors import PipelineError
from pipeline.common import io

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys with the full dotted name."""
    if not isinstance(data, dict):
        raise PipelineError(f"config {where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise PipelineError(f"unknown config key(s) {sorted(where + k for k in unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}{key}.")
        else:
            value = _coerce(hint, value, where + key)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(hint, value, name: str):
    """Parse scalars to the field's type: YAML reads ``1e-3`` as a string, CLI values arrive as text."""
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:  # Optional[X]
        hint = args[0]
    if typing.get_origin(hint) is tuple or hint is tuple:
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    try:
        if hint is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, str):
            return int(value)
    except ValueError:
        raise PipelineError(f"config {name}: expected {hint.__name__}, got {value!r}") from None
    if hint in (int, float, bool, str) and not isinstance(value, hint if hint is not float else (int, float)):
        raise PipelineError(f"config {name}: expected {hint.__name__}, got {value!r}")
    return value


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- file (YAML or JSON) <- ``key.sub=value`` overrides (values parsed as YAML)."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise PipelineError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PipelineError(f"cannot parse {path}: {exc}".splitlines()[0]) from exc
        deep_merge(data, loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise PipelineError(f"override {item!r} must look like key.sub=value")
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise PipelineError(f"override {item!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise PipelineError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(cls, data)


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the dotted keys ``--set`` uses); empty dicts stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def deep_merge(base: dict, update: dict) -> None:
    """Merge ``update`` into ``base`` in place; nested dicts merge, everything else replaces."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = v


def save(cfg: Any, path: str | Path) -> Path:
    return io.write_json(path, to_dict(cfg))
