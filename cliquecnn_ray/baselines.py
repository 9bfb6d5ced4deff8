"""Baselines on the same protocol (paper Sect. 3.1, docs/evaluation.md#baselines): raw pixels, HOG, HOG-LDA
(± LTP where the frames form videos), a randomly initialised CNN, NN-CNN, and the full method without LTP.

NN-CNN is trained as the paper trains it (Sect. 3.1 v–vi): like the 1-sample CNN, "a separate class for
each exemplar ... plus one class containing all other samples", where an exemplar's class is the exemplar
and its 10 HOG-LDA nearest neighbours; one softmax over all classes, SGD batches drawn uniformly from the
training list; same network and training budget as the method. Beside it, an ablation: the same exemplar
classes trained with the method's own loss and sampling (r random classes per step, images balanced over
them, no "other" class), which isolates what clique building and batch selection add.

Each baseline is ordinary stages under other names (``features_raw``, ``cliques_nncnn``, ``model_random``,
…), so they commit, resume and evaluate like the method itself. ``run`` writes ``<run>/baselines.json``.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa

from . import schema, storage
from .config import PipelineConfig
from .lease import hold
from .pipeline import prepare_labels, resolve_builtin_data, stage_runner
from .rundir import StageDir, run_stage

log = logging.getLogger(__name__)

NN_CNN_NEIGHBOURS = 10  # paper Sect. 3.1: the exemplar plus its 10 nearest HOG-LDA neighbours


def nn_cnn_classes(
    frame_ids: np.ndarray, nn_ids: list, categories: np.ndarray, per_category: int, seed: int
) -> list[tuple[str, list[int]]]:
    """NN-CNN's classes: per category, ``per_category`` exemplars drawn from the data (seeded, never from
    labels), each with its NN_CNN_NEIGHBOURS nearest neighbours. Returns [(category, frame ids)]."""
    rng = np.random.default_rng(seed)
    classes = []
    for cat in sorted(set(categories.tolist())):
        rows = np.flatnonzero(categories == cat)
        chosen = rng.choice(rows, size=min(per_category, len(rows)), replace=False)
        for row in sorted(chosen):
            members = [int(frame_ids[row])] + [int(j) for j in nn_ids[row][:NN_CNN_NEIGHBOURS]]
            classes.append((cat, members))
    return classes


ALL_CATEGORIES = "*"  # the category of NN-CNN's "other" class and its one batch: they span every category


def with_other_class(classes: list[tuple[str, list[int]]], frame_ids: np.ndarray) -> list[tuple[str, list[int]]]:
    """The paper's NN-CNN classes: the exemplar classes plus one class of every frame in none of them."""
    taken = np.unique(np.concatenate([np.asarray(m, np.int64) for _, m in classes])) if classes else []
    others = np.setdiff1d(np.asarray(frame_ids, np.int64), taken)
    return classes + [(ALL_CATEGORIES, others.tolist())] if len(others) else list(classes)


def random_batches(num_classes_by_category: dict[str, np.ndarray], batches: int, r: int, seed: int):
    """Batches of r distinct classes drawn at random per category: [(category, class ids)]."""
    rng = np.random.default_rng(seed)
    out = []
    for cat, ids in sorted(num_classes_by_category.items()):
        size = min(r, len(ids))
        out.extend((cat, sorted(rng.choice(ids, size=size, replace=False).tolist())) for _ in range(batches))
    return out


