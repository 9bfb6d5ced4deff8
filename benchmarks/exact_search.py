"""Exact inner-product search (ann.ExactIndex, what each index shard of the search service runs) against the
row layout it replaced, measured in the same run.

Search is bound by reading the features from memory. The index holds them transposed, (d, n), and a few
queries take one matrix-vector product each over a block of frames at a time; many, one matrix product. The
reference holds them as rows, (n, d), as the features tables do: a few queries one matrix-vector product
each over all rows, more the rows a block at a time (the index before this layout), and numpy's plain
``queries @ features.T``. Random unit features (the timing does not depend on their values), d = 512 as
the benchmark run's, n of one shard of it and of all of it, 1 and 2 BLAS threads, batches of 1 to 16
queries (the service gathers the queries that arrive together into one search).

    .venv/bin/python benchmarks/exact_search.py

Writes benchmarks/results/exact_search.json (per setting: ms per search and ``speedup`` = reference ms /
index ms, for the previous row-layout index and for numpy's product) and prints a table.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliquecnn_ray.ann import build_index  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "exact_search.json"
D = 512
SIZES = (35_000, 70_000)  # one of two shards of the 70,000-frame benchmark run, and the whole run
THREADS = (1, 2)
QUERIES = (1, 2, 3, 4, 8, 16)
K = 10
REPEATS = 21


def row_layout_scores(features: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The previous exact index: up to 3 queries one matrix-vector product each over the (n, d) rows, more
    the rows 2,048 at a time for all of them."""
    if len(queries) <= 3:
        return np.stack([features @ q for q in queries])
    out = np.empty((len(features), len(queries)), dtype=np.float32)
    for lo in range(0, len(features), 2048):
        np.matmul(features[lo : lo + 2048], queries.T, out=out[lo : lo + 2048])
    return np.ascontiguousarray(out.T)


def top_k(scores: np.ndarray) -> np.ndarray:
    """The top-K selection every method shares (as ExactIndex.search does it)."""
    part = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    return np.take_along_axis(part, np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=1), 1)


def median_ms(search, queries: np.ndarray) -> float:
    search(queries)  # warm: pages touched, BLAS threads started
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        search(queries)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def measure(n: int, rng: np.random.Generator) -> list[dict]:
    """Every (threads, queries) setting on n random unit features."""
    features = rng.standard_normal((n, D)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    index = build_index(features, "exact")
    rows = []
    for threads in THREADS:
        with threadpool_limits(limits=threads):
            for m in QUERIES:
                queries = features[rng.choice(n, size=m, replace=False)]
                # The same answer, or the comparison means nothing.
                _, got = index.search(queries, K)
                np.testing.assert_array_equal(got, top_k(row_layout_scores(features, queries)))
                ms = median_ms(lambda q: index.search(q, K), queries)
                reference = median_ms(lambda q: top_k(row_layout_scores(features, q)), queries)
                plain = median_ms(lambda q: top_k(q @ features.T), queries)
                rows.append({"n": n, "threads": threads, "queries": m, "index_ms": round(ms, 3),
                             "row_layout_ms": round(reference, 3), "numpy_ms": round(plain, 3),
                             "speedup": round(reference / ms, 2), "speedup_vs_numpy": round(plain / ms, 2)})
                print(f"{n:>7} {threads:>7} {m:>7} {ms:>9.2f} {reference:>14.2f} {plain:>9.2f} "
                      f"{rows[-1]['speedup']:>8.2f} {rows[-1]['speedup_vs_numpy']:>9.2f}", flush=True)
    return rows


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'n':>7} {'threads':>7} {'queries':>7} {'index ms':>9} {'row layout ms':>14} {'numpy ms':>9} "
          f"{'speedup':>8} {'vs numpy':>9}")
    rows = [row for n in SIZES for row in measure(n, rng)]
    one = [r for r in rows if r["queries"] == 1]
    results = {
        "d": D, "k": K, "rows": rows,
        "speedup_one_query_min": min(r["speedup"] for r in one),
        "speedup_min": min(r["speedup"] for r in rows),
        "speedup_vs_numpy_min": min(r["speedup_vs_numpy"] for r in rows),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\none query: index at least {results['speedup_one_query_min']}× the row layout; every setting at "
          f"least {results['speedup_min']}× it and {results['speedup_vs_numpy_min']}× numpy's product")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
