"""Features: decoding, HOG (torch vs skimage), LDA whitening, and the Ray stage end to end."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from synthetic import class_images, commit_table, frames_table, png_bytes

from cliquecnn_ray import hog, schema, storage
from cliquecnn_ray.config import load_config
from cliquecnn_ray.rundir import StageDir

HOG_TOL = 1e-6  # same float64 binning, float32 cell sums as skimage (hog.json: max_abs_diff_vs_skimage)


# ---------------------------------------------------------------------------------------------
# decode_images


def test_decode_roundtrip_crop_resize_and_colour():
    images, _ = class_images(2, 2, size=32, seed=1)
    data = [png_bytes(im) for im in images]
    assert np.array_equal(hog.decode_images(data, size=32), images)  # PNG is lossless, no resize at 32
    crop = hog.decode_images(data, bboxes=[None, [8, 4, 24, 20], None, None], size=16)
    expected = np.asarray(Image.fromarray(images[1][4:20, 8:24]))  # 16×16 crop: no resize needed
    assert np.array_equal(crop[1], expected)
    small = hog.decode_images(data, size=8)
    assert small.shape == (4, 8, 8) and small.dtype == np.uint8
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 0] = 200
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    colour = hog.decode_images([buf.getvalue()], size=6, grey=False)
    assert colour.shape == (1, 6, 6, 3) and abs(int(colour[0, 3, 3, 0]) - 200) < 8


def test_decode_reads_uris(tmp_path):
    images, _ = class_images(1, 2, size=16)
    uris = []
    for i, im in enumerate(images):
        path = tmp_path / f"f{i}.png"
        path.write_bytes(png_bytes(im))
        uris.append(str(path))
    out = hog.decode_images([None, png_bytes(images[1])], uris=[uris[0], None], size=16)
    assert np.array_equal(out, images)
    assert np.array_equal(hog.decode_images(None, uris=uris, size=16), images)


def test_decode_errors_name_the_frame(tmp_path):
    with pytest.raises(ValueError, match="frame_id 42: cannot decode"):
        hog.decode_images([png_bytes(np.zeros((4, 4), np.uint8)), b"not an image"], frame_ids=[41, 42])
    with pytest.raises(ValueError, match="frame_id 7: cannot read image"):
        hog.decode_images(None, uris=[str(tmp_path / "missing.png")], frame_ids=[7])
    with pytest.raises(ValueError, match="frame_id 3: bbox .* is empty"):
        hog.decode_images([png_bytes(np.zeros((4, 4), np.uint8))], bboxes=[[5, 5, 9, 9]], frame_ids=[3])


# ---------------------------------------------------------------------------------------------
# HOG


def _structured(size: int) -> np.ndarray:
    """Blank, constant, ramps, a checkerboard, a disc, a thin diagonal line: gradients at exact bin edges."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = [
        np.zeros((size, size)),
        np.full((size, size), 77),
        xx * 255 / size,
        yy * 255 / size,
        ((xx // 4 + yy // 4) % 2) * 255,
        ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2) * 200,
        (np.abs(xx - yy) < 1) * 255,
        (xx + 2 * yy) % 256,
    ]
    return np.stack(out).astype(np.uint8)


@pytest.mark.parametrize(
    "shape,orientations,cell,block",
    [((64, 64), 9, 8, 2), ((32, 32), 9, 8, 2), ((28, 28), 9, 8, 2), ((37, 45), 9, 8, 2), ((40, 40), 8, 5, 3),
     ((24, 24), 4, 6, 1)],
)
def test_hog_batch_matches_skimage(shape, orientations, cell, block):
    rng = np.random.default_rng(0)
    images = np.concatenate(
        [rng.integers(0, 256, (6,) + shape).astype(np.uint8),
         _structured(max(shape))[:, : shape[0], : shape[1]]]
    )
    ref = np.stack([hog.hog_reference(im, orientations, cell, block) for im in images])
    got = hog.hog_batch(images, orientations, cell, block, chunk=5)  # several chunks, one partial
    dim = hog.hog_dim(shape, orientations, cell, block)
    assert got.dtype == np.float32 and got.shape == ref.shape == (len(images), dim)
    assert np.abs(got - ref).max() < HOG_TOL
    # Chunks on worker threads give exactly the serial result.
    assert np.array_equal(hog.hog_batch(images, orientations, cell, block, chunk=3, threads=2), got)


def test_hog_batch_float_images_and_small_image_error():
    rng = np.random.default_rng(1)
    images = rng.random((4, 32, 32)).astype(np.float32) * 255
    ref = np.stack([hog.hog_reference(im) for im in images])
    assert np.abs(hog.hog_batch(images) - ref).max() < HOG_TOL
    with pytest.raises(ValueError, match="smaller than one block"):
        hog.hog_batch(np.zeros((1, 12, 12), np.uint8))


