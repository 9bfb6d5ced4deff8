"""What the package hands Ray and what the driver's console shows of it: no credential in a runtime_env, Ray's
token authentication left on, the pipeline's lines without Ray's known harmless ones. (The end-to-end check, a
sentinel key searched for in every log of a cluster, is in test_cluster_run.py.)"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import cloudpickle

from cliquecnn_ray import raysetup


def _emit(lines, pid=4242):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.emit({"ip": "127.0.0.1", "pid": pid, "job": "", "is_err": True,
                                             "lines": lines, "actor_name": "RayTrainWorker", "task_name": ""})


def test_harmless_ray_lines_are_dropped_and_the_rest_printed(ray_session, capfd):
    raysetup.init_ray()  # installs the filter on the log lines Ray forwards to the driver (idempotent)
    raysetup.init_ray()
    capfd.readouterr()
    _emit(["[E core_worker.cc] Actor with class name: 'PreemptionWatcher' and ID: 'f0' has constructor arguments "
           "in the object store and max_restarts > 0. If the arguments ...", "train round 0: 6/60 steps (10%)"])
    _emit(["Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/r/step-1))"])
    _emit(["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
           "  File \"placement_group_cleaner.py\", line 80, in _monitor_loop",
           "ConnectionError: Found multiple active Ray instances: {'a', 'b'}."], pid=4243)
    err = capfd.readouterr().err
    assert "train round 0: 6/60 steps (10%)" in err and err.count("train round 0") == 1  # once: one handler
    assert "max_restarts" not in err and "Reporting training result" not in err
    assert "PlacementGroupCleanerMonitor" not in err and "Traceback" not in err


def test_worker_logging_adds_no_second_handler_where_ray_has_one(monkeypatch):
    root = logging.getLogger()
    package = logging.getLogger(raysetup.PACKAGE_LOGGER)
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # as in a Ray worker
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    raysetup.setup_worker_logging(logging.INFO)
    assert package.handlers == [] and package.level == logging.INFO


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
