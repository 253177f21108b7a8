"""Out-of-distribution detection from embeddings, and ECG shifts to test it with.

Detectors are fitted on *training* embeddings and score new ones (higher = more out-of-distribution):

* :class:`MahalanobisDetector`: squared Mahalanobis distance to the training mean (or, per class with a
  shared covariance, to the nearest class mean; Lee et al. 2018), covariance shrunk by Ledoit-Wolf so it
  stays invertible when embeddings outnumber samples.
* :class:`KNNDetector`: cosine distance to the k-th nearest training embedding (Sun et al. 2022), through
  :func:`ehrclip_kit.retrieval.build_index` so it scales to large training sets.

:func:`ood_auroc` turns in/out scores into one AUROC (out = positive). The shift generators make held-out
"shifted" ECGs from clean ones: :func:`add_noise`, :func:`swap_leads`, :func:`reverse_time`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = MahalanobisDetector().fit(rng.normal(size=(500, 4)))
>>> ood_auroc(det.score(rng.normal(size=(200, 4))), det.score(rng.normal(3, 1, size=(200, 4)))) > 0.95
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from ehrclip_kit.retrieval import SearchIndex, as_embedding_matrix, build_index, search


class MahalanobisDetector:
    """Mahalanobis-distance OOD score on embeddings.

    ``fit(train_emb, labels=None)``: without labels, one Gaussian (class-agnostic); with labels, one mean
    per class and a covariance shared by all classes (pooled within-class scatter); the score is then the
    distance to the nearest class mean. ``shrinkage="ledoit-wolf"`` (default) picks the shrinkage
    intensity from the data; a float in [0, 1] fixes it; ``None`` uses the plain covariance (pseudo-inverse).
    """

    def __init__(self, shrinkage: str | float | None = "ledoit-wolf") -> None:
        if not (
            shrinkage in (None, "ledoit-wolf") or (isinstance(shrinkage, float | int) and 0 <= shrinkage <= 1)
        ):
            raise ValueError(
                f"MahalanobisDetector: shrinkage must be 'ledoit-wolf', a float in [0, 1] or None, got {shrinkage!r}"
            )
        self.shrinkage = shrinkage
        self.means_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None
        self.classes_: np.ndarray | None = None
        self.shrinkage_: float | None = None

    def fit(self, train_emb: Any, labels: Any = None) -> MahalanobisDetector:
        x = as_embedding_matrix(train_emb, "MahalanobisDetector.fit embeddings").astype(np.float64)
        if labels is None:
            self.classes_ = np.array([0])
            self.means_ = x.mean(0, keepdims=True)
            resid = x - self.means_
        else:
            y = np.asarray(labels)
            if y.shape != (x.shape[0],):
                raise ValueError(f"MahalanobisDetector.fit: {y.shape} labels for {x.shape[0]} embeddings")
            self.classes_ = np.unique(y)
            self.means_ = np.stack([x[y == c].mean(0) for c in self.classes_])
            resid = x - self.means_[np.searchsorted(self.classes_, y)]
        if x.shape[0] < 2:
            raise ValueError("MahalanobisDetector.fit: need at least 2 embeddings")
        if self.shrinkage == "ledoit-wolf":
            # Residuals are already centred (per class), so the estimator must not re-centre them.
            lw = LedoitWolf(assume_centered=True).fit(resid)
            cov, self.shrinkage_ = lw.covariance_, float(lw.shrinkage_)
        else:
            emp = resid.T @ resid / max(len(resid) - len(self.classes_), 1)
            a = float(self.shrinkage or 0.0)
            mu = np.trace(emp) / emp.shape[0]
            cov, self.shrinkage_ = (1 - a) * emp + a * mu * np.eye(emp.shape[0]), a
        self.precision_ = np.linalg.pinv(cov, hermitian=True)
        return self

    def score(self, emb: Any) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest (class) mean, one value per row."""
        if self.precision_ is None:
            raise RuntimeError("MahalanobisDetector.score called before fit")
        x = as_embedding_matrix(emb, "MahalanobisDetector.score embeddings").astype(np.float64)
        if x.shape[1] != self.means_.shape[1]:
            raise ValueError(
                f"MahalanobisDetector.score: dim {x.shape[1]}, fitted on dim {self.means_.shape[1]}"
            )
        best = np.full(x.shape[0], np.inf)
        for m in self.means_:
            d = x - m
            best = np.minimum(best, np.einsum("ij,jk,ik->i", d, self.precision_, d))
        return best