# ---------------------------------------------------------------------------------------------
# LDA whitening


def test_whitening_is_the_lda_similarity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + 3.0
    lam = 0.02
    stats = hog.reduce_stats([hog.whitening_stats(part) for part in (x[:100], x[100:250], x[250:])])
    whole = hog.whitening_stats(x)
    assert stats[2] == 300 and np.allclose(stats[0], whole[0]) and np.allclose(stats[1], whole[1])
    mu, w = hog.whitening_transform(stats, lam)
    phi = hog.whiten(x, mu, w)
    # Direct numpy: (x_i − μ)ᵀ (cov + λI)⁻¹ (x_j − μ), cosine-normalised.
    centred = x - x.mean(axis=0)
    cov = np.cov(x.T, bias=True)
    sigma = cov + lam * np.trace(cov) / 10 * np.eye(10)  # λ relative to the mean variance
    gram = centred @ np.linalg.solve(sigma, centred.T)
    norm = np.sqrt(np.diag(gram))
    assert np.abs(phi @ phi.T - gram / np.outer(norm, norm)).max() < 1e-5
    assert np.allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-5)
    assert np.allclose(w @ sigma @ w, np.eye(10), atol=1e-8)  # W = Σ^{-1/2}


def test_whitening_lambda_is_scale_free():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    for lam in (0.01, 1.0):
        phi = hog.whiten(x, *hog.whitening_transform(hog.whitening_stats(x), lam))
        phi_scaled = hog.whiten(1e-3 * x, *hog.whitening_transform(hog.whitening_stats(1e-3 * x), lam))
        assert np.abs(phi - phi_scaled).max() < 1e-4
    # A large λ tends to plain centred, normalised descriptors; a small one to full whitening (identity Gram).
    centred = x - x.mean(0)
    plain = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    assert np.abs(hog.whiten(x, *hog.whitening_transform(hog.whitening_stats(x), 1e6)) - plain).max() < 1e-4


def test_whitening_bad_inputs():
    x = np.ones((5, 4))
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="frame_id 13 is NaN"):
        hog.whitening_stats(x, frame_ids=np.arange(10, 15))
    with pytest.raises(ValueError, match="shard 1 has descriptors of length 3.*d mismatch"):
        hog.reduce_stats([hog.whitening_stats(np.ones((2, 4))), hog.whitening_stats(np.ones((2, 3)))])
    with pytest.raises(ValueError, match="at least 2 frames"):
        hog.whitening_transform(hog.whitening_stats(np.ones((1, 4))), 0.02)
    with pytest.raises(ValueError, match="not positive definite"):
        hog.whitening_transform(hog.whitening_stats(np.ones((5, 4))), 0.0)


def test_blank_frames_become_zero_vectors_never_nan():
    images = np.stack([np.zeros((32, 32), np.uint8), np.full((32, 32), 90, np.uint8), class_images(1, 1)[0][0]])
    for kind in ("hog", "raw"):
        feats, blank = hog.finish(hog.describe(images, kind), kind)
        assert blank.tolist() == [True, True, False]
        assert np.isfinite(feats).all() and (feats[:2] == 0).all()
        assert abs(np.linalg.norm(feats[2]) - 1) < 1e-5
    # hog_lda: a blank frame's HOG is 0, its φ ∝ −μW is a proper direction.
    descriptors = hog.describe(np.concatenate([images, class_images(2, 8)[0]]), "hog_lda")
    mu, w = hog.whitening_transform(hog.whitening_stats(descriptors), 1.0)
    phi = hog.whiten(descriptors, mu, w)
    assert np.isfinite(phi).all() and np.allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-5)


def test_raw_is_pearson_correlation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8)).astype(np.uint8)
    feats, _ = hog.finish(hog.describe(images, "raw"), "raw")
    flat = images.reshape(5, -1).astype(np.float64)
    assert np.abs(feats @ feats.T - np.corrcoef(flat)).max() < 1e-5


