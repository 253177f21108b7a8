"""Hand-built tiny MIMIC-IV folders: label edge cases, prediction-time windows and bad input.

Each test writes only the tables and columns the recipe needs, with times chosen on the boundaries of
the label definitions (data_recipes/mimic_iv/README.md), then runs the real recipe on them.
"""

from __future__ import annotations

import argparse
import gzip
import json

import pandas as pd
import pytest

from ehrclip_kit.data.recipes import CohortInputError, add_arguments, build_cohort, run
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


def make_world(root, tables: dict[str, list[dict]], drop_columns: dict[str, str] | None = None):
    """Write ``root/{hosp,icu}/*.csv.gz`` from row dicts; every table in COLUMNS exists (maybe empty)."""
    subjects = sorted({r["subject_id"] for r in tables["hosp/admissions"]})
    rows = {
        "hosp/patients": [dict(subject_id=s, gender="F", anchor_age=60, anchor_year=2150) for s in subjects]
    }
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
        adm(7, 701, "2150-01-01 08:00", d),
        adm(7, 702, d + pd.Timedelta(days=30, minutes=1), "2150-02-10"),  # a minute past day 30: 0
    ]  # fmt: skip
    out = tmp_path / "out"
    build_cohort(make_world(tmp_path / "w", {"hosp/admissions": admissions}), out, verbose=False)
    expected = {101: 1, 102: 0, 201: 0, 202: 0, 301: 0, 302: 0, 401: 1, 402: 0, 501: 1, 701: 0, 702: 0}
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
    dx = [
        dict(subject_id=1, hadm_id=11, icd_code="4280", icd_version=9),  # CHF coded at the earlier stay
        dict(subject_id=1, hadm_id=12, icd_code="E119", icd_version=10),
    ]  # diabetes, coded at discharge
    labs = [
        dict(subject_id=1, hadm_id=12, itemid=50912, charttime=a + pd.Timedelta(hours=2), valuenum=1.0),
        dict(subject_id=1, hadm_id=None, itemid=50912, charttime=a + pd.Timedelta(hours=3), valuenum=2.0),
    ]
    rx = [dict(subject_id=1, hadm_id=12, starttime=a + pd.Timedelta(hours=1), drug="Aspirin")]
    icu = []
    px = [dict(subject_id=1, hadm_id=12, chartdate=a.date())]
    if extra:
        for when in (
            t0 + pd.Timedelta(minutes=1),
            disch + pd.Timedelta(minutes=1),
        ):  # after t0; after dischtime
            labs += [
                dict(subject_id=1, hadm_id=12, itemid=50912, charttime=when, valuenum=9.0),
                dict(subject_id=1, hadm_id=None, itemid=51006, charttime=when, valuenum=99.0),
                dict(subject_id=1, hadm_id=12, itemid=50963, charttime=when, valuenum=5000.0),
            ]
            rx.append(dict(subject_id=1, hadm_id=12, starttime=when, drug="Furosemide"))
        icu.append(
            dict(subject_id=1, hadm_id=12, stay_id=5, intime=t0 + pd.Timedelta(hours=1), outtime=disch)
        )
        px.append(dict(subject_id=1, hadm_id=12, chartdate=t0.date()))  # the day of t0 has not ended at t0
    return {"hosp/admissions": admissions, "hosp/diagnoses_icd": dx, "hosp/labevents": labs,
            "hosp/prescriptions": rx, "icu/icustays": icu, "hosp/procedures_icd": px}  # fmt: skip


