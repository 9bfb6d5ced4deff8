"""Compact cliques (paper Sect. 2.2): seed cliques, merging, selection, S', and the Ray stage."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from cliquecnn_ray import linkage, schema, stage_outputs
from cliquecnn_ray.config import CliquesConfig, PipelineConfig
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.similarity import exact_extremes, extremes_to_table
from cliquecnn_ray.stages import cliques as stage
from tests import synthetic


def knn(feats: np.ndarray, k: int) -> np.ndarray:
    """Exact k nearest neighbours (N, k), most similar first, self excluded."""
    s = feats.astype(np.float64) @ feats.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def angles(degrees) -> np.ndarray:
    """Unit vectors in the plane at the given angles: s_ij = cos(θ_i − θ_j), checkable by hand."""
    t = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


def centred(feats: np.ndarray) -> np.ndarray:
    """Centre and L2-normalise, as the pipeline's features are (HOG-LDA whitening, Pearson CNN features)."""
    f = feats - feats.mean(axis=0)
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Seed cliques


def test_seed_clique_by_hand():
    # seed at 0°, neighbours at 10°, 20°, 90°, 100°: complete linkage joins {0,10} (d = 1 − cos 10°),
    # then {0,10,20} (1 − cos 20°), while {90,100} forms apart; a cut at cos 30° stops before 90°.
    feats = angles([0, 10, 20, 90, 100])
    videos = np.array([0, 1, 2, 3, 4])
    ids = np.array([7, 3, 9, 4])  # neighbour ids, most similar first; the seed's id is 5
    cfg = CliquesConfig(neighbourhood=4, min_sim=float(np.cos(np.radians(30))), target_size=20, max_per_video=0)
    assert linkage.seed_clique(5, ids, feats, videos, cfg).tolist() == [5, 7, 3]
    # target size 2: the merge that would make 3 frames is not taken
    assert linkage.seed_clique(5, ids, feats, videos, CliquesConfig(neighbourhood=4, min_sim=-1, target_size=2,
                                                              max_per_video=0)).tolist() == [5, 7]
    # size only (min_sim = −1): the seed's cluster grows until the size would pass target_size
    assert linkage.seed_clique(5, ids, feats, videos, CliquesConfig(neighbourhood=4, min_sim=-1, target_size=4,
                                                              max_per_video=0)).tolist() == [5, 7, 3]
    assert sorted(linkage.seed_clique(5, ids, feats, videos, CliquesConfig(neighbourhood=4, min_sim=-1, target_size=5,
                                                                     max_per_video=0)).tolist()) == [3, 4, 5, 7, 9]
    # neighbourhood 2 clusters only the seed and its two nearest
    assert linkage.seed_clique(5, ids, feats, videos, CliquesConfig(neighbourhood=2, min_sim=-1, target_size=20,
                                                              max_per_video=0)).tolist() == [5, 7, 3]


def test_seed_cliques_are_complete_linkage_cliques():
    feats, _ = synthetic.clustered_features(n_clusters=5, per_cluster=20, d=16, noise=0.6, seed=1)
    nn = knn(feats, 15)
    videos = np.arange(len(feats))
    cfg = CliquesConfig(neighbourhood=15, min_sim=0.6, target_size=12, max_per_video=0)
    sims = feats.astype(np.float64) @ feats.T
    sizes = []
    for seed, clique in enumerate(linkage.seed_cliques(np.arange(len(feats)), nn, feats, videos, cfg)):
        assert clique[0] == seed and len(set(clique.tolist())) == len(clique) <= cfg.target_size
        assert set(clique[1:].tolist()) <= set(nn[seed].tolist())
        block = sims[np.ix_(clique, clique)]
        assert block.min() >= cfg.min_sim - 1e-5  # every pair at least min_sim similar
        sizes.append(len(clique))
    assert 2 < np.mean(sizes) < cfg.target_size  # the cut is active, yet cliques are not trivial


