"""``ehrclip cohort``: turn a MIMIC-IV-shaped folder into analysis-ready task tables with DuckDB.

The SQL lives in ``data_recipes/mimic_iv/*.sql`` (run in file order); this module only wires it up:
it checks every input file's header, exposes each CSV.gz as a typed DuckDB view (times stay text so
that unparsable ones can be *counted* by the SQL instead of aborting the read), renders the
catalogue-dependent pieces from :mod:`ehrclip_kit.data.features`, then fits the categorical
vocabularies and the missingness filter on the train split and writes the cohort folder atomically::

    build_cohort("mimic-iv-2.2", "cohort")      # or: ehrclip cohort --mimic mimic-iv-2.2 --out cohort

Output (``OUT/``): ``readmission_30d.parquet``, ``critical_24h.parquet``, ``features.json``,
``attrition.csv``, ``notes.parquet`` (when notes exist), ``truth.parquet`` (synthetic worlds).
Label definitions and the feature windows are documented in ``data_recipes/mimic_iv/README.md``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gzip
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ehrclip_kit import io
from ehrclip_kit.data import features as catalogue
from ehrclip_kit.data.splits import DEFAULT_FRACTIONS, assign_splits

TASKS: tuple[str, ...] = ("readmission_30d", "critical_24h")
RECIPE_DIR = Path(__file__).resolve().parents[2] / "data_recipes" / "mimic_iv"
UNKNOWN = "__unknown__"
_T = "VARCHAR"  # times are parsed in SQL with TRY_CAST so that bad ones are counted, not fatal


@dataclasses.dataclass(frozen=True)
class InputTable:
    """A CSV.gz the recipe reads: the columns it needs (with DuckDB types) and which may be absent."""

    name: str
    columns: dict[str, str]
    optional_columns: tuple[str, ...] = ()
    required: bool = True


_ID = "BIGINT"
INPUTS: tuple[InputTable, ...] = (
    InputTable("hosp/patients", {"subject_id": _ID, "gender": _T, "anchor_age": "INTEGER", "anchor_year": "INTEGER"}),
    InputTable(
        "hosp/admissions",
        {"subject_id": _ID, "hadm_id": _ID, "admittime": _T, "dischtime": _T, "deathtime": _T,
         "admission_type": _T, "admission_location": _T, "insurance": _T, "language": _T,
         "marital_status": _T, "race": _T, "edregtime": _T, "hospital_expire_flag": "INTEGER"},
        ("admission_location", "insurance", "language", "marital_status", "race", "edregtime"),
    ),  # fmt: skip
    InputTable("hosp/diagnoses_icd", {"subject_id": _ID, "hadm_id": _ID, "icd_code": _T, "icd_version": "INTEGER"}),
    InputTable("hosp/procedures_icd", {"subject_id": _ID, "hadm_id": _ID, "chartdate": _T}),
    InputTable("hosp/labevents", {"subject_id": _ID, "hadm_id": _ID, "itemid": "INTEGER", "charttime": _T, "valuenum": _T}),
    InputTable("hosp/prescriptions", {"subject_id": _ID, "hadm_id": _ID, "starttime": _T, "drug": _T}),
    InputTable("icu/icustays", {"subject_id": _ID, "hadm_id": _ID, "stay_id": _ID, "intime": _T, "outtime": _T}),
    InputTable("icu/chartevents", {"subject_id": _ID, "hadm_id": _ID, "itemid": "INTEGER", "charttime": _T, "valuenum": _T}, required=False),
)  # fmt: skip
NOTES = InputTable("note/discharge", {"subject_id": _ID, "hadm_id": _ID, "note_type": _T, "note_seq": "INTEGER", "text": _T}, ("note_type", "note_seq"))  # fmt: skip


class CohortInputError(ValueError):
    """A required input file or column is missing or unreadable; the message names it."""


def find_table(root: Path, name: str) -> Path | None:
    """``root/name.csv.gz`` (or an uncompressed ``.csv``), or None."""
    for suffix in (".csv.gz", ".csv"):
        if (path := root / f"{name}{suffix}").is_file():
            return path
    return None


def read_header(path: Path) -> list[str]:
    """Column names of a CSV(.gz) file from its first line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader([handle.readline()]), [])
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CohortInputError(f"cannot read the header of {path}: {err}") from err


