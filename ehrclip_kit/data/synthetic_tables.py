"""MIMIC-IV v2.2 tables of the synthetic world, built from the simulated admissions (see ``synthetic.py``).

Each builder takes the per-admission frame ``adm`` (latent state, times as epoch seconds, -1 = none) and a
numpy Generator and returns pyarrow tables with exactly MIMIC-IV's columns, order and value conventions:
patients, admissions, prescriptions, transfers and icustays. Codes live in ``synthetic_codes``, labs in
``synthetic_labs``, notes in ``synthetic_notes``; ``synthetic_io`` writes them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ehrclip_kit.data import synthetic_catalog as cat
from ehrclip_kit.data.synthetic_io import choice, dates, perm_ids, providers, strings, ts

DAY, HOUR, MINUTE = 86400, 3600, 60


def patients_table(pat: pd.DataFrame) -> pa.Table:
    return pa.table(
        {
            "subject_id": pat["subject_id"].to_numpy(),
            "gender": np.where(pat["male"], "M", "F"),
            "anchor_age": pat["anchor_age"].to_numpy(),
            "anchor_year": pat["anchor_year"].to_numpy(),
            "anchor_year_group": pat["anchor_year_group"].to_numpy().astype(str),
            "dod": dates(pat["dod"]),
        }
    )


def admissions_table(
    adm: pd.DataFrame, pat: pd.DataFrame, rng: np.random.Generator
) -> tuple[pa.Table, np.ndarray]:
    """The admissions table and each admission's discharge_location (None when not recorded)."""
    n = len(adm)
    kind, ed = adm["kind"].to_numpy(), adm["ed"].to_numpy()
    atype = np.select(
        [kind == 2, kind == 1],
        [
            choice(rng, ["ELECTIVE", "SURGICAL SAME DAY ADMISSION"], n, [0.4, 0.6]),
            choice(
                rng,
                ["OBSERVATION ADMIT", "EU OBSERVATION", "DIRECT OBSERVATION", "AMBULATORY OBSERVATION"],
                n,
                [0.5, 0.3, 0.12, 0.08],
            ),
        ],
        choice(rng, ["EW EMER.", "URGENT", "DIRECT EMER."], n, [0.72, 0.18, 0.10]),
    )
    location = np.where(
        ed,
        choice(rng, ["EMERGENCY ROOM", "WALK-IN/SELF REFERRAL"], n, [0.93, 0.07]),
        np.where(
            kind == 2,
            choice(rng, ["PHYSICIAN REFERRAL", "PROCEDURE SITE"], n, [0.8, 0.2]),
            choice(
                rng,
                [
                    "TRANSFER FROM HOSPITAL",
                    "PHYSICIAN REFERRAL",
                    "CLINIC REFERRAL",
                    "TRANSFER FROM SKILLED NURSING FACILITY",
                ],
                n,
                [0.45, 0.3, 0.15, 0.1],
            ),
        ),
    )
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
        [
            "HOSPICE",
            "AGAINST ADVICE",
            "SKILLED NURSING FACILITY",
            choice(rng, ["REHAB", "CHRONIC/LONG TERM ACUTE CARE"], n, [0.6, 0.4]),
            "HOME HEALTH CARE",
        ],
        "HOME",
    )
    disch_loc = np.where(adm["died"].to_numpy(), "DIED", disch_loc).astype(object)
    disch_loc[~adm["died"].to_numpy() & (rng.random(n) < 0.08)] = None  # MIMIC leaves some blank
    medicaid = adm["social_housing_instability"].to_numpy() | adm["social_substance_use"].to_numpy()
    insurance = np.where(
        age >= 65,
        np.where(rng.random(n) < 0.85, "Medicare", "Other"),
        np.where(rng.random(n) < np.where(medicaid, 0.6, 0.15), "Medicaid", "Other"),
    )
    alone = adm["social_lives_alone"].to_numpy().astype(bool)
    marital = np.where(
        alone,
        choice(rng, ["SINGLE", "WIDOWED", "DIVORCED"], n, [0.45, 0.35, 0.2]),
        choice(rng, ["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"], n, [0.6, 0.25, 0.08, 0.07]),
    )
    # Patient-level demographics, drawn once per patient from a patient-indexed stream.
    pid = adm["pid"].to_numpy()
    n_pat = int(pat["pid"].max()) + 1
    race = choice(
        rng,
        [
            "WHITE",
            "BLACK/AFRICAN AMERICAN",
            "HISPANIC/LATINO - PUERTO RICAN",
            "ASIAN",
            "UNKNOWN",
            "OTHER",
            "WHITE - OTHER EUROPEAN",
            "BLACK/CAPE VERDEAN",
            "HISPANIC OR LATINO",
            "UNABLE TO OBTAIN",
        ],
        n_pat,
        [0.62, 0.15, 0.04, 0.04, 0.05, 0.03, 0.02, 0.02, 0.02, 0.01],
    )[pid]
    language = np.where(rng.random(n_pat) < 0.92, "ENGLISH", "?")[pid]
    prov = providers(rng)
    table = pa.table(
        {
            "subject_id": adm["subject_id"].to_numpy(),
            "hadm_id": adm["hadm_id"].to_numpy(),
            "admittime": ts(adm["admittime"]),
            "dischtime": ts(adm["dischtime"]),
            "deathtime": ts(adm["deathtime"]),
            "admission_type": strings(atype),
            "admit_provider_id": strings(prov[rng.integers(0, len(prov), n)]),
            "admission_location": strings(location),
            "discharge_location": strings(disch_loc, pd.isna(disch_loc)),
            "insurance": strings(insurance),
            "language": strings(language),
            "marital_status": strings(marital, rng.random(n) < 0.04),
            "race": strings(race),
            "edregtime": ts(adm["edregtime"]),
            "edouttime": ts(adm["edouttime"]),
            "hospital_expire_flag": adm["died"].to_numpy().astype(np.int64),
        }
    )
    return table, disch_loc


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
            p_given = np.where(
                present, np.minimum(0.95, p * (0.5 + 0.8 * sev)), 0.04 if group != "general" else 0
            )
            give(rng.random(n) < p_given, key)
    af = adm["cond_atrial_fibrillation"].to_numpy().astype(bool)
    warf = adm["on_warfarin"].to_numpy().astype(bool)
    give(af & warf & (rng.random(n) < 0.9), "warfarin")
    give(af & ~warf & (rng.random(n) < 0.7), "apixaban")
    give(
        (adm["icu_in"].to_numpy() >= 0) & (adm["sev_sepsis"].to_numpy() > 0.6) & (rng.random(n) < 0.7),
        "norepinephrine",
    )
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
    spec = pa.table(
        {
            name: pa.array([(cat.DRUGS[k][j] or None) for k in keys], type=pa.string())
            for j, name in enumerate(RX_SPEC_COLUMNS)
        }
    ).take(pa.array(k_idx))
    prov = providers(rng)
    table = pa.table(
        {
            "subject_id": subject,
            "hadm_id": adm["hadm_id"].to_numpy()[a],
            "pharmacy_id": perm_ids(m, 10_000_000, 90_000_000, rng),
            "poe_id": pa.array(
                np.char.add(np.char.add(subject.astype(str), "-"), poe_seq.astype(str)), mask=~has_poe
            ),
            "poe_seq": pa.array(poe_seq, mask=~has_poe),
            "order_provider_id": pa.array(prov[rng.integers(0, len(prov), m)], mask=~has_poe),
            "starttime": ts(start),
            "stoptime": ts(stop, null=rng.random(m) < 0.03),
            **{name: spec.column(name) for name in RX_SPEC_COLUMNS},
        }
    )
    return table, pairs


