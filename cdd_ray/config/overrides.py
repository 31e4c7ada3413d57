"""A config from its sources, later wins: dataclass defaults -> preset -> YAML file -> ``--set key=value``
overrides (dotted keys, coerced to the field's type), checked with what its fields point at on disk (the driver);
and back from a dict (what workers and trials receive), checked without disk: they only read what the driver
resolved."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from cdd_ray.config.errors import ConfigError
from cdd_ray.config.presets import PRESETS
from cdd_ray.config.schema import Config, ModelConfig
from cdd_ray.config.checks import check
from cdd_ray.config.validate import validate

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

def allowed_keys() -> list[str]:
    keys = []
    for name, tp in _field_types(Config).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{k}" for k in _field_types(tp)]
        else:
            keys.append(name)
    return keys

def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()
            ]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {inner.__name__}, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'dual': {'eta': 0.1}} -> {'dual.eta': 0.1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

def parse_set(items: list[str]) -> dict[str, Any]:
    """``["dual.eta=0.1", "data.minority_classes=[4,5]"]`` -> flat dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. dual.eta=0.1")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return out

def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections, got {type(data).__name__}")
    return flatten(data)

def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    keys = set(allowed_keys())
    types = _field_types(Config)
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(keys))}")
        if "." in key:
            section, name = key.split(".", 1)
            obj = getattr(cfg, section)
            tp = _field_types(type(obj))[name]
            setattr(obj, name, _coerce(key, value, tp))
        else:
            setattr(cfg, key, _coerce(key, value, types[key]))
    return cfg

def build_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    unconstrained: bool | None = None,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Resolve a Config from a preset, ``defaults`` (a task's), an optional YAML file and flat overrides, in
    that order, then check it (``checks.check``: the fields and what they point at on disk)."""
    user: dict[str, Any] = dict(defaults or {})
    if yaml_path:
        user.update(load_yaml(yaml_path))
    user.update(overrides or {})
    if preset is not None:
        user["model.preset"] = preset
    if unconstrained is not None:
        user["unconstrained"] = unconstrained
    name = user.get("model.preset", ModelConfig.preset)
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    cfg = Config()
    apply_overrides(cfg, PRESETS[name])
    apply_overrides(cfg, user)
    check(cfg)
    return cfg

def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (a worker's or trial's config, a checkpoint's config.json),
    its fields validated; nothing is read from disk (a machine without the run's data can read it)."""
    cfg = Config()
    apply_overrides(cfg, flatten(d))
    validate(cfg)
    return cfg
