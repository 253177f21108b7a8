"""``make demo``: run the teaching notebooks 00 → 07 on the default world and write a one-page summary.

``python -m ehrclip_kit.demo --out runs/demo`` executes every notebook of ``notebooks/`` in order with
papermill (one shared synthetic world and cache under ``OUT``), writes each executed notebook and its HTML
export (nbconvert) to ``OUT``, then ``OUT/summary.html``: the AUROC tables, the UMAP picture and the
feature-importance comparison, with the time each notebook took. A notebook that does not exist yet is
skipped with a notice; a failing one is reported and the others still run (the exit status is then 1).

Parameters go to the notebooks through their ``EHRCLIP_NB_*`` environment variables, so
``--patients 200`` shrinks every notebook at once.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ehrclip_kit.io import atomic_path, write_json

# The tour's slots: a missing one is skipped with a notice, so the demo runs while notebooks are written.
PLOTLY_MIME = "application/vnd.plotly.v1+json"
SLOTS = ("00", "01", "02", "03", "04", "05", "06", "07")
# Figures the notebooks save beside their metrics (``viz.save_figure``), shown on the summary page.
FIGURES = (("00_umap.html", "UMAP of test admissions (masked + contrastive encoder)"),
           ("04_label_efficiency.html", "Label efficiency (AUROC, 95 % CI over seeds)"),
           ("06_importance.html", "Feature importance: TabNet masks and SHAP, pretrained vs baseline"))  # fmt: skip


def find_notebooks(folder: Path) -> tuple[list[Path], list[str]]:
    """The notebook of each slot present in ``folder`` (first match of ``NN_*.ipynb``) and the missing slots."""
    found, missing = [], []
    for slot in SLOTS:
        matches = sorted(folder.glob(f"{slot}_*.ipynb"))
        if matches:
            found.append(matches[0])
        else:
            missing.append(slot)
    return found, missing


def execute(notebook: Path, out: Path, env: dict[str, str], timeout: int = 1800) -> tuple[float, str | None]:
    """Run one notebook with papermill into ``out`` and export HTML; returns (seconds, error or None).

    Each notebook runs in its own ``python -m papermill`` process (a fresh kernel manager every time; a
    long-lived client that had started several kernels once waited forever on a silent kernel here), and
    ``timeout`` bounds the whole notebook so the demo never hangs.
    """
    target = out / notebook.name
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(target), "--cwd", str(out), "--kernel", "python3",
           "--no-progress-bar", "--execution-timeout", str(timeout)]  # fmt: skip
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
        error = None if done.returncode == 0 else _papermill_error(done.stderr)
    except subprocess.TimeoutExpired:
        error = f"TimeoutExpired: {notebook.name} ran longer than {timeout} s"
    seconds = time.perf_counter() - t0
    if target.exists():  # written even when a cell failed: the traceback is in it
        export_html(target, target.with_suffix(".html"))
    return seconds, error


def _papermill_error(stderr: str) -> str:
    """The exception line papermill prints for a failing cell (else the last line of its output)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Exception encountered at") and i + 1 < len(lines):
            found = [
                x for x in lines[i + 1 :] if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", x)
            ]
            if found:
                return found[-1][:500]
    return (lines[-1] if lines else "papermill failed without output")[:500]


