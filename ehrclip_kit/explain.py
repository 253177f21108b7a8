"""Which features drive a model: TabNet attention masks, SHAP values, and statistics to compare them.

Everything works on the *preprocessed* float matrix (``TabularPreprocessor.transform``): categorical codes
stored as floats, numeric columns standardised. Models are any ``f(x) -> logit`` (a torch module or a
numpy function); explanations are in logit units.

Two traps this module avoids (both measured on TabNet):

* Gradient-based explainers (shap's Gradient/Deep explainers) give **zero** attribution to a column that
  enters through an ``nn.Embedding`` (an integer lookup has no gradient). ``method="gradient_embedded"``
  therefore explains the model in its *embedded* space (after pytorch-tabnet's ``EmbeddingGenerator``) and
  sums each categorical column's embedding dimensions back onto that column.
* shap's DeepExplainer does not satisfy additivity on TabNet (sparsemax, ghost batch norm), so it is not
  offered. Every result carries ``additivity_error = max |sum(attr) + base - f(x)|`` so the claim is
  checked, not assumed. KernelExplainer and PermutationExplainer are additive by construction (up to
  float error); expected gradients are additive only in expectation (error shrinks with ``nsamples``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from ehrclip_kit.cache import disk_cache

METHODS = ("kernel", "permutation", "gradient_embedded")


# ------------------------------------------------------------------------------------------- helpers
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D feature matrix [N, n_columns], got shape {arr.shape}")
    return arr


def _column_names(columns: Sequence[str] | None, n: int) -> list[str]:
    if columns is None:
        return [f"x{i}" for i in range(n)]
    columns = [str(c) for c in columns]
    if len(columns) != n:
        raise ValueError(f"{len(columns)} column names given for a matrix with {n} columns")
    return columns


def _find_embedder(module: nn.Module) -> nn.Module | None:
    """The single pytorch-tabnet ``EmbeddingGenerator`` inside ``module`` (None when there is none)."""
    from pytorch_tabnet.tab_network import EmbeddingGenerator

    found = [m for m in module.modules() if isinstance(m, EmbeddingGenerator)]
    if len(found) > 1:
        raise ValueError(f"model holds {len(found)} EmbeddingGenerators; pass embedder= explicitly")
    return found[0] if found else None


def reducing_matrix(embedder: nn.Module, n_inputs: int | None = None) -> np.ndarray:
    """``[post_embed_dim, n_inputs]`` 0/1 matrix mapping each embedded dimension to its input column.

    Built with pytorch-tabnet's own ``create_explain_matrix`` from the embedder's real layout (which columns
    are categorical, each embedding's width), so ``values_embedded @ R`` gives each original column, a
    categorical one included, the sum of its embedding dimensions.
    """
    from pytorch_tabnet.utils import create_explain_matrix

    if getattr(embedder, "skip_embedding", False):
        if n_inputs is None:
            raise ValueError("embedder has no categorical columns; pass n_inputs")
        return np.eye(n_inputs)
    continuous = embedder.continuous_idx.detach().cpu().numpy().astype(bool)
    cat_idxs = [int(i) for i in np.flatnonzero(~continuous)]
    emb_dims = [int(e.embedding_dim) for e in embedder.embeddings]
    return create_explain_matrix(len(continuous), emb_dims, cat_idxs, int(embedder.post_embed_dim))


class _Logit(nn.Module):
    """Wrap a model so it returns logits of shape [B, 1] (what shap's torch explainers expect)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.ndim == 2 and out.shape[1] == 1:
            return out
        if out.ndim == 1:
            return out.unsqueeze(1)
        raise ValueError(f"model must return one logit per row ([B] or [B, 1]), got shape {tuple(out.shape)}")


class _EmbeddedModel(nn.Module):
    """``g(e) = f(x)`` with the embedder's output replaced by ``e``: the model seen from its embedded space.

    A forward hook swaps the embedder's output for the given tensor, so any model that routes its input
    through one ``EmbeddingGenerator`` (TabNet does) works without knowing its structure. Call
    :meth:`close` to remove the hook.
    """

    def __init__(self, model: nn.Module, embedder: nn.Module, n_inputs: int):
        super().__init__()
        self.model, self.n_inputs = _Logit(model), n_inputs
        self._override: torch.Tensor | None = None
        self._handle = embedder.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        return output if self._override is None else self._override

    def close(self) -> None:
        self._handle.remove()

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        # zeros are valid for every column (categorical code 0 = unknown); their embedding is discarded
        dummy = torch.zeros(e.shape[0], self.n_inputs, dtype=e.dtype, device=e.device)
        self._override = e
        try:
            return self.model(dummy)
        finally:
            self._override = None


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """shap's Kernel explainer and k-means draw from numpy's global RNG: seed it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _predict_fn(model: nn.Module | Callable, batch_size: int = 4096) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy ``X -> logits [N]`` function from a torch module or a callable."""
    if isinstance(model, nn.Module):
        wrapped = _Logit(model).eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def f(x: np.ndarray) -> np.ndarray:
            outs = []
            with torch.no_grad():
                for start in range(0, len(x), batch_size):
                    xb = torch.as_tensor(
                        np.asarray(x[start : start + batch_size], dtype=np.float32), device=device
                    )
                    outs.append(wrapped(xb)[:, 0].double().cpu().numpy())
            return np.concatenate(outs) if outs else np.zeros(0)

        return f
    if not callable(model):
        raise TypeError(f"expected a torch module or a callable X -> logits, got {type(model).__name__}")

    def g(x: np.ndarray) -> np.ndarray:
        out = np.asarray(model(x), dtype=np.float64)
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        if out.shape != (len(x),):
            raise ValueError(f"predict function must return one value per row, got shape {out.shape}")
        return out

    return g


# ------------------------------------------------------------------------------------------ TabNet masks
def tabnet_masks(
    encoder: nn.Module,
    x: Any,
    columns: Sequence[str] | None = None,
    batch_size: int = 1024,
    return_steps: bool = False,
) -> tuple[pd.Series, np.ndarray] | tuple[pd.Series, np.ndarray, dict[int, np.ndarray]]:
    """TabNet's own explanation, per original column: ``(global_importance, per_row_masks)``.

    ``encoder.forward_masks(x)`` returns ``M_explain`` (mask weighted by each step's output magnitude) in
    the embedded space; like pytorch-tabnet's ``explain`` it is summed back to input columns, so a
    categorical column gets the share of all its embedding dimensions. ``global_importance`` (a Series over
    ``columns``) sums to 1 as pytorch-tabnet's ``feature_importances_``; ``per_row_masks`` [N, n_columns]
    has rows summing to 1 (a row with all-zero attention stays zero). With ``return_steps`` the
    per-step attention masks (also per input column) come third.
    """
    x = _to_numpy(x)
    columns = _column_names(columns, x.shape[1])
    embedder = _find_embedder(encoder)
    was_training = encoder.training
    encoder.eval()
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    explain, steps = [], {}
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                m_explain, masks = encoder.forward_masks(
                    torch.as_tensor(x[start : start + batch_size], device=device)
                )
                explain.append(m_explain.double().cpu().numpy())
                for k, m in masks.items():
                    steps.setdefault(int(k), []).append(m.double().cpu().numpy())
    finally:
        encoder.train(was_training)
    m = np.concatenate(explain)
    reduce = np.eye(x.shape[1])
    if m.shape[1] != x.shape[1]:
        if embedder is None:
            raise ValueError(
                f"forward_masks returned {m.shape[1]} columns for {x.shape[1]} inputs and the encoder has no "
                "EmbeddingGenerator to map them back"
            )
        reduce = reducing_matrix(embedder, x.shape[1])
    per_col = m @ reduce
    total = per_col.sum()
    if total <= 0:
        raise ValueError("TabNet masks are all zero (untrained encoder with dead steps?); nothing to explain")
    global_importance = pd.Series(per_col.sum(axis=0) / total, index=columns, name="tabnet_mask")
    row_sums = per_col.sum(axis=1, keepdims=True)
    per_row = np.divide(per_col, row_sums, out=np.zeros_like(per_col), where=row_sums > 0)
    if return_steps:
        return global_importance, per_row, {k: np.concatenate(v) @ reduce for k, v in sorted(steps.items())}
    return global_importance, per_row


# ---------------------------------------------------------------------------------------------- SHAP
@dataclasses.dataclass
class ShapResult:
    """SHAP attributions of ``f(x)`` (logit units) per row and original column.

    ``values.sum(axis=1) + base_value`` reproduces ``output`` up to ``additivity_error`` (max over rows).
    """

    values: pd.DataFrame
    base_value: float
    output: np.ndarray
    additivity_error: float
    method: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def global_importance(self) -> pd.Series:
        """Mean |SHAP| per column (the usual global summary)."""
        return self.values.abs().mean(axis=0).rename(f"shap_{self.method}")

    def to_dict(self) -> dict[str, Any]:
        """Frames, arrays and JSON values only, so it can go through :func:`ehrclip_kit.cache.disk_cache`."""
        return {
            "values": self.values,
            "base_value": float(self.base_value),
            "output": np.asarray(self.output, dtype=np.float64),
            "additivity_error": float(self.additivity_error),
            "method": self.method,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapResult:
        return cls(
            d["values"], float(d["base_value"]), np.asarray(d["output"]), float(d["additivity_error"]),
            str(d["method"]), dict(d.get("details") or {}),
        )  # fmt: skip


def _summarise_background(
    background: np.ndarray, n_background: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weights): k-means centres snapped to observed values (so categorical codes stay valid)."""
    import shap

    if len(background) <= n_background:
        return background, np.full(len(background), 1.0 / len(background))
    with _numpy_global_seed(seed):
        summary = shap.kmeans(background, n_background, round_values=True)
    return np.asarray(summary.data, dtype=np.float32), np.asarray(summary.weights, dtype=np.float64)


def shap_values(
    predict_fn_or_model: nn.Module | Callable[[np.ndarray], np.ndarray],
    background: Any,
    X: Any,
    columns: Sequence[str] | None = None,
    cat_idxs: Sequence[int] = (),
    method: str = "kernel",
    n_background: int = 20,
    nsamples: int | str = "auto",
    seed: int = 0,
    embedder: nn.Module | None = None,
    n_steps: int = 64,
    max_steps: int = 512,
    rel_tol: float = 0.05,
    cache_dir: Any = False,
) -> ShapResult:
    """SHAP values of a logit model on rows ``X`` against ``background`` rows (same preprocessed layout).

    Methods:
        ``"kernel"`` (default): shap.KernelExplainer over a k-means summary of the background
            (``n_background`` centres, values snapped to observed ones so categorical codes stay valid).
            Model-agnostic: categorical columns are perturbed as codes and get attribution. Additive by
            construction (error ~1e-7). ``nsamples`` coalitions per row ("auto" = 2 * n_columns + 2048;
            every coalition is enumerated when 2**n_columns is smaller, which makes the values exact).
        ``"permutation"``: shap.PermutationExplainer over the same summary (exactly additive; cost grows as
            2 * n_columns * nsamples evaluations per row, nsamples = 10 permutations when "auto").
        ``"gradient_embedded"``: expected gradients of the model seen from its *embedded* space (after the
            pytorch-tabnet ``EmbeddingGenerator``, found automatically or passed as ``embedder``), summed back
            per original column so categorical columns get attribution. Needs a torch module. Computed over
            ``n_background`` background rows with a midpoint rule of ``n_steps`` points per path, doubled
            until ``additivity_error <= rel_tol * std(f(background))`` or ``max_steps`` is reached (TabNet's
            sparsemax makes paths kinked, so it may need hundreds of steps; the error is always reported).
            This is the quantity shap.GradientExplainer samples at random (``nsamples`` draws when an int is
            given, engine recorded in ``details``), computed without sampling noise.

    ``cat_idxs`` names the categorical columns (checked against the model's embedder when it has one).
    ``cache_dir``: ``False`` (default) computes afresh; a folder (or None = ``$EHRCLIP_CACHE``) caches the
    result keyed by the model weights (torch modules only), the data and every setting.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    bg, x = _to_numpy(background), _to_numpy(X)
    if bg.shape[1] != x.shape[1]:
        raise ValueError(f"background has {bg.shape[1]} columns, X has {x.shape[1]}")
    columns = _column_names(columns, x.shape[1])
    bad = [i for i in cat_idxs if not 0 <= int(i) < x.shape[1]]
    if bad:
        raise ValueError(f"cat_idxs {bad} are outside 0..{x.shape[1] - 1}")
    settings = dict(
        method=method, n_background=n_background, nsamples=nsamples, seed=seed, n_steps=n_steps,
        max_steps=max_steps, rel_tol=rel_tol, cat_idxs=[int(i) for i in cat_idxs],
    )  # fmt: skip

    def compute() -> dict[str, Any]:
        was_training = getattr(predict_fn_or_model, "training", None)
        try:
            return _shap(predict_fn_or_model, bg, x, columns, embedder, **settings).to_dict()
        finally:
            if was_training is not None:
                predict_fn_or_model.train(was_training)

    if cache_dir is False:
        return ShapResult.from_dict(compute())
    if not isinstance(predict_fn_or_model, nn.Module):
        raise ValueError("shap_values can only cache results for torch modules (their weights form the key)")
    key = {"what": "shap_values", "state": dict(predict_fn_or_model.state_dict()), "background": bg, "X": x,
           "columns": columns, "settings": settings}  # fmt: skip
    return ShapResult.from_dict(disk_cache(cache_dir, key, compute, name="shap"))


def _shap(
    model, bg, x, columns, embedder, *, method, n_background, nsamples, seed, cat_idxs, **grad
) -> ShapResult:
    import shap

    f = _predict_fn(model)
    fx = f(x)
    details: dict[str, Any] = {}
    if method == "kernel":
        rows, weights = _summarise_background(bg, n_background, seed)
        data = shap.utils._legacy.DenseData(rows, columns, None, weights)
        explainer = shap.KernelExplainer(f, data)
        # l1_reg=False: shap's default keeps only 10 non-zero attributions per row
        with _numpy_global_seed(seed):
            values = explainer.shap_values(x, nsamples=nsamples, silent=True, l1_reg=False)
        values = np.asarray(values, dtype=np.float64)
        base = float(np.asarray(explainer.expected_value).reshape(-1)[0])
        details = {"n_background": len(rows), "nsamples": nsamples}
    elif method == "permutation":
        rows, _ = _summarise_background(bg, n_background, seed)
        masker = shap.maskers.Independent(rows, max_samples=len(rows))
        explainer = shap.PermutationExplainer(f, masker, seed=seed)
        n_perm = 10 if nsamples == "auto" else int(nsamples)
        expl = explainer(x, max_evals=2 * x.shape[1] * n_perm + 1, silent=True)
        values = np.asarray(expl.values, dtype=np.float64)
        base = float(np.mean(expl.base_values))
        details = {"n_background": len(rows), "permutations": n_perm}
    else:
        values, base, details = _gradient_embedded(
            model, bg, x, cat_idxs, n_background, nsamples, seed, embedder, **grad
        )
    values = values.reshape(len(x), -1)
    error = float(np.max(np.abs(values.sum(axis=1) + base - fx))) if len(x) else 0.0
    return ShapResult(pd.DataFrame(values, columns=columns), base, fx, error, method, details)


def _gradient_embedded(
    model, bg, x, cat_idxs, n_background, nsamples, seed, embedder, *, n_steps, max_steps, rel_tol
) -> tuple[np.ndarray, float, dict[str, Any]]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            "method='gradient_embedded' needs a torch module (gradients); use 'kernel' for functions"
        )
    embedder = embedder if embedder is not None else _find_embedder(model)
    if embedder is None:
        raise ValueError(
            "no pytorch-tabnet EmbeddingGenerator in the model; pass embedder= or use method='kernel'"
        )
    reduce = reducing_matrix(embedder, x.shape[1])
    if reduce.shape[1] != x.shape[1]:
        raise ValueError(f"embedder expects {reduce.shape[1]} input columns, data has {x.shape[1]}")
    model_cats = [i for i in range(x.shape[1]) if not getattr(embedder, "skip_embedding", False)
                  and not bool(embedder.continuous_idx[i])]  # fmt: skip
    if cat_idxs and sorted(cat_idxs) != model_cats:
        raise ValueError(
            f"cat_idxs {list(cat_idxs)} disagree with the model's categorical columns {model_cats}"
        )
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # a random subset of real background rows, not k-means centres: an averaged embedding is no category's
    rng = np.random.default_rng(seed)
    rows = bg if len(bg) <= n_background else bg[rng.choice(len(bg), n_background, replace=False)]
    g = _EmbeddedModel(model, embedder, x.shape[1]).eval()
    try:
        with torch.no_grad():
            e_bg = embedder(torch.as_tensor(rows, device=device)).detach()
            e_x = embedder(torch.as_tensor(x, device=device)).detach()
            # the swap must be faithful: g(embed(x)) == f(x), else the model uses x outside the embedder
            direct = _Logit(model)(torch.as_tensor(x[:8], device=device))
            if not torch.allclose(g(e_x[:8]), direct, atol=1e-4, rtol=1e-4):
                raise ValueError(
                    "model output changes when explained from the embedder's output; use method='kernel'"
                )
            g_bg = g(e_bg)[:, 0].double().cpu().numpy()
            g_x = g(e_x)[:, 0].double().cpu().numpy()
        base = float(g_bg.mean())
        scale = max(float(g_bg.std()), 1e-12)
        if nsamples != "auto":  # shap's sampled estimate, for comparison
            import shap

            explainer = shap.GradientExplainer(g, e_bg)
            with _numpy_global_seed(seed):
                vals = explainer.shap_values(e_x, nsamples=int(nsamples), rseed=seed)
            vals = np.asarray(vals[0] if isinstance(vals, list) else vals, dtype=np.float64).reshape(
                len(x), -1
            )
            return vals @ reduce, base, {"engine": "shap.GradientExplainer", "nsamples": int(nsamples)}
        steps = n_steps
        while True:
            vals = _expected_gradients(g, e_x, e_bg, steps)
            rel = float(np.max(np.abs(vals.sum(axis=1) + base - g_x))) / scale if len(x) else 0.0
            if rel <= rel_tol or steps >= max_steps:
                break
            steps *= 2
    finally:
        g.close()
    if rel > rel_tol:
        warnings.warn(
            f"gradient_embedded: additivity error is {rel:.3g} x std(f) after {steps} steps (> rel_tol={rel_tol}); "
            "raise max_steps or use method='kernel'",
            stacklevel=3,
        )
    return (
        vals @ reduce,
        base,
        {"engine": "midpoint", "n_steps": steps, "relative_error": rel, "n_background": len(rows)},
    )


def _expected_gradients(
    g: nn.Module, e_x: torch.Tensor, e_bg: torch.Tensor, n_steps: int, max_rows: int = 16384
) -> np.ndarray:
    """E_b[(x - b) * mean_k grad g(b + a_k (x - b))] over every background row b and midpoints
    a_k = (k + 1/2) / n_steps; the integral form of expected gradients (= integrated gradients averaged over
    baselines). Returns [N, embedded_dim] in float64."""
    alphas = (torch.arange(n_steps, dtype=e_x.dtype, device=e_x.device) + 0.5) / n_steps
    n_bg = len(e_bg)
    chunk = max(1, max_rows // (n_bg * n_steps))
    out = []
    for start in range(0, len(e_x), chunk):
        xb = e_x[start : start + chunk]
        diff = xb[:, None, :] - e_bg[None, :, :]  # [b, n_bg, P]
        points = e_bg[None, :, None, :] + alphas[None, None, :, None] * diff[:, :, None, :]  # [b, n_bg, S, P]
        points = points.reshape(-1, xb.shape[1]).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(g(points).sum(), points)
        mean_grad = grad.reshape(len(xb), n_bg, n_steps, -1).double().mean(dim=2)
        out.append((diff.double() * mean_grad).mean(dim=1).cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------- comparisons
def _aligned(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise ValueError(f"need at least 2 features in common to compare rankings, found {len(common)}")
    return a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)


def rank_agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Spearman and Kendall (tau-b) rank correlation of two importances over their common features.

    >>> s = pd.Series([3.0, 2.0, 1.0], index=["a", "b", "c"])
    >>> rank_agreement(s, s[::-1] * 10)["spearman"]
    1.0
    """
    x, y = _aligned(a, b)
    return {
        "spearman": float(stats.spearmanr(x, y).statistic),
        "kendall": float(stats.kendalltau(x, y).statistic),
        "n": int(len(x)),
    }


def rank_correlation_matrix(importances: Mapping[str, pd.Series], method: str = "spearman") -> pd.DataFrame:
    """Pairwise ``method`` ("spearman" | "kendall") correlation between several importances."""
    if method not in ("spearman", "kendall"):
        raise ValueError(f"method must be 'spearman' or 'kendall', got {method!r}")
    names = list(importances)
    out = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out.loc[a, b] = out.loc[b, a] = rank_agreement(importances[a], importances[b])[method]
    return out


def stability_across_seeds(importances: Sequence[pd.Series], top_k: int = 10) -> pd.DataFrame:
    """How stable each feature's importance is across runs (e.g. seeds): one row per feature.

    Columns: ``mean``, ``std``, ``cv`` (std / mean), ``rank_mean``, ``rank_std`` (rank 1 = most important)
    and ``top_k_frac`` (share of runs in which the feature is in the top ``top_k``), sorted by ``mean``.
    ``frame.attrs["mean_pairwise_spearman"]`` summarises agreement between runs.
    """
    if len(importances) < 2:
        raise ValueError("stability_across_seeds needs importances from at least 2 runs")
    table = pd.concat([s.astype(float) for s in importances], axis=1, join="outer")
    table.columns = range(len(importances))
    table = table.fillna(0.0)
    ranks = table.rank(ascending=False, axis=0, method="average")
    out = pd.DataFrame(
        {
            "mean": table.mean(axis=1),
            "std": table.std(axis=1, ddof=1),
            "rank_mean": ranks.mean(axis=1),
            "rank_std": ranks.std(axis=1, ddof=1),
            "top_k_frac": (ranks <= top_k).mean(axis=1),
        }
    )
    out.insert(2, "cv", out["std"] / out["mean"].where(out["mean"].abs() > 1e-12))
    corr = table.corr(method="spearman").to_numpy()
    out.attrs["mean_pairwise_spearman"] = float(corr[np.triu_indices_from(corr, k=1)].mean())
    return out.sort_values("mean", ascending=False)


def truth_agreement(importance: pd.Series, truth_weights: pd.Series, top_k: int = 10) -> dict[str, float]:
    """Agreement of an importance with the features that truly drive the outcome (synthetic world).

    Compares ranks with |truth_weights| over common features (Spearman, Kendall) and reports
    ``top_k_precision``: the share of the importance's top ``top_k`` that are among the truth's top ``top_k``.
    """
    truth = truth_weights.astype(float).abs()
    result = rank_agreement(importance.astype(float).abs(), truth)
    common = importance.index.intersection(truth.index)
    k = min(top_k, len(common))
    top_imp = set(importance.loc[common].abs().sort_values(ascending=False).index[:k])
    top_truth = set(truth.loc[common].sort_values(ascending=False).index[:k])
    result["top_k_precision"] = len(top_imp & top_truth) / k
    result["top_k"] = k
    return result


def truth_weights_from_outcome(
    features: pd.DataFrame, outcome: Any, categorical: Sequence[str] = ()
) -> pd.Series:
    """Strength of association of each feature column with a true outcome probability (e.g. the world's
    ``p_readmission_30d``): |Spearman rho| for numeric columns, the correlation ratio eta for categorical
    ones; both in [0, 1]. A marginal association, so correlated proxies of one latent cause score alike.
    """
    y = np.asarray(outcome, dtype=float)
    if len(y) != len(features):
        raise ValueError(f"outcome has {len(y)} values for {len(features)} feature rows")
    out = {}
    for col in features.columns:
        v = features[col]
        if col in categorical:
            groups = pd.Series(y).groupby(v.fillna(-1).to_numpy())
            between = (groups.count() * (groups.mean() - y.mean()) ** 2).sum()
            total = ((y - y.mean()) ** 2).sum()
            out[col] = float(np.sqrt(between / total)) if total > 0 else 0.0
        else:
            ok = v.notna().to_numpy()
            rho = stats.spearmanr(v.to_numpy(float)[ok], y[ok]).statistic if ok.sum() > 2 else np.nan
            out[col] = 0.0 if not np.isfinite(rho) else float(abs(rho))
    return pd.Series(out, name="truth_weight")
