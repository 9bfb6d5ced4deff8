"""Evaluate stage (docs/evaluation.md): a round's features against the labels table, as Ray tasks.

Reads the features of ``StageDir(run, round, features_stage)``, the frames table of round 0 (frame_id,
video_id, frame_index, category) and the labels table ``cfg.evaluate.labels`` (never read by training), in
either form of docs/data-contracts.md#labels:
- class labels (frame_id, label): every labelled frame is a query against the other labelled frames of
  its category (leave-one-out): per-query ROC AUC, AUC of the mean ROC, k-NN accuracy, mAP;
- candidate lists (query_id, positive_ids, negative_ids): per-query AUC, AUC of the mean ROC (the Olympic
  Sports figure) and AP over each query's own candidates; no kNN (no classes).
The evaluation set is the frames the labels table names, per category (from the frames table). Features are
Pearson-normalised per frame (``evaluate.pearson``), then optionally Local Temporal Pooled (``ltp_p``).
With ``evaluate.exclude_same_video`` the evaluation is cross-video: a query's candidates exclude the frames
of its own clip (video_id), so near-duplicate frames of one clip cannot inflate AUC, kNN or mAP.
Work: one Ray task per (category, chunk of queries), each returning additive ``evaluate.Partial`` sums.
Writes ``metrics.json`` (with the curves), ``roc.png`` and ``pr.png``; the record's stats are the metrics
without the curves (read by the pipeline and the report).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from .. import diffusion, figures, metrics, raysetup, schema, storage
from ..config import PipelineConfig, hashed_view, to_dict
from ..metrics import format_metrics_table
from ..rundir import StageDir, StageNotCommitted, matches, run_stage, source_fingerprint
from ..similarity import ltp_features, pearson_normalise

log = logging.getLogger(__name__)

FRAME_COLUMNS = [schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX, schema.CATEGORY]
IDS_SHOWN = 10  # unknown frame ids listed in an error
RERANKS = ("none", "diffusion")


def run(
    cfg: PipelineConfig,
    round_index: int = 0,
    force: bool = False,
    features_stage: str = "features",
    out_stage: str = "evaluate",
    ltp_p: int = 0,
) -> dict:
    """Evaluate ``StageDir(cfg.run, round_index, features_stage)`` and commit to ``StageDir(cfg.run, round_index,
    out_stage)``; ``ltp_p`` > 0 pools ±ltp_p frames first (Eq. 9). Returns run_stage's record."""
    ecfg = cfg.evaluate
    if not ecfg.labels:
        raise ValueError("evaluate: no labels table configured (set evaluate.labels to a Parquet path or URI)")
    if ltp_p < 0:
        raise ValueError(f"evaluate: ltp_p must be ≥ 0, got {ltp_p}")
    _check_rerank(cfg, features_stage)
    features = StageDir(cfg.run, round_index, features_stage)
    frames = StageDir(cfg.run, 0, "frames")
    config, inputs = _spec(cfg, round_index, features_stage, ltp_p)

    def compute(attempt_uri: str) -> dict:
        result = evaluate_run(cfg, features, frames, ltp_p)
        result["protocol"] = {
            "features": str(features),
            "labels": ecfg.labels,
            "similarity": "pearson" if ecfg.pearson else "dot",
            "ltp_p": ltp_p,
            "knn_k": ecfg.knn_k,
            "exclude_same_video": ecfg.exclude_same_video,
            "roc_points": metrics.ROC_POINTS,
            "rerank": ecfg.rerank,
        }
        if ecfg.rerank == "diffusion":
            result["protocol"]["diffusion"] = to_dict(ecfg.diffusion)
        storage.write_json(storage.join(attempt_uri, "metrics.json"), result)
        title = f"{features}" + (f", LTP ±{ltp_p}" if ltp_p else "")
        roc_png, pr_png = figures.roc_and_pr_curves_png(result, title=title)
        storage.write_bytes(storage.join(attempt_uri, "roc.png"), roc_png)
        storage.write_bytes(storage.join(attempt_uri, "pr.png"), pr_png)
        rows = {f"  {cat}": m for cat, m in result["per_category"].items()} if len(result["per_category"]) > 1 else {}
        for line in format_metrics_table({**rows, str(features): result}).splitlines():
            log.info("evaluate: %s", line)
        stats = {k: v for k, v in result.items() if k != "curves"}
        stats["rows"] = result["n_queries"] + result["skipped_queries"]
        return stats

    return run_stage(StageDir(cfg.run, round_index, out_stage), config, inputs, compute, force=force)


