"""Diffusion re-ranking: the sparse CG solve equals a dense solve of the same system, the graph keeps only
reciprocal edges, and diffusion finds items along a manifold that Euclidean similarity ranks low."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from cliquecnn_ray import diffusion, metrics, rundir, schema, similarity, storage
from cliquecnn_ray.config import PipelineConfig
from tests.synthetic import commit_table, frames_table


def exact_neighbours(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows (self excluded) of a dense (N, N) similarity matrix and their similarities, descending."""
    masked = sims.copy()
    np.fill_diagonal(masked, -np.inf)
    rows = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(sims, rows, 1)


def dense_normalised(sims: np.ndarray, k: int, gamma: float) -> np.ndarray:
    """S = D^-1/2 A D^-1/2 written out densely from the definition (the reference)."""
    n = len(sims)
    rows, _ = exact_neighbours(sims, k)
    listed = np.zeros((n, n), dtype=bool)
    listed[np.repeat(np.arange(n), k), rows.reshape(-1)] = True
    a = np.where(listed & listed.T, np.maximum(sims, 0) ** gamma, 0.0)
    d = a.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    return inv[:, None] * a * inv[None, :]


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    return x, sims


def test_graph_is_reciprocal_and_normalised_as_defined(tiny):
    _, sims = tiny
    rows, nn_sims = exact_neighbours(sims, 6)
    graph = diffusion.knn_graph(np.arange(40) * 10, rows * 10, nn_sims, gamma=3.0)
    np.testing.assert_allclose(graph.normalised.toarray(), dense_normalised(sims, 6, 3.0), atol=1e-12)
    assert abs(graph.normalised - graph.normalised.T).max() < 1e-15
    assert graph.normalised.diagonal().sum() == 0


def test_one_sided_neighbour_is_no_edge():
    # 0 lists 1, but 1 and 2 list each other: only the edge 1–2 survives.
    rows = np.array([[1], [2], [1]])
    sims = np.array([[0.9], [0.5], [0.5]])
    a = diffusion.reciprocal_affinity(rows, sims, gamma=2.0).toarray()
    np.testing.assert_allclose(a, [[0, 0, 0], [0, 0, 0.25], [0, 0.25, 0]])


def test_rerank_equals_dense_solve(tiny):
    _, sims = tiny
    rows, nn_sims = exact_neighbours(sims, 6)
    graph = diffusion.knn_graph(np.arange(40), rows, nn_sims, gamma=3.0)
    query = np.random.default_rng(1).normal(size=5)
    x = tiny[0]
    scores = x @ query / np.linalg.norm(query)
    alpha = 0.9
    s = dense_normalised(sims, 6, 3.0)
    # The whole graph as candidates, y from the top 6.
    y = np.zeros(40)
    top = np.argsort(-scores)[:6]
    y[top] = np.maximum(scores[top], 0) ** 3
    f = np.linalg.solve(np.eye(40) - alpha * s, y)
    got_rows, got_scores = diffusion.rerank(graph, np.arange(40), scores, k=40, alpha=alpha, seeds=6)
    np.testing.assert_allclose(got_scores, f[got_rows], rtol=1e-5, atol=1e-9)
    reached = f > 1e-9
    np.testing.assert_array_equal(got_rows[: reached.sum()], np.argsort(-f)[: reached.sum()])
    # Truncated to the initial top 15: the principal submatrix of S.
    cand = np.argsort(-scores)[:15]
    sub = s[np.ix_(cand, cand)]
    f_sub = np.linalg.solve(np.eye(15) - alpha * sub, np.where(np.arange(15) < 6, np.maximum(scores[cand], 0) ** 3, 0))
    got_rows, got_scores = diffusion.rerank(graph, cand, scores[cand], k=5, alpha=alpha, seeds=6)
    np.testing.assert_array_equal(got_rows, cand[np.argsort(-f_sub)[:5]])
    np.testing.assert_allclose(got_scores, np.sort(f_sub)[::-1][:5], rtol=1e-5)


