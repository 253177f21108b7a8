"""A synthetic MIMIC-IV world with a known latent state: ``ehrclip synth --out DIR``.

The generative story (full version with every number in ``data_recipes/synthetic/README.md``):

1. **Patients** get an age, a sex and social factors (lives alone, housing instability, substance use,
   non-adherence), then chronic conditions (heart failure, atrial fibrillation, prior myocardial infarction,
   hypertension, conduction disease, CKD, COPD, diabetes, cirrhosis, cancer), each with a severity in (0, 1),
   correlated through two hidden risk factors and each other (MI and AF raise heart failure, ...).
2. **Admissions** follow one another: each draws acute conditions (sepsis, pneumonia, acute MI) with
   severities, a type (emergency, observation, elective), an early ICU stay (first 24 h), and, when still on
   the ward at 24 h, the critical outcome (late ICU stay or in-hospital death) with probability
   ``p_critical_24h``. Discharged patients are readmitted within 30 days with probability
   ``p_readmission_30d`` (the next admission date is drawn inside or outside the 30-day window accordingly).
   Both probabilities come from fixed logistic models of the latent state (:data:`READMISSION_MODEL`,
   :data:`CRITICAL_MODEL`), the same for every ``text_signal``.
3. **Tables** show the latent state only through noisy, partly missing proxies: labs drawn at several times
   (ED, daily mornings, extra STAT draws; condition-specific shifts on top of patient effects and noise;
   panels ordered more often when suspected), ICD-9/ICD-10 codes (coded only sometimes; ICD-10 after the
   real date 2015-10-01), drugs, procedures, ICU stays and transfers. Social factors barely show.
4. **The discharge note** states conditions and social factors explicitly (synonyms, severity words,
   negations, noise). With ``text_signal = s`` every statement describes the true state with probability s
   and an independent draw from the prior (given a random admission's age and sex) otherwise; the facts
   copied from the tables (age, sex, admission type and service in the header, drugs, procedures,
   disposition) come from a random other admission with probability 1 - s. At s = 0 the note says nothing
   about the patient at all, so it carries no outcome-relevant information the tables lack; at s = 1 it
   states the latent conditions nearly always correctly.

``DIR/truth.parquet`` keeps the latent state per admission. Deterministic for a seed (byte-identical files).

>>> summary = generate_world(tmp_path, n_patients=50, seed=1, ecg=False, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ehrclip_kit.data import synthetic_catalog as cat
from ehrclip_kit.data.synthetic_codes import diagnoses_tables, procedures_tables
from ehrclip_kit.data.synthetic_io import perm_ids, write_table
from ehrclip_kit.data.synthetic_labs import write_labevents
from ehrclip_kit.data.synthetic_notes import write_notes
from ehrclip_kit.data.synthetic_tables import (
    admissions_table,
    patients_table,
    prescriptions_table,
    transfers_tables,
)
from ehrclip_kit.io import atomic_dir

CHRONIC = (
    "heart_failure",
    "atrial_fibrillation",
    "myocardial_infarction",
    "hypertension",
    "conduction_disease",
    "ckd",
    "copd",
    "diabetes",
    "cirrhosis",
    "cancer",
)
ACUTE = ("sepsis", "pneumonia", "acute_mi")
CONDITIONS = CHRONIC + ACUTE
SOCIAL = ("lives_alone", "housing_instability", "substance_use", "nonadherence")
DAY, HOUR, MINUTE = 86400, 3600, 60
# logit = intercept + sum_c w_c * cond_c * (a + b * sev_c ** power) + sum_s w_s * social_s
#         + age_w * (age - 65) / 10, with (a, b, power) = model["severity"].
# Readmission hinges on *which* chronic conditions a patient has and how severe they are (heart failure,
# cirrhosis, COPD, cancer, CKD, social factors), not on how sick the admission looks overall: sepsis,
# acute MI, hypertension or diabetes leave heavy footprints in the tables but barely move it.
READMISSION_MODEL = {
    "intercept": -2.95,
    "age": 0.0,
    "severity": (0.2, 1.6, 2),
    "conditions": {
        "heart_failure": 1.8,
        "atrial_fibrillation": 0.0,
        "myocardial_infarction": 0.1,
        "hypertension": 0.0,
        "conduction_disease": 0.0,
        "ckd": 1.1,
        "copd": 1.5,
        "diabetes": 0.1,
        "cirrhosis": 1.9,
        "cancer": 1.5,
        "sepsis": 0.0,
        "pneumonia": 0.1,
        "acute_mi": -0.5,
    },
    "social": {"lives_alone": 0.4, "housing_instability": 0.6, "substance_use": 0.5, "nonadherence": 0.7},
}
CRITICAL_MODEL = {
    "intercept": -3.35,
    "age": 0.15,
    "severity": (0.4, 1.2, 1),
    "conditions": {
        "heart_failure": 0.7,
        "atrial_fibrillation": 0.15,
        "myocardial_infarction": 0.15,
        "hypertension": 0.0,
        "conduction_disease": 0.1,
        "ckd": 0.45,
        "copd": 0.55,
        "diabetes": 0.15,
        "cirrhosis": 0.9,
        "cancer": 0.6,
        "sepsis": 1.9,
        "pneumonia": 1.0,
        "acute_mi": 1.5,
    },
    "social": {"substance_use": 0.2},
}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def outcome_logit(model: dict, cond: dict, sev: dict, social: dict, age) -> np.ndarray:
    """The world's fixed outcome model: ``model`` is :data:`READMISSION_MODEL` or :data:`CRITICAL_MODEL`."""
    x = model["intercept"] + model["age"] * (np.asarray(age, dtype=float) - 65) / 10
    a, b, power = model["severity"]
    for c, w in model["conditions"].items():
        x = x + w * cond[c] * (a + b * sev[c] ** power)
    for s, w in model["social"].items():
        x = x + w * social[s]
    return x


