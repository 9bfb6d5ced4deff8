"""Features stage (docs/method.md#hog-lda): frames → per-frame similarity features, with Ray Data.

Pass 1 (``map_batches``): decode, crop to bbox, resize, describe (HOG or raw pixels).
For ``hog_lda``: pass 2 reduces the whitening statistics over shards (partial Σx, Σxxᵀ, n per
``stats_batch_size`` frames, summed on the driver), the driver computes (μ, W), and pass 3 whitens.
The last pass writes each batch's features itself as a plain ``fixed_size_list<float32>[d]`` Parquet file
(``schema.features_to_table``), so any Parquet reader reads the output (docs/data-contracts.md#features).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import hog, raysetup, schema, storage
from ..config import FeaturesConfig, PipelineConfig
from ..rundir import StageDir, run_stage

log = logging.getLogger(__name__)

DESCRIPTOR = "descriptor"  # the intermediate column of pass 1 (HOG or centred pixels)
BLANK_IDS_SHOWN = 10  # blank frames listed by id in the stage stats


def run(
    cfg: PipelineConfig,
    round_index: int = 0,
    force: bool = False,
    kind: Optional[str] = None,
    stage: str = "features",
) -> dict:
    """Compute the features of every committed frame and commit them to StageDir(cfg.run, round_index, stage).

    ``kind`` overrides ``cfg.features.kind`` ("hog_lda", "hog", "raw"); the committed config is the
    FeaturesConfig with that kind, so outputs of different kinds never skip one another.
    Returns run_stage's record; its stats: rows, d, kind, blank (count and first ids), hog_seconds
    (pass 1: decode + describe, wall), whitening_seconds (passes 2–3, wall; 0 for kinds without it).
    """
    fcfg = cfg.features if kind is None else dataclasses.replace(cfg.features, kind=kind)
    if fcfg.kind not in hog.KINDS:
        raise ValueError(f"features.kind = {fcfg.kind!r}: unknown (known: {', '.join(hog.KINDS)})")
    frames = StageDir(cfg.run, 0, "frames")
    out = StageDir(cfg.run, round_index, stage)
    inputs = {"frames": frames.fingerprint()}

    def compute(attempt_uri: str) -> dict:
        return _compute(cfg, fcfg, frames, attempt_uri)

    return run_stage(out, fcfg, inputs, compute, force=force)


# ---------------------------------------------------------------------------------------------
# Driver


def _compute(cfg: PipelineConfig, fcfg: FeaturesConfig, frames: StageDir, attempt_uri: str) -> dict:
    import ray

    raysetup.init_ray()
    files = frames.files(".parquet")
    if not files:
        raise ValueError(f"{frames}: the committed frames table has no Parquet files")
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    present = set(pq.read_schema(paths[0], filesystem=fs).names)
    columns = [c for c in (schema.FRAME_ID, schema.IMAGE, schema.URI, schema.BBOX) if c in present]
    if schema.IMAGE not in present and schema.URI not in present:
        raise schema.SchemaError(f"frames table ({files[0]}): needs an '{schema.IMAGE}' or a '{schema.URI}' column")
    cpus = cfg.resources.cpus_per_task
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)

    t0 = time.time()
    descriptors = ds.map_batches(
        _describe_batch,
        fn_kwargs={"fcfg": fcfg, "threads": _threads(cpus)},
        batch_size=fcfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cpus,
    )
    whitening_seconds = 0.0
    if fcfg.kind == "hog_lda":
        descriptors = descriptors.materialize()  # passes 2 and 3 both read it: compute HOG once
        hog_seconds = time.time() - t0
        t1 = time.time()
        parts = descriptors.map_batches(
            _partial_stats,
            batch_size=fcfg.stats_batch_size,
            batch_format="pyarrow",
            num_cpus=cpus,
        ).take_all()
        stats = hog.reduce_stats([_unpack_stats(p) for p in parts])
        mu, w = hog.whitening_transform(stats, fcfg.lda_lambda)
        _write_whitening(attempt_uri, mu, w, stats[2], fcfg.lda_lambda)
        transform = ray.put((mu.astype(np.float32), w.astype(np.float32)))
        written = descriptors.map_batches(
            _whiten_and_write,
            fn_kwargs={"attempt_uri": attempt_uri, "transform": [transform], "threads": _threads(cpus)},
            batch_size=fcfg.stats_batch_size,  # one output file per stats_batch_size frames
            batch_format="pyarrow",
            num_cpus=cpus,
        ).take_all()
        whitening_seconds = time.time() - t1
    else:
        written = descriptors.map_batches(
            _normalise_and_write,
            fn_kwargs={"attempt_uri": attempt_uri},
            batch_size=fcfg.stats_batch_size,  # one output file per stats_batch_size frames
            batch_format="pyarrow",
            num_cpus=cpus,
        ).take_all()
        hog_seconds = time.time() - t0
    return _summarise(written, fcfg, attempt_uri, frames, hog_seconds, whitening_seconds)


def _summarise(written: list[dict], fcfg: FeaturesConfig, attempt_uri: str, frames: StageDir,
               hog_seconds: float, whitening_seconds: float) -> dict:
    """Check the written batches against the frame count; remove files a retried task left behind."""
    dims = sorted({int(r["d"]) for r in written})
    if len(dims) > 1:
        raise ValueError(f"features: batches have descriptor lengths {dims}; every frame must have the same d")
    rows = sum(int(r["rows"]) for r in written)
    expected = int((frames.require().get("stats") or {}).get("rows", rows))
    if rows != expected:
        raise ValueError(f"features: wrote {rows} rows but {frames} holds {expected} frames")
    keep = {r["file"] for r in written}
    for uri in storage.list_files(attempt_uri, (".parquet",)):
        if uri.rsplit("/", 1)[-1] not in keep:
            storage.delete(uri)
    blank_ids = sorted(i for r in written for i in r["blank_ids"])
    if blank_ids:
        log.warning(
            "features: %d blank frame(s) (no gradient / constant image) get a zero feature vector, first "
            "frame_ids %s", len(blank_ids), blank_ids[:BLANK_IDS_SHOWN],
        )
    return {
        "rows": rows,
        "d": dims[0] if dims else 0,
        "kind": fcfg.kind,
        "files": len(keep),
        "blank": len(blank_ids),
        "blank_ids": blank_ids[:BLANK_IDS_SHOWN],
        "hog_seconds": round(hog_seconds, 3),
        "whitening_seconds": round(whitening_seconds, 3),
        "describe_task_seconds": round(sum(float(r["seconds"]) for r in written), 3),
    }


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


# ---------------------------------------------------------------------------------------------
# Ray Data batch functions (pyarrow Table in, pyarrow Table out)


def _describe_batch(batch: pa.Table, fcfg: FeaturesConfig, threads: int) -> pa.Table:
    """Pass 1: frames (frame_id, image | uri, bbox?) → (frame_id, descriptor fixed_size_list[D])."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.time()
    ids = batch.column(schema.FRAME_ID).to_numpy()
    col = lambda name: batch.column(name).to_pylist() if name in batch.column_names else None  # noqa: E731
    images = hog.decode_images(
        col(schema.IMAGE), uris=col(schema.URI), bboxes=col(schema.BBOX), size=fcfg.image_size,
        grey=True, frame_ids=ids,
    )
    desc = hog.describe(images, fcfg.kind, fcfg.hog_orientations, fcfg.hog_cell, fcfg.hog_block)
    seconds = np.zeros(len(ids))
    seconds[:1] = time.time() - t0  # the batch's compute time, carried on its first row
    return pa.table(
        {schema.FRAME_ID: pa.array(ids, pa.int64()), DESCRIPTOR: _fixed_list(desc), "seconds": pa.array(seconds)}
    )


