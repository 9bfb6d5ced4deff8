"""Scale-out: the main job on a real multi-node Ray cluster (`ray job submit`), a node lost in the middle of
the neighbours stage, and the S3 server going down in the middle of a stage.

The cluster is real Ray on this one machine (tests/raycluster.py): a head and a worker node, each its own
raylet with one CPU, joined to one GCS, in a private temp dir on free ports. The test process never calls
ray.init for it: jobs go in through the job API over HTTP, state comes back through the state API.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter

import boto3
import numpy as np
import pyarrow as pa
import pytest
import yaml

from cliquecnn_ray import schema, storage
from cliquecnn_ray.config import load_config, merge, parse_override
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.stages import features as features_stage
from cliquecnn_ray.stages import ingest as ingest_stage
from cliquecnn_ray.stages import neighbours as neighbours_stage
from tests.raycluster import LocalCluster, process_name
from tests.synthetic import commit_table
from tests.test_pipeline import TINY, write_sources

# The GCS declares a lost node dead after ~1.5 s instead of Ray's default (a check every 3 s, dead after 5
# misses), so the lost tasks are rerun on the surviving node without a long wait.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
          "CLIQUECNN_S3_CONNECT_TIMEOUT", "CLIQUECNN_S3_REQUEST_TIMEOUT")


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, runs the job drivers) + one worker node (1 CPU); torn down even when a test fails."""
    c = LocalCluster(head_cpus=1, head_env=FAST_HEALTH_CHECKS)
    try:
        c.add_worker(cpus=1)
        yield c
    finally:
        c.stop()


def _job_env() -> dict:
    """The S3 endpoint and credentials, passed the way a user passes them: the job's runtime_env."""
    return {k: os.environ[k] for k in S3_ENV if k in os.environ}


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


# ---------------------------------------------------------------------------------------------
# 1. The main job, submitted to a multi-node cluster


def test_main_job_runs_on_a_multi_node_cluster_and_spreads_its_tasks(cluster, s3_bucket, tmp_path):
    """`ray job submit -- python jobs/train.py --config tiny.yaml run=s3://…` succeeds; the job's tasks ran
    on more than one node (Ray's own task records say where)."""
    frames_uri, _ = write_sources(s3_bucket)
    run = s3_bucket + "/runs/multinode"
    data: dict = {}
    for item in TINY + [f"sources=[{frames_uri}]", "neighbours.row_block=8"]:
        keys, value = parse_override(item)
        merge(data, keys, value)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(data))

    out = cluster.submit([cluster.python, "jobs/train.py", "--config", str(config_file), f"run={run}"],
                         env=_job_env(), timeout=300)
    assert out.returncode == 0, _tail(out.stdout + out.stderr)
    job = cluster.job_info(out.submission_id)
    assert job.status == "SUCCEEDED", job.message

    cfg = load_config(str(config_file), [f"run={run}"])
    for name in ("frames", "features", "neighbours", "cliques", "batches", "model"):
        assert StageDir(run, 0, name).record() is not None, name
    ids, feats = schema.table_to_features(StageDir(run, cfg.rounds, "features").read_table())
    assert len(ids) == 96 and np.isfinite(feats).all()
    summary = storage.read_json(storage.join(run, "summary.json"))
    print("stage seconds on the cluster:", summary["stage_seconds"])

    tasks = cluster.list_tasks(job_id=job.job_id)
    where = Counter(t["node_id"] for t in tasks if t["node_id"])
    nodes = {n.node_id for n in cluster.nodes}
    assert set(where) <= nodes, (where, nodes)
    assert len(where) >= 2, f"every task ran on one node: {where}"
    blocks = Counter(t["node_id"] for t in tasks if t["func_or_class_name"] == "_block_task" and t["node_id"])
    assert sum(blocks.values()) >= 12  # 96 frames in row blocks of 8
    print("tasks per node:", {k[:8]: v for k, v in where.items()}, "row blocks per node:",
          {k[:8]: v for k, v in blocks.items()})


# ---------------------------------------------------------------------------------------------
# 2. A worker node lost in the middle of the similarity stage