def test_events_after_the_prediction_time_change_no_feature(tmp_path):
    runs = {}
    for extra in (False, True):
        out = tmp_path / f"out{extra}"
        build_cohort(
            make_world(tmp_path / f"w{extra}", _window_world(extra)), out, max_missing=1.0, verbose=False
        )
        runs[extra] = {
            t: pd.read_parquet(out / f"{t}.parquet").set_index("hadm_id")
            for t in ("critical_24h", "readmission_30d")
        }
    base, planted = runs[False]["critical_24h"], runs[True]["critical_24h"]
    assert list(base.index) == [11, 12]
    pd.testing.assert_frame_equal(base.drop(columns="label"), planted.drop(columns="label"))
    row = base.loc[12]
    assert (
        row.lab_creatinine_count == 2 and row.lab_creatinine_first == 1.0 and row.lab_creatinine_last == 2.0
    )
    assert row.dx_chf == 1 and row.dx_diab == 0  # earlier stay's codes only; its own codes come at discharge
    assert row.med_antiplatelet == 1 and row.med_loop_diuretic == 0 and row.n_procedures == 1
    # Sanity: the same planted rows before dischtime DO reach the readmission features (the test has teeth).
    readm, readm_planted = runs[False]["readmission_30d"].loc[12], runs[True]["readmission_30d"].loc[12]
    assert readm.dx_diab == 1 and readm_planted.lab_creatinine_count == readm.lab_creatinine_count + 1
    assert readm_planted.lab_creatinine_last == 9.0 and readm_planted.med_loop_diuretic == 1
    assert readm_planted.lab_ntprobnp_count == 1 and readm_planted.n_icu_stays == 1
    assert readm_planted.lab_urea_nitrogen_max == 99.0  # the hadm-less row inside the window is linked


def _simple_admissions(subjects):
    return [adm(s, s * 10, "2150-01-01 08:00", "2150-01-04 08:00") for s in subjects]


@pytest.mark.parametrize("broken", ["table", "column"])
def test_missing_input_names_it_and_writes_nothing(tmp_path, broken, capsys):
    world = make_world(tmp_path / "w", {"hosp/admissions": _simple_admissions([1, 2])},
                       drop_columns={"hosp/admissions": "dischtime"} if broken == "column" else None)  # fmt: skip
    if broken == "table":
        (world / "hosp" / "labevents.csv.gz").unlink()
        expected = f"table hosp/labevents missing: expected {world / 'hosp' / 'labevents'}.csv.gz"
    else:
        expected = f"column 'dischtime' missing from {world / 'hosp' / 'admissions.csv.gz'}"
    out = tmp_path / "out"
    with pytest.raises(CohortInputError) as err:
        build_cohort(world, out, verbose=False)
    assert str(err.value) == expected
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["w"]  # no temp leftovers either
    # Through the CLI entry point: exit code 2, the message on stderr, an existing OUT left untouched.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--mimic", str(world), "--out", str(out), "--tasks", "readmission_30d", "--threads", "1"]
    )
    assert run(args) == 2
    assert expected in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_malformed_rows_are_counted_not_silently_dropped(tmp_path):
    admissions = _simple_admissions([1, 2]) + [
        dict(adm(3, 30, "2150-01-01", "2150-01-02"), admittime="yesterday")
    ]
    labs = [
        dict(subject_id=1, hadm_id=10, itemid=50912, charttime="2150-01-02 08:00", valuenum=1.0),
        dict(subject_id=1, hadm_id=10, itemid=50912, charttime="not a time", valuenum=1.5),
        dict(subject_id=1, hadm_id=999, itemid=50912, charttime="2150-01-02 09:00", valuenum=2.0),
    ]
    out = tmp_path / "out"
    build_cohort(make_world(tmp_path / "w", {"hosp/admissions": admissions, "hosp/labevents": labs}), out,
                 verbose=False)  # fmt: skip
    rows = pd.read_csv(out / "attrition.csv").set_index("step")
    assert rows.loc["hosp/admissions", "n_excluded"] == 1
    assert "1 missing or unparsable admittime" in rows.loc["hosp/admissions", "reason"]
    lab = rows.loc["hosp/labevents (catalogued itemids)"]
    assert (lab.n_before, lab.n_excluded, lab.n_after) == (3, 2, 1)
    assert "1 missing or unparsable charttime" in lab.reason and "1 hadm_id not among" in lab.reason
    assert 30 not in labels(out, "readmission_30d")
    assert (
        pd.read_parquet(out / "readmission_30d.parquet").set_index("hadm_id").loc[10, "lab_creatinine_count"]
        == 1
    )


