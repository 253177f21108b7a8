"""The synthetic MIMIC-IV world: real layouts, determinism, labels, and what the note knows (text signal)."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrclip_kit.data import synthetic, synthetic_catalog
from ehrclip_kit.data.synthetic import generate_world

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = DATA / "mimic-iv-demo"
HOSP_TABLES = (
    "patients",
    "admissions",
    "diagnoses_icd",
    "d_icd_diagnoses",
    "procedures_icd",
    "d_icd_procedures",
    "labevents",
    "d_labitems",
    "prescriptions",
    "transfers",
)
HEADINGS = (
    "Name:",
    "Unit No:",
    "Admission Date:",
    "Discharge Date:",
    "Date of Birth:",
    "Sex:",
    "Service:",
    "Allergies:",
    "Attending:",
    "Chief Complaint:",
    "Major Surgical or Invasive Procedure:",
    "History of Present Illness:",
    "Past Medical History:",
    "Social History:",
    "Family History:",
    "Physical Exam:",
    "Pertinent Results:",
    "Brief Hospital Course:",
    "Medications on Admission:",
    "Discharge Medications:",
    "Discharge Disposition:",
    "Discharge Diagnosis:",
    "Discharge Condition:",
    "Discharge Instructions:",
    "Followup Instructions:",
)
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
needs_demo = pytest.mark.skipif(not DEMO.exists(), reason="shared/data/mimic-iv-demo not available")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    generate_world(out, n_patients=2000, seed=11, text_signal=0.8, ecg=False, progress=False)
    return out


@pytest.fixture(scope="module")
def signal_pair(tmp_path_factory) -> dict[float, Path]:
    base = tmp_path_factory.mktemp("s")
    paths = {}
    for s in (1.0, 0.0):
        paths[s] = base / f"s{s}"
        generate_world(paths[s], n_patients=500, seed=3, text_signal=s, ecg=False, progress=False)
    return paths


def _read(world: Path, table: str, **kw) -> pd.DataFrame:
    folder = "icu" if table == "icustays" else "hosp"
    return pd.read_csv(world / folder / f"{table}.csv.gz", **kw)


def _digest(folder: Path, pattern: str = "**/*.csv.gz") -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(pattern))
    }


@needs_demo
@pytest.mark.parametrize("table", HOSP_TABLES + ("icustays",))
def test_columns_match_mimic_demo(world, table):
    folder = "icu" if table == "icustays" else "hosp"
    demo = pd.read_csv(DEMO / folder / f"{table}.csv.gz", nrows=5)
    ours = _read(world, table)
    assert list(ours.columns) == list(demo.columns)
    assert len(ours) > 0


@needs_demo
def test_vocabularies_are_real_mimic_entries():
    d_dx = pd.read_csv(DEMO / "hosp" / "d_icd_diagnoses.csv.gz", dtype={"icd_code": str})
    real = dict(zip(zip(d_dx["icd_code"], d_dx["icd_version"], strict=True), d_dx["long_title"], strict=True))
    wrong = {k: v for k, v in synthetic_catalog.DX_TITLES.items() if real.get(k) != v}
    assert not wrong, f"titles differ from MIMIC-IV's d_icd_diagnoses: {wrong}"
    d_px = pd.read_csv(DEMO / "hosp" / "d_icd_procedures.csv.gz", dtype={"icd_code": str})
    real_px = dict(
        zip(zip(d_px["icd_code"], d_px["icd_version"], strict=True), d_px["long_title"], strict=True)
    )
    for c9, t9, c10, t10 in synthetic_catalog.PROCEDURES.values():
        assert real_px.get((c9, 9)) == t9 and real_px.get((c10, 10)) == t10, (c9, c10)
    labs = pd.read_csv(DEMO / "hosp" / "d_labitems.csv.gz").set_index("itemid")
    for key, spec in synthetic_catalog.LAB_ITEMS.items():
        assert tuple(labs.loc[spec[0], ["label", "fluid", "category"]]) == spec[1:4], key


def test_value_conventions(world):
    adm = _read(world, "admissions", dtype=str, keep_default_na=False)
    for col in ("admittime", "dischtime"):
        assert adm[col].str.match(DATETIME).all()
    assert adm["deathtime"][adm["deathtime"] != ""].str.match(DATETIME).all()
    assert set(adm["hospital_expire_flag"]) == {"0", "1"}
    pat = _read(world, "patients")
    assert pat["anchor_year_group"].str.match(r"^\d{4} - \d{4}$").all()
    assert pat["anchor_age"].between(18, 91).all() and pat["gender"].isin(["M", "F"]).all()
    dx = _read(world, "diagnoses_icd", dtype={"icd_code": str})
    assert set(dx["icd_version"]) == {9, 10}
    assert not dx["icd_code"].str.contains(r"\.").any()
    d_dx = _read(world, "d_icd_diagnoses", dtype={"icd_code": str})
    used = set(zip(dx["icd_code"], dx["icd_version"], strict=True))
    assert set(zip(d_dx["icd_code"], d_dx["icd_version"], strict=True)) == used  # only the codes used
    assert (dx.groupby("hadm_id")["seq_num"].min() == 1).all()
    px = _read(world, "procedures_icd", dtype=str)
    assert px["chartdate"].str.match(r"^\d{4}-\d{2}-\d{2}$").all()
    tr = _read(world, "transfers")
    assert set(tr["eventtype"]) == {"ED", "admit", "transfer", "discharge"}
    assert (tr.groupby("hadm_id")["eventtype"].apply(lambda s: (s == "admit").sum()) == 1).all()
    rx = _read(world, "prescriptions", dtype=str)
    assert rx["starttime"].str.match(DATETIME).all()
    assert {"Furosemide", "Apixaban", "Warfarin", "Insulin", "Vancomycin", "Lactulose"} <= set(rx["drug"])


def test_labevents_realistic(world):
    labs = _read(world, "labevents")
    items = _read(world, "d_labitems")
    assert set(labs["itemid"]) <= set(items["itemid"])
    assert {50912, 51006, 50983, 50971, 51222, 51301, 51265, 50813, 50963, 51003} <= set(labs["itemid"])
    assert labs["labevent_id"].is_unique
    assert labs["hadm_id"].isna().any() and labs["hadm_id"].notna().mean() > 0.95  # a few outpatient draws
    assert (labs["value"] == "<0.01").any() and labs.loc[labs["value"] == "<0.01", "valuenum"].isna().all()
    assert set(labs["flag"].dropna()) == {"abnormal"} and set(labs["priority"].dropna()) == {
        "STAT",
        "ROUTINE",
    }
    adm = _read(world, "admissions", parse_dates=["admittime"])
    t = labs.dropna(subset=["hadm_id"]).merge(adm[["hadm_id", "admittime"]], on="hadm_id")
    hours = (pd.to_datetime(t["charttime"]) - t["admittime"]).dt.total_seconds() / 3600
    assert (hours < 0).any() and (hours <= 24).mean() > 0.2 and (hours > 24).mean() > 0.3
    # A condition moves its labs: creatinine is higher with CKD (on the same admissions).
    truth = pd.read_parquet(world / "truth.parquet")[["hadm_id", "cond_ckd"]]
    creat = (
        labs[labs["itemid"] == 50912].groupby("hadm_id")["valuenum"].median().rename("creat").reset_index()
    )
    creat = creat.merge(truth, on="hadm_id")
    assert (
        creat.groupby("cond_ckd")["creat"].median()[1] > 1.3 * creat.groupby("cond_ckd")["creat"].median()[0]
    )


def test_notes_layout(world):
    notes = pd.read_csv(world / "note" / "discharge.csv.gz")
    assert list(notes.columns) == [
        "note_id",
        "subject_id",
        "hadm_id",
        "note_type",
        "note_seq",
        "charttime",
        "storetime",
        "text",
    ]
    adm = _read(world, "admissions")
    assert sorted(notes["hadm_id"]) == sorted(adm["hadm_id"])  # one per admission
    assert (notes["note_type"] == "DS").all()
    assert (
        notes["note_id"] == notes["subject_id"].astype(str) + "-DS-" + notes["note_seq"].astype(str)
    ).all()
    text = notes["text"].iloc[0]
    positions = [text.index(h) for h in HEADINGS]
    assert positions == sorted(positions)
    assert notes["text"].str.contains("___", regex=False).all()
    words = notes["text"].str.split().str.len()
    assert 120 < words.median() < 320


def test_admissions_and_truth(world):
    adm = _read(world, "admissions")
    truth = pd.read_parquet(world / "truth.parquet")
    assert (adm.groupby("subject_id").size() >= 2).mean() > 0.3
    merged = adm.merge(
        truth, on=["subject_id", "hadm_id"], how="outer", indicator=True, validate="one_to_one"
    )
    assert (merged["_merge"] == "both").all()
    for c in synthetic.CONDITIONS:
        assert truth[f"cond_{c}"].isin([0, 1]).all() and truth[f"sev_{c}"].between(0, 1).all()
        assert ((truth[f"sev_{c}"] > 0) == (truth[f"cond_{c}"] == 1)).all()
    assert truth["p_readmission_30d"].between(0, 1).all() and (truth["text_signal"] == 0.8).all()
    icu = _read(world, "icustays", parse_dates=["intime"]).merge(adm, on="hadm_id")
    hours = (icu["intime"] - pd.to_datetime(icu["admittime"])).dt.total_seconds() / 3600
    assert (hours <= 24).any() and (hours > 24).any()


def _labels(world: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The issue's label rules, written independently of the generator."""
    adm = _read(world, "admissions", parse_dates=["admittime", "dischtime", "deathtime"])
    idx = adm[(adm["hospital_expire_flag"] == 0) & adm["dischtime"].notna()]
    pairs = idx[["subject_id", "hadm_id", "dischtime"]].merge(
        adm[["subject_id", "admittime"]], on="subject_id"
    )
    hit = pairs[
        (pairs["admittime"] > pairs["dischtime"])
        & (pairs["admittime"] <= pairs["dischtime"] + pd.Timedelta(days=30))
    ]
    readm = idx.assign(label=idx["hadm_id"].isin(hit["hadm_id"]).astype(int))
    icu = _read(world, "icustays", parse_dates=["intime"]).merge(adm, on="hadm_id")
    t0 = adm["admittime"] + pd.Timedelta(hours=24)
    adm = adm.assign(t0=t0)
    icu = icu.assign(t0=icu["admittime"] + pd.Timedelta(hours=24))
    early = icu.loc[icu["intime"] <= icu["t0"], "hadm_id"]
    late = icu.loc[(icu["intime"] > icu["t0"]) & (icu["intime"] <= icu["dischtime"]), "hadm_id"]
    ok = (adm["dischtime"] > adm["t0"]) & (adm["deathtime"].isna() | (adm["deathtime"] > adm["t0"]))
    crit = adm[ok & ~adm["hadm_id"].isin(early)]
    crit = crit.assign(label=((crit["hospital_expire_flag"] == 1) | crit["hadm_id"].isin(late)).astype(int))
    return readm, crit


