"""Plotly figure builders for every picture the notebooks show.

Each builder takes plain arrays / DataFrames and returns a ``plotly.graph_objects.Figure``; nothing here
displays anything (a notebook cell ends with the figure, or calls ``fig.show()``). ``save_figure`` writes a
self-contained HTML file atomically and, when a Chromium is available to kaleido, a PNG.

>>> import numpy as np
>>> fig = similarity_heatmap(np.eye(3), np.eye(3))
>>> fig.data[0].z.shape
(3, 3)
"""

from __future__ import annotations

import html
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ehrclip_kit.embeddings_view import embedding_scatter, joint_scatter, similarity_heatmap
from ehrclip_kit.io import atomic_path

__all__ = [
    "attrition_funnel", "training_curves", "logit_scale_curve", "label_efficiency", "calibration_plot",
    "similarity_heatmap", "ood_histograms", "embedding_scatter", "joint_scatter", "importance_bars",
    "rank_correlation_heatmap", "reconstruction_error_bars", "ecg_12lead", "save_figure",
]  # fmt: skip

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
PALETTE = tuple(plotly.colors.qualitative.D3)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {list(frame.columns)}")


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# --------------------------------------------------------------------------------------------- cohort
def attrition_funnel(attrition_df: pd.DataFrame, task: str | None = None, kind: str = "funnel") -> go.Figure:
    """The cohort flow of ``attrition.csv`` (columns task, step, n_before, n_excluded, n_after, reason).

    ``kind="funnel"`` draws the admissions left after each step; ``kind="sankey"`` also shows where the
    excluded ones went. With several tasks in the file, ``task`` picks one (required then).
    """
    _require(attrition_df, ["task", "step", "n_before", "n_excluded", "n_after", "reason"], "attrition table")
    tasks = list(dict.fromkeys(attrition_df["task"].astype(str)))
    if task is None:
        if len(tasks) != 1:
            raise ValueError(f"attrition table holds tasks {tasks}; pass task=")
        task = tasks[0]
    rows = attrition_df[attrition_df["task"].astype(str) == str(task)]
    if rows.empty:
        raise ValueError(f"no attrition rows for task {task!r}; tasks present: {tasks}")
    steps = rows["step"].astype(str).tolist()
    reasons = rows["reason"].fillna("").astype(str).tolist()
    n_after = rows["n_after"].astype(int).tolist()
    n_excl = rows["n_excluded"].astype(int).tolist()
    start = int(rows["n_before"].iloc[0])
    if kind == "funnel":
        hover = ["all admissions in the source"] + [
            f"{s}<br>excluded {e:,}: {html.escape(r)}" for s, e, r in zip(steps, n_excl, reasons, strict=True)
        ]
        fig = go.Figure(
            go.Funnel(
                y=["start", *steps],
                x=[start, *n_after],
                textinfo="value+percent initial",
                hovertext=hover,
                hoverinfo="text",
            )
        )
    elif kind == "sankey":
        # one "kept" node per step chained from the start, plus an "excluded" node where a step dropped any
        labels, src, dst, val = ["start"], [], [], []
        prev = 0
        for s, e, a, r in zip(steps, n_excl, n_after, reasons, strict=True):
            labels.append(f"{s} ({a:,})")
            src, dst, val = src + [prev], dst + [len(labels) - 1], val + [a]
            kept = len(labels) - 1
            if e > 0:
                labels.append(f"excluded: {r or s} ({e:,})")
                src, dst, val = src + [prev], dst + [len(labels) - 1], val + [e]
            prev = kept
        fig = go.Figure(
            go.Sankey(node={"label": labels, "pad": 12}, link={"source": src, "target": dst, "value": val})
        )
    else:
        raise ValueError(f"kind must be 'funnel' or 'sankey', got {kind!r}")
    fig.update_layout(title=f"Cohort flow: {task}", height=120 + 45 * (len(steps) + 1))
    return fig


