"""Feature catalogue of the MIMIC-IV cohort recipe: what each feature column is, and where it comes from.

The SQL recipes in ``data_recipes/mimic_iv/`` stay generic; everything that names a concrete code lives here:

* ``LABS`` (``hosp/labevents`` itemids) and ``VITALS`` (``icu/chartevents`` itemids, used only when that
  optional table exists), each summarised by ``MEASUREMENT_STATS`` over the task's window;
* ``CHARLSON``: the Charlson comorbidity groups as ICD-9-CM **and** ICD-10 code prefixes (Quan et al.,
  Med Care 2005;43:1130), with the classic Charlson weights for ``charlson_index``;
* ``MEDICATION_CLASSES``: case-insensitive regular expressions on ``prescriptions.drug``;
* ``CATEGORICALS``: the admission/patient columns that are ordinal-encoded (code 0 = unknown).

``feature_specs()`` is the single list of output columns; ``sql_fragments()`` renders the pieces of SQL
(pivots, the Charlson index) that depend on the catalogue, so adding a lab is a one-line change here.

>>> expand_codes("I60-I62")
['I60', 'I61', 'I62']
>>> [s.name for s in feature_specs()][:3]
['age', 'sex', 'admission_type']
"""

from __future__ import annotations

import dataclasses
import re