def test_cliques_are_pure_on_separated_clusters():
    feats, labels = synthetic.clustered_features(n_clusters=6, per_cluster=30, d=64, noise=0.3, seed=2)
    nn = knn(feats, 20)
    videos = np.arange(len(feats))
    cfg = CliquesConfig(neighbourhood=20, min_sim=0.3, target_size=15, min_size=4, max_per_video=0,
                        num_cliques=12, max_size=20)
    for clique in linkage.seed_cliques(np.arange(len(feats)), nn, feats, videos, cfg):
        assert len(set(labels[clique].tolist())) == 1
    cliques, comp, _ = linkage.build_cliques(nn, feats, videos, cfg)
    assert len(cliques) == 12
    assert all(len(set(labels[c].tolist())) == 1 for c in cliques)
    assert len({labels[c[0]] for c in cliques}) == 6  # coverage: every cluster has a clique
    sims = feats.astype(np.float64) @ feats.T
    for c in cliques:  # merged cliques keep the complete-linkage property
        assert sims[np.ix_(c, c)].min() >= cfg.min_sim - 1e-5
    assert np.all(np.diff(comp) <= 0)  # most compact first


def test_max_per_video_is_honoured_and_the_seed_kept():
    feats, _ = synthetic.clustered_features(n_clusters=3, per_cluster=24, d=32, noise=0.3, seed=3)
    videos = np.arange(len(feats)) // 6  # each cluster is 4 videos of 6 frames
    nn = knn(feats, 20)
    cfg = CliquesConfig(neighbourhood=20, min_sim=0.2, target_size=12, min_size=3, max_per_video=2,
                        num_cliques=6, max_size=16)
    seeds = linkage.seed_cliques(np.arange(len(feats)), nn, feats, videos, cfg)
    for seed, clique in enumerate(seeds):
        assert clique[0] == seed
        assert np.bincount(videos[clique]).max() <= 2
    assert max(len(c) for c in seeds) == 8  # 4 videos × 2: the cap binds, the size counts after it
    cliques, _, _ = linkage.build_cliques(nn, feats, videos, cfg)
    assert all(np.bincount(videos[c]).max() <= 2 for c in cliques)
    # cap_per_video keeps the first-come entries of each video: position 3 is the third of video 0
    assert linkage.cap_per_video(np.array([4, 0, 1, 2, 3]), np.array([0, 0, 1, 0, 1]), 2).tolist() == [4, 0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Merging


def test_merge_stop_rule_on_a_planted_case():
    # Two tight clusters of 20 frames, centred as the pipeline's features are (distinct clusters are then
    # anti-correlated). No similarity cut and no size limit: only the paper's stop rule decides.
    feats, labels = synthetic.clustered_features(n_clusters=2, per_cluster=20, d=32, noise=0.3, seed=4)
    feats = centred(feats)
    videos = np.arange(len(feats))
    cfg = CliquesConfig(min_sim=-1.0, max_size=0, max_per_video=0)
    half_a, half_b = np.arange(0, 12), np.arange(8, 20)  # overlapping halves of cluster 0
    merged, comp = linkage.merge_cliques([half_a, half_b], feats, videos, cfg)
    assert len(merged) == 1 and merged[0].tolist() == list(range(20))
    assert comp[0] == pytest.approx(linkage.compactness(feats[:20]))

    # a clique of cluster 0 and a clique of cluster 1 sharing one frame (frame 0) stay apart
    c0 = np.arange(0, 10)
    c1 = np.r_[20 + np.arange(9), 0]
    merged, _ = linkage.merge_cliques([c0, c1], feats, videos, cfg)
    assert sorted(map(sorted, (m.tolist() for m in merged))) == sorted([sorted(c0.tolist()), sorted(c1.tolist())])
    # ... because the union falls below half the constituents' mean compactness
    union = np.union1d(c0, c1)
    assert linkage.compactness(feats[union]) < 0.25 * (linkage.compactness(feats[c0]) + linkage.compactness(feats[c1]))

    # identical cliques collapse; cliques sharing no frame are never candidates
    merged, _ = linkage.merge_cliques([half_a, half_a[::-1].copy(), np.arange(20, 30)], feats, videos, cfg)
    assert len(merged) == 2


def test_merge_respects_max_size_and_the_cut():
    feats, _ = synthetic.clustered_features(n_clusters=1, per_cluster=20, d=32, noise=0.3, seed=5)
    videos = np.arange(20)
    halves = [np.arange(0, 12), np.arange(8, 20)]
    loose = CliquesConfig(min_sim=-1, max_size=16, max_per_video=0)
    assert len(linkage.merge_cliques(halves, feats, videos, loose)[0]) == 2
    sims = feats.astype(np.float64) @ feats.T
    above = float(sims.min()) + 0.01  # a cut just above the least similar pair of the union
    strict = CliquesConfig(min_sim=above, max_size=0, max_per_video=0)
    assert len(linkage.merge_cliques(halves, feats, videos, strict)[0]) == 2
    assert len(linkage.merge_cliques(halves, feats, videos, CliquesConfig(min_sim=above - 0.02, max_size=0,
                                                                    max_per_video=0))[0]) == 1


def test_candidate_pairs_are_overlaps_only():
    cliques = [np.array([0, 1, 2]), np.array([1, 3]), np.array([3, 4]), np.array([5, 6])]
    pairs = linkage.candidate_pairs(cliques).tolist()
    # frame 1 is in cliques 0 and 1 (anchor: clique 1, seeded at 1); frame 3 in 1 and 2 (anchor: clique 2);
    # clique 3 shares no frame
    assert pairs == [[0, 1], [1, 2]]
    assert len(pairs) <= sum(len(c) for c in cliques)


# ---------------------------------------------------------------------------------------------
# Selection


def test_selection_prefers_coverage():
    cliques = [np.arange(0, 10), np.r_[np.arange(0, 9), 50], np.arange(20, 30), np.array([40, 41])]
    comp = np.array([0.9, 0.85, 0.8, 0.99])
    # K = 2: clique 1 is 90% covered by clique 0, so clique 2 comes next; clique 3 is below min_size
    assert linkage.select_cliques(cliques, comp, num_cliques=2, min_size=4, max_covered=0.5).tolist() == [0, 2]
    # K = 3: the skipped clique fills up
    assert linkage.select_cliques(cliques, comp, num_cliques=3, min_size=4, max_covered=0.5).tolist() == [0, 2, 1]
    # max_covered = 1: plain most-compact-first
    assert linkage.select_cliques(cliques, comp, num_cliques=2, min_size=4, max_covered=1.0).tolist() == [0, 1]


def test_spherical_kmeans_recovers_separated_groups_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 8)
    x = np.concatenate([c + 0.05 * rng.standard_normal((30, 8)) for c in centres])
    groups = linkage.spherical_kmeans(x, 3, seed=1)
    truth = np.repeat(np.arange(3), 30)
    assert len(np.unique(groups)) == 3
    assert all(len(np.unique(groups[truth == t])) == 1 for t in range(3))  # each true group is one group
    assert np.array_equal(groups, linkage.spherical_kmeans(x, 3, seed=1))
    assert len(linkage.spherical_kmeans(x[:2], 5)) == 2  # k > n: at most n groups


