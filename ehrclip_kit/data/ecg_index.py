"""``ehrclip ecg-index``: one validated row per ECG of MIMIC-IV-ECG (or the synthetic world) or PTB-XL.

Writes to OUT:

* ``ecg_index.parquet``: source, ecg_id, subject_id, (study_id, hadm_id for MIMIC), path (record name
  relative to ROOT, no extension), fs and n_samples as stored, ecg_time, report, ``label_<name>``
  (0/1, the same names for both sources, see ``LABELS``), split; PTB-XL adds strat_fold, age, sex,
  scp_codes, superclasses, ``superclass_<NORM|MI|STTC|CD|HYP>`` and report_original.
* ``ecg_attrition.csv`` (source, step, n_before, n_excluded, n_after, reason) and ``ecg_excluded.csv``
  (ecg_id, path, reason, detail): every waveform is read once; unreadable, wrong-shape, NaN and
  flat-lead records are counted and left out instead of stopping the run.
* MIMIC with a hosp folder: ``ecg_codes.parquet`` (ecg_id, tokens, deltas_days within +-1 year),
  ``code_vocab.json`` (fitted on the training split) and ``ecg_text.parquet`` (ecg_id, report_text from
  notes within +-30 days, entity_text within +-1 year).

The recipes and their rules are documented in data_recipes/mimic_iv_ecg and data_recipes/ptb_xl.
"""

from __future__ import annotations

import argparse
import ast
import re
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ehrclip_kit.data import codes
from ehrclip_kit.data.ecg import CANONICAL_LEADS, lead_order, read_record, validate_ecg
from ehrclip_kit.data.splits import assign_splits
from ehrclip_kit.io import write_csv, write_json, write_parquet

RECIPES = Path(__file__).resolve().parents[2] / "data_recipes"
REASONS = ("unreadable", "wrong_shape", "nan_samples", "flat_lead")
REASON_TEXT = {
    "unreadable": "WFDB header or signal file missing or unreadable (e.g. truncated .dat)",
    "wrong_shape": "not 12 leads with the canonical names, or shorter than --min-seconds",
    "nan_samples": "NaN samples (values stored as the format's missing value)",
    "flat_lead": "at least one lead flat (peak-to-peak <= 0.001 mV)",
}
# Harmonised labels: the same names from MIMIC machine statements and from PTB-XL SCP codes.
LABELS = (
    "af", "aflutter", "sinus_rhythm", "sinus_tachycardia", "sinus_bradycardia", "avb1", "lbbb", "rbbb",
    "lvh", "mi", "mi_inferior", "mi_anterior", "normal", "abnormal",
)  # fmt: skip
MIMIC_LABEL_PATTERNS = {
    "af": r"atrial fibrillation",
    "aflutter": r"atrial flutter",
    "sinus_rhythm": r"\bsinus rhythm\b",
    "sinus_tachycardia": r"\bsinus tachycardia\b",
    "sinus_bradycardia": r"\bsinus bradycardia\b",
    "avb1": r"\b(?:1st|first) degree a-?v block",
    "lbbb": r"(?<!incomplete )left bundle branch block|\blbbb\b",
    "rbbb": r"(?<!incomplete )right bundle branch block|\brbbb\b",
    "lvh": r"left ventricular hypertrophy|\blvh\b",
    "mi": r"infarct",
    "mi_inferior": r"\binfer\w* infarct",
    "mi_anterior": r"\bant\w* infarct",
    "normal": r"\bnormal ecg\b",  # \b keeps "Abnormal ECG" out
    "abnormal": r"\babnormal ecg\b",
}
PTBXL_LABEL_CODES = {
    "af": {"AFIB"},
    "aflutter": {"AFLT"},
    "sinus_rhythm": {"SR"},
    "sinus_tachycardia": {"STACH"},
    "sinus_bradycardia": {"SBRAD"},
    "avb1": {"1AVB"},
    "lbbb": {"CLBBB"},
    "rbbb": {"CRBBB"},
    "lvh": {"LVH"},
    "normal": {"NORM"},
}
SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


def mimic_labels(reports: pd.Series) -> pd.DataFrame:
    """``label_<name>`` 0/1 columns from machine-statement text (case-insensitive regexes above).

    >>> mimic_labels(pd.Series(["Sinus rhythm; Abnormal ECG"]))[["label_sinus_rhythm", "label_normal"]].values.tolist()
    [[1, 0]]
    """
    text = reports.fillna("").astype(str)
    return pd.DataFrame(
        {
            f"label_{k}": text.str.contains(p, flags=re.I, regex=True).astype("int8")
            for k, p in MIMIC_LABEL_PATTERNS.items()
        }
    )


