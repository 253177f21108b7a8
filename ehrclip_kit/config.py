"""Typed dataclass configs <-> JSON, shared by every component.

Each component owns a small ``@dataclass`` config (``TrainConfig``, a data config, ...). Notebooks override
fields, the CLI fills the same dataclass, and the config is saved as JSON beside every checkpoint.
These helpers do the round trip, including nested dataclasses, tuples and paths:

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Inner:
...     dims: tuple[int, ...] = (1, 2)
>>> @dataclass
... class Outer:
...     name: str = "x"
...     inner: Inner = field(default_factory=Inner)
>>> d = to_dict(Outer())
>>> d
{'name': 'x', 'inner': {'dims': [1, 2]}}
>>> from_dict(Outer, d) == Outer()
True
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

from ehrclip_kit.io import write_json

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    """Turn a dataclass (possibly nested, or a dict/list of them) into JSON-ready Python objects.

    Tuples become lists, paths become strings, enums their values.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if isinstance(cfg, enum.Enum):
        return cfg.value
    return cfg


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Coerce a JSON value to the annotated type ``tp`` where it matters (dataclasses, tuples, paths)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # Optional[X] / X | Y: take the first member that accepts the value without error.
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        for member in members:
            if dataclasses.is_dataclass(member) and isinstance(value, dict):
                return from_dict(member, value, _where=where)
        for member in members:
            try:
                return _convert(member, value, where)
            except (TypeError, ValueError):
                continue
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, _where=where)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) == len(value):
            return tuple(
                _convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        return tuple(value)
    if origin is list and isinstance(value, list | tuple):
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(val_tp, v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp is Path or tp is os.PathLike:
        return Path(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved field types; a field whose annotation cannot be resolved (a class defined in a function)
    falls back to the type of its default, so nested dataclass defaults still round-trip."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        pass
    hints: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        hints[f.name] = type(default) if dataclasses.is_dataclass(default) else Any
    return hints


def from_dict(cls: type[T], d: dict[str, Any], strict: bool = False, _where: str | None = None) -> T:
    """Build dataclass ``cls`` from a dict (e.g. parsed JSON), recursing into nested dataclass fields.

    Missing keys take the field default (a field without default is an error naming it). Unknown keys are
    ignored with a warning, or raise ``ValueError`` when ``strict`` (configs saved by a newer version of the
    kit then still load).
    """
    where = _where or cls.__name__
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{where}: {cls!r} is not a dataclass")
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a dict, got {type(d).__name__}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        msg = f"{where}: unknown config keys {unknown}; known: {sorted(fields)}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + " (ignored)", stacklevel=2)
    kwargs = {}
    for name, f in fields.items():
        if name in d:
            kwargs[name] = _convert(hints.get(name, Any), d[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{where}: required config key {name!r} is missing")
    return cls(**kwargs)


def save_config(path: str | os.PathLike, cfg: Any) -> None:
    """Write a dataclass config (or a dict of them) as JSON, atomically."""
    write_json(path, to_dict(cfg))


def load_config(path: str | os.PathLike, cls: type[T], strict: bool = False) -> T:
    """Read a JSON file written by :func:`save_config` back into dataclass ``cls``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return from_dict(cls, data, strict=strict, _where=f"{path}")
