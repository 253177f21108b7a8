"""Two-dimensional views of embeddings: UMAP layouts (umap-learn, cached on disk) and their figures.

UMAP's first call in a fresh Python process JIT-compiles numba code (~30-45 s on a laptop CPU); later
calls take well under a second for a few thousand points. Layouts are cached with
:func:`ehrclip_kit.cache.disk_cache` keyed by the embedding bytes and the UMAP parameters, so re-running a
notebook reuses them.

``joint_umap`` fits ONE layout on the EHR and note embeddings stacked together, so that both modalities
land in the same 2-D picture (only meaningful for embeddings that live in a shared space, e.g. after the
projection heads of a contrastive model).

The figure builders here (``embedding_scatter``, ``joint_scatter``, ``similarity_heatmap``) are also
available from :mod:`ehrclip_kit.viz`; like all of them they return a figure and display nothing.
"""

from __future__ import annotations

import html
import os
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.colors
import plotly.graph_objects as go

from ehrclip_kit.cache import disk_cache

PALETTE = tuple(plotly.colors.qualitative.D3)
# A column with at most this many distinct values is coloured as categories (one legend entry each).
MAX_CATEGORIES = 12

# Below this many points UMAP's neighbour graph is meaningless; a PCA projection is used instead.
MIN_UMAP_POINTS = 5


def _as_matrix(embeddings: Any, name: str = "embeddings") -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().numpy()
    arr = np.asarray(embeddings, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, d], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN/inf (first at row {bad[0]}, column {bad[1]})")
    return arr


def pca_2d(embeddings: Any) -> np.ndarray:
    """Project onto the first two principal components (zero-padded when fewer exist)."""
    x = _as_matrix(embeddings)
    out = np.zeros((x.shape[0], 2), dtype=np.float32)
    if x.shape[0] < 2:
        return out
    centred = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    out[:, :k] = centred @ vt[:k].T
    return out


def _fit_umap(x: np.ndarray, n_neighbors: int, min_dist: float, seed: int, metric: str) -> np.ndarray:
    import umap  # deferred: importing umap-learn alone costs ~10 s

    n_neighbors = max(2, min(n_neighbors, x.shape[0] - 1))
    with warnings.catch_warnings():
        # Seeding UMAP forces a single thread; that is the reproducibility we ask for, not news.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*", category=UserWarning)
        # Small N triggers a spectral-init warning and falls back to random init; both are seeded.
        warnings.filterwarnings("ignore", message=".*[Ss]pectral.*", category=UserWarning)
        reducer = umap.UMAP(
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            n_components=2,
            metric=metric,
            random_state=seed,
            n_jobs=1,
        )
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def umap_2d(
    embeddings: Any,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None | bool = None,
    metric: str = "euclidean",
) -> np.ndarray:
    """UMAP layout of ``embeddings`` [N, d] -> float32 array [N, 2].

    Args:
        embeddings: array or tensor [N, d].
        n_neighbors: UMAP's neighbourhood size (clipped to N - 1).
        min_dist: how tightly UMAP packs points.
        seed: random state; a seeded UMAP is deterministic (and single-threaded).
        cache_dir: cache folder; ``None`` = ``$EHRCLIP_CACHE`` or ``./.cache/ehrclip``; ``False`` = no cache.
        metric: UMAP metric (``"cosine"`` suits L2-normalised projection outputs equally well).

    With fewer than 5 points UMAP is not defined; the first two principal components are returned and a
    warning says so.
    """
    x = _as_matrix(embeddings)
    if x.shape[0] < MIN_UMAP_POINTS:
        warnings.warn(
            f"umap_2d: only {x.shape[0]} points (< {MIN_UMAP_POINTS}); returning a PCA projection instead of UMAP",
            stacklevel=2,
        )
        return pca_2d(x)
    if x.shape[1] == 2:
        warnings.warn("umap_2d: embeddings are already 2-D; running UMAP on them anyway", stacklevel=2)

    def compute() -> np.ndarray:
        return _fit_umap(x, n_neighbors, min_dist, seed, metric)

    if cache_dir is False:
        return compute()
    key = {
        "method": "umap_2d",
        "x": x,
        "n_neighbors": n_neighbors,
        "min_dist": float(min_dist),
        "seed": seed,
        "metric": metric,
        "umap_version": _umap_version(),
    }
    return disk_cache(None if cache_dir in (None, True) else cache_dir, key, compute, name="umap")


def _umap_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("umap-learn")
    except PackageNotFoundError:
        return "unknown"