def two_moons(per_moon: int = 80) -> np.ndarray:
    t = np.linspace(0, np.pi, per_moon)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    return np.concatenate([upper, lower])


def test_diffusion_follows_the_manifold():
    points = two_moons()
    sq = ((points[:, None] - points[None]) ** 2).sum(-1)
    sims = np.exp(-sq / 0.5)
    rows, nn_sims = exact_neighbours(sims, 5)
    graph = diffusion.knn_graph(np.arange(len(points)), rows, nn_sims, gamma=3.0)
    query = 0  # the upper moon's right tip, (1, 0)
    target = 40  # the upper moon's top, (0, 1): ~1.4 away along its own moon
    distractor = 80 + 40  # the lower moon's bottom, (1, -0.5): 0.5 away, across the gap
    assert sims[query, distractor] > sims[query, target]
    others = np.delete(np.arange(len(points)), query)
    got, scores = diffusion.rerank(graph, others, sims[query, others], k=len(others), alpha=0.99)
    rank = {int(r): i for i, r in enumerate(got)}
    assert rank[target] < rank[distractor]
    assert scores[rank[target]] > 0 and scores[rank[distractor]] == 0  # no path crosses the gap
    # Every upper-moon frame outranks every lower-moon frame: the whole manifold comes first.
    assert set(got[:79].tolist()) == set(range(1, 80))


def test_rerank_rejects_bad_input(tiny):
    _, sims = tiny
    rows, nn_sims = exact_neighbours(sims, 4)
    graph = diffusion.knn_graph(np.arange(40), rows, nn_sims)
    with pytest.raises(ValueError, match="alpha"):
        diffusion.rerank(graph, np.arange(5), np.ones(5), k=3, alpha=1.0)
    with pytest.raises(ValueError, match="out of range"):
        diffusion.rerank(graph, np.array([3, 40]), np.ones(2), k=1, alpha=0.5)
    with pytest.raises(ValueError, match="k = 5"):
        diffusion.knn_graph(np.arange(40), rows, nn_sims, k=5)
    got, _ = diffusion.rerank(graph, np.array([-1, 7, 7, 2]), np.array([9.0, 0.5, 0.5, 0.4]), k=10, alpha=0.5)
    assert sorted(got.tolist()) == [2, 7]  # padding dropped, a duplicate counted once, k clamped


def test_load_knn_graph_from_a_run(tmp_path, tiny):
    x, sims = tiny
    run = str(tmp_path / "run")
    ids = np.arange(40, dtype=np.int64) * 3
    rows, nn_sims = exact_neighbours(sims, 8)
    far = np.argsort(sims, axis=1)[:, :8]
    extremes = similarity.Extremes(ids[rows], nn_sims.astype(np.float32), ids[far],
                                   np.take_along_axis(sims, far, 1).astype(np.float32))
    with pytest.raises(rundir.StageNotCommitted, match="cliquecnn neighbours --run"):
        diffusion.load_knn_graph(run, 1, k=4)
    commit_table(run, 1, "features", schema.features_to_table(ids, x))
    commit_table(run, 1, "neighbours", similarity.extremes_to_table(ids[::-1], similarity.Extremes(
        *(a[::-1] for a in extremes))))
    graph = diffusion.load_knn_graph(run, 1, k=4)
    reference = diffusion.knn_graph(ids, ids[rows], nn_sims, k=4)
    np.testing.assert_array_equal(graph.frame_ids, ids)
    np.testing.assert_allclose(graph.normalised.toarray(), reference.normalised.toarray(), rtol=1e-6)
    np.testing.assert_array_equal(graph.rows_of([ids[5], ids[0]]), [5, 0])
    with pytest.raises(KeyError, match="frame_id 1 "):
        graph.rows_of([1])
    with pytest.raises(ValueError, match="lists 8"):
        diffusion.load_knn_graph(run, 1, k=9)



