"""Motion crops: a box around what moves in a still-camera video, found without labels; ingested as the
frames' bbox column, which every later stage crops to."""
import numpy as np
import pyarrow as pa
import pytest

from cliquecnn_ray import schema, storage
from cliquecnn_ray.config import IngestConfig, PipelineConfig
from cliquecnn_ray.frame_sources import IngestError
from cliquecnn_ray.motion_crop import motion_boxes, square_box
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.stages import ingest as ingest_stage
from tests.synthetic import png_bytes

SIZE, SIDE, FRAMES = 48, 10, 12


def moving_square(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright square crossing a textured still background: (frames (T, SIZE, SIZE) uint8, its true boxes)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(20, 120, (SIZE, SIZE)).astype(np.uint8)
    frames, truth = [], []
    for t in range(FRAMES):
        x, y = 2 + 3 * t, 5 + t
        frame = background.copy()
        frame[y : y + SIDE, x : x + SIDE] = 240
        frames.append(frame)
        truth.append((x, y, x + SIDE, y + SIDE))
    return np.stack(frames), np.asarray(truth, np.float32)


def test_boxes_hold_the_moving_square_and_little_else():
    frames, truth = moving_square()
    boxes = motion_boxes(frames)
    assert boxes.shape == (FRAMES, 4) and boxes.dtype == np.float32
    for (x0, y0, x1, y1), (tx0, ty0, tx1, ty1) in zip(boxes, truth):
        assert x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1  # the whole square
        assert x1 - x0 == pytest.approx(y1 - y0) and x1 - x0 <= SIDE + 6  # square, the margin only
        assert 0 <= x0 and 0 <= y0 and x1 <= SIZE and y1 <= SIZE
    np.testing.assert_array_equal(motion_boxes(frames / 255.0), boxes)  # float frames in [0, 1] alike


def test_a_still_video_keeps_whole_frames_and_bad_shapes_are_refused():
    still = np.repeat(moving_square()[0][:1], 5, axis=0)
    np.testing.assert_array_equal(motion_boxes(still), np.tile([0, 0, SIZE, SIZE], (5, 1)))
    with pytest.raises(ValueError, match="grey frames"):
        motion_boxes(np.zeros((4, 8, 8, 3)))
    assert square_box(-3, 10, 7, 30, 48, 48) == (0.0, 10.0, 20.0, 30.0)  # widened, shifted inside
    assert square_box(0, 0, 60, 20, 48, 32) == (14.0, 0.0, 46.0, 32.0)  # at most the short side, centred


def _source(path, frames, videos=("clip",), **extra) -> str:
    n = len(frames)
    table = pa.table({"video_id": [videos[i * len(videos) // n] for i in range(n)],
                      "frame_index": pa.array(np.arange(n) % (n // len(videos)), pa.int32()),
                      "image": [png_bytes(f) for f in frames], **extra})
    storage.write_parquet(table, str(path))
    return str(path)


def test_ingest_writes_each_frames_motion_box(tmp_path, ray_session):
    frames, truth = moving_square()
    other, _ = moving_square(seed=1)
    source = _source(tmp_path / "a.parquet", np.concatenate([frames, other]), videos=("a", "b"))
    cfg = PipelineConfig(run=str(tmp_path / "run"), sources=(source,), ingest=IngestConfig(motion_crop=True))
    ingest_stage.run(cfg)
    table = StageDir(cfg.run, 0, "frames").read_table().sort_by(schema.FRAME_ID)
    boxes = np.asarray(table.column(schema.BBOX).to_pylist(), np.float32)
    np.testing.assert_array_equal(boxes[:FRAMES], motion_boxes(frames))  # each video on its own background
    np.testing.assert_array_equal(boxes[FRAMES:], motion_boxes(other))
    assert (boxes[:FRAMES, :2] <= truth[:, :2]).all() and (boxes[:FRAMES, 2:] >= truth[:, 2:]).all()
    # The frames' own boxes are never overwritten; frames of one video must share a size.
    own = _source(tmp_path / "own.parquet", frames, bbox=pa.array([[0.0, 0.0, 8.0, 8.0]] * FRAMES,
                                                                    pa.list_(pa.float32(), 4)))
    with pytest.raises(IngestError, match="own.parquet.*'bbox'"):
        ingest_stage.run(PipelineConfig(run=str(tmp_path / "r2"), sources=(own,),
                                        ingest=IngestConfig(motion_crop=True)))
    mixed = _source(tmp_path / "mixed.parquet", list(frames[:3]) + [np.zeros((20, 20), np.uint8)])
    with pytest.raises(IngestError, match="video 'clip' has frames of different sizes"):
        ingest_stage.run(PipelineConfig(run=str(tmp_path / "r3"), sources=(mixed,),
                                        ingest=IngestConfig(motion_crop=True)))
