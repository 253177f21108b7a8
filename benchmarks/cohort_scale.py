"""Benchmark ``ehrclip cohort`` at MIMIC-IV scale, against a straightforward pandas implementation.

1. A synthetic world with ``--admissions`` admissions and about ``--lab-rows`` lab rows (generated once
   with ``ehrclip_kit.data.synthetic.generate_world(ecg=False, lab_density=...)``, reused when present;
   ``--world`` may also point at any MIMIC-IV-shaped folder, e.g. the demo).
2. ``ehrclip cohort`` on it in a child process: wall time and peak memory of the whole process tree
   (psutil polling; ``ru_maxrss`` of the largest child as a cross-check). Target: <= 15 min, <= 10 GB.
3. On the largest subset both can handle (``--pandas-admissions``, whole subjects): the recipe's lab step
   (``06_measurements``: read labevents, link, aggregate, pivot) against the same lab features in plain
   pandas (read_csv, merge, sort, groupby, unstack). Prints both times, the ratio and the largest
   difference between the two results.

Full scale (run it when the machine is otherwise idle)::

    python benchmarks/cohort_scale.py --admissions 400000 --lab-rows 50000000 --world runs/bench/world

Quick check::

    python benchmarks/cohort_scale.py --admissions 2000 --lab-rows 150000 --world /tmp/bench_world
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import psutil

from ehrclip_kit.data import features as catalogue
from ehrclip_kit.data.recipes import TASKS, build_cohort

TABLES = ("hosp/patients", "hosp/admissions", "hosp/diagnoses_icd", "hosp/procedures_icd", "hosp/labevents",
          "hosp/prescriptions", "icu/icustays", "note/discharge")  # fmt: skip


class PeakRSS:
    """Poll the resident memory of a process and all its children; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:  # a child ended between listing and reading: next poll sees the new tree
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def count_rows(path: Path) -> int:
    return duckdb.sql(f"SELECT count(*) FROM read_csv('{path}', all_varchar=true)").fetchall()[0][0]


def ensure_world(world: Path, admissions: int, lab_rows: int, seed: int) -> dict:
    """Generate (or reuse) a world of about ``admissions`` admissions and ``lab_rows`` lab rows."""
    counts_file = world / "bench_counts.json"
    if (world / "hosp" / "admissions.csv.gz").is_file():
        if counts_file.is_file():
            return json.loads(counts_file.read_text())
        counts = {"admissions": count_rows(world / "hosp" / "admissions.csv.gz"),
                  "labevents": count_rows(world / "hosp" / "labevents.csv.gz")}  # fmt: skip
        print(f"reusing {world}: {counts}")
        return counts
    from ehrclip_kit.data.synthetic import generate_world

    with tempfile.TemporaryDirectory() as probe:  # admissions per patient and labs per admission
        small = generate_world(
            Path(probe) / "w", n_patients=400, seed=seed, text_signal=0.5, ecg=False, progress=False
        )
    per_patient = small["admissions"] / 400
    labs_per_admission = small["labevents"] / small["admissions"]
    # The 400-patient probe overestimates both rates by a few per cent at scale: aim 6 % high so the
    # world reaches at least the requested sizes.
    n_patients = math.ceil(admissions / per_patient * 1.06)
    density = max(lab_rows / (admissions * labs_per_admission), 0.05) * 1.06
    print(f"generating {world}: {n_patients} patients, lab_density {density:.2f} "
          f"(probe: {per_patient:.2f} admissions/patient, {labs_per_admission:.0f} labs/admission)")  # fmt: skip
    t0 = time.perf_counter()
    counts = generate_world(
        world, n_patients=n_patients, seed=seed, text_signal=0.5, ecg=False, lab_density=density
    )
    counts["generate_seconds"] = round(time.perf_counter() - t0, 1)
    counts_file.write_text(json.dumps(counts, indent=2))
    print(
        f"generated in {counts['generate_seconds']} s: {counts['admissions']} admissions, {counts['labevents']} lab rows"
    )
    return counts