RX_SPEC_COLUMNS = (
    "drug_type",
    "drug",
    "formulary_drug_cd",
    "gsn",
    "ndc",
    "prod_strength",
    "form_rx",
    "dose_val_rx",
    "dose_unit_rx",
    "form_val_disp",
    "form_unit_disp",
    "doses_per_24_hrs",
    "route",
)
WARDS = (
    "Medicine",
    "Medicine/Cardiology",
    "Hematology/Oncology",
    "Med/Surg",
    "Transplant",
    "Cardiac Surgery",
    "Neurology",
    "Vascular",
)
ICUS = (
    "Medical Intensive Care Unit (MICU)",
    "Medical/Surgical Intensive Care Unit (MICU/SICU)",
    "Coronary Care Unit (CCU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Trauma SICU (TSICU)",
)


def transfers_tables(adm: pd.DataFrame, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """transfers (ED / admit / transfer / discharge events) and icu/icustays, consistent with each other."""
    n = len(adm)
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    ed, icu_in, icu_out = adm["ed"].to_numpy(), adm["icu_in"].to_numpy(), adm["icu_out"].to_numpy()
    has_icu = icu_in >= 0
    jitter = rng.integers(0, 60, n)  # transfers carry seconds; admissions only minutes
    start = np.where(ed, adm["edouttime"].to_numpy(), admit)
    cardiac = adm[["cond_acute_mi", "cond_heart_failure", "cond_atrial_fibrillation"]].to_numpy().any(axis=1)
    ward_p = np.where(
        cardiac[:, None],
        [0.3, 0.45, 0.02, 0.1, 0.03, 0.05, 0.02, 0.03],
        [0.45, 0.08, 0.1, 0.2, 0.05, 0.02, 0.07, 0.03],
    )
    ward_p = np.where(
        adm["cond_cancer"].to_numpy()[:, None] == 1, [0.2, 0.05, 0.6, 0.1, 0.02, 0.01, 0.01, 0.01], ward_p
    )
    ward = np.asarray(WARDS, dtype=object)[
        (rng.random(n)[:, None] > np.cumsum(ward_p, axis=1)).sum(axis=1).clip(0, 7)
    ]
    unit_p = np.where(
        cardiac[:, None], [0.15, 0.1, 0.4, 0.25, 0.05, 0.05], [0.5, 0.25, 0.03, 0.02, 0.12, 0.08]
    )
    unit = np.asarray(ICUS, dtype=object)[
        (rng.random(n)[:, None] > np.cumsum(unit_p, axis=1)).sum(axis=1).clip(0, 5)
    ]
    icu_in_s = np.where(has_icu, np.maximum(icu_in + jitter, start), -1)
    icu_out_s = np.where(has_icu, np.minimum(icu_out + jitter, disch), -1)
    segs = [  # (mask, intime, outtime, careunit, eventtype or None = admit/transfer by order)
        (
            ed,
            adm["edregtime"].to_numpy(),
            adm["edouttime"].to_numpy(),
            np.where(adm["kind"].to_numpy() == 1, "Emergency Department Observation", "Emergency Department"),
            "ED",
        ),
        (~has_icu | (icu_in_s > start), start, np.where(has_icu, icu_in_s, disch), ward, None),
        (has_icu, icu_in_s, icu_out_s, unit, None),
        (has_icu & (icu_out_s < disch), icu_out_s, disch, ward, None),
        (np.ones(n, bool), disch, np.full(n, -1), np.full(n, None, dtype=object), "discharge"),
    ]
    parts = []
    for order, (mask, tin, tout, unit_name, event) in enumerate(segs):
        i = np.flatnonzero(mask)
        parts.append(
            pd.DataFrame(
                {
                    "a": i,
                    "order": order,
                    "in": tin[i],
                    "out": tout[i],
                    "careunit": np.asarray(unit_name, dtype=object)[i],
                    "event": event,
                }
            )
        )
    tr = pd.concat(parts, ignore_index=True).sort_values(["a", "order"], kind="stable").reset_index(drop=True)
    stay = tr["event"].isna().to_numpy()
    first_stay = stay & ~pd.Series(np.where(stay, tr["a"].to_numpy(), -1)).duplicated().to_numpy()
    tr["event"] = np.where(first_stay, "admit", tr["event"].fillna("transfer").to_numpy())
    a = tr["a"].to_numpy()
    transfers = pa.table(
        {
            "subject_id": adm["subject_id"].to_numpy()[a],
            "hadm_id": adm["hadm_id"].to_numpy()[a],
            "transfer_id": perm_ids(len(tr), 30_000_000, 10_000_000, rng),
            "eventtype": strings(tr["event"]),
            "careunit": strings(tr["careunit"], tr["careunit"].isna().to_numpy()),
            "intime": ts(tr["in"]),
            "outtime": ts(tr["out"]),
        }
    )
    i = np.flatnonzero(has_icu)
    icustays = pa.table(
        {
            "subject_id": adm["subject_id"].to_numpy()[i],
            "hadm_id": adm["hadm_id"].to_numpy()[i],
            "stay_id": perm_ids(i.size, 30_000_000, 10_000_000, rng),
            "first_careunit": strings(unit[i]),
            "last_careunit": strings(unit[i]),
            "intime": ts(icu_in_s[i]),
            "outtime": ts(icu_out_s[i]),
            "los": (icu_out_s[i] - icu_in_s[i]) / DAY,
        }
    )
    return transfers, icustays
