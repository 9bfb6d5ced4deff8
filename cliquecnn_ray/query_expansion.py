"""Average query expansion (Chum et al., ICCV 2007): the query is replaced by the normalised sum of itself and
its n most similar frames, then searched again. The simple re-ranking that diffusion is measured against.

Pure numpy; never imports ray.
"""
from __future__ import annotations

import numpy as np

from .diffusion import initial_results


def expand_queries(queries: np.ndarray, pool_features: np.ndarray, neighbour_rows: np.ndarray) -> np.ndarray:
    """(m, d) queries → (m, d) L2-normalised q + Σ of their neighbours ``pool_features[neighbour_rows]``
    (neighbour_rows (m, n), e.g. the first n of ``diffusion.initial_results``)."""
    expanded = np.asarray(queries, dtype=np.float32) + pool_features[neighbour_rows].sum(1)
    norm = np.linalg.norm(expanded, axis=1, keepdims=True)
    return expanded / np.maximum(norm, 1e-12)


class QueryExpansionRescorer:
    """Re-scores blocks of evaluation queries by average query expansion, for ``metrics.class_partial``'s
    ``rescore``: each query expanded with its ``n`` most similar frames of its category's pool
    (``pool_features`` (P, d), itself left out), then scored against the evaluated items (``item_pool`` (N,):
    their rows in the pool). ``initial``: precomputed ``diffusion.initial_results`` of every item, if any."""

    def __init__(self, pool_features: np.ndarray, item_pool: np.ndarray, n: int,
                 initial: tuple[np.ndarray, np.ndarray] | None = None):
        self.pool_features = np.ascontiguousarray(pool_features, dtype=np.float32)
        self.item_pool = np.asarray(item_pool, dtype=np.int64)
        self.items = self.pool_features[self.item_pool]
        self.n, self.initial = int(n), initial

    def __call__(self, positions: np.ndarray, sims):
        positions = np.asarray(positions, dtype=np.int64)
        values = sims.numpy() if hasattr(sims, "numpy") else sims
        rows = self.item_pool[positions]
        if self.initial is not None:
            neighbours = self.initial[0][positions, : self.n]
        else:
            neighbours = initial_results(self.pool_features[rows], self.pool_features, self.n, exclude=rows)[0]
        values[:] = expand_queries(self.pool_features[rows], self.pool_features, neighbours) @ self.items.T
        return sims
