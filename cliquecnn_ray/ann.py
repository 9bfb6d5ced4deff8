"""Inner-product search over a round's features: exact by default, approximate for millions of frames.

``build_index(features, kind)`` returns an index whose ``search(queries, k)`` gives each query's k most
similar rows by inner product (the Pearson correlation for Pearson-normalised features):
- ``exact``: brute force in blocks of queries, numpy only; the reference the others are measured against;
- ``ivf``: faiss IndexIVFFlat (k-means cells, ``nprobe`` of them searched), cheap to build, tunable recall;
- ``hnsw``: faiss IndexHNSWFlat (a navigable small-world graph), the best recall per query time in memory.

faiss (Meta's library; CPU wheels on PyPI as ``faiss-cpu``) is the field's standard for both; it is imported
only when an approximate kind is asked for. ``recall_at_k`` measures an approximate answer against exact.
Never imports ray.
"""
from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("exact", "ivf", "hnsw")
BLOCK_BYTES = 64 * 2**20  # exact search: a block of queries' scores (block · N floats) stays this small
GEMM_QUERIES = 8  # exact search: from this many queries one matrix product; fewer, matrix-vector products
COLUMN_BLOCK = 4096  # exact search, a few queries: frames a block at a time, read once from memory for all
IVF_POINTS_PER_CELL = 256  # ≈ √N cells on a million frames; k-means wants ≥ 39 training points per cell
IVF_NPROBE = 32  # cells searched per query
HNSW_M = 32  # graph degree: 32 keeps recall@10 high on d of a few hundred
HNSW_EF_CONSTRUCTION = 200  # build-time beam: a better graph for a slower build
HNSW_EF_SEARCH = 128  # search-time beam (≥ k); raise for recall, lower for speed


class Index(Protocol):
    kind: str

    def __len__(self) -> int: ...

    def vectors(self, rows: np.ndarray) -> np.ndarray: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _as_matrix(x: np.ndarray, name: str, d: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1 and d is not None:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} have d = {x.shape[1]}, the index holds d = {d}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or infinite values (row {int(np.argmax(~np.isfinite(x).all(1)))})")
    return x


