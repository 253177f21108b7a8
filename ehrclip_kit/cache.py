"""A small on-disk cache for expensive, deterministic results (UMAP layouts, SHAP values, note embeddings).

``disk_cache(cache_dir, key_parts, compute)`` hashes ``key_parts`` (arrays, frames, dataclasses, plain
values), returns the stored result when that hash was computed before, and otherwise calls ``compute()``
and stores what it returns. Stored kinds: numpy arrays (``.npy``), pandas DataFrames / Series
(``.parquet``), JSON-able values (``.json``), and a ``dict`` of those (a folder). Files are written
atomically through :mod:`ehrclip_kit.io`, so an interrupted run never leaves a half-written entry.

The cache folder defaults to ``$EHRCLIP_CACHE`` or ``./.cache/ehrclip``. Delete it freely: every entry is
recomputed on demand.

>>> import tempfile, numpy as np
>>> d = tempfile.mkdtemp()
>>> calls = []
>>> f = lambda: calls.append(1) or np.arange(3)
>>> disk_cache(d, {"what": "demo", "x": np.ones(2)}, f).tolist()
[0, 1, 2]
>>> disk_cache(d, {"what": "demo", "x": np.ones(2)}, f).tolist(), len(calls)
([0, 1, 2], 1)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ehrclip_kit.io import atomic_dir, atomic_path, write_json

T = TypeVar("T")

# Bump when the on-disk layout or the hashing changes, so old entries are simply not found.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$EHRCLIP_CACHE`` when set, else ``./.cache/ehrclip`` (relative to the working directory)."""
    return Path(os.environ.get("EHRCLIP_CACHE") or Path(".cache") / "ehrclip")


