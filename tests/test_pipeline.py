"""The whole pipeline on tiny synthetic videos: every stage, rounds, evaluation, report, resume — locally
and with the whole run under s3:// on a real S3 server."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cliquecnn_ray import schema, storage
from cliquecnn_ray.config import load_config
from cliquecnn_ray.pipeline import ROUND_STAGES, run_pipeline
from cliquecnn_ray.rundir import StageDir
from tests.synthetic import class_images, png_bytes

TINY = [
    "rounds=1",
    "features.image_size=32",
    "neighbours.k=12",
    "cliques.num_cliques=8",
    "cliques.target_size=6",
    "cliques.neighbourhood=8",
    "cliques.min_size=3",
    "cliques.max_per_video=3",
    "batches.num_batches=6",
    "batches.cliques_per_batch=4",
    "batches.restarts=2",
    "train.input_size=32",
    "train.steps=4",
    "train.images_per_step=16",
    "train.checkpoint_every=2",
    "impute.ltp_p=1",
]


def write_sources(root: str) -> tuple[str, str]:
    """A Parquet source of 4 classes × 3 videos × 8 frames, and its labels table (evaluation only)."""
    images, labels = class_images(n_classes=4, per_class=24, size=32, seed=3)
    videos = [f"c{c}_v{(i % 24) // 8}" for i, c in enumerate(labels)]
    table = pa.table(
        {
            "video_id": videos,
            "frame_index": pa.array(np.arange(len(images)) % 8, pa.int32()),
            "image": pa.array([png_bytes(im) for im in images], pa.binary()),
        }
    )
    frames_uri = storage.join(root, "sources", "frames.parquet")
    labels_uri = storage.join(root, "sources", "labels.parquet")
    storage.write_parquet(table, frames_uri)
    storage.write_parquet(
        pa.table({schema.FRAME_ID: pa.array(np.arange(len(labels), dtype=np.int64)),
                  schema.LABEL: [str(x) for x in labels]}),
        labels_uri,
    )
    return frames_uri, labels_uri


def tiny_config(root: str, run: str):
    frames_uri, labels_uri = write_sources(root)
    return load_config(None, TINY + [f"run={run}", f"sources=[{frames_uri}]", f"evaluate.labels={labels_uri}"])


def check_run(cfg, summary):
    assert len(summary["per_round"]) == cfg.rounds + 1
    for metrics in summary["per_round"]:
        assert 0.0 <= metrics["auc"] <= 1.0 and metrics["n_queries"] == 96
    for r in range(cfg.rounds):
        for name in ("neighbours", "cliques", "batches", "model", "evaluate"):
            assert StageDir(cfg.run, r, name).record() is not None, (r, name)
    final_ids, final = schema.table_to_features(StageDir(cfg.run, cfg.rounds, "features").read_table())
    assert len(final_ids) == 96 and np.isfinite(final).all()
    page = storage.read_bytes(summary["report"]).decode()
    assert "Metrics across rounds" in page and "fig4_spectrum.png" in page


def test_pipeline_runs_every_round_and_a_rerun_skips_every_stage(ray_session, tmp_path):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"))
    summary = run_pipeline(cfg)
    check_run(cfg, summary)
    again = run_pipeline(cfg)
    ran = [key for key, rec in again["records"].items() if not rec["skipped"] and not key.endswith("report")]
    assert ran == [], f"a rerun recomputed {ran}"
    assert again["per_round"] == summary["per_round"]
    # The report shows only evaluations made with the config it is given: none for another knn_k.
    from cliquecnn_ray.stages import report

    stale = load_config(None, TINY + [f"run={cfg.run}", f"sources=[{cfg.sources[0]}]",
                                      f"evaluate.labels={cfg.evaluate.labels}", "evaluate.knn_k=3"])
    page = storage.read_bytes(report.run(stale)["stats"]["uri"]).decode()
    assert "round 0 (HOG-LDA)" not in page and "No current evaluation" in page
    assert "round 0 (HOG-LDA)" in storage.read_bytes(report.run(cfg)["stats"]["uri"]).decode()
    # Another imputed layer redoes impute and what follows it, never the training before it.
    fc6 = load_config(None, TINY + [f"run={cfg.run}", f"sources=[{cfg.sources[0]}]",
                                    f"evaluate.labels={cfg.evaluate.labels}", "impute.feature_layer=fc6"])
    ran = {key.split("/")[-1] for key, rec in run_pipeline(fc6)["records"].items() if not rec["skipped"]}
    assert "impute" in ran and ran.isdisjoint({"neighbours", "cliques", "batches", "train"}), ran
    assert StageDir(cfg.run, 1, "features").record()["stats"]["feature_layer"] == "fc6"


def test_interrupted_run_resumes_from_the_failed_stage(ray_session, tmp_path):
    """A stage that fails leaves everything before it committed; the rerun runs only what is missing."""
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"))
    broken = load_config(None, TINY + [f"run={cfg.run}", f"sources=[{cfg.sources[0]}]",
                                       f"evaluate.labels={cfg.evaluate.labels}", "batches.cliques_per_batch=99"])
    with pytest.raises(Exception, match="99"):
        run_pipeline(broken)
    committed = {name: StageDir(cfg.run, 0, name).record() for name in ("neighbours", "cliques")}
    assert all(committed.values()) and StageDir(cfg.run, 0, "batches").record() is None
    summary = run_pipeline(cfg)
    ran = {key.split("/")[-1] for key, rec in summary["records"].items() if not rec["skipped"]}
    assert {"neighbours", "cliques", "ingest", "features"}.isdisjoint(ran)
    assert {"batches", "train", "impute"} <= ran
    check_run(cfg, summary)


def test_whole_run_under_s3(ray_session, s3_bucket):
    """Frames, every stage output, checkpoints and the report live under s3://; nothing is written locally."""
    cfg = tiny_config(s3_bucket, s3_bucket + "/runs/tiny")
    summary = run_pipeline(cfg)
    check_run(cfg, summary)
    files = storage.list_files(cfg.run)
    for stage in ("frames", "features") + tuple(s for s in ROUND_STAGES if s not in ("train", "impute")):
        assert any(f"/{stage}/" in f for f in files), stage
    assert any(f.endswith("model.pt") for f in files)
    assert summary["report"].startswith("s3://")