def _padded(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (m, k') results to k columns with score −inf and row −1 (an index of fewer than k rows)."""
    m, have = rows.shape
    if have >= k:
        return scores[:, :k].astype(np.float32), rows[:, :k].astype(np.int64)
    out_s = np.full((m, k), -np.inf, dtype=np.float32)
    out_r = np.full((m, k), -1, dtype=np.int64)
    out_s[:, :have], out_r[:, :have] = scores, rows
    return out_s, out_r


class ExactIndex:
    """Brute-force inner product over (n, d) float32 features, in blocks of queries of ``BLOCK_BYTES`` scores.

    The features are held transposed, (d, n): search is bound by reading them from memory, and BLAS reads
    that layout faster for a few queries (matrix-vector products), the search service's usual case
    (benchmarks/exact_search.py measures both layouts)."""

    kind = "exact"

    def __init__(self, features: np.ndarray):
        self.columns = np.ascontiguousarray(_as_matrix(features, "features").T)

    def __len__(self) -> int:
        return self.columns.shape[1]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The features (m, d) of ``rows``."""
        return np.ascontiguousarray(self.columns[:, np.asarray(rows, np.int64)].T)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) queries → scores (m, k) float32 descending, rows (m, k) int64; −inf / −1 pad past n."""
        queries = _as_matrix(queries, "queries", self.columns.shape[0])
        top = min(int(k), len(self))
        scores = np.empty((len(queries), top), dtype=np.float32)
        rows = np.empty((len(queries), top), dtype=np.int64)
        step = max(1, BLOCK_BYTES // (4 * len(self)))
        for lo in range(0, len(queries), step):
            block = self._scores(queries[lo : lo + step])
            part = np.argpartition(-block, top - 1, axis=1)[:, :top]
            part_scores = np.take_along_axis(block, part, 1)
            # Descending score, ties by row: the same order whatever the block size.
            order = np.lexsort((part, -part_scores), axis=1)
            rows[lo : lo + len(block)] = np.take_along_axis(part, order, 1)
            scores[lo : lo + len(block)] = np.take_along_axis(part_scores, order, 1)
        return _padded(scores, rows, int(k))

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        """(m, d) queries → (m, n) inner products. Many queries: one matrix product. A few: BLAS's matrix
        product is slow for a short, wide one, so each query takes a matrix-vector product over a block of
        frames while the block is in cache, and the features are read from memory once for all of them."""
        if len(queries) >= GEMM_QUERIES:
            return queries @ self.columns
        n = len(self)
        out = np.empty((len(queries), n), dtype=np.float32)
        for lo in range(0, n, COLUMN_BLOCK):
            block = self.columns[:, lo : lo + COLUMN_BLOCK]
            for query, scores in zip(queries, out):
                np.matmul(query, block, out=scores[lo : lo + COLUMN_BLOCK])
        return out


class FaissIndex:
    """A faiss inner-product index (IVF-Flat or HNSW-Flat) over (n, d) float32 features."""

    def __init__(self, kind: str, index, n: int):
        self.kind = kind
        self.index = index
        self.n = n

    def __len__(self) -> int:
        return self.n

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The features (m, d) of ``rows``, from the index's own copy."""
        return self.index.reconstruct_batch(np.asarray(rows, np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) queries → scores (m, k) float32 descending, rows (m, k) int64; −inf / −1 where not found."""
        queries = _as_matrix(queries, "queries", self.index.d)
        scores, rows = self.index.search(queries, int(k))
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        return scores, rows.astype(np.int64)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # a broken install: name the package to fix
        raise ImportError("approximate search needs faiss: pip install faiss-cpu") from exc
    return faiss


def build_index(features: np.ndarray, kind: str = "exact", **params) -> Index:
    """An inner-product index over ``features`` (n, d) float32; row i of the answers is ``features[i]``.

    Args:
        kind: "exact" (default), "ivf" or "hnsw".
        params: ivf: ``nlist`` (cells, default n / IVF_POINTS_PER_CELL), ``nprobe`` (IVF_NPROBE), ``seed``;
            hnsw: ``m`` (HNSW_M), ``ef_construction``, ``ef_search``.
    """
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {', '.join(KINDS)}")
    features = _as_matrix(features, "features")
    n, d = features.shape
    if n == 0:
        raise ValueError("features: an index needs at least one row")
    known = {"exact": set(), "ivf": {"nlist", "nprobe", "seed"}, "hnsw": {"m", "ef_construction", "ef_search"}}
    unknown = set(params) - known[kind]
    if unknown:
        raise ValueError(f"index kind {kind!r} takes no parameter(s) {', '.join(sorted(unknown))}")
    if kind == "exact":
        return ExactIndex(features)
    faiss = _faiss()
    if kind == "ivf":
        nlist = int(params.get("nlist") or max(1, min(n // 39, round(n / IVF_POINTS_PER_CELL))))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(params.get("seed", 0))
        index.train(features)
        index.add(features)
        index.make_direct_map()  # rows' features back from the index (``vectors``), with no copy kept beside it
        index.nprobe = int(params.get("nprobe", IVF_NPROBE))
        log.info("ivf index: %d rows, d = %d, %d cells, nprobe %d", n, d, nlist, index.nprobe)
    else:
        index = faiss.IndexHNSWFlat(d, int(params.get("m", HNSW_M)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("ef_construction", HNSW_EF_CONSTRUCTION))
        index.add(features)
        index.hnsw.efSearch = int(params.get("ef_search", HNSW_EF_SEARCH))
        log.info("hnsw index: %d rows, d = %d, M %d, efSearch %d", n, d, params.get("m", HNSW_M),
                 index.hnsw.efSearch)
    return FaissIndex(kind, index, n)


def recall_at_k(approximate_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k, both (m, k) rows (−1 never counts)."""
    approx = np.asarray(approximate_rows)
    exact = np.asarray(exact_rows)
    if approx.shape != exact.shape:
        raise ValueError(f"recall: approximate rows {approx.shape} and exact rows {exact.shape} differ in shape")
    m, k = exact.shape
    if m == 0 or k == 0:
        return math.nan
    hits = sum(np.intersect1d(a[a >= 0], e[e >= 0]).size for a, e in zip(approx, exact))
    return hits / (m * k)
