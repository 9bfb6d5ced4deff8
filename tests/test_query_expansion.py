"""Average query expansion: a hand-checked expansion, and leave-one-out (a query never expands with itself)."""
from __future__ import annotations

import numpy as np

from cliquecnn_ray import diffusion, metrics, query_expansion


def test_expand_queries_hand_case():
    pool = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    # Query 0 may not use itself: its nearest other row is 1, so q' = (1.8, 0.6) / |(1.8, 0.6)|.
    neighbours, _ = diffusion.initial_results(pool[[0, 2]], pool, 1, exclude=np.array([0, -1]))
    np.testing.assert_array_equal(neighbours, [[1], [2]])
    got = query_expansion.expand_queries(pool[[0, 2]], pool, neighbours)
    np.testing.assert_allclose(got[0], np.array([1.8, 0.6]) / np.hypot(1.8, 0.6), rtol=1e-6)
    np.testing.assert_allclose(got[1], [0.0, 1.0])  # row 2 used itself: 2·(0, 1), normalised


def test_rescorer_scores_expanded_queries_against_the_items():
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(30, 4)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    items = np.arange(0, 30, 3)
    labels = np.arange(len(items)) % 2
    rescorer = query_expansion.QueryExpansionRescorer(pool, items, n=2)
    sims = rescorer(np.array([1, 4]), np.zeros((2, len(items)), dtype=np.float32))
    full = pool[items[[1, 4]]] @ pool.T
    full[[0, 1], items[[1, 4]]] = -np.inf
    neighbours = np.argsort(-full, axis=1)[:, :2]
    np.testing.assert_allclose(sims, query_expansion.expand_queries(pool[items[[1, 4]]], pool, neighbours)
                               @ pool[items].T, rtol=1e-6)
    # Precomputed initial results give the same scores.
    cached = query_expansion.QueryExpansionRescorer(pool, items, n=2, initial=diffusion.initial_results(
        pool[items], pool, 5, exclude=items))
    np.testing.assert_allclose(cached(np.array([1, 4]), np.zeros_like(sims)), sims, rtol=1e-6)
    assert metrics.class_partial(pool[items], labels, k=1, rescore=rescorer).n_queries == len(items)
