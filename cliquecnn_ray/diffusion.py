"""Diffusion re-ranking on the k-NN graph of a database (Iscen et al., CVPR 2017, "Efficient diffusion on
region manifolds"; Zhou et al. 2003).

The database graph is the reciprocal k-NN graph of the frames: a_ij = max(s_ij, 0)^γ where j is among the k
nearest neighbours of i AND i among those of j, zero diagonal; S = D^-1/2 A D^-1/2 its symmetric
normalisation. A query's signal y holds its initial similarities to its own top-k database items, raised to
γ (zero elsewhere); its diffused scores solve (I − αS) f = y, by conjugate gradient on the sparse system
(I − αS is symmetric positive definite for 0 ≤ α < 1). Items are then ranked by f: an item reached through
a chain of mutually close frames climbs above one that is merely close to the query.

Truncation (the paper's large-scale mode): the system is solved on the subgraph of a query's initial top
results only (``rerank``'s ``query_rows``): S restricted to them, normalised over the whole graph. Memory is
N·k for the graph and m² at most per query for m initial results; never N×N.

The graph is built from a run's neighbours tables (``load_knn_graph``): the top-k of every frame within its
category, so no edge crosses categories. Pure numpy / scipy; never imports ray.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

log = logging.getLogger(__name__)

GAMMA = 3.0  # Iscen et al.: s^3 keeps strong edges and mutes weak ones
TOLERANCE = 1e-6  # CG relative residual: far below the gaps between ranked scores
MAX_ITERATIONS = 100  # CG converges in ~20 iterations at α = 0.99 on k-NN graphs (paper Sect. 5)


@dataclass(frozen=True)
class KnnGraph:
    """The normalised reciprocal k-NN graph of a database.

    Attributes:
        frame_ids: (N,) int64, ascending: row i of the graph is frame ``frame_ids[i]`` (the row order of a
            round's features table sorted by frame_id).
        normalised: (N, N) sparse CSR, S = D^-1/2 A D^-1/2, symmetric, zero diagonal, ≤ k entries per row.
        k: neighbours per frame the graph was built from.
        gamma: the exponent γ of the affinities (a query's signal uses the same γ).
    """

    frame_ids: np.ndarray
    normalised: sp.csr_matrix
    k: int
    gamma: float

    def __len__(self) -> int:
        return len(self.frame_ids)

    def rows_of(self, frame_ids: np.ndarray) -> np.ndarray:
        """Graph rows of ``frame_ids`` (M,) → (M,) int64; KeyError naming the first frame not in the graph."""
        wanted = np.asarray(frame_ids, dtype=np.int64).reshape(-1)
        at = np.minimum(np.searchsorted(self.frame_ids, wanted), max(len(self.frame_ids) - 1, 0))
        missing = self.frame_ids[at] != wanted if len(self.frame_ids) else np.ones(len(wanted), dtype=bool)
        if missing.any():
            raise KeyError(f"frame_id {int(wanted[np.argmax(missing)])} is not in the k-NN graph")
        return at


def reciprocal_affinity(neighbour_rows: np.ndarray, neighbour_sims: np.ndarray, gamma: float = GAMMA) -> sp.csr_matrix:
    """The reciprocal k-NN affinity matrix A of N items.

    Args:
        neighbour_rows: (N, k) int, row i lists the rows of i's k nearest neighbours; −1 pads shorter lists.
        neighbour_sims: (N, k) their similarities s_ij.
        gamma: exponent γ.
    Returns (N, N) CSR float64, symmetric: a_ij = max(s_ij, 0)^γ where j lists i and i lists j (the smaller
    of the two listed similarities where they differ by rounding), zero diagonal and zero elsewhere.
    """
    rows = np.asarray(neighbour_rows, dtype=np.int64)
    sims = np.asarray(neighbour_sims, dtype=np.float64)
    if rows.shape != sims.shape or rows.ndim != 2:
        raise ValueError(f"neighbour rows {rows.shape} and similarities {sims.shape} must both be (N, k)")
    n = rows.shape[0]
    if rows.size and rows.max() >= n:
        raise ValueError(f"neighbour row {int(rows.max())} is out of range for {n} items")
    keep = (rows >= 0) & (rows != np.arange(n)[:, None]) & np.isfinite(sims) & (sims > 0)
    src = np.broadcast_to(np.arange(n)[:, None], rows.shape)[keep]
    directed = sp.csr_matrix((sims[keep] ** gamma, (src, rows[keep])), shape=(n, n))
    directed.sum_duplicates()
    # Elementwise minimum against the transpose keeps an entry only where both directions exist.
    return directed.minimum(directed.T).tocsr()


def normalise(affinity: sp.spmatrix) -> sp.csr_matrix:
    """S = D^-1/2 A D^-1/2 with D = diag(A·1); an isolated item (degree 0) keeps a zero row."""
    degree = np.asarray(affinity.sum(axis=1)).reshape(-1)
    inv_sqrt = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    scale = sp.diags(inv_sqrt)
    return (scale @ affinity @ scale).tocsr()


def knn_graph(
    frame_ids: np.ndarray,
    neighbour_ids: np.ndarray,
    neighbour_sims: np.ndarray,
    k: int | None = None,
    gamma: float = GAMMA,
) -> KnnGraph:
    """The KnnGraph of frames from their neighbour lists (a neighbours table's nn_ids / nn_sims).

    Args:
        frame_ids: (N,) int64 frame ids, ascending and unique.
        neighbour_ids: (N, K) frame ids of each frame's nearest neighbours, most similar first; −1 pads.
        neighbour_sims: (N, K) their similarities.
        k: use each frame's first k neighbours (default all K); more than K is an error.
    """
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    if frame_ids.size > 1 and (np.diff(frame_ids) <= 0).any():
        raise ValueError("knn_graph: frame_ids must be ascending and unique")
    neighbour_ids = np.asarray(neighbour_ids, dtype=np.int64)
    available = neighbour_ids.shape[1] if neighbour_ids.ndim == 2 else 0
    k = available if k is None else int(k)
    if k < 1 or k > available:
        raise ValueError(f"knn_graph: k = {k} must be between 1 and the {available} neighbours listed per frame")
    ids = neighbour_ids[:, :k]
    sims = np.asarray(neighbour_sims)[:, :k]
    listed = ids >= 0
    rows = np.full(ids.shape, -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(frame_ids, ids[listed]), max(len(frame_ids) - 1, 0))
    unknown = frame_ids[at] != ids[listed]
    if unknown.any():
        raise ValueError(f"knn_graph: neighbour frame_id {int(ids[listed][np.argmax(unknown)])} has no row")
    rows[listed] = at
    affinity = reciprocal_affinity(rows, sims, gamma)
    graph = KnnGraph(frame_ids=frame_ids, normalised=normalise(affinity), k=k, gamma=float(gamma))
    log.info("k-NN graph: %d frames, k = %d, %d reciprocal edges, %d isolated frames", len(frame_ids), k,
             affinity.nnz // 2, int((np.diff(affinity.indptr) == 0).sum()))
    return graph


def diffuse(normalised: sp.spmatrix, y: np.ndarray, alpha: float, tol: float = TOLERANCE,
            maxiter: int = MAX_ITERATIONS) -> np.ndarray:
    """Solve (I − αS) f = y by conjugate gradient. ``normalised`` (m, m) symmetric S (a whole graph or a
    principal submatrix of one), ``y`` (m,) → f (m,) float64."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"diffusion: alpha must be in [0, 1), got {alpha}")
    y = np.asarray(y, dtype=np.float64)
    if not y.any():
        return np.zeros_like(y)
    system = sp.identity(normalised.shape[0], format="csr") - alpha * normalised
    f, info = cg(system, y, rtol=tol, maxiter=maxiter)
    if info > 0:
        log.debug("diffusion: CG stopped after %d iterations above tolerance %g", info, tol)
    return f


def rerank(
    graph: KnnGraph,
    query_rows: np.ndarray,
    query_scores: np.ndarray,
    k: int,
    alpha: float,
    seeds: int | None = None,
    tol: float = TOLERANCE,
    maxiter: int = MAX_ITERATIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank a query's initial results by diffusion on the graph restricted to them (truncation).

    Args:
        graph: the database's KnnGraph.
        query_rows: (m,) graph rows of the query's initial top results (e.g. an index search's rows; −1,
            padding, is ignored); the diffusion runs on the subgraph of these rows, so pass more than k
            (a few hundred to a few thousand) for items to climb from below the initial top k.
        query_scores: (m,) their initial similarities to the query.
        k: results returned (at most the number of distinct rows given).
        alpha: α in [0, 1): how far scores spread along the graph (0: the initial ranking of the seeds).
        seeds: the query's signal y holds the γ-th powers of its `seeds` most similar results (default
            ``graph.k``, the paper's choice), the others start at 0.
    Returns:
        rows (k,) int64 graph rows, best first, and their diffused scores f (k,) float64. Rows the
        diffusion does not reach (f = 0) follow the reached ones in their initial order.
    """
    rows = np.asarray(query_rows, dtype=np.int64).reshape(-1)
    scores = np.asarray(query_scores, dtype=np.float64).reshape(-1)
    if rows.shape != scores.shape:
        raise ValueError(f"rerank: {rows.shape[0]} rows but {scores.shape[0]} scores")
    valid = rows >= 0
    rows, scores = rows[valid], scores[valid]
    rows, first = np.unique(rows, return_index=True)  # a row listed twice counts once
    scores = scores[first]
    if rows.size and rows[-1] >= len(graph):
        raise ValueError(f"rerank: row {int(rows[-1])} is out of range for a graph of {len(graph)} frames")
    initial = np.argsort(-scores, kind="stable")
    rows, scores = rows[initial], scores[initial]
    y = np.zeros(len(rows))
    n_seeds = graph.k if seeds is None else int(seeds)
    y[:n_seeds] = np.maximum(scores[:n_seeds], 0.0) ** graph.gamma
    f = diffuse(graph.normalised[rows][:, rows], y, alpha, tol, maxiter)
    f = np.maximum(f, 0.0)  # f ≥ 0 exactly; CG leaves rounding noise around 0 on unreached rows
    order = np.lexsort((np.arange(len(rows)), -f))  # by f, ties (f = 0) in the initial order
    top = order[: max(0, int(k))]
    return rows[top], f[top]


def load_knn_graph(run: str, round_index: int, k: int, gamma: float = GAMMA, table: tuple | None = None) -> KnnGraph:
    """The KnnGraph of round ``round_index``'s features of ``run``, from that round's committed neighbours
    table (its first ``k`` neighbours per frame; ``table``: as ``similarity.read_neighbours`` gives it, when
    the caller has read it already). Rows follow the round's features in ascending frame_id.

    A round without a neighbours table (the last round's features) needs the ordinary stage run first:
    ``cliquecnn neighbours --run RUN --round R`` (the error says so).
    """
    # Reading a run is I/O, kept out of the module's imports so the math above stays numpy / scipy.
    from . import rundir, schema
    from .similarity import read_neighbours

    table_dir = rundir.StageDir(run, round_index, "neighbours")
    if table_dir.record() is None:
        raise rundir.StageNotCommitted(
            f"{table_dir}: no committed neighbours table for round {round_index} of {run}; compute it with "
            f"`cliquecnn neighbours --run {run} --round {round_index}` (with the run's --config)"
        )
    ids, extremes = table if table is not None else read_neighbours(table_dir)
    features_ids = rundir.StageDir(run, round_index, "features").read_table([schema.FRAME_ID])
    features_ids = np.sort(features_ids.column(schema.FRAME_ID).to_numpy().astype(np.int64))
    if not np.array_equal(ids, features_ids):
        raise schema.SchemaError(
            f"{table_dir}: its {len(ids)} frames are not the {len(features_ids)} frames of the round's features; "
            f"recompute it with `cliquecnn neighbours --run {run} --round {round_index} --force`"
        )
    if k > extremes.k:
        raise ValueError(f"{table_dir}: k = {k} asked, the table lists {extremes.k} neighbours per frame")
    return knn_graph(ids, extremes.nn_ids, extremes.nn_sims, k=k, gamma=gamma)


def initial_results(queries: np.ndarray, pool_features: np.ndarray, m: int, exclude: np.ndarray,
                    chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``m`` most similar pool rows, best first, leaving out its own row (leave-one-out).

    Args:
        queries: (R, d) query features; pool_features (P, d); exclude (R,) the pool row of each query (−1: none).
    Returns (rows (R, m) int64 pool rows, scores (R, m) float32), m clamped to what the pool offers.
    """
    m = min(int(m), len(pool_features) - 1 if (np.asarray(exclude) >= 0).any() else len(pool_features))
    rows = np.empty((len(queries), max(m, 0)), dtype=np.int64)
    scores = np.empty((len(queries), max(m, 0)), dtype=np.float32)
    if m < 1:
        return rows, scores
    for lo in range(0, len(queries), chunk):
        sims = queries[lo : lo + chunk] @ pool_features.T  # (chunk, P)
        own = np.asarray(exclude[lo : lo + chunk])
        mine = np.flatnonzero(own >= 0)
        sims[mine, own[mine]] = -np.inf
        top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
        top_scores = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        rows[lo : lo + chunk] = np.take_along_axis(top, order, 1)
        scores[lo : lo + chunk] = np.take_along_axis(top_scores, order, 1)
    return rows, scores


class DiffusionRescorer:
    """Re-scores blocks of evaluation queries by diffusion, for ``metrics.class_partial``'s ``rescore``.

    Each query's initial results are its ``truncate`` most similar frames of a pool (its category's frames,
    labelled or not: the graph's paths run through all of them), itself left out; ``rerank`` diffuses them.
    The evaluated items among the reached results take scores above every initial score, in diffusion
    order; the other items keep their initial scores below them. Memory: the pool's features (P, d), the
    graph (N·k), and ``chunk`` × P initial similarities at a time.
    """

    def __init__(
        self,
        graph: KnnGraph,
        pool_rows: np.ndarray,
        pool_features: np.ndarray,
        item_rows: np.ndarray,
        alpha: float,
        truncate: int,
        seeds: int | None = None,
        initial: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """
        Args:
            graph: the round's KnnGraph.
            pool_rows: (P,) graph rows initial results may come from (one category's frames).
            pool_features: (P, d) their features, normalised as the evaluation's (a dot product is its score).
            item_rows: (N,) graph row of each evaluated item, in the order of the evaluation's features.
            alpha, seeds: as ``rerank``; truncate: initial results diffused per query (> seeds).
            initial: the ``initial_results`` of every item (rows (N, ≥ truncate) into the pool, scores),
                when already computed (settings compared on the same queries); else computed per block.
        """
        self.graph = graph
        self.pool_rows = np.asarray(pool_rows, dtype=np.int64)
        self.pool_features = np.ascontiguousarray(pool_features, dtype=np.float32)
        self.alpha, self.truncate, self.seeds, self.initial = float(alpha), int(truncate), seeds, initial
        self.pool_of_row = np.full(len(graph), -1, dtype=np.int64)
        self.pool_of_row[self.pool_rows] = np.arange(len(self.pool_rows))
        self.item_pool = self.pool_of_row[np.asarray(item_rows, dtype=np.int64)]
        if (self.item_pool < 0).any():
            raise ValueError(f"diffusion: evaluated graph row {int(item_rows[np.argmax(self.item_pool < 0)])} is "
                             "not in the candidate pool")
        self.pool_item = np.full(len(self.pool_rows), -1, dtype=np.int64)
        self.pool_item[self.item_pool] = np.arange(len(self.item_pool))

    def __call__(self, positions: np.ndarray, sims):
        """``positions`` (R,) of the queries among the evaluated items, ``sims`` (R, N) their initial scores
        (a torch tensor or an array, modified in place and returned)."""
        positions = np.asarray(positions, dtype=np.int64)
        values = sims.numpy() if hasattr(sims, "numpy") else sims
        query_pool = self.item_pool[positions]
        if self.initial is not None:
            top, top_scores = (a[positions, : self.truncate] for a in self.initial)
        else:
            top, top_scores = initial_results(self.pool_features[query_pool], self.pool_features, self.truncate,
                                              exclude=query_pool)
        for cand, cand_scores, row in zip(top, top_scores, values):
            got, f = rerank(self.graph, self.pool_rows[cand], cand_scores, k=len(cand), alpha=self.alpha,
                            seeds=self.seeds)
            reached = f > 0
            items = self.pool_item[self.pool_of_row[got[reached]]]
            keep = items >= 0
            if keep.any():
                base = np.max(row[np.isfinite(row)]) + 1.0
                row[items[keep]] = base + f[reached][keep] / f[reached][keep].max()
        return sims