# ------------------------------------------------------------------------------------------- training
def training_curves(history: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> go.Figure:
    """Curves of a trainer history (list of dicts, one per logged step or epoch).

    The x axis is ``step`` when present, else ``epoch``, else the row number. Every numeric key (or only
    ``keys``) becomes one line; losses, schedule values (lr, logit scale) and other metrics get separate
    rows so their scales don't squash each other.
    """
    frame = pd.DataFrame(list(history))
    if frame.empty:
        raise ValueError("training_curves: history is empty")
    xkey = next((k for k in ("step", "global_step", "epoch") if k in frame.columns), None)
    x = frame[xkey] if xkey else pd.Series(np.arange(len(frame)))
    if keys is None:
        keys = [
            c for c in frame.columns
            if c not in {"step", "global_step", "epoch"} and pd.api.types.is_numeric_dtype(frame[c])
        ]  # fmt: skip
    else:
        _require(frame, keys, "training history")

    def group(key: str) -> str:
        low = key.lower()
        if "loss" in low:
            return "loss"
        if low.endswith("lr") or "logit_scale" in low or "learning_rate" in low:
            return "schedule"
        return "metrics"

    groups = [g for g in ("loss", "metrics", "schedule") if any(group(k) == g for k in keys)]
    if not groups:
        raise ValueError(f"training_curves: no numeric keys to plot in {list(frame.columns)}")
    fig = make_subplots(
        rows=len(groups), cols=1, shared_xaxes=True, subplot_titles=groups, vertical_spacing=0.08
    )
    for i, key in enumerate(keys):
        ok = frame[key].notna()
        fig.add_trace(
            go.Scatter(
                x=x[ok], y=frame.loc[ok, key], mode="lines+markers", name=key, line_color=PALETTE[i % 10]
            ),
            row=groups.index(group(key)) + 1,
            col=1,
        )
    fig.update_xaxes(title_text=xkey or "row", row=len(groups), col=1)
    fig.update_layout(title="Training curves", height=260 * len(groups) + 80)
    return fig


def logit_scale_curve(history: Sequence[Mapping[str, Any]], log_space: bool | None = None) -> go.Figure:
    """The learned CLIP scale (1 / temperature) per contrastive space over training.

    Reads every ``*logit_scale*`` key of the history. ``log_space`` says whether the logged values are the
    log of the scale (the parameter) or the scale itself; ``None`` infers it (values all <= log(100) are
    taken as logs). Dashed lines mark the usual start 1/0.07 and the clamp 100.
    """
    frame = pd.DataFrame(list(history))
    keys = [c for c in frame.columns if "logit_scale" in c]
    if not keys:
        raise ValueError(
            f"logit_scale_curve: no '*logit_scale*' key in history columns {list(frame.columns)}"
        )
    xkey = next((k for k in ("step", "global_step", "epoch") if k in frame.columns), None)
    x = frame[xkey] if xkey else pd.Series(np.arange(len(frame)))
    if log_space is None:
        log_space = bool(np.nanmax(frame[keys].to_numpy(dtype=float)) <= math.log(100) + 1e-6)
    fig = go.Figure()
    for i, key in enumerate(keys):
        ok = frame[key].notna()
        vals = frame.loc[ok, key].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=x[ok],
                y=np.exp(vals) if log_space else vals,
                mode="lines",
                name=key,
                line_color=PALETTE[i % 10],
            )
        )
    for y, text in ((1 / 0.07, "init 1/0.07"), (100.0, "clamp 100")):
        fig.add_hline(y=y, line_dash="dash", line_color="grey", annotation_text=text)
    fig.update_layout(
        title="Learned logit scale (1 / temperature)", xaxis_title=xkey or "row", yaxis_title="scale"
    )
    return fig