def test_labels_match_truth_and_base_rates(world):
    readm, crit = _labels(world)
    truth = pd.read_parquet(world / "truth.parquet").set_index("hadm_id")
    assert (truth.loc[readm["hadm_id"], "readmission_30d"].to_numpy() == readm["label"].to_numpy()).all()
    assert (truth.loc[crit["hadm_id"], "critical_24h"].to_numpy() == crit["label"].to_numpy()).all()
    assert truth["readmission_30d"].notna().sum() == len(readm) and truth[
        "critical_24h"
    ].notna().sum() == len(crit)
    assert 0.15 <= readm["label"].mean() <= 0.25, readm["label"].mean()
    assert 0.10 <= crit["label"].mean() <= 0.20, crit["label"].mean()
    # Outcomes follow the latent state: the true probabilities rank the realised labels well.
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(readm["label"], truth.loc[readm["hadm_id"], "p_readmission_30d"]) > 0.7
    assert roc_auc_score(crit["label"], truth.loc[crit["hadm_id"], "p_critical_24h"]) > 0.7


def test_deterministic_per_seed(tmp_path):
    kw = dict(n_patients=120, ecg=False, progress=False)
    generate_world(tmp_path / "a", seed=5, **kw)
    generate_world(tmp_path / "b", seed=5, **kw)
    generate_world(tmp_path / "c", seed=6, **kw)
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 12
    assert a["hosp/admissions.csv.gz"] != c["hosp/admissions.csv.gz"]
    ta, tb = (pd.read_parquet(tmp_path / x / "truth.parquet") for x in "ab")
    pd.testing.assert_frame_equal(ta, tb)