def time_cohort(world: Path, out: Path, memory_limit: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ehrclip_kit.cli", "cohort", "--mimic", str(world), "--out", str(out),
           "--memory-limit", memory_limit, *extra]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with PeakRSS(proc.pid) as peak:
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"cohort failed with exit code {rc}")
    maxrss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    return {
        "wall_s": round(wall, 1),
        "peak_tree_rss_gb": round(peak.peak / 2**30, 2),
        "max_child_rss_gb": round(maxrss_gb, 2),
    }


def subset_world(world: Path, sub: Path, n_admissions: int) -> int:
    """Copy whole subjects (the first by subject_id) until ``n_admissions``; returns the admissions kept."""
    con = duckdb.connect()
    adm = world / "hosp" / "admissions.csv.gz"
    con.execute(f"""CREATE TABLE keep AS SELECT subject_id FROM (
        SELECT subject_id, sum(count(*)) OVER (ORDER BY subject_id) AS cum
        FROM read_csv('{adm}', all_varchar=true) GROUP BY subject_id) WHERE cum <= {n_admissions}""")
    for name in TABLES:
        src = world / f"{name}.csv.gz"
        if not src.is_file():
            continue
        (sub / name).parent.mkdir(parents=True, exist_ok=True)
        # all_varchar keeps every value byte for byte (times, codes with leading zeros)
        con.execute(f"""COPY (SELECT * FROM read_csv('{src}', all_varchar=true, header=true)
            WHERE subject_id IN (SELECT subject_id::VARCHAR FROM keep))
            TO '{sub / name}.csv.gz' (HEADER, COMPRESSION gzip)""")
    return count_rows(sub / "hosp" / "admissions.csv.gz")


def pandas_lab_features(world: Path, cohort: Path) -> dict[str, pd.DataFrame]:
    """The same lab features, the way one would write them in pandas (documented linkage rule)."""
    adm = pd.read_csv(world / "hosp" / "admissions.csv.gz", usecols=["subject_id", "hadm_id", "admittime", "dischtime", "edregtime"],
                      parse_dates=["admittime", "dischtime", "edregtime"])  # fmt: skip
    adm["win_start"] = adm[["admittime", "edregtime"]].min(axis=1)
    name = {i: f"lab_{m.name}" for m in catalogue.LABS for i in m.itemids}
    labs = pd.read_csv(world / "hosp" / "labevents.csv.gz", usecols=["subject_id", "hadm_id", "itemid", "charttime", "valuenum"],
                       dtype={"itemid": "int32", "valuenum": "float64"}, parse_dates=["charttime"])  # fmt: skip
    labs = labs[labs.itemid.isin(name) & labs.valuenum.notna()]
    labs["lab"] = labs.itemid.map(name)
    with_id, without_id = labs[labs.hadm_id.notna()].astype({"hadm_id": "int64"}), labs[labs.hadm_id.isna()]
    out = {}
    for task in TASKS:
        ids = pd.read_parquet(cohort / f"{task}.parquet", columns=["hadm_id"]).hadm_id
        w = adm[adm.hadm_id.isin(ids)].copy()
        w["t_pred"] = w.dischtime if task == "readmission_30d" else w.admittime + pd.Timedelta(hours=24)
        a = with_id.merge(w[["hadm_id", "t_pred"]], on="hadm_id")
        b = without_id.drop(columns="hadm_id").merge(
            w[["subject_id", "hadm_id", "t_pred", "win_start"]], on="subject_id"
        )
        b = b[b.charttime >= b.win_start]
        linked = pd.concat([a, b])
        linked = linked[linked.charttime <= linked.t_pred].sort_values(["charttime", "valuenum"])
        stats = linked.groupby(["hadm_id", "lab"]).valuenum.agg(
            ["first", "last", "min", "max", "mean", "count"]
        )
        wide = stats.unstack("lab")
        wide.columns = [f"{lab}_{stat}" for stat, lab in wide.columns]
        out[task] = wide.reindex(ids.sort_values())
    return out


