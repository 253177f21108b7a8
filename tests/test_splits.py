from __future__ import annotations

import numpy as np
import pytest

from ehrclip_kit.data.splits import assign_splits


def test_split_is_a_function_of_the_subject_only():
    ids = np.arange(5000)
    full = dict(zip(ids, assign_splits(ids), strict=True))
    shuffled = np.random.default_rng(0).permutation(ids)[:1000]
    assert all(full[s] == v for s, v in zip(shuffled, assign_splits(shuffled), strict=True))
    repeated = assign_splits(np.repeat(ids[:50], 3)).reshape(50, 3)
    assert (repeated == repeated[:, :1]).all()


def test_fractions_are_respected():
    names, counts = np.unique(assign_splits(np.arange(20000), fractions=(0.7, 0.1, 0.2)), return_counts=True)
    share = dict(zip(names, counts / counts.sum(), strict=True))
    assert (
        abs(share["train"] - 0.7) < 0.02
        and abs(share["val"] - 0.1) < 0.015
        and abs(share["test"] - 0.2) < 0.02
    )


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="fractions"):
        assign_splits([1, 2], fractions=(0.5, 0.5, 0.5))