def export_html(notebook: Path, target: Path) -> None:
    """nbconvert's HTML export of an executed notebook, written atomically, with the plotly figures drawn.

    Kernels emit figures as plotly's JSON mimetype (JupyterLab draws them); nbconvert does not, so each gets
    an HTML form that loads ``plotly.min.js`` from beside the page (written once; no network needed).
    """
    import nbformat
    import plotly.io as pio
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    figures = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIME in data and "text/html" not in data:
                data["text/html"] = pio.to_html(dict(data[PLOTLY_MIME]), full_html=False, include_plotlyjs="directory",
                                                validate=False)  # fmt: skip
                figures += 1
    bundle = target.parent / "plotly.min.js"
    if figures and not bundle.exists():
        from plotly.offline import get_plotlyjs

        with atomic_path(bundle) as tmp:
            tmp.write_text(get_plotlyjs(), encoding="utf-8")
    body, _ = HTMLExporter().from_notebook_node(nb)
    with atomic_path(target) as tmp:
        tmp.write_text(body, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- summary
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def auroc_tables(out: Path) -> list[tuple[str, pd.DataFrame]]:
    """AUROC tables from the notebooks' outputs: the tour's single run and the ablation grid over seeds."""
    tables = []
    tour = _read_json(out / "00_metrics.json")
    if tour and "auroc" in tour:
        tables.append(("Tour (00): test AUROC, one seed, all labels",
                       pd.Series(tour["auroc"], name="AUROC").round(3).to_frame()))  # fmt: skip
    finetune = _read_json(out / "04_metrics.json")
    if finetune and "auroc_ci" in finetune:
        ci = pd.DataFrame(finetune["auroc_ci"], index=["95% CI low", "95% CI high"]).T
        tables.append(("Fine-tuning (04): test AUROC with bootstrap CI",
                       pd.concat([pd.Series(finetune["auroc"], name="AUROC"), ci], axis=1).round(3)))  # fmt: skip
    grid = out / "04_ablation_results.csv"
    if grid.is_file():
        runs = pd.read_csv(grid)
        cell = runs.groupby(["method", "label_fraction"])["auroc"].agg(["mean", "std", "count"]).round(3)
        tables.append(("Ablation grid (04): test AUROC over seeds", cell.rename(columns={"count": "seeds"})))
    return tables


def write_summary(out: Path, timings: dict[str, dict], missing: Sequence[str], total: float) -> Path:
    """``OUT/summary.html``: timings, AUROC tables and the saved figures (iframes), in one page."""
    rows = "".join(
        f"<tr><td><a href='{html.escape(name)}.html'>{html.escape(name)}</a></td><td>{t['seconds']:.0f} s</td>"
        f"<td>{html.escape(t['error'] or 'ok')}</td></tr>"
        for name, t in timings.items()
    )
    parts = [
        "<h1>ehrclip_kit demo</h1>",
        f"<p>Total wall time: <b>{total / 60:.1f} min</b>. Missing notebooks: {', '.join(missing) or 'none'}.</p>",
        f"<table border=1 cellpadding=4><tr><th>notebook</th><th>time</th><th>status</th></tr>{rows}</table>",
    ]
    for title, table in auroc_tables(out):
        parts.append(f"<h2>{html.escape(title)}</h2>{table.to_html(border=1)}")
    for name, title in FIGURES:
        if (out / name).is_file():
            parts.append(f"<h2>{html.escape(title)}</h2><iframe src='{name}' width='100%' height='620' "
                         "style='border:none'></iframe>")  # fmt: skip
    importance = _read_json(out / "06_metrics.json")
    if importance:
        shown = {k: importance.get(k) for k in ("spearman_mask_vs_shap", "spearman_pretrained_vs_baseline_shap",
                                                "truth_spearman", "shap_additivity_error")}  # fmt: skip
        parts.append(
            f"<h2>Importance comparison (06)</h2><pre>{html.escape(json.dumps(shown, indent=2, ensure_ascii=False))}</pre>"
        )
    page = "<!doctype html><html><head><meta charset='utf-8'><title>ehrclip_kit demo</title></head><body>"
    path = out / "summary.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page + "\n".join(parts) + "</body></html>", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- main
def run_demo(
    out: Path, notebooks: Path, env: dict[str, str], only: Sequence[str] = (), timeout: int = 1800
) -> int:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    found, missing = find_notebooks(notebooks)
    for slot in missing:
        print(f"NOTICE: no notebooks/{slot}_*.ipynb yet; skipped")
    if only:
        found = [nb for nb in found if nb.name[:2] in only]
    env = {"EHRCLIP_NB_OUT": str(out), **env}
    timings: dict[str, dict] = {}
    t0 = time.perf_counter()
    for notebook in found:
        print(f"running {notebook.name} ...", flush=True)
        seconds, error = execute(notebook, out, env, timeout)
        timings[notebook.stem] = {"seconds": round(seconds, 1), "error": error}
        print(f"  {notebook.stem}: {seconds:.0f} s {'FAILED: ' + error if error else 'ok'}", flush=True)
    total = time.perf_counter() - t0
    write_json(
        out / "timings.json", {"total_seconds": round(total, 1), "notebooks": timings, "missing": missing}
    )
    summary = write_summary(out, timings, missing, total)
    print(f"demo wall time: {total:.0f} s ({total / 60:.1f} min); summary: {summary}")
    failed = [name for name, t in timings.items() if t["error"]]
    if failed:
        print(f"FAILED notebooks: {', '.join(failed)} (see their executed copies in {out})", file=sys.stderr)
    return 1 if failed else 0


def default_notebooks() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)"
    )
    parser.add_argument("--notebooks", type=Path, default=default_notebooks(), help="folder of NN_*.ipynb")
    parser.add_argument(
        "--patients", type=int, default=None, help="patients of the shared world (EHRCLIP_NB_PATIENTS)"
    )
    parser.add_argument("--seed", type=int, default=None, help="EHRCLIP_NB_SEED")
    parser.add_argument("--only", default="", help="comma list of notebook numbers to run, e.g. 00,05")
    parser.add_argument(
        "--timeout", type=int, default=1800, help="seconds one notebook may run (default 1800)"
    )
    args = parser.parse_args(argv)
    if not args.notebooks.is_dir():
        parser.error(f"notebook folder {args.notebooks} not found")
    env = {
        k: str(v)
        for k, v in (("EHRCLIP_NB_PATIENTS", args.patients), ("EHRCLIP_NB_SEED", args.seed))
        if v is not None
    }
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    return run_demo(args.out, args.notebooks, env, only, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