# ------------------------------------------------------------------------------------- evaluation
def label_efficiency(summary_df: pd.DataFrame, metric: str = "auroc", task: str | None = None) -> go.Figure:
    """Mean ``metric`` against label fraction (log axis) with its 95 % CI as a band, one line per method.

    ``summary_df`` is the ablation's ``summary.csv``: task, method, label_fraction, metric, mean, ci_low,
    ci_high, n. With several tasks (and no ``task``), one panel per task.
    """
    _require(
        summary_df,
        ["task", "method", "label_fraction", "metric", "mean", "ci_low", "ci_high"],
        "summary table",
    )
    rows = summary_df[summary_df["metric"].astype(str).str.lower() == metric.lower()]
    if task is not None:
        rows = rows[rows["task"].astype(str) == str(task)]
    if rows.empty:
        raise ValueError(
            f"summary has no rows for metric={metric!r}, task={task!r}; metrics: "
            f"{sorted(summary_df['metric'].astype(str).unique())}, tasks: {sorted(summary_df['task'].astype(str).unique())}"
        )
    tasks = list(dict.fromkeys(rows["task"].astype(str)))
    methods = list(dict.fromkeys(rows["method"].astype(str)))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for col, t in enumerate(tasks, start=1):
        for i, method in enumerate(methods):
            part = rows[(rows["task"].astype(str) == t) & (rows["method"].astype(str) == method)]
            if part.empty:
                continue
            part = part.sort_values("label_fraction")
            xs = part["label_fraction"].to_numpy(float)
            mean, lo, hi = (part[c].to_numpy(float) for c in ("mean", "ci_low", "ci_high"))
            colour = PALETTE[i % 10]
            fig.add_trace(
                go.Scatter(
                    x=np.concatenate([xs, xs[::-1]]),
                    y=np.concatenate([hi, lo[::-1]]),
                    fill="toself",
                    fillcolor=_rgba(colour, 0.15),
                    line={"width": 0},
                    hoverinfo="skip",
                    legendgroup=method,
                    showlegend=False,
                    name=f"{method} 95% CI",
                ),
                row=1,
                col=col,
            )
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=mean,
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    line_color=colour,
                    error_y={"type": "data", "array": hi - mean, "arrayminus": mean - lo, "visible": True},
                    customdata=np.stack([lo, hi], axis=1),
                    hovertemplate=f"{method}<br>labels %{{x:.1%}}<br>{metric} %{{y:.3f}} "
                    "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(type="log", title_text="label fraction")
    fig.update_yaxes(title_text=f"{metric.upper()} (mean, 95% CI)", col=1)
    fig.update_layout(title=f"Label efficiency ({metric.upper()})")
    return fig


