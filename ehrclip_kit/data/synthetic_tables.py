"""MIMIC-IV v2.2 tables of the synthetic world, built from the simulated admissions (see ``synthetic.py``).

Each builder takes the per-admission frame ``adm`` (latent state, times as epoch seconds, -1 = none) and a
numpy Generator and returns pyarrow tables with exactly MIMIC-IV's columns, order and value conventions.
:class:`CsvGzWriter` writes them as deterministic gzip CSV (no timestamp or file name in the gzip header,
so the same seed gives byte-identical files) in streamed chunks, fast enough for MIMIC-scale worlds.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from ehrclip_kit.data import synthetic_catalog as cat

DAY, HOUR, MINUTE = 86400, 3600, 60
YEAR = 365.2425 * DAY
ICD10_START = 2015.75  # the US switched to ICD-10 on 2015-10-01 (real, not shifted, time)


class CsvGzWriter:
    """Stream pyarrow tables (or DataFrames) into one deterministic ``.csv.gz`` file with a fixed header.

    Values never get quoted unless they must (as in MIMIC's files); a chunk with a comma, quote or newline
    in a value is written by pandas with minimal quoting instead of pyarrow.
    """

    def __init__(self, path: str | Path, columns: list[str], level: int = 6):
        self.columns = list(columns)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31 = gzip container, mtime 0, no name
        self._file.write(self._zip.compress((",".join(self.columns) + "\n").encode()))
        self.rows = 0

    def write(self, table: pa.Table | pd.DataFrame) -> None:
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if table.column_names != self.columns:
            raise ValueError(f"columns {table.column_names} differ from the file's header {self.columns}")
        sink = pa.BufferOutputStream()
        try:
            pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
            data = memoryview(sink.getvalue())
        except pa.ArrowInvalid:  # a value needs quoting
            text = io.StringIO()
            table.to_pandas().to_csv(text, index=False, header=False, lineterminator="\n",
                                     float_format="%.15g", date_format="%Y-%m-%d %H:%M:%S")
            data = text.getvalue().encode()
        self._file.write(self._zip.compress(data))
        self.rows += table.num_rows

    def close(self) -> None:
        self._file.write(self._zip.flush())
        self._file.close()


def write_table(path: Path, table: pa.Table | pd.DataFrame, level: int = 6) -> int:
    """Write one whole table; returns its row count."""
    columns = table.column_names if isinstance(table, pa.Table) else list(table.columns)
    writer = CsvGzWriter(path, columns, level)
    writer.write(table)
    writer.close()
    return writer.rows


def ts(seconds, null=None) -> pa.Array:
    """Epoch seconds -> timestamp array ('YYYY-MM-DD HH:MM:SS' in CSV); negative means missing."""
    seconds = np.asarray(seconds, dtype=np.int64)
    mask = seconds < 0 if null is None else null
    return pa.array(seconds, mask=mask).cast(pa.timestamp("s"))


def dates(seconds) -> pa.Array:
    """Epoch seconds -> date array ('YYYY-MM-DD'); negative means missing."""
    seconds = np.asarray(seconds, dtype=np.int64)
    return pa.array((seconds // DAY).astype(np.int32), mask=seconds < 0).cast(pa.date32())


def strings(values, null=None) -> pa.Array:
    return pa.array(np.asarray(values, dtype=object).astype(str), mask=null)


def icd10_flags(adm: pd.DataFrame) -> np.ndarray:
    """True where the admission's real (un-shifted) date is on or after 2015-10-01."""
    shifted = 1970 + adm["admittime"].to_numpy() / YEAR
    return adm["real_anchor"].to_numpy() + shifted - adm["anchor_year"].to_numpy() >= ICD10_START


def providers(rng: np.random.Generator, n: int = 800) -> np.ndarray:
    """A pool of MIMIC-style provider ids ('P' + 5 characters)."""
    chars = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    return np.array(["P" + "".join(row) for row in chars[rng.integers(0, 36, (n, 5))]])


def _choice(rng, options, n, p=None) -> np.ndarray:
    return np.asarray(options, dtype=object)[rng.choice(len(options), size=n, p=p)]


def patients_table(pat: pd.DataFrame) -> pa.Table:
    return pa.table({
        "subject_id": pat["subject_id"].to_numpy(), "gender": np.where(pat["male"], "M", "F"),
        "anchor_age": pat["anchor_age"].to_numpy(), "anchor_year": pat["anchor_year"].to_numpy(),
        "anchor_year_group": pat["anchor_year_group"].to_numpy().astype(str), "dod": dates(pat["dod"]),
    })


def admissions_table(adm: pd.DataFrame, pat: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """The admissions table and each admission's discharge_location (None when not recorded)."""
    n = len(adm)
    kind, ed = adm["kind"].to_numpy(), adm["ed"].to_numpy()
    atype = np.select(
        [kind == 2, kind == 1],
        [_choice(rng, ["ELECTIVE", "SURGICAL SAME DAY ADMISSION"], n, [0.4, 0.6]),
         _choice(rng, ["OBSERVATION ADMIT", "EU OBSERVATION", "DIRECT OBSERVATION", "AMBULATORY OBSERVATION"], n,
                 [0.5, 0.3, 0.12, 0.08])],
        _choice(rng, ["EW EMER.", "URGENT", "DIRECT EMER."], n, [0.72, 0.18, 0.10]),
    )
    location = np.where(
        ed, _choice(rng, ["EMERGENCY ROOM", "WALK-IN/SELF REFERRAL"], n, [0.93, 0.07]),
        np.where(kind == 2, _choice(rng, ["PHYSICIAN REFERRAL", "PROCEDURE SITE"], n, [0.8, 0.2]),
                 _choice(rng, ["TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL", "CLINIC REFERRAL",
                               "TRANSFER FROM SKILLED NURSING FACILITY"], n, [0.45, 0.3, 0.15, 0.1])))
    age = adm["age"].to_numpy()
    burden = sum(adm[f"sev_{c}"].to_numpy() for c in ("heart_failure", "ckd", "copd", "cirrhosis", "cancer"))
    u = rng.random(n)
    p_snf = np.clip(0.04 + 0.012 * np.maximum(age - 60, 0) + 0.08 * burden, 0, 0.6)
    p_hhc = 0.25 + 0.1 * adm["social_lives_alone"].to_numpy()
    p_ama = 0.01 + 0.06 * (adm["social_substance_use"].to_numpy() | adm["social_nonadherence"].to_numpy())
    p_hospice = 0.25 * adm["cond_cancer"].to_numpy() * (adm["sev_cancer"].to_numpy() > 0.75)
    cuts = np.cumsum(np.stack([p_hospice, p_ama, p_snf, 0.25 * p_snf, p_hhc]), axis=0)
    disch_loc = np.select(
        [u < cuts[0], u < cuts[1], u < cuts[2], u < cuts[3], u < cuts[4]],
        ["HOSPICE", "AGAINST ADVICE", "SKILLED NURSING FACILITY",
         _choice(rng, ["REHAB", "CHRONIC/LONG TERM ACUTE CARE"], n, [0.6, 0.4]), "HOME HEALTH CARE"], "HOME")
    disch_loc = np.where(adm["died"].to_numpy(), "DIED", disch_loc).astype(object)
    disch_loc[~adm["died"].to_numpy() & (rng.random(n) < 0.08)] = None  # MIMIC leaves some blank
    medicaid = adm["social_housing_instability"].to_numpy() | adm["social_substance_use"].to_numpy()
    insurance = np.where(age >= 65, np.where(rng.random(n) < 0.85, "Medicare", "Other"),
                         np.where(rng.random(n) < np.where(medicaid, 0.6, 0.15), "Medicaid", "Other"))
    alone = adm["social_lives_alone"].to_numpy().astype(bool)
    marital = np.where(alone, _choice(rng, ["SINGLE", "WIDOWED", "DIVORCED"], n, [0.45, 0.35, 0.2]),
                       _choice(rng, ["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"], n, [0.6, 0.25, 0.08, 0.07]))
    # Patient-level demographics, drawn once per patient from a patient-indexed stream.
    pid = adm["pid"].to_numpy()
    n_pat = int(pat["pid"].max()) + 1
    race = _choice(rng, ["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN",
                         "UNKNOWN", "OTHER", "WHITE - OTHER EUROPEAN", "BLACK/CAPE VERDEAN",
                         "HISPANIC OR LATINO", "UNABLE TO OBTAIN"], n_pat,
                   [0.62, 0.15, 0.04, 0.04, 0.05, 0.03, 0.02, 0.02, 0.02, 0.01])[pid]
    language = np.where(rng.random(n_pat) < 0.92, "ENGLISH", "?")[pid]
    prov = providers(rng)
    table = pa.table({
        "subject_id": adm["subject_id"].to_numpy(), "hadm_id": adm["hadm_id"].to_numpy(),
        "admittime": ts(adm["admittime"]), "dischtime": ts(adm["dischtime"]), "deathtime": ts(adm["deathtime"]),
        "admission_type": strings(atype), "admit_provider_id": strings(prov[rng.integers(0, len(prov), n)]),
        "admission_location": strings(location), "discharge_location": strings(disch_loc, pd.isna(disch_loc)),
        "insurance": strings(insurance), "language": strings(language),
        "marital_status": strings(marital, rng.random(n) < 0.04), "race": strings(race),
        "edregtime": ts(adm["edregtime"]), "edouttime": ts(adm["edouttime"]),
        "hospital_expire_flag": adm["died"].to_numpy().astype(np.int64),
    })
    return table, disch_loc


def diagnoses_tables(adm: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, pd.DataFrame]:
    """diagnoses_icd and the d_icd_diagnoses rows of the codes used (real titles)."""
    n = len(adm)
    icd10 = icd10_flags(adm)
    rows_adm, rows_code, rows_pri = [], [], []

    def add(mask, codes9, codes10, q, priority):
        i = np.flatnonzero(mask)
        q = np.clip(q[i], 0, 0.999)
        c9 = np.asarray(codes9, dtype=object)[(q * len(codes9)).astype(int)]
        c10 = np.asarray(codes10, dtype=object)[(q * len(codes10)).astype(int)]
        rows_adm.append(i)
        rows_code.append(np.where(icd10[i], c10, c9))
        rows_pri.append(priority + rng.random(i.size))

    cond = {c: adm[f"cond_{c}"].to_numpy().astype(bool) for c in cat.DX_CODES if f"cond_{c}" in adm}
    sev = {c: adm[f"sev_{c}"].to_numpy() for c in cond}
    for c in cond:
        if c == "sepsis":
            continue
        p_code = {"hypertension": 0.75, "atrial_fibrillation": 0.85}.get(c, 0.2 + 0.5 * sev[c])
        if c in ("pneumonia", "acute_mi"):
            p_code = 0.75 + 0.25 * sev[c]
        coded = cond[c] & (rng.random(n) < p_code)
        false_pos = ~cond[c] & (rng.random(n) < 0.03)
        q = np.where(cond[c], sev[c] + rng.normal(0, 0.2, n), rng.random(n) * 0.5)
        if c == "hypertension":
            ckd = cond["ckd"]
            add((coded | false_pos) & ckd, *cat.DX_CODES["hypertension_ckd"], q, 1)
            coded, false_pos = coded & ~ckd, false_pos & ~ckd
        add(coded | false_pos, *cat.DX_CODES[c], q, 0 if c in ("pneumonia", "acute_mi") else 1)
    s = sev["sepsis"]
    sepsis = cond["sepsis"] & (rng.random(n) < 0.75 + 0.25 * s)
    add(sepsis | (rng.random(n) < 0.005), ("0389",), ("A419",), np.zeros(n), 0)
    add(sepsis & (s >= 0.5), ("99592",), ("R6520",), np.zeros(n), 0.5)
    add(sepsis & (s < 0.5), ("99591",), ("A419",), np.zeros(n), 0.5)
    add(sepsis & (s > 0.8), ("78552",), ("R6521",), np.zeros(n), 0.5)
    cancer = adm["cond_cancer"].to_numpy().astype(bool) & (rng.random(n) < 0.45 + 0.5 * adm["sev_cancer"].to_numpy())
    site = adm["cancer_site"].to_numpy()
    for k, name in enumerate(cat.CANCER_SITES):
        add(cancer & (site == k), (cat.CANCER_CODES[name][0],), (cat.CANCER_CODES[name][1],), np.zeros(n), 1)
    meta = cancer & (adm["sev_cancer"].to_numpy() > 0.6) & (rng.random(n) < 0.7)
    which = rng.random(n) < 0.5
    for k, (c9, c10) in enumerate(cat.METASTASIS_CODES):
        add(meta & (which == bool(k)), (c9,), (c10,), np.zeros(n), 1.5)
    for s_name, p in (("housing_instability", 0.25), ("substance_use", 0.35), ("nonadherence", 0.15),
                      ("lives_alone", 0.05)):
        has = adm[f"social_{s_name}"].to_numpy().astype(bool)
        add(has & (rng.random(n) < p), *cat.DX_CODES[s_name], rng.random(n), 2.5)
    sv = {c: adm[f"sev_{c}"].to_numpy() for c in ("sepsis", "ckd", "heart_failure", "cirrhosis", "cancer", "copd",
                                                  "pneumonia", "conduction_disease")}
    has = {c: adm[f"cond_{c}"].to_numpy().astype(bool) for c in ("atrial_fibrillation", "myocardial_infarction",
                                                                 "cirrhosis", "cancer", "copd", "ckd")}
    proxy_p = {
        "aki": 0.05 + 0.5 * sv["sepsis"] + 0.35 * sv["ckd"], "hyperkalemia": 0.02 + 0.3 * sv["ckd"],
        "hyponatremia": 0.03 + 0.25 * (sv["heart_failure"] + sv["cirrhosis"]),
        "anemia": 0.08 + 0.25 * (has["ckd"] | has["cancer"] | has["cirrhosis"]),
        "anticoagulant": 0.5 * has["atrial_fibrillation"], "cabg": 0.2 * has["myocardial_infarction"],
        "pacemaker": 0.5 * (sv["conduction_disease"] > 0.6), "pulm_htn": 0.01 + 0.2 * (sv["heart_failure"] + sv["copd"]),
        "malnutrition": 0.01 + 0.2 * (sv["cancer"] + sv["cirrhosis"]), "tobacco": 0.1 + 0.4 * has["copd"],
        "resp_failure": 0.01 + 0.4 * sv["pneumonia"] + 0.2 * sv["copd"], "hypotension": 0.03 + 0.4 * sv["sepsis"],
        "acidosis": 0.02 + 0.3 * sv["sepsis"] + 0.1 * sv["ckd"], "gi_bleed": 0.02 + 0.15 * has["cirrhosis"],
    }
    for name, p in proxy_p.items():
        c9, c10 = cat.PROXY_CODES[name]
        add(rng.random(n) < p, (c9,), (c10,), np.zeros(n), 2)
    for c9, c10 in cat.NOISE_CODES:
        add(rng.random(n) < 0.12, (c9,), (c10,), np.zeros(n), 3)
    a, code, pri = np.concatenate(rows_adm), np.concatenate(rows_code), np.concatenate(rows_pri)
    version = np.where(icd10[a], 10, 9)
    frame = pd.DataFrame({"a": a, "code": code, "version": version, "pri": pri})
    frame = frame.sort_values(["a", "pri"], kind="stable").drop_duplicates(["a", "code", "version"])
    frame["seq_num"] = frame.groupby("a").cumcount() + 1
    a = frame["a"].to_numpy()
    table = pa.table({
        "subject_id": adm["subject_id"].to_numpy()[a], "hadm_id": adm["hadm_id"].to_numpy()[a],
        "seq_num": frame["seq_num"].to_numpy(), "icd_code": strings(frame["code"]),
        "icd_version": frame["version"].to_numpy(),
    })
    used = frame[["code", "version"]].drop_duplicates().sort_values(["version", "code"])
    d_icd = pd.DataFrame({"icd_code": used["code"].to_numpy(), "icd_version": used["version"].to_numpy(),
                          "long_title": [cat.DX_TITLES[(c, v)] for c, v in zip(used["code"], used["version"], strict=True)]})
    return table, d_icd


def procedures_tables(adm: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, pd.DataFrame, pd.DataFrame]:
    """procedures_icd (ICD-9 / ICD-10-PCS, chartdate), d_icd_procedures of the codes used, and (a, name) rows."""
    n = len(adm)
    sv = {c: adm[f"sev_{c}"].to_numpy() for c in ("sepsis", "pneumonia", "ckd", "cirrhosis", "conduction_disease",
                                                  "cancer")}
    has = {c: adm[f"cond_{c}"].to_numpy().astype(bool) for c in ("acute_mi", "heart_failure", "atrial_fibrillation",
                                                                 "cancer", "cirrhosis", "ckd")}
    icu = adm["icu_in"].to_numpy() >= 0
    vent = icu & (rng.random(n) < 0.25 + 0.4 * np.maximum(sv["sepsis"], sv["pneumonia"]))
    lung = has["cancer"] & (adm["cancer_site"].to_numpy() == 0)
    plan = {
        "ventilation": vent, "intubation": vent & (rng.random(n) < 0.7), "central_line": icu & (rng.random(n) < 0.45),
        "hemodialysis": (sv["ckd"] > 0.75) & (rng.random(n) < 0.6),
        "pci": has["acute_mi"] & (rng.random(n) < 0.55),
        "cardiac_cath": (has["acute_mi"] & (rng.random(n) < 0.75)) | (has["heart_failure"] & (rng.random(n) < 0.05)),
        "transfusion": rng.random(n) < 0.04 + 0.2 * (has["cancer"] | has["cirrhosis"] | (sv["ckd"] > 0.6)),
        "paracentesis": has["cirrhosis"] & (rng.random(n) < 0.1 + 0.45 * sv["cirrhosis"]),
        "thoracentesis": (has["heart_failure"] | has["cancer"]) & (rng.random(n) < 0.06),
        "echo": rng.random(n) < 0.3 * has["heart_failure"] + 0.1 * has["atrial_fibrillation"] + 0.02,
        "pacemaker": (sv["conduction_disease"] > 0.7) & (rng.random(n) < 0.35),
        "egd": rng.random(n) < 0.02 + 0.2 * has["cirrhosis"], "bronchoscopy": lung & (rng.random(n) < 0.15),
        "urinary_catheter": rng.random(n) < 0.05,
    }
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    when = admit + rng.random(n) * (disch - admit)
    a_list, name_list, t_list = [], [], []
    for name, mask in plan.items():
        i = np.flatnonzero(mask)
        t = np.where(icu[i] & (name in ("ventilation", "intubation", "central_line")), adm["icu_in"].to_numpy()[i],
                     admit[i] + (0.3 if name in ("pci", "cardiac_cath") else 1) * (when[i] - admit[i]))
        a_list.append(i)
        name_list.append(np.full(i.size, name, dtype=object))
        t_list.append(t.astype(np.int64))
    a, names, t = np.concatenate(a_list), np.concatenate(name_list), np.concatenate(t_list)
    icd10 = icd10_flags(adm)[a]
    info = cat.PROCEDURES
    code = np.array([info[k][2] if ten else info[k][0] for k, ten in zip(names, icd10, strict=True)], dtype=object)
    frame = pd.DataFrame({"a": a, "t": t, "code": code, "version": np.where(icd10, 10, 9), "name": names})
    frame = frame.sort_values(["a", "t", "code"], kind="stable")
    frame["seq_num"] = frame.groupby("a").cumcount() + 1
    a = frame["a"].to_numpy()
    table = pa.table({
        "subject_id": adm["subject_id"].to_numpy()[a], "hadm_id": adm["hadm_id"].to_numpy()[a],
        "seq_num": frame["seq_num"].to_numpy(), "chartdate": dates(frame["t"]), "icd_code": strings(frame["code"]),
        "icd_version": frame["version"].to_numpy(),
    })
    used = frame[["code", "version", "name"]].drop_duplicates(["code", "version"]).sort_values(["version", "code"])
    titles = [info[k][3] if v == 10 else info[k][1] for k, v in zip(used["name"], used["version"], strict=True)]
    d_icd = pd.DataFrame({"icd_code": used["code"].to_numpy(), "icd_version": used["version"].to_numpy(),
                          "long_title": titles})
    return table, d_icd, frame[["a", "name"]]


def prescriptions_table(adm: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, pd.DataFrame]:
    """prescriptions (MIMIC's 21 columns) and the distinct (admission index, drug key) pairs given."""
    n = len(adm)
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    pairs_a, pairs_k = [], []

    def give(mask, key):
        i = np.flatnonzero(mask)
        pairs_a.append(i)
        pairs_k.append(np.full(i.size, key, dtype=object))

    for group, drugs in cat.COND_DRUGS.items():
        if group == "general":
            present, sev = np.ones(n, bool), np.full(n, 0.5)
        elif group in ("substance_use",):
            present, sev = adm[f"social_{group}"].to_numpy().astype(bool), np.full(n, 0.5)
        else:
            present, sev = adm[f"cond_{group}"].to_numpy().astype(bool), adm[f"sev_{group}"].to_numpy()
        for key, p in drugs:
            p_given = np.where(present, np.minimum(0.95, p * (0.5 + 0.8 * sev)), 0.04 if group != "general" else 0)
            give(rng.random(n) < p_given, key)
    af = adm["cond_atrial_fibrillation"].to_numpy().astype(bool)
    warf = adm["on_warfarin"].to_numpy().astype(bool)
    give(af & warf & (rng.random(n) < 0.9), "warfarin")
    give(af & ~warf & (rng.random(n) < 0.7), "apixaban")
    give((adm["icu_in"].to_numpy() >= 0) & (adm["sev_sepsis"].to_numpy() > 0.6) & (rng.random(n) < 0.7),
         "norepinephrine")
    pairs = pd.DataFrame({"a": np.concatenate(pairs_a), "key": np.concatenate(pairs_k)}).drop_duplicates()
    pairs = pairs.sort_values(["a", "key"], kind="stable").reset_index(drop=True)
    # Each drug is ordered 1+ times (dose changes, re-orders), as in MIMIC.
    rows = pairs.loc[pairs.index.repeat(1 + rng.poisson(0.4, len(pairs)))].reset_index(drop=True)
    a, key = rows["a"].to_numpy(), rows["key"].to_numpy()
    m = len(rows)
    early = np.isin(key, list(cat.EARLY_DRUGS))
    los = (disch - admit)[a]
    start = admit[a] + np.where(early, rng.uniform(0.3, 6, m) * HOUR, rng.uniform(0, 0.8, m) * los)
    start = np.minimum(-(-start.astype(np.int64) // HOUR) * HOUR, disch[a])
    stop = start + (rng.uniform(0.2, 1.0, m) * (disch[a] - start)).astype(np.int64) // HOUR * HOUR
    order = np.lexsort((key, start, adm["subject_id"].to_numpy()[a]))
    a, key, start, stop = a[order], key[order], start[order], stop[order]
    subject = adm["subject_id"].to_numpy()[a]
    pid = adm["pid"].to_numpy()[a]
    base = rng.integers(10, 300, int(adm["pid"].max()) + 1)
    poe_seq = pd.Series(subject).groupby(subject).cumcount().to_numpy() * 3 + base[pid]
    has_poe = rng.random(m) < 0.93
    keys = list(cat.DRUGS)
    k_idx = np.searchsorted(np.array(keys, dtype=object), key, sorter=np.argsort(keys))
    k_idx = np.argsort(keys)[k_idx]
    spec = pa.table({name: pa.array([(cat.DRUGS[k][j] or None) for k in keys], type=pa.string())
                     for j, name in enumerate(RX_SPEC_COLUMNS)}).take(pa.array(k_idx))
    prov = providers(rng)
    table = pa.table({
        "subject_id": subject, "hadm_id": adm["hadm_id"].to_numpy()[a],
        "pharmacy_id": _perm_ids(m, 10_000_000, 90_000_000, rng),
        "poe_id": pa.array(np.char.add(np.char.add(subject.astype(str), "-"), poe_seq.astype(str)), mask=~has_poe),
        "poe_seq": pa.array(poe_seq, mask=~has_poe),
        "order_provider_id": pa.array(prov[rng.integers(0, len(prov), m)], mask=~has_poe),
        "starttime": ts(start), "stoptime": ts(stop, null=rng.random(m) < 0.03),
        **{name: spec.column(name) for name in RX_SPEC_COLUMNS},
    })
    return table, pairs


RX_SPEC_COLUMNS = ("drug_type", "drug", "formulary_drug_cd", "gsn", "ndc", "prod_strength", "form_rx", "dose_val_rx",
                   "dose_unit_rx", "form_val_disp", "form_unit_disp", "doses_per_24_hrs", "route")
WARDS = ("Medicine", "Medicine/Cardiology", "Hematology/Oncology", "Med/Surg", "Transplant", "Cardiac Surgery",
         "Neurology", "Vascular")
ICUS = ("Medical Intensive Care Unit (MICU)", "Medical/Surgical Intensive Care Unit (MICU/SICU)",
        "Coronary Care Unit (CCU)", "Cardiac Vascular Intensive Care Unit (CVICU)",
        "Surgical Intensive Care Unit (SICU)", "Trauma SICU (TSICU)")


def _perm_ids(n: int, offset: int, modulus: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct, scrambled ids in [offset, offset + modulus): an affine permutation of 0..n-1."""
    import math

    if n > modulus:
        raise ValueError(f"cannot draw {n} distinct ids from a range of {modulus}")
    mult = int(rng.integers(modulus // 3, modulus))
    while math.gcd(mult, modulus) != 1:
        mult += 1
    return offset + (mult * np.arange(n, dtype=np.int64) + int(rng.integers(0, modulus))) % modulus


def transfers_tables(adm: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """transfers (ED / admit / transfer / discharge events) and icu/icustays, consistent with each other."""
    n = len(adm)
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    ed, icu_in, icu_out = adm["ed"].to_numpy(), adm["icu_in"].to_numpy(), adm["icu_out"].to_numpy()
    has_icu = icu_in >= 0
    jitter = rng.integers(0, 60, n)  # transfers carry seconds; admissions only minutes
    start = np.where(ed, adm["edouttime"].to_numpy(), admit)
    cardiac = adm[["cond_acute_mi", "cond_heart_failure", "cond_atrial_fibrillation"]].to_numpy().any(axis=1)
    ward_p = np.where(cardiac[:, None], [0.3, 0.45, 0.02, 0.1, 0.03, 0.05, 0.02, 0.03],
                      [0.45, 0.08, 0.1, 0.2, 0.05, 0.02, 0.07, 0.03])
    ward_p = np.where(adm["cond_cancer"].to_numpy()[:, None] == 1, [0.2, 0.05, 0.6, 0.1, 0.02, 0.01, 0.01, 0.01], ward_p)
    ward = np.asarray(WARDS, dtype=object)[(rng.random(n)[:, None] > np.cumsum(ward_p, axis=1)).sum(axis=1).clip(0, 7)]
    unit_p = np.where(cardiac[:, None], [0.15, 0.1, 0.4, 0.25, 0.05, 0.05], [0.5, 0.25, 0.03, 0.02, 0.12, 0.08])
    unit = np.asarray(ICUS, dtype=object)[(rng.random(n)[:, None] > np.cumsum(unit_p, axis=1)).sum(axis=1).clip(0, 5)]
    icu_in_s = np.where(has_icu, np.maximum(icu_in + jitter, start), -1)
    icu_out_s = np.where(has_icu, np.minimum(icu_out + jitter, disch), -1)
    segs = [  # (mask, intime, outtime, careunit, eventtype or None = admit/transfer by order)
        (ed, adm["edregtime"].to_numpy(), adm["edouttime"].to_numpy(),
         np.where(adm["kind"].to_numpy() == 1, "Emergency Department Observation", "Emergency Department"), "ED"),
        (~has_icu | (icu_in_s > start), start, np.where(has_icu, icu_in_s, disch), ward, None),
        (has_icu, icu_in_s, icu_out_s, unit, None),
        (has_icu & (icu_out_s < disch), icu_out_s, disch, ward, None),
        (np.ones(n, bool), disch, np.full(n, -1), np.full(n, None, dtype=object), "discharge"),
    ]
    parts = []
    for order, (mask, tin, tout, unit_name, event) in enumerate(segs):
        i = np.flatnonzero(mask)
        parts.append(pd.DataFrame({"a": i, "order": order, "in": tin[i], "out": tout[i],
                                   "careunit": np.asarray(unit_name, dtype=object)[i], "event": event}))
    tr = pd.concat(parts, ignore_index=True).sort_values(["a", "order"], kind="stable").reset_index(drop=True)
    stay = tr["event"].isna().to_numpy()
    first_stay = stay & ~pd.Series(np.where(stay, tr["a"].to_numpy(), -1)).duplicated().to_numpy()
    tr["event"] = np.where(first_stay, "admit", tr["event"].fillna("transfer").to_numpy())
    a = tr["a"].to_numpy()
    transfers = pa.table({
        "subject_id": adm["subject_id"].to_numpy()[a], "hadm_id": adm["hadm_id"].to_numpy()[a],
        "transfer_id": _perm_ids(len(tr), 30_000_000, 10_000_000, rng), "eventtype": strings(tr["event"]),
        "careunit": strings(tr["careunit"], tr["careunit"].isna().to_numpy()), "intime": ts(tr["in"]),
        "outtime": ts(tr["out"]),
    })
    i = np.flatnonzero(has_icu)
    icustays = pa.table({
        "subject_id": adm["subject_id"].to_numpy()[i], "hadm_id": adm["hadm_id"].to_numpy()[i],
        "stay_id": _perm_ids(i.size, 30_000_000, 10_000_000, rng), "first_careunit": strings(unit[i]),
        "last_careunit": strings(unit[i]), "intime": ts(icu_in_s[i]), "outtime": ts(icu_out_s[i]),
        "los": (icu_out_s[i] - icu_in_s[i]) / DAY,
    })
    return transfers, icustays
