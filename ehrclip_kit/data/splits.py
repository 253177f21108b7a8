"""Patient-level splits from a deterministic hash of ``subject_id``.

The hash (sha256 of a salt and the id) does not depend on row order, on which other patients are present
or on the library versions, so a subject lands in the same split in every cohort, task and run.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
DEFAULT_SALT = "ehrclip"


def subject_unit_interval(subject_id: int, salt: str = DEFAULT_SALT) -> float:
    """Map a subject id to a stable number in [0, 1).

    >>> subject_unit_interval(10000032) == subject_unit_interval(10000032)
    True
    """
    digest = hashlib.sha256(f"{salt}:{int(subject_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    subject_ids, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, salt: str = DEFAULT_SALT
) -> np.ndarray:
    """Return the split name ("train", "val", "test") of each subject id.

    >>> assign_splits([1, 1, 2]).tolist()[0] == assign_splits([1]).tolist()[0]
    True
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ids = pd.Series(subject_ids).astype("int64")
    unique = ids.drop_duplicates()
    u = np.array([subject_unit_interval(s, salt) for s in unique])
    edges = np.cumsum(fractions)
    names = np.array(SPLITS)[np.searchsorted(edges[:2], u, side="right")]
    lookup = dict(zip(unique.tolist(), names.tolist(), strict=True))
    return ids.map(lookup).to_numpy(dtype=object)
