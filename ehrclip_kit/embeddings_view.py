"""Two-dimensional views of embeddings with UMAP (umap-learn), cached on disk.

UMAP's first call in a fresh Python process JIT-compiles numba code (~30-45 s on a laptop CPU); later
calls take well under a second for a few thousand points. Layouts are cached with
:func:`ehrclip_kit.cache.disk_cache` keyed by the embedding bytes and the UMAP parameters, so re-running a
notebook reuses them.

``joint_umap`` fits ONE layout on the EHR and note embeddings stacked together, so that both modalities
land in the same 2-D picture (only meaningful for embeddings that live in a shared space, e.g. after the
projection heads of a contrastive model).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from ehrclip_kit.cache import disk_cache

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
            n_neighbors=n_neighbors, min_dist=min_dist, n_components=2, metric=metric, random_state=seed, n_jobs=1
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


def joint_umap(
    ehr_emb: Any, text_emb: Any, **umap_kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
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
