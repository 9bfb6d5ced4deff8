"""Shared fixtures: one embedded Ray per test session, one real S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import os
import uuid

import pytest

from cliquecnn_ray import raysetup
from tests.raycluster import free_port


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray shared by every test that asks for it (its start-up costs seconds)."""
    import ray

    raysetup.setup_logging()
    raysetup.init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


class S3Server:
    """moto's threaded server: a real HTTP S3 endpoint on 127.0.0.1 (stop/start to simulate outages)."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self.running = False

    def start(self):
        from moto.server import ThreadedMotoServer

        # A stopped ThreadedMotoServer cannot start again; a new one on the same port can.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.running = True

    def stop(self):
        self._server.stop()
        self.running = False

    def new_bucket(self) -> str:
        import boto3

        name = f"test-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return name


# The endpoint is fixed before any Ray worker starts, so workers inherit it like the driver does.
S3_PORT = free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "CLIQUECNN_S3_CONNECT_TIMEOUT": "2",
        "CLIQUECNN_S3_REQUEST_TIMEOUT": "10",
    }
)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint at AWS_ENDPOINT_URL for boto3, s3fs, pyarrow (our storage module) and Ray."""
    server = S3Server(S3_PORT)
    server.start()
    yield server
    if server.running:
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket; returns its s3:// URI."""
    if not s3_server.running:
        s3_server.start()
    return f"s3://{s3_server.new_bucket()}"


@pytest.fixture(scope="session")
def searchable_run(ray_session, tmp_path_factory):
    """(run, cfg, source): a tiny run made by the real stages up to round 1's features and neighbours
    (``synthetic.servable_run``), shared by the embed and search-service tests."""
    from synthetic import servable_run, video_source

    root = tmp_path_factory.mktemp("searchable")
    source = video_source(str(root / "clips.parquet"))
    run = str(root / "run")
    return run, servable_run(run, source), source
