"""YAML + `key=value` overrides -> a typed `Config`; unknown keys name the nearest valid one."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Union

import yaml

from .schema import Config


class ConfigError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers, as YAML 1.2 has it: a SLURM time
    such as `24:00:00` stays a string instead of becoming 86400."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {c: [(t, rx) for t, rx in v if t not in (_INT, _FLOAT)]
                                   for c, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                               r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
                                                 r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                                                 r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _keys(cls) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += [f"{f.name}.{k}" for k in _keys(t)]
        else:
            out.append(f.name)
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not near:  # also try matching the last component alone
        leaf = key.rsplit(".", 1)[-1]
        near = [v for v in valid if v.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [x.rsplit(".", 1)[-1] for x in valid], n=1)]
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint} (run `ctvlp config keys` to list them)")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, args[0], key)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}") from None
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _yaml(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        seq = [_coerce(v, elem, key) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = _yaml(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    return value


# Renamed keys: the old name still works, with a warning naming the new one.
DEPRECATED_KEYS = {"eval.labels": "eval.gold"}


def _apply(obj, data: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        full = f"{prefix}{k}"
        if full in DEPRECATED_KEYS:
            new = DEPRECATED_KEYS[full]
            warnings.warn(f"config key '{full}' is deprecated; use '{new}'", FutureWarning, stacklevel=2)
            k, full = new.rsplit(".", 1)[-1], new
        if k not in names:
            raise _unknown(full, _keys(Config))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"config section '{full}' must be a mapping")
            _apply(getattr(obj, k), v, f"{full}.")
        else:
            setattr(obj, k, _coerce(v, tp, full))


def parse_overrides(items: Iterable[str]) -> dict:
    """['loader.batch_size=4', 'synth.seed=1'] -> nested dict; values parsed as YAML scalars."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        value = _yaml(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def _read_yaml(path: Path, seen: tuple = ()) -> list[dict]:
    """A config file and the files it `include:`s (relative to it, applied first, in order)."""
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle")
    data = _yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    inc = data.pop("include", [])
    out = []
    for rel in [inc] if isinstance(inc, str) else inc:
        out += _read_yaml(path.parent / rel, seen + (path,))
    return out + [data]


def load_config(path: Optional[str | Path] = None, overrides: Iterable[str] = ()) -> Config:
    cfg = Config()
    if path:
        for data in _read_yaml(Path(path)):
            _apply(cfg, data)
    _apply(cfg, parse_overrides(overrides))
    return cfg


def config_from_dict(data: dict) -> Config:
    """The inverse of config_to_dict (how a config travels to Ray / torchrun workers)."""
    cfg = Config()
    _apply(cfg, data)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def valid_keys() -> list[str]:
    return _keys(Config)