def sample_latent(rng: np.random.Generator, age: np.ndarray, male: np.ndarray) -> tuple[dict, dict, dict]:
    """Chronic conditions (bool), their severities and social factors (bool) for people of ``age``/``male``."""
    n, a = len(age), (age - 65) / 10
    z1, z2 = rng.standard_normal(n), rng.standard_normal(n)  # cardio-metabolic and smoking risk

    def draw(logit):
        return rng.random(n) < _sigmoid(logit)

    s = {"substance_use": draw(-1.9 - 0.35 * a + 0.5 * male + 0.4 * z2)}
    s["housing_instability"] = draw(-2.7 - 0.2 * a + 1.0 * s["substance_use"])
    s["lives_alone"] = draw(-1.1 + 0.25 * a)
    s["nonadherence"] = draw(-2.0 + 0.7 * s["substance_use"] + 0.7 * s["housing_instability"] - 0.1 * a)
    c = {"hypertension": draw(-0.1 + 0.5 * a + 0.7 * z1), "diabetes": draw(-1.2 + 0.1 * a + 0.8 * z1)}
    c["myocardial_infarction"] = draw(-2.4 + 0.4 * a + 0.7 * z1 + 0.4 * c["diabetes"] + 0.4 * male)
    c["ckd"] = draw(-2.0 + 0.4 * a + 0.5 * z1 + 0.6 * c["hypertension"] + 0.7 * c["diabetes"])
    c["atrial_fibrillation"] = draw(-2.0 + 0.7 * a + 0.3 * c["hypertension"])
    hf = -2.4 + 0.5 * a + 0.4 * z1 + 1.0 * c["myocardial_infarction"] + 0.6 * c["atrial_fibrillation"]
    c["heart_failure"] = draw(hf + 0.4 * c["hypertension"] + 0.3 * c["ckd"])
    c["conduction_disease"] = draw(
        -2.8 + 0.5 * a + 0.5 * c["myocardial_infarction"] + 0.3 * c["heart_failure"]
    )
    c["copd"] = draw(-2.2 + 0.3 * a + 0.9 * z2 + 0.3 * s["substance_use"])
    c["cirrhosis"] = draw(-3.4 - 0.1 * a + 1.8 * s["substance_use"])
    c["cancer"] = draw(-2.0 + 0.35 * a + 0.3 * z2)
    c = {k: c[k] for k in CHRONIC}
    sev = {k: np.where(c[k], rng.beta(2.0, 2.2, n), 0.0) for k in CHRONIC}
    return c, sev, s


