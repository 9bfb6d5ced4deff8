"""What the driver's console shows of Ray: the pipeline's lines, not Ray's known harmless ones."""
import logging

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
    _emit(["Exception in thread PlacementGroupCleanerMonitor:", "Traceback (most recent call last):",
           "  File \"placement_group_cleaner.py\", line 80, in _monitor_loop",
           "ConnectionError: Found multiple active Ray instances: {'a', 'b'}."], pid=4243)
    err = capfd.readouterr().err
    assert "train round 0: 6/60 steps (10%)" in err and err.count("train round 0") == 1  # once: one handler
    assert "max_restarts" not in err and "PlacementGroupCleanerMonitor" not in err and "Traceback" not in err


def test_worker_logging_adds_no_second_handler_where_ray_has_one(monkeypatch):
    root = logging.getLogger()
    package = logging.getLogger(raysetup.PACKAGE_LOGGER)
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # as in a Ray worker
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    raysetup.setup_worker_logging(logging.INFO)
    assert package.handlers == [] and package.level == logging.INFO
