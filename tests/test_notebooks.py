"""The teaching notebooks: stored without outputs, and every one executes headless with tiny parameters.

The slow part runs ``ehrclip_kit.demo.run_demo`` once per session (papermill, the same path as
``make demo``) on a tiny shared world, then checks what each notebook recorded in ``OUT/<nn>_metrics.json``
with loose bounds, and the demo's summary page. Note embeddings go to ``$EHRCLIP_CACHE`` (set by
conftest.py), so the frozen text model embeds the tiny world's notes once per checkout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pytest

from ehrclip_kit import notebook_support as nbs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# Tiny parameters: each notebook reads them as EHRCLIP_NB_<NAME> (07 reads the shared ones it needs).
TINY = {
    "PATIENTS": "150", "SEED": "0", "EPOCHS": "8", "FT_EPOCHS": "6", "MASKED_EPOCHS": "4", "SEEDS": "2",
    "FRACTIONS": "0.5,1.0", "METHODS": "xgboost,random,masked+contrastive", "N_EXPLAIN": "8", "N_BACKGROUND": "5",
    "KERNEL_SAMPLES": "300", "STABILITY_SEEDS": "2", "SAMPLE": "300", "FT_SEEDS": "2", "FT_MIN_STEPS": "5",
}  # fmt: skip
TINY_ENV = {f"EHRCLIP_NB_{k}": v for k, v in TINY.items()}


def tracked_notebooks() -> list[Path]:
    """Notebooks in git (all present ones when git is unavailable, e.g. in an unpacked sdist)."""
    try:
        out = subprocess.run(["git", "ls-files", "notebooks/*.ipynb"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        out = []
    return sorted({ROOT / p for p in out} | set(NOTEBOOKS.glob("*.ipynb")))


ALL = tracked_notebooks()


# ------------------------------------------------------------------------------------- fast checks
@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_and_follows_the_practices(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs or execution counts (strip them)"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name}: no 'parameters' cell"
    assert "learning goals" in nb.cells[0].source.lower(), f"{path.name}: must open with learning goals"
    assert "exercises" in nb.cells[-1].source.lower(), f"{path.name}: must end with exercises"


def test_param_reads_typed_environment_values(monkeypatch):
    monkeypatch.setenv("EHRCLIP_NB_PATIENTS", "42")
    monkeypatch.setenv("EHRCLIP_NB_TEXT_SIGNAL", "0")
    monkeypatch.setenv("EHRCLIP_NB_FLAG", "off")
    monkeypatch.delenv("EHRCLIP_NB_SEED", raising=False)
    assert nbs.param("PATIENTS", 500) == 42 and nbs.param("TEXT_SIGNAL", 0.8) == 0.0
    assert nbs.param("FLAG", True) is False and nbs.param("SEED", 7) == 7
    assert nbs.notebook_params(patients=1, seed=3) == {"patients": 42, "seed": 3}
    monkeypatch.setenv("EHRCLIP_NB_EPOCHS", "three")
    with pytest.raises(ValueError, match="EHRCLIP_NB_EPOCHS"):
        nbs.param("EPOCHS", 20)


def test_resolve_out_and_record_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not inside a checkout: relative paths start at the working directory
    out = nbs.resolve_out("runs/x")
    assert out == tmp_path / "runs" / "x" and out.is_dir()
    path = nbs.record_metrics(out, "99", {"a": np.float32(0.5), "b": np.arange(2), "c": {"d": np.int64(3)}})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1], "c": {"d": 3}}


def test_error_groups_and_by_feature():
    import pandas as pd

    rows = pd.DataFrame({"hadm_id": [1, 2, 3, 4], "age": [30.0, 60.0, 80.0, 45.0], "label": [0, 1, 0, 1],
                         "lab_a_count": [0, 2, 3, np.nan], "lab_b_count": [1, 0, 2, 0]})  # fmt: skip
    notes = pd.DataFrame({"hadm_id": [1, 2, 3, 4], "text": ["a", "bb", "ccc", "dddd"]})
    groups = nbs.error_groups(rows, notes)
    assert list(groups["age"]) == ["<50", "50-70", ">70", "<50"]
    assert list(groups["labs measured"]) == ["few labs", "few labs", "many labs", "few labs"]
    assert list(groups["note length"]) == ["short", "short", "medium", "long"]

    class Pre:  # the two attributes by_feature reads from a TabularPreprocessor
        columns = ["x", "y", "y__missing"]
        column_features = ["x", "y", "y"]

    summed = nbs.by_feature(pd.Series([0.1, 0.2, 0.3], index=Pre.columns), Pre)
    assert summed.to_dict() == pytest.approx({"x": 0.1, "y": 0.5})


# ------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Every notebook executed once, in order, through the demo runner (papermill + nbconvert HTML)."""
    from ehrclip_kit.demo import run_demo

    out = tmp_path_factory.mktemp("notebooks")
    cwd = os.getcwd()
    try:
        os.chdir(out)  # kernels and relative paths never touch the checkout
        rc = run_demo(out, NOTEBOOKS, env={**TINY_ENV, "EHRCLIP_NB_OUT": str(out)}, timeout=900)
    finally:
        os.chdir(cwd)
    timings = json.loads((out / "timings.json").read_text())
    return out, rc, timings


def metrics_of(out: Path, name: str) -> dict:
    path = out / f"{name}_metrics.json"
    assert path.is_file(), f"{path.name} was not written"
    return json.loads(path.read_text())


def in_unit(x) -> bool:
    return isinstance(x, int | float) and 0.0 <= x <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("0[0-7]_*.ipynb")), ids=lambda p: p.stem)