HF = re.compile(r"\b(chf|hfref|hfpef|heart failure|cardiomyopathy)\b")
NEGATION = re.compile(r"\b(no|denies|negative for|without)\b")


def _asserts_heart_failure(text: str) -> bool:
    """A non-negated heart-failure mention in the clinical sections (sentence-level negation check)."""
    text = text.lower()
    body = text[text.index("history of present illness:") : text.index("discharge condition:")]
    body = body[: body.index("social history:")] + body[body.index("brief hospital course:") :]
    return any(HF.search(s) and not NEGATION.search(s) for s in re.split(r"[.\n]", body))


def test_text_signal_controls_what_the_note_says(signal_pair):
    agreement = {}
    for s, folder in signal_pair.items():
        notes = pd.read_csv(folder / "note" / "discharge.csv.gz")
        truth = pd.read_parquet(folder / "truth.parquet").set_index("hadm_id").loc[notes["hadm_id"]]
        said = notes["text"].map(_asserts_heart_failure).to_numpy()
        true = truth["cond_heart_failure"].to_numpy() == 1
        agreement[s] = np.corrcoef(said, true)[0, 1]
        if s == 1.0:
            assert (said == true).mean() > 0.93
        assert (truth["text_signal"] == s).all()
        # The header's sex is the patient's at s = 1 and a random admission's at s = 0 (about half agree).
        header_sex = notes["text"].str.extract(r"Sex:\s+([MF])")[0].to_numpy()
        same_sex = (header_sex == truth["sex"].to_numpy()).mean()
        assert same_sex == 1.0 if s == 1.0 else 0.4 < same_sex < 0.65, (s, same_sex)
    assert agreement[1.0] > 0.85 and abs(agreement[0.0]) < 0.15, agreement