def _spec(cfg: PipelineConfig, round_index: int, features_stage: str, ltp_p: int) -> tuple[dict, dict]:
    """The stage's config and inputs: what its record must match."""
    inputs = {
        "features": StageDir(cfg.run, round_index, features_stage).fingerprint(),
        "frames": StageDir(cfg.run, 0, "frames").fingerprint(),
        "labels": source_fingerprint(cfg.evaluate.labels),
    }
    evaluate_config = hashed_view(cfg.evaluate)  # a dict, so the diffusion settings can be left out
    if cfg.evaluate.rerank == "diffusion":
        # The graph is the round's neighbours table (for the last round: `cliquecnn neighbours --round R`).
        inputs["neighbours"] = StageDir(cfg.run, round_index, "neighbours").fingerprint()
    else:
        del evaluate_config["diffusion"]  # its settings change nothing then: committed evaluations stay valid
    return {"evaluate": evaluate_config, "features_stage": features_stage, "ltp_p": ltp_p}, inputs


def current_record(cfg: PipelineConfig, round_index: int) -> Optional[dict]:
    """The round's committed evaluation if it was made with this config from the round's committed
    features; None when there is none or it is stale (an older config, features recomputed since)."""
    record = StageDir(cfg.run, round_index, "evaluate").record()
    if record is None or not cfg.evaluate.labels:
        return None
    try:
        config, inputs = _spec(cfg, round_index, "features", 0)
    except (StageNotCommitted, storage.StorageError):
        return None
    return record if matches(record, config, inputs) else None


def _check_rerank(cfg: PipelineConfig, features_stage: str) -> None:
    ecfg, dcfg = cfg.evaluate, cfg.evaluate.diffusion
    if ecfg.rerank not in RERANKS:
        raise ValueError(f"evaluate.rerank = {ecfg.rerank!r} is not one of {', '.join(RERANKS)}")
    if ecfg.rerank != "diffusion":
        return
    if features_stage != "features":
        raise ValueError(f"evaluate.rerank = diffusion: the graph is the neighbours table of the round's own "
                         f"features, not of {features_stage!r}")
    if not 0 <= dcfg.alpha < 1 or dcfg.k < 1 or dcfg.gamma <= 0 or dcfg.truncate <= dcfg.k:
        raise ValueError(f"evaluate.diffusion: alpha = {dcfg.alpha} must be in [0, 1), k = {dcfg.k} ≥ 1, "
                         f"gamma = {dcfg.gamma} > 0, truncate = {dcfg.truncate} > k")
    if dcfg.k > cfg.neighbours.k:
        raise ValueError(f"evaluate.diffusion.k = {dcfg.k} exceeds neighbours.k = {cfg.neighbours.k}, the "
                         "neighbours the graph is built from")


# ---------------------------------------------------------------------------------------------
# Driver


def evaluate_run(cfg: PipelineConfig, features: StageDir, frames: StageDir, ltp_p: int = 0) -> dict[str, Any]:
    """Load features, frames and labels, distribute the partial sums over Ray tasks; the metrics dict."""
    import ray

    ecfg = cfg.evaluate
    ids, feats = schema.table_to_features(features.read_table(), source=str(features))
    frame_table = frames.read_table(columns=FRAME_COLUMNS)
    labels = storage.read_parquet(ecfg.labels)
    if ecfg.pearson:
        feats = pearson_normalise(feats)  # per frame, before pooling: pooled vectors stay centred, unit norm
    if ltp_p > 0:
        feats = ltp_features(ids, feats, frame_table, ltp_p)
    category_of = _column_by_row(ids, frame_table, schema.CATEGORY, str(features))
    # Clip of each row as an int code, when a query's own clip is left out of its candidates (cross-video).
    video_of = None
    if ecfg.exclude_same_video:
        videos = _column_by_row(ids, frame_table, schema.VIDEO_ID, str(features))
        video_of = metrics.encode_labels(videos.astype(str))[0]
    raysetup.init_ray()
    cpus = cfg.resources.cpus_per_task
    graph = None
    if ecfg.rerank == "diffusion":
        graph = diffusion.load_knn_graph(cfg.run, features.round, ecfg.diffusion.k, ecfg.diffusion.gamma)
    if schema.LABEL in labels.column_names:
        jobs = _class_jobs(cfg, labels, ids, feats, category_of, video_of, cpus, graph)
    elif graph is not None:
        raise ValueError(f"evaluate.rerank = diffusion re-ranks whole rankings of class labels; the labels "
                         f"table ({ecfg.labels}) holds candidate lists")
    elif schema.QUERY_ID in labels.column_names:
        jobs = _candidate_jobs(cfg, labels, ids, feats, category_of, video_of, cpus)
    else:
        raise schema.SchemaError(
            f"labels table ({ecfg.labels}): needs columns ({schema.FRAME_ID}, {schema.LABEL}) or "
            f"({schema.QUERY_ID}, {schema.POSITIVE_IDS}, {schema.NEGATIVE_IDS}); has {', '.join(labels.column_names)}"
        )
    results = ray.get([ref for _, ref in jobs])
    parts: dict[str, metrics.Partial] = {}
    for (cat, _), part in zip(jobs, results):
        parts[cat] = parts.get(cat, metrics.Partial()) + part
    result = metrics.summarise_categories(parts)
    if result["skipped_queries"]:
        log.warning("evaluate: %d queries have no positive or no negative and were skipped", result["skipped_queries"])
    return result


