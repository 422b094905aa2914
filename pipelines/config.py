"""Dataclass configurations, loadable from YAML/JSON files and overridable with ``key.sub=value`` strings.

Defaults live in the dataclasses (and match the paper); a file overrides some of them; ``--set`` overrides win.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = getattr(typ, "__origin__", None)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config '{where}' must be a mapping, got {value!r}")
        return from_dict(typ, value, where)
    if isinstance(value, str) and typ in (int, float, bool):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"config '{where}': cannot parse {value!r}") from e
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, bool, str) and not isinstance(value, typ):
        raise ConfigError(f"config '{where}' must be {typ.__name__}, got {value!r}")
    if origin in (tuple, list) and isinstance(value, str):
        value = yaml.safe_load(value)
    if origin is tuple:
        return tuple(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of ``cls``; a field whose annotation names a type imported only for
    type checking (e.g. an optional nested config) gets ``Any``, so its value is taken as given."""
    try:
        return get_type_hints(cls)
    except NameError:
        module = vars(sys.modules[cls.__module__])
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = eval(f.type, module) if isinstance(f.type, str) else f.type  # noqa: S307 (own code)
            except NameError:
                out[f.name] = Any
        return out


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (partial) dict; unknown keys are errors naming the key and the valid ones."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} in '{where or cls.__name__}'",
                          f"valid keys: {', '.join(sorted(names))}")
    base = cls()
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            sub = f"{where}.{f.name}" if where else f.name
            cur = getattr(base, f.name)
            if dataclasses.is_dataclass(cur) and isinstance(data[f.name], dict):
                kw[f.name] = from_dict(type(cur), {**dataclasses.asdict(cur), **data[f.name]}, sub)
            else:
                kw[f.name] = _coerce(data[f.name], hints[f.name], sub)
    return dataclasses.replace(base, **kw)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML/JSON file <- ``key.sub=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found")
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else (yaml.safe_load(text) or {})
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config file '{p}' is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not key=value", "e.g. --set loss.lambda_3d=100")
        key, val = ov.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(val)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