def _sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def register_input(con, table: InputTable, path: Path | None, view: str) -> None:
    """Create ``view`` over the file with explicit types (every column; unknown extras as VARCHAR)."""
    if path is None:  # optional table absent: an empty view with the same columns keeps the SQL simple
        cols = ", ".join(f"NULL::{t} AS {c}" for c, t in table.columns.items())
        con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {cols} WHERE false")
        return
    header = read_header(path)
    for col in table.columns:
        if col not in header and col not in table.optional_columns:
            raise CohortInputError(f"column {col!r} missing from {path}")
    types = ", ".join(f"{_sql_str(c)}: {_sql_str(table.columns.get(c, 'VARCHAR'))}" for c in header)
    select = ", ".join(f'"{c}"' if c in header else f'NULL::{t} AS "{c}"' for c, t in table.columns.items())
    con.execute(
        f"CREATE OR REPLACE VIEW {view} AS SELECT {select} FROM read_csv({_sql_str(path)}, header=true, "
        f"auto_detect=false, delim=',', quote='\"', escape='\"', max_line_size=67108864, columns={{{types}}})"
    )


def render_sql(path: Path, fragments: dict[str, str]) -> str:
    """The SQL of a recipe file with its ``{{name}}`` placeholders filled in."""
    sql = path.read_text()
    for key, value in fragments.items():
        sql = sql.replace("{{" + key + "}}", value)
    if "{{" in sql:
        raise ValueError(f"unfilled placeholder in {path}: {sql[sql.index('{{') :][:40]!r}")
    return sql


