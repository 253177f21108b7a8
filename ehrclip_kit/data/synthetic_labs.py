"""``hosp/labevents`` of the synthetic world: when labs are drawn, which panels, and their values.

Schedule per admission: one draw on arrival (in the ED when the patient came through it), one most
mornings (04:00-07:00), extra STAT draws (more in the ICU), and now and then an outpatient draw weeks before
the admission (``hadm_id`` empty, as in MIMIC). ``lab_density`` scales the number of draws.

Panels (BMP, CBC, Mg/Phos/Ca, coagulation, LFTs, lactate, troponin, NT-proBNP) are ordered with
probabilities that rise when a condition is present (a lactate for sepsis, a BNP for heart failure), so
missingness itself is informative, as in real data. Values are drawn on each lab's natural scale (log for
skewed labs): population centre + a patient effect + condition shifts (chronic: constant; acute: fading
over about 2.5 days; deterioration before a late ICU transfer or death) + draw noise, then rounded to the
lab's precision, flagged ``abnormal`` outside the reference range. Troponin T under 0.01 is reported as
``<0.01`` with an empty ``valuenum``, as in MIMIC.

Rows are generated and written in chunks of admissions, so a 50-million-row world fits in memory.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from ehrclip_kit.data import synthetic_catalog as cat
from ehrclip_kit.data.synthetic_io import CsvGzWriter, providers, ts

DAY, HOUR, MINUTE = 86400, 3600, 60
LAB_KEYS = tuple(cat.LAB_ITEMS)
LAB_COLUMNS = [
    "labevent_id",
    "subject_id",
    "hadm_id",
    "specimen_id",
    "itemid",
    "order_provider_id",
    "charttime",
    "storetime",
    "value",
    "valuenum",
    "valueuom",
    "ref_range_lower",
    "ref_range_upper",
    "flag",
    "priority",
    "comments",
]
PANELS = tuple(cat.LAB_PANELS)
# (panel index, lab index) for every lab of every panel.
_TEMPLATE = np.array(
    [(p, LAB_KEYS.index(lab)) for p, name in enumerate(PANELS) for lab in cat.LAB_PANELS[name]]
)
# Shift of each lab in the hours before a late ICU transfer or death (the "deterioration").
DETERIORATION = {
    "lactate": 0.7,
    "creatinine": 0.35,
    "wbc": 0.3,
    "bicarbonate": -4,
    "platelets": -0.25,
    "bilirubin": 0.3,
    "troponin_t": 0.3,
    "anion_gap": 3,
    "inr": 0.15,
    "pt": 0.15,
}
ACUTE_TAU_H = 60.0
TROPONIN_NOTE = "cTropnT > 0.10 ng/mL suggests Acute MI."


def _spec(field: int) -> np.ndarray:
    return np.array([cat.LAB_ITEMS[k][field] for k in LAB_KEYS])


def shift_matrices(adm: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per admission and lab: the constant (chronic, demographic, drug) shift and the fading acute shift."""
    n, col = len(adm), {k: j for j, k in enumerate(LAB_KEYS)}
    chronic, acute = np.zeros((n, len(LAB_KEYS))), np.zeros((n, len(LAB_KEYS)))
    for cond, effects in cat.LAB_EFFECTS.items():
        prefix = "social_" if cond == "substance_use" else "cond_"
        present = adm[prefix + cond].to_numpy().astype(float)
        sev = adm[f"sev_{cond}"].to_numpy() if prefix == "cond_" else np.zeros(n)
        target = acute if cond in ("sepsis", "pneumonia", "acute_mi") else chronic
        for lab, (base, per_sev) in effects.items():
            target[:, col[lab]] += present * (base + per_sev * sev)
    decades = np.maximum(adm["age"].to_numpy() - 60, 0) / 10
    female = ~adm["male"].to_numpy().astype(bool)
    chronic[:, col["creatinine"]] += 0.04 * decades - 0.15 * female
    chronic[:, col["hemoglobin"]] += -0.2 * decades - 0.8 * female
    chronic[:, col["hematocrit"]] += -0.6 * decades - 2.4 * female
    chronic[:, col["ntprobnp"]] += 0.25 * decades
    warfarin = adm["on_warfarin"].to_numpy().astype(float)
    chronic[:, col["inr"]] += 0.55 * warfarin
    chronic[:, col["pt"]] += 0.55 * warfarin
    return chronic, acute


