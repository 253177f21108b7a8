"""Synthetic 12-lead ECGs in the MIMIC-IV-ECG layout, driven by each admission's latent state.

Every beat is a sum of Gaussian waves (P, septal q, R, S, T, plus pathological components) of a 3-D
heart dipole (vector-cardiogram, axes x = patient's left, y = feet, z = front). The 12 leads are
projections of that one dipole on fixed lead axes, so they stay physically consistent
(III = II - I, aVR = -(I + II)/2, aVL = I - II/2, aVF = II - I/2). Latent conditions change the dipole:

* atrial fibrillation: no P wave, fibrillatory baseline (4.5-8 Hz), irregularly irregular RR;
* conduction disease: left or right bundle-branch block (QRS >= 125 ms), 1st-degree A-V block when severe;
* hypertension / heart failure: left ventricular hypertrophy (high QRS voltage, lateral strain when severe);
* myocardial infarction: Q waves and T inversion in an inferior (II, III, aVF) or anterior (V1-V4) territory;
* sepsis: sinus tachycardia;

plus white noise, baseline wander, mains hum and occasional bad leads. Machine statements are written
from the same findings, so ``machine_measurements.csv`` matches the waveforms. Signals are built in
batches with numpy and the WFDB format-16 files are written directly (``wfdb.wrsamp`` costs ~40 ms a
record); ``tests/test_ecg_data.py`` checks that ``wfdb.rdrecord`` reads them back exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import fftconvolve
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from ehrclip_kit.io import atomic_dir

MIMIC_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")
ADC_GAIN = 200.0  # digital units per mV, as in MIMIC-IV-ECG (5 microvolt resolution)
N_REPORT = 18
DURATION_S = 10.0
MISSING_MEASUREMENT = 29999  # MIMIC-IV-ECG's code for "not measured" (e.g. P wave in atrial fibrillation)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _lead_matrix() -> np.ndarray:
    """12 x 3 projection matrix in MIMIC's lead order."""
    lead_i = np.array([1.0, 0.0, 0.0])
    lead_ii = np.array([0.5, np.sqrt(3) / 2, 0.0])
    limb = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVF": lead_ii - lead_i / 2,
        "aVL": lead_i - lead_ii / 2,
    }
    # Precordial axes in the horizontal plane, from V6 (left) round to V1 (right of the sternum, front).
    angles = {"V1": 115, "V2": 90, "V3": 70, "V4": 50, "V5": 25, "V6": 0}
    chest = {
        k: 1.2 * np.array([np.cos(np.radians(a)), 0.0, np.sin(np.radians(a))]) for k, a in angles.items()
    }
    return np.stack([{**limb, **chest}[name] for name in MIMIC_LEADS])


LEAD_MATRIX = _lead_matrix()

