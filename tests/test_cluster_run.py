"""Stages driven on a real multi-node Ray cluster (tests/raycluster.py) the way a user drives them, by
`cliquecnn <stage> --address <gcs>` processes: no S3 secret reaches Ray's logs or job metadata, and faults
beyond the neighbours stage end with the uninterrupted run's output: a training worker SIGKILLed
mid-training, a driver SIGKILLed mid-stage and rerun, a worker node lost during a Ray Data stage.

One cluster for the module (head + one worker node, one CPU each). Its nodes know no S3 endpoint or key:
what the workers know of S3 comes from the driver. The node-loss test runs last (it leaves the head alone).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from cliquecnn_ray import model_file, raysetup, rundir, schema, storage
from cliquecnn_ray.config import load_config
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.stages import features as features_stage
from cliquecnn_ray.stages import neighbours as neighbours_stage
from cliquecnn_ray.stages import train as train_stage
from tests.raycluster import REPO, LocalCluster, _env, process_name
from tests.synthetic import class_images, png_bytes
from tests.test_ingest import video_bytes
from tests.test_scaleout import FAST_HEALTH_CHECKS, _commit_random_features, _sorted_neighbours
from tests.test_train import tiny_run

NO_S3 = {key: None for key in raysetup.S3_ENV}  # the nodes' environment lacks every S3 setting


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=1, head_env=FAST_HEALTH_CHECKS, node_env=NO_S3)
    try:
        c.add_worker(cpus=1)
        yield c
    finally:
        c.stop()


def drive(cluster: LocalCluster, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """A `cliquecnn` driver process connected to the cluster (not a submitted job: its own process)."""
    return subprocess.Popen([sys.executable, "-m", "cliquecnn_ray.cli", *args, "--address", cluster.gcs_address],
                            env={**_env(), **(env or {})}, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def cluster_processes(cluster: LocalCluster, prefix: str) -> list[int]:
    return [pid for node in cluster.nodes for pid in node.processes() if process_name(pid).startswith(prefix)]


# ---------------------------------------------------------------------------------------------
# Secrets


def test_a_secret_key_reaches_the_workers_but_no_log_and_no_job_metadata(cluster, s3_bucket):
    """The driver holds a sentinel secret key (moto accepts any); ingest's Ray Data tasks read the video from
    S3 and write the frames back, on nodes that know no endpoint and no key. Then every file of the session's
    logs and the jobs' metadata are searched for the sentinel."""
    sentinel = f"sentinel{uuid.uuid4().hex}"
    storage.write_bytes(f"{s3_bucket}/clips/walk.mp4", video_bytes(6, 16))
    run = f"{s3_bucket}/runs/secret"
    out = finish(drive(cluster, ["ingest", f"{s3_bucket}/clips/walk.mp4", "--run", run],
                       env={"AWS_SECRET_ACCESS_KEY": sentinel}))
    assert StageDir(run, 0, "frames").require()["stats"]["rows"] == 6, out

    logs = cluster.session_logs()
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 10, files  # the raylets', GCS's, workers' and runtime-env agents' logs
    assert len(list(logs.glob("raylet*.out"))) == len(cluster.nodes)  # of every node, the worker's too
    leaked = [str(p.relative_to(logs)) for p in files if sentinel.encode() in p.read_bytes()]
    assert leaked == [], f"the secret is in {leaked}"
    jobs = cluster.job_client().list_jobs()
    metadata = repr(jobs) + repr(cluster._get("/api/jobs/"))
    assert sentinel not in metadata
    from ray.util.state import list_jobs

    assert sentinel not in repr(list_jobs(address=cluster.dashboard, detail=True, raise_on_missing_output=False))


# ---------------------------------------------------------------------------------------------
# Faults


TRAIN = ["train.input_size=32", "train.steps=60", "train.images_per_step=8", "train.checkpoint_every=5",
         "train.log_every=5", "train.max_failures=1"]


def test_training_worker_sigkilled_mid_training_resumes_to_the_uninterrupted_result(cluster, ray_session, tmp_path):
    """SIGKILL (no exception, no cleanup) the Ray Train worker once the trainer has registered a checkpoint
    (its checkpoint manager's snapshot is on disk, not only a checkpoint folder being uploaded): the trainer
    restarts the worker group from the latest checkpoint and the committed model equals an uninterrupted
    run's."""
    run, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    tiny_run(run)
    tiny_run(reference)
    driver = drive(cluster, ["train", "--run", run, *TRAIN])
    checkpoints = os.path.join(run, "round=0", "model", "_ray_train")
    killed, deadline = [], time.time() + 180
    while not killed and driver.poll() is None and time.time() < deadline:
        registered = any("checkpoint_manager_snapshot.json" in files for _, _, files in os.walk(checkpoints))
        workers = cluster_processes(cluster, "ray::RayTrainWo")
        if registered and workers:
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            killed = workers
        time.sleep(0.02)
    assert killed, "training ended before a checkpoint could be caught"
    finish(driver)
    stats = StageDir(run, 0, "model").require()["stats"]
    assert stats["resumed_from_checkpoint"] is True and 0 < stats["resumed_from_step"] < 60, stats

    uninterrupted = train_stage.run(load_config(None, [f"run={reference}", *TRAIN]), 0)["stats"]
    np.testing.assert_allclose(np.array(stats["losses"]), np.array(uninterrupted["losses"]), rtol=1e-5)
    net, _ = model_file.load_model_bytes(storage.read_bytes(StageDir(run, 0, "model").file("model.pt")))
    ref, _ = model_file.load_model_bytes(storage.read_bytes(StageDir(reference, 0, "model").file("model.pt")))
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-4, atol=1e-5)


