"""Inner-product search: exact equals a brute-force sort; the approximate kinds find most of exact's top-k
on clustered data of low intrinsic dimension (the case they are built for)."""
from __future__ import annotations

import numpy as np
import pytest

from cliquecnn_ray import ann
from tests.synthetic import clustered_features


def test_exact_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(7, 8)).astype(np.float32)
    scores, rows = ann.build_index(feats).search(queries, 10)
    full = queries @ feats.T
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-6)
    monkeypatch.setattr(ann, "COLUMN_BLOCK", 64)  # 7 queries, one at a time over blocks of 64 frames: the same
    np.testing.assert_array_equal(ann.build_index(feats).search(queries, 10)[1], expected)
    monkeypatch.setattr(ann, "GEMM_QUERIES", 2)  # 7 queries in one matrix product: the same
    np.testing.assert_array_equal(ann.build_index(feats).search(queries, 10)[1], expected)
    monkeypatch.setattr(ann, "BLOCK_BYTES", 4 * 300 * 2)  # blocks of two queries, one pass each: the same
    np.testing.assert_array_equal(ann.build_index(feats).search(queries, 10)[1], expected)
    # More than n asked: padded with row −1, score −inf.
    scores, rows = ann.build_index(feats[:3]).search(queries[:2], 5)
    assert rows.shape == (2, 5) and (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(ann.build_index(feats).vectors(np.array([5, 0, 299])), feats[[5, 0, 299]])


@pytest.mark.parametrize("kind, params", [("ivf", {"nprobe": 8}), ("hnsw", {})])
def test_approximate_recall_against_exact(kind, params):
    feats, _ = clustered_features(n_clusters=40, per_cluster=100, d=32, noise=0.5, seed=0)
    queries = feats[::40] + 0.05 * np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32)
    _, exact = ann.build_index(feats).search(queries, 10)
    index = ann.build_index(feats, kind, **params)
    scores, rows = index.search(queries, 10)
    assert rows.shape == (100, 10) and len(index) == len(feats)
    assert ann.recall_at_k(rows, exact) >= 0.9
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, feats[rows]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(index.vectors(np.array([7, 0, 3999])), feats[[7, 0, 3999]])


def test_recall_and_bad_input():
    assert ann.recall_at_k(np.array([[1, 2], [3, -1]]), np.array([[2, 5], [3, 4]])) == 0.5
    with pytest.raises(ValueError, match="not one of"):
        ann.build_index(np.ones((4, 2)), "lsh")
    with pytest.raises(ValueError, match="nprobe"):
        ann.build_index(np.ones((4, 2)), "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="d = 3"):
        ann.build_index(np.ones((4, 2))).search(np.ones((1, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        ann.build_index(np.array([[1.0, np.nan]]))
