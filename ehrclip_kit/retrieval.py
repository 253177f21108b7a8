"""Nearest-neighbour search over embeddings, retrieval metrics and zero-shot classification.

One function builds an index whatever the size (:func:`build_index`), one searches it (:func:`search`):

* ``exact``: rows L2-normalised (cosine) in a torch tensor; queries scored by matrix product, ``torch.topk``
  over blocks of the database so memory stays bounded at millions of rows.
* ``faiss-flat``: ``faiss.IndexFlatIP``, exact too, for moderate sizes.
* ``faiss-ivf``: ``faiss.IndexIVFFlat`` trained (k-means) on a seeded sample, searched with ``nprobe``
  lists: approximate, fast at >= 1 million rows (see ``benchmarks/retrieval_scale.py``).

Every method returns ``(scores, ids)``: float32 and int64 arrays ``[n_queries, k]``, best first, ids being
row positions in the indexed array (-1 with score -inf where an IVF search found fewer than k).

>>> import numpy as np
>>> db = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
>>> scores, ids = search(build_index(db), [[1.0, 0.2]], k=2)
>>> ids.tolist()
[[0, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

METHODS = ("auto", "exact", "faiss", "faiss-flat", "faiss-ivf")
DEFAULT_TEMPLATES = ("ECG showing {}", "{} on ECG", "an electrocardiogram with {}")


def as_embedding_matrix(x: Any, name: str) -> np.ndarray:
    """``x`` (array, tensor or one vector) as a finite float32 ``[n, dim]`` array; errors name ``name`` and the row."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty [n, dim] matrix, got shape {a.shape}")
    bad = ~np.isfinite(a).all(1)
    if bad.any():
        raise ValueError(
            f"{name}: row {int(np.flatnonzero(bad)[0])} has NaN/inf ({int(bad.sum())} rows in all)"
        )
    return a


def _normalise(a: np.ndarray) -> np.ndarray:
    # Zero rows stay zero (cosine 0 with everything) rather than turning into NaN.
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@dataclass
class SearchIndex:
    """What :func:`build_index` returns; pass it to :func:`search`."""

    method: str  # "exact" | "faiss-flat" | "faiss-ivf"
    metric: str  # "cosine" | "ip"
    n: int
    dim: int
    data: torch.Tensor | None = None  # exact: the (normalised) database
    faiss_index: Any = None
    nprobe: int | None = None


def build_index(
    embeddings: Any,
    metric: str = "cosine",
    method: str = "auto",
    exact_max: int = 1_000_000,
    ivf_min: int = 1_000_000,
    nlist: int | None = None,
    nprobe: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> SearchIndex:
    """Index ``embeddings`` ``[n, dim]`` for top-k search by cosine (default) or inner product (``"ip"``).

    ``method="auto"``: exact torch search up to ``exact_max`` rows, otherwise ``"faiss"``, which is a flat
    (exact) faiss index below ``ivf_min`` rows and an IVF index from there. The blocked torch search beats a
    faiss Flat index on a CPU (1M x 128: 1.1 s against 5.0 s for 100 queries, see the benchmark), so by
    default exact search serves up to a million rows and IVF takes over above. ``"faiss-flat"`` and
    ``"faiss-ivf"`` force one. IVF: ``nlist`` lists (default ~sqrt(n)), k-means trained on ``train_size``
    rows (default 40 per list) drawn with ``seed``; ``nprobe`` lists searched per query (default
    ``max(1, nlist // 8)``; raise it for recall, lower it for speed: on hard
    128-d data at 1M rows nlist // 8 gave recall@10 ~0.83, see the benchmark).
    """
    if metric not in ("cosine", "ip"):
        raise ValueError(f"build_index: metric must be 'cosine' or 'ip', got {metric!r}")
    if method not in METHODS:
        raise ValueError(f"build_index: method must be one of {METHODS}, got {method!r}")
    x = as_embedding_matrix(embeddings, "build_index embeddings")
    if metric == "cosine":
        x = _normalise(x)
    n, dim = x.shape
    if method == "auto":
        method = "exact" if n <= exact_max else "faiss"
    if method == "faiss":
        method = "faiss-flat" if n < ivf_min else "faiss-ivf"
    if method == "exact":
        return SearchIndex("exact", metric, n, dim, data=torch.from_numpy(x))

    import faiss  # imported lazily: small uses never pay for it

    if method == "faiss-flat":
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return SearchIndex("faiss-flat", metric, n, dim, faiss_index=index)
    nlist = nlist or max(1, int(round(math.sqrt(n))))
    if nlist > n:
        raise ValueError(f"build_index: nlist={nlist} exceeds the {n} rows to index")
    nprobe = nprobe or max(1, nlist // 8)
    train_size = min(n, train_size or 40 * nlist)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=train_size, replace=False))] if train_size < n else x
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # faiss k-means draws its initial centroids from this
    index.train(sample)
    index.add(x)
    index.nprobe = nprobe
    return SearchIndex("faiss-ivf", metric, n, dim, faiss_index=index, nprobe=nprobe)


