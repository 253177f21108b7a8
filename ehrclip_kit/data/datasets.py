"""Torch datasets over a cohort folder: task tables, their notes and aligned modality arrays.

A cohort folder (``ehrclip cohort``) holds one parquet per task, ``features.json`` and ``notes.parquet``.
Pretraining reads the **train split only**; validation rows are used for early stopping and retrieval
metrics; test rows are touched only by the final evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

TASKS = ("readmission_30d", "critical_24h")


def load_task(cohort: str | Path, task: str) -> tuple[pd.DataFrame, dict]:
    """The task table and ``features.json`` of a cohort folder, with clear errors when missing."""
    cohort = Path(cohort)
    table, spec = cohort / f"{task}.parquet", cohort / "features.json"
    for path in (table, spec):
        if not path.exists():
            known = sorted(p.stem for p in cohort.glob("*.parquet")) if cohort.exists() else []
            raise FileNotFoundError(
                f"{path} not found (task {task!r}; tables in {cohort}: {known}). Build it with `ehrclip cohort`."
            )
    frame = pd.read_parquet(table)
    for column in ("subject_id", "hadm_id", "split", "label"):
        if column not in frame.columns:
            raise KeyError(f"column {column!r} missing from {table}")
    return frame, json.loads(spec.read_text())


def load_notes(cohort: str | Path) -> pd.DataFrame:
    """``notes.parquet`` of a cohort (one cleaned discharge note per admission)."""
    path = Path(cohort) / "notes.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: contrastive EHR-note pretraining needs the notes (--notes)"
        )
    notes = pd.read_parquet(path)
    for column in ("hadm_id", "text"):
        if column not in notes.columns:
            raise KeyError(f"column {column!r} missing from {path}")
    return notes


def with_notes(frame: pd.DataFrame, notes: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``frame`` that have a note, with a ``text`` column (admissions without a note are dropped).

    >>> f = pd.DataFrame({"hadm_id": [1, 2], "x": [0.5, 0.7]})
    >>> with_notes(f, pd.DataFrame({"hadm_id": [2], "text": ["chf"]}))[["hadm_id", "text"]].values.tolist()
    [[2, 'chf']]
    """
    one_per_admission = notes.drop_duplicates("hadm_id", keep="last")[["hadm_id", "text"]]
    return frame.merge(one_per_admission, on="hadm_id", how="inner", validate="one_to_one")


class PairedArrays(Dataset):
    """Row i is ``{name: tensor(arrays[name][i])}``; every array has the same number of rows.

    The default collate stacks these into the batch dict a :class:`~ehrclip_kit.models.ContrastiveModel`
    takes (``{"ehr": (B, D), "text": (B, d_text)}``).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"PairedArrays needs arrays of equal length, got {lengths}")
        self.arrays = {k: torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.arrays.items()}