def sphere_moons(per_moon: int = 60) -> np.ndarray:
    """The two moons lifted onto the unit sphere: dot products fall with distance in the plane."""
    x = np.concatenate([two_moons(per_moon), np.full((2 * per_moon, 1), 2.0)], 1)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_evaluation_rescored_by_diffusion_separates_the_moons():
    feats = sphere_moons()
    labels = np.repeat([0, 1], 60)
    rows, nn_sims = exact_neighbours(feats @ feats.T, 5)
    graph = diffusion.knn_graph(np.arange(120), rows, nn_sims)
    items = np.arange(0, 120, 2)  # evaluated: every other frame; the rest are unlabelled frames on the paths
    plain = metrics.summarise(metrics.class_partial(feats[items], labels[items], k=3))
    rescorer = diffusion.DiffusionRescorer(graph, np.arange(120), feats, items, alpha=0.99, truncate=119)
    diffused = metrics.summarise(metrics.class_partial(feats[items], labels[items], k=3, rescore=rescorer))
    assert plain["map"] < 0.9 and diffused["map"] == pytest.approx(1.0)
    assert diffused["knn"] == 1.0
    # Initial results computed once (as the benchmark does for its candidates) give the same evaluation.
    initial = diffusion.initial_results(feats[items], feats, 119, exclude=items)
    cached = diffusion.DiffusionRescorer(graph, np.arange(120), feats, items, 0.99, 119, initial=initial)
    assert metrics.summarise(metrics.class_partial(feats[items], labels[items], k=3, rescore=cached)) == diffused


def test_evaluate_stage_with_diffusion(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate, neighbours

    feats = sphere_moons(30)
    labels = np.repeat(["upper", "lower"], 30)
    run = str(tmp_path / "run")
    images = np.random.default_rng(0).integers(0, 255, size=(60, 8, 8), dtype=np.uint8)
    commit_table(run, 0, "frames", frames_table(images))
    commit_table(run, 0, "features", schema.features_to_table(np.arange(60), feats))
    items = np.arange(1, 60, 2)
    labels_uri = str(tmp_path / "labels.parquet")
    storage.write_parquet(pa.table({"frame_id": pa.array(items, pa.int64()), "label": pa.array(labels[items])}),
                          labels_uri)
    cfg = PipelineConfig(run=run)
    dcfg = dataclasses.replace(cfg.evaluate.diffusion, k=4, alpha=0.95, truncate=40)
    cfg = dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, k=6), evaluate=dataclasses.replace(
        cfg.evaluate, labels=labels_uri, pearson=False, rerank="diffusion", diffusion=dcfg, queries_per_task=8))
    with pytest.raises(rundir.StageNotCommitted, match="neighbours"):
        evaluate.run(cfg, 0)
    neighbours.run(cfg, 0)
    stats = evaluate.run(cfg, 0)["stats"]
    graph = diffusion.load_knn_graph(run, 0, k=4)
    rescorer = diffusion.DiffusionRescorer(graph, np.arange(60), feats, items, alpha=0.95, truncate=40)
    codes, _ = metrics.encode_labels(labels[items])
    expected = metrics.summarise(metrics.class_partial(feats[items], codes, k=cfg.evaluate.knn_k, rescore=rescorer))
    plain = metrics.summarise(metrics.class_partial(feats[items], codes, k=cfg.evaluate.knn_k))
    assert stats["map"] == pytest.approx(expected["map"]) and stats["auc"] == pytest.approx(expected["auc"])
    assert stats["map"] > plain["map"]
    none = evaluate.run(dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, rerank="none")), 0,
                        out_stage="evaluate_plain")
    assert none["stats"]["map"] == pytest.approx(plain["map"])
    assert "diffusion" not in none["config"]["evaluate"]  # its settings do not change a plain evaluation
    with pytest.raises(ValueError, match="exceeds neighbours.k"):
        evaluate.run(dataclasses.replace(cfg, neighbours=dataclasses.replace(cfg.neighbours, k=3)), 0)