def check_record(
    path: str, n_leads: int = 12, min_seconds: float = 9.9
) -> tuple[str | None, str, float, int]:
    """Read one record and say what is wrong with it: (reason or None, detail, fs, n_samples)."""
    try:
        x, fs, names = read_record(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError) as err:
        return "unreadable", f"{type(err).__name__}: {err}"[:300], float("nan"), 0
    try:
        x = x[lead_order(names, CANONICAL_LEADS)]
    except KeyError as err:
        return "wrong_shape", str(err)[:300], fs, x.shape[-1]
    reason = validate_ecg(x, n_leads, min_samples=int(min_seconds * fs))
    detail = "" if reason is None else f"shape {tuple(x.shape)} at {fs:g} Hz"
    if reason == "flat_lead":
        flat = [CANONICAL_LEADS[i] for i in np.flatnonzero(np.ptp(x, axis=1) <= 1e-3)]
        detail = f"flat lead(s) {flat}"
    return reason, detail, fs, x.shape[-1]


def _check_star(args):
    return check_record(*args)


def validate_records(
    paths, workers: int = 1, min_seconds: float = 9.9, progress: bool = True
) -> pd.DataFrame:
    """Check every record (in a process pool when ``workers > 1``): reason, detail, fs, n_samples per path."""
    jobs = [(str(p), 12, min_seconds) for p in paths]
    bar = dict(total=len(jobs), desc="validating ECGs", unit="ecg", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_check_star, jobs, chunksize=32), **bar))
    else:
        results = [check_record(*job) for job in tqdm(jobs, **bar)]
    return pd.DataFrame(results, columns=["reason", "detail", "fs", "n_samples"])


def _apply_validation(frame: pd.DataFrame, root: Path, source: str, n_listed: int, args) -> tuple:
    """Validate waveforms, drop the bad ones and build the attrition table and exclusion list."""
    checks = validate_records(
        [root / p for p in frame["path"]], args.workers, args.min_seconds, args.progress
    )
    frame = frame.reset_index(drop=True)
    frame["fs"], frame["n_samples"] = checks["fs"], checks["n_samples"].astype("int64")
    steps = [(source, "listed", n_listed, 0, n_listed, "records in the source listing")]
    n = len(frame)
    steps.append((source, "duplicate_id", n_listed, n_listed - n, n, "the same ECG id listed more than once"))
    for reason in REASONS:
        k = int((checks["reason"] == reason).sum())
        steps.append((source, reason, n, k, n - k, REASON_TEXT[reason]))
        n -= k
    attrition = pd.DataFrame(steps, columns=["source", "step", "n_before", "n_excluded", "n_after", "reason"])
    bad = checks["reason"].notna()
    excluded = frame.loc[bad, ["ecg_id", "path"]].assign(
        reason=checks["reason"][bad], detail=checks["detail"][bad]
    )
    return frame.loc[~bad].reset_index(drop=True), attrition, excluded


def _literal(path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _csv(folder: Path, name: str) -> Path:
    for suffix in (".csv", ".csv.gz"):
        if (folder / f"{name}{suffix}").exists():
            return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"{folder / name}.csv not found (is --root the MIMIC-IV-ECG folder?)")


def build_mimic_index(root, hosp_dir=None, args=None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """MIMIC-IV-ECG recipe: records + machine report, admission link, labels, validation, patient splits."""
    args = args or argparse.Namespace(workers=1, min_seconds=9.9, progress=False)
    root = Path(root)
    con = duckdb.connect()
    for view in ("record_list", "machine_measurements"):
        con.sql(
            f"CREATE VIEW {view} AS SELECT * FROM read_csv({_literal(_csv(root, view))}, header=true, all_varchar=true)"
        )
    n_listed = int(con.sql("SELECT count(*) FROM record_list").fetchall()[0][0])
    frame = con.sql((RECIPES / "mimic_iv_ecg" / "ecg_records.sql").read_text()).df()
    if hosp_dir is not None:
        adm = codes._table(hosp_dir, "admissions")
        con.sql(
            f"CREATE VIEW admissions AS SELECT * FROM read_csv({_literal(adm)}, header=true, all_varchar=true)"
        )
        con.register("ecgs", frame[["subject_id", "study_id", "ecg_time"]])
        links = con.sql((RECIPES / "mimic_iv_ecg" / "link_admissions.sql").read_text()).df()
        frame = frame.merge(links, on="study_id", how="left")
    else:
        frame["hadm_id"] = pd.NA
    frame["hadm_id"] = frame["hadm_id"].astype("Int64")
    frame.insert(0, "ecg_id", frame["study_id"])
    frame.insert(0, "source", "mimic")
    frame = pd.concat([frame, mimic_labels(frame["report"])], axis=1)
    frame, attrition, excluded = _apply_validation(frame, root, "mimic", n_listed, args)
    frame["split"] = assign_splits(frame["subject_id"]) if len(frame) else pd.Series(dtype=object)
    return frame, attrition, excluded


def _parse_scp(value, ecg_id) -> dict:
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError) as err:
        raise ValueError(
            f"ptbxl_database.csv: ecg_id {ecg_id} has an unparsable scp_codes {value!r}"
        ) from err
    if not isinstance(parsed, dict):
        raise ValueError(f"ptbxl_database.csv: ecg_id {ecg_id} scp_codes is not a dict: {value!r}")
    return parsed


