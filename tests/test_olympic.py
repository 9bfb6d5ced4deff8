"""The Olympic Sports protocol on the authors' real label files (shipped in cliquecnn_ray/data/olympic_sports)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.interpolate
import sklearn.metrics as sklm

from cliquecnn_ray import olympic

CATEGORIES = olympic.categories()


@pytest.fixture(scope="module")
def frame_counts() -> dict[str, int]:
    return {c: len(olympic.image_paths(c)) for c in CATEGORIES}


def random_features(frame_counts, d=8, seed=0, categories=CATEGORIES):
    rng = np.random.default_rng(seed)
    return {c: rng.standard_normal((frame_counts[c], d)).astype(np.float32) for c in categories}


def authors_loop(category, features, flipped=None):
    """The arithmetic of the authors' calculate_roc_auc.py, written out plainly: h5py rows, per anchor the
    scores sim[a, j] or sim_flip[a, j] by flipval, sklearn roc_curve, scipy interp1d (linear) at 101 FPR
    points, the mean over anchors, sklearn auc of the mean curve (our scores come from features)."""
    flipped = features if flipped is None else flipped
    grid = np.linspace(0, 1, num=101, endpoint=True)
    curves = []
    with h5py.File(olympic.DATA_DIR / olympic.LABELS_SUBDIR / f"labels_{category}.hdf5", "r") as f:
        for i, anchor in enumerate(f["anchors"][()]):
            ids = np.hstack([np.asarray(f["pos_ids"][i]), np.asarray(f["neg_ids"][i])]).astype(int)
            labels = np.hstack([np.ones(len(f["pos_ids"][i]), bool), np.zeros(len(f["neg_ids"][i]), bool)])
            flips = np.hstack([np.asarray(f["pos_flipvals"][i]), np.asarray(f["neg_flipvals"][i])]).astype(bool)
            query = features[anchor].astype(np.float64)
            scores = [float(query @ (flipped[j] if fl else features[j]).astype(np.float64))
                      for j, fl in zip(ids, flips)]
            fpr, tpr, _ = sklm.roc_curve(labels, scores, pos_label=1)
            curves.append(scipy.interpolate.interp1d(fpr, tpr, kind="linear", bounds_error=True)(grid))
    return sklm.auc(grid, np.mean(curves, axis=0))


def test_label_files_and_image_lists_are_consistent(frame_counts):
    assert len(CATEGORIES) == 16 and CATEGORIES == sorted(CATEGORIES)
    assert sum(frame_counts.values()) == 113_516
    offset, anchors = 0, 0
    for c in CATEGORIES:
        labels = olympic.read_labels(c)
        assert labels.offset == offset, c  # category_offset = frames of the categories before it
        assert labels.max_id < frame_counts[c]
        offset += frame_counts[c]
        anchors += len(labels.anchors)
    assert anchors == 1033


def test_read_labels_matches_h5py_rows_in_both_layouts():
    # basketball_layup stores neg_ids as variable-length rows, bowling as a fixed (66, 10) array.
    for c in ("basketball_layup", "bowling"):
        labels = olympic.read_labels(c)
        with h5py.File(olympic.DATA_DIR / olympic.LABELS_SUBDIR / f"labels_{c}.hdf5", "r") as f:
            for i in (0, len(labels.anchors) - 1):
                row = labels.ids[i][labels.valid[i]]
                pos = np.asarray(f["pos_ids"][i])
                np.testing.assert_array_equal(row, np.r_[pos, np.asarray(f["neg_ids"][i])])
                assert labels.positive[i][labels.valid[i]].sum() == len(pos)
                np.testing.assert_array_equal(
                    labels.flip[i][labels.valid[i]],
                    np.r_[np.asarray(f["pos_flipvals"][i]), np.asarray(f["neg_flipvals"][i])].astype(bool))


def test_one_anchor_by_hand(frame_counts):
    # bowling's first anchor (frame 5257) has 10 positives, 10 negatives, no flips. Scores: 9 positives at 2,
    # 1 positive at 0, every negative at 1 → AUC 9/10; the ROC rises to 0.9 at FPR 0, stays there, and
    # reaches 1 at FPR 1: interpolated TPR 0.9 at every grid point but the last (1.0).
    labels = olympic.read_labels("bowling")
    assert labels.anchors[0] == 5257
    pos = labels.ids[0][labels.positive[0]]
    neg = labels.ids[0][labels.valid[0] & ~labels.positive[0]]
    assert len(pos) == 10 and len(neg) == 10 and not labels.flip[0].any()
    feats = np.zeros((frame_counts["bowling"], 8), np.float32)
    feats[5257, 0] = 1.0
    feats[pos[:9], 0] = 2.0
    feats[pos[9], 0] = 0.0
    feats[neg, 0] = 1.0
    m = olympic.anchor_metrics(labels, feats)
    assert m["auc"][0] == pytest.approx(0.9)
    np.testing.assert_allclose(m["tpr"][0], np.r_[np.full(100, 0.9), 1.0])


def test_separating_features_give_auc_one(frame_counts):
    # A Gram matrix G = D + S with S[a, j] = +1 for the labelled positives of anchor a, −1 for its negatives
    # (symmetric) and D diagonal dominant is positive definite; its Cholesky factor gives features with
    # φ_a·φ_j = S[a, j]: every positive above every negative for every anchor → AUC 1.0 for the category.
    cat = "diving_platform_10m"
    labels = olympic.read_labels(cat)
    involved = np.unique(np.r_[labels.anchors, labels.ids[labels.valid]])
    where = {f: i for i, f in enumerate(involved)}
    s = np.zeros((len(involved), len(involved)))
    for a, anchor in enumerate(labels.anchors):
        for j, is_pos in zip(labels.ids[a][labels.valid[a]], labels.positive[a][labels.valid[a]]):
            s[where[anchor], where[j]] = s[where[j], where[anchor]] = 1.0 if is_pos else -1.0
    gram = s + np.diag(np.abs(s).sum(1) + 1.0)
    feats = np.zeros((frame_counts[cat], len(involved)), np.float32)
    feats[involved] = np.linalg.cholesky(gram)
    out = olympic.olympic_auc({cat: feats})
    assert out["per_category"][cat]["auc_mean_roc"] == pytest.approx(1.0)
    assert out["per_category"][cat]["auc"] == pytest.approx(1.0)
    assert out["auc_mean_roc"] == pytest.approx(1.0) and out["n_categories"] == 1


def test_random_features_score_about_one_half(frame_counts):
    out = olympic.olympic_auc(random_features(frame_counts))
    assert out["n_categories"] == 16 and out["n_anchors"] == 1033 and out["skipped_anchors"] == 0
    assert abs(out["auc_mean_roc"] - 0.5) < 0.03
    assert out["auc_mean_roc"] == pytest.approx(np.mean([m["auc_mean_roc"] for m in out["per_category"].values()]))


def test_every_category_equals_the_authors_loop_with_flips(frame_counts):
    feats = random_features(frame_counts, seed=1)
    flipped = random_features(frame_counts, seed=2)
    out = olympic.olympic_auc(feats, flipped)
    for c in CATEGORIES:
        expected = authors_loop(c, feats[c], flipped[c])
        assert out["per_category"][c]["auc_mean_roc"] == pytest.approx(expected, abs=1e-9), c
        assert out["per_category"][c]["flipped_candidates"] == int(olympic.read_labels(c).flip.sum())


def test_flipvals_choose_the_flipped_features(frame_counts):
    # Anchor features e0; positives −e0 and negatives +½e0 (AUC 0 without flips); every flipped frame +e0.
    # With flips a candidate with flipval 1 scores 1: a flipped positive beats unflipped negatives (0.5) and
    # ties flipped negatives; expected per-anchor AUC from those scores by the Mann–Whitney count.
    cat = "discus_throw"
    labels = olympic.read_labels(cat)
    feats = np.zeros((frame_counts[cat], 8), np.float32)
    feats[labels.ids[labels.valid & ~labels.positive], 0] = 0.5
    feats[labels.ids[labels.valid & labels.positive], 0] = -1.0
    feats[labels.anchors, 0] = 1.0  # anchors last: an anchor that is also a candidate stays e0
    flipped = np.zeros_like(feats)
    flipped[:, 0] = 1.0
    with_flips = olympic.anchor_metrics(labels, feats, flipped)
    without = olympic.anchor_metrics(labels, feats)
    changed = 0
    for a in range(len(labels.anchors)):
        v = labels.valid[a]
        ids, pos, flip = labels.ids[a][v], labels.positive[a][v], labels.flip[a][v]
        base = feats[ids, 0]  # score against e0 without flips
        scores = np.where(flip, 1.0, base)
        sp, sn = scores[pos], scores[~pos]
        expected = ((sp[:, None] > sn[None]).sum() + 0.5 * (sp[:, None] == sn[None]).sum()) / (len(sp) * len(sn))
        assert with_flips["auc"][a] == pytest.approx(expected), a
        assert without["auc"][a] == pytest.approx(((base[pos][:, None] > base[~pos][None]).sum()
                                                   + 0.5 * (base[pos][:, None] == base[~pos][None]).sum())
                                                  / (pos.sum() * (~pos).sum())), a
        changed += with_flips["auc"][a] != pytest.approx(without["auc"][a])
    assert changed >= 10  # discus_throw has 317 flipped candidates: flips must matter for many anchors
    assert olympic.olympic_auc({cat: feats}, {cat: flipped})["auc_mean_roc"] == pytest.approx(
        authors_loop(cat, feats, flipped), abs=1e-9)


def test_wrong_frame_counts_and_categories_are_named(frame_counts):
    with pytest.raises(olympic.OlympicLabelsError, match="vault.*8106 rows.*8107 frames"):
        olympic.olympic_auc({"vault": np.zeros((frame_counts["vault"] - 1, 4), np.float32)})
    with pytest.raises(olympic.OlympicLabelsError, match="curling"):
        olympic.olympic_auc({"curling": np.zeros((3, 4), np.float32)})


def test_query_labels_table_uses_global_frame_ids():
    table = olympic.query_labels_table()
    assert table.num_rows == 1033
    rows = table.to_pylist()
    basket, bowling = olympic.read_labels("basketball_layup"), olympic.read_labels("bowling")
    assert rows[0]["query_id"] == basket.anchors[0]  # offset 0
    first_bowling = rows[len(basket.anchors)]
    assert first_bowling["query_id"] == 5257 + 6301
    assert first_bowling["positive_ids"] == (bowling.ids[0][bowling.positive[0]] + 6301).tolist()
    videos, index = olympic.frame_keys("bowling")
    assert len(videos) == len(index) == 9959 and index[0] == 0 and videos[0] == "-LFUVGaasAc_00240_00338"
