"""Figure builders, save_figure, the embedding explorer and the UMAP helpers."""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from ehrclip_kit import viz
from ehrclip_kit.embeddings_view import joint_umap, pca_2d, umap_2d
from ehrclip_kit.widgets import EmbeddingExplorer, figure_widget_available

RNG = np.random.default_rng(0)


def _n_points(fig: go.Figure) -> int:
    return sum(len(t.x) for t in fig.data if t.type == "scatter" and t.mode == "markers")


def test_attrition_funnel_and_sankey():
    att = pd.DataFrame(
        {
            "task": ["readmission_30d"] * 3 + ["critical_24h"],
            "step": ["admissions", "adults", "alive at discharge", "admissions"],
            "n_before": [100, 100, 90, 100],
            "n_excluded": [0, 10, 5, 0],
            "n_after": [100, 90, 85, 100],
            "reason": ["", "age < 18", "died in hospital", ""],
        }
    )
    fig = viz.attrition_funnel(att, "readmission_30d")
    assert len(fig.data) == 1 and list(fig.data[0].x) == [100, 100, 90, 85]
    assert "age &lt; 18" in fig.data[0].hovertext[2]
    sankey = viz.attrition_funnel(att, "readmission_30d", kind="sankey")
    link = sankey.data[0].link
    assert list(link.value) == [100, 90, 10, 85, 5]  # kept and excluded flows; no empty exclusion
    assert list(link.source) == [0, 1, 1, 2, 2] and list(link.target) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="pass task="):
        viz.attrition_funnel(att)
    with pytest.raises(ValueError, match="missing column"):
        viz.attrition_funnel(att.drop(columns="reason"), "readmission_30d")


def _summary() -> pd.DataFrame:
    rows = []
    for task in ("readmission_30d", "critical_24h"):
        for m, method in enumerate(("xgboost", "contrastive")):
            for f in (0.01, 0.1, 1.0):
                mean = 0.6 + 0.05 * m + 0.1 * f
                rows.append(dict(task=task, method=method, label_fraction=f, metric="auroc", mean=mean,
                                 ci_low=mean - 0.02 - f / 100, ci_high=mean + 0.03, n=5))  # fmt: skip
                rows.append(dict(task=task, method=method, label_fraction=f, metric="auprc", mean=0.3,
                                 ci_low=0.2, ci_high=0.4, n=5))  # fmt: skip
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # unsorted on purpose


def test_label_efficiency_bands_equal_ci_columns():
    summary = _summary()
    fig = viz.label_efficiency(summary, task="readmission_30d")
    assert fig.layout.xaxis.type == "log"
    bands = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(bands) == len(lines) == 2
    for band, line in zip(bands, lines, strict=True):
        part = summary[
            (summary.task == "readmission_30d") & (summary.method == line.name) & (summary.metric == "auroc")
        ]
        part = part.sort_values("label_fraction")
        np.testing.assert_allclose(line.x, part.label_fraction)
        np.testing.assert_allclose(line.y, part["mean"])
        np.testing.assert_allclose(band.y[:3], part.ci_high)
        np.testing.assert_allclose(band.y[3:], part.ci_low.to_numpy()[::-1])
        np.testing.assert_allclose(np.asarray(line.y) + line.error_y.array, part.ci_high)
        np.testing.assert_allclose(np.asarray(line.y) - line.error_y.arrayminus, part.ci_low)
    both = viz.label_efficiency(summary)  # one panel per task
    assert len(both.data) == 8 and both.layout.xaxis2.type == "log"
    with pytest.raises(ValueError, match="no rows for metric"):
        viz.label_efficiency(summary, metric="brier")


def test_training_and_logit_scale_curves():
    history = [
        {"step": s, "loss": 4.0 / (s + 1), "ehr_text/logit_scale": np.log(1 / 0.07) + 0.01 * s, "lr": 1e-4}
        for s in range(10)
    ]
    history += [{"step": 9, "epoch": 0, "val/recall@1": 0.2}]
    fig = viz.training_curves(history)
    assert {t.name for t in fig.data} == {"loss", "ehr_text/logit_scale", "lr", "val/recall@1"}
    recall = next(t for t in fig.data if t.name == "val/recall@1")
    assert len(recall.x) == 1  # rows without the key are not plotted as gaps
    scale = viz.logit_scale_curve(history)
    assert len(scale.data) == 1
    np.testing.assert_allclose(scale.data[0].y[0], 1 / 0.07, rtol=1e-6)  # logs were exponentiated