def _commit_nn_cnn(cfg: PipelineConfig, force: bool) -> None:
    """Commit NN-CNN's classes and batch (``cliques_nncnn``, ``batches_nncnn``: the exemplar classes, the
    "other" class, one batch holding them all) and the ablation's (``cliques_nngroups``,
    ``batches_nngroups``: the exemplar classes in random batches of r)."""
    neighbours = StageDir(cfg.run, 0, "neighbours")
    frames = StageDir(cfg.run, 0, "frames")
    inputs = {"neighbours": neighbours.fingerprint(), "frames": frames.fingerprint()}
    settings = {"per_category": cfg.cliques.num_cliques, "batches": cfg.batches.num_batches,
                "r": cfg.batches.cliques_per_batch, "seed": cfg.seed}

    table = neighbours.read_table(columns=[schema.FRAME_ID, schema.NN_IDS]).sort_by(schema.FRAME_ID)
    cats = frames.read_table(columns=[schema.FRAME_ID, schema.CATEGORY]).sort_by(schema.FRAME_ID)
    lookup = dict(zip(cats.column(schema.FRAME_ID).to_pylist(), cats.column(schema.CATEGORY).to_pylist()))
    frame_ids = table.column(schema.FRAME_ID).to_numpy()
    categories = np.asarray([lookup[int(f)] for f in frame_ids])
    groups = nn_cnn_classes(frame_ids, table.column(schema.NN_IDS).to_pylist(), categories,
                            cfg.cliques.num_cliques, cfg.seed)
    paper = with_other_class(groups, cats.column(schema.FRAME_ID).to_numpy())

    by_category: dict[str, list] = {}
    for i, (cat, _) in enumerate(groups):
        by_category.setdefault(cat, []).append(i)
    drawn = random_batches({c: np.asarray(v) for c, v in by_category.items()}, cfg.batches.num_batches,
                           cfg.batches.cliques_per_batch, cfg.seed)
    tables = {
        "nncnn": (_classes_table(paper), _batches_table([(ALL_CATEGORIES, list(range(len(paper))))])),
        "nngroups": (_classes_table(groups), _batches_table(drawn)),
    }
    for variant, (classes_tbl, batches_tbl) in tables.items():
        stage_settings = {**settings, "variant": variant}
        for name, tbl in ((f"cliques_{variant}", classes_tbl), (f"batches_{variant}", batches_tbl)):
            run_stage(StageDir(cfg.run, 0, name), stage_settings, inputs,
                      lambda attempt, tbl=tbl: _write(tbl, attempt), force=force)


def _classes_table(classes: list[tuple[str, list[int]]]) -> pa.Table:
    return pa.table(
        {
            schema.CLIQUE_ID: pa.array(np.arange(len(classes), dtype=np.int32)),
            schema.CATEGORY: [c for c, _ in classes],
            schema.FRAME_IDS: pa.array([m for _, m in classes], pa.list_(pa.int64())),
            schema.COMPACTNESS: pa.array(np.full(len(classes), np.nan, np.float32)),
        },
        schema=schema.CLIQUES,
    )


def _batches_table(batches: list[tuple[str, list[int]]]) -> pa.Table:
    return pa.table(
        {
            schema.BATCH_ID: pa.array(np.arange(len(batches), dtype=np.int32)),
            schema.CATEGORY: [c for c, _ in batches],
            schema.CLIQUE_IDS: pa.array([ids for _, ids in batches], pa.list_(pa.int32())),
        },
        schema=schema.BATCHES,
    )


def _write(table: pa.Table, attempt_uri: str) -> dict:
    storage.write_parquet(table, storage.join(attempt_uri, "part-00000.parquet"))
    return {"rows": table.num_rows}


def _commit_random_model(cfg: PipelineConfig, force: bool) -> None:
    """A network with its random initial weights (same seed as round 0's), as a committed model."""
    import torch

    from .model_file import MODEL_FILE, model_meta, save_model_bytes
    from .network import build_model

    def compute(attempt_uri: str) -> dict:
        torch.manual_seed(cfg.seed)
        k = max(2, cfg.cliques.num_cliques)
        meta = model_meta(cfg, k, np.arange(k, dtype=np.int32))
        model = build_model(meta["name"], meta["num_classes"], meta["input_size"], meta["in_channels"])
        storage.write_bytes(storage.join(attempt_uri, MODEL_FILE), save_model_bytes(model, meta))
        return {"rows": k}

    run_stage(StageDir(cfg.run, 0, "model_random"), {"train": dataclasses.asdict(cfg.train), "seed": cfg.seed},
              {"frames": StageDir(cfg.run, 0, "frames").fingerprint()}, compute, force=force)


def _has_videos(cfg: PipelineConfig) -> bool:
    vids = StageDir(cfg.run, 0, "frames").read_table(columns=[schema.VIDEO_ID]).column(schema.VIDEO_ID)
    return len(set(vids.to_pylist())) < len(vids)


def run(cfg: PipelineConfig, force: bool = False, break_lock: bool = False) -> dict[str, dict]:
    """Run (or resume) every baseline and the method's rounds' evaluations, holding the run's lease;
    returns {name: metrics}."""
    with hold(cfg.run, break_lock=break_lock):
        return _run(cfg, force)