def _draws(adm: pd.DataFrame, rng: np.random.Generator, density: float) -> pd.DataFrame:
    """One row per blood draw: admission index, time and kind (0 arrival, 1 morning, 2 STAT, 3 outpatient)."""
    m = len(adm)
    # Practice variation: some teams order far more labs than others, whatever the patient has.
    density = density * np.exp(rng.normal(0, 0.45, m))
    admit, disch = adm["admittime"].to_numpy(), adm["dischtime"].to_numpy()
    ed, edreg = adm["ed"].to_numpy().astype(bool), adm["edregtime"].to_numpy()
    first = np.where(ed, edreg + rng.uniform(15, 90, m) * MINUTE, admit + rng.uniform(30, 180, m) * MINUTE)
    first = np.minimum(first, disch - MINUTE)
    day0 = (admit // DAY + 1) * DAY + 4 * HOUR
    n_days = np.maximum((disch - day0) // DAY + 1, 0)
    a_day = np.repeat(np.arange(m), n_days)
    d = np.arange(a_day.size) - np.repeat(np.cumsum(n_days) - n_days, n_days)
    t_day = day0[a_day] + d * DAY + rng.uniform(0, 3, a_day.size) * HOUR
    keep = (t_day < disch[a_day]) & (rng.random(a_day.size) < np.minimum(1.0, 0.85 * density)[a_day])
    los_days = (disch - admit) / DAY
    icu_in, icu_out = adm["icu_in"].to_numpy(), adm["icu_out"].to_numpy()
    icu_days = np.where(icu_in >= 0, (icu_out - icu_in) / DAY, 0.0)
    n_ward = rng.poisson(density * 0.25 * los_days + np.maximum(0.0, 0.85 * density - 1) * los_days)
    n_icu = rng.poisson(density * 1.5 * icu_days)
    a_ward, a_icu = np.repeat(np.arange(m), n_ward), np.repeat(np.arange(m), n_icu)
    t_ward = admit[a_ward] + rng.random(a_ward.size) * (disch - admit)[a_ward]
    t_icu = icu_in[a_icu] + rng.random(a_icu.size) * (icu_out - icu_in)[a_icu]
    t_op = admit - rng.uniform(7, 60, m) * DAY
    op = (rng.random(m) < 0.1 * np.minimum(density, 1.0)) & (t_op > adm["prev_dischtime"].to_numpy() + DAY)
    draws = pd.DataFrame(
        {
            "a": np.concatenate([np.arange(m), a_day[keep], a_ward, a_icu, np.flatnonzero(op)]),
            "t": np.concatenate([first, t_day[keep], t_ward, t_icu, t_op[op]]).astype(np.int64)
            // MINUTE
            * MINUTE,
            "kind": np.concatenate(
                [np.zeros(m), np.ones(keep.sum()), np.full(a_ward.size + a_icu.size, 2), np.full(op.sum(), 3)]
            ).astype(np.int8),
        }
    )
    return draws.sort_values(["a", "t", "kind"], kind="stable").reset_index(drop=True)


def _panel_probabilities(adm: pd.DataFrame, draws: pd.DataFrame) -> np.ndarray:
    a, t, kind = draws["a"].to_numpy(), draws["t"].to_numpy(), draws["kind"].to_numpy()

    def has(name):
        return adm[f"cond_{name}"].to_numpy()[a].astype(float)

    warf = adm["on_warfarin"].to_numpy()[a].astype(float)
    icu_in, icu_out = adm["icu_in"].to_numpy()[a], adm["icu_out"].to_numpy()[a]
    in_icu = ((icu_in >= 0) & (t >= icu_in) & (t <= icu_out)).astype(float)
    early = (t - adm["admittime"].to_numpy()[a] < 2 * DAY).astype(float)
    first, op = kind == 0, kind == 3
    hf, cirr, sepsis, ami = has("heart_failure"), has("cirrhosis"), has("sepsis"), has("acute_mi")

    def p(arrival, later, outpatient):
        return np.where(first, arrival, np.where(op, outpatient, later))

    probs = {
        "bmp": p(0.97, 0.9, 0.95),
        "mg": p(0.55, 0.6, 0.1),
        "cbc": p(0.95, 0.85, 0.6),
        "coag": p(
            0.3 + 0.35 * np.maximum.reduce([has("atrial_fibrillation"), cirr, warf]),
            0.1 + 0.35 * np.maximum(warf, cirr) + 0.2 * in_icu,
            0.3 * warf,
        ),
        "lft": p(0.3 + 0.4 * cirr + 0.2 * sepsis, 0.07 + 0.3 * cirr, 0.2),
        "lactate": p(
            0.12 + 0.55 * sepsis + 0.1 * has("pneumonia"), 0.02 + 0.3 * in_icu + 0.2 * sepsis * early, 0
        ),
        "trop": p(
            0.22 + 0.6 * ami + 0.15 * hf + 0.1 * has("myocardial_infarction"), 0.02 + 0.6 * ami * early, 0
        ),
        "bnp": p(0.06 + 0.35 * hf, 0.01 + 0.04 * hf, 0.05 * hf),
    }
    return np.clip(np.stack([probs[name] for name in PANELS], axis=1), 0, 1)


def _chunk(adm, pat_re, rng, density, first_id, spec_counter, spec_perm, prov) -> tuple[pa.Table, int]:
    draws = _draws(adm, rng, density)
    ordered = rng.random((len(draws), len(PANELS))) < _panel_probabilities(adm, draws)
    # Each (draw, panel) ordered is one specimen; each lab of it is resulted with probability 0.985.
    spec_index = np.full(ordered.shape, -1, dtype=np.int64)
    spec_index[ordered] = np.arange(ordered.sum()) + spec_counter
    take = ordered[:, _TEMPLATE[:, 0]] & (rng.random((len(draws), len(_TEMPLATE))) < 0.985)
    d, k = np.nonzero(take)
    lab, spec = _TEMPLATE[k, 1], spec_index[d, _TEMPLATE[k, 0]]
    a, t, kind = draws["a"].to_numpy()[d], draws["t"].to_numpy()[d], draws["kind"].to_numpy()[d]
    n = len(lab)
    chronic, acute = shift_matrices(adm)
    admit = adm["admittime"].to_numpy()[a]
    decay = np.where(kind == 3, 0.0, np.exp(-np.clip(t - admit, 0, None) / (ACUTE_TAU_H * HOUR)))
    event = adm["critical_event_time"].to_numpy()[a]
    ramp = np.where((event >= 0) & (kind != 3), np.clip((t - (event - 8 * HOUR)) / (12 * HOUR), 0, 1), 0.0)
    det = np.array([DETERIORATION.get(key, 0.0) for key in LAB_KEYS])
    centre, noise, log, decimals = _spec(9), _spec(11), _spec(8).astype(bool), _spec(7).astype(int)
    x = (
        centre[lab]
        + pat_re[adm["pid"].to_numpy()[a], lab]
        + chronic[a, lab]
        + acute[a, lab] * decay
        + det[lab] * ramp
        + noise[lab] * rng.standard_normal(n)
    )
    v = np.where(log[lab], np.exp(np.minimum(x, 12)), x)
    trop = lab == LAB_KEYS.index("troponin_t")
    undetected = trop & (v < 0.01)
    scale = 10.0 ** decimals[lab]
    v = np.maximum(np.round(v * scale), 1.0) / scale  # lab precision; never 0 or negative
    value = np.empty(n, dtype="<U12")
    for j in range(len(LAB_KEYS)):
        sel = lab == j
        value[sel] = np.char.mod(f"%.{decimals[j]}f", v[sel])
    value[undetected] = "<0.01"
    valuenum = np.where(undetected, np.nan, v)
    lo, hi = _spec(5).astype(float)[lab], _spec(6).astype(float)[lab]
    abnormal = ~undetected & ((v < lo) | (v > hi))
    comments = np.where(undetected, "<0.01.  " + TROPONIN_NOTE, TROPONIN_NOTE)
    n_spec = int(ordered.sum())
    delay = (rng.uniform(15, 180, n_spec) * MINUTE).astype(np.int64)[spec - spec_counter]
    priority = pa.array(["STAT", "ROUTINE", None]).take(
        pa.array(np.where(lab == LAB_KEYS.index("lactate"), 2, np.where(np.isin(kind, (0, 2)), 0, 1)))
    )
    has_prov = (rng.random(n_spec) < 0.15)[spec - spec_counter]
    outpatient = kind == 3
    table = pa.table(
        {
            "labevent_id": np.arange(first_id, first_id + n, dtype=np.int64),
            "subject_id": adm["subject_id"].to_numpy()[a],
            "hadm_id": pa.array(adm["hadm_id"].to_numpy()[a], mask=outpatient),
            "specimen_id": spec_perm(spec),
            "itemid": _spec(0).astype(np.int64)[lab],
            "order_provider_id": pa.array(prov[spec % len(prov)], mask=~has_prov),
            "charttime": ts(t),
            "storetime": ts((t + delay) // MINUTE * MINUTE),
            "value": pa.array(value),
            "valuenum": pa.array(valuenum, from_pandas=True),
            "valueuom": pa.array([cat.LAB_ITEMS[key][4] for key in LAB_KEYS], type=pa.string()).take(
                pa.array(lab)
            ),
            "ref_range_lower": lo,
            "ref_range_upper": hi,
            "flag": pa.array(np.where(abnormal, "abnormal", ""), mask=~abnormal),
            "priority": priority,
            "comments": pa.array(comments, mask=~trop),
        }
    )
    return table, n_spec


def write_labevents(
    path, adm: pd.DataFrame, seed: int, density: float = 1.0, chunk_size: int = 10_000, progress: bool = True
) -> int:
    """Write ``hosp/labevents.csv.gz`` for all admissions, ``chunk_size`` admissions at a time; returns rows."""
    if density <= 0:
        raise ValueError(f"lab_density must be positive, got {density}")
    setup = np.random.default_rng([seed, 7001])
    between = _spec(10)
    pat_re = setup.standard_normal((int(adm["pid"].max()) + 1, len(LAB_KEYS))) * between
    hgb, hct = LAB_KEYS.index("hemoglobin"), LAB_KEYS.index("hematocrit")
    pat_re[:, hct] = 3 * pat_re[:, hgb]  # one blood, two measurements
    prov = providers(setup)
    mult = int(setup.integers(30_000_000, 90_000_000)) | 1
    while math.gcd(mult, 90_000_000) != 1:
        mult += 2
    shift = int(setup.integers(0, 90_000_000))

    def spec_perm(k):
        return 10_000_000 + (mult * k.astype(np.int64) + shift) % 90_000_000

    writer = CsvGzWriter(path, LAB_COLUMNS, level=1)
    next_id, spec_counter = 1, 0
    starts = range(0, len(adm), chunk_size)
    for i, lo in enumerate(tqdm(starts, desc="labevents", unit="chunk", disable=not progress)):
        rng = np.random.default_rng([seed, 7002, i])
        table, n_spec = _chunk(
            adm.iloc[lo : lo + chunk_size], pat_re, rng, density, next_id, spec_counter, spec_perm, prov
        )
        writer.write(table)
        next_id += table.num_rows
        spec_counter += n_spec
    writer.close()
    return writer.rows