def test_heatmap_calibration_ood_reconstruction_and_rank_heatmap():
    a = RNG.normal(size=(6, 8))
    fig = viz.similarity_heatmap(a, a, labels=[f"p{i}" for i in range(6)])
    np.testing.assert_allclose(np.diag(np.asarray(fig.data[0].z)), 1.0)
    curves = {
        "m1": pd.DataFrame({"bin_mean_pred": [0.1, 0.5], "frac_pos": [0.12, 0.4], "count": [10, 20]}),
        # the layout written by ehrclip_kit.evaluation.calibration_curve
        "m2": pd.DataFrame(
            {
                "mean_pred": [0.2, 0.6],
                "observed": [0.1, 0.7],
                "count": [5, 5],
                "observed_lo": [0.0, 0.5],
                "observed_hi": [0.3, 0.9],
            }
        ),  # fmt: skip
    }
    cal = viz.calibration_plot(curves)
    assert len(cal.data) == 3
    np.testing.assert_allclose(cal.data[2].error_y.array, [0.2, 0.2])
    ood = viz.ood_histograms(
        {"knn": (RNG.normal(size=50), RNG.normal(3, 1, size=40)), "maha": ([0, 1], [2, 3])}
    )
    assert len(ood.data) == 4 and "AUROC 1.000" in ood.layout.annotations[1].text
    rec = viz.reconstruction_error_bars(pd.Series({"a": 0.1, "b": 0.5, "c": 0.3}), top_k=2)
    assert list(rec.data[0].y) == ["c", "b"]  # top 2, largest drawn on top
    corr = pd.DataFrame([[1, 0.5], [0.5, 1]], index=["tabnet", "shap"], columns=["tabnet", "shap"])
    heat = viz.rank_correlation_heatmap(corr)
    assert np.asarray(heat.data[0].z).shape == (2, 2) and heat.data[0].zmin == -1


def test_embedding_scatter_categories_continuous_and_hover():
    xy = RNG.normal(size=(30, 2))
    note = "Brief hospital course: " + "the patient was admitted with worsening dyspnea and edema " * 6
    hover = pd.DataFrame({"age": np.arange(30) + 40.5, "label": [0, 1] * 15, "text": [note] * 30})
    fig = viz.embedding_scatter(xy, color=[0, 1] * 15, hover_frame=hover, title="t", note_column="text")
    assert len(fig.data) == 2 and _n_points(fig) == 30
    text = fig.data[0].hovertext[0]
    assert "<b>age</b>" in text and "dyspnea" in text
    lines = text.split("<i>note</i>: ")[1].split("<br>")
    assert len(lines) > 1 and all(len(line) <= 82 for line in lines)  # wrapped to ~80 characters
    assert sorted(np.concatenate([t.customdata for t in fig.data]).tolist()) == list(range(30))
    cont = viz.embedding_scatter(xy, color=np.linspace(20, 90, 30), color_name="age")
    assert len(cont.data) == 1 and cont.data[0].marker.showscale
    with pytest.raises(ValueError, match="hover_frame has 3 rows"):
        viz.embedding_scatter(xy, hover_frame=hover.head(3))
    joint = viz.joint_scatter(xy, xy + 0.1, pair_lines=5)
    assert len(joint.data) == 3 and len(joint.data[1].x) == 30


def test_importance_bars_and_ecg():
    imp = {
        "tabnet": pd.Series({"a": 0.5, "b": 0.3, "c": 0.2}),
        "shap": pd.Series({"a": 2.0, "b": 6.0, "d": 2.0}),
    }
    fig = viz.importance_bars(imp, top_k=4)
    assert len(fig.data) == 2
    assert list(fig.data[0].y) == list(fig.data[1].y)  # one shared feature order across panels
    assert list(fig.data[1].y)[-1] == "b"  # highest mean normalised importance on top
    np.testing.assert_allclose([sum(t.x) for t in fig.data], 1.0)  # each method normalised to sum 1
    np.testing.assert_allclose(fig.data[1].x[list(fig.data[1].y).index("c")], 0.0)  # absent feature -> 0
    assert len(viz.importance_bars(imp, top_k=2).data[0].y) == 2
    sig = RNG.normal(size=(12, 500))
    ecg = viz.ecg_12lead(sig, fs=100)
    assert len(ecg.data) == 12 and len(ecg.data[0].x) == 500
    assert ecg.data[3].name == "aVR" and ecg.data[3].xaxis == "x2"  # 3x4: aVR heads the second column
    six = viz.ecg_12lead(sig.T, fs=100, layout="6x2", seconds=2.5)  # wfdb's [T, 12] accepted
    assert len(six.data) == 12 and len(six.data[0].x) == 250
    with pytest.raises(ValueError, match="leads"):
        viz.ecg_12lead(sig[:5], fs=100)