class KNNDetector:
    """Cosine distance (1 - cosine similarity) to the ``k``-th nearest training embedding.

    Score held-out data only: a training embedding finds itself among its neighbours.
    ``method`` is passed to :func:`ehrclip_kit.retrieval.build_index` ("auto" = exact below 50,000 rows).
    """

    def __init__(self, k: int = 10, method: str = "auto") -> None:
        if k < 1:
            raise ValueError(f"KNNDetector: k must be >= 1, got {k}")
        self.k = k
        self.method = method
        self.index_: SearchIndex | None = None

    def fit(self, train_emb: Any) -> KNNDetector:
        x = as_embedding_matrix(train_emb, "KNNDetector.fit embeddings")
        if x.shape[0] < self.k:
            raise ValueError(f"KNNDetector.fit: {x.shape[0]} training embeddings for k={self.k}")
        self.index_ = build_index(x, metric="cosine", method=self.method)
        return self

    def score(self, emb: Any) -> np.ndarray:
        if self.index_ is None:
            raise RuntimeError("KNNDetector.score called before fit")
        sims, _ = search(self.index_, emb, self.k)
        return (1.0 - sims[:, -1]).astype(np.float64)


def ood_auroc(in_scores: Any, out_scores: Any) -> float:
    """AUROC of telling out-of-distribution (positive) from in-distribution rows by score (higher = OOD)."""
    a, b = np.asarray(in_scores, dtype=np.float64).ravel(), np.asarray(out_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"ood_auroc: need both in ({a.size}) and out ({b.size}) scores")
    y = np.r_[np.zeros(a.size), np.ones(b.size)]
    return float(roc_auc_score(y, np.r_[a, b]))


def _check_ecg(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim < 2:
        raise ValueError(
            f"{name}: expected an ECG [leads, time] (or [..., leads, time]), got shape {a.shape}"
        )
    return a


def add_noise(x: Any, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` decibels relative to each lead's own power.

    Power is the variance of the lead over time (baseline offsets do not count as signal); a flat lead
    gets no noise. ``x`` is ``[leads, T]`` (or ``[..., leads, T]``); a new float array is returned.

    >>> x = np.sin(np.linspace(0, 60, 5000))[None].repeat(12, 0)
    >>> y = add_noise(x, 10.0, np.random.default_rng(0))
    >>> round(float(10 * np.log10(x.var() / (y - x).var())), 1)
    10.0
    """
    a = _check_ecg(x, "add_noise").astype(np.float64)
    power = a.var(axis=-1, keepdims=True)
    noise_sd = np.sqrt(power / 10.0 ** (snr_db / 10.0))
    return (a + rng.standard_normal(a.shape) * noise_sd).astype(
        np.result_type(np.asarray(x).dtype, np.float32)
    )


def swap_leads(x: Any, i: int, j: int) -> np.ndarray:
    """Copy of ``x`` with leads ``i`` and ``j`` exchanged (a classic electrode misplacement)."""
    a = _check_ecg(x, "swap_leads").copy()
    n = a.shape[-2]
    if not (-n <= i < n and -n <= j < n):
        raise ValueError(f"swap_leads: leads {i}, {j} out of range for {n} leads")
    a[..., [i, j], :] = a[..., [j, i], :]
    return a


def reverse_time(x: Any) -> np.ndarray:
    """Copy of ``x`` played backwards in time (same power spectrum, impossible morphology)."""
    return np.ascontiguousarray(_check_ecg(x, "reverse_time")[..., ::-1])
