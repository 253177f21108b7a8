"""Structured-code sequences, entity text and report text around an anchor time (e.g. an ECG).

Token scheme (one token per coded event):

* ``DX9:428`` / ``DX10:I50``: an ICD diagnosis, version-tagged and cut to its category (3 characters, 4 for
  ICD-9 E-codes) so the vocabulary stays small; ``dx_chars=None`` keeps full codes.
* ``PR9:396`` / ``PR10:02H``: an ICD procedure cut to ``pr_chars`` characters.
* ``RX:furosemide``: a prescription, the drug name lower-cased without strengths, forms or routes.

Event times: a diagnosis is known when its admission ends (``dischtime``), a procedure at the end of its
``chartdate``, a prescription at its ``starttime``. The papers use every event within +-1 year of the ECG
(``past_only=False``), which includes the diagnoses of the admission the ECG belongs to, coded at
discharge. ``past_only=True`` keeps only events known at the anchor time: use it for any prediction task.

>>> normalise_drug("Sodium Chloride 0.9%  Flush"), normalise_drug("HYDROmorphone (Dilaudid)")
('sodium chloride', 'hydromorphone')
>>> term_from_title("Unspecified essential hypertension")
'essential hypertension'
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from ehrclip_kit.io import atomic_path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKEN_TYPES = {"DX": 1, "PR": 2, "RX": 3}  # 0 is reserved for special tokens
_FORM_WORDS = {
    "iv", "po", "pr", "sl", "sc", "im", "inj", "injection", "tab", "tablet", "tablets", "cap", "capsule",
    "solution", "soln", "flush", "bag", "oral", "replacement", "liquid", "suspension", "cream", "ointment",
    "patch", "mini", "plus", "premix", "syringe", "vial", "ml", "mg", "mcg", "units", "unit", "critical",
    "care", "and", "oncology", "sr", "er", "xl", "ec", "dr", "drip", "ivpb", "nebulizer", "neb", "inhaler",
}  # fmt: skip
_QUALIFIERS = ("essential", "primary", "chronic", "acute", "unspecified", "other", "benign", "old", "severe")
_WORD = re.compile(r"[a-z0-9]+")


def _table(folder, name: str) -> Path:
    """``folder/name.csv.gz`` or ``folder/name.csv``, with an error naming both when neither exists."""
    for suffix in (".csv.gz", ".csv"):
        path = Path(folder) / f"{name}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"{Path(folder) / name}.csv.gz (or .csv) not found")


def _read(path: Path) -> str:
    """A DuckDB table expression over a CSV(.gz); all text so ICD codes keep their leading zeros."""
    return f"read_csv('{str(path).replace(chr(39), chr(39) * 2)}', header=true, all_varchar=true)"


def normalise_drug(name) -> str:
    """Lower-case drug name without bracketed brand names, strengths, forms and routes (max 3 words)."""
    text = re.sub(r"\([^)]*\)|\[[^]]*\]", " ", str(name).lower())
    words = [w for w in re.split(r"[^a-z0-9%.\-]+", text) if w and not re.search(r"[0-9%]", w)]
    words = [w.replace(".", "").strip("-") for w in words]
    words = [w for w in words if w not in _FORM_WORDS and len(w) > 1]
    return " ".join(words[:3])


def term_from_title(title) -> str:
    """A matchable clinical term from an ICD long title: text before the first comma, brackets removed,
    leading 'unspecified'/'other' qualifiers dropped."""
    text = re.sub(r"\([^)]*\)|\[[^]]*\]", " ", str(title).lower()).split(",")[0]
    words = _WORD.findall(text)
    while words and words[0] in ("unspecified", "other", "specified"):
        words = words[1:]
    while words and words[-1] in ("unspecified", "nos"):
        words = words[:-1]
    return " ".join(words)


def _anchor_frame(anchors: pd.DataFrame) -> pd.DataFrame:
    need = {"subject_id", "anchor_id", "anchor_time"}
    if missing := need - set(anchors.columns):
        raise ValueError(
            f"anchors is missing columns {sorted(missing)} (needs subject_id, anchor_id, anchor_time)"
        )
    out = anchors[["subject_id", "anchor_id", "anchor_time"]].copy()
    out["subject_id"] = out["subject_id"].astype("int64")
    out["anchor_time"] = pd.to_datetime(out["anchor_time"]).astype("datetime64[us]")
    if out["anchor_time"].isna().any():
        bad = out.loc[out["anchor_time"].isna(), "anchor_id"].iloc[0]
        raise ValueError(f"anchors has a missing anchor_time (anchor_id {bad})")
    return out


def _events_sql(hosp_dir, con, dx_chars: int | None, pr_chars: int | None, kinds: Sequence[str]) -> str:
    """SQL selecting (subject_id, hadm_id, event_time, kind, seq, token, code, version) for the chosen kinds."""

    def cut(chars, expr="trim(icd_code)"):
        if chars is None:
            return expr
        # ICD-9 external-cause E-codes have 4-character categories (E880), everything else 3.
        return f"CASE WHEN icd_version = '9' AND {expr} LIKE 'E%' THEN left({expr}, {chars + 1}) ELSE left({expr}, {chars}) END"

    parts = []
    adm = _read(_table(hosp_dir, "admissions"))
    if "DX" in kinds:
        parts.append(
            f"""SELECT CAST(d.subject_id AS BIGINT) AS subject_id, CAST(d.hadm_id AS BIGINT) AS hadm_id,
                  CAST(a.dischtime AS TIMESTAMP) AS event_time, 0 AS kind, TRY_CAST(d.seq_num AS INT) AS seq,
                  'DX' || d.icd_version || ':' || {cut(dx_chars)} AS token, trim(d.icd_code) AS code,
                  d.icd_version AS version
               FROM {_read(_table(hosp_dir, "diagnoses_icd"))} d JOIN {adm} a ON d.hadm_id = a.hadm_id"""
        )
    if "PR" in kinds:
        parts.append(
            f"""SELECT CAST(subject_id AS BIGINT), CAST(hadm_id AS BIGINT),
                  CAST(CAST(chartdate AS DATE) AS TIMESTAMP) + INTERVAL 1 DAY - INTERVAL 1 SECOND, 1,
                  TRY_CAST(seq_num AS INT), 'PR' || icd_version || ':' || {cut(pr_chars)}, trim(icd_code), icd_version
               FROM {_read(_table(hosp_dir, "procedures_icd"))}"""
        )
    if "RX" in kinds:
        rx = _read(_table(hosp_dir, "prescriptions"))
        names = con.sql(f"SELECT DISTINCT drug FROM {rx} WHERE drug IS NOT NULL").df()
        names["name"] = names["drug"].map(normalise_drug)
        con.register("drug_names", names[names["name"] != ""])
        parts.append(
            f"""SELECT CAST(p.subject_id AS BIGINT), TRY_CAST(p.hadm_id AS BIGINT), CAST(p.starttime AS TIMESTAMP),
                  2, 0, 'RX:' || replace(n.name, ' ', '_'), n.name, NULL
               FROM {rx} p JOIN drug_names n ON p.drug = n.drug WHERE p.starttime IS NOT NULL"""
        )
    if not parts:
        raise ValueError(f"kinds must name at least one of DX, PR, RX; got {list(kinds)}")
    return "\nUNION ALL\n".join(parts)


def coded_events(
    hosp_dir,
    anchors: pd.DataFrame,
    window_days: float = 365,
    past_only: bool = False,
    kinds: Sequence[str] = ("DX", "PR", "RX"),
    dx_chars: int | None = 3,
    pr_chars: int | None = 3,
) -> pd.DataFrame:
    """Every coded event of each anchor's patient inside the window, one row per (anchor, admission, token)
    at its first time, in chronological order: anchor_id, token, code, version, kind, event_time, delta_days."""
    frame = _anchor_frame(anchors)
    con = duckdb.connect()
    con.register("anchors", frame)
    events = _events_sql(hosp_dir, con, dx_chars, pr_chars, kinds)
    after = (
        "x.anchor_time" if past_only else f"x.anchor_time + INTERVAL ({float(window_days)} * 86400) SECOND"
    )
    sql = f"""
        WITH events AS ({events}),
        hits AS (
          SELECT x.anchor_id, e.*, epoch(e.event_time - x.anchor_time) / 86400.0 AS delta_days
          FROM anchors x JOIN events e ON e.subject_id = x.subject_id
          WHERE e.event_time IS NOT NULL AND e.token IS NOT NULL
            AND e.event_time >= x.anchor_time - INTERVAL ({float(window_days)} * 86400) SECOND
            AND e.event_time <= {after}
        )
        SELECT anchor_id, token, code, version, kind, event_time, delta_days FROM hits
        QUALIFY row_number() OVER (
          PARTITION BY anchor_id, coalesce(hadm_id, -1), token ORDER BY event_time, seq, code) = 1
        ORDER BY anchor_id, event_time, kind, seq, token
    """
    return con.sql(sql).df()


def code_sequences(
    hosp_dir,
    anchors: pd.DataFrame,
    window_days: float = 365,
    past_only: bool = False,
    kinds: Sequence[str] = ("DX", "PR", "RX"),
    dx_chars: int | None = 3,
    pr_chars: int | None = 3,
) -> pd.DataFrame:
    """Chronological code tokens within +-``window_days`` of each anchor (only before it when ``past_only``).

    ``anchors``: subject_id, anchor_id, anchor_time. Returns one row per anchor, in the anchors' order
    (empty lists when a patient has no coded events in the window): anchor_id, tokens (list[str]),
    deltas_days (list[float], event time minus anchor time; negative = before the anchor).
    """
    events = coded_events(hosp_dir, anchors, window_days, past_only, kinds, dx_chars, pr_chars)
    grouped = events.groupby("anchor_id", sort=False).agg(
        tokens=("token", list), deltas_days=("delta_days", list)
    )
    out = pd.DataFrame({"anchor_id": anchors["anchor_id"].to_numpy()})
    out = out.merge(grouped, left_on="anchor_id", right_index=True, how="left")
    for col in ("tokens", "deltas_days"):
        out[col] = [v if isinstance(v, list) else [] for v in out[col]]
    return out.reset_index(drop=True)


@dataclass
class CodeVocab:
    """Token <-> id mapping for code sequences, fitted on the training split only.

    >>> vocab = CodeVocab.fit([["DX9:428", "RX:furosemide"], ["DX9:428"]])
    >>> vocab.encode(["DX9:428", "DX10:I50"])
    [2, 5, 1, 3]
    >>> vocab.decode(vocab.encode(["RX:furosemide"]))
    ['RX:furosemide']
    """

    tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))

    def __post_init__(self):
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a CodeVocab must start with {SPECIAL_TOKENS}")
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def fit(
        cls, sequences: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None
    ) -> CodeVocab:
        """Keep tokens seen at least ``min_count`` times (most frequent first, ties by name)."""
        counts = Counter(t for seq in sequences for t in seq)
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls(list(SPECIAL_TOKENS) + kept[:max_size])

    def __len__(self) -> int:
        return len(self.tokens)

    pad_id, unk_id, cls_id, sep_id, mask_id = range(5)

    def encode(self, tokens: Sequence[str], add_special: bool = True) -> list[int]:
        """Ids of ``tokens`` (unknown ones -> [UNK]), wrapped in [CLS] ... [SEP] when ``add_special``."""
        ids = [self._ids.get(t, self.unk_id) for t in tokens]
        return [self.cls_id, *ids, self.sep_id] if add_special else ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> list[str]:
        return [self.tokens[i] for i in ids if not (skip_special and i < len(SPECIAL_TOKENS))]

    def token_type(self, token: str) -> int:
        """0 for special tokens, 1 diagnosis, 2 procedure, 3 medication (for token_type_ids)."""
        return TOKEN_TYPES.get(token[:2], 0)

    def save(self, path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"tokens": self.tokens}, indent=0) + "\n")

    @classmethod
    def load(cls, path) -> CodeVocab:
        return cls(json.loads(Path(path).read_text())["tokens"])


def build_entity_dictionary(
    hosp_dir, extra_terms: Iterable[str] = (), max_words: int = 6
) -> dict[tuple, str]:
    """Word-tuple -> term dictionary from ICD diagnosis titles, drug names and ``extra_terms``.

    Titles become terms with :func:`term_from_title`; a term starting with a qualifier such as 'essential'
    or 'chronic' also adds its remainder ('essential hypertension' -> 'hypertension').
    """
    con = duckdb.connect()
    titles = con.sql(f"SELECT DISTINCT long_title FROM {_read(_table(hosp_dir, 'd_icd_diagnoses'))}").df()
    terms = {term_from_title(t) for t in titles["long_title"].dropna()}
    terms |= {t.split(" ", 1)[1] for t in list(terms) if t.split(" ", 1)[0] in _QUALIFIERS and " " in t}
    try:
        drugs = con.sql(f"SELECT DISTINCT drug FROM {_read(_table(hosp_dir, 'prescriptions'))}").df()["drug"]
        terms |= {normalise_drug(d) for d in drugs.dropna()}
    except FileNotFoundError:
        pass  # a hosp folder without prescriptions still has diagnosis titles
    terms |= {" ".join(_WORD.findall(str(t).lower())) for t in extra_terms}
    # Very short single words ('b', 'ra') would match noise, so they need 4 letters.
    keys = {t: tuple(_WORD.findall(t)) for t in terms if t}
    return {k: t for t, k in keys.items() if k and len(k) <= max_words and (len(k) > 1 or len(t) >= 4)}


def find_entities(text: str, dictionary: dict[tuple, str], max_words: int = 6) -> list[str]:
    """Dictionary terms found in ``text``, longest match first, left to right.

    >>> find_entities("Hx of atrial fibrillation and essential hypertension.",
    ...               {("atrial", "fibrillation"): "atrial fibrillation", ("hypertension",): "hypertension",
    ...                ("essential", "hypertension"): "essential hypertension"})
    ['atrial fibrillation', 'essential hypertension']
    """
    words = _WORD.findall(str(text).lower())
    found, i = [], 0
    while i < len(words):
        for n in range(min(max_words, len(words) - i), 0, -1):
            term = dictionary.get(tuple(words[i : i + n]))
            if term is not None:
                found.append(term)
                i += n
                break
        else:
            i += 1
    return found


def _notes_in_window(note_dir, anchors: pd.DataFrame, window_days: float, past_only: bool, con=None):
    """(anchor_id, note_id, charttime) of each anchor's discharge notes inside the window, chronological.

    Texts are not joined here: a note near many ECGs would be copied once per ECG.
    """
    con = con or duckdb.connect()
    con.register("anchors", _anchor_frame(anchors))
    lo = f"x.anchor_time - INTERVAL ({float(window_days)} * 86400) SECOND"
    hi = "x.anchor_time" if past_only else f"x.anchor_time + INTERVAL ({float(window_days)} * 86400) SECOND"
    con.sql(f"CREATE OR REPLACE VIEW discharge AS SELECT * FROM {_read(_table(note_dir, 'discharge'))}")
    return con.sql(
        f"""SELECT x.anchor_id, n.note_id, CAST(n.charttime AS TIMESTAMP) AS charttime
            FROM anchors x JOIN discharge n ON CAST(n.subject_id AS BIGINT) = x.subject_id
            WHERE CAST(n.charttime AS TIMESTAMP) BETWEEN {lo} AND {hi}
            ORDER BY x.anchor_id, charttime, n.note_id"""
    ).df()


def _note_texts(con, note_ids, fn, chunk: int = 5000) -> dict:
    """``fn(text)`` for each note id, streaming the texts in chunks (MIMIC-IV-Note is ~3 GB of text)."""
    con.register("wanted", pd.DataFrame({"note_id": pd.unique(pd.Series(note_ids, dtype=object))}))
    result = con.execute("SELECT n.note_id, n.text FROM discharge n JOIN wanted w ON n.note_id = w.note_id")
    out = {}
    while rows := result.fetchmany(chunk):
        out.update((note_id, fn("" if text is None else text)) for note_id, text in rows)
    return out


def _per_anchor(anchors: pd.DataFrame, texts: pd.Series) -> pd.DataFrame:
    out = pd.DataFrame({"anchor_id": anchors["anchor_id"].to_numpy()})
    out["text"] = out["anchor_id"].map(texts).fillna("").astype(str)
    return out


def report_text(
    note_dir, anchors: pd.DataFrame, window_days: float = 30, past_only: bool = False, clean=None
):
    """Report concatenation: the discharge notes within +-``window_days`` (30: the paper's +-1 month) of each
    anchor, oldest first, joined by blank lines; ``clean`` (e.g. ``notes.clean_note``) is applied to each.
    Returns anchor_id, text ('' when no note falls in the window)."""
    con = duckdb.connect()
    notes = _notes_in_window(note_dir, anchors, window_days, past_only, con)
    notes["text"] = notes["note_id"].map(_note_texts(con, notes["note_id"], clean or str))
    texts = notes.groupby("anchor_id", sort=False)["text"].agg(lambda s: "\n\n".join(map(str, s)))
    return _per_anchor(anchors, texts)


def entity_text(
    hosp_dir,
    anchors: pd.DataFrame,
    window_days: float = 365,
    past_only: bool = False,
    note_dir=None,
    dictionary: dict[tuple, str] | None = None,
    source: str = "auto",
) -> pd.DataFrame:
    """Entity concatenation: the distinct clinical terms within +-``window_days`` of each anchor, in order of
    first appearance, joined by ', '.

    ``source="notes"`` finds terms in the discharge notes with the dictionary (built from the hosp folder's
    ICD titles and drug names unless given); ``"codes"`` uses the terms of the coded diagnoses and
    prescriptions themselves (for data without notes, e.g. the MIMIC-IV demo); ``"auto"`` picks notes when
    ``note_dir`` has a discharge table. Returns anchor_id, text.
    """
    has_notes = note_dir is not None and any(
        Path(note_dir, f"discharge{s}").exists() for s in (".csv.gz", ".csv")
    )
    if source == "auto":
        source = "notes" if has_notes else "codes"
    if source == "notes":
        dictionary = dictionary if dictionary is not None else build_entity_dictionary(hosp_dir)
        con = duckdb.connect()
        notes = _notes_in_window(note_dir, anchors, window_days, past_only, con)
        per_note = _note_texts(con, notes["note_id"], lambda text: find_entities(text, dictionary))
        notes["terms"] = notes["note_id"].map(per_note)
    elif source == "codes":
        notes = coded_events(hosp_dir, anchors, window_days, past_only, ("DX", "RX"), None, None)
        con = duckdb.connect()
        titles = con.sql(
            f"SELECT icd_code, icd_version, long_title FROM {_read(_table(hosp_dir, 'd_icd_diagnoses'))}"
        ).df()
        titles["term"] = titles["long_title"].map(term_from_title)
        lookup = dict(
            zip(zip(titles["icd_code"], titles["icd_version"], strict=True), titles["term"], strict=True)
        )
        notes["terms"] = [
            [lookup.get((c, v), "")] if k == 0 else [c]
            for c, v, k in zip(notes["code"], notes["version"], notes["kind"], strict=True)
        ]
    else:
        raise ValueError(f"entity_text source must be 'auto', 'notes' or 'codes', got {source!r}")
    texts = notes.groupby("anchor_id", sort=False)["terms"].agg(
        lambda s: ", ".join(dict.fromkeys(t for terms in s for t in terms if t))
    )
    return _per_anchor(anchors, texts)
