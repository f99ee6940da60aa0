"""YAML configs loaded into frozen, typed dataclasses.

A config file holds a (possibly partial) nested mapping; command-line overrides
are dotted ``key.sub=value`` strings whose values are parsed as YAML. Unknown
keys and values of the wrong type are errors, so a typo never trains silently
with a default.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from common.io import write_text_atomic

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``schema`` from the YAML at ``path`` (optional) plus dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    where = str(path) if path is not None else "config"
    return from_dict(schema, raw, where)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(schema: type[T], raw: Any, where: str = "config") -> T:
    """Recursively convert a mapping into the dataclass ``schema``, strictly."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {schema.__name__}, got {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {schema.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        hint, default = hints[name], _field_default(fields[name])
        if dataclasses.is_dataclass(hint) and isinstance(value, dict) and dataclasses.is_dataclass(default):
            # A partial section keeps the defaults of the enclosing schema, not of the section class.
            value = _merge(to_dict(default), value)
        kwargs[name] = _coerce(hint, value, f"{where}.{name}")
    try:
        return schema(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) of a config dataclass, YAML/JSON-ready."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: T, **changes: Any) -> T:
    """A copy of ``cfg`` with dotted keys changed: ``replace(cfg, **{"train.steps": 2})``."""
    raw = to_dict(cfg)
    for key, value in changes.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return from_dict(type(cfg), raw)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _coerce_scalar(hint, value, where)


def _coerce_scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {hint}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
