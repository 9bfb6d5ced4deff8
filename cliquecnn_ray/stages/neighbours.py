"""Neighbours stage (docs/method.md#neighbours): the k most and least similar frames of every frame, per category.

Reads the round's features and the frames' categories; per category, Φ goes into the object store once
and row blocks of ``similarity.row_block`` frames are Ray tasks running the pure block function
(``similarity.block_extremes``) against it. The driver writes one Parquet part per block
(schema.NEIGHBOURS) and commits them with ``rundir.run_stage``.

k larger than a category: clamped to the category's size − 1 with a warning that names the category (a
small category still gets every other frame as its neighbours and farthest frames; failing the whole run
for it would help nobody). A category of one frame gets empty lists.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import ray

from .. import raysetup, schema, similarity, storage
from ..config import PipelineConfig
from ..progress import Progress
from ..rundir import StageDir, run_stage
from ..stage_outputs import read_similarity_features

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # a task whose worker dies (node loss) is rerun elsewhere; blocks are pure, so reruns agree
ALL = "*"  # the single group when similarity.across_categories is set


def _block_task(
    phi: np.ndarray, ids: np.ndarray, start: int, stop: int, k: int, col_block: int, tile_rows: int, threads: int
) -> similarity.Extremes:
    """One Ray task: rows [start, stop) of the category against all of it (Φ shared, read-only)."""
    import torch

    torch.set_num_threads(threads)
    return similarity.block_extremes(phi[start:stop], ids[start:stop], phi, ids, k, col_block, tile_rows)


_remote_block = ray.remote(_block_task)


def _submit(
    features: np.ndarray, ids: np.ndarray, k: int, row_block: int, col_block: int, tile_rows: int,
    cpus_per_task: float,
) -> list[tuple[int, int, ray.ObjectRef]]:
    """Put Φ (N, d) and its ids (N,) into the object store once; one task per row block. → [(start, stop, ref)]."""
    phi_ref = ray.put(np.ascontiguousarray(features, dtype=np.float32))
    ids_ref = ray.put(np.asarray(ids, dtype=np.int64))
    task = _remote_block.options(num_cpus=cpus_per_task, max_retries=MAX_RETRIES)
    threads = max(1, int(cpus_per_task))  # torch threads = the cores the task holds
    blocks = []
    for start in range(0, len(ids), row_block):
        stop = min(start + row_block, len(ids))
        blocks.append((start, stop, task.remote(phi_ref, ids_ref, start, stop, k, col_block, tile_rows, threads)))
    return blocks


def extremes_with_ray(
    features: np.ndarray,
    ids: np.ndarray,
    k: int,
    row_block: int,
    col_block: int,
    tile_rows: int,
    cpus_per_task: float = 1.0,
) -> similarity.Extremes:
    """The Extremes (N, k_eff) of every row of ``features`` (N, d) against all of them, as Ray tasks of
    ``row_block`` rows (the stage's engine for one category; also used by the benchmark's ``--ray``)."""
    blocks = _submit(features, ids, k, row_block, col_block, tile_rows, cpus_per_task)
    parts = ray.get([ref for _, _, ref in blocks])
    return similarity.Extremes(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


def _categories(frames_ids: np.ndarray, frames_cats: np.ndarray, ids: np.ndarray, across: bool) -> np.ndarray:
    """(N,) category of each feature row (ALL when across categories); every feature id must be a frame."""
    order = np.argsort(frames_ids, kind="stable")
    at = np.minimum(np.searchsorted(frames_ids[order], ids), max(len(order) - 1, 0))
    missing = (frames_ids[order][at] != ids) if len(order) else np.ones(len(ids), dtype=bool)
    if missing.any():
        raise schema.SchemaError(
            f"features table: frame_id {ids[np.argmax(missing)]} is not in the frames table "
            f"({int(missing.sum())} feature rows without a frame)"
        )
    if across:
        return np.full(len(ids), ALL, dtype=object)
    return frames_cats[order][at]


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    """Compute and commit StageDir(cfg.run, round_index, "neighbours"); returns run_stage's record."""
    ncfg = cfg.neighbours
    if ncfg.k < 1 or ncfg.row_block < 1 or ncfg.col_block < 1 or ncfg.tile_rows < 1:
        raise ValueError(
            f"neighbours config: k = {ncfg.k}, row_block = {ncfg.row_block}, col_block = {ncfg.col_block}, "
            f"tile_rows = {ncfg.tile_rows} must all be ≥ 1"
        )
    features_dir = StageDir(cfg.run, round_index, "features")
    frames_dir = StageDir(cfg.run, 0, "frames")
    out = StageDir(cfg.run, round_index, "neighbours")
    inputs = {"features": features_dir.fingerprint(), "frames": frames_dir.fingerprint()}
    anchor = ncfg.anchor_round0 if round_index > 0 else 0.0
    if anchor:
        inputs["round0_features"] = StageDir(cfg.run, 0, "features").fingerprint()
    ncfg = dataclasses.replace(ncfg, anchor_round0=anchor)  # round 0 is its own anchor: no reason to recompute it

    def compute(attempt_uri: str) -> dict:
        raysetup.init_ray()
        ids, feats = read_similarity_features(cfg.run, round_index, anchor)
        if len(ids) == 0:
            raise schema.SchemaError(f"features table ({features_dir}): no rows")
        if feats.shape[1] == 0:
            raise schema.SchemaError(f"features table ({features_dir}): column '{schema.FEATURE}' has d = 0")
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            raise schema.SchemaError(f"features table ({features_dir}): frame_id {ids[dup[0]]} appears twice")
        frames = frames_dir.read_table(columns=[schema.FRAME_ID, schema.CATEGORY])
        cats = _categories(
            frames.column(schema.FRAME_ID).to_numpy().astype(np.int64),
            frames.column(schema.CATEGORY).to_numpy(zero_copy_only=False),
            ids,
            ncfg.across_categories,
        )
        if len(frames) > len(ids):
            log.warning("neighbours: %d frames have no features in %s; they get no neighbours",
                        len(frames) - len(ids), features_dir)
        k_used: dict[str, int] = {}
        rows = tasks = 0
        started = time.time()
        pending = []
        for ci, category in enumerate(sorted(set(cats.tolist()))):
            members = np.flatnonzero(cats == category)
            n = len(members)
            k = ncfg.k
            if k > n - 1:
                k = n - 1
                log.warning(
                    "neighbours: category %r has %d frame(s), fewer than k + 1 = %d; using k = %d for it",
                    category, n, ncfg.k + 1, k,
                )
            k_used[str(category)] = k
            blocks = _submit(feats[members], ids[members], k, ncfg.row_block, ncfg.col_block, ncfg.tile_rows,
                             cfg.resources.cpus_per_task)
            for bi, (start, stop, ref) in enumerate(blocks):
                pending.append((ref, ci, bi, ids[members[start:stop]]))
            log.info("neighbours: category %r: %d frames, k = %d, %d tasks", category, n, k,
                     -(-n // ncfg.row_block))
        # Write each block's part as it arrives (driver memory: one block of results at a time).
        by_ref = {p[0]: p[1:] for p in pending}
        remaining = list(by_ref)
        with Progress("neighbours", len(ids), log, unit="frames") as shown:
            while remaining:
                done, remaining = ray.wait(remaining, num_returns=1)
                ci, bi, block_ids = by_ref.pop(done[0])
                table = similarity.extremes_to_table(block_ids, ray.get(done[0]))
                storage.write_parquet(table, storage.join(attempt_uri, f"part-{ci:04d}-{bi:05d}.parquet"))
                rows += table.num_rows
                tasks += 1
                shown.update(table.num_rows)
        log.info("neighbours: %d frames in %d categories, %d tasks, %.1f s", rows, len(k_used), tasks,
                 time.time() - started)
        return {"rows": rows, "categories": len(k_used), "tasks": tasks, "k": k_used, "d": int(feats.shape[1])}

    return run_stage(out, ncfg, inputs, compute, force=force)