MEASUREMENT_STATS: tuple[str, ...] = ("first", "last", "min", "max", "mean", "count")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A lab or vital sign: one output name for one or more itemids measuring the same quantity."""

    name: str
    itemids: tuple[int, ...]
    unit: str
    source: str = "hosp/labevents"


# The most frequent numeric labs of MIMIC-IV hosp/labevents (d_labitems itemids), chosen to cover the
# organ systems behind readmission and deterioration: kidney, electrolytes, blood count, coagulation,
# liver and nutrition, perfusion (lactate) and cardiac strain (troponin T, NT-proBNP).
LABS: tuple[Measurement, ...] = (
    Measurement("creatinine", (50912,), "mg/dL"),
    Measurement("urea_nitrogen", (51006,), "mg/dL"),
    Measurement("sodium", (50983,), "mEq/L"),
    Measurement("potassium", (50971,), "mEq/L"),
    Measurement("chloride", (50902,), "mEq/L"),
    Measurement("bicarbonate", (50882,), "mEq/L"),
    Measurement("glucose", (50931,), "mg/dL"),
    Measurement("calcium", (50893,), "mg/dL"),
    Measurement("magnesium", (50960,), "mg/dL"),
    Measurement("phosphate", (50970,), "mg/dL"),
    Measurement("hemoglobin", (51222,), "g/dL"),
    Measurement("wbc", (51301, 51300), "K/uL"),
    Measurement("platelets", (51265,), "K/uL"),
    Measurement("inr", (51237,), "ratio"),
    Measurement("albumin", (50862,), "g/dL"),
    Measurement("bilirubin_total", (50885,), "mg/dL"),
    Measurement("alt", (50861,), "IU/L"),
    Measurement("lactate", (50813,), "mmol/L"),
    Measurement("troponin_t", (51003,), "ng/mL"),
    Measurement("ntprobnp", (50963,), "pg/mL"),
)

# icu/chartevents itemids (MetaVision). Absent from the demo copy; used when the file exists.
VITALS: tuple[Measurement, ...] = (
    Measurement("heart_rate", (220045,), "bpm", "icu/chartevents"),
    Measurement("sbp", (220179, 220050), "mmHg", "icu/chartevents"),
    Measurement("dbp", (220180, 220051), "mmHg", "icu/chartevents"),
    Measurement("resp_rate", (220210,), "insp/min", "icu/chartevents"),
    Measurement("spo2", (220277,), "%", "icu/chartevents"),
    Measurement("temperature_f", (223761,), "F", "icu/chartevents"),
)

# column -> source table. Values are kept as strings; categories are fitted on the train split.
CATEGORICALS: dict[str, str] = {
    "sex": "hosp/patients",
    "admission_type": "hosp/admissions",
    "admission_location": "hosp/admissions",
    "insurance": "hosp/admissions",
    "language": "hosp/admissions",
    "marital_status": "hosp/admissions",
    "race": "hosp/admissions",
}

# group -> (weight, ICD-9-CM prefixes, ICD-10 prefixes). "A-B" expands to every code between A and B with
# the same letters and width. Quan 2005 enhanced ICD-9-CM and ICD-10 coding algorithms.
CHARLSON: dict[str, tuple[int, str, str]] = {
    "mi": (1, "410 412", "I21 I22 I252"),
    "chf": (
        1,
        "39891 40201 40211 40291 40401 40403 40411 40413 40491 40493 4254-4259 428",
        "I099 I110 I130 I132 I255 I420 I425-I429 I43 I50 P290",
    ),
    "pvd": (
        1,
        "0930 4373 440 441 4431-4439 4471 5571 5579 V434",
        "I70 I71 I731 I738 I739 I771 I790 I792 K551 K558 K559 Z958 Z959",
    ),
    "cevd": (1, "36234 430-438", "G45 G46 H340 I60-I69"),
    "dementia": (1, "290 2941 3312", "F00-F03 F051 G30 G311"),
    "cpd": (1, "4168 4169 490-505 5064 5081 5088", "I278 I279 J40-J47 J60-J67 J684 J701 J703"),
    "rheumd": (1, "4465 7100-7104 7140-7142 7148 725", "M05 M06 M315 M32-M34 M351 M353 M360"),
    "pud": (1, "531-534", "K25-K28"),
    "mld": (
        1,
        "07022 07023 07032 07033 07044 07054 0706 0709 570 571 5733 5734 5738 5739 V427",
        "B18 K700-K703 K709 K713-K715 K717 K73 K74 K760 K762-K764 K768 K769 Z944",
    ),
    "diab": (
        1,
        "2500-2503 2508 2509",
        "E100 E101 E106 E108 E109 E110 E111 E116 E118 E119 E120 E121 E126 E128 E129 "
        "E130 E131 E136 E138 E139 E140 E141 E146 E148 E149",
    ),
    "diabwc": (2, "2504-2507", "E102-E105 E107 E112-E115 E117 E122-E125 E127 E132-E135 E137 E142-E145 E147"),
    "hp": (2, "3341 342 343 3440-3446 3449", "G041 G114 G801 G802 G81 G82 G830-G834 G839"),
    "rend": (
        2,
        "40301 40311 40391 40402 40403 40412 40413 40492 40493 582 5830-5837 585 586 5880 V420 V451 V56",
        "I120 I131 N032-N037 N052-N057 N18 N19 N250 Z490-Z492 Z940 Z992",
    ),
    "canc": (
        2,
        "140-172 1740-1958 200-208 2386",
        "C00-C26 C30-C34 C37-C41 C43 C45-C58 C60-C76 C81-C85 C88 C90-C97",
    ),
    "msld": (3, "4560-4562 5722-5728", "I850 I859 I864 I982 K704 K711 K721 K729 K765 K766 K767"),
    "metacanc": (6, "196-199", "C77-C80"),
    "aids": (6, "042-044", "B20-B22 B24"),
}
# (milder, more severe): the milder group adds no weight to charlson_index when the severe one is present.
CHARLSON_HIERARCHY: tuple[tuple[str, str], ...] = (("mld", "msld"), ("diab", "diabwc"), ("canc", "metacanc"))

# class -> (include regex, exclude regex) on lower(drug). Heparin flushes keep lines open: not anticoagulation.
MEDICATION_CLASSES: dict[str, tuple[str, str]] = {
    "anticoagulant": (
        "heparin|warfarin|enoxaparin|apixaban|rivaroxaban|dabigatran|fondaparinux|argatroban|bivalirudin",
        "flush|lock",
    ),
    "antiplatelet": ("aspirin|clopidogrel|ticagrelor|prasugrel", ""),
    "beta_blocker": ("metoprolol|carvedilol|atenolol|labetalol|propranolol|esmolol|bisoprolol|nadolol", ""),
    "ace_arb": (
        "lisinopril|captopril|enalapril|ramipril|quinapril|benazepril|losartan|valsartan|irbesartan"
        "|candesartan|olmesartan|sacubitril",
        "",
    ),
    "loop_diuretic": ("furosemide|torsemide|bumetanide", ""),
    "statin": ("atorvastatin|simvastatin|pravastatin|rosuvastatin|lovastatin", ""),
    "insulin": ("insulin", ""),
    "oral_antidiabetic": (
        "metformin|glipizide|glyburide|glimepiride|sitagliptin|linagliptin|pioglitazone|empagliflozin"
        "|dapagliflozin",
        "",
    ),
    "opioid": (
        "morphine|hydromorphone|oxycodone|fentanyl|methadone|tramadol|hydrocodone|oxymorphone|buprenorphine",
        "",
    ),
    "antibiotic": (
        "vancomycin|piperacillin|cefepime|ceftriaxone|meropenem|levofloxacin|ciprofloxacin|azithromycin"
        "|metronidazole|cefazolin|ampicillin|sulfamethoxazole|doxycycline|linezolid|clindamycin|ceftazidime"
        "|amoxicillin|nitrofurantoin|cefpodoxime|daptomycin|gentamicin|ertapenem",
        "",
    ),
    "vasopressor": ("norepinephrine|vasopressin|phenylephrine|dopamine|epinephrine", "lidocaine"),
    "corticosteroid": (
        "prednisone|methylprednisolone|hydrocortisone|dexamethasone|prednisolone|fludrocortisone",
        "",
    ),
    "acid_suppressant": ("pantoprazole|omeprazole|esomeprazole|lansoprazole|famotidine|ranitidine", ""),
    "bronchodilator": ("albuterol|ipratropium|tiotropium|salmeterol|formoterol|levalbuterol", ""),
    "antiarrhythmic": ("amiodarone|digoxin|sotalol|dofetilide|flecainide", ""),
    "benzodiazepine": ("lorazepam|diazepam|midazolam|alprazolam|clonazepam|chlordiazepoxide", ""),
    "antipsychotic": ("haloperidol|quetiapine|olanzapine|risperidone|ziprasidone", ""),
}


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One output column. ``zero_is_missing`` marks counts whose 0 means "never measured"."""

    name: str
    kind: str  # "numeric" | "categorical"
    source: str
    description: str
    zero_is_missing: bool = False


