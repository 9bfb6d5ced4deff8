"""The similarity engine: sharded extremes equal a one-shot exact search (faiss contrib pattern), Local
Temporal Pooling equals Eq. 9 computed directly, the neighbours table, and the Ray stage."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cliquecnn_ray import rundir, schema, similarity, storage
from cliquecnn_ray.config import NeighboursConfig, PipelineConfig, ResourcesConfig
from tests import synthetic


def concat(parts: list[similarity.Extremes]) -> similarity.Extremes:
    return similarity.Extremes(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


def assert_same(got: similarity.Extremes, ref: similarity.Extremes) -> None:
    """Ids identical (seeded data without near-ties), sims to 1e-5."""
    np.testing.assert_array_equal(got.nn_ids, ref.nn_ids)
    np.testing.assert_array_equal(got.far_ids, ref.far_ids)
    np.testing.assert_allclose(got.nn_sims, ref.nn_sims, atol=1e-5)
    np.testing.assert_allclose(got.far_sims, ref.far_sims, atol=1e-5)
    assert got.nn_sims.dtype == np.float32 and got.nn_ids.dtype == np.int64


@pytest.fixture(scope="module")
def bank():
    """203 clustered L2-normalised features (N not divisible by any block size used), shuffled, with
    sparse global ids: a row's id is not its position, so offsets must be applied right."""
    feats, _ = synthetic.clustered_features(n_clusters=7, per_cluster=29, d=16, noise=0.5, seed=3)
    perm = np.random.default_rng(0).permutation(len(feats))
    return feats[perm], (np.arange(len(feats), dtype=np.int64) * 3 + 5)[perm]


