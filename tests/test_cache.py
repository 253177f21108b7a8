"""disk_cache: stable keys, reuse without recomputation, recomputation on any key change, atomic entries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from ehrclip_kit.cache import default_cache_dir, disk_cache, stable_hash


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


@dataclasses.dataclass
class Cfg:
    n: int = 3
    name: str = "x"


def test_second_call_reuses_and_different_keys_recompute(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    compute = Counter(np.full((3, 2), 7.0))
    first = disk_cache(tmp_path, {"x": x, "cfg": Cfg()}, compute, name="umap")
    again = disk_cache(
        tmp_path, {"cfg": Cfg(), "x": x.copy()}, compute, name="umap"
    )  # same content, key order
    assert compute.calls == 1
    np.testing.assert_array_equal(first, again)
    x2 = x.copy()
    x2[0, 0] += 1e-3  # one changed byte of the data
    disk_cache(tmp_path, {"x": x2, "cfg": Cfg()}, compute, name="umap")
    disk_cache(tmp_path, {"x": x, "cfg": Cfg(n=4)}, compute, name="umap")  # a changed dataclass field
    disk_cache(tmp_path, {"x": x.astype(np.float64), "cfg": Cfg()}, compute, name="umap")  # dtype matters
    assert compute.calls == 4
    disk_cache(tmp_path, {"x": x, "cfg": Cfg()}, compute, name="umap", refresh=True)
    assert compute.calls == 5


def test_frames_series_json_and_dicts_round_trip(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]}, index=[10, 20])
    series = pd.Series([0.5, 0.25], index=["f1", "f2"], name="imp")
    payload = {
        "values": frame,
        "output": np.array([1.0, 2.0]),
        "base_value": 0.5,
        "method": "kernel",
        "imp": series,
    }
    compute = Counter(payload)
    disk_cache(tmp_path, {"k": 1}, compute, name="shap")
    got = disk_cache(tmp_path, {"k": 1}, compute, name="shap")
    assert compute.calls == 1
    pd.testing.assert_frame_equal(got["values"], frame)
    pd.testing.assert_series_equal(got["imp"], series)
    np.testing.assert_array_equal(got["output"], payload["output"])
    assert got["base_value"] == 0.5 and got["method"] == "kernel"
    js = Counter({"auroc": 0.7, "n": [1, 2]})
    assert disk_cache(tmp_path, {"k": "json"}, js) == disk_cache(tmp_path, {"k": "json"}, js) == js.value
    assert js.calls == 1


def test_frame_keys_hash_content_not_identity():
    a = pd.DataFrame({"x": [1, 2, 3], "y": [0.1, 0.2, 0.3]})
    assert stable_hash({"f": a}) == stable_hash({"f": a.copy()})
    b = a.copy()
    b.loc[2, "y"] = 0.31
    assert stable_hash({"f": a}) != stable_hash({"f": b})
    assert stable_hash({"f": a}) != stable_hash({"f": a.rename(columns={"y": "z"})})
    assert stable_hash([1, 2]) != stable_hash((1, 2))


def test_failed_compute_leaves_no_entry(tmp_path):
    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        disk_cache(tmp_path, {"k": 1}, boom)
    assert list(tmp_path.iterdir()) == []
    compute = Counter(np.ones(2))
    disk_cache(tmp_path, {"k": 1}, compute)
    assert compute.calls == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unhashable_and_unstorable_values_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="key_parts.model"):
        stable_hash({"model": object()})
    with pytest.raises(TypeError, match="cannot store"):
        disk_cache(tmp_path, {"k": 2}, lambda: object())


def test_default_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EHRCLIP_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    compute = Counter(np.zeros(3))
    disk_cache(None, {"k": 3}, compute)
    assert any((tmp_path / "c").iterdir())
    monkeypatch.delenv("EHRCLIP_CACHE")
    assert str(default_cache_dir()).endswith(".cache/ehrclip")