def _within_between(feats: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    sims = feats @ feats.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return float(sims[same & off].mean()), float(sims[~same].mean())


def test_hog_lda_separates_classes():
    images, labels = class_images(4, 24, size=32, seed=3)
    descriptors = hog.describe(images, "hog_lda")
    mu, w = hog.whitening_transform(hog.whitening_stats(descriptors), 1.0)
    feats = hog.whiten(descriptors, mu, w)
    within, between = _within_between(feats, labels)
    assert within > between + 0.2
    # Nearest neighbour (excluding self) has the same class for nearly every frame.
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    assert (labels[sims.argmax(axis=1)] == labels).mean() > 0.9


# ---------------------------------------------------------------------------------------------
# The stage


def _cfg(run: str, *overrides: str):
    return load_config(None, [f"run={run}", "features.image_size=32", "features.batch_size=16",
                              "features.stats_batch_size=40", *overrides])


def _commit_frames(run: str, images: np.ndarray, bbox=None) -> None:
    table = frames_table(images)
    if bbox is not None:
        table = table.append_column(schema.BBOX, pa.array(bbox, pa.list_(pa.float32(), 4)))
    commit_table(run, 0, "frames", table)


def test_stage_hog_lda_end_to_end_on_s3(ray_session, s3_bucket):
    from cliquecnn_ray.stages import features as stage

    images, labels = class_images(4, 20, size=32, seed=5)
    images[7] = 0  # a blank frame: HOG 0, but its whitened φ ∝ −μW is a proper direction
    run = f"{s3_bucket}/run"
    _commit_frames(run, images)
    cfg = _cfg(run)
    record = stage.run(cfg)
    stats = record["stats"]
    assert not record["skipped"] and stats["rows"] == 80 and stats["kind"] == "hog_lda"
    assert stats["d"] == hog.hog_dim(32) == 324 and stats["files"] >= 2 and stats["blank"] == 0
    # Plain pyarrow reads a plain fixed_size_list<float32>[324] (no Ray tensor extension type).
    out = StageDir(run, 0, "features")
    fs, _ = storage.resolve(run)
    for uri in out.files(".parquet"):
        assert pq.read_schema(storage.resolve(uri)[1], filesystem=fs).field(schema.FEATURE).type == pa.list_(
            pa.float32(), 324
        )
    ids, feats = schema.table_to_features(out.read_table())
    assert np.array_equal(ids, np.arange(80))
    # Same features as the pure functions on the same frames: sharded statistics equal one-shot ones.
    descriptors = hog.hog_batch(images)
    mu, w = hog.whitening_transform(hog.whitening_stats(descriptors), cfg.features.lda_lambda)
    assert np.abs(feats - hog.whiten(descriptors, mu, w)).max() < 1e-4
    within, between = _within_between(feats, labels)
    assert within > between + 0.2
    with np.load(io.BytesIO(storage.read_bytes(out.file("whitening.npz")))) as npz:
        assert npz["W"].shape == (324, 324) and int(npz["count"]) == 80
    # Rerun with the same config and inputs is skipped.
    assert stage.run(cfg)["skipped"]


def test_stage_raw_with_bbox_and_blank_frame(ray_session, tmp_path):
    from cliquecnn_ray.stages import features as stage

    images, _ = class_images(2, 6, size=48, seed=2)
    images[4] = 0  # a blank frame: its centred pixels are 0 → zero feature vector, reported
    bbox = [[8.0, 8.0, 40.0, 40.0]] * len(images)
    run = str(tmp_path / "run")
    _commit_frames(run, images, bbox=bbox)
    record = stage.run(_cfg(run), kind="raw", stage="features_raw")  # kind overrides the config's hog_lda
    stats = record["stats"]
    assert record["config"]["kind"] == "raw" and stats["rows"] == 12 and stats["d"] == 32 * 32
    assert stats["blank"] == 1 and stats["blank_ids"] == [4]
    out = StageDir(run, 0, "features_raw")
    table = pa.concat_tables([pq.read_table(path) for path in out.files(".parquet")])  # plain pyarrow
    assert table.schema.field(schema.FEATURE).type == pa.list_(pa.float32(), 1024)
    ids, feats = schema.table_to_features(table)
    expected, _ = hog.finish(hog.describe(images[:, 8:40, 8:40], "raw"), "raw")  # 32×32 crop: no resize
    assert np.abs(feats - expected).max() < 1e-5 and (feats[4] == 0).all()


def test_stage_bad_frame_names_it_and_commits_nothing(ray_session, tmp_path):
    from cliquecnn_ray.stages import features as stage

    images, _ = class_images(1, 4, size=32)
    table = frames_table(images)
    payload = table.column(schema.IMAGE).to_pylist()
    payload[2] = b"garbage"
    table = table.set_column(table.schema.get_field_index(schema.IMAGE), schema.IMAGE, pa.array(payload, pa.binary()))
    run = str(tmp_path / "run")
    commit_table(run, 0, "frames", table)
    with pytest.raises(Exception, match="frame_id 2: cannot decode"):
        stage.run(_cfg(run))
    assert StageDir(run, 0, "features").record() is None
    with pytest.raises(ValueError, match="unknown"):
        stage.run(_cfg(run), kind="sift")
