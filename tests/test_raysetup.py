"""What the package hands Ray: no credential in a runtime_env, Ray's token authentication left on.
(The end-to-end check, a sentinel key searched for in every log of a cluster, is in test_cluster_run.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cloudpickle

from cliquecnn_ray import raysetup


def test_importing_the_package_leaves_rays_token_authentication_alone():
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    code = "import os, cliquecnn_ray.raysetup; print(os.environ.get('RAY_AUTH_MODE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"  # Ray 2.60 then turns token auth on for a local Ray it starts
    assert "RAY_AUTH_MODE" not in raysetup.runtime_env()["env_vars"]


def test_keys_never_travel_in_env_vars_an_endpoints_settings_go_in_the_setup_hook(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = raysetup.runtime_env()
    assert "s3cr3t" not in json.dumps(env["env_vars"]) and "AKIDEXAMPLE" not in json.dumps(env["env_vars"])
    # The hook Ray pickles into the GCS carries the endpoint's settings and applies them in a worker.
    hook = cloudpickle.loads(cloudpickle.dumps(env["worker_process_setup_hook"]))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    hook()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_against_aws_itself_the_drivers_static_keys_stay_on_the_driver(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    env = raysetup.runtime_env()
    assert "worker_process_setup_hook" not in env  # the nodes' instance profile signs their requests
    assert "s3cr3t" not in json.dumps(env)
