"""Settings chosen on validation labels only (issue 11): HOG-LDA's relative regulariser λ per benchmark.

    .venv/bin/python benchmarks/tune.py [fashion_mnist] [moving_fashion_mnist]     # default: both

For each data set, as the benchmark's config builds it (configs/<name>.yaml): HOG of every frame (all of
them unlabelled input, as the features stage sees them), the whitening statistics once, then for each λ
candidate (Σ = cov + λ·tr(cov)/D·I) the validation split's mean per-query AUC, 5-NN accuracy and mAP. The
validation labels come from training images only (``datasets.fashion_mnist_validation_ids``,
``datasets.moving_fashion_mnist_validation_clips``; Moving Fashion-MNIST cross-video); no test label is
read. The λ of best validation AUC is ``selected``; the configs set it unless a later validation sweep of the
method's final round chose otherwise (benchmarks/variants.py). Raw pixels and plain HOG are measured
on the same validation queries as references. Writes benchmarks/results/tune.json (one entry per data set).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliquecnn_ray import datasets, hog, metrics  # noqa: E402
from cliquecnn_ray.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tune.json"
# × tr(cov)/D, from near full whitening to near plain centred HOG
LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def motion_cropped(frames: np.ndarray, per_clip: int, threshold: float, size: int) -> np.ndarray:
    """(N, H, W) grey frames, clip after clip → each cropped to its clip's motion box and resized, as
    ``ingest.motion_crop`` and the features stage do (the same boxes, the same decoder)."""
    from cliquecnn_ray.figures import png_bytes
    from cliquecnn_ray.motion_crop import motion_boxes

    boxes = np.concatenate([motion_boxes(frames[i:i + per_clip], threshold) for i in range(0, len(frames), per_clip)])
    return hog.decode_images([png_bytes(frame) for frame in frames], bboxes=boxes, size=size)


def validation_data(name: str, cfg) -> dict:
    """Every frame (unlabelled, as the features stage sees it) and the validation rows, their labels and
    (videos) clips."""
    size = cfg.features.image_size
    if name == "fashion_mnist":
        train, train_labels = datasets.load_fashion_mnist("train")
        test, _ = datasets.load_fashion_mnist("test")  # images only: the test labels are never read here
        rows = datasets.fashion_mnist_validation_ids(seed=cfg.seed)
        return {"images": resize(np.concatenate([train, test]), size), "rows": rows, "labels": train_labels[rows],
                "videos": None}
    clips = datasets.moving_fashion_mnist_clips(cfg.dataset.train_clips, cfg.dataset.test_clips, cfg.seed)
    per_clip = clips["frames_per_clip"]
    rows = datasets.moving_fashion_mnist_validation_rows(cfg.dataset.train_clips, per_clip, cfg.seed)
    images = (motion_cropped(clips["frames"], per_clip, cfg.ingest.motion_threshold, size)
              if cfg.ingest.motion_crop else resize(clips["frames"], size))
    return {"images": images, "rows": rows, "labels": clips["classes"][rows], "videos": clips["video_ids"][rows]}


def _figures(feats: np.ndarray, data: dict, knn_k: int) -> dict:
    m = metrics.class_label_metrics(feats, data["labels"], k=knn_k, videos=data["videos"])
    return {k: round(float(m[k]), 4) for k in ("auc", "knn", "map")}


def tune(name: str) -> dict:
    started = time.time()
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    fcfg = cfg.features
    data = validation_data(name, cfg)
    images = data["images"]
    hog_args = dict(orientations=fcfg.hog_orientations, cell=fcfg.hog_cell, block=fcfg.hog_block)
    descriptors = hog.describe(images, "hog", **hog_args)
    stats = hog.whitening_stats(descriptors)  # over every frame, as the features stage: no label involved
    val = descriptors[data["rows"]]
    k = cfg.evaluate.knn_k
    references = {
        "raw": _figures(hog.finish(hog.describe(images[data["rows"]], "raw"), "raw")[0], data, k),
        "hog": _figures(hog.finish(val, "hog")[0], data, k),
    }
    candidates = []
    for lam in LAMBDAS:
        mu, w = hog.whitening_transform(stats, lam)
        candidates.append({"lda_lambda": lam, **_figures(hog.whiten(val, mu, w), data, k)})
        print(f"{name}: λ = {lam:<5} validation AUC {candidates[-1]['auc']:.4f}  kNN {candidates[-1]['knn']:.4f}  "
              f"mAP {candidates[-1]['map']:.4f}", flush=True)
    best = max(candidates, key=lambda c: c["auc"])
    return {
        "selected_on": "validation",
        "validation_queries": int(len(data["rows"])),
        "cross_video": data["videos"] is not None,
        "motion_crop": cfg.ingest.motion_crop,
        "setting": "features.lda_lambda (relative to tr(cov)/D)",
        "candidates": candidates,
        "selected": {"lda_lambda": best["lda_lambda"]},
        "config_value": fcfg.lda_lambda,
        "references": references,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    names = sys.argv[1:] or ["fashion_mnist", "moving_fashion_mnist"]
    for name in names:
        r = tune(name)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # other data sets' entries kept
        results[name] = r
        ref = max(r["references"].values(), key=lambda m: m["auc"])["auc"]
        print(f"{name}: selected λ = {r['selected']['lda_lambda']} (config has {r['config_value']}); "
              f"best validation AUC / best reference AUC = "
              f"{max(c['auc'] for c in r['candidates']) / ref:.3f}; {r['seconds']} s")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