def search(
    index: SearchIndex, queries: Any, k: int = 10, query_block: int = 1024, db_block: int = 262_144
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``index`` for each query: ``(scores [q, k] float32, ids [q, k] int64)``, best first.

    ``k`` larger than the index is cut to its size. Exact search works through ``query_block`` x
    ``db_block`` score tiles so that memory stays ~``4 * query_block * db_block`` bytes.
    """
    q = as_embedding_matrix(queries, "search queries")
    if q.shape[1] != index.dim:
        raise ValueError(f"search: queries have dim {q.shape[1]}, the index has dim {index.dim}")
    if k < 1:
        raise ValueError(f"search: k must be >= 1, got {k}")
    if index.metric == "cosine":
        q = _normalise(q)
    k = min(k, index.n)
    if index.method != "exact":
        scores, ids = index.faiss_index.search(q, k)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64)
    db = index.data
    out_s, out_i = [], []
    with torch.no_grad():
        for q0 in range(0, q.shape[0], query_block):
            qb = torch.from_numpy(q[q0 : q0 + query_block])
            best_s = torch.full((qb.shape[0], 0), -math.inf)
            best_i = torch.zeros((qb.shape[0], 0), dtype=torch.long)
            for d0 in range(0, index.n, db_block):
                s = qb @ db[d0 : d0 + db_block].T
                s, i = torch.topk(s, min(k, s.shape[1]), dim=1)
                # Merge this tile's winners with the running best: k + k candidates, keep k.
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i + d0], 1)
                best_s, pos = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
                best_i = torch.gather(cat_i, 1, pos)
            out_s.append(best_s)
            out_i.append(best_i)
    return torch.cat(out_s).numpy().astype(np.float32), torch.cat(out_i).numpy().astype(np.int64)


def text_to_ecg(query_emb: Any, ecg: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot retrieval: the ``k`` ECGs most cosine-similar to each text query embedding.

    ``ecg`` is an ECG embedding matrix (indexed on the fly with ``method="auto"``) or a :class:`SearchIndex`
    built once for many calls. Both sides must live in the same shared space (the projection heads' outputs).
    """
    index = ecg if isinstance(ecg, SearchIndex) else build_index(ecg, metric="cosine")
    return search(index, query_emb, k)


def _relevance(relevant: Any, n_queries: int) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """Return (hit_fn(query_rows, ids) -> bool array, n_relevant per query) from either relevance form."""
    if isinstance(relevant, tuple):
        if len(relevant) != 2:
            raise ValueError("precision_recall_at_k: relevant as a tuple must be (query_labels, db_labels)")
        ql, dl = np.asarray(relevant[0]), np.asarray(relevant[1])
        if ql.shape[0] != n_queries:
            raise ValueError(f"precision_recall_at_k: {ql.shape[0]} query labels for {n_queries} queries")
        if ql.ndim == 1 and dl.ndim == 1:  # single labels: relevant when equal
            counts = dict(zip(*np.unique(dl, return_counts=True), strict=True))
            n_rel = np.array([counts.get(v, 0) for v in ql])
            return (lambda ids: (dl[ids] == ql[:, None]) & (ids >= 0)), n_rel
        if ql.ndim == 2 and dl.ndim == 2 and ql.shape[1] == dl.shape[1]:  # multi-hot: any shared label
            ql, dl = ql.astype(bool), dl.astype(bool)
            n_rel = ((dl.astype(np.int32) @ ql.T.astype(np.int32)) > 0).sum(0)
            return (lambda ids: (dl[ids] & ql[:, None, :]).any(-1) & (ids >= 0)), n_rel
        raise ValueError(f"precision_recall_at_k: label shapes {ql.shape} and {dl.shape} do not match")
    rel = np.asarray(relevant, dtype=bool)
    if rel.ndim != 2 or rel.shape[0] != n_queries:
        raise ValueError(
            f"precision_recall_at_k: relevance matrix must be [{n_queries}, n_db], got {rel.shape}"
        )
    return (lambda ids: np.take_along_axis(rel, np.maximum(ids, 0), 1) & (ids >= 0)), rel.sum(1)


def precision_recall_at_k(retrieved_ids: Any, relevant: Any, ks: Sequence[int] = (1, 5, 10)) -> pd.DataFrame:
    """Mean precision@k and recall@k over queries.

    ``retrieved_ids`` ``[q, >= max(ks)]`` from :func:`search`. ``relevant`` is either a bool matrix
    ``[q, n_db]`` or a pair ``(query_labels, db_labels)``: 1-D labels (relevant when equal) or multi-hot
    ``[q, C]`` / ``[n_db, C]`` (relevant when sharing a positive label). precision@k = hits / k;
    recall@k = hits / number of relevant items, averaged over queries that have any (the count is in
    ``n_queries_recall``).

    >>> precision_recall_at_k([[0, 1]], ([1], [1, 0, 1]), ks=(1, 2)).round(2).to_dict("records")[1]
    {'k': 2, 'precision': 0.5, 'recall': 0.5, 'n_queries': 1, 'n_queries_recall': 1}
    """
    ids = np.asarray(retrieved_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"precision_recall_at_k: retrieved_ids must be [n_queries, k], got {ids.shape}")
    if max(ks) > ids.shape[1]:
        raise ValueError(
            f"precision_recall_at_k: k={max(ks)} but only {ids.shape[1]} ids retrieved per query"
        )
    hit_fn, n_rel = _relevance(relevant, ids.shape[0])
    hits = hit_fn(ids)
    has = n_rel > 0
    rows = []
    for k in ks:
        h = hits[:, :k].sum(1)
        recall = float((h[has] / n_rel[has]).mean()) if has.any() else math.nan
        rows.append(
            {
                "k": int(k),
                "precision": float((h / k).mean()),
                "recall": recall,
                "n_queries": int(ids.shape[0]),
                "n_queries_recall": int(has.sum()),
            }
        )
    return pd.DataFrame(rows)


def prompts_for(
    class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, list[str]]:
    """Prompt texts per class: ``{"atrial fibrillation": ["ECG showing atrial fibrillation", ...]}``."""
    return {c: [t.format(c) for t in templates] for c in class_names}


def zero_shot_scores(ecg_emb: Any, prompt_emb_per_class: Mapping[str, Any]) -> pd.DataFrame:
    """Cosine of each ECG embedding to each class prototype, as a DataFrame ``[n_ecg, n_classes]``.

    A class prototype is the mean of its (normalised) prompt-template embeddings, re-normalised (CLIP's
    prompt ensembling), so several phrasings ("ECG showing {}", "{} on ECG") vote together.
    """
    if not prompt_emb_per_class:
        raise ValueError("zero_shot_scores: no classes given")
    x = _normalise(as_embedding_matrix(ecg_emb, "zero_shot_scores ecg_emb"))
    protos = []
    for name, emb in prompt_emb_per_class.items():
        p = _normalise(as_embedding_matrix(emb, f"zero_shot_scores prompts of class {name!r}")).mean(
            0, keepdims=True
        )
        if p.shape[1] != x.shape[1]:
            raise ValueError(
                f"zero_shot_scores: class {name!r} prompts have dim {p.shape[1]}, ECGs {x.shape[1]}"
            )
        protos.append(_normalise(p)[0])
    return pd.DataFrame(x @ np.stack(protos).T, columns=list(prompt_emb_per_class))


def zero_shot_auroc(scores: pd.DataFrame, labels: Any) -> pd.DataFrame:
    """AUROC per class of the zero-shot ``scores`` against binary ``labels``.

    ``labels``: a DataFrame (or mapping) with the same class columns, or an array ``[n, n_classes]`` in
    the column order of ``scores``. Returns one row per class: ``auroc``, ``n_pos``, ``n_neg``; AUROC is
    NaN where a class has no positives or no negatives. The macro mean is ``result.auroc.mean()``.
    """
    if isinstance(labels, pd.DataFrame | Mapping):
        missing = [c for c in scores.columns if c not in labels]
        if missing:
            raise ValueError(f"zero_shot_auroc: labels lack classes {missing}")
        lab = np.column_stack([np.asarray(labels[c]) for c in scores.columns])
    else:
        lab = np.asarray(labels)
        if lab.ndim == 1 and scores.shape[1] == 1:
            lab = lab[:, None]
    if lab.shape != scores.shape:
        raise ValueError(f"zero_shot_auroc: labels shape {lab.shape} != scores shape {scores.shape}")
    rows = []
    for j, c in enumerate(scores.columns):
        y = lab[:, j].astype(bool)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        auc = roc_auc_score(y, scores[c].to_numpy()) if n_pos and n_neg else math.nan
        rows.append({"class": c, "auroc": float(auc), "n_pos": n_pos, "n_neg": n_neg})
    return pd.DataFrame(rows).set_index("class")