def expand_codes(spec: str) -> list[str]:
    """Expand a space-separated list of code prefixes and ``A-B`` ranges into prefixes.

    >>> expand_codes("4254-4256 428")
    ['4254', '4255', '4256', '428']
    >>> expand_codes("K700-K702")
    ['K700', 'K701', 'K702']
    """
    out: list[str] = []
    for token in spec.split():
        if "-" not in token:
            out.append(token)
            continue
        start, end = token.split("-")
        head = re.match(r"[A-Z]*", start).group(0)
        if head != re.match(r"[A-Z]*", end).group(0) or len(start) != len(end):
            raise ValueError(f"bad code range {token!r}: ends must share letters and width")
        width = len(start) - len(head)
        out += [f"{head}{i:0{width}d}" for i in range(int(start[len(head) :]), int(end[len(head) :]) + 1)]
    return out


def charlson_prefix_rows() -> list[tuple[int, str, str]]:
    """(icd_version, prefix, group) rows for the prefix join in ``03_diagnoses.sql``."""
    rows = []
    for group, (_, icd9, icd10) in CHARLSON.items():
        rows += [(9, p, group) for p in expand_codes(icd9)]
        rows += [(10, p, group) for p in expand_codes(icd10)]
    return rows


def measurement_rows(include_vitals: bool) -> list[tuple[int, int, str, str]]:
    """(fid, itemid, feature prefix, source) rows; fid numbers the measurements in catalogue order."""
    rows = []
    for fid, m in enumerate(measurements(include_vitals)):
        rows += [(fid, item, _measurement_prefix(m), m.source) for item in m.itemids]
    return rows


def measurements(include_vitals: bool) -> tuple[Measurement, ...]:
    return LABS + (VITALS if include_vitals else ())


def _measurement_prefix(m: Measurement) -> str:
    return ("vital_" if m.source == "icu/chartevents" else "lab_") + m.name


