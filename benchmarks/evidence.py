"""What the method benchmarks (fashion_mnist.py, moving_fashion_mnist.py) share: the figures they keep, the
error reductions, each round's batch-quality figures and evaluations on the validation split.

Error reductions (issue 11): ``error_reduction`` = 1 − (1 − AUC_final)/(1 − AUC_round0) (vs HOG-LDA, the
method's start); ``error_reduction_vs_best_handcrafted`` = 1 − (1 − AUC_final)/(1 − max(AUC_raw, AUC_hog,
AUC_hog_lda)), the fair one: against the strongest hand-made similarity measured in the same run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cliquecnn_ray import storage
from cliquecnn_ray.config import PipelineConfig
from cliquecnn_ray.rundir import StageDir

KEYS = ("auc", "knn", "map")


def pick(metrics: dict) -> dict:
    """The reported figures of one evaluation, rounded."""
    return {k: (None if metrics.get(k) is None else round(float(metrics[k]), 4)) for k in KEYS}


def error_reduction(auc: float, reference_auc: float) -> float:
    """Share of the reference's AUC error (1 − AUC) that ``auc`` removes."""
    return round(1 - (1 - auc) / (1 - reference_auc), 4)


def best_handcrafted_auc(references: dict) -> float:
    """max(AUC_raw, AUC_hog, AUC_hog_lda) over picked figures keyed raw / hog / hog_lda."""
    return max(references[k]["auc"] for k in ("raw", "hog", "hog_lda"))


def strongest_simple_alternative(final: dict, alternatives: dict) -> dict:
    """Of the alternatives that learn nothing (name → picked figures), the one of best AUC, and whether the
    method's final figures beat it on each of AUC, kNN and mAP; with the share of its AUC error removed."""
    name = max(alternatives, key=lambda k: alternatives[k]["auc"])
    best = alternatives[name]
    return {"name": name, **best, "beaten": {k: final[k] > best[k] for k in KEYS},
            "error_reduction": error_reduction(final["auc"], best["auc"])}


def batch_stats(cfg: PipelineConfig) -> list[dict]:
    """Each round's batch-quality figures as the batches stage logged them (its stats.json, per category),
    scalars only."""
    out = []
    for r in range(cfg.rounds):
        stage = StageDir(cfg.run, r, "batches")
        logged = storage.read_json(stage.file("stats.json"))
        out.append({cat: {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None}
                    for cat, s in logged.items()})
    return out


def validation_config(cfg: PipelineConfig) -> PipelineConfig:
    """The same run evaluated against its validation labels (labels from training images only)."""
    from cliquecnn_ray.datasets import VALIDATION_LABELS

    labels = storage.join(cfg.run, "sources", VALIDATION_LABELS)
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=labels))


def evaluate_validation(cfg: PipelineConfig, round_: int, features_stage: str = "features", ltp_p: int = 0) -> dict:
    """Evaluate one committed features stage on the validation split (stage ``evaluate_validation...``)."""
    from cliquecnn_ray.stages import evaluate

    out = f"evaluate_validation_{features_stage}" + (f"_ltp{ltp_p}" if ltp_p else "")
    return pick(evaluate.run(validation_config(cfg), round_, False, features_stage, out, ltp_p)["stats"])


def tuning(name: str, root: Path) -> dict:
    """The validation sweep behind the config's λ (benchmarks/tune.py's JSON entry), or {} when not run."""
    path = root / "benchmarks" / "results" / "tune.json"
    return json.loads(path.read_text()).get(name, {}) if path.exists() else {}


LAYERS = ("pool5", "fc6", "fc7")  # cnn_features.FEATURE_LAYERS: the candidates a layer sweep tries


