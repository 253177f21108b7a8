"""The cohort recipe on the real MIMIC-IV demo (skipped when absent) and on a synthetic world.

Labels and lab features are recomputed here with plain pandas, straight from the label definitions in
data_recipes/mimic_iv/README.md, and must agree with what the DuckDB recipe wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrclip_kit.data import features as catalogue
from ehrclip_kit.data.recipes import TASKS, build_cohort

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = DATA / "mimic-iv-demo"
LEAKERS = {"deathtime", "hospital_expire_flag", "discharge_location", "dischtime", "admittime", "edregtime",
           "edouttime", "dod", "stay_id", "anchor_year", "anchor_year_group", "admit_provider_id", "subject_id",
           "hadm_id", "label", "split"}  # fmt: skip


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory):
    if not (DEMO / "hosp" / "admissions.csv.gz").is_file():
        pytest.skip(f"MIMIC-IV demo not found at {DEMO}")
    out = tmp_path_factory.mktemp("demo") / "cohort"
    summary = build_cohort(DEMO, out, verbose=False)
    return out, summary


def _admissions():
    adm = pd.read_csv(
        DEMO / "hosp" / "admissions.csv.gz", parse_dates=["admittime", "dischtime", "deathtime", "edregtime"]
    )
    icu = pd.read_csv(DEMO / "icu" / "icustays.csv.gz", parse_dates=["intime"])
    return adm, icu


def expected_labels() -> dict[str, pd.Series]:
    """Independent pandas version of the two label definitions (hadm_id -> label)."""
    adm, icu = _admissions()
    index = adm[(adm.hospital_expire_flag == 0) & adm.dischtime.notna()]
    pairs = index.merge(adm[["subject_id", "hadm_id", "admittime"]], on="subject_id", suffixes=("", "_other"))
    pairs = pairs[pairs.hadm_id_other != pairs.hadm_id]
    hit = (pairs.admittime_other > pairs.dischtime) & (
        pairs.admittime_other <= pairs.dischtime + pd.Timedelta(days=30)
    )
    readmitted = set(pairs.loc[hit, "hadm_id"])
    readmission = pd.Series({h: int(h in readmitted) for h in index.hadm_id}).sort_index()

    adm["t0"] = adm.admittime + pd.Timedelta(hours=24)
    stays = icu.merge(adm[["hadm_id", "t0", "dischtime"]], on="hadm_id")
    early = set(stays.loc[stays.intime <= stays.t0, "hadm_id"])
    late = set(stays.loc[(stays.intime > stays.t0) & (stays.intime <= stays.dischtime), "hadm_id"])
    ok = (
        (adm.dischtime > adm.t0)
        & (adm.deathtime.isna() | (adm.deathtime > adm.t0))
        & ~adm.hadm_id.isin(early)
    )
    eligible = adm[ok]
    critical = pd.Series(
        ((eligible.hospital_expire_flag == 1) | eligible.hadm_id.isin(late)).astype(int).to_numpy(),
        index=eligible.hadm_id,
    ).sort_index()
    return {"readmission_30d": readmission, "critical_24h": critical}


def expected_lab_features(task: str, hadm_ids) -> pd.DataFrame:
    """Plain pandas: first/last/min/max/mean/count per lab, linked by hadm_id or by subject and time."""
    adm, _ = _admissions()
    adm["t_pred"] = adm.dischtime if task == "readmission_30d" else adm.admittime + pd.Timedelta(hours=24)
    adm["win_start"] = adm[["admittime", "edregtime"]].min(axis=1)
    windows = adm[adm.hadm_id.isin(hadm_ids)][["subject_id", "hadm_id", "t_pred", "win_start"]]
    name = {i: f"lab_{m.name}" for m in catalogue.LABS for i in m.itemids}
    labs = pd.read_csv(DEMO / "hosp" / "labevents.csv.gz", usecols=["subject_id", "hadm_id", "itemid", "charttime", "valuenum"],
                       parse_dates=["charttime"])  # fmt: skip
    labs = labs[labs.itemid.isin(name) & labs.valuenum.notna()].assign(lab=lambda f: f.itemid.map(name))
    linked = (
        labs.dropna(subset=["hadm_id"])
        .astype({"hadm_id": "int64"})
        .merge(windows.drop(columns="subject_id"), on="hadm_id")
    )
    by_time = labs[labs.hadm_id.isna()].drop(columns="hadm_id").merge(windows, on="subject_id")
    by_time = by_time[by_time.charttime >= by_time.win_start]
    linked = pd.concat([linked, by_time])
    linked = linked[linked.charttime <= linked.t_pred].sort_values(["charttime", "valuenum"])
    stats = linked.groupby(["hadm_id", "lab"]).valuenum.agg(["first", "last", "min", "max", "mean", "count"])
    wide = stats.unstack("lab")
    wide.columns = [f"{lab}_{stat}" for stat, lab in wide.columns]
    return wide.reindex(sorted(hadm_ids))


def test_demo_tables_match_independent_label_computation(demo_cohort):
    out, summary = demo_cohort
    for task, expected in expected_labels().items():
        table = pd.read_parquet(out / f"{task}.parquet")
        assert len(table) == len(expected) == summary["tasks"][task]["rows"]
        got = table.set_index("hadm_id").label.sort_index()
        pd.testing.assert_series_equal(got, expected, check_names=False, check_index_type=False)
        assert 0 < got.mean() < 0.5


def test_demo_lab_features_match_pandas(demo_cohort):
    out, _ = demo_cohort
    for task in TASKS:
        table = pd.read_parquet(out / f"{task}.parquet").set_index("hadm_id")
        expected = expected_lab_features(task, table.index)
        lab_cols = [c for c in table.columns if c.startswith("lab_")]
        assert len(lab_cols) == len(catalogue.LABS) * len(catalogue.MEASUREMENT_STATS)
        counts = [c for c in lab_cols if c.endswith("_count")]
        expected[counts] = expected.reindex(columns=counts).fillna(0)
        np.testing.assert_allclose(table[lab_cols].to_numpy(np.float64), expected[lab_cols].to_numpy(np.float64),
                                   rtol=1e-5, equal_nan=True)  # fmt: skip
        assert table.lab_creatinine_count.sum() > 100  # the demo really has creatinine draws in both windows


def test_demo_splits_columns_and_metadata(demo_cohort):
    out, _ = demo_cohort
    meta = json.loads((out / "features.json").read_text())
    names = [f["name"] for f in meta["features"]]
    assert meta["tasks"] == list(TASKS) and meta["source"] == str(DEMO)
    assert 100 <= len(names) <= 200 and not set(names) & LEAKERS
    assert not [n for n in names if "death" in n or "expire" in n or "discharge_location" in n]
    tables = {t: pd.read_parquet(out / f"{t}.parquet") for t in TASKS}
    both = pd.concat(tables.values())
    assert both.groupby("subject_id").split.nunique().max() == 1
    assert set(both.split) == {"train", "val", "test"}
    for table in tables.values():
        assert list(table.columns) == ["subject_id", "hadm_id", "split", "label", *names]
        assert table.hadm_id.is_unique
        for f in meta["features"]:
            if f["kind"] == "categorical":
                assert f["categories"][0] == "__unknown__"
                assert table[f["name"]].dtype == "int64"
                assert table[f["name"]].between(0, len(f["categories"]) - 1).all()
            else:
                assert table[f["name"]].dtype == "float32"
    assert (tables["critical_24h"].los_days == 1.0).all() and (tables["critical_24h"].n_icu_stays == 0).all()
    # Attrition: every step's numbers add up and the last n_after is the table's row count.
    att = pd.read_csv(out / "attrition.csv")
    assert (att.n_before - att.n_excluded == att.n_after).all()
    for task in TASKS:
        steps = att[att.task == task]
        assert (steps.n_before.to_numpy()[1:] == steps.n_after.to_numpy()[:-1]).all()
        assert steps.n_after.iloc[-1] == len(tables[task])


def test_synthetic_world_round_trip(tmp_path):
    synthetic = pytest.importorskip("ehrclip_kit.data.synthetic")
    if not hasattr(synthetic, "generate_world"):
        pytest.skip("ehrclip_kit.data.synthetic.generate_world not written yet")
    world = tmp_path / "world"
    synthetic.generate_world(world, n_patients=300, seed=0, text_signal=0.5, ecg=False)
    out = tmp_path / "cohort"
    summary = build_cohort(world, out, verbose=False)
    rates = {t: info["positives"] / info["rows"] for t, info in summary["tasks"].items()}
    assert 0.05 <= rates["readmission_30d"] <= 0.40 and 0.03 <= rates["critical_24h"] <= 0.35, rates
    assert summary["tasks"]["readmission_30d"]["rows"] > 300 and summary["n_features"] >= 80
    notes = pd.read_parquet(out / "notes.parquet")
    assert len(notes) >= 0.9 * pd.read_csv(world / "hosp" / "admissions.csv.gz").shape[0]
    truth = pd.read_parquet(out / "truth.parquet")
    assert set(pd.read_parquet(out / "readmission_30d.parquet").hadm_id) <= set(truth.hadm_id)
