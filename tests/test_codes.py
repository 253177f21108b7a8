"""Code sequences, vocabulary, entity text and report text around an anchor time."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ehrclip_kit.data.codes import (
    SPECIAL_TOKENS,
    CodeVocab,
    build_entity_dictionary,
    code_sequences,
    entity_text,
    find_entities,
    normalise_drug,
    report_text,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO_HOSP = DATA / "mimic-iv-demo" / "hosp"
needs_demo = pytest.mark.skipif(not DEMO_HOSP.is_dir(), reason="mimic-iv-demo not available")


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / f"{name}.csv.gz", index=False, compression="gzip")


@pytest.fixture()
def tiny(tmp_path):
    """One patient with three admissions of known timing, plus a patient with nothing coded."""
    hosp, note = tmp_path / "hosp", tmp_path / "note"
    adm = [
        (11, "2150-01-10 08:00:00", "2150-01-15 12:00:00"),
        (12, "2150-06-01 08:00:00", "2150-06-05 12:00:00"),
        (13, "2152-01-01 08:00:00", "2152-01-05 12:00:00"),
    ]
    _write(
        hosp,
        "admissions",
        [{"subject_id": 1, "hadm_id": h, "admittime": a, "dischtime": d} for h, a, d in adm],
    )
    dx = [
        (11, 1, "4280", 9),
        (11, 2, "42731", 9),
        (11, 3, "4281", 9),
        (12, 1, "I5023", 10),
        (12, 2, "E8809", 9),
    ]
    dx += [(13, 1, "486", 9)]
    _write(
        hosp,
        "diagnoses_icd",
        [dict(subject_id=1, hadm_id=h, seq_num=s, icd_code=c, icd_version=v) for h, s, c, v in dx],
    )
    _write(
        hosp,
        "procedures_icd",
        [dict(subject_id=1, hadm_id=11, seq_num=1, chartdate="2150-01-12", icd_code="3961", icd_version=9)],
    )
    rx = [
        (11, "2150-01-11 09:00:00", "Furosemide"),
        (11, "2150-01-12 09:00:00", "Furosemide"),
        (11, "2150-01-10 10:00:00", "Metoprolol Tartrate"),
        (12, "2150-06-02 09:00:00", "Furosemide 40mg Tab"),
    ]
    _write(hosp, "prescriptions", [dict(subject_id=1, hadm_id=h, starttime=t, drug=d) for h, t, d in rx])
    titles = {
        ("4280", 9): "Congestive heart failure, unspecified",
        ("42731", 9): "Atrial fibrillation",
        ("4281", 9): "Left heart failure",
        ("I5023", 10): "Acute on chronic systolic (congestive) heart failure",
        ("E8809", 9): "Accidental fall on or from other stairs or steps",
        ("486", 9): "Pneumonia, organism unspecified",
    }
    _write(
        hosp,
        "d_icd_diagnoses",
        [dict(icd_code=c, icd_version=v, long_title=t) for (c, v), t in titles.items()],
    )
    notes = [
        (
            1,
            11,
            "2150-01-15 00:00:00",
            "Hx of atrial fibrillation and congestive heart failure. Started furosemide.",
        ),
        (2, 13, "2152-01-05 00:00:00", "Admitted with pneumonia."),
    ]
    rows = [dict(note_id=f"1-DS-{n}", subject_id=1, hadm_id=h, note_type="DS", note_seq=n, charttime=t,
                 storetime=t, text=x) for n, h, t, x in notes]  # fmt: skip
    _write(note, "discharge", rows)
    anchors = pd.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "anchor_id": [100, 200, 300],
            "anchor_time": pd.to_datetime(["2150-01-11 12:00", "2151-12-01 00:00", "2150-01-01 00:00"]),
        }
    )
    return hosp, note, anchors


def test_sequences_are_chronological_deduplicated_and_version_tagged(tiny):
    hosp, _, anchors = tiny
    seqs = code_sequences(hosp, anchors).set_index("anchor_id")
    assert seqs.loc[100, "tokens"] == [
        "RX:metoprolol_tartrate",
        "RX:furosemide",  # prescribed twice in admission 11: kept once, at its first time
        "PR9:396",
        "DX9:428",  # 4280 and 4281 share the category 428: one token
        "DX9:427",
        "RX:furosemide",  # a new admission counts again
        "DX10:I50",
        "DX9:E880",  # ICD-9 E-codes keep a 4-character category
    ]
    deltas = seqs.loc[100, "deltas_days"]
    assert np.allclose(deltas[:5], [-26 / 24, -3 / 24, 1.5 - 1 / 86400, 4.0, 4.0])
    assert deltas == sorted(deltas)
    assert seqs.loc[200, "tokens"] == ["DX9:486"]  # admission 12 is 18 months earlier, 13 inside the year
    assert seqs.loc[300, "tokens"] == [] and seqs.loc[300, "deltas_days"] == []
    assert list(seqs.index) == [100, 200, 300]


def test_past_only_never_includes_events_after_the_anchor(tiny):
    hosp, _, anchors = tiny
    past = code_sequences(hosp, anchors, past_only=True).set_index("anchor_id")
    # The admission's own diagnoses are coded at discharge, after the ECG: only earlier drugs remain.
    assert past.loc[100, "tokens"] == ["RX:metoprolol_tartrate", "RX:furosemide"]
    assert past.loc[200, "tokens"] == []
    short = code_sequences(hosp, anchors, window_days=1).set_index("anchor_id")
    assert short.loc[100, "tokens"] == ["RX:furosemide"]
    full = code_sequences(hosp, anchors, dx_chars=None).set_index("anchor_id")
    assert {"DX9:4280", "DX9:4281", "DX10:I5023"} <= set(full.loc[100, "tokens"])


@needs_demo
def test_demo_sequences_stay_inside_the_window_and_match_a_pandas_count():
    adm = pd.read_csv(DEMO_HOSP / "admissions.csv.gz", parse_dates=["admittime", "dischtime"]).iloc[:60]
    anchors = pd.DataFrame(
        {
            "subject_id": adm["subject_id"],
            "anchor_id": adm["hadm_id"],
            "anchor_time": adm["admittime"] + pd.Timedelta(hours=12),
        }
    )
    full = code_sequences(DEMO_HOSP, anchors, window_days=365)
    past = code_sequences(DEMO_HOSP, anchors, window_days=365, past_only=True)
    pattern = re.compile(r"(DX9|DX10|PR9|PR10):[A-Z0-9]{3,4}|RX:[a-z][a-z0-9_\-]*")
    assert full["tokens"].map(len).sum() > 1000
    for (_, f), (_, p) in zip(full.iterrows(), past.iterrows(), strict=True):
        assert len(f["tokens"]) == len(f["deltas_days"]) and all(pattern.fullmatch(t) for t in f["tokens"])
        assert f["deltas_days"] == sorted(f["deltas_days"]) and all(abs(d) <= 365 for d in f["deltas_days"])
        assert all(d <= 0 for d in p["deltas_days"]) and set(p["tokens"]) <= set(f["tokens"])
    # Diagnosis tokens of one anchor, recomputed with pandas: dischtime inside +-365 days.
    dx = pd.read_csv(DEMO_HOSP / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    all_adm = pd.read_csv(DEMO_HOSP / "admissions.csv.gz", parse_dates=["dischtime"])
    row = anchors.iloc[int(np.argmax(full["tokens"].map(len)))]
    near = all_adm[
        (all_adm["subject_id"] == row["subject_id"])
        & ((all_adm["dischtime"] - row["anchor_time"]).abs() <= pd.Timedelta(days=365))
    ]
    mine = dx[dx["hadm_id"].isin(near["hadm_id"])]
    expected = {
        f"DX{v}:{c[:4] if (v == 9 and c.startswith('E')) else c[:3]}"
        for c, v in zip(mine["icd_code"], mine["icd_version"], strict=True)
    }
    got = full.set_index("anchor_id").loc[row["anchor_id"], "tokens"]
    assert {t for t in got if t.startswith("DX")} == expected


def test_vocab_is_fitted_on_train_only_and_round_trips(tmp_path):
    train = [["DX9:428", "RX:furosemide", "DX9:428"], ["DX10:I50"]]
    test_only = ["DX9:999"]
    vocab = CodeVocab.fit(train)
    assert vocab.tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and vocab.tokens[5] == "DX9:428"
    assert vocab.encode(test_only) == [vocab.cls_id, vocab.unk_id, vocab.sep_id]
    assert vocab.decode(vocab.encode(train[0])) == train[0]
    assert CodeVocab.fit(train, min_count=2).tokens[5:] == ["DX9:428"]
    assert [vocab.token_type(t) for t in ("[CLS]", "DX9:428", "PR9:396", "RX:x")] == [0, 1, 2, 3]
    vocab.save(tmp_path / "vocab.json")
    assert CodeVocab.load(tmp_path / "vocab.json").tokens == vocab.tokens


def test_vocab_from_a_split_frame_maps_test_only_codes_to_unk(tiny):
    hosp, _, anchors = tiny
    seqs = code_sequences(hosp, anchors).assign(split=["train", "test", "train"])
    vocab = CodeVocab.fit(seqs.loc[seqs["split"] == "train", "tokens"])
    assert "DX9:486" not in vocab.tokens  # only anchor 200 (test) has it
    assert vocab.encode(["DX9:486"], add_special=False) == [vocab.unk_id]


def test_entities_from_notes_and_from_codes(tiny):
    hosp, note, anchors = tiny
    dictionary = build_entity_dictionary(hosp)
    assert ("congestive", "heart", "failure") in dictionary and ("pneumonia",) in dictionary
    assert ("furosemide",) in dictionary
    assert find_entities("Acute CONGESTIVE heart failure; pneumonia", dictionary) == [
        "congestive heart failure",
        "pneumonia",
    ]
    from_notes = entity_text(hosp, anchors, note_dir=note).set_index("anchor_id")["text"]
    assert from_notes[100] == "atrial fibrillation, congestive heart failure, furosemide"
    assert from_notes[200] == "pneumonia" and from_notes[300] == ""
    assert entity_text(hosp, anchors, note_dir=note, past_only=True).set_index("anchor_id")["text"][100] == ""
    from_codes = entity_text(hosp, anchors, note_dir=None).set_index("anchor_id")["text"]
    assert from_codes[100].startswith(
        "metoprolol tartrate, furosemide, congestive heart failure, atrial fibrillation"
    )
    assert "left heart failure" in from_codes[100] and from_codes[100].count("furosemide") == 1


def test_report_text_uses_notes_within_a_month(tiny):
    _, note, anchors = tiny
    reports = report_text(note, anchors).set_index("anchor_id")["text"]
    assert reports[100].startswith("Hx of atrial fibrillation") and reports[200] == "" and reports[300] == ""
    assert report_text(note, anchors, past_only=True).set_index("anchor_id")["text"][100] == ""
    cleaned = report_text(note, anchors, clean=str.upper).set_index("anchor_id")["text"]
    assert cleaned[100].startswith("HX OF")


def test_drug_names_are_normalised():
    assert normalise_drug("Sodium Chloride 0.9%  Flush") == "sodium chloride"
    assert normalise_drug("0.9% Sodium Chloride (Mini Bag Plus)") == "sodium chloride"
    assert normalise_drug("Acetaminophen IV") == "acetaminophen"
    assert normalise_drug("Bag") == ""