def test_text_signal_changes_only_the_notes(signal_pair):
    high, zero = (_digest(signal_pair[s]) for s in (1.0, 0.0))
    for name in high:
        if name.startswith("note/"):
            assert high[name] != zero[name]
        else:
            assert high[name] == zero[name], name  # tables, hence base rates, do not move with s


def test_lab_density_and_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "cli"),
            "--patients",
            "80",
            "--seed",
            "2",
            "--no-ecg",
            "--quiet",
            "--lab-density",
            "2",
        ]
    )
    assert synthetic.run(args) == 0
    out = capsys.readouterr().out
    assert "readmission_30d rate" in out and "labevents" in out
    dense = len(_read(tmp_path / "cli", "labevents"))
    generate_world(tmp_path / "sparse", n_patients=80, seed=2, ecg=False, progress=False, lab_density=1.0)
    assert dense > 1.5 * len(_read(tmp_path / "sparse", "labevents"))


@pytest.mark.parametrize("kw", [dict(n_patients=0), dict(text_signal=1.5), dict(lab_density=0)])
def test_bad_input_writes_nothing(tmp_path, kw):
    with pytest.raises(ValueError):
        generate_world(tmp_path / "bad", **{"ecg": False, "progress": False, "n_patients": 20, **kw})
    assert not (tmp_path / "bad").exists()


def test_ecg_world_is_written_when_available(tmp_path):
    pytest.importorskip("ehrclip_kit.data.synthetic_ecg")
    summary = generate_world(tmp_path / "w", n_patients=25, seed=4, progress=False)
    records = pd.read_csv(tmp_path / "w" / "ecg" / "record_list.csv")
    assert summary["ecgs"] == len(records) > 0
    assert set(records["subject_id"]) <= set(_read(tmp_path / "w", "patients")["subject_id"])