# Wave components: (amplitude mV, centre s relative to the R peak, width s, dipole direction).
P, SEPTAL, R, R2, S, RBBB, INFARCT, T = range(8)
_NORMAL = [
    (0.15, -0.16, 0.022, _unit([0.55, 0.80, 0.15])),
    (0.12, -0.025, 0.008, _unit([-0.5, 0.3, 0.8])),
    (1.30, 0.0, 0.011, _unit([0.6, 0.7, -0.35])),
    (0.0, 0.05, 0.025, _unit([0.7, 0.1, -0.7])),
    (0.35, 0.028, 0.010, _unit([-0.4, -0.5, -0.75])),
    (0.0, 0.065, 0.022, _unit([-0.6, 0.0, 0.8])),
    (0.0, -0.02, 0.014, _unit([0.0, -1.0, 0.0])),
    (0.35, 0.30, 0.048, _unit([0.7, 0.6, 0.2])),
]
TEMPLATE_START_S, TEMPLATE_END_S = -0.35, 0.65


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A truth column as floats, zeros when the world does not model that condition."""
    if name not in frame.columns:
        return np.zeros(len(frame))
    return pd.to_numeric(frame[name], errors="coerce").fillna(0.0).to_numpy(dtype=np.float64)


def _patient_traits(subject_ids: np.ndarray, seed: int) -> pd.DataFrame:
    """Per-patient constants (stable across that patient's ECGs): axis rotation, size, BBB type, territory."""
    rows = []
    for sid in subject_ids:
        g = np.random.default_rng([seed, int(sid), 7])
        rot_z, rot_y = g.normal(0, np.radians(10), 2)
        rows.append(
            (sid, rot_z, rot_y, g.uniform(0.8, 1.2), g.normal(0, 6), g.random() < 0.55, g.random() < 0.5)
        )
    names = ["subject_id", "rot_z", "rot_y", "scale", "hr_offset", "lbbb", "inferior"]
    return pd.DataFrame(rows, columns=names)


def _rotation(rot_z: np.ndarray, rot_y: np.ndarray) -> np.ndarray:
    """n x 3 x 3 rotations about the front (z) axis, then the vertical (y) axis."""
    return Rotation.from_euler("zy", np.stack([rot_z, rot_y], axis=1)).as_matrix()


def _schedule(admissions: pd.DataFrame, rng: np.random.Generator, per_adm: tuple[int, int]) -> pd.DataFrame:
    """One row per ECG: which admission it belongs to and when it was taken."""
    lo, hi = per_adm
    counts = rng.integers(lo, hi + 1, size=len(admissions))
    ecg = admissions.loc[admissions.index.repeat(counts)].reset_index(drop=True)
    n = len(ecg)
    admit, disch = ecg["admittime"], ecg["dischtime"]
    stay_s = (disch - admit).dt.total_seconds().clip(lower=3600).to_numpy()
    where = rng.random(n)
    # 50% in the first 12 h (the admission ECG), 30% later in the stay, 12% in the ED before admission,
    # 8% at an outpatient visit weeks away (these do not link to an admission, as in MIMIC-IV-ECG).
    offset = np.where(where < 0.5, rng.uniform(0, np.minimum(12 * 3600, stay_s)), rng.uniform(0, stay_s))
    offset = np.where((where >= 0.8) & (where < 0.92), -rng.uniform(0.5, 12, n) * 3600, offset)
    away = rng.uniform(7, 180, n) * 86400
    before = rng.random(n) < 0.5
    outpatient = where >= 0.92
    offset = np.where(outpatient & before, -away, offset)
    offset = np.where(outpatient & ~before, stay_s + away, offset)
    ecg["ecg_time"] = (admit + pd.to_timedelta(offset, unit="s")).dt.floor("min")
    return ecg


def _findings(ecg: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Draw each ECG's findings from the admission's latent conditions."""
    n = len(ecg)
    u = rng.random((n, 6))
    cond = {
        k: _col(ecg, f"cond_{k}") > 0 for k in ("atrial_fibrillation", "conduction_disease", "hypertension")
    }
    cond |= {k: _col(ecg, f"cond_{k}") > 0 for k in ("heart_failure", "myocardial_infarction", "sepsis")}
    sev = {k: _col(ecg, f"sev_{k}") for k in cond}
    out = pd.DataFrame(index=ecg.index)
    out["af"] = cond["atrial_fibrillation"] & (u[:, 0] < 0.65 + 0.35 * sev["atrial_fibrillation"])
    bbb = cond["conduction_disease"] & (u[:, 1] < 0.85 + 0.15 * sev["conduction_disease"])
    out["lbbb"] = bbb & ecg["lbbb"].to_numpy()
    out["rbbb"] = bbb & ~ecg["lbbb"].to_numpy()
    out["avb1"] = cond["conduction_disease"] & (sev["conduction_disease"] > 0.7) & ~out["af"]
    lvh_drive = np.maximum(
        np.where(cond["hypertension"], sev["hypertension"], 0),
        np.where(cond["heart_failure"], sev["heart_failure"], 0),
    )
    out["lvh"] = (lvh_drive > 0.35) & (u[:, 2] < 0.9) & ~out["lbbb"]
    out["lvh_strain"] = out["lvh"] & (lvh_drive > 0.75)
    mi = cond["myocardial_infarction"] & (u[:, 3] < 0.85)
    out["mi_inferior"] = mi & ecg["inferior"].to_numpy()
    out["mi_anterior"] = mi & ~ecg["inferior"].to_numpy()
    hr = 70 + ecg["hr_offset"].to_numpy() + rng.normal(0, 7, n)
    hr += np.where(cond["sepsis"], 18 + 30 * sev["sepsis"], 0) + np.where(cond["heart_failure"], 5, 0)
    hr = np.where(out["af"], rng.uniform(80, 135, n) + np.where(cond["sepsis"], 15, 0), hr)
    out["heart_rate"] = np.clip(hr, 42, 160)
    bad = u[:, 4] < 0.02
    out["bad_lead"] = np.where(bad, np.array(MIMIC_LEADS)[rng.integers(0, 12, n)], "")
    out["bad_lead_kind"] = np.where(bad, np.where(u[:, 5] < 0.5, "flat", "noise"), "")
    out["noise_sd"] = rng.uniform(0.005, 0.03, n)
    out["wander"] = rng.random(n) < 0.4
    out["mains"] = rng.random(n) < 0.1
    return out


def _statements(f: pd.DataFrame) -> list[list[str]]:
    """Machine statements (as in MIMIC-IV-ECG's report_k columns) for each ECG's findings."""
    reports = []
    for row in f.itertuples(index=False):
        if row.af:
            rep = ["Atrial fibrillation"]
        elif row.heart_rate > 100:
            rep = ["Sinus tachycardia"]
        elif row.heart_rate < 60:
            rep = ["Sinus bradycardia"]
        else:
            rep = ["Sinus rhythm"]
        rep += ["1st degree A-V block"] * int(row.avb1)
        rep += ["Left bundle branch block"] * int(row.lbbb) + ["Right bundle branch block"] * int(row.rbbb)
        rep += ["Left ventricular hypertrophy"] * int(row.lvh)
        rep += ["Inferior infarct - age undetermined"] * int(row.mi_inferior)
        rep += ["Anterior infarct - age undetermined"] * int(row.mi_anterior)
        if row.bad_lead:
            rep.append(f"Lead(s) unsuitable for analysis: {row.bad_lead}")
        major = row.af or row.avb1 or row.lbbb or row.rbbb or row.lvh or row.mi_inferior or row.mi_anterior
        minor = rep[0] != "Sinus rhythm" or row.bad_lead  # a rate or quality remark only
        rep.append("Abnormal ECG" if major else "Borderline ECG" if minor else "Normal ECG")
        reports.append(rep)
    return reports


def _components(f: pd.DataFrame, ecg: pd.DataFrame, rr: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-ECG wave amplitudes, centres, widths and directions (n x K [x 3]) from its findings."""
    n = len(f)
    amp = np.tile([c[0] for c in _NORMAL], (n, 1))
    ctr = np.tile([c[1] for c in _NORMAL], (n, 1))
    wid = np.tile([c[2] for c in _NORMAL], (n, 1))
    dirs = np.tile(np.stack([c[3] for c in _NORMAL]), (n, 1, 1))
    ctr[:, T] = 0.30 * np.sqrt(rr)  # QT shortens as the heart speeds up
    af, lbbb, rbbb = f["af"].to_numpy(), f["lbbb"].to_numpy(), f["rbbb"].to_numpy()
    amp[af, P] = 0.0
    ctr[f["avb1"].to_numpy(), P] = -0.24
    # LBBB: septum depolarises left-to-right (no septal q), slow notched leftward-posterior R, discordant T.
    amp[lbbb, SEPTAL], amp[lbbb, S] = 0.0, 0.0
    amp[lbbb, R], wid[lbbb, R], dirs[lbbb, R] = 0.9, 0.025, _unit([0.8, 0.2, -0.55])
    amp[lbbb, R2] = 1.0
    dirs[lbbb, T] = _unit([-0.7, -0.1, 0.6])
    # RBBB: late slow rightward-anterior forces (R' in V1, broad S in I/V6), T inverted in V1-V2.
    amp[rbbb, RBBB] = 0.6
    dirs[rbbb, T] = _unit([0.7, 0.6, -0.3])
    lvh = f["lvh"].to_numpy()
    boost = np.where(lvh, 2.0 + 0.6 * np.clip(_col(ecg, "sev_hypertension"), 0, 1), 1.0)
    amp[:, R] *= boost
    amp[:, S] *= boost
    dirs[lvh, R] = _unit([0.85, 0.35, -0.45])
    dirs[f["lvh_strain"].to_numpy(), T] = _unit([-0.5, 0.2, 0.5])
    inf, ant = f["mi_inferior"].to_numpy(), f["mi_anterior"].to_numpy()
    # Dead myocardium: initial forces point away from the territory (Q waves), T turns away too.
    amp[inf | ant, INFARCT] = 0.5
    dirs[ant, INFARCT] = _unit([0.2, 0.0, -1.0])
    amp[ant, SEPTAL] = 0.0
    dirs[inf, R] = _unit(dirs[inf, R] * [1.0, 0.3, 1.0])
    dirs[inf & ~lbbb, T] = _unit([0.7, -0.4, 0.2])
    dirs[ant & ~lbbb, T] = _unit([0.6, 0.5, -0.6])
    rot = _rotation(ecg["rot_z"].to_numpy(), ecg["rot_y"].to_numpy())
    dirs = np.einsum("nij,nkj->nki", rot, dirs)
    amp *= ecg["scale"].to_numpy()[:, None]
    return amp, ctr, wid, dirs


def _rr_series(f: pd.DataFrame, rng: np.random.Generator, max_beats: int) -> np.ndarray:
    """R-peak times (s) per ECG, n x max_beats, the first one within the first RR interval before 0."""
    n = len(f)
    mean_rr = 60.0 / f["heart_rate"].to_numpy()
    jitter = np.where(
        f["af"].to_numpy()[:, None], rng.normal(0, 0.18, (n, max_beats)), rng.normal(0, 0.015, (n, max_beats))
    )
    rr = np.clip(mean_rr[:, None] * np.exp(jitter), 0.28, 2.0)
    start = -rng.uniform(0, 1, n) * mean_rr
    return start[:, None] + np.cumsum(rr, axis=1) - rr[:, :1]


def _synthesise(
    amp, ctr, wid, dirs, r_times, f: pd.DataFrame, rng: np.random.Generator, fs: int
) -> np.ndarray:
    """Signals in mV, shape (batch, 12, n_samples), float32."""
    b = len(amp)
    n_samp = int(round(DURATION_S * fs))
    tau = TEMPLATE_START_S + np.arange(int(round((TEMPLATE_END_S - TEMPLATE_START_S) * fs))) / fs
    length = len(tau)
    gauss = np.exp(-0.5 * ((tau[None, None, :] - ctr[:, :, None]) / wid[:, :, None]) ** 2)
    template = np.einsum("bk,bkd,bkl->bdl", amp, dirs, gauss).astype(np.float32)
    start = np.round((r_times + TEMPLATE_START_S) * fs).astype(np.int64) + length
    keep = (start >= 0) & (start < n_samp + length)
    impulses = np.zeros((b, 1, n_samp + length), np.float32)
    rows = np.broadcast_to(np.arange(b)[:, None], start.shape)
    impulses[rows[keep], 0, start[keep]] = 1.0
    vcg = fftconvolve(impulses, template, axes=-1)[:, :, length : length + n_samp]
    t = np.arange(n_samp, dtype=np.float32) / fs
    af = np.flatnonzero(f["af"].to_numpy())
    if len(af):  # fibrillatory waves, best seen in V1 and the inferior leads
        freq = rng.uniform(4.5, 8.0, (len(af), 3, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (len(af), 3, 1)).astype(np.float32)
        size = rng.uniform(0.02, 0.05, (len(af), 3, 1)).astype(np.float32)
        wave = (size * np.sin(2 * np.pi * freq * t + phase)).sum(1)
        vcg[af] += wave[:, None, :] * _unit([-0.2, 0.6, 0.75])[None, :, None].astype(np.float32)
    sig = np.einsum("ld,bdn->bln", LEAD_MATRIX.astype(np.float32), vcg.astype(np.float32))
    # White noise: random-offset windows of one random bank per batch (drawing 60k normals per record
    # dominated the run time). Windows may overlap, which only repeats noise time-shifted in another lead.
    bank = rng.standard_normal(1 << 20, dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(bank, n_samp)
    offsets = rng.integers(0, len(windows), (b, 12))
    sig += windows[offsets] * f["noise_sd"].to_numpy(np.float32)[:, None, None]
    wander = np.flatnonzero(f["wander"].to_numpy())
    if len(wander):  # baseline wander: two slow components per record, mixed differently into each lead
        freq = rng.uniform(0.05, 0.5, (len(wander), 2, 1)).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (len(wander), 2, 1)).astype(np.float32)
        mix = rng.uniform(-0.35, 0.35, (len(wander), 12, 2)).astype(np.float32)
        sig[wander] += mix @ np.sin(2 * np.pi * freq * t + phase)
    mains = np.flatnonzero(f["mains"].to_numpy())
    if len(mains) and fs > 120:
        sig[mains] += 0.02 * np.sin(2 * np.pi * 60.0 * t).astype(np.float32)
    lead_pos = {name: i for i, name in enumerate(MIMIC_LEADS)}
    for i, (lead, kind) in enumerate(zip(f["bad_lead"], f["bad_lead_kind"], strict=True)):
        if lead:
            j = lead_pos[lead]
            sig[i, j] = 0.0 if kind == "flat" else rng.normal(0, 0.4, n_samp)
    return sig


def _measurements(f: pd.DataFrame, amp, dirs, r_times, rng: np.random.Generator) -> pd.DataFrame:
    """Interval and axis measurements (ms, degrees) in machine_measurements.csv's units."""
    n = len(f)
    rr = np.diff(r_times, axis=1).mean(axis=1)
    qrs = np.select(
        [f["lbbb"].to_numpy(), f["rbbb"].to_numpy()],
        [rng.uniform(140, 170, n), rng.uniform(125, 150, n)],
        rng.uniform(80, 104, n),
    )
    p_onset = rng.integers(30, 60, n).astype(float)
    pr = np.where(f["avb1"].to_numpy(), rng.uniform(220, 260, n), rng.uniform(130, 190, n))
    qrs_onset = p_onset + pr
    qt = 400 * np.sqrt(rr) + rng.normal(0, 12, n)

    def axis(k):  # frontal-plane angle of a wave's dipole, as the cart reports it
        return np.round(np.degrees(np.arctan2(dirs[:, k, 1], dirs[:, k, 0]))).astype(int)

    af = f["af"].to_numpy()
    return pd.DataFrame(
        {
            "rr_interval": np.round(rr * 1000).astype(int),
            "p_onset": np.where(af, MISSING_MEASUREMENT, p_onset).astype(int),
            "p_end": np.where(af, MISSING_MEASUREMENT, p_onset + 100).astype(int),
            "qrs_onset": qrs_onset.astype(int),
            "qrs_end": (qrs_onset + qrs).astype(int),
            "t_end": (qrs_onset + qt).astype(int),
            "p_axis": np.where(af, MISSING_MEASUREMENT, axis(P)),
            "qrs_axis": axis(R),
            "t_axis": axis(T),
        }
    )


def _header(
    name: str, fs: int, n_samp: int, when: pd.Timestamp, init: np.ndarray, checksum: np.ndarray
) -> str:
    """A WFDB header identical to what ``wfdb.wrsamp`` writes for format 16, gain 200/mV."""
    lines = [f"{name} 12 {fs} {n_samp} {when:%H:%M:%S} {when:%d/%m/%Y}"]
    lines += [
        f"{name}.dat 16 {ADC_GAIN}(0)/mV 16 0 {int(i)} {int(c)} 0 {lead}"
        for lead, i, c in zip(MIMIC_LEADS, init, checksum, strict=True)
    ]
    return "\n".join(lines) + "\n"


def write_ecg_world(
    out_dir,
    admissions: pd.DataFrame,
    truth: pd.DataFrame,
    seed: int = 0,
    fs: int = 500,
    ecgs_per_admission: tuple[int, int] = (1, 2),
    batch_size: int = 128,
    progress: bool = True,
) -> dict:
    """Write ``out_dir/ecg`` in the MIMIC-IV-ECG layout for the given admissions and latent truth.

    ``admissions`` needs subject_id, hadm_id, admittime, dischtime; ``truth`` one row per hadm_id with
    ``cond_<name>``/``sev_<name>`` columns (missing conditions count as absent). Writes
    ``record_list.csv``, ``machine_measurements.csv``, WFDB files under ``files/`` and
    ``ecg_truth.parquet`` (synthetic only: each ECG's drawn findings). Deterministic for a given seed.
    Returns counts, paths and the elapsed seconds.
    """
    t0 = time.perf_counter()
    need = {"subject_id", "hadm_id", "admittime", "dischtime"}
    if missing := need - set(admissions.columns):
        raise ValueError(f"admissions is missing columns {sorted(missing)}")
    if admissions.empty:
        raise ValueError("admissions is empty: there is no admission to write ECGs for")
    if "hadm_id" not in truth.columns:
        raise ValueError("truth needs a hadm_id column")
    adm = admissions[sorted(need)].copy()
    adm["admittime"], adm["dischtime"] = pd.to_datetime(adm["admittime"]), pd.to_datetime(adm["dischtime"])
    latent = truth[[c for c in truth.columns if c.startswith(("cond_", "sev_")) or c == "hadm_id"]]
    adm = adm.merge(latent, on="hadm_id", how="left").sort_values(["subject_id", "admittime", "hadm_id"])
    adm = adm.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    ecg = _schedule(adm, rng, ecgs_per_admission)
    ecg = ecg.merge(_patient_traits(ecg["subject_id"].unique(), seed), on="subject_id", how="left")
    n = len(ecg)
    study_ids = 40_000_000 + np.sort(rng.choice(10_000_000, size=n, replace=False))
    ecg["study_id"] = rng.permutation(study_ids)
    found = _findings(ecg, rng)
    # Enough beats to fill 10 s at the fastest rate, with margin for AF runs of short RR intervals.
    max_beats = int(np.ceil((DURATION_S + 1.5) * found["heart_rate"].max() / 60 / 0.7)) + 2
    r_times = _rr_series(found, rng, max_beats)
    amp, ctr, wid, dirs = _components(found, ecg, 60.0 / found["heart_rate"].to_numpy())
    subj = ecg["subject_id"].astype("int64").astype(str)
    sid = ecg["study_id"].astype(str)
    ecg["path"] = "files/p" + subj.str[:4] + "/p" + subj + "/s" + sid + "/" + sid
    n_samp = int(round(DURATION_S * fs))
    out_dir = Path(out_dir)
    with atomic_dir(out_dir / "ecg") as tmp:
        for lo in tqdm(range(0, n, batch_size), desc="synthetic ECGs", unit="batch", disable=not progress):
            sl = slice(lo, lo + batch_size)
            fb = found.iloc[sl].reset_index(drop=True)
            sig = _synthesise(amp[sl], ctr[sl], wid[sl], dirs[sl], r_times[sl], fb, rng, fs)
            sig *= ADC_GAIN
            digital = np.clip(np.rint(sig, out=sig), -32767, 32767, out=sig).astype("<i2")
            checksums = digital.sum(axis=2, dtype=np.int64) % 65536
            for i, (path, when) in enumerate(
                zip(ecg["path"].iloc[sl], ecg["ecg_time"].iloc[sl], strict=True)
            ):
                target = tmp / path
                target.parent.mkdir(parents=True, exist_ok=True)
                np.ascontiguousarray(digital[i].T).tofile(target.with_suffix(".dat"))
                header = _header(target.name, fs, n_samp, when, digital[i, :, 0], checksums[i])
                target.with_suffix(".hea").write_text(header)
        times = ecg["ecg_time"].dt.strftime("%Y-%m-%d %H:%M:%S")
        record_list = pd.DataFrame(
            {
                "subject_id": ecg["subject_id"],
                "study_id": ecg["study_id"],
                "file_name": sid,
                "ecg_time": times,
            }
        )
        record_list["path"] = ecg["path"]
        record_list.to_csv(tmp / "record_list.csv", index=False)
        reports = _statements(found)
        mm = pd.DataFrame(
            {
                "subject_id": ecg["subject_id"],
                "study_id": ecg["study_id"],
                "cart_id": rng.choice(np.arange(6000, 6040), size=n),
                "ecg_time": times,
            }
        )
        for k in range(N_REPORT):
            mm[f"report_{k}"] = [r[k] if k < len(r) else None for r in reports]
        mm["bandwidth"], mm["filtering"] = "0.005-150 Hz", "60 Hz notch Baseline filter"
        mm = pd.concat([mm, _measurements(found, amp, dirs, r_times, rng)], axis=1)
        mm.to_csv(tmp / "machine_measurements.csv", index=False)
        truth_out = pd.concat([ecg[["subject_id", "hadm_id", "study_id", "ecg_time", "path"]], found], axis=1)
        truth_out["report"] = ["; ".join(r) for r in reports]
        truth_out.to_parquet(tmp / "ecg_truth.parquet", index=False)
    ecg_dir = out_dir / "ecg"
    return {
        "n_ecgs": n,
        "n_subjects": int(ecg["subject_id"].nunique()),
        "fs": fs,
        "ecg_dir": str(ecg_dir),
        "record_list": str(ecg_dir / "record_list.csv"),
        "machine_measurements": str(ecg_dir / "machine_measurements.csv"),
        "ecg_truth": str(ecg_dir / "ecg_truth.parquet"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
