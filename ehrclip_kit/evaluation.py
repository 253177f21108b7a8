"""Test-split metrics with uncertainty, seed summaries, and the label-fraction protocol.

* :func:`binary_metrics`: AUROC, AUPRC (average precision, sklearn's definition) and Brier score, each with
  a 95 % percentile bootstrap CI. The bootstrap is *stratified* (positives and negatives resampled
  separately, so every replicate has both classes) and vectorised: a replicate is a vector of resampling
  counts, and the metrics are computed for a block of replicates at once from tie-grouped cumulative sums.
* :func:`calibration_curve`: quantile bins with counts and a bootstrap CI of the observed rate per bin.
* :func:`mean_ci` / :func:`cis_overlap`: t-based CI of a metric over seeds, and the overlap check used by
  the ablation's scientific claim.
* :func:`subsample_labels`: the label-scarce training sets, shared by fine-tuning and the baselines.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats


def _check_inputs(y, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.float64).ravel()
    p = np.asarray(p).astype(np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(p).all():
        raise ValueError("predictions contain NaN or infinite values")
    if y.min(initial=1) == y.max(initial=0):
        raise ValueError("AUROC/AUPRC need both classes among the labels")
    return y, p


def _weighted_curves(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision for each row of weights ``w`` (shape ``(B, n)``; resampling counts).

    Rows are sorted by decreasing score once; tied scores form one threshold, as in sklearn.
    """
    order = np.argsort(-p, kind="mergesort")
    ps, pos = p[order], y[order] == 1
    ws = w[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]  # first row of each group of tied scores
    # (B, G) positive / negative weight per score group; integer sums are exact and cheaper than floats.
    tp, fp = np.where(pos, ws, 0), np.where(pos, 0, ws)
    if starts.size < ps.size:  # ties present (reduceat is the slow part, so skip it when there are none)
        tp, fp = np.add.reduceat(tp, starts, axis=1), np.add.reduceat(fp, starts, axis=1)
    tp, fp = tp.astype(np.float64), fp.astype(np.float64)
    tp_cum, fp_cum = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    n_pos, n_neg = tp_cum[:, -1:], fp_cum[:, -1:]
    # AUROC = P(score_pos > score_neg) + 0.5 P(tie): each positive group beats the negatives ranked below.
    neg_below = n_neg - fp_cum
    auroc = ((tp * neg_below).sum(axis=1) + 0.5 * (tp * fp).sum(axis=1)) / (n_pos[:, 0] * n_neg[:, 0])
    # Average precision = sum over thresholds of (recall step) x precision.
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1e-12)
    auprc = (tp / n_pos * precision).sum(axis=1)
    return auroc, auprc