def feature_specs(include_vitals: bool = False) -> list[FeatureSpec]:
    """Every feature column of the task tables, in output order."""
    adm, pat = "hosp/admissions", "hosp/patients"
    specs = [FeatureSpec("age", "numeric", pat, "age at admission (anchor_age + admit year - anchor_year)")]
    specs += [
        FeatureSpec(c, "categorical", src, f"{c} (ordinal code, 0 = unknown)")
        for c, src in CATEGORICALS.items()
    ]
    specs += [
        FeatureSpec("los_days", "numeric", adm, "days from admittime to the prediction time"),
        FeatureSpec("n_admissions_prev_365d", "numeric", adm, "admissions starting in the 365 days before"),
        FeatureSpec(
            "n_ed_visits_prev_365d", "numeric", adm, "of those, admissions through the ED (edregtime)"
        ),
        FeatureSpec("days_since_last_discharge", "numeric", adm, "days since the previous discharge"),
        FeatureSpec("n_icu_stays", "numeric", "icu/icustays", "ICU stays started by the prediction time"),
        FeatureSpec("icu_days", "numeric", "icu/icustays", "ICU days spent by the prediction time"),
    ]
    dx = "hosp/diagnoses_icd"
    specs += [FeatureSpec(f"dx_{g}", "numeric", dx, f"Charlson group {g} coded (0/1)") for g in CHARLSON]
    specs += [
        FeatureSpec("charlson_index", "numeric", dx, "Charlson comorbidity index of the coded groups"),
        FeatureSpec("n_diagnoses", "numeric", dx, "diagnosis codes known at the prediction time"),
        FeatureSpec("n_procedures", "numeric", "hosp/procedures_icd", "ICD procedures of this admission"),
    ]
    rx = "hosp/prescriptions"
    specs += [FeatureSpec(f"med_{c}", "numeric", rx, f"any {c} prescribed (0/1)") for c in MEDICATION_CLASSES]
    specs.append(FeatureSpec("n_distinct_drugs", "numeric", rx, "distinct drug names prescribed"))
    for m in measurements(include_vitals):
        prefix = _measurement_prefix(m)
        for stat in MEASUREMENT_STATS:
            desc = f"{stat} {m.name} ({m.unit}; itemid {'/'.join(map(str, m.itemids))})"
            specs.append(FeatureSpec(f"{prefix}_{stat}", "numeric", m.source, desc, stat == "count"))
    return specs


def sql_fragments(include_vitals: bool) -> dict[str, str]:
    """SQL pieces that the recipe files use as ``{{name}}`` placeholders."""
    # Pivot by one LEFT JOIN per quantity (each a small hash join): in DuckDB 2.0 this is several times
    # faster than 120 FILTERed aggregates or PIVOT over the long table.
    column = {"first": "v_first", "last": "v_last", "min": "v_min", "max": "v_max", "mean": "v_mean"}
    meas_cols, meas_joins = [], []
    for fid, m in enumerate(measurements(include_vitals)):
        prefix = _measurement_prefix(m)
        for stat in MEASUREMENT_STATS:
            if stat == "count":
                meas_cols.append(f"coalesce(g{fid}.n, 0) AS {prefix}_count")
            else:
                meas_cols.append(f"g{fid}.{column[stat]} AS {prefix}_{stat}")
        meas_joins.append(
            f"LEFT JOIN meas_agg g{fid} ON g{fid}.task = w.task AND g{fid}.hadm_id = w.hadm_id AND g{fid}.fid = {fid}"
        )
    dx = [f"coalesce(max((g.grp = '{g}')::INTEGER), 0) AS dx_{g}" for g in CHARLSON]
    severe_of = {mild: severe for mild, severe in CHARLSON_HIERARCHY}
    terms = []
    for g, (weight, _, _) in CHARLSON.items():
        guard = f" * (1 - dx_{severe_of[g]})" if g in severe_of else ""
        terms.append(f"{weight} * dx_{g}{guard}")
    med = [f"coalesce(max((c.cls = '{c}')::INTEGER), 0) AS med_{c}" for c in MEDICATION_CLASSES]
    return {
        "measurement_columns": ",\n    ".join(meas_cols),
        "measurement_joins": "\n".join(meas_joins),
        "dx_pivot": ",\n    ".join(dx),
        "charlson_index": " + ".join(terms),
        "med_pivot": ",\n    ".join(med),
    }