def _partial_stats(batch: pa.Table) -> pa.Table:
    """Pass 2: one row of partial whitening statistics (Σx, Σxxᵀ as float64 bytes, n) per batch."""
    ids, x = _descriptors(batch)
    s, so, n = hog.whitening_stats(x, frame_ids=ids)
    return pa.table(
        {
            "d": pa.array([x.shape[1]], pa.int64()),
            "sum": pa.array([s.tobytes()], pa.large_binary()),
            "sum_outer": pa.array([so.tobytes()], pa.large_binary()),
            "count": pa.array([n], pa.int64()),
        }
    )


def _unpack_stats(row: dict) -> hog.WhiteningStats:
    d = int(row["d"])
    s = np.frombuffer(row["sum"], dtype=np.float64)
    so = np.frombuffer(row["sum_outer"], dtype=np.float64)
    if s.size != d or so.size != d * d:
        raise ValueError(f"features: a partial statistic has {s.size} entries for d = {d} (corrupt shard)")
    return s, so.reshape(d, d), int(row["count"])


def _whiten_and_write(batch: pa.Table, attempt_uri: str, transform: list, threads: int) -> pa.Table:
    """Pass 3 (hog_lda): φ = normalise((x − μ) W), written as one Parquet file; returns one stats row."""
    import ray
    import torch

    torch.set_num_threads(threads)
    mu, w = ray.get(transform[0])  # wrapped in a list so Ray Data passes the ref, not the value
    ids, x = _descriptors(batch)
    feats, blank = hog.l2_normalise((x - mu) @ w)
    return _write(attempt_uri, ids, feats, blank, _task_seconds(batch))


def _normalise_and_write(batch: pa.Table, attempt_uri: str) -> pa.Table:
    """Last pass of "hog" and "raw": L2-normalise, write one Parquet file; returns one stats row."""
    ids, x = _descriptors(batch)
    feats, blank = hog.l2_normalise(x)
    return _write(attempt_uri, ids, feats, blank, _task_seconds(batch))


def _write(attempt_uri: str, ids: np.ndarray, feats: np.ndarray, blank: np.ndarray, seconds: float) -> pa.Table:
    if not np.isfinite(feats).all():  # cannot happen after l2_normalise of finite input; never write it
        row = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise ValueError(f"features: feature of frame_id {ids[row]} is NaN or infinite")
    # Named by the batch's first frame and size: a retried task rewrites the same file.
    name = f"part-{int(ids.min()):010d}-{len(ids)}.parquet"
    storage.write_parquet(schema.features_to_table(ids, feats), storage.join(attempt_uri, name))
    return pa.table(
        {
            "file": [name],
            "rows": pa.array([len(ids)], pa.int64()),
            "d": pa.array([feats.shape[1]], pa.int64()),
            "blank_ids": pa.array([ids[blank].tolist()], pa.list_(pa.int64())),
            "seconds": pa.array([seconds], pa.float64()),
        }
    )


def _descriptors(batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ids = batch.column(schema.FRAME_ID).to_numpy()
    col = batch.column(DESCRIPTOR).combine_chunks()
    d = col.type.list_size
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), d)
    return ids, x


def _task_seconds(batch: pa.Table) -> float:
    return float(np.sum(batch.column("seconds").to_numpy())) if "seconds" in batch.column_names else 0.0


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _write_whitening(attempt_uri: str, mu: np.ndarray, w: np.ndarray, count: int, lam: float) -> None:
    """Keep (μ, W) beside the features: the same transform can whiten new frames later."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu.astype(np.float32), W=w.astype(np.float32), count=count, lda_lambda=lam)
    storage.write_bytes(storage.join(attempt_uri, "whitening.npz"), buf.getvalue())