NEIGHBOURS = ["neighbours.k=10", "neighbours.row_block=100", "neighbours.col_block=4096", "neighbours.tile_rows=100"]


def test_driver_sigkilled_mid_stage_reruns_and_commits_the_same_result(cluster, ray_session, tmp_path):
    """SIGKILL the driver once the neighbours stage has written its first part: nothing is committed; the
    rerun skips nothing it should not, computes the stage and commits what an undisturbed run commits."""
    n, d = 3000, 256
    run, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    _commit_random_features(run, n, d)
    _commit_random_features(reference, n, d)
    stage_dir = os.path.join(run, "round=0", "neighbours")
    driver = drive(cluster, ["neighbours", "--run", run, *NEIGHBOURS])
    deadline = time.time() + 180
    while driver.poll() is None and time.time() < deadline:
        if any(f.endswith(".parquet") for _, _, files in os.walk(stage_dir) for f in files):
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    driver.communicate(timeout=30)
    assert driver.returncode == -signal.SIGKILL, "the stage ended before the driver could be killed"
    assert StageDir(run, 0, "neighbours").record() is None  # killed mid-stage: nothing committed

    out = finish(drive(cluster, ["neighbours", "--run", run, *NEIGHBOURS]))
    assert "done in" in out, out
    neighbours_stage.run(load_config(None, NEIGHBOURS + [f"run={reference}"]))
    got, want = _sorted_neighbours(run), _sorted_neighbours(reference)
    assert got.num_rows == n
    for column in (schema.NN_IDS, schema.FAR_IDS, schema.NN_SIMS, schema.FAR_SIMS):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column


def _commit_frames_in_parts(run: str, parts: int = 24, per_part: int = 4) -> None:
    """Frames in several Parquet files, so the features stage reads them as several Ray Data tasks."""
    images, _ = class_images(n_classes=4, per_class=parts * per_part // 4, size=32, seed=2)
    out = StageDir(run, 0, "frames")

    def write(attempt_uri: str) -> dict:
        for p in range(parts):
            ids = np.arange(p * per_part, (p + 1) * per_part)
            table = pa.table({schema.FRAME_ID: pa.array(ids, pa.int64()),
                              schema.VIDEO_ID: pa.array([f"v{p}"] * per_part),
                              schema.FRAME_INDEX: pa.array(np.arange(per_part, dtype=np.int32)),
                              schema.CATEGORY: pa.array(["all"] * per_part),
                              schema.IMAGE: pa.array([png_bytes(images[i]) for i in ids], pa.binary())})
            storage.write_parquet(table, storage.join(attempt_uri, f"part-{p:05d}.parquet"))
        return {"rows": parts * per_part}

    rundir.run_stage(out, {"synthetic": "frames"}, {}, write, force=True)


def _tasks_per_node(cluster: LocalCluster) -> dict:
    return dict(Counter(task.get("node_id") for task in cluster.list_tasks()))


FEATURES = ["features.kind=hog", "features.batch_size=2"]  # one fused Ray Data pass: read, describe, write
DATA_TASKS = ("ray::ReadParque", "ray::MapBatches", "ray::MapBatche")


def test_worker_node_lost_mid_features_stage_ends_with_the_undisturbed_features(cluster, ray_session, tmp_path):
    """SIGKILL the worker node's raylet while Ray Data tasks of the features stage run (on it, when the
    scheduler placed any there by then; on a loaded machine they may all be on the head): the lost tasks
    (and blocks) are recomputed on the head and the committed features equal an undisturbed run's."""
    run, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    _commit_frames_in_parts(run)
    _commit_frames_in_parts(reference)
    worker = next(node for node in cluster.nodes if not node.head)
    cluster.wait_until_idle()  # the worker node's CPU is free, so the stage's tasks can spread onto it
    driver = drive(cluster, ["features", "--run", run, *FEATURES])
    killed, deadline = None, time.time() + 180
    while killed is None and driver.poll() is None and time.time() < deadline:
        on_worker = any(process_name(p).startswith(DATA_TASKS) for p in worker.processes())
        if on_worker or any(process_name(p).startswith(DATA_TASKS) for p in cluster.nodes[0].processes()):
            killed = cluster.kill_raylet(worker)
        time.sleep(0.01)
    assert killed, f"the stage ended before the node could be lost; tasks per node: {_tasks_per_node(cluster)}"
    finish(driver)

    features_stage.run(load_config(None, FEATURES + [f"run={reference}"]))
    ids, got = schema.table_to_features(StageDir(run, 0, "features").read_table())
    ref_ids, want = schema.table_to_features(StageDir(reference, 0, "features").read_table())
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
