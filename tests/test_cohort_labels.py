"""Hand-built tiny MIMIC-IV folders: label edge cases, prediction-time windows and bad input.

Each test writes only the tables and columns the recipe needs, with times chosen on the boundaries of
the label definitions (data_recipes/mimic_iv/README.md), then runs the real recipe on them.
"""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from ehrclip_kit.data.recipes import CohortInputError, build_cohort, run
from ehrclip_kit.data.splits import assign_splits

T = pd.Timestamp
COLUMNS = {
    "hosp/patients": ["subject_id", "gender", "anchor_age", "anchor_year"],
    "hosp/admissions": ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                        "race", "hospital_expire_flag"],
    "hosp/diagnoses_icd": ["subject_id", "hadm_id", "icd_code", "icd_version"],
    "hosp/procedures_icd": ["subject_id", "hadm_id", "chartdate"],
    "hosp/labevents": ["subject_id", "hadm_id", "itemid", "charttime", "valuenum"],
    "hosp/prescriptions": ["subject_id", "hadm_id", "starttime", "drug"],
    "icu/icustays": ["subject_id", "hadm_id", "stay_id", "intime", "outtime"],
}  # fmt: skip


def adm(subject, hadm, admit, disch, death=None, expired=0, race="WHITE"):
    return dict(subject_id=subject, hadm_id=hadm, admittime=T(admit), dischtime=T(disch) if disch else None,
                deathtime=T(death) if death else None, admission_type="EW EMER.", race=race,
                hospital_expire_flag=expired)  # fmt: skip


def write_world(root, tables: dict[str, list[dict]], drop_columns: dict[str, str] | None = None):
    """Write ``root/{hosp,icu}/*.csv.gz`` from row dicts; every table in COLUMNS exists (maybe empty)."""
    subjects = {r["subject_id"] for r in tables["hosp/admissions"]}
    tables = {"hosp/patients": [dict(subject_id=s, gender="F", anchor_age=60, anchor_year=2150) for s in subjects]}
    tables |= {k: v for k, v in _tables.items()} if False else {}
    return root


def make_world(root, tables: dict[str, list[dict]], drop_columns: dict[str, str] | None = None):
    subjects = sorted({r["subject_id"] for r in tables["hosp/admissions"]})
    rows = {"hosp/patients": [dict(subject_id=s, gender="F", anchor_age=60, anchor_year=2150) for s in subjects]}
    rows |= tables
    for name, cols in COLUMNS.items():
        frame = pd.DataFrame(rows.get(name, []), columns=cols)
        if drop_columns and name in drop_columns:
            frame = frame.drop(columns=drop_columns[name])
        path = root / f"{name}.csv.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False, compression="gzip")
    return root


def labels(out, task):
    frame = pd.read_parquet(out / f"{task}.parquet")
    return dict(zip(frame.hadm_id, frame.label, strict=True))


def attrition(out):
    frame = pd.read_csv(out / "attrition.csv")
    return {(r.task, r.step): r.n_excluded for r in frame.itertuples()}


def test_readmission_labels_on_the_boundaries(tmp_path):
    d = T("2150-01-05 10:00")
    admissions = [
        adm(1, 101, "2150-01-01 08:00", d), adm(1, 102, d + pd.Timedelta(days=30), "2150-02-10"),  # day 30: 1
        adm(2, 201, "2150-01-01 08:00", d), adm(2, 202, d + pd.Timedelta(days=31), "2150-02-10"),  # day 31: 0
        adm(3, 301, "2150-01-01 08:00", d), adm(3, 302, d, "2150-01-09"),  # transfer at dischtime: 0
        adm(4, 401, "2150-01-01 08:00", d), adm(4, 402, d + pd.Timedelta(minutes=1), "2150-01-09"),  # 1
        adm(5, 501, "2150-01-01 08:00", d),  # readmitted into a stay that ends in death: still 1
        adm(5, 502, "2150-01-20", "2150-01-25", death="2150-01-25", expired=1),
        adm(6, 601, "2150-01-01 08:00", None),  # no dischtime: not an index admission
    ]  # fmt: skip
    out = tmp_path / "out"
    build_cohort(make_world(tmp_path / "w", {"hosp/admissions": admissions}), out, verbose=False)
    expected = {101: 1, 102: 0, 201: 0, 202: 0, 301: 0, 302: 0, 401: 1, 402: 0, 501: 1}
    assert labels(out, "readmission_30d") == expected
    steps = attrition(out)
    assert steps[("readmission_30d", "in_hospital_death")] == 1
    assert steps[("readmission_30d", "missing_dischtime")] == 1