def _subjects_by_split(n=400):
    ids = list(range(1, n))
    split = dict(zip(ids, assign_splits(ids), strict=True))
    return {s: [i for i in ids if split[i] == s] for s in ("train", "val", "test")}


def test_splits_by_subject_and_train_only_categories(tmp_path):
    by_split = _subjects_by_split()
    train, test = by_split["train"][:6], by_split["test"][:2]
    admissions = []
    for s in train + test:  # three admissions each, so a subject appears many times in both tasks
        admissions += [
            adm(s, s * 10 + k, f"2150-0{k + 1}-01 08:00", f"2150-0{k + 1}-05 08:00") for k in range(3)
        ]
    for row in admissions:
        row["race"] = (
            "MARTIAN" if row["subject_id"] in test else ("BLACK" if row["subject_id"] % 2 else "WHITE")
        )
    out = tmp_path / "out"
    build_cohort(make_world(tmp_path / "w", {"hosp/admissions": admissions}), out, verbose=False)
    spec = {f["name"]: f for f in json.loads((out / "features.json").read_text())["features"]}
    assert spec["race"]["categories"] == [
        "__unknown__",
        "BLACK",
        "WHITE",
    ]  # MARTIAN is only in the test split
    for task in ("readmission_30d", "critical_24h"):
        frame = pd.read_parquet(out / f"{task}.parquet")
        assert frame.groupby("subject_id").split.nunique().max() == 1
        assert (frame.split == assign_splits(frame.subject_id)).all()
        assert set(frame.loc[frame.subject_id.isin(test), "race"]) == {0}
        assert set(frame.loc[frame.subject_id.isin(train), "race"]) == {1, 2}
        assert frame.race.dtype == "int64" and frame.age.dtype == "float32"


def test_mostly_missing_features_dropped_and_vitals_optional(tmp_path, capsys):
    admissions = _simple_admissions(range(1, 6))
    labs = [
        dict(subject_id=s, hadm_id=s * 10, itemid=50912, charttime="2150-01-02", valuenum=1.0)
        for s in range(1, 6)
    ]
    tables = {"hosp/admissions": admissions, "hosp/labevents": labs}
    out = tmp_path / "out"
    build_cohort(make_world(tmp_path / "w", tables), out)
    assert "optional table icu/chartevents not found" in capsys.readouterr().out
    meta = json.loads((out / "features.json").read_text())
    names = [f["name"] for f in meta["features"]]
    frame = pd.read_parquet(out / "readmission_30d.parquet")
    assert list(frame.columns) == ["subject_id", "hadm_id", "split", "label", *names]
    dropped = {d["name"] for d in meta["dropped"]}
    assert (
        "lab_ntprobnp_mean" in dropped and "lab_ntprobnp_count" in dropped and "lab_creatinine_mean" in names
    )
    assert not any(n.startswith("vital_") for n in names + sorted(dropped))
    # With icu/chartevents present, first-vitals features appear and use only rows up to t_pred.
    world = make_world(tmp_path / "w2", tables)
    chart = pd.DataFrame([dict(subject_id=1, hadm_id=10, stay_id=1, itemid=220045, charttime=t, valuenum=v)
                          for t, v in (("2150-01-01 09:00", 80), ("2150-01-05 09:00", 150))])  # fmt: skip
    chart.to_csv(world / "icu" / "chartevents.csv.gz", index=False, compression="gzip")
    build_cohort(world, tmp_path / "out2", max_missing=1.0, verbose=False)
    row = pd.read_parquet(tmp_path / "out2" / "readmission_30d.parquet").set_index("hadm_id").loc[10]
    assert row.vital_heart_rate_max == 80 and row.vital_heart_rate_count == 1


