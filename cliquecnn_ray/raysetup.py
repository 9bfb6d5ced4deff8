"""Connecting to Ray, quietly: a cluster when one is named, an embedded local Ray otherwise."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

log = logging.getLogger(__name__)

PACKAGE_LOGGER = "cliquecnn_ray"  # parent of every module's logging.getLogger(__name__)
CONSOLE_HANDLER_MARK = "_cliquecnn_console"

PACKAGE_LOGGER = "cliquecnn_ray"  # parent of every module's logging.getLogger(__name__)
CONSOLE_HANDLER_MARK = "_cliquecnn_console"

# Set before Ray is imported: no usage reporting, no ~/.ray/auth_token written by Ray 2.60.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
for _key, _value in QUIET_ENV.items():
    os.environ.setdefault(_key, _value)

# Passed to every worker so S3 endpoints and credentials set on the driver reach the tasks.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
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


def tame_ray_data() -> None:
    """Progress bars on a terminal; otherwise no bars and Ray Data's periodic INFO lines silenced."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    interactive = sys.stderr.isatty()
    ctx.enable_progress_bars = interactive
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def worker_env() -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(QUIET_ENV)
    # Under `ray job submit --runtime-env-json '{"env_vars": …}'` the job already gives its workers these;
    # naming a key twice makes ray.init refuse to merge the two runtime envs, so leave those to the job.
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in job_vars}


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``) when given, else start an embedded local Ray.

    Idempotent: an already initialised Ray is kept (tests share one per session).
    """
    import ray

    if ray.is_initialized():
        tame_ray_data()
        return
    # Load libtorch before connecting: job drivers (`ray job submit`) that first imported torch after a
    # Ray Data stage mostly died with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (cause not
    # pinned down; importing it first ended it). Every stage but ingest needs torch anyway.
    import torch  # noqa: F401
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # Joins a Ray already started on this machine (a cluster head under `ray submit`), else embeds one.
        log.info("starting (or joining) a local Ray")
        kwargs = {"num_cpus": num_cpus} if num_cpus else {}
        ray.init(runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING, **kwargs)
    tame_ray_data()