def test_critical_eligibility_and_labels(tmp_path):
    a = T("2150-03-01 06:00")
    t0 = a + pd.Timedelta(hours=24)
    minute = pd.Timedelta(minutes=1)
    admissions = [
        adm(1, 11, a, t0 + pd.Timedelta(hours=6), death=a + pd.Timedelta(hours=20), expired=1),  # died < t0
        adm(2, 21, a, t0 + pd.Timedelta(days=3)),  # ICU exactly at t0: excluded
        adm(3, 31, a, t0 + pd.Timedelta(days=3)),  # ICU one minute after t0: 1
        adm(4, 41, a, t0 + pd.Timedelta(days=3), death=t0 + pd.Timedelta(days=3), expired=1),  # dies: 1
        adm(5, 51, a, t0 + pd.Timedelta(days=3)),  # nothing happens: 0
        adm(6, 61, a, t0),  # discharged exactly at t0: excluded
        adm(7, 71, a, t0 + pd.Timedelta(days=3)),  # ICU after discharge: not "in (t0, dischtime]": 0
    ]  # fmt: skip
    icu = [
        dict(subject_id=2, hadm_id=21, stay_id=1, intime=t0, outtime=t0 + pd.Timedelta(days=1)),
        dict(subject_id=3, hadm_id=31, stay_id=2, intime=t0 + minute, outtime=t0 + pd.Timedelta(days=1)),
        dict(subject_id=7, hadm_id=71, stay_id=3, intime=t0 + pd.Timedelta(days=4), outtime=None),
    ]
    out = tmp_path / "out"
    world = make_world(tmp_path / "w", {"hosp/admissions": admissions, "icu/icustays": icu})
    build_cohort(world, out, verbose=False)
    assert labels(out, "critical_24h") == {31: 1, 41: 1, 51: 0, 71: 0}
    steps = attrition(out)
    assert steps[("critical_24h", "died_by_t0")] == 1
    assert steps[("critical_24h", "icu_by_t0")] == 1
    assert steps[("critical_24h", "discharged_by_t0")] == 1


def _window_world(extra: bool):
    """Two admissions of one subject; with ``extra``, events planted after each task's prediction time."""
    a = T("2150-05-01 10:00")
    t0, disch = a + pd.Timedelta(hours=24), a + pd.Timedelta(days=5)
    admissions = [adm(1, 11, "2149-12-01 10:00", "2149-12-05 10:00"), adm(1, 12, a, disch)]
    dx = [dict(subject_id=1, hadm_id=11, icd_code="4280", icd_version=9),  # CHF coded at the earlier stay
          dict(subject_id=1, hadm_id=12, icd_code="E119", icd_version=10)]  # diabetes, coded at discharge
    labs = [dict(subject_id=1, hadm_id=12, itemid=50912, charttime=a + pd.Timedelta(hours=2), valuenum=1.0),
            dict(subject_id=1, hadm_id=None, itemid=50912, charttime=a + pd.Timedelta(hours=3), valuenum=2.0)]
    rx = [dict(subject_id=1, hadm_id=12, starttime=a + pd.Timedelta(hours=1), drug="Aspirin")]
    icu = []
    px = [dict(subject_id=1, hadm_id=12, chartdate=a.date())]
    if extra:
        for when in (t0 + pd.Timedelta(minutes=1), disch + pd.Timedelta(minutes=1)):  # after t0; after dischtime
            labs += [dict(subject_id=1, hadm_id=12, itemid=50912, charttime=when, valuenum=9.0),
                     dict(subject_id=1, hadm_id=None, itemid=51006, charttime=when, valuenum=99.0),
                     dict(subject_id=1, hadm_id=12, itemid=50963, charttime=when, valuenum=5000.0)]
            rx.append(dict(subject_id=1, hadm_id=12, starttime=when, drug="Furosemide"))
        icu.append(dict(subject_id=1, hadm_id=12, stay_id=5, intime=t0 + pd.Timedelta(hours=1), outtime=disch))
        px.append(dict(subject_id=1, hadm_id=12, chartdate=t0.date()))  # the day of t0 has not ended at t0
    return {"hosp/admissions": admissions, "hosp/diagnoses_icd": dx, "hosp/labevents": labs,
            "hosp/prescriptions": rx, "icu/icustays": icu, "hosp/procedures_icd": px}  # fmt: skip


def test_events_after_the_prediction_time_change_no_feature(tmp_path):
    runs = {}
    for extra in (False, True):
        out = tmp_path / f"out{extra}"
        build_cohort(make_world(tmp_path / f"w{extra}", _window_world(extra)), out, max_missing=1.0, verbose=False)
        runs[extra] = {t: pd.read_parquet(out / f"{t}.parquet").set_index("hadm_id") for t in ("critical_24h", "readmission_30d")}
    base, planted = runs[False]["critical_24h"], runs[True]["critical_24h"]
    assert list(base.index) == [12]  # the earlier stay (11) has no labs before its own t0... but is eligible too?
    pd.testing.assert_frame_equal(base.drop(columns="label"), planted.drop(columns="label"))
    row = base.loc[12]
    assert row.lab_creatinine_count == 2 and row.lab_creatinine_first == 1.0 and row.lab_creatinine_last == 2.0
    assert row.dx_chf == 1 and row.dx_diab == 0  # earlier stay's codes only; its own codes come at discharge
    assert row.med_antiplatelet == 1 and row.med_loop_diuretic == 0 and row.n_procedures == 1
    # Sanity: the same planted rows before dischtime DO reach the readmission features (the test has teeth).
    readm, readm_planted = runs[False]["readmission_30d"].loc[12], runs[True]["readmission_30d"].loc[12]
    assert readm.dx_diab == 1 and readm_planted.lab_creatinine_count == readm.lab_creatinine_count + 1
    assert readm_planted.lab_creatinine_last == 9.0 and readm_planted.med_loop_diuretic == 1
    assert readm_planted.lab_ntprobnp_count == 1 and readm_planted.n_icu_stays == 1
    assert readm_planted.lab_urea_nitrogen_max == 99.0  # the hadm-less row inside the window is linked
