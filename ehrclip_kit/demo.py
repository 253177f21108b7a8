"""``make demo``: the main job on the built-in synthetic world.

Generates a small synthetic world, builds the cohort with the MIMIC-IV recipe and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd


def run_data_path(out: Path, patients: int, seed: int, text_signal: float) -> dict:
    from ehrclip_kit.data.recipes import build_cohort
    from ehrclip_kit.data.synthetic import generate_world

    world, cohort = out / "world", out / "cohort"
    t0 = time.perf_counter()
    generate_world(world, n_patients=patients, seed=seed, text_signal=text_signal)
    t1 = time.perf_counter()
    build_cohort(world, cohort)
    t2 = time.perf_counter()
    summary = {"world_seconds": round(t1 - t0, 1), "cohort_seconds": round(t2 - t1, 1)}
    for task in ("readmission_30d", "critical_24h"):
        frame = pd.read_parquet(cohort / f"{task}.parquet")
        summary[task] = {
            "rows": len(frame),
            "positive_rate": round(float(frame["label"].mean()), 3),
            "splits": frame["split"].value_counts().to_dict(),
            "features": frame.shape[1] - 4,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-signal", type=float, default=0.8)
    args = parser.parse_args(argv)
    summary = run_data_path(args.out, args.patients, args.seed, args.text_signal)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