def _commit_random_features(run: str, n: int, d: int, seed: int = 0) -> None:
    """Frames (ids and one category, no images: the neighbours stage reads neither) and random unit
    features (n, d) committed as round-0 stages."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    frames = pa.table({
        schema.FRAME_ID: pa.array(ids),
        schema.VIDEO_ID: pa.array([f"v{i // 100:03d}" for i in range(n)]),
        schema.FRAME_INDEX: pa.array((ids % 100).astype(np.int32)),
        schema.CATEGORY: pa.array(["all"] * n),
    })
    commit_table(run, 0, "frames", frames)
    commit_table(run, 0, "features", schema.features_to_table(ids, feats))


def _sorted_neighbours(run: str) -> pa.Table:
    return StageDir(run, 0, "neighbours").read_table().sort_by(schema.FRAME_ID)


NODE_LOSS = ["neighbours.k=10", "neighbours.row_block=500", "neighbours.col_block=8192", "neighbours.tile_rows=500"]


def test_worker_node_lost_mid_neighbours_stage_is_retried_to_the_same_result(cluster, ray_session, tmp_path):
    """SIGKILL the worker node's raylet while it runs a row-block task: Ray reruns the lost tasks
    (max_retries) on the head, the stage commits, and its table equals an undisturbed run's."""
    n, d = 6000, 2048  # 12 row blocks, each long enough that one is still running on the worker when it dies
    run, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    _commit_random_features(run, n, d)
    _commit_random_features(reference, n, d)
    worker = next(node for node in cluster.nodes if not node.head)

    submission = cluster.submit([cluster.python, "-m", "cliquecnn_ray.cli", "neighbours", "--run", run, *NODE_LOSS],
                                no_wait=True)
    deadline = time.time() + 120
    killed = None
    while time.time() < deadline and killed is None:
        if any(process_name(p).startswith("ray::_block_ta") for p in worker.processes()):
            killed = cluster.kill_raylet(worker)
        elif cluster.job_info(submission).status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.02)
    assert killed, "no row-block task ever ran on the worker node"
    status = cluster.wait_job(submission, timeout=180)
    assert status == "SUCCEEDED", _tail(cluster.job_logs(submission))

    # Ray's task records: some row block ran more than once, and the rerun was on the surviving head.
    head = next(node.node_id for node in cluster.nodes if node.head)
    job_id = cluster.job_info(submission).job_id
    retried = []
    for _ in range(20):  # task events reach the GCS about once a second
        blocks = cluster.list_tasks(job_id=job_id, name="_block_task")
        retried = [t for t in blocks if t["attempt_number"] >= 1 and t["state"] == "FINISHED"]
        if retried:
            break
        time.sleep(0.5)
    assert retried, Counter((t["attempt_number"], t["state"], (t["node_id"] or "")[:8]) for t in blocks)
    assert all(t["node_id"] == head for t in retried)
    print(f"row-block attempts (attempt, state, node): "
          f"{dict(Counter((t['attempt_number'], t['state'], (t['node_id'] or '?')[:8]) for t in blocks))}")

    ref_cfg = load_config(None, NODE_LOSS + [f"run={reference}"])
    neighbours_stage.run(ref_cfg)  # the undisturbed run, on the test session's embedded Ray
    got, want = _sorted_neighbours(run), _sorted_neighbours(reference)
    assert got.num_rows == n
    for column in (schema.NN_IDS, schema.FAR_IDS, schema.NN_SIMS, schema.FAR_SIMS):
        assert got.column(column).to_pylist() == want.column(column).to_pylist(), column


# ---------------------------------------------------------------------------------------------
# 3. The S3 server down in the middle of a stage


def _stop_when_first_part_appears(server, bucket: str, prefix: str, done: threading.Event) -> threading.Thread:
    """Stop the S3 server as soon as the stage has written its first part file under ``prefix``."""
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
            if any(o["Key"].endswith(".parquet") and "/attempt-" in o["Key"] for o in listing.get("Contents", [])):
                server.stop()
                done.set()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_s3_down_mid_stage_fails_naming_the_uri_and_a_rerun_completes(ray_session, s3_server, s3_bucket):
    frames_uri, _ = write_sources(s3_bucket)
    run = s3_bucket + "/runs/outage"
    # One row per task: 96 part files written one by one, so the outage lands while the stage writes.
    cfg = load_config(None, TINY + [f"run={run}", f"sources=[{frames_uri}]", "neighbours.row_block=1"])
    ingest_stage.run(cfg)
    features_stage.run(cfg)
    before = {name: StageDir(run, 0, name).record()["fingerprint"] for name in ("frames", "features")}

    bucket = s3_bucket[len("s3://"):]
    stopped = threading.Event()
    watcher = _stop_when_first_part_appears(s3_server, bucket, "runs/outage/round=0/neighbours/", stopped)
    try:
        started = time.time()
        with pytest.raises(storage.StorageError) as failure:
            neighbours_stage.run(cfg)
        assert stopped.is_set()
        assert time.time() - started < 60  # fails fast (connect timeout × retries), no hang
        message = str(failure.value)
        print("the stage failed with:", message)
        assert f"{s3_bucket}/runs/outage/round=0/neighbours/" in message, message
    finally:
        watcher.join(timeout=5)
        if not s3_server.running:
            s3_server.start()

    # Earlier stages are intact; the failed stage committed nothing.
    assert {name: StageDir(run, 0, name).record()["fingerprint"] for name in before} == before
    assert StageDir(run, 0, "neighbours").record() is None

    # The rerun skips what was committed and completes the stage, leaving only the committed attempt.
    assert ingest_stage.run(cfg)["skipped"] and features_stage.run(cfg)["skipped"]
    record = neighbours_stage.run(cfg)
    assert not record["skipped"] and record["stats"]["rows"] == 96
    table = StageDir(run, 0, "neighbours").read_table()
    assert table.num_rows == 96 and sorted(table.column(schema.FRAME_ID).to_pylist()) == list(range(96))
    leftovers = [f for f in storage.list_files(StageDir(run, 0, "neighbours").uri)
                 if "/attempt-" in f and record["attempt"] not in f]
    assert leftovers == [], leftovers
