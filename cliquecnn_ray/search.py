"""Searching a run's frames: what the search service (``service.py``) serves, without Ray.

- which round of a run can be served, and what is missing when none can (``servable_round``);
- the round's features in slices (``read_feature_slice``), one per index shard, and the merge of the
  shards' top-k lists into the answer an unsharded search gives (``merge_top_k``);
- a query image → its feature, exactly as the impute stage makes a frame's, the image being a video of one
  frame for Local Temporal Pooling (``query_features``);
- the frames' metadata and thumbnails (``FrameCatalogue``), read only from the run's committed frames table.

A client names frames by ``frame_id`` only, never by a path, so nothing it sends can reach a file outside
the run. Never imports ray.
"""
from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import schema, storage
from .rundir import StageDir, StageNotCommitted

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# What a run can serve


def model_dir(run: str, round_index: int) -> StageDir:
    """The model whose features are round ``round_index``'s: round r's impute writes round r + 1's features."""
    return StageDir(run, round_index - 1, "model")


def missing_for_round(run: str, round_index: int) -> list[str]:
    """What round ``round_index`` of ``run`` lacks to be served (empty when nothing): frames, features, model."""
    missing = []
    if round_index < 1:
        return [f"round {round_index} features come from no trained model (HOG-LDA); serve a round ≥ 1"]
    for stage in (StageDir(run, 0, "frames"), StageDir(run, round_index, "features"), model_dir(run, round_index)):
        if stage.record() is None:
            missing.append(f"{stage} (no {stage.success_uri})")
    return missing


def servable_round(run: str, round_index: int | None = None) -> int:
    """``round_index`` when it can be served, else StageNotCommitted naming what is missing; ``None`` picks
    the last round with committed features and the model that made them."""
    if round_index is not None:
        missing = missing_for_round(run, round_index)
        if missing:
            raise StageNotCommitted(f"cannot use round {round_index} of {run}: missing {'; '.join(missing)}")
        return round_index
    rounds = sorted(int(p.rsplit("round=", 1)[1].split("/")[0]) for p in storage.list_files(run, (".json",))
                    if "round=" in p and p.endswith("/features/_SUCCESS.json"))
    for candidate in reversed(rounds):
        if not missing_for_round(run, candidate):
            return candidate
    found = f"committed features of round(s) {', '.join(map(str, rounds))}" if rounds else "no committed features"
    raise StageNotCommitted(f"{run} has no round to serve: it needs the frames table, a round r ≥ 1 of features "
                            f"and round r − 1's model (train + impute); found {found}")


def same_location(a: str, b: str) -> bool:
    return storage.resolve(a)[1].rstrip("/") == storage.resolve(b)[1].rstrip("/")


def feature_settings(run: str, round_index: int) -> tuple[str, int]:
    """The layer and the Local Temporal Pooling radius p that the round's features were made with (its impute
    record). Runs made while the layer was a training setting recorded it in the model file instead."""
    stats = StageDir(run, round_index, "features").require().get("stats") or {}
    layer = stats.get("feature_layer")
    if layer is None:
        from .model_file import MODEL_FILE, load_model_bytes

        uri = model_dir(run, round_index).file(MODEL_FILE)
        layer = load_model_bytes(storage.read_bytes(uri), source=uri)[1]["feature_layer"]
    return str(layer), int(stats.get("ltp_p", 0))


# ---------------------------------------------------------------------------------------------
# Features in shards


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges [lo, hi) covering n rows, sizes differing by at most one."""
    if shards < 1:
        raise ValueError(f"shards must be ≥ 1, got {shards}")
    edges = [n * i // shards for i in range(shards + 1)]
    return list(itertools.pairwise(edges))


def feature_count(run: str, round_index: int) -> int:
    return int(StageDir(run, round_index, "features").require()["stats"]["rows"])


def read_feature_slice(run: str, round_index: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [lo, hi) of the round's features in ascending frame_id order: (frame_ids, features (m, d)).

    Frame ids are dense 0..N−1 (the frames table's contract) and every frame has a feature, so row i is
    frame i and the slice is a filter the Parquet reader pushes down: a shard reads only its own rows.
    """
    stage = StageDir(run, round_index, "features")
    uris = stage.files(".parquet")
    fs, _ = storage.resolve(uris[0])
    dataset = pads.dataset([storage.resolve(u)[1] for u in uris], filesystem=fs, format="parquet")
    ids = pc.field(schema.FRAME_ID)
    table = dataset.to_table(filter=(ids >= lo) & (ids < hi))
    frame_ids, feats = schema.table_to_features(table, source=str(stage))
    if not np.array_equal(frame_ids, np.arange(lo, hi)):
        raise schema.SchemaError(f"{stage}: frame ids {lo}..{hi - 1} are not all present once (got {len(frame_ids)})")
    return frame_ids, feats


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several shards' (scores (k',), frame_ids (k',)) lists: by score, ties by frame_id
    (the exact index's order, so a sharded answer equals the unsharded one); −1 padding dropped."""
    scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s, _ in parts])
    ids = np.concatenate([np.asarray(i, np.int64).reshape(-1) for _, i in parts])
    keep = ids >= 0
    scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