def calibration_plot(curves: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Reliability diagram: per method, observed positive rate against mean predicted probability per bin.

    ``curves`` maps method -> DataFrame with (bin_mean_pred, frac_pos, count) or, as written by
    :func:`ehrclip_kit.evaluation.calibration_curve`, (mean_pred, observed, count[, observed_lo,
    observed_hi]); CI columns become error bars. Marker area follows the bin count; the dashed diagonal is
    perfect calibration.
    """
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "grey"}, name="ideal")
    )
    for i, (method, curve) in enumerate(curves.items()):
        curve = curve.rename(columns={"mean_pred": "bin_mean_pred", "observed": "frac_pos"})
        _require(curve, ["bin_mean_pred", "frac_pos", "count"], f"calibration curve of {method!r}")
        count = curve["count"].to_numpy(float)
        size = 6 + 14 * np.sqrt(count / max(count.max(), 1))
        error_y = None
        if {"observed_lo", "observed_hi"} <= set(curve.columns):
            obs = curve["frac_pos"].to_numpy(float)
            error_y = {"type": "data", "array": curve["observed_hi"].to_numpy(float) - obs,
                       "arrayminus": obs - curve["observed_lo"].to_numpy(float)}  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=curve["bin_mean_pred"],
                y=curve["frac_pos"],
                mode="lines+markers",
                name=method,
                marker={"size": size},
                line_color=PALETTE[i % 10],
                error_y=error_y,
                customdata=count,
                hovertemplate=f"{method}<br>predicted %{{x:.3f}}<br>observed %{{y:.3f}}<br>n=%{{customdata:.0f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Calibration", xaxis_title="mean predicted probability", yaxis_title="fraction positive",
        xaxis_range=[0, 1], yaxis_range=[0, 1],
    )  # fmt: skip
    return fig


def ood_histograms(scores: Mapping[str, tuple[Any, Any]], nbins: int = 40) -> go.Figure:
    """Overlaid histograms of in- vs out-of-distribution scores, one panel per scoring method.

    Each panel title carries the AUROC of separating out (positive) from in by the score.
    """
    from sklearn.metrics import roc_auc_score

    titles = []
    for name, (s_in, s_out) in scores.items():
        y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
        auroc = (
            roc_auc_score(y, np.r_[np.asarray(s_in, float), np.asarray(s_out, float)])
            if len(set(y)) == 2
            else math.nan
        )
        titles.append(f"{name} (AUROC {auroc:.3f})")
    fig = make_subplots(rows=1, cols=max(len(scores), 1), subplot_titles=titles)
    for col, (name, (s_in, s_out)) in enumerate(scores.items(), start=1):
        for vals, label, colour in (
            (s_in, "in-distribution", PALETTE[0]),
            (s_out, "out-of-distribution", PALETTE[3]),
        ):
            fig.add_trace(
                go.Histogram(
                    x=np.asarray(vals, float),
                    name=label,
                    nbinsx=nbins,
                    opacity=0.6,
                    marker_color=colour,
                    legendgroup=label,
                    showlegend=col == 1,
                    histnorm="probability density",
                ),  # fmt: skip
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=name, row=1, col=col)
    fig.update_layout(barmode="overlay", title="Out-of-distribution scores")
    return fig


# ------------------------------------------------------------------------------------ importance
def importance_bars(
    importances: Mapping[str, pd.Series], top_k: int = 20, normalize: bool = True
) -> go.Figure:
    """Feature importances of several methods side by side (one panel each, shared feature axis).

    Features are the ``top_k`` by mean normalised importance over methods, in that order, so the panels are
    read across. ``normalize`` rescales each method to sum of |importance| = 1 (TabNet masks and mean |SHAP|
    live on different scales).
    """
    if not importances:
        raise ValueError("importance_bars: no importances given")
    table = pd.DataFrame({name: s.astype(float) for name, s in importances.items()}).fillna(0.0)
    if normalize:
        table = table.abs() / table.abs().sum(axis=0).replace(0, 1.0)
    order = table.abs().mean(axis=1).sort_values(ascending=False).index[:top_k]
    table = table.loc[order[::-1]]  # plotly draws horizontal bars bottom-up
    fig = make_subplots(rows=1, cols=len(importances), shared_yaxes=True, subplot_titles=list(importances))
    for col, name in enumerate(table.columns, start=1):
        fig.add_trace(
            go.Bar(
                x=table[name],
                y=[str(i) for i in table.index],
                orientation="h",
                name=name,
                marker_color=PALETTE[(col - 1) % 10],
                showlegend=False,
            ),  # fmt: skip
            row=1,
            col=col,
        )
    fig.update_layout(
        title="Feature importance" + (" (normalised)" if normalize else ""), height=140 + 22 * len(table)
    )
    return fig


def rank_correlation_heatmap(matrix_df: pd.DataFrame, title: str = "Rank correlation") -> go.Figure:
    """A labelled heatmap of a square correlation matrix (e.g. Spearman between importance methods)."""
    z = matrix_df.to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in matrix_df.columns],
            y=[str(i) for i in matrix_df.index],
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            texttemplate="%{z:.2f}",
            colorbar_title="rho",
        )  # fmt: skip
    )
    fig.update_layout(title=title, yaxis_autorange="reversed")
    return fig


def reconstruction_error_bars(
    series: pd.Series, top_k: int | None = 30, title: str | None = None
) -> go.Figure:
    """Per-feature reconstruction error of masked pretraining, largest first (``top_k`` of them)."""
    s = pd.Series(series, dtype=float).sort_values(ascending=False)
    if top_k is not None:
        s = s.iloc[:top_k]
    s = s.iloc[::-1]
    fig = go.Figure(
        go.Bar(x=s.to_numpy(), y=[str(i) for i in s.index], orientation="h", marker_color=PALETTE[0])
    )
    fig.update_layout(
        title=title or "Reconstruction error per feature",
        xaxis_title=s.name or "error",
        height=140 + 20 * len(s),
    )
    return fig


# -------------------------------------------------------------------------------------------- ECG
def ecg_12lead(signal: Any, fs: float, leads: Sequence[str] | None = None, layout: str = "3x4",
               seconds: float | None = None, title: str | None = None) -> go.Figure:  # fmt: skip
    """A 12-lead ECG as 12 small panels (``layout`` "3x4": the clinical 4 columns of 3 leads; "6x2": limb
    leads left, chest leads right). ``signal`` is [12, T] (or wfdb's [T, 12]) in mV, ``fs`` in Hz."""
    leads = list(leads or STANDARD_LEADS)
    sig = np.asarray(signal, dtype=float)
    if sig.ndim != 2:
        raise ValueError(f"ecg_12lead needs a 2-D signal [leads, T], got {sig.shape}")
    if sig.shape[0] != len(leads) and sig.shape[1] == len(leads):
        sig = sig.T
    if sig.shape[0] != len(leads):
        raise ValueError(f"signal has {sig.shape[0]} leads but {len(leads)} lead names were given")
    if layout not in ("3x4", "6x2"):
        raise ValueError(f"layout must be '3x4' or '6x2', got {layout!r}")
    rows, cols = (3, 4) if layout == "3x4" else (6, 2)
    if len(leads) > rows * cols:
        raise ValueError(f"{len(leads)} leads do not fit a {layout} layout")
    if seconds is not None:
        sig = sig[:, : int(round(seconds * fs))]
    t = np.arange(sig.shape[1]) / fs
    # column-major placement: lead k goes to row k % rows, column k // rows
    titles = [""] * (rows * cols)
    for k, name in enumerate(leads):
        titles[(k % rows) * cols + k // rows] = name
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes=True,
                        vertical_spacing=0.06, horizontal_spacing=0.03)  # fmt: skip
    for k, name in enumerate(leads):
        fig.add_trace(
            go.Scatter(
                x=t, y=sig[k], mode="lines", line={"width": 1, "color": "black"}, name=name, showlegend=False
            ),
            row=k % rows + 1,
            col=k // rows + 1,
        )
    fig.update_xaxes(showgrid=True, gridcolor="#f4c2c2")
    fig.update_yaxes(showgrid=True, gridcolor="#f4c2c2", zeroline=False)
    fig.update_layout(title=title or f"12-lead ECG ({fs:g} Hz)", height=160 * rows + 80, plot_bgcolor="white")
    return fig


# ----------------------------------------------------------------------------------------- saving
def save_figure(fig: go.Figure, path_html: str | os.PathLike, path_png: str | os.PathLike | None = None,
                include_plotlyjs: bool | str = True, scale: float = 2.0) -> dict[str, Any]:  # fmt: skip
    """Write ``fig`` as HTML (atomically; self-contained by default so it opens offline) and optionally PNG.

    The PNG goes through kaleido, which drives a Chromium (found on PATH, or via ``$BROWSER_PATH``). When
    none works, a notice is printed and the PNG is skipped; the return value says what was written:
    ``{"html": Path, "png": Path | None, "png_error": str | None}``.
    """
    path_html = Path(path_html)
    with atomic_path(path_html) as tmp:
        fig.write_html(tmp, include_plotlyjs=include_plotlyjs, full_html=True)
    result: dict[str, Any] = {"html": path_html, "png": None, "png_error": None}
    if path_png is not None:
        path_png = Path(path_png)
        try:
            with atomic_path(path_png) as tmp:
                fig.write_image(tmp, format="png", scale=scale)
            result["png"] = path_png
        # kaleido/choreographer raise many unrelated types (browser missing, sandbox, timeout); the PNG is an
        # optional extra, so any failure becomes a visible notice and a reported error, never a crash.
        except Exception as err:  # noqa: BLE001
            result["png_error"] = f"{type(err).__name__}: {err}"
            print(
                f"NOTICE: PNG export skipped for {path_png} ({result['png_error'][:300]}). kaleido needs a "
                "Chromium: install one (Debian: apt-get install chromium) or set BROWSER_PATH to it. "
                f"The HTML is at {path_html}.",
                file=sys.stderr,
            )
    return result