def test_hand_checkable_ranking():
    """Unit vectors at 0°, 10°, 90°, 180°: from 0° the order is 10°, 90°, 180°."""
    angles = np.deg2rad([0.0, 10.0, 90.0, 180.0])
    feats = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    ids = np.array([10, 11, 12, 13])
    ext = similarity.block_extremes(feats, ids, feats, ids, k=2, col_block=3)
    np.testing.assert_array_equal(ext.nn_ids[0], [11, 12])
    np.testing.assert_array_equal(ext.far_ids[0], [13, 12])
    np.testing.assert_allclose(ext.nn_sims[0], [np.cos(np.deg2rad(10)), 0.0], atol=1e-6)
    np.testing.assert_allclose(ext.far_sims[0], [-1.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(ext.nn_ids[3], [12, 11])  # 180°: 90° then 10°


@pytest.mark.parametrize("k", [1, 10, 202, 500])  # 202 = N − 1; 500 > N − 1 is clamped to N − 1
@pytest.mark.parametrize(
    "row_block, col_block, tile_rows",
    [(203, 4096, 1024), (50, 64, 16), (64, 37, 64), (17, 100, 5), (90, 7, 30)],
)
def test_sharded_equals_exact(bank, k, row_block, col_block, tile_rows):
    feats, ids = bank
    ref = similarity.exact_extremes(feats, ids, k)
    assert ref.k == min(k, len(ids) - 1)
    parts = [
        similarity.block_extremes(feats[s : s + row_block], ids[s : s + row_block], feats, ids, k, col_block, tile_rows)
        for s in range(0, len(ids), row_block)
    ]
    got = concat(parts)
    assert_same(got, ref)
    assert not (got.nn_ids == ids[:, None]).any() and not (got.far_ids == ids[:, None]).any()  # self excluded
    assert (np.diff(got.nn_sims, axis=1) <= 0).all() and (np.diff(got.far_sims, axis=1) >= 0).all()


def test_tiles_merged_equal_exact(bank):
    """Column shards through tile_extremes, reduced by merge_extremes (the pure map + reduce)."""
    feats, ids = bank
    k = 12
    sims = feats.astype(np.float64) @ feats.T.astype(np.float64)
    cuts = [0, 30, 31, 150, len(ids)]  # a shard of one column, which holds some rows' self
    merged = None
    for c0, c1 in zip(cuts[:-1], cuts[1:]):
        part = similarity.tile_extremes(sims[:, c0:c1].astype(np.float32), ids[c0:c1], k, row_ids=ids)
        merged = part if merged is None else similarity.merge_extremes(merged, part, k)
    assert_same(merged, similarity.exact_extremes(feats, ids, k))


def test_tile_extremes_pads_rows_short_of_candidates():
    sims = np.array([[0.0, 0.5, -0.5], [0.2, 0.9, 0.1]], dtype=np.float32)
    ext = similarity.tile_extremes(sims, np.array([7, 8, 9]), k=3, row_ids=np.array([7, 1]))
    np.testing.assert_array_equal(ext.nn_ids, [[8, 9, -1], [8, 7, 9]])  # row 0 is id 7: self is padding
    np.testing.assert_array_equal(ext.nn_sims[0, :2], [0.5, -0.5])
    assert ext.nn_sims[0, 2] == -np.inf and ext.far_sims[0, 2] == np.inf
    np.testing.assert_array_equal(ext.far_ids, [[9, 8, -1], [9, 7, 8]])


def test_queries_outside_the_database_keep_k(bank):
    feats, ids = bank
    queries, qids = feats[:5] + 0.01, np.arange(1000, 1005)
    ext = similarity.block_extremes(queries, qids, feats, ids, k=len(ids), col_block=50)
    assert ext.k == len(ids)  # nobody is excluded: all N database items, both ways
    s = queries.astype(np.float64) @ feats.T.astype(np.float64)
    np.testing.assert_array_equal(ext.nn_ids, ids[np.argsort(-s, axis=1)])


def test_block_extremes_bad_input(bank):
    feats, ids = bank
    with pytest.raises(ValueError, match="d mismatch"):
        similarity.block_extremes(feats[:3, :8], ids[:3], feats, ids, 5)
    with pytest.raises(ValueError, match="ids"):
        similarity.block_extremes(feats[:3], ids[:2], feats, ids, 5)
    one = similarity.block_extremes(feats[:1], ids[:1], feats[:1], ids[:1], 5)  # one frame: nothing to rank
    assert one.nn_ids.shape == (1, 0) and one.far_sims.shape == (1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_half_precision_close_to_exact(bank):
    feats, ids = bank
    t = torch.as_tensor(feats, device="cuda")
    ext = similarity.block_extremes(t[:100], ids[:100], t, ids, 10, col_block=64)
    ref = similarity.exact_extremes(feats, ids, 10)
    np.testing.assert_allclose(ext.nn_sims, ref.nn_sims[:100], atol=2e-3)
    assert np.mean(ext.nn_ids == ref.nn_ids[:100]) > 0.9  # fp16 may swap near-ties


# ---------------------------------------------------------------------------------------------
# Local Temporal Pooling


def eq9_direct(feats, videos, index, p):
    """s'(k, l) = 1/(2p+1) Σ_{n=−p..p} φ(d_{k+n})ᵀ φ(d_{l+n}) by loops, clamped at each video's ends."""
    n = len(feats)

    def shifted(i, shift):  # the frame `shift` steps from frame i in its video, clamped
        same = [j for j in range(n) if videos[j] == videos[i]]
        same.sort(key=lambda j: index[j])
        at = same.index(i) + shift
        return same[min(max(at, 0), len(same) - 1)]

    s = np.zeros((n, n))
    for a in range(n):
        for b in range(n):
            for shift in range(-p, p + 1):
                s[a, b] += feats[shifted(a, shift)] @ feats[shifted(b, shift)]
    return s / (2 * p + 1)


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_ltp_equals_eq9(p):
    """Two videos: 'a' of 8 frames with stride-2 indices, 'b' of 3 frames (shorter than 2p+1 for p ≥ 2);
    rows shuffled so the order comes from (video_id, frame_index) alone."""
    rng = np.random.default_rng(p)
    videos = np.array(["a"] * 8 + ["b"] * 3)
    index = np.r_[np.arange(0, 16, 2), [5, 6, 9]]
    feats = rng.normal(size=(11, 4)).astype(np.float32)
    perm = rng.permutation(11)
    videos, index, feats = videos[perm], index[perm], feats[perm]
    stacked = similarity.ltp_stack(feats, videos, index, p)
    assert stacked.shape == (11, (2 * p + 1) * 4) and stacked.dtype == np.float32
    np.testing.assert_allclose(stacked.astype(np.float64) @ stacked.T, eq9_direct(feats, videos, index, p), atol=1e-5)


def test_ltp_window_contents():
    """p = 1 on a 3-frame video [x0, x1, x2]: frame 0's window is [x0, x0, x1] / √3 (clamped)."""
    feats = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    out = similarity.ltp_stack(feats, ["v", "v", "v"], [0, 1, 2], 1) * np.sqrt(3)
    np.testing.assert_allclose(out, [[1, 1, 2], [1, 2, 3], [2, 3, 3]], rtol=1e-6)
    assert similarity.ltp_stack(feats, ["v"] * 3, [0, 1, 2], 0) is not None
    np.testing.assert_array_equal(similarity.ltp_stack(feats, ["v"] * 3, [0, 1, 2], 0), feats)


def test_ltp_normalised_features_stay_normalised_and_bad_input():
    feats, _ = synthetic.clustered_features(2, 5, 8, seed=1)
    out = similarity.ltp_stack(feats, ["a"] * 6 + ["b"] * 4, list(range(6)) + list(range(4)), 3)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="frame_index 3 twice"):
        similarity.ltp_stack(feats[:3], ["a", "a", "a"], [1, 3, 3], 1)
    with pytest.raises(ValueError, match="p must be"):
        similarity.ltp_stack(feats, ["a"] * 10, range(10), -1)


def test_ltp_features_joins_the_frames_table():
    feats = np.arange(4, dtype=np.float32).reshape(4, 1)
    frames = pa.table({"frame_id": [3, 1, 2, 0], "video_id": ["v"] * 4, "frame_index": [3, 1, 2, 0]})
    ids = np.array([2, 0, 3, 1])  # features of frames 2, 0, 3, 1 (so frame i is feats[ids == i])
    out = similarity.ltp_features(ids, feats, frames, 1) * np.sqrt(3)
    # frame 2 (row 0): window frames 1, 2, 3 → features 3, 0, 2
    np.testing.assert_allclose(out[0], [3, 0, 2])
    with pytest.raises(schema.SchemaError, match="frame_id 7"):
        similarity.ltp_features(np.array([7]), feats[:1], frames, 1)


# ---------------------------------------------------------------------------------------------
# The neighbours table


def test_table_round_trips_through_plain_pyarrow(tmp_path, bank):
    feats, ids = bank
    ext = similarity.block_extremes(feats, ids, feats, ids, 6)
    table = similarity.extremes_to_table(ids, ext)
    assert table.schema.equals(schema.NEIGHBOURS)
    pq.write_table(table, tmp_path / "n.parquet")
    back = pq.read_table(tmp_path / "n.parquet")
    assert back.column("nn_ids").to_pylist()[0] == ext.nn_ids[0].tolist()
    got_ids, got = similarity.table_to_extremes(back)
    order = np.argsort(ids)
    np.testing.assert_array_equal(got_ids, ids[order])
    for a, b in zip(got, ext):
        np.testing.assert_array_equal(a, b[order])


def test_table_to_extremes_pads_short_lists():
    table = pa.table(
        {
            "frame_id": pa.array([1, 0], pa.int64()),
            "nn_ids": pa.array([[0], [1, 2]], pa.list_(pa.int64())),
            "nn_sims": pa.array([[0.5], [0.5, 0.1]], pa.list_(pa.float32())),
            "far_ids": pa.array([[0], [2, 1]], pa.list_(pa.int64())),
            "far_sims": pa.array([[0.5], [0.1, 0.5]], pa.list_(pa.float32())),
        }
    )
    ids, ext = similarity.table_to_extremes(table)
    np.testing.assert_array_equal(ids, [0, 1])
    np.testing.assert_array_equal(ext.nn_ids, [[1, 2], [0, -1]])
    assert ext.nn_sims[1, 1] == -np.inf and ext.far_sims[1, 1] == np.inf


# ---------------------------------------------------------------------------------------------
# The Ray stage


def make_run(run: str, feats: np.ndarray, categories: list[str], feature_ids=None) -> None:
    n = len(categories)
    images = np.zeros((n, 4, 4), dtype=np.uint8)
    frames = synthetic.frames_table(images, [f"v{i // 10}" for i in range(n)], np.arange(n) % 10, categories)
    synthetic.commit_table(run, 0, "frames", frames)
    ids = np.arange(n) if feature_ids is None else feature_ids
    table = feats if isinstance(feats, pa.Table) else schema.features_to_table(ids, feats)
    synthetic.commit_table(run, 0, "features", table)


def stage_cfg(run: str, **neighbours) -> PipelineConfig:
    cpus = neighbours.pop("cpus_per_task", 1.0)
    return PipelineConfig(
        run=run, neighbours=NeighboursConfig(**neighbours), resources=ResourcesConfig(cpus_per_task=cpus)
    )


@pytest.mark.parametrize("cpus_per_task, row_block", [(2.0, 40), (1.0, 23)])  # 1 and 2 concurrent workers
def test_stage_equals_exact_per_category(ray_session, tmp_path, cpus_per_task, row_block, caplog):
    from cliquecnn_ray.stages import neighbours as stage

    feats, _ = synthetic.clustered_features(n_clusters=5, per_cluster=30, d=12, noise=0.5, seed=7)
    cats = ["b"] * 90 + ["a"] * 57 + ["tiny"] * 3  # "tiny" is smaller than k + 1
    run = str(tmp_path / "run")
    make_run(run, feats, cats)
    cfg = stage_cfg(run, k=8, row_block=row_block, col_block=32, tile_rows=16, cpus_per_task=cpus_per_task)
    with caplog.at_level(logging.WARNING, logger="cliquecnn_ray"):
        record = stage.run(cfg, round_index=0)
    assert not record["skipped"]
    assert record["stats"]["rows"] == 150 and record["stats"]["k"] == {"a": 8, "b": 8, "tiny": 2}
    assert record["stats"]["tasks"] == -(-90 // row_block) + -(-57 // row_block) + 1
    assert any("'tiny'" in m and "k = 2" in m for m in caplog.messages)

    table = rundir.StageDir(run, 0, "neighbours").read_table()
    assert table.schema.equals(schema.NEIGHBOURS)
    ids, ext = similarity.table_to_extremes(table)
    np.testing.assert_array_equal(ids, np.arange(150))
    cats = np.array(cats)
    for cat in ("a", "b", "tiny"):
        members = np.flatnonzero(cats == cat)
        ref = similarity.exact_extremes(feats[members], members, 8)
        got = similarity.Extremes(*(a[members][:, : ref.k] for a in ext))
        assert_same(got, ref)
        assert np.isin(got.nn_ids, members).all()  # never across categories
    assert stage.run(cfg, round_index=0)["skipped"]  # same config and inputs: committed output kept


def test_stage_across_categories(ray_session, tmp_path):
    from cliquecnn_ray.stages import neighbours as stage

    feats, _ = synthetic.clustered_features(n_clusters=3, per_cluster=20, d=8, seed=2)
    run = str(tmp_path / "run")
    make_run(run, feats, ["x"] * 30 + ["y"] * 30)
    record = stage.run(stage_cfg(run, k=5, row_block=25, across_categories=True))
    assert record["stats"]["categories"] == 1
    ids, ext = similarity.table_to_extremes(rundir.StageDir(run, 0, "neighbours").read_table())
    assert_same(ext, similarity.exact_extremes(feats, np.arange(60), 5))


def test_anchored_features_give_the_mixed_similarity():
    rng = np.random.default_rng(4)
    later = similarity.pearson_normalise(rng.normal(size=(20, 6)))
    first = similarity.pearson_normalise(rng.normal(size=(20, 9)))
    mixed = similarity.anchored_features(later, first, 0.3)
    np.testing.assert_allclose(mixed @ mixed.T, 0.7 * later @ later.T + 0.3 * first @ first.T, atol=1e-6)
    np.testing.assert_array_equal(similarity.anchored_features(later, first, 0.0), later)  # w = 0: the round's own
    with pytest.raises(ValueError, match="weight"):
        similarity.anchored_features(later, first, 1.5)
    with pytest.raises(ValueError, match="20 rows"):
        similarity.anchored_features(later, first[:5], 0.5)


def test_stage_anchors_later_rounds_to_round_0(ray_session, tmp_path):
    """Round 1's neighbours with ``anchor_round0`` are the exact neighbours of the mixed similarity; round 0's
    ignore it (and are not recomputed for it)."""
    from cliquecnn_ray.stages import neighbours as stage

    first, _ = synthetic.clustered_features(n_clusters=4, per_cluster=15, d=10, noise=0.5, seed=5)
    later, _ = synthetic.clustered_features(n_clusters=6, per_cluster=10, d=7, noise=0.8, seed=6)
    run = str(tmp_path / "run")
    make_run(run, first, ["x"] * 60)
    synthetic.commit_table(run, 1, "features", schema.features_to_table(np.arange(60), later))
    plain = stage_cfg(run, k=6, row_block=25)
    anchored = stage_cfg(run, k=6, row_block=25, anchor_round0=0.4)
    stage.run(plain, round_index=0)
    assert stage.run(anchored, round_index=0)["skipped"]
    stage.run(anchored, round_index=1)
    _, got = similarity.table_to_extremes(rundir.StageDir(run, 1, "neighbours").read_table())
    mixed = similarity.anchored_features(later, first, 0.4)
    assert_same(got, similarity.exact_extremes(mixed, np.arange(60), 6))
    assert not stage.run(plain, round_index=1)["skipped"]  # a different similarity: recomputed


def test_stage_bad_inputs(ray_session, tmp_path):
    from cliquecnn_ray.stages import neighbours as stage

    feats, _ = synthetic.clustered_features(n_clusters=2, per_cluster=5, d=4, seed=0)
    # NaN features: named by frame, nothing committed.
    bad = feats.copy()
    bad[4, 1] = np.nan
    run = str(tmp_path / "nan")
    make_run(run, bad, ["c"] * 10)
    with pytest.raises(schema.SchemaError, match="frame_id 4"):
        stage.run(stage_cfg(run, k=3))
    assert rundir.StageDir(run, 0, "neighbours").record() is None
    # A feature row whose frame is not in the frames table.
    run = str(tmp_path / "orphan")
    make_run(run, feats, ["c"] * 10, feature_ids=np.r_[np.arange(9), 42])
    with pytest.raises(schema.SchemaError, match="frame_id 42"):
        stage.run(stage_cfg(run, k=3))
    # d differs between rows (a variable-length list column).
    ragged = pa.table(
        {
            "frame_id": pa.array(np.arange(10)),
            "feature": pa.array([[0.1] * 4] * 9 + [[0.1] * 3], pa.list_(pa.float32())),
        }
    )
    run = str(tmp_path / "ragged")
    make_run(run, ragged, ["c"] * 10)
    with pytest.raises(schema.SchemaError, match="d mismatch"):
        stage.run(stage_cfg(run, k=3))
    # No features committed for this round.
    with pytest.raises(rundir.StageNotCommitted):
        stage.run(stage_cfg(run, k=3), round_index=1)
    with pytest.raises(ValueError, match="k = 0"):
        stage.run(stage_cfg(run, k=0))


def test_stage_single_frame_category_gets_empty_lists(ray_session, tmp_path):
    from cliquecnn_ray.stages import neighbours as stage

    feats, _ = synthetic.clustered_features(n_clusters=1, per_cluster=6, d=4, seed=0)
    run = str(tmp_path / "run")
    make_run(run, feats, ["big"] * 5 + ["alone"])
    record = stage.run(stage_cfg(run, k=2))
    assert record["stats"]["k"] == {"alone": 0, "big": 2}
    table = rundir.StageDir(run, 0, "neighbours").read_table().sort_by("frame_id")
    assert table.column("nn_ids").to_pylist()[5] == [] and table.column("far_sims").to_pylist()[5] == []
    assert all(len(x) == 2 for x in table.column("nn_ids").to_pylist()[:5])
    files = rundir.StageDir(run, 0, "neighbours").files(".parquet")
    assert len(files) == 2 and all(storage.exists(f) for f in files)