# ---------------------------------------------------------------------------------------------
# Queries


@dataclass(frozen=True)
class NeighbourAnswers:
    """Every frame's committed nearest neighbours (the round's neighbours table): the answer a frame-id query
    with k ≤ ``k`` and no re-ranking gets from an exact search, without searching. Row i is frame i."""

    nn_ids: np.ndarray  # (N, k) int64, best first, ties by frame_id as merge_top_k orders them
    nn_sims: np.ndarray  # (N, k) float32

    @property
    def k(self) -> int:
        return int(self.nn_ids.shape[1])

    def answer(self, frame_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, frame_ids) of the frame's k nearest other frames."""
        ids, sims = self.nn_ids[frame_id, :k], self.nn_sims[frame_id, :k]
        keep = ids >= 0  # a collection of fewer than k + 1 frames pads its lists
        return sims[keep], ids[keep]


def read_neighbours_table(run: str, round_index: int) -> tuple | None:
    """The round's committed neighbours table as ``similarity.read_neighbours`` gives it; None when there is none."""
    from .similarity import read_neighbours

    stage = StageDir(run, round_index, "neighbours")
    return read_neighbours(stage) if stage.record() is not None else None


def read_neighbour_answers(run: str, round_index: int,
                           table: tuple | None = None) -> tuple[NeighbourAnswers | None, str]:
    """The round's neighbours table as frame-id answers, or None and why it cannot give them: it must be
    committed for the round's current features, over all frames as one group (not per category), and built
    from the features themselves (not mixed with round 0's, ``neighbours.anchor_round0``). ``table``: the
    table as ``similarity.read_neighbours`` gives it, when the caller has read it already."""
    from .similarity import read_neighbours

    stage, features = StageDir(run, round_index, "neighbours"), StageDir(run, round_index, "features")
    record = stage.record()
    if record is None:
        return None, f"{stage} is not committed"
    if record.get("inputs", {}).get("features") != features.fingerprint():
        return None, f"{stage} was computed from other features than the committed {features}"
    if record.get("stats", {}).get("categories") != 1:
        return None, f"{stage} lists neighbours within each of {record.get('stats', {}).get('categories')} categories"
    if record.get("config", {}).get("anchor_round0"):
        return None, f"{stage} was built from a similarity mixed with round 0's"
    ids, extremes = table if table is not None else read_neighbours(stage)
    if not np.array_equal(ids, np.arange(feature_count(run, round_index))):
        return None, f"{stage} does not list every frame of {features} once"
    # Ties in the exact index's order (score, then frame_id), so both ways give the same answer; pads
    # (id −1, sim −inf) stay last.
    order = np.lexsort((extremes.nn_ids, -extremes.nn_sims))
    return NeighbourAnswers(np.take_along_axis(extremes.nn_ids, order, axis=1),
                            np.take_along_axis(extremes.nn_sims, order, axis=1)), ""


