"""The whole method (paper Sect. 2.6): ingest → features → [neighbours → cliques → batches → train → impute]
× rounds → evaluate → report. Every stage commits to the run directory, so a rerun resumes.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from typing import Callable

from . import storage
from .config import PipelineConfig
from .lease import hold
from .rundir import StageDir, run_stage

log = logging.getLogger(__name__)

# Stage name → module in cliquecnn_ray.stages; each exposes run(cfg, round_index=0, force=False) -> record.
ROUND_STAGES = ("neighbours", "cliques", "batches", "train", "impute")
ALL_STAGES = ("ingest", "features") + ROUND_STAGES + ("evaluate", "report")

# Built-in data sets a config may name as its only source / as its labels ("<name>" = the test split's
# labels, "<name>_validation" = the validation split's, whose labels come from training images).
BUILTIN_SOURCES = ("demo", "fashion_mnist", "moving_fashion_mnist")
DEMO_LABELS = "demo_labels.parquet"


def stage_runner(name: str) -> Callable[..., dict]:
    return importlib.import_module(f"cliquecnn_ray.stages.{name}").run


def resolve_builtin_data(cfg: PipelineConfig) -> PipelineConfig:
    """Expand built-in data set names into real sources (and, for labels, a labels table in the run)."""
    from . import datasets

    if cfg.sources == ("demo",):
        return dataclasses.replace(cfg, sources=tuple(datasets.demo_clips()))
    name = cfg.sources[0] if len(cfg.sources) == 1 else None
    out_dir = storage.join(cfg.run, "sources")
    if name == "fashion_mnist":
        frames_uri, _ = datasets.write_fashion_mnist_sources(out_dir)
    elif name == "moving_fashion_mnist":
        frames_uri, _ = datasets.write_moving_fashion_mnist_sources(
            out_dir, cfg.dataset.train_clips, cfg.dataset.test_clips, seed=cfg.seed)
    else:
        return cfg
    cfg = dataclasses.replace(cfg, sources=(frames_uri,))
    labels = {name: "labels.parquet", f"{name}_validation": datasets.VALIDATION_LABELS}.get(cfg.evaluate.labels)
    if labels:
        cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=storage.join(out_dir, labels)))
    return cfg


def prepare_labels(cfg: PipelineConfig, force: bool = False) -> PipelineConfig:
    """Labels named "demo" are made from the ingested frames (bikes.mp4 shots etc.) as the stage
    ``round=0/labels``, so a re-ingest rebuilds them; no training stage reads them."""
    if cfg.evaluate.labels != "demo":
        return cfg
    from . import datasets

    frames = StageDir(cfg.run, 0, "frames")
    out = StageDir(cfg.run, 0, "labels")

    def compute(attempt_uri: str) -> dict:
        table = datasets.demo_labels(frames.read_table(columns=["frame_id", "video_id", "frame_index"]))
        storage.write_parquet(table, storage.join(attempt_uri, DEMO_LABELS))
        return {"rows": table.num_rows}

    run_stage(out, {"labels": "demo"}, {"frames": frames.fingerprint()}, compute, force=force)
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=out.file(DEMO_LABELS)))


def run_pipeline(cfg: PipelineConfig, force: bool = False, break_lock: bool = False) -> dict:
    """Run (or resume) the whole pipeline, holding the run's lease throughout (``break_lock`` takes it from
    another holder); returns the per-stage records and per-round metrics."""
    with hold(cfg.run, break_lock=break_lock):
        return _run_pipeline(cfg, force)


def _run_pipeline(cfg: PipelineConfig, force: bool) -> dict:
    started = time.time()
    cfg = resolve_builtin_data(cfg)
    timings: dict[str, float] = {}
    records: dict[str, dict] = {}

    def step(name: str, round_: int = 0, **kwargs) -> dict:
        record = stage_runner(name)(cfg, round_index=round_, force=force, **kwargs)
        key = f"round={round_}/{name}" + (f"[{kwargs}]" if kwargs else "")
        records[key] = record
        timings[name] = timings.get(name, 0.0) + (0.0 if record.get("skipped") else record.get("seconds", 0.0))
        return record

    step("ingest")
    cfg = prepare_labels(cfg, force)
    step("features")
    evaluations = []

    def evaluate(r: int) -> None:
        if cfg.evaluate.rerank == "diffusion":
            step("neighbours", r)  # the diffusion graph: the round's own neighbours stage (last round too)
        evaluations.append(step("evaluate", r)["stats"])
        _log_round(r, evaluations[-1], records)

    for r in range(cfg.rounds):
        if cfg.evaluate.labels:
            evaluate(r)
        for name in ROUND_STAGES:
            step(name, r)
    if cfg.evaluate.labels:
        evaluate(cfg.rounds)
    report_uri = step("report")["stats"]["uri"]
    summary = {
        "run": cfg.run,
        "rounds": cfg.rounds,
        "per_round": evaluations,
        "stage_seconds": {k: round(v, 2) for k, v in timings.items()},
        "total_s": round(time.time() - started, 2),
        "report": report_uri,
        "records": {k: {"skipped": v.get("skipped"), "seconds": v.get("seconds")} for k, v in records.items()},
    }
    storage.write_json(storage.join(cfg.run, "summary.json"), summary)
    return summary


def _log_round(round_: int, metrics: dict, records: dict) -> None:
    line = f"round {round_}: AUC {metrics.get('auc', float('nan')):.3f}"
    if metrics.get("knn") is not None:
        line += f"  kNN {metrics['knn']:.3f}"
    if metrics.get("map") is not None:
        line += f"  mAP {metrics['map']:.3f}"
    log.info(line)
