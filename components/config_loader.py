"""The one config loader: YAML presets + ``--section.key=value`` overrides -> frozen dataclasses.

Configs are nested frozen dataclasses declared beside the code they configure. This module
turns plain dicts (from YAML, from overrides, or shipped to a Ray worker) into those
dataclasses, rejecting unknown keys and wrong types with a message that names the full
dotted path of the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or preset is wrong; the message names which."""


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing keys take the dataclass defaults."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' of ' + path if path else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:  # already names its keys
        raise
    except (ValueError, TypeError) as exc:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a config, safe to ship to Ray workers and to log."""
    return dataclasses.asdict(config)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_tp, value_tp = get_args(tp) or (Any, Any)
        # Entries are typed too: ``--lake.storage_options.AWS_ALLOW_HTTP=true`` is YAML's bool,
        # which deltalake would reject later with a type error that names no key.
        return {_coerce(key_tp, k, path): _coerce(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot, no sign) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check (all comparisons are false)
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """``["--data.max_seq_len=4000", "features.seed=3"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for raw in overrides:
        text = raw[2:] if raw.startswith("--") else raw
        if "=" not in text:
            raise ConfigError(f"override {raw!r} must look like --section.key=value")
        key, _, value_text = text.partition("=")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {raw!r} has an empty key part")
        try:
            value = yaml.safe_load(value_text) if value_text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {raw!r}: value is not valid YAML ({exc})") from exc
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {raw!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


PRESET_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


def read_preset(preset: str | Path) -> dict[str, Any]:
    """Read a preset by name (``demo`` -> pipelines/configs/demo.yaml) or by path."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config preset {str(preset)!r} not found (looked at {path}); presets: {names}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], preset: str | Path | None, overrides: typing.Sequence[str] = ()) -> T:
    """Preset (optional) + overrides -> validated frozen config of type ``cls``."""
    data = read_preset(preset) if preset is not None else {}
    return from_dict(cls, merge(data, parse_overrides(overrides)))
