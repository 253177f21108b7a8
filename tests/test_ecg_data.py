"""ECG data: synthetic waveforms, WFDB loading and lead order, the ecg-index recipes and their attrition."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import wfdb
from scipy.signal import find_peaks

from ehrclip_kit.data import ecg_index
from ehrclip_kit.data.ecg import (
    CANONICAL_LEADS,
    ECGConfig,
    ECGDataset,
    _read_format16,
    bandpass,
    center_crop,
    random_crop,
    read_ecg,
    read_record,
    validate_ecg,
)
from ehrclip_kit.data.synthetic_ecg import MIMIC_LEADS, write_ecg_world

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PTB = DATA / "ptb-xl-sample"
DEMO_HOSP = DATA / "mimic-iv-demo" / "hosp"
needs_ptb = pytest.mark.skipif(not PTB.is_dir(), reason="ptb-xl-sample not available")
needs_demo = pytest.mark.skipif(not DEMO_HOSP.is_dir(), reason="mimic-iv-demo not available")
CONDITIONS = (
    "atrial_fibrillation",
    "myocardial_infarction",
    "heart_failure",
    "hypertension",
    "conduction_disease",
    "sepsis",
)
PROFILES = {  # 12 patients each, one admission each, every latent state at full severity
    "healthy": {},
    "af": {"atrial_fibrillation": 1.0},
    "conduction": {"conduction_disease": 0.5},
    "lvh": {"hypertension": 1.0},
    "mi": {"myocardial_infarction": 1.0},
    "sepsis": {"sepsis": 1.0},
}


def _small_world(n_per_profile: int = 12):
    rows = []
    for p, (name, conds) in enumerate(PROFILES.items()):
        for i in range(n_per_profile):
            admit = pd.Timestamp("2150-01-01") + pd.Timedelta(days=40 * i + p)
            row = {
                "subject_id": 10_000_000 + 100 * p + i,
                "hadm_id": 20_000_000 + 100 * p + i,
                "profile": name,
            }
            row |= {"admittime": admit, "dischtime": admit + pd.Timedelta(days=4)}
            for c in CONDITIONS:
                row[f"cond_{c}"], row[f"sev_{c}"] = int(c in conds), conds.get(c, 0.0)
            rows.append(row)
    frame = pd.DataFrame(rows)
    return frame[["subject_id", "hadm_id", "admittime", "dischtime"]], frame.drop(
        columns=["admittime", "dischtime"]
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    admissions, truth = _small_world()
    info = write_ecg_world(out, admissions, truth, seed=3, ecgs_per_admission=(1, 1), progress=False)
    ecg_truth = pd.read_parquet(out / "ecg" / "ecg_truth.parquet").merge(
        truth[["hadm_id", "profile"]], on="hadm_id"
    )
    return out, info, ecg_truth, admissions


def _clean(truth: pd.DataFrame) -> pd.DataFrame:
    return truth[truth["bad_lead"] == ""]


def _signal(root: Path, path: str) -> np.ndarray:
    """Canonical-order, band-passed mV signal of a synthetic record (500 Hz)."""
    return bandpass(read_ecg(root / "ecg" / path, None), 500.0, 0.5, 40.0)


def _r_peaks(x: np.ndarray, fs: float) -> np.ndarray:
    energy = np.sqrt((np.diff(x, axis=1) ** 2).sum(axis=0))
    peaks, _ = find_peaks(energy, height=0.4 * np.percentile(energy, 99.5), distance=int(0.25 * fs))
    return peaks


def _average_beat(x: np.ndarray, fs: float, before: float = 0.2, after: float = 0.4) -> np.ndarray:
    peaks = _r_peaks(x, fs)
    lo, hi = int(before * fs), int(after * fs)
    beats = [x[:, p - lo : p + hi] for p in peaks if p - lo >= 0 and p + hi <= x.shape[1]]
    beat = np.mean(beats, axis=0)
    return beat - np.median(beat[:, : int(0.05 * fs)], axis=1, keepdims=True)


def _qrs_ms(beat: np.ndarray, fs: float) -> float:
    centre = int(0.2 * fs)
    mag = np.sqrt((beat[:, centre - int(0.12 * fs) : centre + int(0.14 * fs)] ** 2).sum(axis=0))
    above = np.flatnonzero(mag >= 0.15 * mag.max())
    return (above[-1] - above[0]) / fs * 1000


# ---------------------------------------------------------------- synthetic ECGs


def test_synthetic_files_are_what_wfdb_writes_and_reads(world, tmp_path):
    out, info, truth, _ = world
    rel = truth["path"].iloc[0]
    rec = wfdb.rdrecord(str(out / "ecg" / rel), physical=False)
    assert rec.fs == 500 and rec.sig_len == 5000 and tuple(rec.sig_name) == MIMIC_LEADS
    raw = np.fromfile(out / "ecg" / f"{rel}.dat", dtype="<i2").reshape(-1, 12)
    np.testing.assert_array_equal(rec.d_signal, raw)
    # wfdb.wrsamp given the same digital samples writes byte-identical files.
    name = Path(rel).name
    wfdb.wrsamp(
        name, fs=500, units=["mV"] * 12, sig_name=list(MIMIC_LEADS), d_signal=raw.astype(np.int64), fmt=["16"] * 12,
        adc_gain=[200.0] * 12, baseline=[0] * 12, base_time=rec.base_time, base_date=rec.base_date,
        write_dir=str(tmp_path),
    )  # fmt: skip
    assert (tmp_path / f"{name}.hea").read_text() == (out / "ecg" / f"{rel}.hea").read_text()
    assert (tmp_path / f"{name}.dat").read_bytes() == (out / "ecg" / f"{rel}.dat").read_bytes()
    listed = pd.read_csv(out / "ecg" / "record_list.csv")
    assert list(listed.columns) == ["subject_id", "study_id", "file_name", "ecg_time", "path"]
    assert listed["path"].str.fullmatch(r"files/p\d{4}/p\d+/s\d{8}/\d{8}").all()
    assert info["n_ecgs"] == len(listed) == listed["study_id"].nunique()


def test_synthetic_world_is_deterministic_per_seed(tmp_path):
    admissions, truth = _small_world(3)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_ecg_world(tmp_path / name, admissions, truth, seed=seed, progress=False)
    a, b, c = (tmp_path / n / "ecg" for n in "abc")
    assert (a / "machine_measurements.csv").read_text() == (b / "machine_measurements.csv").read_text()
    assert (a / "record_list.csv").read_text() == (b / "record_list.csv").read_text()
    rel = pd.read_csv(a / "record_list.csv")["path"]
    assert all((a / f"{p}.dat").read_bytes() == (b / f"{p}.dat").read_bytes() for p in rel)
    assert (a / "record_list.csv").read_text() != (c / "record_list.csv").read_text()


def test_machine_statements_match_the_findings_and_the_truth(world):
    out, _, truth, _ = world
    mm = pd.read_csv(out / "ecg" / "machine_measurements.csv")
    assert mm.columns[:4].tolist() == ["subject_id", "study_id", "cart_id", "ecg_time"]
    assert [f"report_{k}" for k in range(18)] == [c for c in mm.columns if c.startswith("report_")]
    report = mm.filter(like="report_").apply(lambda r: "; ".join(r.dropna()), axis=1)
    merged = truth.merge(pd.DataFrame({"study_id": mm["study_id"], "statements": report}), on="study_id")
    checks = {
        "af": "Atrial fibrillation",
        "lbbb": "Left bundle branch block",
        "rbbb": "Right bundle branch block",
        "lvh": "Left ventricular hypertrophy",
        "mi_inferior": "Inferior infarct - age undetermined",
        "mi_anterior": "Anterior infarct - age undetermined",
    }
    for flag, statement in checks.items():
        assert (merged["statements"].str.contains(statement) == merged[flag]).all(), flag
    major = merged[["af", "lbbb", "rbbb", "avb1", "lvh", "mi_inferior", "mi_anterior"]].any(axis=1)
    normal = ~major & merged["heart_rate"].between(60, 100) & (merged["bad_lead"] == "")
    assert (merged["statements"].str.endswith("Normal ECG") == normal).all()
    assert (merged["statements"].str.endswith("Abnormal ECG") == major).all()
    assert not major[merged["profile"] == "healthy"].any()
    # Findings follow the latent state: each profile shows its own abnormality and nothing else's.
    by = merged.groupby("profile")
    assert by["af"].mean()["af"] >= 0.8 and by["af"].mean().drop("af").max() == 0
    assert (by["lbbb"].mean() + by["rbbb"].mean())["conduction"] >= 0.8
    assert (
        by["lvh"].mean()["lvh"] >= 0.7 and (by["mi_inferior"].mean() + by["mi_anterior"].mean())["mi"] >= 0.7
    )
    assert by["heart_rate"].mean()["sepsis"] > by["heart_rate"].mean()["healthy"] + 25
    assert (
        merged.loc[merged["profile"] == "sepsis", "statements"].str.startswith("Sinus tachycardia")
    ).mean() > 0.7


def test_ecg_times_are_inside_or_near_the_admission(world):
    _, _, truth, admissions = world
    merged = truth.merge(admissions, on=["subject_id", "hadm_id"])
    t = pd.to_datetime(merged["ecg_time"])
    inside = (t >= merged["admittime"] - pd.Timedelta(hours=12)) & (t <= merged["dischtime"])
    far = ((merged["admittime"] - t).dt.days >= 6) | ((t - merged["dischtime"]).dt.days >= 6)
    assert (inside | far).all() and inside.mean() > 0.8


def test_af_has_irregular_rr_without_p_waves(world):
    out, _, truth, _ = world
    clean = _clean(truth)

    def rr_cv(path):
        rr = np.diff(_r_peaks(_signal(out, path), 500.0))
        return rr.std() / rr.mean()

    af = [rr_cv(p) for p in clean.loc[clean["af"], "path"]]
    sinus = [rr_cv(p) for p in clean.loc[clean["profile"] == "healthy", "path"]]
    assert np.median(af) > 0.1 > 3 * np.median(sinus)
    mm = pd.read_csv(out / "ecg" / "machine_measurements.csv").merge(truth[["study_id", "af"]], on="study_id")
    assert (mm.loc[mm["af"], "p_onset"] == 29999).all() and (mm.loc[~mm["af"], "p_onset"] < 29999).all()


def test_bundle_branch_block_widens_qrs_and_lvh_raises_voltage(world):
    out, _, truth, _ = world
    clean = _clean(truth)
    lead = {name: i for i, name in enumerate(CANONICAL_LEADS)}

    def beat(path):
        return _average_beat(_signal(out, path), 500.0)

    normal = [beat(p) for p in clean.loc[clean["profile"] == "healthy", "path"]]
    lbbb = [beat(p) for p in clean.loc[clean["lbbb"], "path"]]
    lvh = [beat(p) for p in clean.loc[clean["lvh"], "path"]]
    width_normal, width_lbbb = (
        np.median([_qrs_ms(b, 500) for b in normal]),
        np.median([_qrs_ms(b, 500) for b in lbbb]),
    )
    assert width_lbbb > width_normal + 40 and width_lbbb >= 120

    def sokolow(b):  # S in V1 + the taller R of V5/V6, mV
        return -b[lead["V1"]].min() + max(b[lead["V5"]].max(), b[lead["V6"]].max())

    assert np.median([sokolow(b) for b in lvh]) > 1.4 * np.median([sokolow(b) for b in normal])


def test_limb_leads_are_one_consistent_dipole_in_canonical_order(world):
    out, _, truth, _ = world
    quiet = truth[(truth["bad_lead"] == "") & ~truth["wander"] & ~truth["mains"]]
    for path in quiet["path"].iloc[:5]:
        # Canonical order at the native rate; low-passed because each lead has its own white noise.
        x = _signal(out, path)
        i, ii, iii, avr, avl, avf = (
            x[CANONICAL_LEADS.index(n)] for n in ("I", "II", "III", "aVR", "aVL", "aVF")
        )

        def rms(v):
            return float(np.sqrt(np.mean(v**2)))

        for derived, expected in ((iii, ii - i), (avr, -(i + ii) / 2), (avl, i - ii / 2), (avf, ii - i / 2)):
            assert rms(derived - expected) < 0.04
        # Swapping aVL and aVF (the MIMIC/PTB-XL order difference) would break the identities.
        assert rms(avf - (i - ii / 2)) > 2 * rms(avl - (i - ii / 2))


# ---------------------------------------------------------------- loading PTB-XL


@needs_ptb
def test_records100_and_records500_agree_after_resampling():
    cfg = ECGConfig(fs=100, normalise="none")
    for ecg_id in (1, 2, 17, 50):
        lr = read_ecg(PTB / f"records100/00000/{ecg_id:05d}_lr", 100, config=cfg)
        hr = read_ecg(PTB / f"records500/00000/{ecg_id:05d}_hr", 100, config=cfg)
        assert lr.shape == hr.shape == (12, 1000) and lr.dtype == np.float32
        edge = 50  # filter transients at both ends
        for k in range(12):
            assert np.corrcoef(lr[k, edge:-edge], hr[k, edge:-edge])[0, 1] > 0.95, (
                ecg_id,
                CANONICAL_LEADS[k],
            )


@needs_ptb
def test_reordering_puts_each_lead_where_the_header_says(world):
    out, _, truth, _ = world
    for path in (PTB / "records100/00000/00001_lr", out / "ecg" / truth["path"].iloc[0]):
        raw, _, names = read_record(path)
        lowered = [n.lower() for n in names]
        canonical = read_ecg(path, None)
        for k, lead in enumerate(CANONICAL_LEADS):
            np.testing.assert_array_equal(canonical[k], raw[lowered.index(lead.lower())])
    assert lowered.index("avf") < lowered.index("avl")  # MIMIC layout: aVF stored before aVL
    assert [n.upper() for n in read_record(PTB / "records100/00000/00001_lr")[2]][4:6] == ["AVL", "AVF"]


@needs_ptb
def test_fast_format16_reader_returns_exactly_what_wfdb_returns(world, tmp_path):
    out, _, truth, _ = world
    (tmp_path / "gap.hea").write_text(
        (PTB / "records100/00000/00009_lr.hea").read_text().replace("00009_lr", "gap")
    )
    d = np.fromfile(PTB / "records100/00000/00009_lr.dat", "<i2").reshape(-1, 12)
    d[100:103, 2] = -32768  # format 16's missing-sample value
    d.tofile(tmp_path / "gap.dat")
    paths = [
        PTB / f"records{r}/00000/{i:05d}_{s}" for r, s in (("100", "lr"), ("500", "hr")) for i in (1, 33, 77)
    ]
    paths += [out / "ecg" / p for p in truth["path"].iloc[:3]] + [tmp_path / "gap"]
    for path in paths:
        assert _read_format16(str(path)) is not None
        x, fs, names = read_record(path)
        ref = wfdb.rdrecord(str(path))
        np.testing.assert_array_equal(x, ref.p_signal.T.astype(np.float32))  # NaN in the same places
        assert fs == ref.fs and names == ref.sig_name
    assert np.isnan(x[2, 100:103]).all() and not np.isnan(x[2, 103:]).any()
    # Anything unusual (here a byte offset in the format field) goes through wfdb.rdrecord instead.
    header = (tmp_path / "gap.hea").read_text().replace(".dat 16 ", ".dat 16+0 ")
    (tmp_path / "gap.hea").write_text(header)
    assert _read_format16(str(tmp_path / "gap")) is None
    np.testing.assert_array_equal(read_record(tmp_path / "gap")[0], x)


def test_validate_and_crops():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1000)).astype(np.float32)
    assert validate_ecg(x) is None
    assert validate_ecg(x[:11]) == "wrong_shape" and validate_ecg(x, min_samples=2000) == "wrong_shape"
    y = x.copy()
    y[3, 10] = np.nan
    assert validate_ecg(y) == "nan_samples"
    y = x.copy()
    y[7] = 0.2
    assert validate_ecg(y) == "flat_lead"
    assert center_crop(x, 500).shape == (12, 500) and np.array_equal(center_crop(x, 500), x[:, 250:750])
    crop = random_crop(x, 500, np.random.default_rng(1))
    start = int(np.flatnonzero(x[0] == crop[0, 0])[0])
    assert np.array_equal(crop, x[:, start : start + 500])
    assert random_crop(x[:, :300], 500, rng).shape == (12, 500)


@needs_ptb
def test_ecg_dataset_random_crops_in_training_centre_crop_at_evaluation():
    index = pd.DataFrame({"path": [f"records500/00000/{i:05d}_hr" for i in (1, 2, 3)]})
    cfg = ECGConfig(fs=100, crop_seconds=5)
    train = ECGDataset(index, PTB, cfg, train=True, cache=True, seed=0)
    item = train[0]
    assert item.dtype == torch.float32 and tuple(item.shape) == (12, 500)
    assert torch.equal(train[0], item)  # same (seed, epoch, item) -> same crop
    crops = []
    for epoch in range(4):
        train.set_epoch(epoch)
        crops.append(train[0])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    evaluation = ECGDataset(index, PTB, cfg, train=False)
    full = read_ecg(PTB / "records500/00000/00001_hr", 100, config=cfg)
    np.testing.assert_allclose(evaluation[0].numpy(), full[:, 250:750], rtol=1e-6)
    assert abs(float(full.mean(axis=1).max())) < 1e-4 and np.allclose(full.std(axis=1), 1, atol=1e-3)


# ---------------------------------------------------------------- ecg-index


def _args(**kw):
    parser = argparse.ArgumentParser()
    ecg_index.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv + ["--no-progress"])


@needs_ptb
def test_ptbxl_index_has_superclasses_labels_and_strat_fold_splits(tmp_path):
    assert ecg_index.run(_args(source="ptbxl", root=PTB, out=tmp_path)) == 0
    index = pd.read_parquet(tmp_path / "ecg_index.parquet")
    db = pd.read_csv(PTB / "ptbxl_database.csv").set_index("ecg_id").loc[index["ecg_id"]]
    assert len(index) == 100 and (index["fs"] == 100).all() and (index["n_samples"] == 1000).all()
    expected = np.where(db["strat_fold"] <= 8, "train", np.where(db["strat_fold"] == 9, "val", "test"))
    assert (index["split"].to_numpy() == expected).all()
    first = index.set_index("ecg_id").loc[1]
    assert (
        list(first["superclasses"]) == ["NORM"]
        and first["superclass_NORM"] == 1
        and first["label_normal"] == 1
    )
    assert "normal ECG" in first["report"] and first["report_original"].startswith("sinusrhythmus")
    scp = pd.read_csv(PTB / "scp_statements.csv", index_col=0)
    mi_codes = set(scp.index[(scp["diagnostic"] == 1) & (scp["diagnostic_class"] == "MI")])
    has_mi = index["scp_codes"].map(lambda c: bool(mi_codes & set(c)))
    assert (has_mi.astype(int) == index["superclass_MI"]).all() and has_mi.sum() > 0
    assert (index["label_mi"] == index["superclass_MI"]).all()
    assert index[[f"superclass_{s}" for s in ecg_index.SUPERCLASSES]].sum().min() > 0
    hr = ecg_index.build_ptbxl_index(PTB, fs=500)[0]
    assert (hr["fs"] == 500).all() and hr["path"].str.startswith("records500/").all()


@needs_ptb
def test_corrupted_waveforms_are_counted_by_reason_not_fatal(tmp_path):
    root = tmp_path / "ptb"
    shutil.copytree(PTB / "records100", root / "records100")
    for name in ("ptbxl_database.csv", "scp_statements.csv"):
        shutil.copy(PTB / name, root / name)
    rec = root / "records100" / "00000"
    (rec / "00002_lr.dat").write_bytes((rec / "00002_lr.dat").read_bytes()[:5000])  # truncated
    for ecg_id, lead, value in ((3, None, -32768), (4, 4, 7)):  # NaN sample; flat aVL
        d = np.fromfile(rec / f"{ecg_id:05d}_lr.dat", "<i2").reshape(-1, 12)
        d[(10, 1) if lead is None else (slice(None), lead)] = value
        d.tofile(rec / f"{ecg_id:05d}_lr.dat")
    (rec / "00006_lr.hea").unlink()  # missing header
    x = wfdb.rdrecord(str(rec / "00005_lr"))
    wfdb.wrsamp(
        "00005_lr", 100, x.units[:6], x.sig_name[:6], x.p_signal[:, :6], fmt=["16"] * 6, write_dir=str(rec)
    )
    assert ecg_index.run(_args(source="ptbxl", root=root, out=tmp_path / "out", workers=2)) == 0
    attrition = pd.read_csv(tmp_path / "out" / "ecg_attrition.csv").set_index("step")
    assert attrition.loc[
        ["unreadable", "wrong_shape", "nan_samples", "flat_lead"], "n_excluded"
    ].tolist() == [2, 1, 1, 1]
    assert attrition["n_after"].iloc[-1] == 95
    excluded = pd.read_csv(tmp_path / "out" / "ecg_excluded.csv").set_index("ecg_id")
    assert excluded["reason"].to_dict() == {
        2: "unreadable",
        3: "nan_samples",
        4: "flat_lead",
        5: "wrong_shape",
        6: "unreadable",
    }
    assert "aVL" in excluded.loc[4, "detail"]
    assert len(pd.read_parquet(tmp_path / "out" / "ecg_index.parquet")) == 95


@needs_demo
def test_mimic_index_links_admissions_and_writes_codes(tmp_path):
    adm = pd.read_csv(DEMO_HOSP / "admissions.csv.gz", parse_dates=["admittime", "dischtime"])
    adm = adm[adm["subject_id"].isin(adm["subject_id"].drop_duplicates().iloc[:25])]
    truth = adm[["subject_id", "hadm_id"]].assign(cond_atrial_fibrillation=1, sev_atrial_fibrillation=1.0)
    write_ecg_world(tmp_path, adm, truth, seed=0, fs=100, progress=False)
    out = tmp_path / "out"
    assert ecg_index.run(_args(source="mimic", root=tmp_path / "ecg", out=out, mimic_hosp=DEMO_HOSP)) == 0
    index = pd.read_parquet(out / "ecg_index.parquet")
    assert (index["label_af"] == 1).mean() > 0.6 and set(index["split"]) <= {"train", "val", "test"}
    assert index["report"].str.contains("; ").all()
    linked = index.dropna(subset=["hadm_id"]).merge(adm, on=["subject_id", "hadm_id"])
    assert len(linked) == index["hadm_id"].notna().sum() > 0.8 * len(index)
    assert (linked["ecg_time"] >= linked["admittime"] - pd.Timedelta(days=1)).all()
    assert (linked["ecg_time"] <= linked["dischtime"]).all()
    # Outpatient ECGs (a week or more from any stay) stay unlinked.
    source = pd.read_parquet(tmp_path / "ecg" / "ecg_truth.parquet")[["study_id", "hadm_id"]]
    both = index.merge(source, on="study_id", suffixes=("", "_source"))
    assert (both["hadm_id"].isna() | (both["hadm_id"] == both["hadm_id_source"])).mean() > 0.95
    codes = pd.read_parquet(out / "ecg_codes.parquet")
    assert len(codes) == len(index) and codes["tokens"].map(len).mean() > 5
    assert (out / "code_vocab.json").exists() and (out / "ecg_text.parquet").exists()