def ptbxl_split(strat_fold) -> np.ndarray:
    """PTB-XL's recommended split: folds 1-8 train, 9 val, 10 test (folds 9-10 were human-validated)."""
    fold = pd.to_numeric(pd.Series(strat_fold), errors="coerce")
    return np.select([fold <= 8, fold == 9, fold == 10], ["train", "val", "test"], default="train").astype(
        object
    )


def build_ptbxl_index(root, fs: int = 100, records: str | None = None, args=None) -> tuple:
    """PTB-XL recipe: database + SCP statements -> English report, SCP codes, superclasses, labels, splits."""
    args = args or argparse.Namespace(workers=1, min_seconds=9.9, progress=False)
    root = Path(root)
    db = pd.read_csv(_csv(root, "ptbxl_database"))
    scp = pd.read_csv(_csv(root, "scp_statements"), index_col=0)
    records = records or ("records100" if fs <= 100 else "records500")
    if records not in ("records100", "records500"):
        raise ValueError(f"--records must be records100 or records500, got {records!r}")
    file_col = "filename_lr" if records == "records100" else "filename_hr"
    parsed = [_parse_scp(v, i) for v, i in zip(db["scp_codes"], db["ecg_id"], strict=True)]
    diagnostic = scp[scp["diagnostic"] == 1]
    klass, subclass = diagnostic["diagnostic_class"].to_dict(), diagnostic["diagnostic_subclass"].to_dict()
    describe = scp["description"].to_dict()
    frame = pd.DataFrame(
        {
            "source": "ptbxl",
            "ecg_id": db["ecg_id"].astype("int64"),
            "subject_id": pd.to_numeric(db["patient_id"]).astype("int64"),
            "path": db[file_col].astype(str),
            "ecg_time": pd.to_datetime(db["recording_date"], errors="coerce"),
        }
    )
    # Codes by decreasing likelihood (0 = "not given", used for rhythm and form statements).
    ordered = [sorted(p, key=lambda c, p=p: (-float(p[c] or 0), c)) for p in parsed]
    frame["report"] = ["; ".join(str(describe.get(c, c)) for c in codes_) for codes_ in ordered]
    frame["report_original"] = db["report"].astype(str)
    frame["scp_codes"] = ordered
    frame["superclasses"] = [sorted({klass[c] for c in p if c in klass}) for p in parsed]
    for name in SUPERCLASSES:
        frame[f"superclass_{name}"] = frame["superclasses"].map(lambda s, n=name: int(n in s)).astype("int8")
    for label in LABELS:
        if label in PTBXL_LABEL_CODES:
            hit = [bool(PTBXL_LABEL_CODES[label] & set(p)) for p in parsed]
        elif label == "mi":
            hit = frame["superclass_MI"].astype(bool)
        elif label in ("mi_inferior", "mi_anterior"):
            want = "IMI" if label == "mi_inferior" else "AMI"
            hit = [any(subclass.get(c) == want for c in p) for p in parsed]
        else:  # abnormal: any diagnostic superclass other than NORM
            hit = [bool(set(s) - {"NORM"}) for s in frame["superclasses"]]
        frame[f"label_{label}"] = np.asarray(hit, dtype="int8")
    frame["strat_fold"] = db["strat_fold"].astype("int64")
    frame["age"], frame["sex"] = pd.to_numeric(db["age"], errors="coerce"), db["sex"]
    n_listed = len(frame)
    frame = frame.drop_duplicates("ecg_id")
    frame, attrition, excluded = _apply_validation(frame, root, "ptbxl", n_listed, args)
    frame["split"] = ptbxl_split(frame["strat_fold"])
    return frame, attrition, excluded