def _feed(h: Any, obj: Any, where: str) -> None:
    """Feed a canonical, type-tagged byte form of ``obj`` into the hash ``h``."""
    if obj is None or isinstance(obj, bool | str):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, int | np.integer):
        h.update(f"int:{int(obj)};".encode())
    elif isinstance(obj, float | np.floating):
        # repr of a float round-trips exactly; nan has a single spelling
        h.update(f"float:{'nan' if math.isnan(obj) else repr(float(obj))};".encode())
    elif isinstance(obj, Path):
        h.update(f"path:{obj};".encode())
    elif isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype == object:
            raise TypeError(f"cache key {where!r}: object arrays cannot be hashed stably; convert them first")
        h.update(f"ndarray:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    elif isinstance(obj, pd.DataFrame):
        h.update(f"frame:{list(map(str, obj.columns))}:{[str(t) for t in obj.dtypes]}:{obj.shape};".encode())
        h.update(pd.util.hash_pandas_object(obj, index=True).to_numpy().tobytes())
    elif isinstance(obj, pd.Series):
        h.update(f"series:{obj.name!r}:{obj.dtype}:{len(obj)};".encode())
        h.update(pd.util.hash_pandas_object(obj, index=True).to_numpy().tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dataclass:{type(obj).__qualname__};".encode())
        _feed(h, dataclasses.asdict(obj), where)
    elif isinstance(obj, dict):
        h.update(f"dict:{len(obj)};".encode())
        for key in sorted(obj, key=str):
            _feed(h, str(key), where)
            _feed(h, obj[key], f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__}:{len(obj)};".encode())
        for i, item in enumerate(obj):
            _feed(h, item, f"{where}[{i}]")
    elif hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor, without importing torch here
        _feed(h, obj.detach().cpu().numpy(), where)
    else:
        raise TypeError(
            f"cache key {where!r}: cannot hash a {type(obj).__name__}; use arrays, frames, dataclasses, "
            "dicts, lists or plain values"
        )


def stable_hash(key_parts: Any) -> str:
    """A hex sha256 of ``key_parts`` that is the same across processes and machines.

    >>> stable_hash({"a": 1, "b": [1.5, "x"]}) == stable_hash({"b": [1.5, "x"], "a": 1})
    True
    >>> stable_hash({"a": 1}) == stable_hash({"a": 1.0})
    False
    """
    h = hashlib.sha256(f"ehrclip-cache-v{CACHE_FORMAT};".encode())
    _feed(h, key_parts, "key_parts")
    return h.hexdigest()


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("disk_cache cannot store object arrays")
        return "npy"
    if isinstance(value, pd.DataFrame):
        return "frame"
    if isinstance(value, pd.Series):
        return "series"
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"disk_cache cannot store a {type(value).__name__}: return arrays, frames, series, JSON-able "
            "values or a dict of those"
        ) from err
    return "json"


def _save_one(path: Path, value: Any, kind: str) -> None:
    with atomic_path(path) as tmp:
        if kind == "npy":
            with open(tmp, "wb") as fh:
                np.save(fh, value, allow_pickle=False)
        elif kind == "frame":
            value.to_parquet(tmp, index=True)
        elif kind == "series":
            name = "__value__" if value.name is None else str(value.name)
            value.to_frame(name).to_parquet(tmp, index=True)
        else:
            tmp.write_text(json.dumps(value))


def _load_one(path: Path, kind: str, series_name: Any = None) -> Any:
    if kind == "npy":
        return np.load(path, allow_pickle=False)
    if kind == "frame":
        return pd.read_parquet(path)
    if kind == "series":
        frame = pd.read_parquet(path)
        series = frame.iloc[:, 0]
        series.name = series_name
        return series
    return json.loads(path.read_text())


_SUFFIX = {"npy": ".npy", "frame": ".parquet", "series": ".parquet", "json": ".json"}


def _entry_path(cache_dir: Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "item"
    return cache_dir / f"{safe}-{key[:32]}"


def disk_cache(
    cache_dir: str | os.PathLike | None,
    key_parts: dict[str, Any],
    compute: Callable[[], T],
    *,
    name: str = "item",
    refresh: bool = False,
) -> T:
    """Return ``compute()``'s result, from disk when the same ``key_parts`` were computed before.

    Args:
        cache_dir: folder for the entries; ``None`` uses :func:`default_cache_dir`.
        key_parts: everything the result depends on (inputs, parameters, a version string of the method).
            Arrays are hashed by their bytes, frames with ``pandas.util.hash_pandas_object``, dataclasses
            through ``asdict``.
        compute: zero-argument callable producing an array, a DataFrame, a Series, a JSON-able value, or a
            ``dict[str, ...]`` of those.
        name: a readable prefix for the entry on disk (``umap``, ``shap``...).
        refresh: recompute and overwrite even when an entry exists.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    key = stable_hash(key_parts)
    base = _entry_path(cache_dir, name, key)
    meta_path = base.with_suffix(".meta.json")
    if not refresh and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return _load(base, meta)
    value = compute()
    _store(base, meta_path, key, value)
    return value


def _load(base: Path, meta: dict) -> Any:
    if meta["kind"] == "dict":
        return {
            k: _load_one(base / f"{i}{_SUFFIX[kind]}", kind, meta["series_names"].get(k))
            for i, (k, kind) in enumerate(meta["items"].items())
        }
    return _load_one(base.with_suffix(_SUFFIX[meta["kind"]]), meta["kind"], meta.get("series_name"))


def _series_name(value: Any) -> Any:
    return value.name if isinstance(value, pd.Series) and isinstance(value.name, str | int | float) else None


def _store(base: Path, meta_path: Path, key: str, value: Any) -> None:
    if isinstance(value, dict) and any(
        isinstance(v, np.ndarray | pd.DataFrame | pd.Series) for v in value.values()
    ):
        kinds = {str(k): _kind(v) for k, v in value.items()}
        with atomic_dir(base) as tmp:
            for i, (k, v) in enumerate(value.items()):
                _save_one(tmp / f"{i}{_SUFFIX[kinds[str(k)]]}", v, kinds[str(k)])
        meta = {
            "key": key,
            "kind": "dict",
            "items": kinds,
            "series_names": {str(k): _series_name(v) for k, v in value.items()},
        }
    else:
        kind = _kind(value)
        _save_one(base.with_suffix(_SUFFIX[kind]), value, kind)
        meta = {"key": key, "kind": kind, "series_name": _series_name(value)}
    # The meta file is written last: an entry only counts once all its data is on disk.
    write_json(meta_path, meta)