def test_spread_selection_covers_the_sparse_mode_that_compact_misses():
    # 12 tight cliques in one direction of feature space, 12 looser ones in another: the K most compact
    # are all from the dense mode; spread selection takes cliques from both.
    rng = np.random.default_rng(0)
    feats, cliques, comp = [], [], []
    for mode, noise in ((0, 0.05), (1, 0.6)):
        for _ in range(12):
            centre = np.eye(2, 16)[mode] + 0.3 * rng.standard_normal(16)
            block = centre + noise * rng.standard_normal((6, 16))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            cliques.append(np.arange(6 * len(feats), 6 * len(feats) + 6))
            comp.append(linkage.compactness(block))
            feats.append(block)
    feats, comp = np.concatenate(feats), np.asarray(comp)
    mode_of = np.repeat([0, 1], 12)
    compact = linkage.select_cliques(cliques, comp, num_cliques=6, min_size=4)
    assert set(mode_of[compact].tolist()) == {0}
    groups = linkage.spread_groups(cliques, feats, num_groups=6, min_size=4, seed=0)
    spread = linkage.select_cliques(cliques, comp, num_cliques=6, min_size=4, groups=groups)
    assert len(spread) == 6 and set(mode_of[spread].tolist()) == {0, 1}
    assert len(set(groups[spread].tolist())) == 6  # one clique per group
    # within its group, the chosen clique is the most compact one
    for i in spread:
        assert comp[i] == comp[groups == groups[i]].max()