def write_code_tables(index: pd.DataFrame, out: Path, hosp_dir: Path, note_dir: Path | None, args) -> dict:
    """Code sequences, the train-only vocabulary and the two text views around each linked-subject ECG."""
    anchors = index.loc[index["ecg_time"].notna(), ["subject_id", "ecg_id", "ecg_time", "split"]]
    anchors = anchors.rename(columns={"ecg_id": "anchor_id", "ecg_time": "anchor_time"})
    seqs = codes.code_sequences(hosp_dir, anchors, args.window_days, args.past_only)
    seqs = seqs.rename(columns={"anchor_id": "ecg_id"}).assign(split=anchors["split"].to_numpy())
    write_parquet(out / "ecg_codes.parquet", seqs)
    vocab = codes.CodeVocab.fit(seqs.loc[seqs["split"] == "train", "tokens"], min_count=args.min_count)
    vocab.save(out / "code_vocab.json")
    text = codes.entity_text(hosp_dir, anchors, args.window_days, args.past_only, note_dir=note_dir)
    text = text.rename(columns={"anchor_id": "ecg_id", "text": "entity_text"})
    if note_dir is not None and any((note_dir / f"discharge{s}").exists() for s in (".csv.gz", ".csv")):
        reports = codes.report_text(note_dir, anchors, args.report_days, args.past_only)
        text["report_text"] = reports["text"].to_numpy()
    write_parquet(out / "ecg_text.parquet", text)
    return {"n_sequences": len(seqs), "vocab_size": len(vocab)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", choices=("mimic", "ptbxl"), required=True, help="MIMIC-IV-ECG layout or PTB-XL"
    )
    parser.add_argument(
        "--root", type=Path, required=True, help="dataset folder (MIMIC: the one with record_list.csv)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; other files kept)")
    parser.add_argument(
        "--fs", type=int, default=100, help="target rate; PTB-XL: <=100 reads records100, else records500"
    )
    parser.add_argument(
        "--records", choices=("records100", "records500"), help="PTB-XL waveform folder (overrides --fs)"
    )
    parser.add_argument(
        "--mimic-hosp", type=Path, help="MIMIC-IV hosp folder for linkage and codes (default ROOT/../hosp)"
    )
    parser.add_argument(
        "--mimic-note", type=Path, help="MIMIC-IV-Note folder (default ROOT/../note when present)"
    )
    parser.add_argument("--no-codes", action="store_true", help="skip code sequences and texts")
    parser.add_argument("--window-days", type=float, default=365, help="code/entity window around the ECG")
    parser.add_argument("--report-days", type=float, default=30, help="note window for the report text")
    parser.add_argument("--past-only", action="store_true", help="only events known before the ECG")
    parser.add_argument("--min-count", type=int, default=1, help="vocabulary: minimum token count in train")
    parser.add_argument("--min-seconds", type=float, default=9.9, help="shorter records count as wrong_shape")
    parser.add_argument("--workers", type=int, default=1, help="processes for waveform validation")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    out, root = Path(args.out), Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} is not a folder")
    summary: dict = {
        "source": args.source,
        "root": str(root.resolve()),
        "created": datetime.now(UTC).isoformat(),
    }
    if args.source == "mimic":
        hosp = args.mimic_hosp or (root.parent / "hosp" if (root.parent / "hosp").is_dir() else None)
        index, attrition, excluded = build_mimic_index(root, hosp, args)
        summary["hosp"] = str(hosp) if hosp else None
    else:
        hosp = None
        index, attrition, excluded = build_ptbxl_index(root, args.fs, args.records, args)
    write_parquet(out / "ecg_index.parquet", index)
    write_csv(out / "ecg_attrition.csv", attrition)
    write_csv(out / "ecg_excluded.csv", excluded)
    if hosp is not None and not args.no_codes:
        note = args.mimic_note or (root.parent / "note" if (root.parent / "note").is_dir() else None)
        summary |= write_code_tables(index, out, Path(hosp), note, args)
    summary |= {"n_ecgs": len(index), "n_excluded": len(excluded), "labels": [f"label_{k}" for k in LABELS]}
    write_json(out / "ecg_index.json", summary)
    print(f"ecg-index: {len(index)} ECGs written to {out / 'ecg_index.parquet'}; {len(excluded)} excluded")
    print(attrition.to_string(index=False))
    return 0
