"""Ingestion: videos, image folders and Parquet tables → the canonical frame table, on local disk and S3;
stable ids; every kind of bad input fails with a message naming it."""
import io
import logging
import os
import re

import av
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cliquecnn_ray import frame_sources, schema, storage
from cliquecnn_ray.config import IngestConfig, PipelineConfig
from cliquecnn_ray.frame_sources import IngestError
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.stages import ingest as ingest_stage
from tests.synthetic import png_bytes


def video_bytes(n_frames: int = 12, size: int = 32, seed: int = 0) -> bytes:
    """A small seeded mp4 (MPEG-4 part 2, bundled with PyAV's FFmpeg): a bright square moving on noise."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(n_frames):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[4:12, 2 * t % (size - 8) : 2 * t % (size - 8) + 8] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def image(seed: int, size: int = 12) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8))


def cfg_for(run: str, sources, **ingest_kwargs) -> PipelineConfig:
    return PipelineConfig(run=run, sources=tuple(str(s) for s in sources), ingest=IngestConfig(**ingest_kwargs))


def frames_of(cfg: PipelineConfig) -> pa.Table:
    return StageDir(cfg.run, 0, "frames").read_table()


# ---------------------------------------------------------------------------------------------
# Pure parts (no Ray)


def test_natural_sort():
    names = ["f10.png", "f2.png", "F3.png", "f1.png", "f01.png", "a.png"]
    assert frame_sources.natural_sort(names) == ["a.png", "f01.png", "f1.png", "f2.png", "F3.png", "f10.png"]
    assert frame_sources.natural_sort(["v10/x", "v9/x", "v9b/x"]) == ["v9/x", "v9b/x", "v10/x"]


def test_decode_video_stride_limit_resize(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(video_bytes(12, 32))
    indices, images, skipped = frame_sources.decode_video(str(path), IngestConfig(frame_stride=5))
    assert indices == [0, 5, 10] and skipped == []  # original decode indices: gaps keep temporal distance
    assert Image.open(io.BytesIO(images[0])).size == (32, 32)
    indices, images, _ = frame_sources.decode_video(str(path), IngestConfig(frame_stride=5, max_frames=2, resize_to=16,
                                                                     image_format="jpeg"))
    assert indices == [0, 5]
    decoded = Image.open(io.BytesIO(images[1]))
    assert decoded.format == "JPEG" and decoded.size == (16, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frame_stride": 0}, "frame_stride"),
        ({"image_format": "gif"}, "image_format"),
        ({"on_bad_frame": "ignore"}, "on_bad_frame"),
        ({"column_map": {"x": "label"}}, "'x' to 'label'"),
    ],
)
def test_bad_config_named(kwargs, message):
    with pytest.raises(IngestError, match=message):
        frame_sources.check_config(IngestConfig(**kwargs))


# ---------------------------------------------------------------------------------------------
# Round trips: a video file, an image folder (flat or category tree) and a Parquet table in one run


def _write_sources(base: str, tree: bool):
    """Returns (sources, expected images of the image folder by (video_id, frame_index))."""
    video = storage.join(base, "videos", "walk.mp4")
    storage.write_bytes(video, video_bytes(12, 32))
    folder = storage.join(base, "imgs")
    # Natural order, not lexical: with frame_stride=3, g2 keeps f1 (0) and f10 (3); g10 keeps a9.jpg (0).
    groups = {"g2": ["f1.png", "f2.png", "f3.png", "f10.png"], "g10": ["a9.jpg", "a10.png"]}
    cats = {"g2": "catA", "g10": "catB"}
    originals = {}
    for gi, (g, names) in enumerate(groups.items()):
        for i, name in enumerate(names):
            data = image(10 * gi + i)
            if name.endswith(".jpg"):
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, format="JPEG")
                data = buf.getvalue()
            parts = [cats[g], g, name] if tree else [g, name]
            storage.write_bytes(storage.join(folder, *parts), data)
            originals[(g, sorted(names, key=lambda n: frame_sources.natural_key(n)).index(name))] = data
    storage.write_bytes(storage.join(folder, "README.txt"), b"not a frame")  # ignored, and said so in the log
    table = pa.table({
        "clip": ["p1", "p1", "p0", "p0"],
        "t": pa.array([1, 0, 0, 1], pa.int64()),
        "img": [image(50 + i) for i in range(4)],
        "junk": [1.0, 2.0, 3.0, 4.0],
    })
    parquet = storage.join(base, "table.parquet")
    storage.write_parquet(table, parquet)
    return (video, folder, parquet), originals


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("tree", [False, True], ids=["flat", "category_tree"])
def test_round_trip_video_folder_parquet(where, tree, tmp_path, request, ray_session):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    sources, originals = _write_sources(base, tree)
    column_map = {"clip": "video_id", "t": "frame_index", "img": "image"}
    cfg = cfg_for(storage.join(base, "run"), sources, frame_stride=3, resize_to=16, column_map=column_map,
                  category_from_folder=tree)
    record = ingest_stage.run(cfg)
    stats = record["stats"]
    table = frames_of(cfg)
    schema.validate_frames(table)
    assert table.column("frame_id").to_pylist() == list(range(11))
    assert table.column("video_id").to_pylist() == ["walk"] * 4 + ["g2"] * 2 + ["g10"] + ["p1", "p1", "p0", "p0"]
    assert table.column("frame_index").to_pylist() == [0, 3, 6, 9, 0, 3, 0, 1, 0, 0, 1]
    folder_cats = ["catA"] * 2 + ["catB"] if tree else ["all"] * 3
    assert table.column("category").to_pylist() == ["all"] * 4 + folder_cats + ["all"] * 4
    images = table.column("image").to_pylist()
    assert all(Image.open(io.BytesIO(b)).size == (16, 16) for b in images[:4])  # 32×32 video shrunk to 16
    for row in range(4, 7):  # 12×12 images are under resize_to: original bytes kept
        key = (table.column("video_id")[row].as_py(), table.column("frame_index")[row].as_py())
        assert images[row] == originals[key]
    assert images[7] == image(50)  # Parquet images untouched, row order kept
    assert stats["rows"] == 11 and stats["videos"] == 5 and stats["skipped_frames"] == []
    assert stats["categories"] == ({"all": 8, "catA": 2, "catB": 1} if tree else {"all": 11})
    assert [s["rows"] for s in stats["sources"]] == [4, 3, 4]
    assert ingest_stage.run(cfg)["skipped"]  # same config and inputs: nothing recomputed

    if where == "local" and not tree:
        # Stable ids: the same input ingested again (another run directory) gives an identical table.
        again = cfg_for(str(tmp_path / "run2"), sources, frame_stride=3, resize_to=16, column_map=column_map)
        ingest_stage.run(again)
        second = frames_of(again)
        assert second.schema.equals(table.schema)
        for col in ("frame_id", "video_id", "frame_index", "category", "image"):
            assert second.column(col).equals(table.column(col)), col


def test_parquet_folder_parts_in_natural_order_and_source_order_matters(tmp_path, ray_session):
    for n in (10, 2):  # part-2 comes before part-10 (natural order), whatever the listing order
        storage.write_parquet(pa.table({"video_id": [f"v{n}"], "frame_index": [0], "image": [image(n)]}),
                              str(tmp_path / "parts" / f"part-{n}.parquet"))
    (tmp_path / "imgs" / "g").mkdir(parents=True)
    (tmp_path / "imgs" / "g" / "0.png").write_bytes(image(0))
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "parts", tmp_path / "imgs"])
    ingest_stage.run(cfg)
    assert frames_of(cfg).column("video_id").to_pylist() == ["v2", "v10", "g"]
    # The order of the sources fixes frame_id: reordering them is a new configuration, not a skip.
    swapped = ingest_stage.run(cfg_for(cfg.run, cfg.sources[::-1]))
    assert not swapped["skipped"]
    assert frames_of(cfg).column("video_id").to_pylist() == ["g", "v2", "v10"]


# ---------------------------------------------------------------------------------------------
# Bad frames: an error naming the file, or skipped and listed


def _folder_with_bad_image(root):
    for i in range(3):
        (root / "g").mkdir(parents=True, exist_ok=True)
        (root / "g" / f"f{i}.png").write_bytes(image(i) if i != 1 else b"\x89PNG\r\n\x1a\nnot really")


def test_bad_image_errors_or_is_skipped_and_listed(tmp_path, ray_session, caplog):
    _folder_with_bad_image(tmp_path / "imgs")
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "imgs"])
    with pytest.raises(IngestError, match=r"imgs/g/f1\.png: undecodable image"):
        ingest_stage.run(cfg)
    assert StageDir(cfg.run, 0, "frames").record() is None

    with caplog.at_level(logging.WARNING, logger="cliquecnn_ray"):
        record = ingest_stage.run(cfg_for(cfg.run, cfg.sources, on_bad_frame="skip"))
    skipped = record["stats"]["skipped_frames"]
    assert len(skipped) == 1
    assert skipped[0]["video_id"] == "g" and skipped[0]["frame_index"] == 1
    assert skipped[0]["file"].endswith("imgs/g/f1.png") and skipped[0]["source"] == str(tmp_path / "imgs")
    assert "undecodable" in skipped[0]["reason"]
    assert StageDir(cfg.run, 0, "frames").require()["stats"]["skipped_frames"] == skipped  # in _SUCCESS.json
    assert any("skipped frame 1" in r.getMessage() and "f1.png" in r.getMessage() for r in caplog.records)
    table = frames_of(cfg)
    assert table.column("frame_index").to_pylist() == [0, 2]  # the gap stays: position in natural order
    assert table.column("frame_id").to_pylist() == [0, 1]


def test_failed_ingest_keeps_previous_commit_and_rerun_after_fix_succeeds(tmp_path, ray_session):
    folder = tmp_path / "imgs"
    for i in range(3):
        (folder / "g").mkdir(parents=True, exist_ok=True)
        (folder / "g" / f"f{i}.png").write_bytes(image(i))
    cfg = cfg_for(str(tmp_path / "run"), [folder])
    first = ingest_stage.run(cfg)
    assert first["stats"]["rows"] == 3
    (folder / "g" / "f3.png").write_bytes(b"garbage")  # a new, broken frame
    with pytest.raises(IngestError, match=r"f3\.png"):
        ingest_stage.run(cfg)
    out = StageDir(cfg.run, 0, "frames")
    assert out.require()["attempt"] == first["attempt"]
    assert frames_of(cfg).num_rows == 3  # the earlier commit is still what readers see
    (folder / "g" / "f3.png").write_bytes(image(3))  # fixed
    fixed = ingest_stage.run(cfg)
    assert not fixed["skipped"] and fixed["attempt"] != first["attempt"]
    assert frames_of(cfg).column("frame_index").to_pylist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the input


def test_missing_file(tmp_path):
    with pytest.raises(IngestError, match=r"input not found: .*nope\.mp4"):
        ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "nope.mp4"]))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    with pytest.raises(IngestError, match=r"empty folder .*empty"):
        ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "empty"]))


def test_folder_with_wrong_layout(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "f0.png").write_bytes(image(0))
    with pytest.raises(IngestError, match=r"f0\.png is not laid out as .*<video>/<frame>\.png"):
        ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "flat"]))


def test_undecodable_video(tmp_path, ray_session):
    (tmp_path / "good.mp4").write_bytes(video_bytes(4, 16))
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(IngestError, match=r"cannot decode video .*bad\.mp4"):
        ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "good.mp4", tmp_path / "bad.mp4"]))


@pytest.mark.parametrize(
    "columns, column_map, message",
    [
        ({"video_id": ["a"], "image": [b"x"]}, {}, r"table\.parquet.*required column 'frame_index' is missing"),
        ({"video_id": ["a"], "frame_index": [0]}, {}, r"table\.parquet.*needs an 'image'.*or a 'uri'"),
        ({"video_id": ["a"], "frame_index": [0], "image": [b"x"]}, {"clip": "video_id"},
         r"table\.parquet: ingest\.column_map names column 'clip'"),
        ({"video_id": ["a", "b", "c"], "frame_index": ["0", "1", "x"], "image": [b"x"] * 3}, {},
         r"table\.parquet.*column 'frame_index' has type string, expected int32; first bad row 2"),
        ({"video_id": ["a", "b", None], "frame_index": [0, 1, 2], "image": [b"x"] * 3}, {},
         r"table\.parquet.*column 'video_id' has a null at row 2"),
        ({"video_id": ["a", "b", "a"], "frame_index": [0, 0, 0], "image": [b"x"] * 3}, {},
         r"table\.parquet.*duplicate \(video_id, frame_index\) = \('a', 0\) at rows 0 and 2"),
    ],
    ids=["missing_column", "no_image_or_uri", "column_map_missing", "wrong_type", "null", "duplicate"],
)
def test_bad_parquet(columns, column_map, message, tmp_path, ray_session):
    storage.write_parquet(pa.table(columns), str(tmp_path / "table.parquet"))
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "table.parquet"], column_map=column_map)
    with pytest.raises(IngestError, match=message):
        ingest_stage.run(cfg)


def test_duplicate_pairs_across_sources(tmp_path, ray_session):
    data = video_bytes(3, 16)
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "clip.mp4").write_bytes(data)
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "d1" / "clip.mp4", tmp_path / "d2"])
    with pytest.raises(IngestError, match=r"duplicate .*\('clip', 0\), \('clip', 1\).*d1/clip\.mp4.*d2/clip\.mp4"):
        ingest_stage.run(cfg)


def test_unreachable_s3_endpoint_names_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there; restored after
    monkeypatch.setenv("CLIQUECNN_S3_CONNECT_TIMEOUT", "1")
    with pytest.raises(storage.StorageError, match=r"s3://nowhere/clips/a\.mp4"):
        ingest_stage.run(cfg_for(str(tmp_path / "run"), ["s3://nowhere/clips/a.mp4"]))


# ---------------------------------------------------------------------------------------------
# Every bad input in one run; truncated videos; images and uris inside Parquet tables checked at ingest


def test_every_bad_input_is_reported_in_one_run(tmp_path, ray_session):
    """Two broken Parquet tables and a good video: the one error names both tables, not the first only."""
    (tmp_path / "good.mp4").write_bytes(video_bytes(4, 16))
    storage.write_parquet(pa.table({"video_id": ["a"], "image": [image(0)]}), str(tmp_path / "one.parquet"))
    storage.write_parquet(pa.table({"video_id": ["b"], "frame_index": [0]}), str(tmp_path / "two.parquet"))
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "good.mp4", tmp_path / "one.parquet", tmp_path / "two.parquet"])
    with pytest.raises(IngestError) as failure:
        ingest_stage.run(cfg)
    message = str(failure.value)
    assert "2 inputs cannot be ingested" in message, message
    assert re.search(r"one\.parquet.*required column 'frame_index' is missing", message), message
    assert re.search(r"two\.parquet.*needs an 'image'.*or a 'uri'", message), message
    # Missing sources are all named too, before any work starts.
    with pytest.raises(IngestError, match=r"(?s)input not found: .*nope1\.mp4.*input not found: .*nope2\.mp4"):
        ingest_stage.run(cfg_for(cfg.run, [tmp_path / "nope1.mp4", tmp_path / "good.mp4", tmp_path / "nope2.mp4"]))


def cut_video(path, n_frames: int = 40, keep: float = 0.5) -> None:
    """A real mp4 whose index (moov, moved to the front) declares ``n_frames``, cut after ``keep`` of its bytes,
    as a copy interrupted mid-transfer leaves it."""
    rng = np.random.default_rng(1)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(n_frames):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_video_is_an_error_or_a_listed_warning(tmp_path, ray_session, caplog):
    cut_video(tmp_path / "cut.mp4")
    with av.open(str(tmp_path / "cut.mp4")) as container:
        assert container.streams.video[0].frames == 40  # the container still declares every frame
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "cut.mp4"])
    with pytest.raises(IngestError, match=r"video .*cut\.mp4 is truncated: decoded \d+ of the 40 frames"):
        ingest_stage.run(cfg)
    assert StageDir(cfg.run, 0, "frames").record() is None

    with caplog.at_level(logging.WARNING, logger="cliquecnn_ray"):
        record = ingest_stage.run(cfg_for(cfg.run, cfg.sources, on_bad_frame="skip"))
    rows = record["stats"]["rows"]
    assert 0 < rows < 40
    (listed,) = record["stats"]["skipped_frames"]
    assert listed["video_id"] == "cut" and listed["frame_index"] == rows and listed["file"].endswith("cut.mp4")
    assert f"truncated: decoded {rows} of the 40 frames" in listed["reason"]
    assert any("cut.mp4" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_frame_stride_and_max_frames_do_not_count_as_truncation(tmp_path, ray_session):
    cut_video(tmp_path / "whole.mp4", n_frames=20, keep=1.0)
    record = ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "whole.mp4"], frame_stride=3, max_frames=4))
    assert record["stats"]["rows"] == 4 and record["stats"]["skipped_frames"] == []
    record = ingest_stage.run(cfg_for(str(tmp_path / "run"), [tmp_path / "whole.mp4"], frame_stride=3))
    assert record["stats"]["rows"] == 7 and record["stats"]["skipped_frames"] == []


def huge_png() -> bytes:
    """More pixels than PIL's MAX_IMAGE_PIXELS in a few kB (one bit per pixel, all zero)."""
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def test_images_inside_parquet_are_checked_at_ingest(tmp_path, ray_session):
    images = [image(0), b"\x89PNG\r\n\x1a\nnot really", image(2), huge_png()]
    table = pa.table({"video_id": ["v"] * 4, "frame_index": [0, 1, 2, 3], "image": images})
    storage.write_parquet(table, str(tmp_path / "t.parquet"))
    cfg = cfg_for(str(tmp_path / "run"), [tmp_path / "t.parquet"])
    with pytest.raises(IngestError) as failure:
        ingest_stage.run(cfg)
    message = str(failure.value)
    assert re.search(r"(?s)t\.parquet.*row 1 \(video_id 'v', frame_index 1\): undecodable image", message), message
    assert re.search(r"row 3 \(video_id 'v', frame_index 3\): \d+×\d+ pixels, over the limit", message)
    assert "row 0 " not in message and "row 2 " not in message

    record = ingest_stage.run(cfg_for(cfg.run, cfg.sources, on_bad_frame="skip"))
    assert [s["frame_index"] for s in record["stats"]["skipped_frames"]] == [1, 3]
    assert frames_of(cfg).column("frame_index").to_pylist() == [0, 2]


