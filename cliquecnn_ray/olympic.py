"""The Olympic Sports posture-retrieval protocol of the CliqueCNN authors, read from their files
(docs/evaluation.md#olympic-sports-protocol).

``data/olympic_sports/`` (shipped in this package) holds, per category (16, alphabetical):
``labels_hdf5_19.02.16/labels_<category>.hdf5`` — datasets ``anchors`` (A,), ``pos_ids``, ``neg_ids`` (one
int array per anchor; variable-length or fixed-width), ``pos_flipvals``, ``neg_flipvals`` (same shapes; 1 =
compare the anchor with the horizontally flipped frame), attributes ``category_name``, ``category_offset``
(frames of the categories before it, in alphabetical order); and ``image_pathes/imagePaths_<category>.txt``,
one frame a line (``./<sequence>/I%05d.png``): ids are 0-based line numbers within the category.

The protocol of their ``calculate_roc_auc.py`` (see the data README): per anchor a, scores = sim_flip[a, j]
where the label's flipval is 1, else sim[a, j], over its labelled positives (target 1) and negatives (0);
that anchor's ROC (sklearn ``roc_curve``) linearly interpolated at 101 FPR points in [0, 1]; the TPRs
averaged over the category's anchors; the category's figure is the trapezoid AUC of that mean curve (no
point forced: not mean_tpr[0] = 0 nor mean_tpr[-1] = 1, which the script does not do); the overall figure is
the unweighted mean over categories. At a grid point on a vertical stretch of a ROC the interpolation takes
the upper TPR (``np.interp``, what the script's ``interp1d`` does in today's SciPy). Here the scores come
straight from features — φ_a·φ_j, and φ_a·φ_flip(j) where flipped features are given (without them
sim_flip = sim, as in the script) — for the anchor's own candidates only: no N×N matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa

from . import metrics, schema

DATA_DIR = Path(__file__).resolve().parent / "data" / "olympic_sports"
LABELS_SUBDIR = "labels_hdf5_19.02.16"
PATHS_SUBDIR = "image_pathes"


class OlympicLabelsError(ValueError):
    """A label file or feature array does not fit the protocol; the message names the category and file."""


@dataclass(frozen=True)
class CategoryLabels:
    """One category's labels, candidates padded to the longest list (positives first in each row).

    anchors (A,) int64; ids (A, C) int64 candidate frame ids (0-based within the category, 0 as padding);
    positive (A, C) bool; flip (A, C) bool (flipval 1); valid (A, C) bool (False on padding).
    """

    category: str
    offset: int
    anchors: np.ndarray
    ids: np.ndarray
    positive: np.ndarray
    flip: np.ndarray
    valid: np.ndarray
    source: str

    @property
    def max_id(self) -> int:
        return int(max(self.anchors.max(initial=-1), self.ids[self.valid].max(initial=-1)))


def _dir(data_dir: Optional[str | Path]) -> Path:
    return Path(data_dir) if data_dir is not None else DATA_DIR


def categories(data_dir: Optional[str | Path] = None) -> list[str]:
    """The categories that have a label file, sorted (the authors' order)."""
    files = sorted((_dir(data_dir) / LABELS_SUBDIR).glob("labels_*.hdf5"))
    if not files:
        raise OlympicLabelsError(f"no labels_<category>.hdf5 files in {_dir(data_dir) / LABELS_SUBDIR}")
    return [f.stem[len("labels_"):] for f in files]


def read_labels(category: str, data_dir: Optional[str | Path] = None) -> CategoryLabels:
    """Read ``labels_<category>.hdf5`` with h5py (datasets anchors, pos_ids, neg_ids, pos_flipvals,
    neg_flipvals; attributes category_name, category_offset), checking the shapes the script asserts."""
    import h5py

    path = _dir(data_dir) / LABELS_SUBDIR / f"labels_{category}.hdf5"
    if not path.exists():
        raise OlympicLabelsError(f"category {category!r}: no label file {path}")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("anchors", "pos_ids", "neg_ids", "pos_flipvals", "neg_flipvals") if k not in f]
        if missing:
            raise OlympicLabelsError(f"{path}: missing datasets {missing}")
        anchors = np.asarray(f["anchors"][()], dtype=np.int64).reshape(-1)
        rows = {k: [np.asarray(x, dtype=np.int64).reshape(-1) for x in f[k][()]]
                for k in ("pos_ids", "neg_ids", "pos_flipvals", "neg_flipvals")}
        name = f.attrs.get("category_name", category)
        name = name.decode() if isinstance(name, bytes) else str(name)
        offset = int(f.attrs.get("category_offset", 0))
    if name != category:
        raise OlympicLabelsError(f"{path}: attribute category_name is {name!r}, expected {category!r}")
    for key, values in rows.items():
        if len(values) != len(anchors):
            raise OlympicLabelsError(f"{path}: dataset {key} has {len(values)} rows for {len(anchors)} anchors")
    for i in range(len(anchors)):
        for ids, flips in (("pos_ids", "pos_flipvals"), ("neg_ids", "neg_flipvals")):
            if len(rows[ids][i]) != len(rows[flips][i]):
                raise OlympicLabelsError(
                    f"{path}: anchor {i} (frame {anchors[i]}) has {len(rows[ids][i])} {ids} but "
                    f"{len(rows[flips][i])} {flips}"
                )
    ids, positive, valid = metrics.pad_candidates(rows["pos_ids"], rows["neg_ids"])
    flipvals, _, _ = metrics.pad_candidates(rows["pos_flipvals"], rows["neg_flipvals"])  # aligned with ids
    flip = (flipvals != 0) & valid
    return CategoryLabels(category, offset, anchors, ids, positive, flip, valid, str(path))