def _stratified_counts(y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` resampling counts that keep the number of positives and negatives fixed."""
    counts = np.zeros((n_boot, y.size), dtype=np.int32)
    rows = np.arange(n_boot)[:, None]
    for cls in (0.0, 1.0):
        idx = np.flatnonzero(y == cls)
        draws = rng.integers(0, idx.size, size=(n_boot, idx.size))  # indices within the class
        # Count draws per (replicate, row) with one flat bincount: much faster than rng.multinomial.
        flat = np.bincount((draws + rows * idx.size).ravel(), minlength=n_boot * idx.size)
        counts[:, idx] = flat.reshape(n_boot, idx.size)
    return counts


def binary_metrics(
    y, p, n_boot: int = 1000, seed: int = 0, level: float = 0.95, block: int | None = None
) -> dict[str, float]:
    """AUROC, AUPRC and Brier score of probabilities ``p`` for labels ``y``, with bootstrap CIs.

    Returns a flat dict (one row of a results table): ``auroc, auroc_lo, auroc_hi, auprc, ..., brier, ...,
    n, n_pos, prevalence``. Point estimates equal sklearn's ``roc_auc_score``, ``average_precision_score``
    and ``brier_score_loss``. ``n_boot=0`` skips the bootstrap (CI bounds are NaN).

    >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], n_boot=0)
    >>> round(m["auroc"], 3), round(m["auprc"], 3)
    (0.75, 0.833)
    """
    y, p = _check_inputs(y, p)
    ones = np.ones((1, y.size))
    auroc, auprc = _weighted_curves(y, p, ones)
    out = {"auroc": float(auroc[0]), "auprc": float(auprc[0]), "brier": float(np.mean((p - y) ** 2))}
    names = ("auroc", "auprc", "brier")
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        samples = {k: [] for k in names}
        sq_err = (p - y) ** 2
        # Replicates are scored in blocks of ~2M counts (a few arrays of 16 MB): fast and memory-bounded.
        block = block or int(np.clip(2_000_000 // y.size, 1, 500))
        for start in range(0, n_boot, block):
            w = _stratified_counts(y, min(block, n_boot - start), rng)
            a, ap = _weighted_curves(y, p, w)
            samples["auroc"].append(a)
            samples["auprc"].append(ap)
            samples["brier"].append(w @ sq_err / y.size)
        alpha = (1 - level) / 2
        for k in names:
            lo, hi = np.quantile(np.concatenate(samples[k]), [alpha, 1 - alpha])
            out[f"{k}_lo"], out[f"{k}_hi"] = float(lo), float(hi)
    else:
        for k in names:
            out[f"{k}_lo"] = out[f"{k}_hi"] = float("nan")
    out.update(n=int(y.size), n_pos=int(y.sum()), prevalence=float(y.mean()))
    return {
        k: out[k]
        for k in [f"{m}{s}" for m in names for s in ("", "_lo", "_hi")] + ["n", "n_pos", "prevalence"]
    }


def calibration_curve(
    y, p, n_bins: int = 10, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Reliability table over quantile bins of ``p`` (equal counts; tied edges merged).

    Columns: ``bin, p_lo, p_hi, mean_pred, observed, observed_lo, observed_hi, count``. The CI of the
    observed rate is the within-bin bootstrap, which for 0/1 labels is exactly Binomial(count, rate)/count,
    so it is drawn that way.
    """
    y = np.asarray(y).astype(np.float64).ravel()
    p = np.asarray(p).astype(np.float64).ravel()
    if y.shape != p.shape or y.size == 0:
        raise ValueError("calibration_curve needs non-empty labels and predictions of equal length")
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    bins = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, max(len(edges) - 2, 0))
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    rows = []
    for b in range(max(len(edges) - 1, 1)):
        sel = bins == b
        count = int(sel.sum())
        if count == 0:
            continue
        rate = float(y[sel].mean())
        draws = rng.binomial(count, rate, size=n_boot) / count if n_boot > 0 else np.array([np.nan])
        rows.append(
            {
                "bin": b,
                "p_lo": float(p[sel].min()),
                "p_hi": float(p[sel].max()),
                "mean_pred": float(p[sel].mean()),
                "observed": rate,
                "observed_lo": float(np.quantile(draws, alpha)),
                "observed_hi": float(np.quantile(draws, 1 - alpha)),
                "count": count,
            }
        )
    return pd.DataFrame(rows)


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-based CI over independent runs (e.g. seeds): ``(mean, lo, hi)``; NaNs are ignored.

    >>> m, lo, hi = mean_ci([0.70, 0.72, 0.74])
    >>> round(m, 2), round(lo, 3), round(hi, 3)
    (0.72, 0.67, 0.77)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"),) * 3
    mean = float(v.mean())
    if v.size == 1:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, df=v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


def cis_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether intervals ``a = (lo, hi)`` and ``b`` overlap (a shared endpoint counts as overlap)."""
    return bool(a[0] <= b[1] and b[0] <= a[1])


def subsample_labels(frame: pd.DataFrame, fraction: float, seed: int, label: str = "label") -> pd.DataFrame:
    """Keep ``fraction`` of the rows of each label value, chosen by ``seed`` (at least one per class).

    Deterministic for a given frame, fraction and seed, and *nested*: with the same seed, the rows kept at
    5 % are a subset of those kept at 10 %, so label-efficiency curves compare like with like. The kept
    rows come back in their original order.

    >>> f = pd.DataFrame({"label": [0] * 90 + [1] * 10})
    >>> subsample_labels(f, 0.1, seed=0)["label"].value_counts().sort_index().tolist()
    [9, 1]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if label not in frame.columns:
        raise KeyError(f"frame has no label column {label!r}")
    if fraction == 1:
        return frame.copy()
    keep = []
    for cls in sorted(frame[label].dropna().unique()):
        # One generator per class, seeded by (seed, class): each class's order ignores the other's size.
        rng = np.random.default_rng([int(seed), int(cls)])
        positions = np.flatnonzero((frame[label] == cls).to_numpy())
        n_keep = max(1, int(round(fraction * positions.size)))
        keep.append(positions[rng.permutation(positions.size)[:n_keep]])
    return frame.iloc[np.sort(np.concatenate(keep))].copy()
