"""Impute stage (paper Sect. 2.5–2.6, docs/method.md#re-imputation): the trained CNN's features of every
frame, Pearson-normalised, then Local Temporal Pooling, committed as the next round's similarity features.

CNN features come from Ray Data ``map_batches`` with a class (``FeatureExtractor``) that loads model.pt once
per actor; actors get a GPU each when ``resources.gpus_for_impute``. LTP (Eq. 9) runs on the driver over
whole videos: Φ_k = [φ_{k−p}; …; φ_{k+p}] / √(2p+1) (``similarity.ltp_stack``).

No re-normalisation after LTP: each φ is unit-norm and mean-zero (Pearson), so Φ_k is too (its squared
norm is the mean of 2p+1 ones), and Φ_kᵀΦ_l is exactly Eq. 9's s', the mean of the 2p+1 frame
correlations. Only a frame whose φ is zero (a constant feature vector, e.g. all fc7 units dead) makes
the windows around it shorter than 1; such frames are counted in the stats. Labels are never read here.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import raysetup, schema, storage
from ..config import PipelineConfig
from ..model_file import MODEL_FILE
from ..rundir import StageDir, run_stage
from ..similarity import ltp_stack
from ..stage_outputs import IMAGE_COLUMNS, decode_frames, read_frames

log = logging.getLogger(__name__)

ROWS_PER_FILE = 65536  # output rows per Parquet file (whole videos): bounds the driver's LTP memory


class FeatureExtractor:
    """Ray Data actor: loads model.pt once, maps a batch of frames to Pearson-normalised CNN features.

    Batch in: pyarrow table (frame_id, image | uri, bbox?). Batch out: (frame_id, feature
    fixed_size_list<float32>[d]).
    """

    def __init__(self, model_uri: str, layer: str, use_gpu: bool, threads: int, batch_size: int):
        import torch

        from ..model_file import load_model_bytes

        torch.set_num_threads(threads)
        self.model, self.meta = load_model_bytes(storage.read_bytes(model_uri), source=model_uri)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.layer = layer
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..cnn_features import frame_features

        ids = batch.column(schema.FRAME_ID).to_numpy()
        images = decode_frames(batch, self.meta["input_size"], grey=self.meta["in_channels"] == 1)
        feats = frame_features(self.model, images, self.layer, batch_size=self.batch_size, device=self.device)
        if not np.isfinite(feats).all():
            row = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
            raise ValueError(f"impute: CNN feature of frame_id {ids[row]} is NaN or infinite")
        return schema.features_to_table(ids, feats)


def run(
    cfg: PipelineConfig,
    round_index: int = 0,
    force: bool = False,
    model_stage: str = "model",
    out_stage: str = "features",
    ltp_p: Optional[int] = None,
    model_run: Optional[str] = None,
) -> dict:
    """Features of every frame from round ``round_index``'s model, LTP with p = ``impute.ltp_p``, committed to
    StageDir(run, round + 1, "features"). Baselines name another model / output stage or another p;
    ``cliquecnn embed`` names another run's model (``model_run``) for the frames of ``cfg.run``.

    Returns run_stage's record; stats: rows, d (after LTP), frame_d (CNN feature length), feature_layer, ltp_p,
    zero_features (frames whose centred CNN feature was zero), extract_seconds, files.
    """
    if ltp_p is not None:
        cfg = dataclasses.replace(cfg, impute=dataclasses.replace(cfg.impute, ltp_p=ltp_p))
    model_dir = StageDir(model_run or cfg.run, round_index, model_stage)
    frames_dir = StageDir(cfg.run, 0, "frames")
    out = StageDir(cfg.run, round_index + 1, out_stage)
    inputs = {"model": model_dir.fingerprint(), "frames": frames_dir.fingerprint()}
    stage_config = {"impute": cfg.impute, "gpu": cfg.resources.gpus_for_impute}

    def compute(attempt_uri: str) -> dict:
        return _compute(cfg, storage.absolute_uri(model_dir.file(MODEL_FILE)), frames_dir, attempt_uri)

    return run_stage(out, stage_config, inputs, compute, force=force)


def _compute(cfg: PipelineConfig, model_uri: str, frames_dir: StageDir, attempt_uri: str) -> dict:
    import ray

    raysetup.init_ray()
    files = frames_dir.files(".parquet")
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    present = set(pq.read_schema(paths[0], filesystem=fs).names)
    columns = [c for c in IMAGE_COLUMNS if c in present]
    use_gpu = cfg.resources.gpus_for_impute
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cfg.resources.cpus_per_task}
    t0 = time.time()
    # A pool of 1..num_actors actors: a fixed pool that takes every CPU would starve the read tasks.
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.impute.num_actors))
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "layer": cfg.impute.feature_layer,
            "use_gpu": use_gpu,
            "threads": max(1, int(cfg.resources.cpus_per_task)),
            "batch_size": cfg.impute.batch_size,
        },
        batch_size=cfg.impute.batch_size,
        batch_format="pyarrow",
        compute=pool,
        **resources,
    )
    tables = ray.get(ds.to_arrow_refs())  # on a terminal, Ray Data draws this pass's progress bar
    extract_seconds = time.time() - t0
    table = pa.concat_tables(tables) if tables else schema.features_to_table(np.zeros(0), np.zeros((0, 0)))
    ids, feats = schema.table_to_features(table, source="impute")
    expected = int((frames_dir.require().get("stats") or {}).get("rows", len(ids)))
    if len(ids) != expected or len(np.unique(ids)) != len(ids):
        raise ValueError(f"impute: got features for {len(np.unique(ids))} distinct frames, "
                         f"{frames_dir} holds {expected}")
    zero = int((np.abs(feats).sum(axis=1) == 0).sum())
    if zero:
        log.warning("impute: %d frame(s) have a constant CNN feature vector (zero after centring)", zero)

    p = cfg.impute.ltp_p
    meta = read_frames(cfg.run, columns=[schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX])
    meta_ids = meta.column(schema.FRAME_ID).to_numpy()
    if not np.array_equal(meta_ids, ids):
        raise ValueError("impute: the features' frame ids differ from the frames table's")
    videos = meta.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False)
    index = meta.column(schema.FRAME_INDEX).to_numpy()
    n_files = 0
    d = feats.shape[1] * (2 * p + 1)
    for rows in _video_chunks(videos, ROWS_PER_FILE):
        stacked = ltp_stack(feats[rows], videos[rows], index[rows], p)
        storage.write_parquet(schema.features_to_table(ids[rows], stacked),
                              storage.join(attempt_uri, f"part-{n_files:05d}.parquet"))
        n_files += 1
    return {
        "rows": int(len(ids)),
        "d": int(d),
        "frame_d": int(feats.shape[1]),
        "feature_layer": cfg.impute.feature_layer,
        "ltp_p": p,
        "zero_features": zero,
        "extract_seconds": round(extract_seconds, 3),
        "files": n_files,
    }


def _video_chunks(videos: np.ndarray, rows_per_chunk: int) -> list[np.ndarray]:
    """Row indices grouped into chunks of whole videos, about ``rows_per_chunk`` rows each."""
    if len(videos) == 0:
        return []
    _, video = np.unique(videos, return_inverse=True)
    order = np.argsort(video, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(video[order])) + 1, len(order)]
    chunks, begin = [], 0
    for end in starts[1:]:
        if end - begin >= rows_per_chunk or end == len(order):
            chunks.append(np.sort(order[begin:end]))
            begin = end
    return chunks
