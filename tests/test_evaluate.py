"""Evaluation metrics (docs/evaluation.md): hand-checked cases, sklearn equivalence, sharded = one-shot, the stage."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cliquecnn_ray import metrics, schema, similarity, storage
from cliquecnn_ray.config import PipelineConfig
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.similarity import ltp_stack
from tests.synthetic import clustered_features, commit_table, frames_table


def unit(degrees) -> np.ndarray:
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_pearson_normalise_gives_correlations():
    x = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    z = similarity.pearson_normalise(x)
    np.testing.assert_allclose(z[0], np.array([-1, 0, 1]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(z[0] @ z[1], np.corrcoef(x[0], x[1])[0, 1], atol=1e-6)
    assert not z[2].any()  # a constant vector has no correlation: zero, not NaN


def test_ranking_metrics_hand_case_without_ties():
    # Ranked by score: N P P N N (3 negatives, 2 positives).
    # AUC: each positive is above 2 of the 3 negatives → 4/6. AP: precisions at the positives 1/2, 2/3 → 7/12.
    # ROC points (0,0) (1/3,0) (1/3,1) (1,1): TPR 0 below FPR 1/3, 1 from there on.
    m = metrics.ranking_metrics([[0.9, 0.8, 0.7, 0.6, 0.5]], [[False, True, True, False, False]])
    assert m["auc"][0] == pytest.approx(4 / 6)
    assert m["ap"][0] == pytest.approx(7 / 12)
    assert m["tpr"][0, 0] == 0.0 and m["tpr"][0, 33] == 0.0 and m["tpr"][0, 34] == 1.0
    # Interpolated precision: max precision at recall ≥ ρ: 2/3 for every ρ (reached at recall 1).
    np.testing.assert_allclose(m["precision"][0], 2 / 3)
    assert (m["n_pos"][0], m["n_neg"][0], m["skipped"][0]) == (2, 3, False)


def test_ranking_metrics_hand_case_with_ties_and_left_out_candidates():
    # Scores 0.9 (N), 0.5 (P), 0.5 (N), 0.1 (P); a 5th candidate (score 2.0, positive) is left out (valid
    # False), as a query is left out of its own database.
    # AUC: P@0.5 loses to N@0.9, ties N@0.5 (½); P@0.1 loses to both → 0.5 / 4 = 1/8.
    # AP (tied scores are one threshold): at 0.5 recall ½ precision 1/3, at 0.1 recall 1 precision 2/4
    # → ½·1/3 + ½·1/2 = 5/12.
    scores = [[0.9, 0.5, 0.5, 0.1, 2.0]]
    positive = [[False, True, False, True, True]]
    valid = [[True, True, True, True, False]]
    m = metrics.ranking_metrics(scores, positive, valid)
    assert m["auc"][0] == pytest.approx(1 / 8)
    assert m["ap"][0] == pytest.approx(5 / 12)
    # ROC (0,0) (½,0) (1,½) (1,1): a diagonal through the tie; TPR(FPR 0.75) = 0.25, TPR(1) = 1.
    assert m["tpr"][0, 75] == pytest.approx(0.25) and m["tpr"][0, 100] == 1.0


def test_ranking_metrics_skips_rows_without_positives_or_negatives():
    m = metrics.ranking_metrics([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]], [[True, True], [False, False], [True, False]],
                          [[True, True], [True, True], [True, False]])
    assert m["skipped"].tolist() == [True, True, True]  # row 3: its only negative is left out
    assert np.isnan(m["auc"]).all() and np.isnan(m["ap"]).all() and np.isnan(m["tpr"]).all()
    part = metrics.Partial.of_rows(m)
    assert (part.n_queries, part.skipped) == (0, 3)
    assert np.isnan(metrics.summarise(part)["auc"])


@pytest.mark.parametrize("levels", [3, 1000])
def test_ranking_metrics_equal_sklearn(levels):
    rng = np.random.default_rng(levels)
    scores = rng.integers(0, levels, size=(80, 40)).astype(np.float32)  # few levels: many ties
    positive = rng.random(scores.shape) < 0.3
    valid = rng.random(scores.shape) < 0.9
    m = metrics.ranking_metrics(scores, positive, valid)
    checked = 0
    for i in range(len(scores)):
        y, s = positive[i][valid[i]], scores[i][valid[i]]
        if y.all() or not y.any():
            assert m["skipped"][i]
            continue
        checked += 1
        assert m["auc"][i] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m["ap"][i] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s)
        np.testing.assert_allclose(m["tpr"][i], np.interp(metrics.GRID, fpr, tpr), atol=1e-12)
    assert checked > 70


def test_mean_roc_auc_conventions():
    assert metrics.mean_roc_auc(np.ones(101)) == pytest.approx(1.0)
    assert metrics.mean_roc_auc(metrics.GRID) == pytest.approx(0.5)
    # scikit-learn's example forces (0, 0): half a grid step of area is lost from a perfect curve.
    assert metrics.mean_roc_auc(np.ones(101), start_at_origin=True) == pytest.approx(0.995)


def test_knn_vote_breaks_ties_by_summed_similarity_then_smallest_label():
    labels = [[0, 1, 1, 0, 2], [2, 1, 0, 1, 2], [1, 0, 2, 2, 2]]
    sims = [[0.9, 0.8, 0.7, 0.5, 0.4],  # 0 and 1 have two votes; sums 1.4 vs 1.5 → 1
            [0.5, 0.5, 0.9, 0.5, 0.5],  # 1 and 2 two votes, equal sums → smaller label 1
            [0.9, 0.9, 0.1, 0.1, 0.1]]  # 2 has three votes → 2, whatever the similarities
    assert metrics.knn_vote(labels, sims, n_labels=3).tolist() == [1, 1, 2]


# Six unit vectors in 2-D: class A at 0°, 10°, 20°; class B at 48°, 90°, 100° (similarity = cos of the angle).
# Every query but B@48° ranks its class first: AUC 1, AP 1, TPR 1 on the whole grid. B@48° sees A20 (28°),
# A10 (38°), B90 (42°), A0 (48°), B100 (52°): N N P N P → AUC 1/6, AP (1/3 + 2/5)/2 = 11/30; its ROC is
# (0,0) (1/3,0) (2/3,0) (2/3,½) (1,½) (1,1): TPR 0 up to FPR 0.66, ½ from 0.67 to 0.99, 1 at 1 →
# trapezoid area 0.0025 + 0.16 + 0.0075 = 0.17. k = 3: B@48°'s neighbours A20, A10, B90 vote A (wrong), the
# five others are right.
HAND_ANGLES = [0, 10, 20, 48, 90, 100]
HAND_LABELS = np.array([0, 0, 0, 1, 1, 1])


def test_class_partial_hand_case():
    part = metrics.class_partial(unit(HAND_ANGLES), HAND_LABELS, k=3, row_block=4)
    m = metrics.summarise(part)
    assert m["auc"] == pytest.approx((5 + 1 / 6) / 6)
    assert m["map"] == pytest.approx((5 + 11 / 30) / 6)
    assert m["knn"] == pytest.approx(5 / 6)
    assert m["auc_mean_roc"] == pytest.approx((5 + 0.17) / 6)
    assert (m["n_queries"], m["skipped_queries"]) == (6, 0)


def test_class_partial_sharded_equals_one_shot():
    feats, labels = clustered_features(n_clusters=4, per_cluster=15, d=8, noise=1.0, seed=3)
    one = metrics.class_partial(feats, labels, k=5, row_block=1000)
    parts = [metrics.class_partial(feats, labels, k=5, start=a, stop=b, row_block=4)
             for a, b in ((0, 7), (7, 31), (31, 60))]
    many = metrics.merge(parts)
    assert (many.n_queries, many.knn_correct, many.skipped) == (one.n_queries, one.knn_correct, one.skipped)
    assert many.auc_sum == pytest.approx(one.auc_sum) and many.ap_sum == pytest.approx(one.ap_sum)
    np.testing.assert_allclose(many.tpr_sum, one.tpr_sum)
    np.testing.assert_allclose(many.precision_sum, one.precision_sum)


def _reference_class_metrics(feats, labels, k, videos=None):
    """A straightforward loop: sklearn per query, brute-force kNN with the documented tie rule; with
    ``videos``, a query's candidates are the frames of the other clips."""
    z = feats - feats.mean(1, keepdims=True)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sims = z @ z.T
    aucs, aps, hits, tprs = [], [], [], []
    for i in range(len(z)):
        others = np.arange(len(z)) != i
        if videos is not None:
            others &= videos != videos[i]
        y, s = labels[others] == labels[i], sims[i, others]
        if y.all() or not y.any():
            continue
        aucs.append(roc_auc_score(y, s))
        aps.append(average_precision_score(y, s))
        fpr, tpr, _ = roc_curve(y, s)
        tprs.append(np.interp(metrics.GRID, fpr, tpr))
        top = np.argsort(-s, kind="stable")[:k]
        votes = {}
        for lab, sim in zip(labels[others][top], s[top]):
            count, total = votes.get(lab, (0, 0.0))
            votes[lab] = (count + 1, total + sim)
        best = sorted(votes.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[0][0]
        hits.append(best == labels[i])
    return np.mean(aucs), np.mean(aps), np.mean(hits), np.trapezoid(np.mean(tprs, 0), metrics.GRID), len(aucs)


def test_class_label_metrics_equal_a_straightforward_loop_per_category():
    rng = np.random.default_rng(0)
    feats, labels = clustered_features(n_clusters=3, per_cluster=12, d=6, noise=1.2, seed=1)
    feats = feats + rng.normal(0, 0.5, size=(1, 6)).astype(np.float32)  # a common offset: Pearson ≠ cosine
    labels = labels.astype(str)
    labels[0] = "alone"  # a class of one: no positive, skipped
    cats = np.where(np.arange(len(labels)) % 2 == 0, "even", "odd")
    result = metrics.class_label_metrics(feats, labels, categories=cats, k=5, memory_mb=0.001)
    assert set(result["per_category"]) == {"even", "odd"}
    for cat in ("even", "odd"):
        rows = np.flatnonzero(cats == cat)
        auc, ap, knn, auc_roc, n = _reference_class_metrics(feats[rows].astype(np.float64), labels[rows], 5)
        got = result["per_category"][cat]
        assert got["n_queries"] == n
        assert got["auc"] == pytest.approx(auc, abs=1e-6)
        assert got["map"] == pytest.approx(ap, abs=1e-6)
        assert got["knn"] == pytest.approx(knn)
        assert got["auc_mean_roc"] == pytest.approx(auc_roc, abs=1e-6)
    assert result["skipped_queries"] == 1 and result["per_category"]["even"]["skipped_queries"] == 1
    assert result["n_queries"] == len(labels) - 1
    assert result["auc_category_mean"] == pytest.approx(
        np.mean([result["per_category"][c]["auc"] for c in ("even", "odd")])
    )
    assert result["auc_mean_roc"] == pytest.approx(
        np.mean([result["per_category"][c]["auc_mean_roc"] for c in ("even", "odd")])
    )


def test_exclude_same_video_equals_a_brute_force_loop():
    feats, labels = clustered_features(n_clusters=3, per_cluster=16, d=6, noise=1.5, seed=4)
    videos = np.asarray([f"clip{i // 4}" for i in range(len(labels))])  # clips of 4 frames, one class each
    rng = np.random.default_rng(5)
    videos = videos[rng.permutation(len(videos))]  # clips cut across classes: some share, some not
    result = metrics.class_label_metrics(feats, labels, k=5, memory_mb=0.001, videos=videos)
    auc, ap, knn, auc_roc, n = _reference_class_metrics(feats.astype(np.float64), labels, 5, videos=videos)
    assert result["n_queries"] == n
    assert result["auc"] == pytest.approx(auc, abs=1e-6) and result["map"] == pytest.approx(ap, abs=1e-6)
    assert result["knn"] == pytest.approx(knn) and result["auc_mean_roc"] == pytest.approx(auc_roc, abs=1e-6)
    within = metrics.class_label_metrics(feats, labels, k=5)
    assert result["auc"] != pytest.approx(within["auc"])  # the option changes what is measured


def test_exclude_same_video_removes_a_near_duplicate_inflation():
    # Every clip holds two copies of one random vector; classes are random: within-clip AUC looks perfect
    # at kNN, cross-video evaluation sees chance.
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    feats = np.repeat(base, 2, axis=0) + rng.normal(0, 0.01, (80, 16)).astype(np.float32)
    labels = np.repeat(rng.integers(0, 2, 40), 2)
    videos = np.repeat(np.arange(40), 2)
    assert metrics.class_label_metrics(feats, labels, k=1)["knn"] == 1.0
    assert metrics.class_label_metrics(feats, labels, k=1, videos=videos)["knn"] < 0.75


def test_a_category_of_one_class_is_skipped_not_fatal():
    feats = unit([0, 10, 20, 30])
    result = metrics.class_label_metrics(feats, ["a", "a", "b", "b"], categories=["x", "x", "y", "y"], pearson=False)
    # Within each category every frame has only positives: nothing to rank against.
    assert result["n_queries"] == 0 and result["skipped_queries"] == 4
    assert np.isnan(result["auc"]) and result["knn"] is None and result["n_categories"] == 0


def test_candidate_label_metrics_hand_case():
    # Query 0 (0°) with positives at 10°, 80° and negatives at 30°, 90°: ranked P N P N →
    # AUC 3/4, AP (1 + 2/3)/2 = 5/6. Query 1 (90°): positive 80°, negative 0° → AUC 1, AP 1.
    feats = unit([0, 10, 30, 80, 90])
    positives, negatives = [np.array([1, 3]), np.array([3])], [np.array([2, 4]), np.array([0])]
    m = metrics.candidate_label_metrics(feats, [0, 4], positives, negatives, pearson=False)
    assert m["auc"] == pytest.approx((3 / 4 + 1) / 2)
    assert m["map"] == pytest.approx((5 / 6 + 1) / 2)
    assert m["knn"] is None and m["n_queries"] == 2


def test_format_metrics_table():
    text = metrics.format_metrics_table({
        "round 0": {"auc": 0.81234, "auc_mean_roc": 0.8, "knn": None, "map": 0.5, "n_queries": 10,
                    "skipped_queries": 0},
        "a much longer name": {"auc": float("nan")},
    })
    lines = text.splitlines()
    assert lines[0].split() == ["AUC", "AUC", "mean-ROC", "kNN", "mAP", "queries", "skipped"]
    assert "0.812" in lines[2] and lines[2].split()[-4] == "-" and lines[2].split()[-1] == "0"
    assert lines[3].startswith("a much longer name") and lines[3].split()[-1] == "-"


def test_row_block_for_bounds_memory():
    assert metrics.row_block_for(10_000, 1024) * 10_000 * metrics.BYTES_PER_ENTRY <= 1024 * 2**20
    assert metrics.row_block_for(10**9, 1) == 1


# ---------------------------------------------------------------------------------------------
# The stage


def _committed_run(tmp_path, n_per_video=6):
    """Two categories × two videos of n frames; 2-D features on a circle, classes by angle."""
    rng = np.random.default_rng(0)
    n = 4 * n_per_video
    videos = np.repeat(["v0", "v1", "v2", "v3"], n_per_video)
    index = np.tile(np.arange(n_per_video), 4)
    cats = np.where(np.isin(videos, ["v0", "v1"]), "cat_a", "cat_b")
    images = rng.integers(0, 255, size=(n, 8, 8), dtype=np.uint8)
    run = str(tmp_path / "run")
    commit_table(run, 0, "frames", frames_table(images, videos, index, cats))
    labels = np.where(index < n_per_video // 2, "early", "late")
    feats = unit(np.where(labels == "early", 10, 80) + rng.normal(0, 25, n))
    feats = np.concatenate([feats, rng.normal(0, 0.3, (n, 3)).astype(np.float32)], 1)
    commit_table(run, 0, "features", schema.features_to_table(np.arange(n), feats))
    return run, feats, labels, cats, videos, index


def _cfg(run, labels_uri, **evaluate):
    cfg = PipelineConfig(run=run)
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=labels_uri, **evaluate))