def image_paths(category: str, data_dir: Optional[str | Path] = None) -> list[str]:
    """The category's frame list: line i names frame id i (``./<sequence>/I%05d.png``)."""
    path = _dir(data_dir) / PATHS_SUBDIR / f"imagePaths_{category}.txt"
    if not path.exists():
        raise OlympicLabelsError(f"category {category!r}: no image list {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def frame_keys(category: str, data_dir: Optional[str | Path] = None) -> tuple[list[str], np.ndarray]:
    """(video_id per frame id, frame_index (N,) int32) from the image list: the folder is the sequence,
    ``I%05d.png`` the 0-based frame — the keys to match ingested frames to label ids."""
    videos, index = [], []
    for line in image_paths(category, data_dir):
        parts = line.split("/")
        videos.append(parts[-2])
        index.append(int(parts[-1].split(".")[0].lstrip("I") or 0))
    return videos, np.asarray(index, dtype=np.int32)


def anchor_metrics(
    labels: CategoryLabels, features: np.ndarray, flipped: Optional[np.ndarray] = None
) -> dict[str, np.ndarray]:
    """Per-anchor results of one category (``metrics.ranking_metrics``: auc, ap, tpr (A, 101), ...).

    Args:
        features: (N_c, d) features of the category's frames, row i = line i of its image list.
        flipped: (N_c, d) features of the horizontally flipped frames, or None (then sim_flip = sim).
    """
    features = np.asarray(features)
    n = len(features)
    if labels.max_id >= n:
        raise OlympicLabelsError(
            f"category {labels.category!r}: labels name frame {labels.max_id} but features have {n} rows "
            f"(one per line of imagePaths_{labels.category}.txt expected)"
        )
    if flipped is not None and np.shape(flipped) != features.shape:
        raise OlympicLabelsError(
            f"category {labels.category!r}: flipped features have shape {np.shape(flipped)}, "
            f"features {features.shape}"
        )
    scores = metrics.candidate_scores(
        features[labels.anchors], features, labels.ids, flipped=flipped, flip=labels.flip
    )
    return metrics.ranking_metrics(scores, labels.positive, labels.valid)


def olympic_auc(
    features_by_category: Mapping[str, np.ndarray],
    flipped_by_category: Optional[Mapping[str, np.ndarray]] = None,
    labels_dir: Optional[str | Path] = None,
    check_frame_counts: bool = True,
) -> dict[str, Any]:
    """The Olympic Sports figure of the given features, category by category.

    Args:
        features_by_category: {category: (N_c, d)}, row i = line i of ``imagePaths_<category>.txt``.
            Used as given (φ_a·φ_j); normalise them first if the similarity should be a correlation.
        flipped_by_category: {category: (N_c, d)} features of the mirrored frames, where available.
        labels_dir: a folder laid out like ``data/olympic_sports`` (default: the packaged one).
        check_frame_counts: require N_c = the number of lines of the category's image list.
    Returns:
        ``auc_mean_roc`` (unweighted mean over the given categories of their AUC of the mean ROC — the
        paper's Table 1 figure when all 16 are given), ``auc`` (unweighted mean over categories of the mean
        per-anchor AUC), ``n_categories``, ``n_anchors``, ``skipped_anchors`` (no positive or no negative),
        ``per_category`` {category: {auc_mean_roc, auc, map, n_anchors, skipped_anchors, flipped_candidates}}.
    """
    known = set(categories(labels_dir))
    unknown = sorted(set(features_by_category) - known)
    if unknown:
        raise OlympicLabelsError(f"unknown categories {unknown} (known: {', '.join(sorted(known))})")
    flipped_by_category = flipped_by_category or {}
    per_category: dict[str, dict[str, Any]] = {}
    for category in sorted(features_by_category):
        labels = read_labels(category, labels_dir)
        features = features_by_category[category]
        if check_frame_counts:
            expected = len(image_paths(category, labels_dir))
            if len(features) != expected:
                raise OlympicLabelsError(
                    f"category {category!r}: features have {len(features)} rows, imagePaths_{category}.txt "
                    f"has {expected} frames"
                )
        flipped = flipped_by_category.get(category)
        part = metrics.Partial.of_rows(anchor_metrics(labels, features, flipped))
        summary = metrics.summarise(part)
        per_category[category] = {
            "auc_mean_roc": summary["auc_mean_roc"],
            "auc": summary["auc"],
            "map": summary["map"],
            "n_anchors": summary["n_queries"],
            "skipped_anchors": summary["skipped_queries"],
            "flipped_candidates": int(labels.flip.sum()) if flipped is not None else 0,
            "mean_tpr": (part.tpr_sum / max(part.n_queries, 1)).tolist(),
        }
    counted = [m for m in per_category.values() if m["n_anchors"]]
    return {
        "auc_mean_roc": float(np.mean([m["auc_mean_roc"] for m in counted])) if counted else float("nan"),
        "auc": float(np.mean([m["auc"] for m in counted])) if counted else float("nan"),
        "n_categories": len(counted),
        "n_anchors": sum(m["n_anchors"] for m in per_category.values()),
        "skipped_anchors": sum(m["skipped_anchors"] for m in per_category.values()),
        "per_category": per_category,
    }


def query_labels_table(
    labels_dir: Optional[str | Path] = None,
    frame_ids: Optional[Mapping[str, np.ndarray]] = None,
    only: Optional[Sequence[str]] = None,
) -> pa.Table:
    """The labels as a query-form labels table (query_id, positive_ids, negative_ids;
    docs/data-contracts.md#labels) for the evaluate stage. Frame ids are ``frame_ids[category][line]``
    where given (ingested frames matched via ``frame_keys``), else ``category_offset + line`` (frames
    ingested in the authors' order). Flipvals do not travel in that table: the stage has no flipped features."""
    queries, positives, negatives = [], [], []
    for category in only or categories(labels_dir):
        labels = read_labels(category, labels_dir)
        mapping = None if frame_ids is None else np.asarray(frame_ids[category], dtype=np.int64)

        def to_global(ids: np.ndarray, mapping=mapping, offset=labels.offset) -> np.ndarray:
            return mapping[ids] if mapping is not None else ids + offset

        for a in range(len(labels.anchors)):
            row = labels.ids[a][labels.valid[a]]
            is_pos = labels.positive[a][labels.valid[a]]
            queries.append(int(to_global(labels.anchors[a : a + 1])[0]))
            positives.append(to_global(row[is_pos]).tolist())
            negatives.append(to_global(row[~is_pos]).tolist())
    return pa.table(
        {
            schema.QUERY_ID: pa.array(queries, pa.int64()),
            schema.POSITIVE_IDS: pa.array(positives, pa.list_(pa.int64())),
            schema.NEGATIVE_IDS: pa.array(negatives, pa.list_(pa.int64())),
        },
        schema=schema.QUERY_LABELS,
    )