def test_uri_column_is_read_only_below_the_allowed_roots(tmp_path, ray_session):
    data = tmp_path / "data"
    (data / "frames").mkdir(parents=True)
    (data / "frames" / "ok.png").write_bytes(image(0))
    (tmp_path / "secret.png").write_bytes(image(1))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(image(2))
    os.mkfifo(data / "frames" / "pipe.png")  # a reader would block on it forever
    (data / "frames" / "link.png").symlink_to(tmp_path / "secret.png")
    uris = [str(data / "frames" / "ok.png"), "/etc/passwd", f"{data}/frames/../../secret.png",
            str(data / "frames" / "pipe.png"), "/dev/zero", str(data / "frames" / "link.png"),
            str(tmp_path / "elsewhere" / "x.png")]
    table = pa.table({"video_id": ["v"] * len(uris), "frame_index": list(range(len(uris))), "uri": uris})
    storage.write_parquet(table, str(data / "t.parquet"))
    cfg = cfg_for(str(tmp_path / "run"), [data / "t.parquet"])
    with pytest.raises(IngestError) as failure:
        ingest_stage.run(cfg)
    message = str(failure.value)
    for row, reason in [(1, "outside the allowed roots"), (2, r"'\.\.'"), (3, "not a regular file"),
                        (4, "outside the allowed roots"), (5, "outside the allowed roots"),
                        (6, "outside the allowed roots")]:
        assert re.search(rf"row {row} \(video_id 'v', frame_index {row}\): uri .*{reason}", message), (row, message)
    assert "row 0 " not in message

    # A root the config lists admits its files; the source's own folder stays admitted.
    ok = pa.table({"video_id": ["v", "v"], "frame_index": [0, 1],
                   "uri": [str(data / "frames" / "ok.png"), str(tmp_path / "elsewhere" / "x.png")]})
    storage.write_parquet(ok, str(data / "t.parquet"))
    record = ingest_stage.run(cfg_for(cfg.run, cfg.sources, uri_roots=(str(tmp_path / "elsewhere"),)))
    assert record["stats"]["rows"] == 2


def test_uri_roots_on_s3_are_the_sources_bucket_and_listed_prefixes():
    roots = frame_sources.uri_roots("s3://mine/tables/t.parquet", ("s3://shared/frames",))
    assert frame_sources.uri_problem("s3://mine/any/where.png", roots) == ""
    assert frame_sources.uri_problem("s3://shared/frames/a.png", roots) == ""
    assert "outside the allowed roots" in frame_sources.uri_problem("s3://other/a.png", roots)
    assert "outside the allowed roots" in frame_sources.uri_problem("s3://shared/framesX/a.png", roots)
    assert "'..'" in frame_sources.uri_problem("s3://mine/a/../b.png", roots)
    assert "outside the allowed roots" in frame_sources.uri_problem("http://example.com/a.png", roots)
