"""Impute (paper Sect. 2.5–2.6, docs/method.md#re-imputation): CNN features of every frame through Ray Data actors,
Pearson-normalised, Local Temporal Pooling, committed as the next round's features."""
from __future__ import annotations

import numpy as np
import pytest
from synthetic import SIZE, class_images, commit_table, committed_model, frames_table

from cliquecnn_ray import cnn_features, network, schema, similarity, storage
from cliquecnn_ray.config import load_config
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.similarity import ltp_stack


def tiny_frames(run: str):
    """Three videos of 7, 5 and 1 frames, stored out of order (ids do not follow videos)."""
    images, _ = class_images(n_classes=3, per_class=5, size=32, seed=1)
    images = images[:13]
    videos = ["b"] * 7 + ["a"] * 5 + ["c"]
    index = list(range(7)) + [10, 12, 14, 16, 18] + [0]  # gaps from a stride are fine
    perm = np.random.default_rng(0).permutation(13)
    table = frames_table(images[perm], [videos[i] for i in perm], np.asarray(index)[perm])
    commit_table(run, 0, "frames", table)
    return table, images[perm]


def cfg_for(run: str, *overrides: str):
    return load_config(None, [f"run={run}", "impute.batch_size=4", "impute.num_actors=2",
                              f"evaluate.labels={run}/no-such-labels.parquet", *overrides])


def test_impute_writes_pearson_features_and_ltp(ray_session, tmp_path):
    from cliquecnn_ray.stages import impute

    run = str(tmp_path / "run")
    table, images = tiny_frames(run)
    net = committed_model(run)
    cfg = cfg_for(run, "impute.ltp_p=0")
    assert not storage.exists(cfg.evaluate.labels)  # impute never reads labels

    record = impute.run(cfg, 0)
    out = StageDir(run, 1, "features")
    assert record["stats"]["rows"] == 13 and record["stats"]["d"] == network.FC_DIM and record["stats"]["ltp_p"] == 0
    ids, plain = schema.table_to_features(out.read_table(), source=str(out))
    assert np.array_equal(ids, np.arange(13))
    # The actors computed what extract_features + pearson_normalise give in one process.
    cnn = cnn_features.extract_features(net, cnn_features.to_input(_resize(images)))
    ref = similarity.pearson_normalise(cnn.numpy())
    np.testing.assert_allclose(plain, ref[np.argsort(table.column("frame_id").to_numpy())], atol=1e-5)
    assert np.allclose(np.linalg.norm(plain, axis=1), 1, atol=1e-5) and np.allclose(plain.mean(axis=1), 0, atol=1e-6)

    record = impute.run(cfg_for(run, "impute.ltp_p=2"), 0)  # other config: recomputed
    assert not record["skipped"]
    assert record["stats"]["d"] == 5 * network.FC_DIM and record["stats"]["frame_d"] == network.FC_DIM
    ids2, pooled = schema.table_to_features(out.read_table(), source=str(out))
    assert np.array_equal(ids2, ids) and pooled.shape == (13, 5 * network.FC_DIM)
    order = np.argsort(table.column("frame_id").to_numpy())
    videos = table.column("video_id").to_numpy(zero_copy_only=False)[order]
    index = table.column("frame_index").to_numpy()[order]
    np.testing.assert_allclose(pooled, ltp_stack(plain, videos, index, 2), atol=1e-6)
    # Stacked windows of unit, centred vectors are unit and centred: no re-normalisation needed, and the
    # inner product is Eq. 9's mean of 2p+1 correlations.
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-5)
    row = {(v, int(i)): r for r, (v, i) in enumerate(zip(videos, index))}
    k, l = row[("b", 2)], row[("b", 4)]  # Eq. 9 by hand for two frames of video "b" (frames 0..6)
    s_prime = np.mean([plain[row[("b", 2 + n)]] @ plain[row[("b", 4 + n)]] for n in range(-2, 3)])
    assert pooled[k] @ pooled[l] == pytest.approx(s_prime, abs=1e-6)
    assert impute.run(cfg_for(run, "impute.ltp_p=2"), 0)["skipped"]


def test_impute_on_s3_with_fc6(ray_session, s3_bucket):
    from cliquecnn_ray.stages import impute

    run = f"{s3_bucket}/run"
    tiny_frames(run)
    committed_model(run)
    record = impute.run(cfg_for(run, "impute.feature_layer=fc6", "impute.ltp_p=1", "impute.num_actors=1"), 0)
    assert record["stats"]["feature_layer"] == "fc6"  # what embed and serve read back
    ids, feats = schema.table_to_features(StageDir(run, 1, "features").read_table())
    assert record["stats"]["d"] == 3 * network.FC_DIM and feats.shape == (13, 3 * network.FC_DIM)
    assert np.isfinite(feats).all()


def test_impute_needs_the_rounds_model(ray_session, tmp_path):
    from cliquecnn_ray.rundir import StageNotCommitted
    from cliquecnn_ray.stages import impute

    run = str(tmp_path / "run")
    tiny_frames(run)
    with pytest.raises(StageNotCommitted, match="round 0 model"):
        impute.run(cfg_for(run), 0)


def _resize(images: np.ndarray) -> np.ndarray:
    """The stage decodes frames at the model's input size; do the same to the reference images."""
    from synthetic import png_bytes

    from cliquecnn_ray.hog import decode_images

    return decode_images([png_bytes(im) for im in images], size=SIZE, grey=True)