def _column_by_row(ids: np.ndarray, frames: pa.Table, column: str, features_name: str) -> np.ndarray:
    """The frames table's ``column`` (category, video_id) of each features row (features sorted by frame_id)."""
    frame_ids = frames.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    order = np.argsort(frame_ids, kind="stable")
    at = np.minimum(np.searchsorted(frame_ids[order], ids), len(order) - 1)
    missing = frame_ids[order][at] != ids
    if missing.any():
        raise schema.SchemaError(
            f"{features_name}: frame_id {ids[np.argmax(missing)]} has features but no row in the frames table"
        )
    values = frames.column(column).to_numpy(zero_copy_only=False)
    return np.asarray(values[order[at]], dtype=object)


def _rows_of(wanted: np.ndarray, ids: np.ndarray, what: str, source: str) -> np.ndarray:
    """Positions of frame ids ``wanted`` in the sorted features ids; an error names the unknown ones."""
    wanted = np.asarray(wanted, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, wanted), max(len(ids) - 1, 0))
    missing = (ids[at] != wanted) if len(ids) else np.ones(len(wanted), bool)
    if missing.any():
        unknown = np.unique(wanted[missing])
        raise schema.SchemaError(
            f"labels table ({source}): column '{what}' names {len(unknown)} frame id(s) that are not in the "
            f"frames/features of this run: {unknown[:IDS_SHOWN].tolist()}{' …' if len(unknown) > IDS_SHOWN else ''}"
        )
    return at


def _selected(cfg: PipelineConfig, cats: np.ndarray, source: str) -> list[str]:
    present = sorted(set(cats.tolist()))
    if cfg.evaluate.category:
        if cfg.evaluate.category not in present:
            raise ValueError(
                f"evaluate.category = {cfg.evaluate.category!r}: the labels table ({source}) names no frame of "
                f"that category (categories with labels: {', '.join(present)})"
            )
        return [cfg.evaluate.category]
    return present