def test_save_figure_html_atomic_and_png_reported(tmp_path, monkeypatch):
    fig = viz.similarity_heatmap(np.eye(3), np.eye(3))
    out = viz.save_figure(fig, tmp_path / "sub" / "fig.html", tmp_path / "sub" / "fig.png")
    html_text = (tmp_path / "sub" / "fig.html").read_text()
    assert "plotly" in html_text.lower() and len(html_text) > 100_000  # self-contained (plotly.js inside)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]
    if out["png"] is None:
        print(f"PNG export unavailable here: {out['png_error']}")
    else:
        assert (tmp_path / "sub" / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a broken browser must not crash the caller: notice printed, html kept, png reported missing
    def broken(*args, **kwargs):
        raise RuntimeError("no chromium")

    monkeypatch.setattr(go.Figure, "write_image", broken)
    out = viz.save_figure(fig, tmp_path / "b.html", tmp_path / "b.png")
    assert out["png"] is None and "no chromium" in out["png_error"]
    assert (tmp_path / "b.html").exists() and not (tmp_path / "b.png").exists()

    # a failing HTML write leaves the previous file untouched
    monkeypatch.setattr(go.Figure, "write_html", broken)
    with pytest.raises(RuntimeError):
        viz.save_figure(fig, tmp_path / "b.html")
    assert (tmp_path / "b.html").read_text().startswith("<!doctype html>")


def _meta(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "hadm_id": np.arange(n) + 1000,
            "label": RNG.integers(0, 2, n),
            "cond_heart_failure": RNG.integers(0, 2, n),
            "age": RNG.uniform(20, 90, n).round(1),
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
            "text": [f"note {i}: chest pain and dyspnea " * 3 for i in range(n)],
        }
    )


def test_explorer_controls_change_the_figure():
    n = 60
    meta = _meta(n)
    views = {"random": RNG.normal(size=(n, 2)), "contrastive": RNG.normal(size=(n, 2)) + 5}
    emb = RNG.normal(size=(n, 8))
    ex = EmbeddingExplorer(views, meta, hover_columns=["hadm_id", "age"], note_column="text", sample_size=40,
                           retrieval=(emb, emb + 0.01 * RNG.normal(size=(n, 8))), use_figure_widget=False)  # fmt: skip
    assert _n_points(ex.figure) == 40
    before = ex.figure
    ex.color.value = "age"  # continuous -> a single trace with a colour scale
    assert len(ex.figure.data) == 1 and ex.figure.data[0].marker.showscale and ex.figure is not before
    x_random = sorted(ex.figure.data[0].x)
    ex.stage.value = "contrastive"
    assert min(ex.figure.data[0].x) > min(x_random) + 2  # the other stage's coordinates are drawn
    ex.color.value = "split"
    assert {t.name for t in ex.figure.data} == {"test", "train"}
    ex.sample.value = 25
    assert _n_points(ex.figure) == 25
    assert set(ex.shown_rows()) <= set(np.random.default_rng(0).permutation(n)[:40])  # nested subsets
    assert "note" in ex.figure.data[0].hovertext[0] and "<b>hadm_id</b>" in ex.figure.data[0].hovertext[0]
    # retrieval: near-copies of the query embeddings, so each patient's own note comes first
    table = ex.nearest_notes(7, k=3)
    assert table.note_row.iloc[0] == 7 and table.own_note.iloc[0] and len(table) == 3
    ex.patient.value = 11
    assert "ranks 1 of 60" in ex.results.value and "note 11" in ex.results.value


@pytest.mark.skipif(not figure_widget_available(), reason="plotly FigureWidget needs the anywidget package")
def test_explorer_with_figure_widget():
    n = 30
    ex = EmbeddingExplorer({"a": RNG.normal(size=(n, 2))}, _meta(n), use_figure_widget=True)
    ex.color.value = "split"
    assert {t.name for t in ex.plot.data} == {"test", "train"}


def test_pca_fallback_and_joint_split(tmp_path):
    with pytest.warns(UserWarning, match="PCA"):
        xy = umap_2d(RNG.normal(size=(4, 6)), cache_dir=tmp_path)
    assert xy.shape == (4, 2)
    a, b = RNG.normal(size=(2, 6)), RNG.normal(size=(2, 6))
    with pytest.warns(UserWarning, match="PCA"):
        ea, eb = joint_umap(a, b, cache_dir=tmp_path)
    np.testing.assert_allclose(np.vstack([ea, eb]), pca_2d(np.vstack([a, b])), atol=1e-5)
    with pytest.raises(ValueError, match="shared space"):
        joint_umap(a, RNG.normal(size=(2, 5)))
    with pytest.raises(ValueError, match="NaN"):
        umap_2d(np.full((10, 3), np.nan))


@pytest.mark.slow
def test_umap_separates_clusters_and_is_cached(tmp_path):
    # UMAP's first call JIT-compiles numba code (~30-45 s), hence `slow`
    centres = np.repeat(np.eye(16)[:2] * 10, 100, axis=0)
    x = centres + RNG.normal(size=(200, 16))
    t0 = time.time()
    xy = umap_2d(x, seed=0, cache_dir=tmp_path)
    first = time.time() - t0
    assert xy.shape == (200, 2) and xy.dtype == np.float32
    gap = np.linalg.norm(xy[:100].mean(0) - xy[100:].mean(0))
    spread = max(xy[:100].std(0).max(), xy[100:].std(0).max())
    assert gap > 3 * spread  # the two clusters stay apart
    t0 = time.time()
    again = umap_2d(x, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(xy, again)
    assert time.time() - t0 < first / 5 and len(os.listdir(tmp_path)) == 2  # one entry (+ its meta file)
    ehr_xy, txt_xy = joint_umap(x[:100], x[100:] + 0.01, cache_dir=tmp_path, seed=0)
    assert ehr_xy.shape == txt_xy.shape == (100, 2)
