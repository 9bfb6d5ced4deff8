"""Connecting to Ray, quietly: a cluster when one is named, an embedded local Ray otherwise.

Credentials never travel in a ``runtime_env``: Ray logs its ``env_vars`` on every node and keeps them in the
job's metadata (``ray job list``, the dashboard). Workers of an embedded Ray inherit the driver's environment.
On a cluster, nodes sign S3 requests with their own identity (on AWS: the instance profile in cluster.yaml);
only the settings of an S3-compatible endpoint the driver names (``AWS_ENDPOINT_URL``: MinIO, a test server),
its keys included, reach the workers, through a worker setup hook that Ray keeps in the GCS and never logs.
Ray's token authentication is left as Ray sets it (on for a local cluster it starts).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import Optional

log = logging.getLogger(__name__)

PACKAGE_LOGGER = "cliquecnn_ray"  # parent of every module's logging.getLogger(__name__)
CONSOLE_HANDLER_MARK = "_cliquecnn_console"

# Set before Ray is imported: no usage reporting.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

# Which S3 endpoint and how to talk to it: given to the workers only when the driver names an endpoint.
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
S3_ENV = ENDPOINT_ENV + (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "CLIQUECNN_S3_CONNECT_TIMEOUT",
    "CLIQUECNN_S3_REQUEST_TIMEOUT",
)


def setup_logging(level: int = logging.INFO) -> None:
    """One concise line per event of this package on the console (for the command-line entry points).

    The handler sits on the package's logger and records still propagate, so an application's own root
    handlers (or pytest's caplog) see them too."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(getattr(h, CONSOLE_HANDLER_MARK, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        setattr(handler, CONSOLE_HANDLER_MARK, True)
        logger.addHandler(handler)
    logger.setLevel(level)


def setup_worker_logging(level: int) -> None:
    """In a Ray worker: this package's records at ``level`` reach the driver's console through the worker's
    stderr. Ray gives its workers a root handler; a second one here would print every line twice."""
    logging.getLogger(PACKAGE_LOGGER).setLevel(level)
    if not logging.getLogger().handlers:
        setup_logging(level)


# Lines Ray's workers and daemons print that are harmless here and would bury the pipeline's own on the
# driver's console (matched anywhere in a line; a traceback is dropped whole when one of its lines matches).
HARMLESS_RAY_LINES = re.compile(
    "|".join([
        # Ray Train logs every report at INFO, under a logger named after its file that no level reaches.
        r"Reporting training result \d+: TrainingReport\(",
        # Ray Train's internal actors are created with object-store arguments and restarts: a design note.
        r"has constructor arguments in the object store and max_restarts > 0",
        # GCS, when Ray Train tears down a worker group whose actors have already exited.
        r"Failed to kill actor NIL_ID",
        # Ray Train's placement-group watchdog queries the state API without an address, which fails when
        # other Ray instances run on the machine; the group is still released when the job ends.
        r"Found multiple active Ray instances",
    ])
)


def _drop_harmless_ray_lines() -> None:
    """Filter the worker log lines Ray forwards to the driver (``log_to_driver``) through
    HARMLESS_RAY_LINES. Ray 2.60's dispatcher of those lines is private; Ray is pinned."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handler, "_drops_harmless_lines", False):
            continue

        def filtered(data: dict, forward=handler) -> None:
            lines = data.get("lines") or []
            if any(HARMLESS_RAY_LINES.search(line) for line in lines):
                if any(line.startswith("Traceback") for line in lines):
                    return  # the whole traceback of a harmless error
                data = {**data, "lines": [line for line in lines if not HARMLESS_RAY_LINES.search(line)]}
                if not data["lines"]:
                    return
            forward(data)

        filtered._drops_harmless_lines = True
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


def tame_ray_data() -> None:
    """Progress bars on a terminal; otherwise no bars and Ray Data's periodic INFO lines silenced. Parquet is
    read by Ray Data's first (V1) Parquet reader."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # The V2 read path (Ray Data's default in the Ray this project pins) opens every read_parquet with a
    # ListFiles task that holds seconds of wall time, nearly all idle, even for one local file: the small
    # stages (impute, features) took seconds longer per read than with the V1 reader, which reads the same files.
    if hasattr(ctx, "use_datasource_v2"):
        ctx.use_datasource_v2 = False
    interactive = sys.stderr.isatty()
    ctx.enable_progress_bars = interactive
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Ray Data warns once that the bars it is told not to draw are off.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def worker_env() -> dict:
    """The (non-secret) ``env_vars`` of the job's runtime_env: Ray's quiet settings, nothing else."""
    # Under `ray job submit --runtime-env-json '{"env_vars": …}'` the job already gives its workers these;
    # naming a key twice makes ray.init refuse to merge the two runtime envs, so leave those to the job.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in QUIET_ENV.items() if k not in job_vars}


def s3_endpoint_settings() -> dict:
    """The driver's S3-compatible endpoint settings (keys included) when it names an endpoint, else {}:
    against AWS itself the workers use their nodes' instance profile, never the driver's static keys."""
    if not any(os.environ.get(k) for k in ENDPOINT_ENV):
        return {}
    return {k: os.environ[k] for k in S3_ENV if k in os.environ}


def endpoint_setup_hook(settings: dict):
    """A worker_process_setup_hook that puts ``settings`` into each worker's environment before any task runs.
    Ray pickles it into the GCS (its runtime_env shows only the function's name), so the keys inside it reach
    the workers without being written to a log or to the job's metadata."""

    def use_s3_endpoint() -> None:
        os.environ.update(settings)

    return use_s3_endpoint


def runtime_env() -> dict:
    """The job-wide runtime_env this package gives Ray: quiet settings, and the endpoint hook when needed."""
    env: dict = {"env_vars": worker_env()}
    settings = s3_endpoint_settings()
    if settings:
        env["worker_process_setup_hook"] = endpoint_setup_hook(settings)
    return env


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) when given, else start an embedded local Ray.

    Idempotent: an already initialised Ray is kept (tests share one per session).
    """
    import ray

    if ray.is_initialized():
        tame_ray_data()
        _drop_harmless_ray_lines()
        return
    # Load libtorch before connecting: job drivers (`ray job submit`) that first imported torch after a
    # Ray Data stage mostly died with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (cause not
    # pinned down; importing it first ended it). Every stage but ingest needs torch anyway.
    import torch  # noqa: F401
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env(), log_to_driver=True)
    else:
        # Joins a Ray already started on this machine (a cluster head under `ray submit`), else embeds one.
        log.info("starting (or joining) a local Ray")
        kwargs = {"num_cpus": num_cpus} if num_cpus else {}
        ray.init(runtime_env=runtime_env(), log_to_driver=True, logging_level=logging.WARNING, **kwargs)
    tame_ray_data()
    _drop_harmless_ray_lines()