def _class_jobs(cfg, labels, ids, feats, category_of, video_of, cpus, graph=None) -> list[tuple[str, Any]]:
    import ray

    source = cfg.evaluate.labels
    table = schema.check_columns(labels, schema.CLASS_LABELS, "labels", source)
    label_col = table.column(schema.LABEL)
    if label_col.null_count:
        bad = int(np.flatnonzero(np.asarray(label_col.is_null()))[0])
        raise schema.SchemaError(f"labels table ({source}): column '{schema.LABEL}' is null at row {bad}")
    frame_ids = table.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    uniq, counts = np.unique(frame_ids, return_counts=True)
    if (counts > 1).any():
        raise schema.SchemaError(
            f"labels table ({source}): column '{schema.FRAME_ID}' names frame {uniq[counts > 1][0]} more than once"
        )
    rows = _rows_of(frame_ids, ids, schema.FRAME_ID, source)
    values = np.asarray(label_col.to_pylist(), dtype=object)
    cats = category_of[rows]
    k = cfg.evaluate.knn_k
    jobs = []
    task = ray.remote(_class_task_fn).options(num_cpus=cpus)
    for cat in _selected(cfg, cats, source):
        sel = np.flatnonzero(cats == cat)
        sel = sel[np.argsort(rows[sel])]  # frame_id order: results do not depend on the labels' row order
        codes, _ = metrics.encode_labels(values[sel].astype(str))
        feats_ref = ray.put(np.ascontiguousarray(feats[rows[sel]]))
        codes_ref = ray.put(codes)
        rescore_ref = None if graph is None else ray.put(_rescorer(cfg, graph, feats, category_of == cat, rows[sel]))
        videos_ref = None if video_of is None else ray.put(video_of[rows[sel]])
        n = len(sel)
        row_block = metrics.row_block_for(n, cfg.evaluate.memory_mb)
        step = max(1, cfg.evaluate.queries_per_task)
        log.info("evaluate: category %s, %d labelled frames, %d classes, %d task(s)", cat, n, codes.max() + 1,
                 -(-n // step))
        for start in range(0, n, step):
            jobs.append((cat, task.remote(feats_ref, codes_ref, k, start, min(n, start + step), row_block,
                                          videos_ref, rescore_ref)))
    return jobs


def _rescorer(cfg, graph, feats, in_category, item_rows) -> diffusion.DiffusionRescorer:
    """Diffusion over one category: initial results from all its frames (graph rows = feature rows)."""
    pool = np.flatnonzero(in_category)
    dcfg = cfg.evaluate.diffusion
    return diffusion.DiffusionRescorer(graph, pool, feats[pool], item_rows, dcfg.alpha, dcfg.truncate)


def _candidate_jobs(cfg, labels, ids, feats, category_of, video_of, cpus) -> list[tuple[str, Any]]:
    import ray

    source = cfg.evaluate.labels
    table = schema.check_columns(labels, schema.QUERY_LABELS, "labels", source)
    query_ids = table.column(schema.QUERY_ID).to_numpy().astype(np.int64)
    lists = {}
    for col in (schema.POSITIVE_IDS, schema.NEGATIVE_IDS):
        lists[col] = [np.asarray(v or [], dtype=np.int64) for v in table.column(col).to_pylist()]
    query_rows = _rows_of(query_ids, ids, schema.QUERY_ID, source)
    cand_rows = {
        col: _split(_rows_of(np.concatenate(v) if v else np.zeros(0, np.int64), ids, col, source), v)
        for col, v in lists.items()
    }
    cats = category_of[query_rows]
    feats_ref = ray.put(np.ascontiguousarray(feats))
    task = ray.remote(_candidate_task_fn).options(num_cpus=cpus)
    step = max(1, cfg.evaluate.queries_per_task)
    jobs = []
    for cat in _selected(cfg, cats, source):
        sel = np.flatnonzero(cats == cat)
        log.info("evaluate: category %s, %d queries with candidate lists", cat, len(sel))
        for lo in range(0, len(sel), step):
            chunk = sel[lo : lo + step]
            cand, positive, valid = metrics.pad_candidates(
                [cand_rows[schema.POSITIVE_IDS][i] for i in chunk], [cand_rows[schema.NEGATIVE_IDS][i] for i in chunk]
            )
            if video_of is not None:
                valid &= video_of[cand] != video_of[query_rows[chunk]][:, None]
            jobs.append((cat, task.remote(feats_ref, query_rows[chunk], cand, positive, valid)))
    return jobs


def _split(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    bounds = np.cumsum([len(v) for v in like])[:-1]
    return np.split(flat, bounds) if like else []


def _class_task_fn(feats, codes, k, start, stop, row_block, videos, rescore=None) -> metrics.Partial:
    return metrics.class_partial(feats, codes, k=k, start=start, stop=stop, row_block=row_block, videos=videos,
                                 rescore=rescore)


def _candidate_task_fn(feats, query_rows, cand, positive, valid) -> metrics.Partial:
    scores = metrics.candidate_scores(feats[query_rows], feats, cand)
    return metrics.candidate_partial(scores, positive, valid)


def read_metrics(cfg: PipelineConfig, round_index: int = 0, out_stage: str = "evaluate") -> Optional[dict]:
    """The committed metrics.json of an evaluation (with curves), or None when not committed."""
    out = StageDir(cfg.run, round_index, out_stage)
    if out.record() is None:
        return None
    return storage.read_json(out.file("metrics.json"))