def build_cohort(
    mimic_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    notes_dir: str | os.PathLike | None = None,
    include_notes: bool = True,
    tasks: tuple[str, ...] = TASKS,
    memory_limit: str = "6GB",
    threads: int | None = None,
    max_missing: float = 0.99,
    verbose: bool = True,
) -> dict:
    """Run the MIMIC-IV recipes on ``mimic_dir`` and write the cohort folder ``out_dir`` (atomically).

    ``notes_dir`` defaults to ``mimic_dir/note`` when that exists; ``include_notes=False`` skips notes.
    Features missing for more than ``max_missing`` of the train rows (all tasks pooled) are dropped and
    listed in features.json.
    Raises :class:`CohortInputError` naming the file/column when an input is missing; nothing is written.
    Returns a summary dict (rows, positives and timings per task, feature count).
    """
    say = print if verbose else (lambda *a, **k: None)
    root, out = Path(mimic_dir), Path(out_dir)
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    paths = {t.name: find_table(root, t.name) for t in INPUTS}
    for t in INPUTS:
        if t.required and paths[t.name] is None:
            raise CohortInputError(f"table {t.name} missing: expected {root / t.name}.csv.gz")
        if not t.required and paths[t.name] is None:
            say(f"notice: optional table {t.name} not found in {root}; its features are skipped")
    notes_path = _notes_path(root, notes_dir) if include_notes else None
    include_vitals = paths["icu/chartevents"] is not None
    specs = catalogue.feature_specs(include_vitals)
    started = time.perf_counter()
    n_threads = int(threads or os.cpu_count() or 1)
    # DuckDB's database and spill files go beside OUT (same disk as the output) when that folder exists.
    work = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.duckdb-", dir=out.parent if out.parent.is_dir() else None)
    )
    notes_job = None
    con = duckdb.connect(str(work / "cohort.duckdb"), config={
        "memory_limit": memory_limit, "threads": n_threads,
        "temp_directory": str(work / "spill"), "preserve_insertion_order": False,
    })  # fmt: skip
    try:
        con.execute("SET enable_progress_bar = false")  # our own tqdm bar reports the steps
        for t in INPUTS:
            register_input(con, t, paths[t.name], "src_" + t.name.split("/")[1])
        if notes_path is not None:
            register_input(con, NOTES, notes_path, "src_notes")  # checks the header now, before any work
            notes_job = _NotesJob(notes_path, work, n_threads)  # cleans notes while the SQL below runs
        _register_catalogue(con, include_vitals)
        timings = _run_recipes(con, root, tasks, include_vitals, verbose)
        with io.atomic_dir(out) as tmp:
            summary = _write_outputs(con, tmp, root, tasks, specs, max_missing, say)
            if notes_job is not None:
                t0 = time.perf_counter()
                summary["notes"] = notes_job.finish(con, tmp / "notes.parquet")
                timings["notes_wait"] = round(time.perf_counter() - t0, 2)
            elif include_notes:
                say(
                    f"notice: no notes found (looked for {root / 'note'}/discharge.csv.gz); notes.parquet skipped"
                )
            attrition = _write_attrition(con, tmp / "attrition.csv", tasks)
            if (root / "truth.parquet").is_file():
                shutil.copy2(root / "truth.parquet", tmp / "truth.parquet")
            summary.update(timings=timings, seconds=round(time.perf_counter() - started, 1), out=str(out))
            _report(attrition, summary, max_missing, say)
    finally:
        con.close()
        if notes_job is not None:
            notes_job.stop()  # after a failure elsewhere; its files live in ``work``
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _run_recipes(con, root: Path, tasks, include_vitals: bool, verbose: bool) -> dict[str, float]:
    """Run data_recipes/mimic_iv/*.sql in file order; returns seconds per file."""
    con.execute(
        "CREATE TABLE attrition (task VARCHAR, seq INTEGER, step VARCHAR, n_before BIGINT, n_excluded BIGINT, "
        "n_after BIGINT, reason VARCHAR)"
    )
    fragments = catalogue.sql_fragments(include_vitals)
    timings = {}
    for sql_file in tqdm(sorted(RECIPE_DIR.glob("*.sql")), desc="cohort recipes", disable=not verbose):
        t0 = time.perf_counter()
        try:
            con.execute(render_sql(sql_file, fragments))
        except duckdb.Error as err:
            raise CohortInputError(
                f"recipe {sql_file.name} failed on the inputs in {root}: {_brief(err)}"
            ) from err
        if sql_file.name.startswith("02_"):  # task_windows exists from here on: keep the requested tasks
            con.execute("DELETE FROM task_windows WHERE NOT list_contains(?::VARCHAR[], task)", [list(tasks)])
        timings[sql_file.stem] = round(time.perf_counter() - t0, 2)
    return timings


def _write_attrition(con, path: Path, tasks) -> pd.DataFrame:
    """Input rows first, then each task's steps in order; the internal ``seq`` column is dropped."""
    order = {t: i for i, t in enumerate(("input", *tasks))}
    frame = con.sql("SELECT * FROM attrition").df()
    frame = frame[frame.task.isin(order)].assign(task_order=lambda f: f.task.map(order))
    frame = (
        frame.sort_values(["task_order", "seq"]).drop(columns=["task_order", "seq"]).reset_index(drop=True)
    )
    io.write_csv(path, frame)
    return frame