def compare_with_pandas(world: Path, n_admissions: int, memory_limit: str) -> dict:
    with tempfile.TemporaryDirectory(dir=world.parent) as tmp:
        sub = Path(tmp) / "subset"
        kept = subset_world(world, sub, n_admissions)
        summary = build_cohort(
            sub, Path(tmp) / "cohort", include_notes=False, memory_limit=memory_limit, verbose=False
        )
        recipe_s = summary["timings"]["06_measurements"]
        t0 = time.perf_counter()
        with PeakRSS(psutil.Process().pid) as peak:
            expected = pandas_lab_features(sub, Path(tmp) / "cohort")
        pandas_s = time.perf_counter() - t0
        worst = 0.0
        for task in TASKS:
            got = pd.read_parquet(Path(tmp) / "cohort" / f"{task}.parquet").set_index("hadm_id")
            cols = [c for c in got.columns if c.startswith("lab_")]
            exp = expected[task].reindex(columns=cols)
            exp[[c for c in cols if c.endswith("_count")]] = exp[
                [c for c in cols if c.endswith("_count")]
            ].fillna(0)
            a, b = got[cols].to_numpy(np.float64), exp.to_numpy(np.float64)
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                raise SystemExit(f"{task}: recipe and pandas disagree on which lab features are missing")
            rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-6)
            worst = max(worst, float(np.nanmax(rel, initial=0.0)))
    return {"subset_admissions": kept, "recipe_lab_step_s": recipe_s, "recipe_total_s": summary["seconds"],
            "pandas_lab_s": round(pandas_s, 1), "pandas_peak_rss_gb": round(peak.peak / 2**30, 2),
            "ratio_pandas_over_recipe_lab_step": round(pandas_s / max(recipe_s, 1e-9), 2),
            "max_relative_difference": worst}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admissions", type=int, default=400_000)
    parser.add_argument("--lab-rows", type=int, default=50_000_000)
    parser.add_argument("--world", type=Path, default=Path("runs/bench/world"), help="reused when it exists")
    parser.add_argument(
        "--out", type=Path, default=None, help="cohort folder (default: WORLD-cohort, removed after)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-limit", default="6GB")
    parser.add_argument("--pandas-admissions", type=int, default=None, help="subset size for the pandas comparison "
                        "(default: min(all, 40000)); 0 skips it")  # fmt: skip
    parser.add_argument("--no-notes", action="store_true", help="time the cohort without notes.parquet")
    args = parser.parse_args(argv)
    counts = ensure_world(args.world, args.admissions, args.lab_rows, args.seed)
    out = args.out or args.world.with_name(args.world.name + "-cohort")
    extra = ["--no-notes"] if args.no_notes else []
    result = {"world": str(args.world), **{k: counts.get(k) for k in ("admissions", "labevents")}}
    result["cohort"] = time_cohort(args.world, out, args.memory_limit, extra)
    n_sub = min(counts["admissions"], 40_000) if args.pandas_admissions is None else args.pandas_admissions
    if n_sub:
        result["pandas_comparison"] = compare_with_pandas(args.world, n_sub, args.memory_limit)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=2))
    c = result["cohort"]
    print(f"cohort: {result['admissions']} admissions, {result['labevents']} lab rows: {c['wall_s']} s, "
          f"peak {c['peak_tree_rss_gb']} GB (targets: <= 900 s, <= 10 GB)")  # fmt: skip
    if n_sub:
        p = result["pandas_comparison"]
        print(f"lab features on {p['subset_admissions']} admissions: pandas {p['pandas_lab_s']} s vs recipe lab step "
              f"{p['recipe_lab_step_s']} s -> ratio {p['ratio_pandas_over_recipe_lab_step']}x "
              f"(max relative difference {p['max_relative_difference']:.1e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