def layer_sweep(cfg: PipelineConfig, round_index: int = 0, layers=LAYERS) -> dict:
    """Which layer's features to impute, chosen on the validation split only: round ``round_index``'s
    trained model, each candidate layer's Pearson-normalised features of the validation frames (with the
    config's LTP within each clip when the frames are videos), their validation AUC / kNN / mAP
    (leave-one-out among the validation frames as the evaluate stage; cross-video when the config says so).
    The layer of best validation AUC is ``selected``. No test label is read."""
    import numpy as np

    from cliquecnn_ray import metrics, schema
    from cliquecnn_ray.cnn_features import extract_features
    from cliquecnn_ray.model_file import MODEL_FILE, load_model_bytes
    from cliquecnn_ray.similarity import ltp_stack, pearson_normalise
    from cliquecnn_ray.stage_outputs import IMAGE_COLUMNS, decode_frames, read_frames

    model_uri = StageDir(cfg.run, round_index, "model").file(MODEL_FILE)
    model, meta = load_model_bytes(storage.read_bytes(model_uri), source=model_uri)
    labels = storage.read_parquet(validation_config(cfg).evaluate.labels).sort_by(schema.FRAME_ID)
    frame_ids = labels.column(schema.FRAME_ID).to_numpy()
    frames = read_frames(cfg.run, frame_ids, [*IMAGE_COLUMNS, schema.VIDEO_ID, schema.FRAME_INDEX])
    images = decode_frames(frames, meta["input_size"], grey=meta["in_channels"] == 1)
    videos = np.asarray(frames.column(schema.VIDEO_ID).to_pylist())
    frame_index = frames.column(schema.FRAME_INDEX).to_numpy()
    names = np.asarray(labels.column(schema.LABEL).to_pylist())
    candidates = []
    for layer in layers:
        phi = pearson_normalise(extract_features(model, images, layer).numpy())
        feats = ltp_stack(phi, videos, frame_index, cfg.impute.ltp_p)
        figures = metrics.class_label_metrics(feats, names, k=cfg.evaluate.knn_k, pearson=False,
                                              videos=videos if cfg.evaluate.exclude_same_video else None)
        candidates.append({"feature_layer": layer, **pick(figures)})
    best = max(candidates, key=lambda c: c["auc"])
    return {"selected_on": "validation", "setting": "impute.feature_layer", "round": round_index,
            "ltp_p": cfg.impute.ltp_p,
            "validation_queries": len(frame_ids), "candidates": candidates,
            "selected": {"feature_layer": best["feature_layer"]}}


def _method_stages(cfg: PipelineConfig) -> list[tuple[str, int, str]]:
    """(step name, round, stage directory) of every stage of the method's own run."""
    dirs = [("ingest", 0, "frames"), ("features", 0, "features")]
    for r in range(cfg.rounds):
        dirs += [("neighbours", r, "neighbours"), ("cliques", r, "cliques"), ("batches", r, "batches"),
                 ("train", r, "model"), ("impute", r + 1, "features")]
    return dirs + [("evaluate", r, "evaluate") for r in range(cfg.rounds + 1)]


def _seconds(cfg: PipelineConfig, round_index: int, stage: str) -> float:
    return float((StageDir(cfg.run, round_index, stage).record() or {}).get("seconds") or 0.0)


def recorded_seconds(cfg: PipelineConfig) -> dict:
    """Seconds each pipeline stage took, summed over rounds, from the committed records (``_SUCCESS.json``):
    the method's own cost even when a benchmark resumed a run whose stages were already committed.
    ``method_total`` is their sum."""
    out: dict[str, float] = {}
    for name, r, stage in _method_stages(cfg):
        out[name] = round(out.get(name, 0.0) + _seconds(cfg, r, stage), 1)
    out["method_total"] = round(sum(out.values()), 1)
    return out


def recorded_side_seconds(cfg: PipelineConfig) -> dict:
    """Seconds, from the committed records, of the stages a benchmark runs beside the method in its run
    directory (local): ``random_batches_ablation`` (stages named ``*randombatches``) and ``baselines`` (every
    other one but the validation evaluations, which are selection, not a row)."""
    method = {(r, stage) for _, r, stage in _method_stages(cfg)}
    out = {"baselines": 0.0, "random_batches_ablation": 0.0}
    for round_dir in sorted(Path(cfg.run).glob("round=*")):
        r = int(round_dir.name.split("=", 1)[1])
        for stage_dir in sorted(p for p in round_dir.iterdir() if (p / "_SUCCESS.json").exists()):
            stage = stage_dir.name
            if (r, stage) in method or stage.startswith("evaluate_validation"):
                continue
            key = "random_batches_ablation" if stage.endswith("randombatches") else "baselines"
            out[key] += _seconds(cfg, r, stage)
    return {k: round(v, 1) for k, v in out.items()}