def sample_acute(rng: np.random.Generator, age, cond: dict, social: dict) -> tuple[dict, dict]:
    """Acute conditions of one admission (bool) and their severities."""
    n, a = len(age), (np.asarray(age) - 65) / 10
    logits = {
        "sepsis": -2.4
        + 0.2 * a
        + 0.6 * cond["ckd"]
        + 0.7 * cond["cirrhosis"]
        + 0.7 * cond["cancer"]
        + 0.3 * cond["diabetes"]
        + 0.4 * social["substance_use"],
        "pneumonia": -2.4 + 0.2 * a + 1.0 * cond["copd"] + 0.3 * cond["cancer"],
        "acute_mi": -3.4
        + 0.2 * a
        + 1.0 * cond["myocardial_infarction"]
        + 0.4 * cond["diabetes"]
        + 0.3 * cond["hypertension"],
    }
    c = {k: rng.random(n) < _sigmoid(v) for k, v in logits.items()}
    return c, {k: np.where(c[k], rng.beta(2.0, 2.0, n), 0.0) for k in ACUTE}


def _simulate(n_patients: int, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Patients and their admission timelines (latent state, outcomes, times in epoch seconds)."""
    n = n_patients
    male = rng.random(n) < 0.52
    age0 = np.minimum(18 + 77 * rng.beta(2.2, 1.6, n), 97.0)
    cond, sev, social = sample_latent(rng, age0, male)
    first_year = rng.integers(2110, 2185, n)
    first = ((first_year - 1970) * 365.2425 * DAY + rng.uniform(0, 365 * DAY, n)).astype(np.int64)
    anchor_year = first_year - rng.integers(0, 3, n)
    anchor_age = np.floor(age0).astype(int) - (first_year - anchor_year)
    anchor_age = np.where(anchor_age >= 90, 91, np.maximum(anchor_age, 18))
    group = rng.choice([2008, 2011, 2014, 2017], size=n)
    pat = pd.DataFrame(
        {
            "pid": np.arange(n),
            "subject_id": perm_ids(n, 10_000_000, 10_000_000, rng),
            "male": male,
            "age0": age0,
            "first": first,
            "anchor_year": anchor_year,
            "anchor_age": anchor_age,
            "anchor_year_group": [f"{g} - {g + 2}" for g in group],
            "real_anchor": group + rng.integers(0, 3, n),
            "cancer_site": rng.integers(0, 5, n),
            "on_warfarin": cond["atrial_fibrillation"] & (rng.random(n) < 0.4),
        }
    )
    for k in CHRONIC:
        pat[f"cond_{k}"], pat[f"sev_{k}"] = cond[k], sev[k]
    for k in SOCIAL:
        pat[f"social_{k}"] = social[k]
    burden = sum(cond[k] * sev[k] for k in CHRONIC)
    p_continue = _sigmoid(-0.55 + 0.35 * burden)
    rounds, active, t_next, k = [], np.arange(n), first // MINUTE * MINUTE, 0
    while active.size:
        rounds.append(_admission_round(rng, pat, active, t_next, k))
        r = rounds[-1]
        alive = ~r["died"]
        readmit = alive & (rng.random(active.size) < r["p_readmission_30d"])
        more = readmit | (alive & (rng.random(active.size) < p_continue[active]))
        gap_days = np.where(
            readmit, 0.1 + 29.8 * rng.beta(0.9, 1.6, active.size), 31 + rng.gamma(1.1, 300, active.size)
        )
        r["readmission_30d"] = np.where(alive, readmit.astype(float), np.nan)
        t_next = ((r["dischtime"] + gap_days * DAY) // MINUTE * MINUTE).astype(np.int64)
        active, t_next = active[more], t_next[more]
        k += 1
    adm = pd.concat([pd.DataFrame(r) for r in rounds], ignore_index=True)
    adm = adm.sort_values(["pid", "admittime"], kind="stable").reset_index(drop=True)
    adm["hadm_id"] = perm_ids(len(adm), 20_000_000, 10_000_000, rng)
    last = adm.groupby("pid")["dischtime"].max()
    died = adm.groupby("pid")["deathtime"].max()
    late = (rng.random(n) < 0.12 + 0.08 * burden) & (died.reindex(range(n)).to_numpy() < 0)
    dod = np.where(died.to_numpy() >= 0, died.to_numpy(), -1)
    dod = np.where(late, last.to_numpy() + ((31 + rng.gamma(1.2, 250, n)) * DAY).astype(np.int64), dod)
    pat["dod"] = dod
    return pat, adm


def _admission_round(rng, pat: pd.DataFrame, idx: np.ndarray, admit: np.ndarray, k: int) -> dict:
    """One admission for each patient in ``idx`` starting at ``admit``: latent state, course and outcomes."""
    m = idx.size
    p = pat.iloc[idx]
    age = p["age0"].to_numpy() + (admit - p["first"].to_numpy()) / (365.2425 * DAY)
    cond = {c: p[f"cond_{c}"].to_numpy() for c in CHRONIC}
    sev = {
        c: np.where(cond[c], np.clip(p[f"sev_{c}"].to_numpy() + rng.normal(0, 0.07, m), 0.02, 1.0), 0.0)
        for c in CHRONIC
    }
    social = {s: p[f"social_{s}"].to_numpy() for s in SOCIAL}
    acute, acute_sev = sample_acute(rng, age, cond, social)
    cond |= acute
    sev |= acute_sev
    p_readmit = _sigmoid(outcome_logit(READMISSION_MODEL, cond, sev, social, age))
    p_crit = _sigmoid(outcome_logit(CRITICAL_MODEL, cond, sev, social, age))
    any_acute = acute["sepsis"] | acute["pneumonia"] | acute["acute_mi"]
    elective = ~any_acute & (rng.random(m) < 0.10)
    observation = ~elective & (rng.random(m) < np.where(any_acute, 0.04, 0.22))
    kind = np.where(elective, 2, np.where(observation, 1, 0))  # 0 emergency, 1 observation, 2 elective
    early_logit = (
        -3.3
        + acute["sepsis"] * (0.8 + 2.2 * sev["sepsis"])
        + acute["acute_mi"] * (0.5 + 1.8 * sev["acute_mi"])
        + acute["pneumonia"] * (0.3 + 1.2 * sev["pneumonia"])
        + 0.8 * sev["copd"]
        + 0.6 * sev["heart_failure"]
        + 0.5 * sev["cirrhosis"]
        + np.where(elective, 0.8, 0.0)
    )
    early_icu = (kind != 1) & (rng.random(m) < _sigmoid(early_logit))
    short = ~early_icu & (
        rng.random(m) < np.select([kind == 1, kind == 2, any_acute], [0.55, 0.2, 0.02], 0.07)
    )
    eligible = ~early_icu & ~short
    critical = eligible & (rng.random(m) < p_crit)
    crit_death_only = critical & (rng.random(m) < 0.12 + 0.3 * sev["cancer"])
    crit_icu = critical & ~crit_death_only
    ed = (kind != 2) & (rng.random(m) < np.where(kind == 0, 0.85, 0.7))
    edreg = np.where(ed, admit - (rng.uniform(1.5, 9, m) * HOUR // MINUTE * MINUTE), -1)
    edout = np.where(ed, admit + (rng.uniform(5, 90, m) * MINUTE).astype(np.int64), -1)
    start = np.where(ed, edout, admit)
    t0 = admit + DAY
    icu_los = ((0.4 + rng.gamma(1.5, 1.6, m)) * DAY).astype(np.int64)
    early_in = np.where(rng.random(m) < 0.6, start, start + rng.uniform(1, 20, m) * HOUR)
    early_in = np.minimum(early_in, t0 - 20 * MINUTE).astype(np.int64)
    late_in = (t0 + MINUTE + rng.exponential(1.6, m) * DAY).astype(np.int64)
    icu_in = np.where(early_icu, early_in, np.where(crit_icu, late_in, -1))
    icu_out = np.where(icu_in >= 0, icu_in + icu_los, -1)
    a = (age - 65) / 10
    icu_death = (icu_in >= 0) & (
        rng.random(m)
        < _sigmoid(
            -2.4
            + 1.5 * sev["sepsis"]
            + sev["acute_mi"]
            + 0.8 * sev["cirrhosis"]
            + 0.6 * sev["cancer"]
            + 0.2 * a
        )
    )
    ward = (
        1.05 + rng.gamma(1.4, 2.0, m) * (1 + 0.5 * np.maximum.reduce([acute_sev[c] for c in ACUTE]))
    ) * DAY
    ward = ward.astype(np.int64)
    after_icu = ((0.5 + rng.gamma(1.5, 1.5, m)) * DAY).astype(np.int64)
    disch = (
        np.select(
            [short, crit_death_only, icu_in >= 0],
            [
                admit + (rng.uniform(4, 23.5, m) * HOUR).astype(np.int64),
                t0 + HOUR + (rng.exponential(3.0, m) * DAY).astype(np.int64),
                icu_out + np.where(icu_death, 0, after_icu),
            ],
            admit + np.minimum(ward, 60 * DAY),
        )
        // MINUTE
        * MINUTE
    )
    disch = np.maximum(disch, admit + 4 * HOUR)
    died = crit_death_only | icu_death
    icu_out = np.where(icu_in >= 0, np.minimum(icu_out, disch), -1)
    event = np.where(crit_death_only, disch - DAY // 2, np.where(crit_icu, icu_in, -1))
    out = {
        "pid": idx,
        "admission_round": np.full(m, k),
        "admittime": admit,
        "dischtime": disch,
        "deathtime": np.where(died, disch, -1),
        "died": died,
        "age": age,
        "kind": kind,
        "ed": ed,
        "edregtime": edreg,
        "edouttime": edout,
        "icu_in": icu_in,
        "icu_out": icu_out,
        "early_icu": early_icu,
        "critical_event_time": event,
        "p_readmission_30d": p_readmit,
        "p_critical_24h": p_crit,
        "critical_24h": np.where(eligible, critical.astype(float), np.nan),
    }
    for key in (
        "admittime",
        "dischtime",
        "deathtime",
        "edregtime",
        "edouttime",
        "icu_in",
        "icu_out",
        "critical_event_time",
    ):
        out[key] = np.asarray(out[key]).astype(np.int64)
    for c in CONDITIONS:
        out[f"cond_{c}"], out[f"sev_{c}"] = cond[c].astype(np.int8), sev[c]
    for s in SOCIAL:
        out[f"social_{s}"] = social[s].astype(np.int8)
    return out


def _note_state(adm: pd.DataFrame, text_signal: float, rng: np.random.Generator) -> pd.DataFrame:
    """What each note asserts: the truth with probability ``text_signal`` per statement, else a fresh draw.

    The fresh draw comes from the prior given a *random other* admission's age and sex: conditioning on the
    patient's own age and sex would let a note at ``text_signal=0`` still teach an encoder the patient's
    age and sex (conditions follow them), which contrastive pretraining measurably exploits. At 0 the note
    is about nobody in particular.
    """
    n = len(adm)
    donor = rng.integers(0, n, n)
    age, male = adm["age"].to_numpy()[donor], adm["male"].to_numpy()[donor]
    f_cond, f_sev, f_social = sample_latent(rng, age, male)
    f_acute, f_acute_sev = sample_acute(rng, age, f_cond, f_social)
    f_cond |= f_acute
    f_sev |= f_acute_sev
    out = {}
    for c in CONDITIONS:
        true = rng.random(n) < text_signal
        out[f"note_cond_{c}"] = np.where(true, adm[f"cond_{c}"].to_numpy() == 1, f_cond[c])
        out[f"note_sev_{c}"] = np.where(true, adm[f"sev_{c}"].to_numpy(), f_sev[c])
        if c == "cancer":
            out["cancer_site"] = np.where(true, adm["cancer_site"].to_numpy(), rng.integers(0, 5, n))
    for s in SOCIAL:
        true = rng.random(n) < text_signal
        out[f"note_social_{s}"] = np.where(true, adm[f"social_{s}"].to_numpy() == 1, f_social[s])
    return pd.DataFrame(out)


def _truth(adm: pd.DataFrame, state: pd.DataFrame, text_signal: float, seed: int) -> pd.DataFrame:
    truth = pd.DataFrame(
        {
            "subject_id": adm["subject_id"].to_numpy(),
            "hadm_id": adm["hadm_id"].to_numpy(),
            "admittime": adm["admittime"].to_numpy().astype("datetime64[s]"),
            "dischtime": adm["dischtime"].to_numpy().astype("datetime64[s]"),
            "age": adm["mimic_age"].to_numpy(),
            "sex": np.where(adm["male"].to_numpy(), "M", "F"),
        }
    )
    for c in CONDITIONS:
        truth[f"cond_{c}"], truth[f"sev_{c}"] = (
            adm[f"cond_{c}"].to_numpy().astype(np.int8),
            adm[f"sev_{c}"].to_numpy(),
        )
    for s in SOCIAL:
        truth[f"social_{s}"] = adm[f"social_{s}"].to_numpy().astype(np.int8)
    truth["cancer_site"] = np.where(
        adm["cond_cancer"] == 1, np.asarray(cat.CANCER_SITES)[adm["cancer_site"]], None
    )
    truth["p_readmission_30d"] = adm["p_readmission_30d"].to_numpy()
    truth["p_critical_24h"] = adm["p_critical_24h"].to_numpy()
    # The labels the cohort rules must reproduce from the tables (<NA> where the admission is not eligible).
    truth["readmission_30d"] = pd.array(adm["readmission_30d"].to_numpy(), dtype="Float64").astype("Int8")
    truth["critical_24h"] = pd.array(adm["critical_24h"].to_numpy(), dtype="Float64").astype("Int8")
    for c in CONDITIONS:
        truth[f"note_cond_{c}"] = state[f"note_cond_{c}"].to_numpy().astype(np.int8)
    for s in SOCIAL:
        truth[f"note_social_{s}"] = state[f"note_social_{s}"].to_numpy().astype(np.int8)
    truth["text_signal"] = float(text_signal)
    truth["world_seed"] = int(seed)
    return truth


def generate_world(
    out_dir,
    n_patients: int = 2000,
    seed: int = 0,
    text_signal: float = 0.8,
    ecg: bool = True,
    lab_density: float = 1.0,
    progress: bool = True,
) -> dict:
    """Write a synthetic world to ``out_dir`` (replaced whole, atomically) and return summary counts.

    Layout: ``hosp/*.csv.gz``, ``icu/icustays.csv.gz`` (MIMIC-IV v2.2), ``note/discharge.csv.gz``
    (MIMIC-IV-Note), ``truth.parquet`` (latent state per admission), ``ecg/`` (MIMIC-IV-ECG) unless
    ``ecg=False``. ``lab_density`` scales lab draws per admission (1.0 gives ~90 lab rows per admission,
    1.6 about 130: the density of a 400k-admission, 50M-lab-row MIMIC-scale world).
    """
    t_start = time.perf_counter()
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    if not 0.0 <= text_signal <= 1.0:
        raise ValueError(f"text_signal must be in [0, 1], got {text_signal}")
    if not lab_density > 0:
        raise ValueError(f"lab_density must be positive, got {lab_density}")
    if ecg and importlib.util.find_spec("ehrclip_kit.data.synthetic_ecg") is None:
        raise RuntimeError("ECG generation needs ehrclip_kit.data.synthetic_ecg; pass ecg=False (--no-ecg)")
    streams = [np.random.default_rng([seed, k]) for k in range(8)]
    pat, adm = _simulate(n_patients, streams[0])
    keep = [
        "pid",
        "subject_id",
        "male",
        "anchor_year",
        "anchor_age",
        "real_anchor",
        "cancer_site",
        "on_warfarin",
    ]
    adm = adm.merge(pat[keep], on="pid", how="left", validate="many_to_one")
    adm["mimic_age"] = adm["anchor_age"] + (
        adm["admittime"].to_numpy().astype("datetime64[s]").astype("datetime64[Y]").astype(int)
        + 1970
        - adm["anchor_year"]
    )
    adm["prev_dischtime"] = adm.groupby("pid")["dischtime"].shift(1).fillna(-10 * 365 * DAY).astype(np.int64)
    out_dir = Path(out_dir)
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for sub in ("hosp", "icu", "note"):
            (tmp / sub).mkdir()
        hosp = tmp / "hosp"
        counts["patients"] = write_table(hosp / "patients.csv.gz", patients_table(pat))
        admissions, disch_loc = admissions_table(adm, pat, streams[1])
        counts["admissions"] = write_table(hosp / "admissions.csv.gz", admissions)
        dx, d_dx = diagnoses_tables(adm, streams[2])
        counts["diagnoses_icd"] = write_table(hosp / "diagnoses_icd.csv.gz", dx)
        write_table(hosp / "d_icd_diagnoses.csv.gz", d_dx)
        px, d_px, px_rows = procedures_tables(adm, streams[3])
        counts["procedures_icd"] = write_table(hosp / "procedures_icd.csv.gz", px)
        write_table(hosp / "d_icd_procedures.csv.gz", d_px)
        rx, rx_pairs = prescriptions_table(adm, streams[4])
        counts["prescriptions"] = write_table(hosp / "prescriptions.csv.gz", rx)
        transfers, icustays = transfers_tables(adm, streams[5])
        counts["transfers"] = write_table(hosp / "transfers.csv.gz", transfers)
        counts["icustays"] = write_table(tmp / "icu" / "icustays.csv.gz", icustays)
        write_table(
            hosp / "d_labitems.csv.gz",
            pd.DataFrame(
                [(v[0], v[1], v[2], v[3]) for v in cat.LAB_ITEMS.values()],
                columns=["itemid", "label", "fluid", "category"],
            ).sort_values("itemid"),
        )
        counts["labevents"] = write_labevents(
            hosp / "labevents.csv.gz", adm, seed, lab_density, progress=progress
        )
        state = _note_state(adm, text_signal, streams[6])
        counts["discharge_notes"] = write_notes(
            tmp / "note" / "discharge.csv.gz",
            adm,
            state,
            disch_loc,
            rx_pairs,
            px_rows,
            text_signal,
            seed,
            streams[6],
        )
        truth = _truth(adm, state, text_signal, seed)
        truth.to_parquet(tmp / "truth.parquet", index=False)
        if ecg:
            from ehrclip_kit.data.synthetic_ecg import write_ecg_world

            adm_frame = admissions.select(["subject_id", "hadm_id", "admittime", "dischtime"]).to_pandas()
            counts["ecgs"] = write_ecg_world(tmp, adm_frame, truth, seed=seed, progress=progress)["n_ecgs"]
    return {
        "out_dir": str(out_dir),
        "seed": seed,
        "text_signal": text_signal,
        "subjects": int(len(pat)),
        **counts,
        "readmission_30d_rate": float(np.nanmean(adm["readmission_30d"])),
        "critical_24h_rate": float(np.nanmean(adm["critical_24h"])),
        "seconds": round(time.perf_counter() - t_start, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write (replaced whole)")
    parser.add_argument("--patients", type=int, default=2000, help="number of patients (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--text-signal",
        type=float,
        default=0.8,
        help="0..1: how faithfully notes state the latent conditions (default 0.8)",
    )
    parser.add_argument("--lab-density", type=float, default=1.0, help="scale of lab draws per admission")
    parser.add_argument("--no-ecg", action="store_true", help="skip the synthetic ECGs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    summary = generate_world(
        args.out,
        n_patients=args.patients,
        seed=args.seed,
        text_signal=args.text_signal,
        ecg=not args.no_ecg,
        lab_density=args.lab_density,
        progress=not args.quiet,
    )
    print(f"synthetic world written to {summary['out_dir']} in {summary['seconds']} s")
    for key in (
        "subjects",
        "admissions",
        "labevents",
        "prescriptions",
        "diagnoses_icd",
        "icustays",
        "discharge_notes",
        "ecgs",
    ):
        if key in summary:
            print(f"  {key:<16} {summary[key]:>10,}")
    print(f"  readmission_30d rate {summary['readmission_30d_rate']:.1%} (label rule of the cohort recipe)")
    print(f"  critical_24h rate    {summary['critical_24h_rate']:.1%}")
    return 0