class QueryError(ValueError):
    """A client's request cannot be answered; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


RERANKS = ("none", "diffusion")


def check_query(k: int, max_k: int, rerank: str) -> None:
    if not 1 <= k <= max_k:
        raise QueryError(422, f"k = {k} is out of range: ask for 1 to {max_k} results")
    if rerank not in RERANKS:
        raise QueryError(422, f"rerank = {rerank!r} is not one of {', '.join(RERANKS)}")


def check_image(data: bytes, max_bytes: int) -> None:
    """A client's upload must be an image Pillow decodes (PNG, JPEG, ...), of at most ``max_bytes``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise QueryError(400, "the upload is empty: send an image file (PNG, JPEG, ...) as the request body")
    if len(data) > max_bytes:
        raise QueryError(413, f"the upload has {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError as exc:  # Pillow's message names only its in-memory buffer
        raise QueryError(400, f"the upload ({len(data)} bytes) is not an image in a format that can be decoded "
                              "(PNG, JPEG, ...)") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise QueryError(400, f"the upload is not an image that can be decoded (PNG, JPEG, ...): {exc}") from exc


def query_features(model, meta: dict, images: list[bytes], layer: str, ltp_p: int, device=None) -> np.ndarray:
    """Encoded query images → (m, d) features comparable with the round's: the model's Pearson-normalised φ
    of ``layer`` (``cnn_features.frame_features``, as impute), then LTP with each image a video of one frame
    (its window is φ repeated 2p + 1 times, unit-norm like every database feature)."""
    from .cnn_features import frame_features
    from .hog import decode_images
    from .similarity import ltp_stack

    pixels = decode_images(list(images), size=meta["input_size"], grey=meta["in_channels"] == 1)
    phi = frame_features(model, pixels, layer, device=device)
    m = len(phi)
    return ltp_stack(phi, np.arange(m), np.zeros(m, np.int64), ltp_p)


# ---------------------------------------------------------------------------------------------
# Frames: metadata for answers, thumbnails for the page


@dataclass(frozen=True)
class FrameInfo:
    frame_id: int
    video_id: str
    frame_index: int
    category: str

    def as_dict(self, score: float | None = None) -> dict:
        out = {"frame_id": self.frame_id, "video_id": self.video_id, "frame_index": self.frame_index,
               "category": self.category}
        return out if score is None else {**out, "score": float(score)}


class FrameCatalogue:
    """The run's frames table, as the service needs it: each frame's video, index and category (N small
    rows in memory) and, on request, one frame's image (read from its Parquet row group, not held)."""

    def __init__(self, run: str, thumbnail_size: int = 96):
        stage = StageDir(run, 0, "frames")
        self.uris = stage.files(".parquet")
        self.fs = storage.resolve(self.uris[0])[0]
        self.thumbnail_size = int(thumbnail_size)
        tables, locations = [], []
        for f, uri in enumerate(self.uris):
            parquet = pq.ParquetFile(storage.resolve(uri)[1], filesystem=self.fs)
            for g in range(parquet.num_row_groups):
                group = parquet.read_row_group(g, columns=[schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX,
                                                           schema.CATEGORY])
                tables.append(group)
                locations.append(np.stack([np.full(group.num_rows, f), np.full(group.num_rows, g),
                                           np.arange(group.num_rows)], axis=1))
        table = pa.concat_tables(tables)
        ids = table.column(schema.FRAME_ID).to_numpy()
        order = np.argsort(ids, kind="stable")
        self.frame_ids = ids[order].astype(np.int64)
        self.video_ids = table.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False)[order]
        self.frame_index = table.column(schema.FRAME_INDEX).to_numpy()[order].astype(np.int64)
        self.categories = table.column(schema.CATEGORY).to_numpy(zero_copy_only=False)[order]
        self.location = np.concatenate(locations)[order]  # (file, row group, row) of each frame
        self.image_columns = [c for c in (schema.IMAGE, schema.URI, schema.BBOX)
                              if c in pq.read_schema(storage.resolve(self.uris[0])[1], filesystem=self.fs).names]
        self.thumbnail = lru_cache(maxsize=4096)(self._thumbnail)
        # A video's frames in frame_index order, for the page's strip.
        self._by_video = np.lexsort((self.frame_index, self.video_ids))
        self._video_starts = np.r_[0, np.flatnonzero(self.video_ids[self._by_video][1:]
                                                     != self.video_ids[self._by_video][:-1]) + 1, len(ids)]
        # Counted once: np.unique over N strings costs tens of milliseconds, too much for every /api/info.
        self._summary = {"frames": len(self.frame_ids), "videos": len(self._video_starts) - 1,
                         "categories": sorted({str(c) for c in np.unique(self.categories)})}

    def __len__(self) -> int:
        return len(self.frame_ids)

    def row(self, frame_id: int) -> int:
        """Row of ``frame_id``; QueryError 404 for a frame the run does not hold."""
        at = int(np.searchsorted(self.frame_ids, frame_id))
        if at >= len(self.frame_ids) or self.frame_ids[at] != frame_id:
            raise QueryError(404, f"frame_id {frame_id} is not a frame of this run (it holds {len(self)} frames)")
        return at

    def info(self, row: int) -> FrameInfo:
        return FrameInfo(int(self.frame_ids[row]), str(self.video_ids[row]), int(self.frame_index[row]),
                         str(self.categories[row]))

    def describe(self, frame_ids: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [self.info(self.row(int(i))).as_dict(s) for i, s in zip(frame_ids, scores)]

    def video_strip(self, row: int, limit: int) -> list[dict]:
        """Up to ``limit`` frames of ``row``'s video in frame_index order, centred on ``row``."""
        position = int(np.flatnonzero(self._by_video == row)[0])
        v = int(np.searchsorted(self._video_starts, position, side="right")) - 1
        lo, hi = self._video_starts[v], self._video_starts[v + 1]
        start = min(max(lo, position - limit // 2), max(lo, hi - limit))
        return [self.info(int(r)).as_dict() for r in self._by_video[start : min(hi, start + limit)]]

    def summary(self) -> dict:
        return {**self._summary, "categories": list(self._summary["categories"])}

    def _thumbnail(self, row: int) -> bytes:
        from PIL import Image

        from .hog import decode_images

        f, g, r = (int(x) for x in self.location[row])
        group = pq.ParquetFile(storage.resolve(self.uris[f])[1], filesystem=self.fs).read_row_group(
            g, columns=self.image_columns).slice(r, 1)

        def column(name: str):
            return group.column(name).to_pylist() if name in group.column_names else None

        # The model's own decoding (crop to bbox, resize), in colour, at thumbnail size.
        pixels = decode_images(column(schema.IMAGE), uris=column(schema.URI), bboxes=column(schema.BBOX),
                               size=self.thumbnail_size, grey=False, frame_ids=[int(self.frame_ids[row])])
        buf = io.BytesIO()
        Image.fromarray(pixels[0]).save(buf, format="PNG")
        return buf.getvalue()
