"""Discharge summaries of the synthetic world, in MIMIC-IV-Note's layout and section headings.

:func:`render_notes` writes one short note (about 150-300 words) per admission from a *note state*: which
conditions and social factors the note asserts, with severities. ``synthetic.py`` builds that state from
the latent truth and ``text_signal`` (each statement true with probability s, drawn at random otherwise);
this module only phrases it. Conditions are stated in History of Present Illness, Past Medical History,
Brief Hospital Course and Discharge Diagnosis; social factors in Social History. Phrasing varies on
purpose: synonyms and abbreviations (CHF, HFrEF, heart failure), severity words, negations of absent
conditions ("No history of CHF."), hedges, irrelevant history and occasional omissions, so that a model
has to read rather than match one keyword. Names, dates and places are ``___`` as in MIMIC.

Negations always put the cue before the term in the same sentence ("No history of ...", "Denies ...",
"Negative for ..."), so a simple sentence-level negation check recovers the asserted state.
"""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pyarrow as pa

from ehrclip_kit.data import synthetic_catalog as cat
from ehrclip_kit.data.synthetic_io import CsvGzWriter, ts

DAY, HOUR, MINUTE = 86400, 3600, 60

# condition -> (mild, moderate, severe) phrasings
TERMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "heart_failure": (
        ("HFpEF", "diastolic CHF", "mild diastolic heart failure", "compensated CHF"),
        ("chronic systolic heart failure", "CHF", "congestive heart failure", "HFrEF"),
        (
            "severe HFrEF",
            "advanced systolic heart failure",
            "severe ischemic cardiomyopathy with reduced EF",
            "end-stage CHF",
        ),
    ),
    "atrial_fibrillation": (
        ("paroxysmal atrial fibrillation", "paroxysmal AF"),
        ("atrial fibrillation", "afib", "AF"),
        ("permanent atrial fibrillation", "persistent afib with RVR episodes"),
    ),
    "myocardial_infarction": (
        ("remote MI", "prior myocardial infarction"),
        ("CAD s/p MI", "history of NSTEMI"),
        ("CAD s/p multiple MIs", "ischemic heart disease with prior STEMI"),
    ),
    "hypertension": (
        ("hypertension", "HTN"),
        ("hypertension", "HTN", "essential hypertension"),
        ("poorly controlled hypertension", "resistant HTN"),
    ),
    "conduction_disease": (
        ("first degree AV block", "RBBB"),
        ("LBBB", "left bundle branch block", "bifascicular block"),
        ("complete heart block", "high-grade AV block", "trifascicular block"),
    ),
    "ckd": (
        ("CKD stage II", "mild chronic kidney disease"),
        ("CKD stage III", "chronic kidney disease", "CKD"),
        ("CKD stage IV", "ESRD on hemodialysis", "advanced chronic kidney disease"),
    ),
    "copd": (
        ("mild COPD", "emphysema"),
        ("COPD", "chronic obstructive pulmonary disease"),
        ("severe COPD on home oxygen", "end-stage emphysema on home O2"),
    ),
    "diabetes": (
        ("diet-controlled diabetes", "type 2 diabetes", "DM2"),
        ("T2DM", "type 2 diabetes mellitus", "diabetes"),
        ("insulin-dependent diabetes", "poorly controlled DM2 with neuropathy", "uncontrolled diabetes"),
    ),
    "cirrhosis": (
        ("compensated cirrhosis", "cirrhosis"),
        ("alcoholic cirrhosis", "HCV cirrhosis", "cirrhosis"),
        (
            "decompensated cirrhosis with ascites",
            "end-stage liver disease",
            "cirrhosis with hepatic encephalopathy",
        ),
    ),
    "sepsis": (
        ("sepsis", "bacteremia with sepsis"),
        ("sepsis", "severe sepsis", "urosepsis"),
        ("septic shock", "septic shock requiring pressors"),
    ),
    "pneumonia": (
        ("pneumonia", "community-acquired pneumonia", "CAP"),
        ("pneumonia", "RLL pneumonia", "aspiration pneumonia"),
        ("multifocal pneumonia", "severe pneumonia with hypoxia"),
    ),
    "acute_mi": (
        ("NSTEMI", "type II NSTEMI"),
        ("NSTEMI", "acute myocardial infarction", "acute coronary syndrome"),
        ("STEMI", "large anterior STEMI"),
    ),
}
CANCER_TERMS = {
    "lung": ("lung cancer", "NSCLC"),
    "breast": ("breast cancer",),
    "colon": ("colon cancer",),
    "kidney": ("renal cell carcinoma",),
    "rectum": ("rectal adenocarcinoma", "rectal cancer"),
}
NEGATION_TERMS: dict[str, tuple[str, ...]] = {
    "heart_failure": ("CHF", "heart failure"),
    "atrial_fibrillation": ("atrial fibrillation", "afib"),
    "myocardial_infarction": ("prior MI", "coronary artery disease"),
    "hypertension": ("hypertension",),
    "conduction_disease": ("conduction disease", "heart block"),
    "ckd": ("kidney disease", "CKD"),
    "copd": ("COPD", "lung disease"),
    "diabetes": ("diabetes",),
    "cirrhosis": ("liver disease", "cirrhosis"),
    "cancer": ("malignancy", "cancer"),
    "sepsis": ("sepsis",),
    "pneumonia": ("pneumonia",),
    "acute_mi": ("acute MI", "ACS"),
}
NEGATION_CUES = ("No history of {}.", "Denies {}.", "No known {}.", "Negative for {}.")
ACUTE_NEGATION_CUES = ("No evidence of {}.", "Workup negative for {}.")
COMPLAINTS = {
    "sepsis": ("fever", "fever and hypotension", "altered mental status"),
    "pneumonia": ("cough", "fever and cough"),
    "acute_mi": ("chest pain", "chest pressure"),
    "heart_failure": ("shortness of breath", "dyspnea on exertion", "leg swelling"),
    "copd": ("shortness of breath", "wheezing"),
    "cirrhosis": ("abdominal distension", "confusion"),
    "ckd": ("weakness", "hyperkalemia"),
    "cancer": ("fatigue", "pain"),
    "diabetes": ("hyperglycemia",),
    "atrial_fibrillation": ("palpitations",),
    "other": ("fall", "syncope", "abdominal pain", "weakness", "nausea and vomiting"),
}
COURSE = {
    "sepsis": "treated with broad-spectrum antibiotics and IV fluids, cultures followed",
    "pneumonia": "treated with antibiotics with improvement in oxygenation",
    "acute_mi": "started on heparin drip, aspirin and a statin, cardiology consulted",
    "heart_failure": "diuresed with IV furosemide to euvolemia",
    "copd": "treated with nebulizers and a steroid taper",
    "cirrhosis": "managed with lactulose and rifaximin, diagnostic paracentesis considered",
    "ckd": "creatinine trended, renally dosed medications",
    "cancer": "symptom management, oncology following",
    "diabetes": "insulin sliding scale, glucose controlled",
    "atrial_fibrillation": "rate controlled, anticoagulation continued",
}
RESULTS = {
    "heart_failure": "elevated BNP",
    "ckd": "creatinine above normal",
    "sepsis": "elevated lactate",
    "acute_mi": "elevated troponin",
    "pneumonia": "leukocytosis",
    "cirrhosis": "elevated bilirubin",
    "diabetes": "hyperglycemia",
}
EXAM = {
    "heart_failure": "bibasilar crackles, JVP elevated, 2+ pitting edema",
    "copd": "diffuse expiratory wheezes",
    "pneumonia": "crackles at the right base",
    "cirrhosis": "distended abdomen with shifting dullness",
}
SOCIAL_TRUE = {
    "lives_alone": (
        "Lives alone.",
        "Widowed, lives alone in an apartment.",
        "Lives by {self} in an apartment.",
    ),
    "housing_instability": (
        "Currently homeless, staying in a shelter.",
        "Unstably housed.",
        "Recently evicted, staying with friends.",
    ),
    "substance_use": (
        "Drinks a pint of vodka daily.",
        "Active heroin use.",
        "Ongoing alcohol use disorder.",
        "Polysubstance use including cocaine.",
    ),
    "nonadherence": (
        "Reports frequently missing medications.",
        "Has not been taking {poss} medications as prescribed.",
        "History of nonadherence to medications and follow-up.",
    ),
}
SOCIAL_FALSE = {
    "lives_alone": ("Lives with {poss} spouse.", "Lives with family.", "Lives with {poss} daughter."),
    "housing_instability": ("Lives in {poss} own home.",),
    "substance_use": ("Denies alcohol or illicit drug use.", "No EtOH or drug use."),
    "nonadherence": ("Adherent to medications per patient.",),
}
NOISE_HISTORY = (
    "hyperlipidemia",
    "GERD",
    "osteoarthritis",
    "hypothyroidism",
    "depression",
    "s/p cholecystectomy",
    "gout",
    "anxiety",
    "OSA",
    "BPH",
    "glaucoma",
)
DISPOSITION = {
    "HOME": "Home",
    "HOME HEALTH CARE": "Home With Service",
    "SKILLED NURSING FACILITY": "Extended Care",
    "REHAB": "Extended Care",
    "CHRONIC/LONG TERM ACUTE CARE": "Extended Care",
    "HOSPICE": "Home With Service",
    "AGAINST ADVICE": "Home",
    "DIED": "Expired",
}
CHRONIC_ORDER = (
    "heart_failure",
    "cirrhosis",
    "copd",
    "ckd",
    "cancer",
    "atrial_fibrillation",
    "diabetes",
    "myocardial_infarction",
    "conduction_disease",
    "hypertension",
)
ACUTE = ("sepsis", "pneumonia", "acute_mi")
FREQ = {"1": "DAILY", "2": "BID", "3": "TID", "4": "QID"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _level(sev: float) -> int:
    return 0 if sev < 0.35 else (1 if sev < 0.7 else 2)


def _term(rng: random.Random, cond: str, sev: float, site: str) -> str:
    if cond == "cancer":
        words = ("", "metastatic ")[sev > 0.6]
        return words + rng.choice(CANCER_TERMS.get(site, ("cancer",)))
    return rng.choice(TERMS[cond][_level(sev)])


def medication_line(key: str) -> str:
    """A discharge-medication line in MIMIC's style, e.g. 'Furosemide 20 mg PO/NG DAILY'."""
    row = dict(
        zip(
            (
                "drug_type",
                "drug",
                "cd",
                "gsn",
                "ndc",
                "strength",
                "form",
                "dose",
                "unit",
                "disp",
                "disp_unit",
                "per_day",
                "route",
            ),
            cat.DRUGS[key],
            strict=True,
        )
    )
    return f"{row['drug']} {row['dose']} {row['unit']} {row['route']} {FREQ.get(row['per_day'], 'PRN')}"


def _note(rng: random.Random, r: dict) -> str:
    male = r["sex"] == "M"
    title, noun, poss, self_ = (
        ("Mr.", "man", "his", "himself") if male else ("Ms.", "woman", "her", "herself")
    )
    site = r["cancer_site"]
    chronic = [c for c in CHRONIC_ORDER if r[f"note_cond_{c}"] and rng.random() > 0.04]  # rare omissions
    acute = sorted((c for c in ACUTE if r[f"note_cond_{c}"]), key=lambda c: -r[f"note_sev_{c}"])
    if acute:
        primary = acute[0]
    elif chronic and r["kind"] == 0 and rng.random() < 0.7:
        primary = max(chronic[:5], key=lambda c: r[f"note_sev_{c}"])
    else:
        primary = "other"
    term = {c: _term(rng, c, r[f"note_sev_{c}"], site) for c in chronic + acute}
    absent = [c for c in NEGATION_TERMS if not r[f"note_cond_{c}"] and rng.random() < 0.22]
    elective = r["kind"] == 2 and not acute
    complaint = "elective procedure" if elective else rng.choice(COMPLAINTS.get(primary, COMPLAINTS["other"]))
    history = ", ".join(term[c] for c in chronic[:4]) or "no significant past medical history"
    found = f", found to have {term[primary]}" if primary in acute else ""
    exacerb = f" in the setting of {term[primary]} exacerbation" if primary in chronic else ""
    hpi = (
        f"{title} ___ is a {r['age']} y/o {noun} with {history} who presents {'for an' if elective else 'with'} {complaint}"
        f"{exacerb}{found}. " + rng.choice(("Symptoms began ___ days ago.", "Seen in ED, labs sent.", ""))
    )
    pmh = [f"- {term[c]}" for c in chronic] + [f"- {h}" for h in rng.sample(NOISE_HISTORY, rng.randint(0, 2))]
    pmh += [rng.choice(NEGATION_CUES).format(rng.choice(NEGATION_TERMS[c])) for c in absent if c not in ACUTE]
    social = []
    for s in SOCIAL_TRUE:
        bank = SOCIAL_TRUE if r[f"note_social_{s}"] else SOCIAL_FALSE
        if bank is SOCIAL_TRUE or rng.random() < 0.5:
            social.append(rng.choice(bank[s]).format(poss=poss, self=self_))
    results = [RESULTS[c] for c in chronic + acute if c in RESULTS]
    exam = [EXAM[c] for c in chronic + acute if c in EXAM][:2] or ["lungs clear, no edema"]
    course = [f"# {_cap(term[c])}: {COURSE.get(c, 'continued home regimen')}." for c in acute]
    course += [
        f"# {_cap(term[c])}: {COURSE.get(c, 'continued home regimen')}."
        for c in chronic[:3]
        if c != primary or not acute
    ]
    course += [
        rng.choice(ACUTE_NEGATION_CUES).format(rng.choice(NEGATION_TERMS[c])) for c in absent if c in ACUTE
    ]
    if not course:
        course = [f"# {_cap(complaint)}: workup unrevealing, symptoms resolved."]
    meds = [medication_line(k) for k in r["meds"]][:6]
    dx_primary = term[primary] if primary != "other" else complaint
    secondary = ", ".join(term[c] for c in chronic if c != primary) or "none"
    procedure = ", ".join(r["procedures"]) or "None"
    return "\n".join(
        [
            " ",
            "Name:  ___                     Unit No:   ___",
            " ",
            "Admission Date:  ___              Discharge Date:   ___",
            " ",
            f"Date of Birth:  ___             Sex:   {r['sex']}",
            " ",
            f"Service: {r['service']}",
            " ",
            "Allergies: ",
            rng.choice(
                (
                    "No Known Allergies / Adverse Drug Reactions",
                    "Penicillins",
                    "Sulfa (Sulfonamide Antibiotics)",
                )
            ),
            " ",
            "Attending: ___.",
            " ",
            "Chief Complaint:",
            complaint,
            " ",
            "Major Surgical or Invasive Procedure:",
            procedure,
            " ",
            "History of Present Illness:",
            hpi,
            " ",
            "Past Medical History:",
            "\n".join(pmh) or "None.",
            " ",
            "Social History:",
            "___",
            " ".join(social),
            " ",
            "Family History:",
            rng.choice(("Noncontributory.", "Mother with diabetes.", "Father with CAD.")),
            " ",
            "Physical Exam:",
            f"VS: afebrile, HR ___, BP ___. Gen: NAD. {_cap('; '.join(exam))}.",
            " ",
            "Pertinent Results:",
            ("Admission labs notable for " + ", ".join(results) + ".")
            if results
            else "Admission labs unremarkable.",
            " ",
            "Brief Hospital Course:",
            "\n".join(course),
            " ",
            "Medications on Admission:",
            "The Preadmission Medication list is accurate and complete.",
            "\n".join(f"{i + 1}. {m}" for i, m in enumerate(meds[:3])) or "None",
            " ",
            "Discharge Medications:",
            "\n".join(f"{i + 1}. {m}" for i, m in enumerate(meds)) or "None",
            " ",
            "Discharge Disposition:",
            r["disposition"],
            " ",
            "Discharge Diagnosis:",
            f"Primary: {dx_primary}",
            f"Secondary: {secondary}",
            " ",
            "Discharge Condition:",
            "Mental Status: Clear and coherent.",
            "Level of Consciousness: Alert and interactive.",
            "Activity Status: Ambulatory - Independent.",
            " ",
            "Discharge Instructions:",
            f"Dear {title} ___,",
            f"You were admitted to ___ for {dx_primary}. "
            "Please take your medications as prescribed and keep your appointments.",
            " ",
            "Followup Instructions:",
            "___",
            "",
        ]
    )


def render_notes(state: pd.DataFrame, seed: int) -> list[str]:
    """One discharge summary per row of ``state``.

    ``state`` columns: sex ('M'/'F'), age, kind (0 emergency, 1 observation, 2 elective), service,
    disposition (the note's wording, e.g. 'Home With Service'), cancer_site, meds (drug keys of
    ``synthetic_catalog.DRUGS``), procedures (words), and ``note_cond_<c>``, ``note_sev_<c>``,
    ``note_social_<s>`` for every condition and social factor of the world.
    """
    rng = random.Random(seed * 1_000_003 + 17)
    return [_note(rng, r) for r in state.to_dict("records")]


NOTE_COLUMNS = ["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime", "storetime", "text"]


NOTE_CHUNK = 50_000


def _faithful(values: list | np.ndarray, text_signal: float, rng: np.random.Generator) -> list:
    """Each admission's own value with probability ``text_signal``, else a random admission's value.

    Used for the note facts copied from the tables (header, disposition, drugs, procedures): at
    ``text_signal=0`` they describe a random patient, so the note carries nothing patient-specific.
    """
    values = list(values)
    donor = rng.integers(0, len(values), len(values))
    keep = rng.random(len(values)) < text_signal
    return [values[i] if k else values[d] for i, (k, d) in enumerate(zip(keep, donor, strict=True))]


def _lists(index: np.ndarray, values: np.ndarray, n: int) -> list[list]:
    """Group ``values`` by integer ``index`` (0..n-1) into n Python lists, keeping their order."""
    order = np.argsort(index, kind="stable")
    index, values = index[order], values[order]
    bounds = np.searchsorted(index, np.arange(n + 1))
    return [values[bounds[i] : bounds[i + 1]].tolist() for i in range(n)]


def write_notes(path, adm, state, disch_loc, rx_pairs, px_rows, text_signal, seed, rng) -> int:
    """Write ``note/discharge.csv.gz`` (MIMIC-IV-Note layout), one note per admission; returns the row count.

    ``state`` holds the asserted conditions (``note_cond_*``, ``note_sev_*``, ``note_social_*``,
    ``cancer_site`` index) built by ``synthetic.py``; this adds the sections copied from the tables
    through :func:`_faithful` and renders the text in chunks.
    """
    state = state.copy()
    state["cancer_site"] = np.asarray(cat.CANCER_SITES, dtype=object)[state["cancer_site"].to_numpy()]
    # The header facts (sex, age, admission type and service) follow the same rule as the sections copied
    # from the tables: at text signal 0 they describe a random admission, so no note fact is the patient's.
    header = _faithful(range(len(adm)), text_signal, rng)
    state["sex"] = np.where(adm["male"].to_numpy()[header], "M", "F")
    state["age"] = adm["mimic_age"].to_numpy()[header]
    state["kind"] = adm["kind"].to_numpy()[header]
    state["service"] = np.where(state["kind"].to_numpy() == 2, "SURGERY", "MEDICINE")
    words = [DISPOSITION.get(x, "Home") if isinstance(x, str) else "Home" for x in disch_loc]
    state["disposition"] = _faithful(words, text_signal, rng)
    chronic_drugs = {
        k
        for c, drugs in cat.COND_DRUGS.items()
        if c not in ("general", "sepsis", "pneumonia")
        for k, _ in drugs
        if cat.DRUGS[k][12] not in ("IV", "IV DRIP")
    }
    oral = rx_pairs[rx_pairs["key"].isin(sorted(chronic_drugs))]
    state["meds"] = _faithful(
        _lists(oral["a"].to_numpy(), oral["key"].to_numpy(), len(adm)), text_signal, rng
    )
    visible = px_rows[
        px_rows["name"].isin(["paracentesis", "thoracentesis", "cardiac_cath", "egd", "hemodialysis"])
    ]
    visible = visible.drop_duplicates().sort_values(["a", "name"])
    procedures = _lists(visible["a"].to_numpy(), visible["name"].str.replace("_", " ").to_numpy(), len(adm))
    state["procedures"] = _faithful(procedures, text_signal, rng)
    note_seq = adm.groupby("pid").cumcount().to_numpy() * 2 + 10 + rng.integers(0, 2, len(adm))
    subject, disch = adm["subject_id"].to_numpy(), adm["dischtime"].to_numpy()
    stored = disch + (rng.uniform(2, 72, len(adm)) * HOUR).astype(np.int64) // MINUTE * MINUTE
    writer = CsvGzWriter(path, NOTE_COLUMNS, level=1)
    for k, lo in enumerate(range(0, len(adm), NOTE_CHUNK)):  # chunks keep a 400k-note world in memory
        sl = slice(lo, lo + NOTE_CHUNK)
        texts = render_notes(state.iloc[sl], seed * 7919 + k)
        writer.write(
            pa.table(
                {
                    "note_id": np.char.add(
                        np.char.add(subject[sl].astype(str), "-DS-"), note_seq[sl].astype(str)
                    ),
                    "subject_id": subject[sl],
                    "hadm_id": adm["hadm_id"].to_numpy()[sl],
                    "note_type": np.full(len(texts), "DS"),
                    "note_seq": note_seq[sl],
                    "charttime": ts(disch[sl] // DAY * DAY),
                    "storetime": ts(stored[sl]),
                    "text": pa.array(texts),
                }
            )
        )
    writer.close()
    return writer.rows
