"""Seeded synthetic data for tests: images with class structure, frame tables, committed run stages."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from cliquecnn_ray import model_file, network, rundir, schema, storage

SIZE = 24  # the tiny test models' input side


def class_images(n_classes: int = 4, per_class: int = 16, size: int = 32, seed: int = 0):
    """Grey uint8 images (N, size, size) whose class sets the orientation of a bar pattern, with random
    phase, contrast and noise, so HOG separates classes but no two images are equal.
    Returns (images, labels) with labels (N,) int64, classes in blocks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels = [], []
    for c in range(n_classes):
        angle = np.pi * c / n_classes
        for _ in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            freq = rng.uniform(3.0, 4.0)
            wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            img = 128 + rng.uniform(60, 100) * wave + rng.normal(0, 8, wave.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def frames_table(images: np.ndarray, video_ids=None, frame_index=None, category="all") -> pa.Table:
    """A canonical frame table (docs/data-contracts.md#frames) holding PNG bytes of ``images`` (N, H, W[, 3])."""
    n = len(images)
    video_ids = [f"v{i:05d}" for i in range(n)] if video_ids is None else list(video_ids)
    frame_index = np.zeros(n, dtype=np.int32) if frame_index is None else np.asarray(frame_index, np.int32)
    categories = [category] * n if isinstance(category, str) else list(category)
    table = pa.table(
        {
            schema.FRAME_ID: pa.array(np.arange(n, dtype=np.int64)),
            schema.VIDEO_ID: pa.array(video_ids, pa.string()),
            schema.FRAME_INDEX: pa.array(frame_index, pa.int32()),
            schema.CATEGORY: pa.array(categories, pa.string()),
            schema.IMAGE: pa.array([png_bytes(im) for im in images], pa.binary()),
        }
    )
    return schema.validate_frames(table)


def commit_table(run: str, round_: int, stage: str, table: pa.Table) -> rundir.StageDir:
    """Commit ``table`` as stage output, as the real stage would (for tests of later stages)."""
    out = rundir.StageDir(run, round_, stage)

    def write(attempt_uri: str) -> dict:
        storage.write_parquet(table, storage.join(attempt_uri, "part-00000.parquet"))
        return {"rows": table.num_rows}

    rundir.run_stage(out, {"synthetic": stage}, {}, write, force=True)
    return out


def clustered_features(n_clusters: int = 5, per_cluster: int = 20, d: int = 16, noise: float = 0.3, seed: int = 0):
    """L2-normalised features (N, d) float32 around random centres, and their cluster labels (N,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    feats = centres[labels] + noise * rng.normal(size=(len(labels), d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), labels


def committed_model(run: str, round_: int = 0, in_channels: int = 1):
    """A randomly initialised network committed as round ``round_``'s model.pt (as the train stage would)."""
    import torch

    torch.manual_seed(0)
    net = network.build_model("alexnet_small", 6, SIZE, in_channels)
    meta = {"name": "alexnet_small", "num_classes": 6, "input_size": SIZE, "in_channels": in_channels}

    def write(attempt_uri: str) -> dict:
        storage.write_bytes(storage.join(attempt_uri, "model.pt"), model_file.save_model_bytes(net, meta))
        return {"rows": 6}

    rundir.run_stage(rundir.StageDir(run, round_, "model"), {"test": in_channels}, {}, write, force=True)
    return net.eval()


def video_source(path: str, videos: int = 4, frames: int = 6, seed: int = 2) -> str:
    """A Parquet source of ``videos`` short videos (two categories), frames without frame_id, as a user's."""
    images, _ = class_images(n_classes=videos, per_class=frames, size=32, seed=seed)
    table = pa.table({
        schema.VIDEO_ID: [f"clip{seed}-{i // frames}" for i in range(len(images))],
        schema.FRAME_INDEX: pa.array([i % frames for i in range(len(images))], pa.int32()),
        schema.CATEGORY: ["even" if (i // frames) % 2 == 0 else "odd" for i in range(len(images))],
        schema.IMAGE: [png_bytes(im) for im in images],
    })
    storage.write_parquet(table, path)
    return path


def servable_run(run: str, source: str, *overrides: str):
    """A run that can be searched, made by the real stages: ingest ``source``, a committed (random) round-0
    model, impute (LTP p = 1) into round 1 features, round 1's neighbours. Returns its config."""
    from cliquecnn_ray.config import load_config
    from cliquecnn_ray.stages import impute, ingest, neighbours

    cfg = load_config(None, [f"run={run}", f"sources=[{source}]", "impute.ltp_p=1", "impute.batch_size=8",
                             "neighbours.k=4", "evaluate.diffusion.k=3", "evaluate.diffusion.truncate=50",
                             *overrides])
    ingest.run(cfg, 0)
    committed_model(run)
    impute.run(cfg, 0)
    neighbours.run(cfg, 1)
    return cfg