def _run(cfg: PipelineConfig, force: bool) -> dict[str, dict]:
    from .training import total_steps

    cfg = resolve_builtin_data(cfg)
    evaluate, features, impute = stage_runner("evaluate"), stage_runner("features"), stage_runner("impute")
    stage_runner("ingest")(cfg, round_index=0, force=force)
    cfg = prepare_labels(cfg, force)
    if not cfg.evaluate.labels:
        raise ValueError("baselines need labels: set evaluate.labels (a labels table) in the config")
    videos = _has_videos(cfg)
    ltp = cfg.impute.ltp_p if cfg.impute.ltp_p > 0 else 3
    results: dict[str, dict] = {}

    def measure(name: str, round_: int, stage: str, ltp_p: int = 0) -> None:
        out = f"evaluate_{name.replace(' ', '_').replace('+', 'plus_').replace('-', '_')}"
        record = evaluate(cfg, round_index=round_, force=force, features_stage=stage, out_stage=out, ltp_p=ltp_p)
        results[name] = {k: record["stats"].get(k) for k in ("auc", "auc_mean_roc", "knn", "map")}

    stage_runner("features")(cfg, round_index=0, force=force)
    for kind in ("raw", "hog"):
        features(cfg, round_index=0, force=force, kind=kind, stage=f"features_{kind}")
        measure(kind, 0, f"features_{kind}")
        if videos:
            measure(f"{kind} + LTP", 0, f"features_{kind}", ltp_p=ltp)
    measure("hog-lda", 0, "features")
    if videos:
        measure("hog-lda + LTP", 0, "features", ltp_p=ltp)

    _commit_random_model(cfg, force)
    impute(cfg, round_index=0, force=force, model_stage="model_random", out_stage="features_random")
    measure("random cnn", 1, "features_random")

    stage_runner("neighbours")(cfg, round_index=0, force=force)
    _commit_nn_cnn(cfg, force)
    budget = dataclasses.replace(cfg.train, steps=total_steps(cfg), round_steps=())  # the method's, all rounds
    for name, variant, balanced in (("nn-cnn", "nncnn", False), ("nn groups + random batches", "nngroups", True)):
        same_budget = dataclasses.replace(cfg, train=dataclasses.replace(budget, balance_cliques=balanced))
        stage_runner("train")(same_budget, round_index=0, force=force, variant=f"_{variant}")
        impute(cfg, round_index=0, force=force, model_stage=f"model_{variant}", out_stage=f"features_{variant}")
        measure(name, 1, f"features_{variant}")

    final = StageDir(cfg.run, cfg.rounds - 1, "model")
    if videos and cfg.rounds > 0 and final.record():
        impute(cfg, round_index=cfg.rounds - 1, force=force, out_stage="features_noltp", ltp_p=0)
        measure("full method without LTP", cfg.rounds, "features_noltp")

    storage.write_json(storage.join(cfg.run, "baselines.json"), results)
    return results


def random_batches_of_cliques(cfg: PipelineConfig, force: bool = False) -> dict:
    """Ablation: round 0's own cliques in random batches of r (no CCCP), trained one round with the method's
    loss, sampling and budget; features with the method's LTP. What CCCP's batch selection adds is the
    method's round-1 figure minus this one. Returns the evaluation record's stats."""
    from .training import round_steps

    cfg = prepare_labels(resolve_builtin_data(cfg))
    cliques = StageDir(cfg.run, 0, "cliques")
    table = cliques.read_table(columns=[schema.CLIQUE_ID, schema.CATEGORY, schema.FRAME_IDS, schema.COMPACTNESS])
    ids, cats = table.column(schema.CLIQUE_ID).to_numpy(), np.asarray(table.column(schema.CATEGORY).to_pylist())
    drawn = random_batches({c: ids[cats == c] for c in sorted(set(cats.tolist()))}, cfg.batches.num_batches,
                           cfg.batches.cliques_per_batch, cfg.seed)
    inputs = {"cliques": cliques.fingerprint()}
    settings = {"batches": cfg.batches.num_batches, "r": cfg.batches.cliques_per_batch, "seed": cfg.seed}
    for name, tbl in (("cliques_randombatches", table), ("batches_randombatches", _batches_table(drawn))):
        run_stage(StageDir(cfg.run, 0, name), settings, inputs, lambda attempt, tbl=tbl: _write(tbl, attempt),
                  force=force)
    one_round = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=round_steps(cfg, 0),
                                                                   round_steps=()))
    stage_runner("train")(one_round, 0, force=force, variant="_randombatches")
    stage_runner("impute")(cfg, 0, force=force, model_stage="model_randombatches", out_stage="features_randombatches")
    record = stage_runner("evaluate")(cfg, 1, force=force, features_stage="features_randombatches",
                                      out_stage="evaluate_randombatches")
    return record["stats"]
