"""Discharge-note preprocessing: section parsing, cleaning and chunking into model-sized token windows.

The paper (arXiv 2505.17643) drops the non-clinical sections of a MIMIC-IV discharge summary (identity and
date header, attending, discharge and follow-up instructions), lowercases the rest, removes dates, numbers
and punctuation, and splits the note into 256-token chunks whose [CLS] vectors are averaged. Every step
here is configurable through :class:`NoteCleaningConfig`; the defaults follow the paper.

De-identification marker: MIMIC replaces names, dates and places by ``___``. It carries no clinical
meaning and a WordPiece tokenizer spends three tokens on it, so by default it is **dropped**
(``deid_token=""``). Set ``deid_token="deid"`` (letters only) to keep one word in its place.

Typical use::

    text = clean_note(raw)                              # what the cohort writes to notes.parquet
    chunks = chunk_token_ids(text, tokenizer, 256)      # lists of token ids, each [CLS] ... [SEP]
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

# Headings of MIMIC-IV-Note discharge summaries (see shared/data/README.md) plus a few frequent variants.
MIMIC_HEADINGS: tuple[str, ...] = (
    "Name",
    "Unit No",
    "Admission Date",
    "Discharge Date",
    "Date of Birth",
    "Sex",
    "Service",
    "Allergies",
    "Attending",
    "Chief Complaint",
    "Major Surgical or Invasive Procedure",
    "History of Present Illness",
    "Past Medical History",
    "Past Surgical History",
    "Social History",
    "Family History",
    "Physical Exam",
    "Pertinent Results",
    "Brief Hospital Course",
    "Hospital Course",
    "Medications on Admission",
    "Discharge Medications",
    "Discharge Disposition",
    "Facility",
    "Discharge Diagnosis",
    "Discharge Diagnoses",
    "Discharge Condition",
    "Discharge Instructions",
    "Followup Instructions",
    "Follow-up Instructions",
    "Follow up Instructions",
)

DEFAULT_DROP_SECTIONS: tuple[str, ...] = (
    "Name",
    "Unit No",
    "Admission Date",
    "Discharge Date",
    "Date of Birth",
    "Sex",
    "Attending",
    "Discharge Instructions",
    "Followup Instructions",
)


@dataclasses.dataclass(frozen=True)
class NoteCleaningConfig:
    """What :func:`clean_note` does. Defaults follow the paper; switch any step off for inspection.

    ``drop_sections`` are compared letters-only and case-insensitively, so ``"Follow-up Instructions"``
    and ``"FOLLOWUP INSTRUCTIONS:"`` both match ``"Followup Instructions"``.
    ``deid_token``: ``""`` drops the ``___`` de-identification marker, a word (letters only) replaces it.
    """

    drop_sections: tuple[str, ...] = DEFAULT_DROP_SECTIONS
    headings: tuple[str, ...] = MIMIC_HEADINGS
    keep_headings: bool = True  # "history of present illness" is useful context for the encoder
    lowercase: bool = True
    remove_dates: bool = True
    remove_numbers: bool = True
    remove_punctuation: bool = True
    collapse_whitespace: bool = True
    deid_token: str = ""

    def __post_init__(self) -> None:
        if self.deid_token and not self.deid_token.isalpha():
            raise ValueError(
                f"NoteCleaningConfig.deid_token must be letters only or '', got {self.deid_token!r}"
            )
        # Accept lists from JSON / notebooks but keep the dataclass hashable.
        object.__setattr__(self, "drop_sections", tuple(self.drop_sections))
        object.__setattr__(self, "headings", tuple(self.headings))


def _heading_key(heading: str) -> str:
    """Letters-only lowercase form used to compare headings ('Follow-up Instructions' == 'followupinstructions')."""
    return "".join(ch for ch in heading.lower() if ch.isalpha())


def _heading_pattern(headings: Sequence[str]) -> re.Pattern[str]:
    # Longest first so "Discharge Diagnosis" wins over a shorter heading sharing its prefix.
    alternatives = []
    for heading in sorted(set(headings), key=len, reverse=True):
        words = re.split(r"[\s\-]+", heading.strip())
        alternatives.append(r"[ \t\-]*".join(re.escape(w) for w in words if w))
    # A heading sits at a line start, or after a run of >= 2 blanks: MIMIC's header puts two on a line
    # ("Name:  ___        Unit No:   ___").
    return re.compile(rf"(?:^|(?<=[ \t]{{2}}))[ \t]*(?P<h>{'|'.join(alternatives)})[ \t]*:", re.I | re.M)


_PATTERN_CACHE: dict[tuple[str, ...], re.Pattern[str]] = {}


def as_note_text(text: Any) -> str:
    """A note cell as ``str``: None, NaN and pandas.NA become '' (a missing note), bytes are decoded.

    >>> as_note_text(None), as_note_text(float("nan")), as_note_text("ok")
    ('', '', 'ok')
    """
    if text is None or isinstance(text, bytes | bytearray):
        return text.decode("utf-8", errors="replace") if text else ""
    if isinstance(text, str):
        return text
    try:
        if text != text:  # NaN (float or numpy)
            return ""
    except (TypeError, ValueError):  # pandas.NA raises on bool()
        return ""
    return str(text)


def parse_sections(text: Any, headings: Sequence[str] = MIMIC_HEADINGS) -> list[tuple[str, str]]:
    """Split a MIMIC-style discharge summary into ``(heading, body)`` pairs, in order.

    Headings are recognised case-insensitively at the start of a line (or after two blanks, as in MIMIC's
    two-per-line header) when followed by a colon. Text before the first heading becomes a section with
    heading ``''``; a note without recognisable headings is one such section; an empty note gives ``[]``.
    Sub-headings that are not in ``headings`` (``HEENT:``, ``ADMISSION LABS:``) stay inside their section,
    so dropping "Discharge Instructions" also drops everything written under it.

    >>> parse_sections("intro\\nChief Complaint: chest pain\\nHISTORY OF PRESENT ILLNESS:\\n65M with ...")
    [('', 'intro'), ('Chief Complaint', 'chest pain'), ('HISTORY OF PRESENT ILLNESS', '65M with ...')]
    >>> parse_sections("Name:  ___   Unit No:   ___")
    [('Name', '___'), ('Unit No', '___')]
    >>> parse_sections(None)
    []
    """
    text = as_note_text(text)
    key = tuple(headings)
    pattern = _PATTERN_CACHE.get(key)
    if pattern is None:
        pattern = _PATTERN_CACHE.setdefault(key, _heading_pattern(headings))
    sections: list[tuple[str, str]] = []
    matches = list(pattern.finditer(text))
    lead = text[: matches[0].start()] if matches else text
    if lead.strip():
        sections.append(("", lead.strip()))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.append((match.group("h").strip(), text[match.end() : end].strip()))
    return sections


_MONTHS = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
_DATE_RE = re.compile(
    r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"  # 2150-01-02
    r"|\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"  # 01/02/2150, 1-2-50
    r"|\b\d{1,2}/\d{1,2}\b(?!/)"  # 1/2 (MIMIC often keeps month/day)
    r"|\b\d{1,2}:\d{2}(?::\d{2})?\s*(?:[ap]\.?m\.?\b)?"  # 12:30, 9:05 pm
    rf"|\b{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?\b(?:,?\s*\d{{4}}\b)?"  # Jan 2nd, 2150
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}(?:,?\s*\d{{4}}\b)?",  # 2 January 2150
    re.I,
)
# Digits not glued to the end of a word: "72", "3.5", "5mg" -> "mg", but "b12", "co2", "t4" stay words.
_NUMBER_RE = re.compile(r"(?<![^\W_])\d+(?:[.,]\d+)*")
_DEID_RE = re.compile(r"_{3,}")
_APOSTROPHE_RE = re.compile(r"(?<=\w)['’](?=\w)")  # patient's -> patients, don't -> dont
_PUNCT_RE = re.compile(r"[^\w\s]|_")
_SPACE_RE = re.compile(r"\s+")


def _normalise_unicode(text: str) -> str:
    # NFKC folds ligatures, full-width and superscript forms into plain ones ("ﬁ" -> "fi", "５" -> "5");
    # control and format characters (zero-width spaces, BOMs) become blanks. Letters of any script stay.
    text = unicodedata.normalize("NFKC", text)
    return "".join(
        " " if unicodedata.category(ch) in ("Cc", "Cf") and ch not in "\n\t" else ch for ch in text
    )


def clean_note(text: Any, config: NoteCleaningConfig | None = None) -> str:
    """Clean one discharge summary the paper's way; always returns a ``str`` ('' for a missing note).

    Steps, each switchable in ``config``: unicode normalisation, drop non-clinical sections, lowercase,
    remove dates, the ``___`` marker, numbers and punctuation, collapse whitespace.

    >>> clean_note("Name: ___  Unit No: ___\\nChief Complaint: Chest pain since 01/02/2150, BP 120/80.")
    'chief complaint chest pain since bp'
    >>> clean_note(None), clean_note(float("nan"))
    ('', '')
    >>> clean_note("Fièvre à 39,5°C")
    'fièvre à c'
    """
    config = config or NoteCleaningConfig()
    text = _normalise_unicode(as_note_text(text))
    if not text.strip():
        return ""

    drop = {_heading_key(h) for h in config.drop_sections}
    if drop or not config.keep_headings:
        parts = []
        for heading, body in parse_sections(text, config.headings):
            if heading and _heading_key(heading) in drop:
                continue
            parts.append(f"{heading}:\n{body}" if heading and config.keep_headings else body)
        text = "\n\n".join(parts)

    if config.lowercase:
        text = text.lower()
    if config.remove_dates:
        text = _DATE_RE.sub(" ", text)
    text = _DEID_RE.sub(f" {config.deid_token} " if config.deid_token else " ", text)
    if config.remove_numbers:
        text = _NUMBER_RE.sub(" ", text)
    if config.remove_punctuation:
        text = _APOSTROPHE_RE.sub("", text)
        text = _PUNCT_RE.sub(" ", text)
    if config.collapse_whitespace:
        text = _SPACE_RE.sub(" ", text).strip()
    return text


def _special_ids(tokenizer) -> tuple[int, int]:
    """The (start, end) ids the tokenizer wraps a sequence in: CLS/SEP (BERT) or BOS/EOS (RoBERTa, GPT)."""
    start = getattr(tokenizer, "cls_token_id", None)
    end = getattr(tokenizer, "sep_token_id", None)
    if start is None or end is None:
        start = getattr(tokenizer, "bos_token_id", None) if start is None else start
        end = getattr(tokenizer, "eos_token_id", None) if end is None else end
    if start is None or end is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither CLS/SEP nor BOS/EOS tokens; "
            "chunk_token_ids needs a start token whose vector represents the chunk"
        )
    return int(start), int(end)


def n_chunks_for(n_tokens: int, max_tokens: int = 256, stride: int | None = None) -> int:
    """How many chunks :func:`chunk_token_ids` makes from ``n_tokens`` content tokens.

    >>> n_chunks_for(0), n_chunks_for(254), n_chunks_for(255), n_chunks_for(600, 256, stride=127)
    (1, 1, 2, 4)
    """
    window = max_tokens - 2
    stride = window if stride is None else stride
    if n_tokens <= window:
        return 1
    return 1 + math.ceil((n_tokens - window) / stride)


def chunk_token_ids(
    text: Any,
    tokenizer,
    max_tokens: int = 256,
    stride: int | None = None,
    max_chunks: int | None = None,
) -> list[list[int]]:
    """Tokenize ``text`` once (no special tokens) and cut it into windows of ``max_tokens`` ids.

    Each window holds ``max_tokens - 2`` content tokens wrapped as ``[CLS] ... [SEP]`` (or ``<s> ... </s>``),
    so every chunk starts with the token whose vector represents it. ``stride`` (default ``max_tokens - 2``:
    no overlap) is the step between window starts. An empty or missing note gives one chunk ``[CLS][SEP]``
    so that it still gets an embedding. ``max_chunks`` keeps only the first chunks of very long notes
    (default: all, as in the paper). The text is used as given: clean it first with :func:`clean_note`.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    >>> core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    >>> core.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=core, cls_token="[CLS]", sep_token="[SEP]",
    ...                               pad_token="[PAD]", unk_token="[UNK]")
    >>> chunk_token_ids("a b c a b", tok, max_tokens=4)
    [[2, 4, 5, 3], [2, 6, 4, 3], [2, 5, 3]]
    >>> chunk_token_ids(None, tok)
    [[2, 3]]
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3 (start + end token + content), got {max_tokens}")
    window = max_tokens - 2
    stride = window if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, max_tokens - 2 = {window}], got {stride}")
    start_id, end_id = _special_ids(tokenizer)
    text = as_note_text(text)
    # verbose=False: a whole note is longer than model_max_length on purpose; we cut it ourselves.
    ids = (
        list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
        if text
        else []
    )
    chunks = []
    for begin in range(0, max(len(ids), 1), stride):
        chunks.append([start_id, *ids[begin : begin + window], end_id])
        if begin + window >= len(ids) or (max_chunks is not None and len(chunks) >= max_chunks):
            break
    return chunks


chunk_note = chunk_token_ids  # name used in plan/CONTRACTS.md