def test_demo_labels_are_rebuilt_after_a_reingest(tmp_path):
    """The demo labels are a stage on the frames: a re-ingest with another frame_stride (other frame ids
    for other frames) rebuilds them instead of keeping the first ingest's."""
    from cliquecnn_ray import datasets, rundir
    from cliquecnn_ray.pipeline import prepare_labels

    run = str(tmp_path / "run")
    cfg = load_config(None, [f"run={run}", "evaluate.labels=demo"])
    frames = StageDir(run, 0, "frames")

    def ingest(stride: int):
        index = np.arange(0, 250, stride)
        table = pa.table({schema.FRAME_ID: pa.array(np.arange(len(index)), pa.int64()),
                          schema.VIDEO_ID: ["bikes"] * len(index),
                          schema.FRAME_INDEX: pa.array(index, pa.int32())})
        rundir.run_stage(frames, {"frame_stride": stride}, {}, lambda attempt: storage.write_parquet(
            table, storage.join(attempt, "part-0.parquet")) or {"rows": table.num_rows})

    ingest(1)
    first = storage.read_parquet(prepare_labels(cfg).evaluate.labels)
    assert first.num_rows == 250
    ingest(2)
    labels = prepare_labels(cfg).evaluate.labels
    assert storage.read_parquet(labels).equals(datasets.demo_labels(frames.read_table()))
    assert prepare_labels(cfg).evaluate.labels == labels  # unchanged frames: the labels stage is skipped
