"""Round-0 similarities on real data (issue 3): raw pixels, unwhitened HOG and HOG-LDA on Fashion-MNIST.

    .venv/bin/python benchmarks/round0_fashion_mnist.py

Protocol (docs/evaluation.md): queries and database are the 10,000 test images, each query left out of its own
database; mean per-query ROC AUC, k-NN accuracy (k = 5, Pearson, leave-one-out) and mAP, all computed
block by block through the similarity engine. The LDA statistics (μ, Σ) come from all 70,000 images, as the
pipeline computes them over every frame it is given; labels are used for evaluation only.
The reference printed beside each figure is raw pixels measured in the same run.
Writes benchmarks/results/round0_fashion_mnist.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliquecnn_ray import hog, metrics  # noqa: E402
from cliquecnn_ray.config import load_config  # noqa: E402
from cliquecnn_ray.datasets import load_fashion_mnist  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "round0_fashion_mnist.json"


def resize(images: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def main() -> None:
    started = time.time()
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml").features
    train, _ = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    images = resize(np.concatenate([train, test]), cfg.image_size)
    n_train = len(train)
    hog_args = dict(orientations=cfg.hog_orientations, cell=cfg.hog_cell, block=cfg.hog_block)

    descriptors = hog.describe(images, "hog", **hog_args)
    mu, w = hog.whitening_transform(hog.whitening_stats(descriptors), cfg.lda_lambda)
    sims = {
        "raw": hog.finish(hog.describe(resize(test, cfg.image_size), "raw"), "raw")[0],
        "hog": hog.finish(descriptors[n_train:], "hog")[0],
        "hog_lda": hog.whiten(descriptors[n_train:], mu, w),
    }
    results: dict = {}
    rows = {}
    for name, feats in sims.items():
        t0 = time.time()
        result = metrics.class_label_metrics(feats, test_labels, k=5)
        rows[name] = result
        results[f"auc_{name}"] = round(float(result["auc"]), 4)
        results[f"knn_{name}"] = round(float(result["knn"]), 4)
        results[f"map_{name}"] = round(float(result["map"]), 4)
        print(f"{name:8s} evaluated in {time.time() - t0:.1f} s", flush=True)
    results["seconds"] = round(time.time() - started, 1)
    results["queries"] = int(len(test))
    results["image_size"] = cfg.image_size

    print("\nFashion-MNIST test split (10,000 queries, each left out of its own database)")
    print(f"{'similarity':10s} {'AUC':>7s} {'kNN':>7s} {'mAP':>7s}   ratios vs raw (AUC / kNN / mAP)")
    for name in sims:
        a, k, m = (results[f"{x}_{name}"] for x in ("auc", "knn", "map"))
        ra, rk, rm = (results[f"{x}_{name}"] / results[f"{x}_raw"] for x in ("auc", "knn", "map"))
        print(f"{name:10s} {a:7.3f} {k:7.3f} {m:7.3f}   {ra:.3f} / {rk:.3f} / {rm:.3f}")
    print(f"total {results['seconds']} s")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
