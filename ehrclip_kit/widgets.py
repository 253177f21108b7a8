"""An ipywidgets explorer over 2-D embedding layouts: pick the encoder stage, what to colour by, how many
points, and look up the notes nearest to one patient.

``EmbeddingExplorer`` *is* an ``ipywidgets.VBox``: end a notebook cell with it to show it. Its plot is a
plotly ``FigureWidget`` when ``anywidget`` is installed (plotly >= 6 builds FigureWidget on anywidget; then
clicking a point selects that patient), otherwise an ``ipywidgets.Output`` that re-renders a ``go.Figure``
on every change. Either way ``explorer.figure`` is the current ``go.Figure`` and changing a control calls
:meth:`EmbeddingExplorer.update`, so the behaviour can be tested without a browser.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ehrclip_kit import viz
from ehrclip_kit.embeddings_view import umap_2d

DEFAULT_COLOR_OPTIONS = ("label", "cond_heart_failure", "age", "split")


def figure_widget_available() -> bool:
    """True when plotly's FigureWidget can be built (plotly >= 6 needs the ``anywidget`` package)."""
    try:
        import anywidget  # noqa: F401
    except ImportError:
        return False
    return True


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


class EmbeddingExplorer(widgets.VBox):
    """Explore embedding layouts of the same admissions from several encoder stages.

    Args:
        views: stage name -> ``[N, 2]`` layout, or ``[N, d]`` embeddings (laid out with
            :func:`ehrclip_kit.embeddings_view.umap_2d`, cached, the first time the stage is shown).
        meta: one row per admission, aligned with every view (label, conditions, age, split, note text...).
        color_options: columns of ``meta`` offered in "colour by" (missing ones are dropped).
        hover_columns: columns shown on hover (default: the colour options present).
        note_column: column of ``meta`` with the note text (hover snippet, retrieval results).
        sample_size: points shown at first (a fixed seeded subset; the slider grows or shrinks it).
        retrieval: optional ``(query_emb [N, d], note_emb [N, d])`` in one shared space, row i of both
            belonging to admission i: the retrieval box lists the notes nearest (cosine) to a patient.
        top_k: notes listed by the retrieval box.
        umap_kwargs: passed to ``umap_2d`` for views given as embeddings.
    """

    def __init__(
        self,
        views: Mapping[str, Any],
        meta: pd.DataFrame,
        color_options: Sequence[str] = DEFAULT_COLOR_OPTIONS,
        hover_columns: Sequence[str] | None = None,
        note_column: str | None = None,
        sample_size: int = 1000,
        seed: int = 0,
        retrieval: tuple[Any, Any] | None = None,
        top_k: int = 5,
        umap_kwargs: Mapping[str, Any] | None = None,
        use_figure_widget: bool | None = None,
    ):
        if not views:
            raise ValueError("EmbeddingExplorer needs at least one view")
        self.meta = meta.reset_index(drop=True)
        n = len(self.meta)
        self._raw = {}
        for name, value in views.items():
            arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float32)
            if arr.ndim != 2 or len(arr) != n:
                raise ValueError(
                    f"view {name!r} has shape {arr.shape}; expected [{n}, d] rows aligned with meta"
                )
            self._raw[name] = arr
        self._layouts: dict[str, np.ndarray] = {}
        self.umap_kwargs = dict(umap_kwargs or {})
        colours = [c for c in color_options if c in self.meta.columns]
        if not colours:
            raise ValueError(
                f"none of color_options {list(color_options)} is a column of meta {list(meta.columns)}"
            )
        if note_column is not None and note_column not in self.meta.columns:
            raise ValueError(f"note_column {note_column!r} is not a column of meta")
        self.hover_columns = list(hover_columns) if hover_columns is not None else colours
        missing = [c for c in self.hover_columns if c not in self.meta.columns]
        if missing:
            raise ValueError(f"hover_columns {missing} are not columns of meta")
        self.note_column, self.top_k = note_column, int(top_k)
        self._order = np.random.default_rng(seed).permutation(
            n
        )  # fixed order: a bigger sample keeps the points

        self.stage = widgets.Dropdown(options=list(self._raw), description="encoder stage")
        self.color = widgets.Dropdown(options=colours, description="colour by")
        low = min(n, 20)
        self.sample = widgets.IntSlider(value=min(sample_size, n), min=low, max=n, step=max(1, n // 100),
                                        description="sample size", continuous_update=False)  # fmt: skip
        self.figure: go.Figure = go.Figure()
        self.use_figure_widget = figure_widget_available() if use_figure_widget is None else use_figure_widget
        self.plot = go.FigureWidget() if self.use_figure_widget else widgets.Output()

        children: list[widgets.Widget] = [widgets.HBox([self.stage, self.color, self.sample]), self.plot]
        self.retrieval = None
        if retrieval is not None:
            q, d = (
                np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
                for v in retrieval
            )
            if q.shape[0] != n or d.shape[0] != n or q.shape[1] != d.shape[1]:
                raise ValueError(
                    f"retrieval embeddings must be [{n}, d] each in one space, got {q.shape}, {d.shape}"
                )
            self.retrieval = (_unit_rows(q), _unit_rows(d))
            self.patient = widgets.BoundedIntText(
                value=int(self._order[0]), min=0, max=n - 1, description="patient row"
            )
            self.results = widgets.HTML()
            self.patient.observe(lambda _: self.show_nearest(), names="value")
            children.append(widgets.VBox([widgets.HTML("<b>Nearest notes</b>"), self.patient, self.results]))
        super().__init__(children=children)
        for control in (self.stage, self.color, self.sample):
            control.observe(lambda _: self.update(), names="value")
        self.update()
        if self.retrieval is not None:
            self.show_nearest()

    # ------------------------------------------------------------------------------------------ plot
    def layout_of(self, stage: str) -> np.ndarray:
        """The [N, 2] layout of ``stage`` (computed with UMAP once when the view holds embeddings)."""
        if stage not in self._layouts:
            raw = self._raw[stage]
            self._layouts[stage] = raw if raw.shape[1] == 2 else umap_2d(raw, **self.umap_kwargs)
        return self._layouts[stage]

    def shown_rows(self) -> np.ndarray:
        """Row numbers (into ``meta``) of the points currently drawn."""
        return self._order[: self.sample.value]

    def build_figure(self) -> go.Figure:
        rows = self.shown_rows()
        hover_cols = list(
            dict.fromkeys([*self.hover_columns, *([self.note_column] if self.note_column else [])])
        )
        fig = viz.embedding_scatter(
            self.layout_of(self.stage.value)[rows],
            color=self.meta[self.color.value].to_numpy()[rows],
            hover_frame=self.meta.iloc[rows][hover_cols].reset_index(drop=True),
            note_column=self.note_column,
            title=f"{self.stage.value}: coloured by {self.color.value} ({len(rows)} admissions)",
            color_name=self.color.value,
            ids=rows,
        )
        return fig

    def update(self) -> None:
        """Rebuild the figure from the current control values and show it."""
        self.figure = self.build_figure()
        if self.use_figure_widget:
            with self.plot.batch_update():
                self.plot.data = []
                self.plot.add_traces(list(self.figure.data))
                self.plot.layout = self.figure.layout
            if self.retrieval is not None:
                for trace in self.plot.data:
                    trace.on_click(self._on_click)
        elif _in_kernel():
            from IPython.display import clear_output, display

            with self.plot:
                clear_output(wait=True)
                display(self.figure)

    def _on_click(self, trace, points, _state) -> None:
        if points.point_inds:
            self.patient.value = int(trace.customdata[points.point_inds[0]])

    # ------------------------------------------------------------------------------------- retrieval
    def nearest_notes(self, row: int, k: int | None = None) -> pd.DataFrame:
        """The ``k`` notes whose embeddings are most cosine-similar to patient ``row``'s query embedding.

        Columns: rank, note_row, cosine, own_note (the patient's own note), snippet.
        """
        if self.retrieval is None:
            raise ValueError("this explorer was built without retrieval=(query_emb, note_emb)")
        q, d = self.retrieval
        if not 0 <= row < len(q):
            raise IndexError(f"patient row {row} is outside 0..{len(q) - 1}")
        k = min(k or self.top_k, len(d))
        sims = d @ q[row]
        best = np.argsort(-sims, kind="stable")[:k]
        notes = self.meta[self.note_column] if self.note_column else pd.Series([""] * len(d))
        return pd.DataFrame(
            {
                "rank": np.arange(1, k + 1),
                "note_row": best,
                "cosine": sims[best],
                "own_note": best == row,
                "snippet": [" ".join(str(notes.iloc[i]).split())[:300] for i in best],
            }
        )

    def show_nearest(self) -> None:
        """Fill the retrieval box for the patient in the text box."""
        row = int(self.patient.value)
        table = self.nearest_notes(row)
        own_rank = (
            int(
                np.flatnonzero(
                    np.argsort(-(self.retrieval[1] @ self.retrieval[0][row]), kind="stable") == row
                )[0]
            )
            + 1
        )
        items = "".join(
            f"<tr><td>{r.rank}</td><td>{r.note_row}</td><td>{r.cosine:.3f}</td>"
            f"<td>{'&#10003;' if r.own_note else ''}</td><td>{html.escape(r.snippet)}</td></tr>"
            for r in table.itertuples()
        )
        self.results.value = (
            f"<div>patient row {row}: its own note ranks {own_rank} of {len(self.meta)}</div>"
            "<table><tr><th>#</th><th>note row</th><th>cosine</th><th>own</th><th>snippet</th></tr>"
            f"{items}</table>"
        )