def _brief(err: Exception) -> str:
    """DuckDB's CSV errors name the line, column and file, then list generic advice: keep the first part."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    cut = next((i for i, x in enumerate(lines) if x.startswith("Possible solutions")), len(lines))
    return "\n".join(lines[:cut] + [x for x in lines[cut:] if x.startswith("file =")])


def _notes_path(root: Path, notes_dir) -> Path | None:
    if notes_dir is None:
        return find_table(root, NOTES.name)
    path = find_table(Path(notes_dir), "discharge")
    if path is None:
        raise CohortInputError(f"table discharge missing: expected {Path(notes_dir) / 'discharge.csv.gz'}")
    return path


def _register_catalogue(con, include_vitals: bool) -> None:
    """Small lookup tables from features.py that the SQL joins against."""
    frames = {
        "charlson_map": pd.DataFrame(catalogue.charlson_prefix_rows(), columns=["icd_version", "prefix", "grp"]),
        "meas_items": pd.DataFrame(catalogue.measurement_rows(include_vitals), columns=["fid", "itemid", "feature", "source"]),
        "med_patterns": pd.DataFrame(
            [(c, inc, exc) for c, (inc, exc) in catalogue.MEDICATION_CLASSES.items()], columns=["cls", "include", "exclude"]
        ),
    }  # fmt: skip
    for name, frame in frames.items():
        con.register(f"{name}_df", frame)
        con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM {name}_df")
        con.unregister(f"{name}_df")


def _write_outputs(con, tmp: Path, source: Path, tasks, specs, max_missing: float, say) -> dict:
    """Splits, train-only categories and missingness filter, then one parquet per task + features.json."""
    ids = {"task", "subject_id", "hadm_id", "label"}
    columns = set(con.sql("SELECT * FROM features_all LIMIT 0").columns) - ids
    if diff := columns ^ {s.name for s in specs}:  # a recipe and the catalogue disagree: a bug, not bad input
        raise RuntimeError(f"feature columns differ from the catalogue: {sorted(diff)}")
    kept, dropped, categories, n_train = _fit_on_train(con, specs, max_missing)
    if not n_train:
        say("notice: no train-split rows; categories hold only the unknown code and no feature is dropped")
    summary = {"tasks": {}, "n_features": len(kept), "n_dropped": len(dropped), "n_train_rows": n_train}
    for task in tasks:
        frame = con.execute(
            f"SELECT f.subject_id, f.hadm_id, s.split, f.label, {', '.join('f.' + k.name for k in kept)} "
            "FROM features_all f JOIN subject_split s ON s.subject_id = f.subject_id "
            "WHERE f.task = ? ORDER BY f.hadm_id",
            [task],
        ).df()
        out = {"subject_id": frame["subject_id"].astype("int64"), "hadm_id": frame["hadm_id"].astype("int64"),
               "split": frame["split"].astype(str), "label": frame["label"].astype("int64")}  # fmt: skip
        for k in kept:
            if k.kind == "categorical":
                codes = pd.Index(categories[k.name][1:]).get_indexer(frame[k.name].astype(object))
                out[k.name] = codes.astype("int64") + 1  # -1 (missing, or unseen in train) -> 0 = unknown
            else:
                out[k.name] = frame[k.name].to_numpy(dtype=np.float32, na_value=np.nan)
        io.write_parquet(tmp / f"{task}.parquet", pd.DataFrame(out))
        summary["tasks"][task] = {"rows": len(frame), "positives": int(frame["label"].sum()),
                                  "splits": frame["split"].value_counts().to_dict()}  # fmt: skip
    io.write_json(tmp / "features.json", {
        "features": [
            {"name": k.name, "kind": k.kind, "source": k.source, "description": k.description}
            | ({"categories": categories[k.name]} if k.kind == "categorical" else {})
            for k in kept
        ],
        "dropped": dropped,
        "tasks": list(tasks),
        "task_rows": summary["tasks"],
        "source": str(source),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "split_fractions": list(DEFAULT_FRACTIONS),
        "max_missing": max_missing,
    })  # fmt: skip
    return summary


def _fit_on_train(con, specs, max_missing: float):
    """Assign splits, then fit category lists and the missingness filter on train rows (tasks pooled)."""
    subjects = con.sql("SELECT DISTINCT subject_id FROM task_windows ORDER BY subject_id").df()
    subjects["split"] = assign_splits(subjects["subject_id"])
    con.register("subject_split_df", subjects)
    con.execute("CREATE OR REPLACE TABLE subject_split AS SELECT * FROM subject_split_df")
    train = "FROM features_all f JOIN subject_split s ON s.subject_id = f.subject_id WHERE s.split = 'train'"
    categories = {}
    for s in specs:
        if s.kind == "categorical":
            values = con.sql(f"SELECT DISTINCT f.{s.name} AS v {train} AND v IS NOT NULL ORDER BY v").df()[
                "v"
            ]
            categories[s.name] = [UNKNOWN, *map(str, values)]
    present = ", ".join(
        f"count(*) FILTER (WHERE f.{s.name} > 0) AS {s.name}"
        if s.zero_is_missing
        else f"count(f.{s.name}) AS {s.name}"
        for s in specs
    )  # a categorical counts as present when non-null: every train value is a known category
    counts = con.sql(f"SELECT count(*) AS __n, {present} {train}").df().iloc[0]
    n_train = int(counts["__n"])
    kept, dropped = [], []
    for s in specs:
        missing = 1.0 - float(counts[s.name]) / n_train if n_train else 0.0
        if missing > max_missing:
            reason = f"missing for {missing:.1%} of train rows"
            dropped.append({"name": s.name, "reason": reason, "missing_fraction": round(missing, 4)})
        else:
            kept.append(s)
    return kept, dropped, categories, n_train


class _NotesJob:
    """Clean every discharge summary in a background thread (a process pool for big files).

    The SQL recipes mostly wait on single-threaded gzip CSV parsing, so note cleaning (pure Python, slow)
    overlaps with them. ``finish`` keeps the notes of usable admissions, one row per hadm_id (several
    notes joined in note_seq order), and records the attrition row.
    """

    def __init__(self, path: Path, work: Path, workers: int):
        self.clean_path, self.counts, self.error = work / "notes_clean.parquet", {}, None
        self._cancel = threading.Event()
        # a pool costs a second of start-up: worth it from a few thousand notes on (~10 MB compressed)
        workers = workers if path.stat().st_size > 10_000_000 else 1
        self.thread = threading.Thread(target=self._run, args=(path, work, workers), daemon=True)
        self.thread.start()

    def _run(self, path: Path, work: Path, workers: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            con = duckdb.connect(
                config={"threads": 1, "memory_limit": "2GB", "temp_directory": str(work / "spill_notes")}
            )
            register_input(con, NOTES, path, "src_notes")
            con.execute("SET enable_progress_bar = false")
            (self.counts["n"], self.counts["no_id"], self.counts["not_ds"]) = con.sql(
                "SELECT count(*), count(*) FILTER (WHERE hadm_id IS NULL), "
                "count(*) FILTER (WHERE hadm_id IS NOT NULL AND coalesce(note_type, 'DS') <> 'DS') FROM src_notes"
            ).fetchall()[0]
            reader = con.sql(
                "SELECT hadm_id, text FROM src_notes WHERE hadm_id IS NOT NULL AND coalesce(note_type, 'DS') = 'DS' "
                "ORDER BY hadm_id, note_seq"
            ).to_arrow_reader(4096)
            schema = pa.schema([("hadm_id", pa.int64()), ("n_notes", pa.int64()), ("text", pa.string())])
            groups = _note_groups(reader)
            with pq.ParquetWriter(self.clean_path, schema) as writer, _note_cleaner(workers) as clean:
                while not self._cancel.is_set() and (chunk := list(itertools.islice(groups, 4096))):
                    hadm, n, raw = zip(*chunk, strict=True)
                    writer.write_table(pa.table([list(hadm), list(n), clean(raw)], schema=schema))
            con.close()
        except duckdb.Error as err:
            self.error = CohortInputError(f"reading {path} failed: {_brief(err)}")
        except BaseException as err:  # noqa: BLE001 -- re-raised in the main thread by finish()
            self.error = err

    def stop(self) -> None:
        self._cancel.set()
        self.thread.join()

    def finish(self, con, out: Path) -> int:
        self.thread.join()
        if self.error is not None:
            raise self.error
        clean = _sql_str(self.clean_path)
        n_unknown = con.sql(
            f"SELECT coalesce(sum(n_notes), 0) FROM read_parquet({clean}) c ANTI JOIN adm a ON a.hadm_id = c.hadm_id"
        ).fetchall()[0][0]
        n, no_id, not_ds = self.counts["n"], self.counts["no_id"], self.counts["not_ds"]
        bad = no_id + not_ds + n_unknown
        reason = f"{no_id} without hadm_id; {n_unknown} hadm_id not among the usable admissions; {not_ds} note_type not DS"
        con.execute(
            "INSERT INTO attrition VALUES ('input', 9, 'note/discharge', ?, ?, ?, ?)",
            [n, bad, n - bad, reason],
        )
        con.execute(
            f"COPY (SELECT a.subject_id, c.hadm_id, c.text FROM read_parquet({clean}) c "
            f"JOIN adm a ON a.hadm_id = c.hadm_id ORDER BY c.hadm_id) TO {_sql_str(out)} (FORMAT parquet)"
        )
        return con.sql(f"SELECT count(*) FROM read_parquet({_sql_str(out)})").fetchall()[0][0]


def _note_groups(reader):
    """(hadm_id, number of notes, raw text) per admission from batches of rows sorted by hadm_id, note_seq."""
    hadm, texts = None, []
    for batch in reader:
        cols = batch.to_pydict()
        for h, text in zip(cols["hadm_id"], cols["text"], strict=True):
            if texts and h != hadm:
                yield hadm, len(texts), "\n\n".join(t for t in texts if t)
                texts = []
            hadm = h
            texts.append(text)
    if texts:
        yield hadm, len(texts), "\n\n".join(t for t in texts if t)


@contextlib.contextmanager
def _note_cleaner(workers: int):
    """A function cleaning a sequence of notes with ``notes.clean_note`` defaults, in ``workers`` processes."""
    from ehrclip_kit.data.notes import clean_note  # another module; imported only when notes exist

    if workers <= 1:
        yield lambda texts: [clean_note(t) for t in texts]
        return
    # spawn, not fork: forking a process that runs DuckDB threads can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda texts: list(pool.map(clean_note, texts, chunksize=64))


def _report(attrition: pd.DataFrame, summary: dict, max_missing: float, say) -> None:
    for row in attrition[attrition.task == "input"].itertuples():
        if row.n_excluded:
            say(f"input {row.step}: {row.n_excluded} of {row.n_before} rows excluded ({row.reason})")
    for task, info in summary["tasks"].items():
        rate = info["positives"] / info["rows"] if info["rows"] else float("nan")
        say(
            f"{task}: {info['rows']} admissions, {info['positives']} positive ({rate:.1%}), splits {info['splits']}"
        )
    say(f"{summary['n_features']} features ({summary['n_dropped']} dropped as missing for >{max_missing:.0%} of train "
        f"rows) in {summary['seconds']} s -> {summary['out']}")  # fmt: skip


def add_arguments(parser) -> None:
    add = parser.add_argument
    add("--mimic", required=True, help="MIMIC-IV folder with hosp/ and icu/ (real, demo or `ehrclip synth`)")
    add("--out", required=True, help="cohort folder to write (replaced whole, atomically)")
    add("--notes", default=None, help="folder with discharge.csv.gz (default: MIMIC/note when present)")
    add("--no-notes", action="store_true", help="do not write notes.parquet")
    add("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to build (default: all)")
    add("--memory-limit", default="6GB", help="DuckDB memory limit; it spills to disk beyond it")
    add(
        "--threads",
        type=int,
        default=None,
        help="DuckDB threads and note-cleaning processes (default: all cores)",
    )
    add("--max-missing", type=float, default=0.99, help="drop features missing for more of the train rows")


def run(args) -> int:
    try:
        build_cohort(args.mimic, args.out, notes_dir=args.notes, include_notes=not args.no_notes, tasks=tuple(args.tasks),
                     memory_limit=args.memory_limit, threads=args.threads, max_missing=args.max_missing)  # fmt: skip
    except CohortInputError as err:
        print(f"ehrclip cohort: error: {err}", file=sys.stderr)
        return 2
    return 0
