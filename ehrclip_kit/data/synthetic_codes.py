"""Diagnosis and procedure codes of the synthetic world: ``diagnoses_icd``, ``procedures_icd`` and their
dictionaries, in ICD-9 before the real date 2015-10-01 and ICD-10 after, as in MIMIC-IV.

A latent condition is coded only sometimes (more often when severe), now and then coded when absent, and
spread over several codes of graded severity; indirect proxies (acute kidney failure, anticoagulant use,
hyponatremia, ...) and unrelated background codes surround it. Primary (acute) diagnoses come first in
``seq_num``. Every code and title is real (see ``synthetic_catalog``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ehrclip_kit.data import synthetic_catalog as cat
from ehrclip_kit.data.synthetic_io import dates, strings

YEAR = 365.2425 * 86400
ICD10_START = 2015.75  # the US switched to ICD-10 on 2015-10-01 (real, not shifted, time)


def icd10_flags(adm: pd.DataFrame) -> np.ndarray:
    """True where the admission's real (un-shifted) date is on or after 2015-10-01."""
    shifted = 1970 + adm["admittime"].to_numpy() / YEAR
    return adm["real_anchor"].to_numpy() + shifted - adm["anchor_year"].to_numpy() >= ICD10_START


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
    cancer = adm["cond_cancer"].to_numpy().astype(bool) & (
        rng.random(n) < 0.45 + 0.5 * adm["sev_cancer"].to_numpy()
    )
    site = adm["cancer_site"].to_numpy()
    for k, name in enumerate(cat.CANCER_SITES):
        add(cancer & (site == k), (cat.CANCER_CODES[name][0],), (cat.CANCER_CODES[name][1],), np.zeros(n), 1)
    meta = cancer & (adm["sev_cancer"].to_numpy() > 0.6) & (rng.random(n) < 0.7)
    which = rng.random(n) < 0.5
    for k, (c9, c10) in enumerate(cat.METASTASIS_CODES):
        add(meta & (which == bool(k)), (c9,), (c10,), np.zeros(n), 1.5)
    for s_name, p in (
        ("housing_instability", 0.25),
        ("substance_use", 0.35),
        ("nonadherence", 0.15),
        ("lives_alone", 0.05),
    ):
        has = adm[f"social_{s_name}"].to_numpy().astype(bool)
        add(has & (rng.random(n) < p), *cat.DX_CODES[s_name], rng.random(n), 2.5)
    sv = {
        c: adm[f"sev_{c}"].to_numpy()
        for c in (
            "sepsis",
            "ckd",
            "heart_failure",
            "cirrhosis",
            "cancer",
            "copd",
            "pneumonia",
            "conduction_disease",
        )
    }
    has = {
        c: adm[f"cond_{c}"].to_numpy().astype(bool)
        for c in ("atrial_fibrillation", "myocardial_infarction", "cirrhosis", "cancer", "copd", "ckd")
    }
    proxy_p = {
        "aki": 0.05 + 0.5 * sv["sepsis"] + 0.35 * sv["ckd"],
        "hyperkalemia": 0.02 + 0.3 * sv["ckd"],
        "hyponatremia": 0.03 + 0.25 * (sv["heart_failure"] + sv["cirrhosis"]),
        "anemia": 0.08 + 0.25 * (has["ckd"] | has["cancer"] | has["cirrhosis"]),
        "anticoagulant": 0.5 * has["atrial_fibrillation"],
        "cabg": 0.2 * has["myocardial_infarction"],
        "pacemaker": 0.5 * (sv["conduction_disease"] > 0.6),
        "pulm_htn": 0.01 + 0.2 * (sv["heart_failure"] + sv["copd"]),
        "malnutrition": 0.01 + 0.2 * (sv["cancer"] + sv["cirrhosis"]),
        "tobacco": 0.1 + 0.4 * has["copd"],
        "resp_failure": 0.01 + 0.4 * sv["pneumonia"] + 0.2 * sv["copd"],
        "hypotension": 0.03 + 0.4 * sv["sepsis"],
        "acidosis": 0.02 + 0.3 * sv["sepsis"] + 0.1 * sv["ckd"],
        "gi_bleed": 0.02 + 0.15 * has["cirrhosis"],
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
    table = pa.table(
        {
            "subject_id": adm["subject_id"].to_numpy()[a],
            "hadm_id": adm["hadm_id"].to_numpy()[a],
            "seq_num": frame["seq_num"].to_numpy(),
            "icd_code": strings(frame["code"]),
            "icd_version": frame["version"].to_numpy(),
        }
    )
    used = frame[["code", "version"]].drop_duplicates().sort_values(["version", "code"])
    d_icd = pd.DataFrame(
        {
            "icd_code": used["code"].to_numpy(),
            "icd_version": used["version"].to_numpy(),
            "long_title": [cat.DX_TITLES[(c, v)] for c, v in zip(used["code"], used["version"], strict=True)],
        }
    )
    return table, d_icd


def procedures_tables(
    adm: pd.DataFrame, rng: np.random.Generator
) -> tuple[pa.Table, pd.DataFrame, pd.DataFrame]:
    """procedures_icd (ICD-9 / ICD-10-PCS, chartdate), d_icd_procedures of the codes used, and (a, name) rows."""
    n = len(adm)
    sv = {
        c: adm[f"sev_{c}"].to_numpy()
        for c in ("sepsis", "pneumonia", "ckd", "cirrhosis", "conduction_disease", "cancer")
    }
    has = {
        c: adm[f"cond_{c}"].to_numpy().astype(bool)
        for c in ("acute_mi", "heart_failure", "atrial_fibrillation", "cancer", "cirrhosis", "ckd")
    }
    icu = adm["icu_in"].to_numpy() >= 0
    vent = icu & (rng.random(n) < 0.25 + 0.4 * np.maximum(sv["sepsis"], sv["pneumonia"]))
    lung = has["cancer"] & (adm["cancer_site"].to_numpy() == 0)
    plan = {
        "ventilation": vent,
        "intubation": vent & (rng.random(n) < 0.7),
        "central_line": icu & (rng.random(n) < 0.45),
        "hemodialysis": (sv["ckd"] > 0.75) & (rng.random(n) < 0.6),
        "pci": has["acute_mi"] & (rng.random(n) < 0.55),
        "cardiac_cath": (has["acute_mi"] & (rng.random(n) < 0.75))
        | (has["heart_failure"] & (rng.random(n) < 0.05)),
        "transfusion": rng.random(n) < 0.04 + 0.2 * (has["cancer"] | has["cirrhosis"] | (sv["ckd"] > 0.6)),
        "paracentesis": has["cirrhosis"] & (rng.random(n) < 0.1 + 0.45 * sv["cirrhosis"]),
        "thoracentesis": (has["heart_failure"] | has["cancer"]) & (rng.random(n) < 0.06),
        "echo": rng.random(n) < 0.3 * has["heart_failure"] + 0.1 * has["atrial_fibrillation"] + 0.02,
        "pacemaker": (sv["conduction_disease"] > 0.7) & (rng.random(n) < 0.35),
        "egd": rng.random(n) < 0.02 + 0.2 * has["cirrhosis"],
        "bronchoscopy": lung & (rng.random(n) < 0.15),
        "urinary_catheter": rng.random(n) < 0.05,
    }
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    when = admit + rng.random(n) * (disch - admit)
    a_list, name_list, t_list = [], [], []
    for name, mask in plan.items():
        i = np.flatnonzero(mask)
        t = np.where(
            icu[i] & (name in ("ventilation", "intubation", "central_line")),
            adm["icu_in"].to_numpy()[i],
            admit[i] + (0.3 if name in ("pci", "cardiac_cath") else 1) * (when[i] - admit[i]),
        )
        a_list.append(i)
        name_list.append(np.full(i.size, name, dtype=object))
        t_list.append(t.astype(np.int64))
    a, names, t = np.concatenate(a_list), np.concatenate(name_list), np.concatenate(t_list)
    icd10 = icd10_flags(adm)[a]
    info = cat.PROCEDURES
    code = np.array(
        [info[k][2] if ten else info[k][0] for k, ten in zip(names, icd10, strict=True)], dtype=object
    )
    frame = pd.DataFrame({"a": a, "t": t, "code": code, "version": np.where(icd10, 10, 9), "name": names})
    frame = frame.sort_values(["a", "t", "code"], kind="stable")
    frame["seq_num"] = frame.groupby("a").cumcount() + 1
    a = frame["a"].to_numpy()
    table = pa.table(
        {
            "subject_id": adm["subject_id"].to_numpy()[a],
            "hadm_id": adm["hadm_id"].to_numpy()[a],
            "seq_num": frame["seq_num"].to_numpy(),
            "chartdate": dates(frame["t"]),
            "icd_code": strings(frame["code"]),
            "icd_version": frame["version"].to_numpy(),
        }
    )
    used = (
        frame[["code", "version", "name"]]
        .drop_duplicates(["code", "version"])
        .sort_values(["version", "code"])
    )
    titles = [
        info[k][3] if v == 10 else info[k][1] for k, v in zip(used["name"], used["version"], strict=True)
    ]
    d_icd = pd.DataFrame(
        {"icd_code": used["code"].to_numpy(), "icd_version": used["version"].to_numpy(), "long_title": titles}
    )
    return table, d_icd, frame[["a", "name"]]