def test_unknown_selection_rule_is_named():
    feats = np.eye(6, 4)[[0, 0, 0, 0, 1, 1]].astype(np.float32)
    nn = np.array([[j for j in range(6) if j != i] for i in range(6)])
    with pytest.raises(ValueError, match="cliques.selection: unknown rule 'best'"):
        linkage.build_cliques(nn, feats, np.arange(6), CliquesConfig(selection="best", min_size=2))


def test_no_clique_of_min_size_is_a_clear_error():
    feats = angles([0, 90, 180, 270])  # mutually dissimilar: every seed clique is a single frame
    nn = knn(feats, 3)
    cfg = CliquesConfig(min_sim=0.5, min_size=2, neighbourhood=3)
    with pytest.raises(linkage.CliqueError, match=r"category 'x'.*min_size=2.*largest 1"):
        linkage.build_cliques(nn, feats, np.arange(4), cfg, category="x")
    with pytest.raises(linkage.CliqueError, match=r"category 'x' has 4 frames, fewer than cliques.min_size=5"):
        linkage.build_cliques(nn, feats, np.arange(4), CliquesConfig(min_size=5), category="x")


# ---------------------------------------------------------------------------------------------
# S' and the PSD projection


def test_clique_similarity_is_the_mean_pairwise_similarity():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(12, 5)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cliques = [np.array([0, 1, 2]), np.array([2, 3, 4, 5]), np.array([6, 7]), np.array([8, 9, 10, 11, 0])]
    S = linkage.clique_similarity(cliques, feats)
    for (a, ca), (b, cb) in itertools.product(enumerate(cliques), repeat=2):
        brute = np.mean([float(feats[i] @ feats[j]) for i in ca for j in cb])  # all pairs, self-pairs too
        assert S[a, b] == pytest.approx(brute, abs=1e-6)
    assert np.linalg.eigvalsh(S).min() > -1e-10  # a Gram matrix of clique means
    # compactness excludes self-pairs
    c = cliques[1]
    assert linkage.compactness(feats[c]) == pytest.approx(
        np.mean([float(feats[i] @ feats[j]) for i in c for j in c if i != j]), abs=1e-6)


def test_project_psd():
    rot = np.array([[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]])
    S = rot @ np.diag([2.0, -1.0]) @ rot.T
    assert np.allclose(linkage.project_psd(S), rot @ np.diag([2.0, 0.0]) @ rot.T)  # by hand
    rng = np.random.default_rng(7)
    A = rng.normal(size=(8, 8))
    P = linkage.project_psd(A + A.T)
    assert np.allclose(P, P.T) and np.linalg.eigvalsh(P).min() > -1e-10
    B = rng.normal(size=(8, 3))
    G = B @ B.T
    G = (G + G.T) / 2
    assert np.array_equal(linkage.project_psd(G), G)  # PSD (rank 3) is left unchanged


# ---------------------------------------------------------------------------------------------
# The stage, end to end through Ray


def _tiny_run(run: str, seed: int = 8):
    """Two categories, interleaved frame ids; each cluster of 10 frames is 2 videos of 5."""
    feats, labels = synthetic.clustered_features(n_clusters=7, per_cluster=10, d=32, noise=0.3, seed=seed)
    n = len(feats)
    perm = np.random.default_rng(seed).permutation(n)  # frame_id f holds sample perm[f]
    feats, labels = feats[perm], labels[perm]
    category = np.where(labels < 4, "b_cat", "a_cat")
    videos = np.array([f"c{lab}_{j % 2}" for j, lab in enumerate(labels)])
    frame_index = np.zeros(n, dtype=np.int32)
    for v in np.unique(videos):
        frame_index[videos == v] = np.arange((videos == v).sum())
    images = np.zeros((n, 4, 4), dtype=np.uint8)
    synthetic.commit_table(run, 0, "frames", synthetic.frames_table(images, videos, frame_index, list(category)))
    synthetic.commit_table(run, 0, "features", schema.features_to_table(np.arange(n), feats))
    tables = []
    for cat in ("a_cat", "b_cat"):
        ids = np.flatnonzero(category == cat)
        tables.append(extremes_to_table(ids, exact_extremes(feats[ids], ids, k=12)))
    synthetic.commit_table(run, 0, "neighbours", pa.concat_tables(tables))
    return feats, labels, category, videos