def test_notebook_executes_with_tiny_parameters(demo_run, path):
    out, _, timings = demo_run
    run = timings["notebooks"].get(path.stem)
    assert run is not None, f"{path.name} was not run"
    assert run["error"] is None, f"{path.name} failed: {run['error']} (executed copy: {out / path.name})"
    assert (out / f"{path.stem}.html").is_file(), "no HTML export"
    executed = nbformat.read(out / path.name, as_version=4)
    errors = [
        o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors


@pytest.mark.slow
def test_00_tour_metrics(demo_run):
    m = metrics_of(demo_run[0], "00")
    assert m["patients"] == int(TINY["PATIENTS"]) and m["n_train"] > m["n_val"] > 0
    assert all(in_unit(v) for v in m["auroc"].values()) and set(m["auroc"]) == {
        "random",
        "masked+contrastive",
        "xgboost",
    }
    assert m["auroc"]["xgboost"] > 0.5, "boosted trees see no signal in the synthetic world"
    assert in_unit(m["val_ehr2text_R@10"]) and in_unit(m["knn_auroc_heart_failure"])


@pytest.mark.slow
def test_01_data_metrics(demo_run):
    m = metrics_of(demo_run[0], "01")
    assert m["n_features"] > 100 and all(r > 50 for r in m["rows"].values())
    assert all(0 < p < 1 for p in m["positive_rate"].values()) and m["note_chunks"] >= 1
    # the leakage demo: discharge notes of critical_24h positives say "expired" far more often
    assert m["leak_expired"]["1"] > m["leak_expired"]["0"] + 0.05


@pytest.mark.slow
def test_02_masked_metrics(demo_run):
    m = metrics_of(demo_run[0], "02")
    assert m["n_transferred"] == m["n_encoder_tensors"] > 50, (
        "every encoder weight must come from pretraining"
    )
    assert m["median_nmse"] < m["median_nmse_untrained"], (
        "pretraining must reconstruct better than no training"
    )
    assert m["epochs_run"] >= 1 and m["columns_per_patient"] > 0


@pytest.mark.slow
def test_03_contrastive_metrics(demo_run):
    m = metrics_of(demo_run[0], "03")
    assert m["train_ehr2text_R@10"] > m["train_chance_R@10"], "the model does not even fit its training pairs"
    assert all(in_unit(m[k]) for k in ("test_ehr2text_R@10", "test_text2ehr_R@10", "untrained_ehr2text_R@10"))
    assert 1.0 <= m["logit_scale_last"] <= 100.0 + 1e-3
    toy = m["temperature_toy"]  # sharp temperature: matching pairs far below chance, unrelated far above
    assert toy["matching_at_100"] < toy["chance"] < toy["unrelated_at_100"]


@pytest.mark.slow
def test_04_finetuning_metrics(demo_run):
    m = metrics_of(demo_run[0], "04")
    for method, auroc in m["auroc"].items():
        lo, hi = m["auroc_ci"][method]
        assert 0 <= lo <= auroc <= hi <= 1, method
        assert 0 <= m["brier"][method] <= 1
    n_methods, n_fractions = len(TINY["METHODS"].split(",")), len(TINY["FRACTIONS"].split(","))
    assert m["ablation_runs"] == n_methods * n_fractions * int(TINY["SEEDS"])
    assert m["frozen_parameters"] > 0 and m["finetune_epochs_run"] >= 1


@pytest.mark.slow
def test_05_embedding_views_metrics(demo_run):
    m = metrics_of(demo_run[0], "05")
    assert 0 < m["n_points"] <= int(TINY["SAMPLE"])
    assert set(m["knn_auroc"]) >= {
        "random",
        "masked",
        "masked+contrastive",
        "shared space: EHR",
        "notes (frozen MiniLM)",
    }
    values = [v for per in m["knn_auroc"].values() for v in per.values()]
    assert all(math.isnan(v) or 0 <= v <= 1 for v in values)
    # the notes state the hidden conditions (text signal 0.8): their own embedding must see heart failure
    assert m["knn_auroc"]["notes (frozen MiniLM)"]["heart failure"] > 0.55


@pytest.mark.slow
def test_06_feature_importance_metrics(demo_run):
    m = metrics_of(demo_run[0], "06")
    assert all(err < m["shap_tolerance"] for err in m["shap_additivity_error"].values()), "SHAP must add up"
    assert all(v > 0 for v in m["categorical_shap_sum"].values()), "categorical columns must get attribution"
    assert all(-1 <= v <= 1 for v in m["stability_spearman"].values())
    assert all(-1 <= v <= 1 for v in m["truth_spearman"].values())
    assert all(0 <= v <= 1 for v in m["truth_top_k_precision"].values())


@pytest.mark.slow
def test_07_metrics_if_present(demo_run):
    if not any(NOTEBOOKS.glob("07_*.ipynb")):
        pytest.skip("notebooks/07_*.ipynb does not exist yet")
    m = metrics_of(demo_run[0], "07")
    assert all(in_unit(v) for v in m.get("zero_shot_macro_auroc", {}).values())


@pytest.mark.slow
def test_demo_summary_page(demo_run):
    out, rc, timings = demo_run
    page = (out / "summary.html").read_text()
    assert "Total wall time" in page and "AUROC" in page
    assert "00_umap.html" in page and (out / "00_umap.html").is_file()
    assert set(timings["notebooks"]) == {p.stem for p in NOTEBOOKS.glob("0[0-7]_*.ipynb")}
    assert rc == (1 if any(t["error"] for t in timings["notebooks"].values()) else 0)
