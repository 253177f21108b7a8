"""Shared test fixtures: a tiny synthetic cohort in the cohort-folder format, built in code.

``tiny_cohort`` returns ``(frame, features_spec)`` shaped like ``OUT/<task>.parquet`` + ``features.json``:
subject_id, hadm_id, split (hash of subject_id), label, 12 numeric columns with NaNs and 3 categorical code
columns (0 = unknown). The label depends non-linearly on a latent severity ``z`` that several columns proxy
(linearly, through a log-normal, through z**2 and through a binned stage), so a model that reads the
features well beats chance by a wide margin, while pure-noise columns and informative missingness keep it
from being trivial.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrclip_kit.data.splits import assign_splits

CATEGORIES = {
    "stage": ["__unknown__", "I", "II", "III", "IV"],
    "sex": ["__unknown__", "F", "M"],
    "unit": ["__unknown__", "med", "surg", "card", "neuro", "never_used"],
}


def make_tiny_cohort(n: int = 1200, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)  # latent severity: drives the label
    u = rng.standard_normal(n)  # a second, weaker latent
    num = {
        "lab_a": 10 + 2 * z + 0.5 * rng.standard_normal(n),
        "lab_b": np.exp(0.5 * z + 0.3 * rng.standard_normal(n)),
        "lab_c": -z + 0.7 * rng.standard_normal(n),
        "lab_d": z**2 + 0.5 * rng.standard_normal(n),
        "lab_e": u + 0.5 * rng.standard_normal(n),
        "lab_f": 3 * u - z + rng.standard_normal(n),
        "age": 65 + 12 * rng.standard_normal(n),
    }
    for i in range(5):
        num[f"noise_{i}"] = rng.standard_normal(n) * (i + 1) + 10 * i
    num["noise_4"][rng.integers(0, n, 3)] = 1e6  # a few absurd outliers: standardisation must clip them
    for name in ("lab_a", "lab_c", "lab_e", "noise_0"):
        num[name][rng.random(n) < 0.1] = np.nan  # missing completely at random
    num["lab_b"][rng.random(n) < np.where(z > 1, 0.5, 0.05)] = np.nan  # informative missingness
    stage = 1 + np.digitize(z + 0.5 * rng.standard_normal(n), [-0.5, 0.5, 1.5])
    stage[rng.random(n) < 0.05] = 0
    cats = {
        "stage": stage,
        "sex": rng.integers(1, 3, n),
        "unit": rng.integers(0, 5, n),  # code 5 ("never_used") never appears
    }
    logit = 1.2 * z + 0.8 * (z**2 - 1) + 0.5 * u - 0.8
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    subject_id = 10_000_000 + np.arange(n)
    frame = pd.DataFrame(
        {"subject_id": subject_id, "hadm_id": 20_000_000 + np.arange(n), "split": assign_splits(subject_id)}
    )
    frame["label"] = label
    for name, values in num.items():
        frame[name] = values.astype(np.float32)
    for name, values in cats.items():
        frame[name] = values.astype(np.int64)
    spec = {
        "features": [{"name": k, "kind": "numeric", "source": "synthetic/labevents"} for k in num]
        + [{"name": k, "kind": "categorical", "source": "synthetic/admissions", "categories": v}
           for k, v in CATEGORIES.items()]
    }  # fmt: skip
    return frame, spec


@pytest.fixture
def tiny_cohort() -> tuple[pd.DataFrame, dict]:
    """(frame, features_spec) of ~1200 admissions; a fresh copy per test."""
    return make_tiny_cohort()


@pytest.fixture
def splits(tiny_cohort):
    """{"train": frame, "val": frame, "test": frame} of the tiny cohort, plus "spec"."""
    frame, spec = tiny_cohort
    out = {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    out["spec"] = spec
    return out


# Note embeddings are cached on disk by content hash (ehrclip_kit.text_cache): tests and the CLI processes
# they start share one cache, so every distinct note set is embedded by MiniLM once per checkout.
NOTE_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "ehrclip-tests"
os.environ.setdefault("EHRCLIP_CACHE", str(NOTE_CACHE))


@pytest.fixture(scope="session")
def note_cache() -> Path:
    return Path(os.environ["EHRCLIP_CACHE"])