def test_notes_cleaned_one_row_per_admission_and_truth_copied(tmp_path):
    notes_module = pytest.importorskip("ehrclip_kit.data.notes")
    world = make_world(tmp_path / "w", {"hosp/admissions": _simple_admissions([1, 2])})
    raw = [
        dict(note_id="1-DS-1", subject_id=1, hadm_id=10, note_type="DS", note_seq=1,
             text='Name: ___\nChief Complaint:\nDyspnea, "quoted", 3 days\n\nHistory of Present Illness:\nCHF.'),
        dict(note_id="1-DS-2", subject_id=1, hadm_id=10, note_type="DS", note_seq=2, text="Addendum: stable."),
        dict(note_id="2-DS-1", subject_id=2, hadm_id=20, note_type="DS", note_seq=1, text="No sections at all"),
        dict(note_id="9-DS-1", subject_id=9, hadm_id=90, note_type="DS", note_seq=1, text="orphan note"),
    ]  # fmt: skip
    (world / "note").mkdir()
    pd.DataFrame(raw).to_csv(world / "note" / "discharge.csv.gz", index=False, compression="gzip")
    pd.DataFrame({"hadm_id": [10, 20], "p_readmission_30d": [0.1, 0.2]}).to_parquet(world / "truth.parquet")
    out = tmp_path / "out"
    build_cohort(world, out, verbose=False)
    notes = pd.read_parquet(out / "notes.parquet").set_index("hadm_id")
    assert list(notes.index) == [10, 20]
    assert notes.loc[10, "text"] == notes_module.clean_note(raw[0]["text"] + "\n\n" + raw[1]["text"])
    assert notes.loc[20, "text"] == notes_module.clean_note("No sections at all")
    steps = pd.read_csv(out / "attrition.csv").set_index("step")
    assert steps.loc["note/discharge", "n_excluded"] == 1
    assert pd.read_parquet(out / "truth.parquet").shape == (2, 2)


def test_gzip_header_only_tables_and_task_subset(tmp_path):
    world = make_world(tmp_path / "w", {"hosp/admissions": _simple_admissions([1])})
    with gzip.open(world / "hosp" / "labevents.csv.gz", "rt") as handle:
        assert handle.read().strip() == ",".join(COLUMNS["hosp/labevents"])
    out = tmp_path / "out"
    summary = build_cohort(world, out, tasks=("critical_24h",), verbose=False)
    assert sorted(p.name for p in out.iterdir()) == ["attrition.csv", "critical_24h.parquet", "features.json"]
    assert summary["tasks"]["critical_24h"]["rows"] == 1
    assert set(pd.read_csv(out / "attrition.csv").task) == {"input", "critical_24h"}


def test_unreadable_value_names_file_line_and_column(tmp_path):
    labs = [dict(subject_id=1, hadm_id="abc", itemid=50912, charttime="2150-01-02", valuenum=1.0)]
    world = make_world(tmp_path / "w", {"hosp/admissions": _simple_admissions([1]), "hosp/labevents": labs})
    (world / "note").mkdir()  # notes are cleaned in the background meanwhile: the failure must stop that too
    note = dict(note_id="1", subject_id=1, hadm_id=10, note_type="DS", note_seq=1, text="x")
    pd.DataFrame([note]).to_csv(world / "note" / "discharge.csv.gz", index=False, compression="gzip")
    with pytest.raises(CohortInputError) as err:
        build_cohort(world, tmp_path / "out", verbose=False)
    message = str(err.value)
    assert 'column "hadm_id"' in message and "Line: 2" in message
    assert f"file = {world / 'hosp' / 'labevents.csv.gz'}" in message
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no OUT, no temporary folders
    # A notes file without its text column is named before any work starts.
    pd.DataFrame([note]).drop(columns="text").to_csv(
        world / "note" / "discharge.csv.gz", index=False, compression="gzip"
    )
    with pytest.raises(CohortInputError, match="column 'text' missing from .*note/discharge.csv.gz"):
        build_cohort(
            make_world(tmp_path / "w", {"hosp/admissions": _simple_admissions([1])}), tmp_path / "out"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
