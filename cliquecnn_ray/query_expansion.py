"""Average query expansion (Chum et al., ICCV 2007): the query is replaced by the normalised sum of itself and
its n most similar frames, then searched again. The simple re-ranking that diffusion is measured against.

Pure numpy; never imports ray.
"""
from __future__ import annotations

import numpy as np


def expand_queries(queries: np.ndarray, pool_features: np.ndarray, n: int,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """(m, d) queries → (m, d) L2-normalised q + Σ of its ``n`` most similar rows of ``pool_features`` (P, d).

    ``exclude`` (m,): a pool row each query may not use (itself, leave-one-out), −1 for none.
    """
    queries = np.asarray(queries, dtype=np.float32)
    if n < 1:
        return queries
    initial = queries @ pool_features.T
    if exclude is not None:
        mine = np.flatnonzero(np.asarray(exclude) >= 0)
        initial[mine, np.asarray(exclude)[mine]] = -np.inf
    top = np.argpartition(-initial, n - 1, axis=1)[:, :n]
    expanded = queries + pool_features[top].sum(1)
    norm = np.linalg.norm(expanded, axis=1, keepdims=True)
    return expanded / np.maximum(norm, 1e-12)


class QueryExpansionRescorer:
    """Re-scores blocks of evaluation queries by average query expansion, for ``metrics.class_partial``'s
    ``rescore``: each query expanded over its category's pool of frames (``pool_features`` (P, d)), then
    scored against the evaluated items (``item_pool`` (N,): their rows in the pool)."""

    def __init__(self, pool_features: np.ndarray, item_pool: np.ndarray, n: int, chunk: int = 256):
        self.pool_features = np.ascontiguousarray(pool_features, dtype=np.float32)
        self.item_pool = np.asarray(item_pool, dtype=np.int64)
        self.items = self.pool_features[self.item_pool]
        self.n, self.chunk = int(n), int(chunk)

    def __call__(self, positions: np.ndarray, sims):
        positions = np.asarray(positions, dtype=np.int64)
        values = sims.numpy() if hasattr(sims, "numpy") else sims
        for lo in range(0, len(positions), self.chunk):
            rows = self.item_pool[positions[lo : lo + self.chunk]]
            expanded = expand_queries(self.pool_features[rows], self.pool_features, self.n, exclude=rows)
            values[lo : lo + len(rows)] = expanded @ self.items.T
        return sims