def joint_umap(ehr_emb: Any, text_emb: Any, **umap_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """One UMAP fitted on EHR and note embeddings stacked together; returns ``(ehr_xy, text_xy)``.

    Both inputs must live in the same space (same width, e.g. the 128-d shared space after the projection
    heads); rows are split back in order, so ``ehr_xy[i]`` and ``text_xy[j]`` are directly comparable.
    Keyword arguments go to :func:`umap_2d`.
    """
    a = _as_matrix(ehr_emb, "ehr_emb")
    b = _as_matrix(text_emb, "text_emb")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"joint_umap needs embeddings in one shared space: ehr_emb has width {a.shape[1]}, "
            f"text_emb has width {b.shape[1]} (project both with the model's heads first)"
        )
    xy = umap_2d(np.concatenate([a, b], axis=0), **umap_kwargs)
    return xy[: len(a)], xy[len(a) :]


# ---------------------------------------------------------------------------------------- figures
def similarity_heatmap(
    a_emb: Any,
    b_emb: Any,
    labels: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Cosine similarity of every row of ``a_emb`` with every row of ``b_emb`` (e.g. EHR vs note embeddings
    of the same admissions: a bright diagonal means matching pairs are found)."""
    a = np.asarray(a_emb.detach().cpu() if hasattr(a_emb, "detach") else a_emb, dtype=float)
    b = np.asarray(b_emb.detach().cpu() if hasattr(b_emb, "detach") else b_emb, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"similarity_heatmap needs [N, d] and [M, d] arrays, got {a.shape} and {b.shape}")
    if normalize:
        a = a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)
        b = b / np.clip(np.linalg.norm(b, axis=1, keepdims=True), 1e-12, None)
    sim = a @ b.T
    kwargs = {}
    if labels is not None:
        kwargs = {"x": list(labels)[: b.shape[0]], "y": list(labels)[: a.shape[0]]}
    fig = go.Figure(go.Heatmap(z=sim, colorscale="Viridis", colorbar_title="cosine", **kwargs))
    fig.update_layout(
        title=title or "Similarity (rows: a, columns: b)",
        yaxis_autorange="reversed",
        xaxis_title="b",
        yaxis_title="a",
    )
    return fig


def _hover_texts(
    hover_frame: pd.DataFrame | None, note_column: str | None, snippet_chars: int, width: int = 80
) -> list[str] | None:
    if hover_frame is None:
        return None
    cols = [c for c in hover_frame.columns if c != note_column]
    texts = []
    for _, row in hover_frame.iterrows():
        parts = [f"<b>{html.escape(str(c))}</b>: {_fmt(row[c])}" for c in cols]
        if note_column is not None and isinstance(row[note_column], str) and row[note_column]:
            snippet = " ".join(row[note_column].split())[:snippet_chars]
            wrapped = textwrap.wrap(snippet, width=width) or [""]
            parts.append("<i>note</i>: " + "<br>".join(html.escape(line) for line in wrapped) + " …")
        texts.append("<br>".join(parts))
    return texts


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "NaN" if np.isnan(value) else f"{value:.3g}"
    return html.escape(str(value))


def _is_categorical(values: pd.Series) -> bool:
    if (
        isinstance(values.dtype, pd.CategoricalDtype)
        or values.dtype == bool
        or not pd.api.types.is_numeric_dtype(values)
    ):
        return True
    return values.nunique(dropna=True) <= MAX_CATEGORIES and bool(
        np.all(np.mod(values.dropna().to_numpy(float), 1) == 0)
    )


def embedding_scatter(
    xy: Any,
    color: Any = None,
    hover_frame: pd.DataFrame | None = None,
    title: str | None = None,
    note_column: str | None = None,
    snippet_chars: int = 240,
    color_name: str | None = None,
    marker_size: int = 6,
    ids: Any = None,
) -> go.Figure:
    """2-D scatter of an embedding layout (e.g. from :func:`ehrclip_kit.embeddings_view.umap_2d`).

    ``color``: values per point; categories (strings, booleans, small integer sets) get one trace each with a
    legend entry, continuous values one trace with a colour bar. ``hover_frame``: one row per point; its
    columns are shown on hover, and ``note_column`` (if given) as a note snippet wrapped to 80 characters.
    ``ids`` (one per point, e.g. row numbers) are attached as ``customdata`` so click handlers can tell
    which row a point is. Uses SVG scatter (not WebGL) so the points exist in the page's DOM.
    """
    xy = np.asarray(xy, dtype=float)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"embedding_scatter needs xy of shape [N, 2], got {xy.shape}")
    n = len(xy)
    if hover_frame is not None:
        if len(hover_frame) != n:
            raise ValueError(f"hover_frame has {len(hover_frame)} rows but xy has {n} points")
        if note_column is not None and note_column not in hover_frame.columns:
            raise ValueError(
                f"note_column {note_column!r} is not a column of hover_frame {list(hover_frame.columns)}"
            )
    texts = _hover_texts(hover_frame, note_column, snippet_chars)
    texts_arr = np.asarray(texts if texts is not None else [""] * n, dtype=object)
    ids_arr = np.arange(n) if ids is None else np.asarray(ids)
    if len(ids_arr) != n:
        raise ValueError(f"ids has {len(ids_arr)} values but xy has {n} points")
    marker = {"size": marker_size, "opacity": 0.8, "line": {"width": 0}}
    fig = go.Figure()
    if color is None:
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", marker=marker, hovertext=texts_arr,
                                 hoverinfo="text", name="points", showlegend=False, customdata=ids_arr))  # fmt: skip
    else:
        values = pd.Series(
            np.asarray(color, dtype=object) if not isinstance(color, pd.Series) else color.to_numpy()
        )
        if len(values) != n:
            raise ValueError(f"color has {len(values)} values but xy has {n} points")
        values = values.infer_objects()
        if _is_categorical(values):
            labels = values.astype(str).where(values.notna(), "missing")
            for i, cat in enumerate(sorted(labels.unique(), key=_natural_key)):
                idx = np.flatnonzero((labels == cat).to_numpy())
                fig.add_trace(
                    go.Scatter(
                        x=xy[idx, 0],
                        y=xy[idx, 1],
                        mode="markers",
                        name=cat,
                        hovertext=texts_arr[idx],
                        hoverinfo="text",
                        marker={**marker, "color": PALETTE[i % 10]},
                        customdata=ids_arr[idx],
                    )  # fmt: skip
                )
        else:
            fig.add_trace(
                go.Scatter(
                    x=xy[:, 0],
                    y=xy[:, 1],
                    mode="markers",
                    hovertext=texts_arr,
                    hoverinfo="text",
                    showlegend=False,
                    customdata=ids_arr,
                    marker={
                        **marker,
                        "color": values.to_numpy(float),
                        "colorscale": "Viridis",
                        "showscale": True,
                        "colorbar": {"title": color_name or ""},
                    },
                    name=color_name or "value",
                )  # fmt: skip
            )
    fig.update_layout(
        title=title, xaxis={"title": "UMAP 1", "showticklabels": False}, yaxis={"title": "UMAP 2", "showticklabels": False},
        legend_title_text=color_name, hoverlabel={"align": "left"}, height=560,
    )  # fmt: skip
    return fig


def _natural_key(label: str) -> tuple:
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def joint_scatter(
    ehr_xy: Any, text_xy: Any, pair_lines: int = 20, seed: int = 0, title: str | None = None
) -> go.Figure:
    """EHR and note points of one joint layout (:func:`ehrclip_kit.embeddings_view.joint_umap`) in one
    picture, with a line joining ``pair_lines`` randomly chosen matching (EHR, note) pairs: short lines mean
    the shared space brings an admission and its own note together."""
    a, b = np.asarray(ehr_xy, float), np.asarray(text_xy, float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"joint_scatter needs two [N, 2] layouts of equal N, got {a.shape} and {b.shape}")
    fig = go.Figure()
    pick = np.random.default_rng(seed).permutation(len(a))[: min(pair_lines, len(a))]
    if len(pick):
        xs = np.column_stack([a[pick, 0], b[pick, 0], np.full(len(pick), np.nan)]).ravel()
        ys = np.column_stack([a[pick, 1], b[pick, 1], np.full(len(pick), np.nan)]).ravel()
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "grey", "width": 1}, name="same admission",
                                 hoverinfo="skip"))  # fmt: skip
    for xy, name, colour, symbol in ((a, "EHR", PALETTE[0], "circle"), (b, "note", PALETTE[1], "diamond")):
        fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", name=name, customdata=np.arange(len(xy)),
                                 marker={"color": colour, "symbol": symbol, "size": 6, "opacity": 0.75},
                                 hovertemplate=name + " row %{customdata}<extra></extra>"))  # fmt: skip
    fig.update_layout(title=title or "EHR and notes in the shared space", height=560,
                      xaxis={"showticklabels": False}, yaxis={"showticklabels": False})  # fmt: skip
    return fig
