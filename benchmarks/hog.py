"""HOG + LDA benchmark (issue 3): all 70,000 Fashion-MNIST images through the batched torch HOG and the LDA
whitening, against skimage.feature.hog called per image.

    .venv/bin/python benchmarks/hog.py               # 70,000 images (train + test)
    .venv/bin/python benchmarks/hog.py --limit 5000  # quicker
    .venv/bin/python benchmarks/hog.py --quality     # also 5-NN accuracy on the test split (raw / hog / hog_lda)

What is timed (in process, no Ray, torch's default threads): ``hog_batch`` over every image (hog_seconds),
then the LDA (lda_seconds): ``whitening_stats`` per 8,192-image shard, ``reduce_stats``,
``whitening_transform`` (λ from the config) and ``whiten``. frames_per_s = frames / (hog_seconds +
lda_seconds). Not timed: reading the IDX files and the 28→image_size resize (PIL bilinear, as
``decode_images`` does; its time is reported as resize_seconds).
The reference: ``skimage.feature.hog`` (``hog_reference``) called per image on the first ``--ref`` images in
the same run, extrapolated linearly to all frames. speedup_vs_skimage compares HOG alone (the LDA code is the
same for both); pipeline_speedup_vs_skimage compares HOG + LDA. Writes benchmarks/results/hog.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliquecnn_ray import hog  # noqa: E402
from cliquecnn_ray.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "hog.json"
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
SHARD = 8192  # frames per partial whitening statistic, as the stage's default stats_batch_size


def load_images(limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Fashion-MNIST train + test: (images uint8 (N, 28, 28), labels (N,), number of train images)."""
    from cliquecnn_ray.datasets import load_fashion_mnist

    train, train_labels = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    images = np.concatenate([train, test])
    labels = np.concatenate([train_labels, test_labels])
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels, min(len(train), len(images))


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) → (N, size, size) with PIL bilinear, as ``decode_images``."""
    if images.shape[1:] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


def hog_lda(images: np.ndarray, fcfg) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The timed path: (features (N, D), hog (N, D), hog_seconds, lda_seconds)."""
    t0 = time.perf_counter()
    descriptors = hog.hog_batch(images, fcfg.hog_orientations, fcfg.hog_cell, fcfg.hog_block)
    t1 = time.perf_counter()
    shards = range(0, len(descriptors), SHARD)
    stats = hog.reduce_stats([hog.whitening_stats(descriptors[s : s + SHARD]) for s in shards])
    mu, w = hog.whitening_transform(stats, fcfg.lda_lambda)
    feats = hog.whiten(descriptors, mu, w)
    t2 = time.perf_counter()
    return feats, descriptors, t1 - t0, t2 - t1


def knn_accuracy(feats: np.ndarray, labels: np.ndarray, k: int = 5, block: int = 2000) -> float:
    """k-NN (majority vote, self excluded) accuracy by cosine similarity, in row blocks."""
    correct = 0
    for s in range(0, len(feats), block):
        sims = feats[s : s + block] @ feats.T
        sims[np.arange(len(sims)), np.arange(s, s + len(sims))] = -np.inf
        nn = np.argpartition(-sims, k, axis=1)[:, :k]
        votes = labels[nn]
        pred = np.array([np.bincount(v, minlength=labels.max() + 1).argmax() for v in votes])
        correct += int((pred == labels[s : s + block]).sum())
    return correct / len(feats)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all 70,000)")
    parser.add_argument("--ref", type=int, default=2000, help="images timed through skimage (extrapolated)")
    parser.add_argument("--quality", action="store_true", help="5-NN accuracy on the test split")
    args = parser.parse_args(argv)

    cfg = load_config(CONFIG if CONFIG.exists() else None)
    fcfg = cfg.features
    size = fcfg.image_size if CONFIG.exists() else 32
    images28, labels, n_train = load_images(args.limit or None)
    t = time.perf_counter()
    images = resize(images28, size)
    resize_seconds = time.perf_counter() - t
    n = len(images)

    feats, descriptors, hog_seconds, lda_seconds = hog_lda(images, fcfg)
    assert np.isfinite(feats).all()

    n_ref = min(args.ref, n)
    t = time.perf_counter()
    ref = np.stack([hog.hog_reference(im, fcfg.hog_orientations, fcfg.hog_cell, fcfg.hog_block)
                    for im in images[:n_ref]])
    ref_seconds = time.perf_counter() - t
    skimage_seconds = ref_seconds * n / n_ref
    max_diff = float(np.abs(ref - hog[:n_ref]).max())

    result = {
        "frames": n,
        "frames_per_s": round(n / (hog_seconds + lda_seconds), 1),
        "speedup_vs_skimage": round(skimage_seconds / hog_seconds, 2),
        "pipeline_speedup_vs_skimage": round((skimage_seconds + lda_seconds) / (hog_seconds + lda_seconds), 2),
        "image_size": size,
        "d": int(hog.shape[1]),
        "hog_seconds": round(hog_seconds, 3),
        "lda_seconds": round(lda_seconds, 3),
        "total_seconds": round(hog_seconds + lda_seconds, 3),
        "hog_frames_per_s": round(n / hog_seconds, 1),
        "skimage_frames_timed": n_ref,
        "skimage_frames_per_s": round(n_ref / ref_seconds, 1),
        "skimage_seconds_extrapolated": round(skimage_seconds, 2),
        "max_abs_diff_vs_skimage": max_diff,
        "resize_seconds_not_timed": round(resize_seconds, 3),
        "lda_lambda": fcfg.lda_lambda,
        "torch_threads": torch.get_num_threads(),
        "timed": "hog_batch + LDA (stats per 8192-frame shard, reduce, Σ^-1/2 via eigh, whiten) in process; "
                 "IDX read and resize not timed; skimage timed on a subset and extrapolated",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    if args.quality and n > n_train:
        test = slice(n_train, n)
        raw, _ = hog.finish(hog.describe(images[test], "raw"), "raw")
        hog_only, _ = hog.finish(hog[test], "hog")
        result["knn5_test_accuracy"] = {
            "raw": round(knn_accuracy(raw, labels[test]), 4),
            "hog": round(knn_accuracy(hog_only, labels[test]), 4),
            "hog_lda": round(knn_accuracy(feats[test], labels[test]), 4),
        }

    print(f"HOG + LDA on {n} Fashion-MNIST images at {size}×{size} (d = {result['d']}), "
          f"{result['torch_threads']} torch threads")
    rows = [
        ("torch hog_batch", hog_seconds, n / hog_seconds),
        ("LDA (stats, Σ^-1/2, whiten)", lda_seconds, n / lda_seconds),
        ("HOG + LDA", hog_seconds + lda_seconds, result["frames_per_s"]),
        (f"skimage hog ({n_ref} timed, extrapolated)", skimage_seconds, n_ref / ref_seconds),
    ]
    print(f"{'step':<42}{'seconds':>10}{'frames/s':>12}")
    for name, sec, fps in rows:
        print(f"{name:<42}{sec:>10.2f}{fps:>12.0f}")
    print(f"speedup vs skimage: HOG {result['speedup_vs_skimage']}×, HOG + LDA "
          f"{result['pipeline_speedup_vs_skimage']}×; max |torch − skimage| = {max_diff:.1e}")
    if "knn5_test_accuracy" in result:
        print("5-NN accuracy on the test split:", result["knn5_test_accuracy"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()