def test_stage_end_to_end(ray_session, tmp_path):
    run = str(tmp_path / "run")
    feats, labels, category, videos = _tiny_run(run)
    cc = CliquesConfig(neighbourhood=12, min_sim=0.3, target_size=5, min_size=3, max_per_video=4,
                       num_cliques=5, seeds_per_task=7, max_size=6)
    cfg = PipelineConfig(run=run, cliques=cc)
    record = stage.run(cfg, round_index=0)
    assert not record["skipped"]
    table = StageDir(run, 0, "cliques").read_table()
    assert table.schema.equals(schema.CLIQUES)
    ids = table.column(schema.CLIQUE_ID).to_numpy()
    cats = table.column(schema.CATEGORY).to_pylist()
    assert ids.tolist() == list(range(10)) and cats == ["a_cat"] * 5 + ["b_cat"] * 5  # sorted categories
    frame_lists = [np.array(f) for f in table.column(schema.FRAME_IDS).to_pylist()]
    comp = table.column(schema.COMPACTNESS).to_numpy()
    for cat, frames, c in zip(cats, frame_lists, comp):
        assert (category[frames] == cat).all() and len(set(labels[frames].tolist())) == 1
        assert np.bincount(np.unique(videos[frames], return_inverse=True)[1]).max() <= 4
        assert c == pytest.approx(linkage.compactness(feats[frames]), abs=1e-5)

    # parallel equals serial: the pure one-process build on the category's local arrays
    for cat, offset in (("a_cat", 0), ("b_cat", 5)):
        local = np.flatnonzero(category == cat)
        ext = exact_extremes(feats[local], np.arange(len(local)), k=12)
        vcodes = np.unique(videos[local], return_inverse=True)[1]
        ref, ref_comp, ref_sim = linkage.build_cliques(ext.nn_ids, feats[local], vcodes, cc, category=cat)
        assert [local[r].tolist() for r in ref] == [f.tolist() for f in frame_lists[offset : offset + 5]]
        assert np.allclose(ref_comp, comp[offset : offset + 5], atol=1e-6)
        sim_ids, sim = stage_outputs.read_clique_similarity(StageDir(run, 0, "cliques"))[cat]
        assert sim_ids.tolist() == list(range(offset, offset + 5)) and sim.dtype == np.float32
        assert np.allclose(sim, ref_sim, atol=1e-6)
        assert np.allclose(sim, linkage.clique_similarity(frame_lists[offset : offset + 5], feats), atol=1e-5)

    stats = record["stats"]
    assert stats["rows"] == 10
    assert set(stats["categories"]["a_cat"]) >= {"cliques", "mean_size", "mean_compactness", "frames_covered",
                                                 "video_pure_fraction"}
    assert stage.run(cfg, round_index=0)["skipped"]  # same config and inputs: nothing to do


def test_stage_bad_inputs(ray_session, tmp_path):
    run = str(tmp_path / "run")
    _tiny_run(run)
    cfg = PipelineConfig(run=run, cliques=CliquesConfig(min_size=31, num_cliques=2))
    with pytest.raises(linkage.CliqueError, match=r"category 'a_cat' has 30 frames, fewer than cliques.min_size=31"):
        stage.run(cfg)
    assert StageDir(run, 0, "cliques").record() is None  # nothing committed

    nb = StageDir(run, 0, "neighbours").read_table()
    nn = nb.column(schema.NN_IDS).to_pylist()
    nn[3][2] = 999
    bad = nb.set_column(nb.schema.get_field_index(schema.NN_IDS), schema.NN_IDS, pa.array(nn, pa.list_(pa.int64())))
    synthetic.commit_table(run, 0, "neighbours", bad)
    frame = nb.column(schema.FRAME_ID)[3].as_py()
    with pytest.raises(schema.SchemaError, match=rf"nn_ids' of frame_id {frame} \(row 3\) names unknown frame 999"):
        stage.run(PipelineConfig(run=run, cliques=CliquesConfig(min_size=3, num_cliques=2)))
