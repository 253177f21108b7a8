"""Retrieval at scale: exact torch search vs faiss Flat vs faiss IVF over >= 1 million embeddings.

Baseline: exact search in ``ehrclip_kit.retrieval`` (normalised matrix product + blocked torch.topk),
measured in the same run. For each method: index build time, latency of one batch of queries, mean latency
of single queries, and recall@k against the exact top-k. Data: random but clustered 128-d float32
embeddings (a Gaussian mixture, ~0.5 GB at 1M rows) and queries that are database rows moved by within-cluster noise.

    python benchmarks/retrieval_scale.py                 # 1,000,000 x 128
    python benchmarks/retrieval_scale.py --n 200000 --queries 50 --single 10 --json runs/retrieval.json

Not part of the test suite (minutes of CPU, ~2 GB of memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np
import torch

from ehrclip_kit.retrieval import build_index, search


def clustered_embeddings(
    n: int, dim: int, n_clusters: int, spread: float, rng: np.random.Generator, chunk: int = 200_000
) -> np.ndarray:
    """``n`` float32 rows from a mixture of ``n_clusters`` Gaussians (filled in chunks to cap peak memory)."""
    centres = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = centres[rng.integers(0, n_clusters, m)]
        out[s : s + m] += spread * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def _time(fn, repeat: int = 1):
    t0 = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return (time.perf_counter() - t0) / repeat, result


def measure(name, make_index, queries, singles, k):
    build_s, index = _time(make_index)
    search(index, queries[:2], k)  # warm-up (thread pools, first-touch pages)
    batch_s, (_, ids) = _time(lambda: search(index, queries, k))
    single_s = sum(_time(lambda q=q: search(index, q[None], k))[0] for q in singles) / len(singles)
    return {"method": name, "build_s": build_s, "batch_s": batch_s, "single_ms": 1e3 * single_s}, ids, index


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k found by the approximate top-k (order ignored)."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database size (default 1,000,000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=None, help="mixture components (default n // 100)")
    p.add_argument("--spread", type=float, default=1.0, help="within-cluster s.d. (centres have s.d. 1)")
    p.add_argument("--queries", type=int, default=100, help="batch size of the batched search")
    p.add_argument("--single", type=int, default=20, help="single-query searches timed one by one")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(n))")
    p.add_argument(
        "--nprobe", type=int, nargs="+", default=[8, 32, 128], help="IVF lists probed (one row each)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: library's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results table to this JSON file")
    args = p.parse_args(argv)

    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    # ~100 rows per cluster at every n keeps neighbourhoods alike across sizes: with far larger clusters
    # each IVF list would hold whole clusters and recall would be trivially 1.
    args.clusters = args.clusters or max(1, args.n // 100)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    db = clustered_embeddings(args.n, args.dim, args.clusters, args.spread, rng)
    # Queries: database rows moved by within-cluster noise, so they come from the same mixture.
    queries = db[rng.integers(0, args.n, args.queries)] + args.spread * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32
    )
    singles = queries[: args.single]
    print(
        f"data: {args.n:,} x {args.dim} float32 ({db.nbytes / 2**30:.2f} GiB), {args.clusters} clusters, "
        f"generated in {time.perf_counter() - t0:.1f} s; {args.queries} batched + {len(singles)} single "
        f"queries, k={args.k}; torch threads {torch.get_num_threads()}, faiss threads "
        f"{faiss.omp_get_max_threads()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )

    rows = []
    row, truth, index = measure(
        "exact (torch, blocked)", lambda: build_index(db, method="exact"), queries, singles, args.k
    )
    rows.append({**row, "recall": 1.0})
    del index
    gc.collect()
    row, ids, index = measure(
        "faiss Flat (exact)", lambda: build_index(db, method="faiss-flat"), queries, singles, args.k
    )
    rows.append({**row, "recall": recall_at_k(ids, truth)})
    del index
    gc.collect()
    build_s, index = _time(lambda: build_index(db, method="faiss-ivf", nlist=args.nlist, seed=args.seed))
    for nprobe in args.nprobe:
        index.faiss_index.nprobe = nprobe
        search(index, queries[:2], args.k)
        batch_s, (_, ids) = _time(lambda: search(index, queries, args.k))
        single_s = sum(_time(lambda q=q: search(index, q[None], args.k))[0] for q in singles) / len(singles)
        rows.append(
            {
                "method": f"faiss IVF nlist={index.faiss_index.nlist} nprobe={nprobe}",
                "build_s": build_s,
                "batch_s": batch_s,
                "single_ms": 1e3 * single_s,
                "recall": recall_at_k(ids, truth),
            }
        )

    base = rows[0]
    print(
        f"\n{'method':38s} {'build s':>8s} {'batch s':>8s} {'single ms':>10s} {f'recall@{args.k}':>10s}"
        f"   ratios vs exact: build / batch speed-up / single speed-up"
    )
    for r in rows:
        r["build_ratio"] = r["build_s"] / base["build_s"]
        r["batch_speedup"] = base["batch_s"] / r["batch_s"]
        r["single_speedup"] = base["single_ms"] / r["single_ms"]
        print(
            f"{r['method']:38s} {r['build_s']:8.2f} {r['batch_s']:8.3f} {r['single_ms']:10.2f} {r['recall']:10.3f}"
            f"   x{r['build_ratio']:.1f} / x{r['batch_speedup']:.1f} / x{r['single_speedup']:.1f}"
        )
    if args.json:
        from ehrclip_kit.io import write_json

        write_json(args.json, {"args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