def test_stage_class_labels(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate as stage

    run, feats, labels, cats, _, _ = _committed_run(tmp_path)
    named = np.arange(2, len(labels))  # frames 0, 1 are not in the evaluation set
    labels_uri = str(tmp_path / "labels.parquet")
    storage.write_parquet(pa.table({"frame_id": pa.array(named[::-1], pa.int64()),
                                    "label": pa.array(labels[named][::-1])}), labels_uri)
    cfg = _cfg(run, labels_uri, queries_per_task=5, knn_k=3)
    record = stage.run(cfg, round_index=0)
    expected = metrics.class_label_metrics(feats[named], labels[named], categories=cats[named], k=3)
    stats = record["stats"]
    for key in ("auc", "auc_mean_roc", "auc_mean_roc_all_queries", "knn", "map", "n_queries", "skipped_queries"):
        assert stats[key] == pytest.approx(expected[key]), key
    assert set(stats["per_category"]) == {"cat_a", "cat_b"}
    assert stats["per_category"]["cat_a"]["n_queries"] == int((cats[named] == "cat_a").sum())
    out = StageDir(run, 0, "evaluate")
    result = json.loads(storage.read_bytes(out.file("metrics.json")))
    assert len(result["curves"]["all"]["mean_tpr"]) == 101 and result["protocol"]["similarity"] == "pearson"
    for name in ("roc.png", "pr.png"):
        assert storage.read_bytes(out.file(name))[:8] == b"\x89PNG\r\n\x1a\n"
    assert stage.run(cfg, round_index=0)["skipped"]  # same features, labels and config: committed output kept


def test_stage_ltp_and_one_category(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate as stage

    run, feats, labels, cats, videos, index = _committed_run(tmp_path)
    labels_uri = str(tmp_path / "labels.parquet")
    storage.write_parquet(pa.table({"frame_id": pa.array(np.arange(len(labels)), pa.int64()),
                                    "label": pa.array(labels)}), labels_uri)
    cfg = _cfg(run, labels_uri, category="cat_b")
    stats = stage.run(cfg, round_index=0, ltp_p=1, out_stage="evaluate_ltp")["stats"]
    pooled = ltp_stack(similarity.pearson_normalise(feats), videos, index, 1)  # Pearson per frame, then Eq. 9
    b = cats == "cat_b"
    expected = metrics.class_label_metrics(pooled[b], labels[b], pearson=False)
    assert list(stats["per_category"]) == ["cat_b"]
    assert stats["auc"] == pytest.approx(expected["auc"]) and stats["knn"] == pytest.approx(expected["knn"])
    assert StageDir(run, 0, "evaluate_ltp").record()["config"]["ltp_p"] == 1


def test_stage_exclude_same_video(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate as stage

    run, feats, labels, cats, videos, _ = _committed_run(tmp_path)
    labels_uri = str(tmp_path / "labels.parquet")
    storage.write_parquet(pa.table({"frame_id": pa.array(np.arange(len(labels)), pa.int64()),
                                    "label": pa.array(labels)}), labels_uri)
    stats = stage.run(_cfg(run, labels_uri, exclude_same_video=True, queries_per_task=5, knn_k=3), 0)["stats"]
    expected = metrics.class_label_metrics(feats, labels, categories=cats, k=3, videos=videos)
    for key in ("auc", "knn", "map", "n_queries"):
        assert stats[key] == pytest.approx(expected[key]), key


def test_stage_candidate_lists(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate as stage

    run, feats, labels, cats, _, _ = _committed_run(tmp_path)
    queries = [0, 3, 12]
    positives = [[1, 2], [4, 5], [13, 14, 15]]
    negatives = [[6, 9], [7, 8, 10], [18]]
    labels_uri = str(tmp_path / "queries.parquet")
    storage.write_parquet(pa.table({"query_id": pa.array(queries, pa.int64()),
                                    "positive_ids": pa.array(positives, pa.list_(pa.int64())),
                                    "negative_ids": pa.array(negatives, pa.list_(pa.int64()))}), labels_uri)
    stats = stage.run(_cfg(run, labels_uri, queries_per_task=1), round_index=0)["stats"]
    expected = metrics.candidate_label_metrics(feats, queries, [np.array(p) for p in positives],
                                         [np.array(n) for n in negatives], categories=cats[queries])
    assert stats["knn"] is None
    for key in ("auc", "auc_mean_roc", "map", "n_queries"):
        assert stats[key] == pytest.approx(expected[key]), key
    assert stats["per_category"]["cat_a"]["n_queries"] == 2


def test_stage_names_unknown_frame_ids(tmp_path, ray_session):
    from cliquecnn_ray.stages import evaluate as stage

    run, _, labels, _, _, _ = _committed_run(tmp_path)
    labels_uri = str(tmp_path / "labels.parquet")
    storage.write_parquet(pa.table({"frame_id": pa.array([0, 1, 777, 999], pa.int64()),
                                    "label": pa.array(["a", "b", "a", "b"])}), labels_uri)
    with pytest.raises(schema.SchemaError, match=r"frame_id.*2 frame id\(s\).*\[777, 999\]"):
        stage.run(_cfg(run, labels_uri), round_index=0)
    assert StageDir(run, 0, "evaluate").record() is None  # nothing committed

