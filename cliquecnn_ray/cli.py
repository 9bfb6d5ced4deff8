"""The ``cliquecnn`` command: the stages one by one, or the whole pipeline.

    cliquecnn ingest VIDEO_OR_FOLDER_OR_PARQUET... --run runs/mine
    cliquecnn features --run runs/mine [--kind hog_lda|hog|raw]
    cliquecnn neighbours --run runs/mine --round 0 neighbours.k=50
    cliquecnn pipeline --config demo rounds=2
    cliquecnn embed NEW_VIDEO_OR_FOLDER... --run runs/mine --out runs/mine-new
    cliquecnn serve --run runs/mine [--port 8000]

Every subcommand takes ``--run`` (a directory or s3:// URI), ``--config FILE`` (or the bare name of a
config shipped in the package: ``demo``, ``fashion_mnist``) and ``key=value`` overrides (dotted keys of
the config, e.g. ``train.steps=100``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import logging
import os
import re
import sys
from typing import Optional

from . import raysetup
from .config import ConfigError, PipelineConfig, load_config
from .lease import hold

log = logging.getLogger(__name__)

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")

STAGE_HELP = {
    "ingest": "decode videos / image folders / Parquet tables into the canonical frame table",
    "features": "round-0 features of every frame (HOG-LDA by default; also hog, raw)",
    "neighbours": "the k most and least similar frames of every frame, per category",
    "cliques": "compact cliques by complete linkage, merged, K kept; clique similarity S'",
    "batches": "batches of mutually distant cliques by CCCP (Eq. 1-6)",
    "train": "train the CNN on the clique batches with Ray Train",
    "impute": "CNN features of every frame, Pearson-normalised, with Local Temporal Pooling",
    "evaluate": "ROC AUC, kNN accuracy and mAP of a round's features against held-out labels",
    "report": "the run report: one HTML page with its pictures",
}


def packaged_configs() -> list[str]:
    """Names of the configs shipped in the package (``cliquecnn_ray/configs/<name>.yaml``)."""
    folder = importlib.resources.files("cliquecnn_ray") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_path(name: Optional[str]) -> Optional[str]:
    """A ``--config`` value → the file to load: an existing path as given; a bare name (``demo``,
    ``demo.yaml``) that is not a file here → the config of that name shipped in the package, so an
    installed ``cliquecnn`` finds its configs from any directory."""
    if not name or os.path.exists(name) or os.path.dirname(name):
        return name
    file_name = name if name.endswith(".yaml") else f"{name}.yaml"
    packaged = importlib.resources.files("cliquecnn_ray") / "configs" / file_name
    return str(packaged) if packaged.is_file() else name


def common_parser() -> argparse.ArgumentParser:
    """Options every command shares; reusable as a parent parser by other launchers (jobs/train.py)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", help="YAML config (states only what differs from the defaults), or the name of "
                        f"one shipped in the package: {', '.join(packaged_configs())}")
    parser.add_argument("--run", help="run directory or s3://bucket/prefix (overrides the config's run)")
    parser.add_argument("--address", help="Ray cluster address; default: RAY_ADDRESS, else an embedded Ray")
    parser.add_argument("--force", action="store_true",
                        help="recompute even if committed; every stage downstream of a recomputed one reruns")
    parser.add_argument("--break-lock", action="store_true",
                        help="take the run's lease from another driver (only when you know it is gone)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    parser.add_argument("items", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Like parse_args, but overrides and sources may also stand after options (`--run r k=v`)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.items = list(args.items) + extra
    return args


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = [item for item in args.items if _OVERRIDE.match(item)]
    positional = [item for item in args.items if not _OVERRIDE.match(item)]
    if getattr(args, "run", None):
        overrides.append(f"run={args.run}")
    cfg = load_config(config_path(args.config), overrides)
    if positional:
        if getattr(args, "command", None) not in ("ingest", "embed"):
            raise ConfigError(f"unexpected arguments {positional}: overrides take the form key=value")
        cfg = dataclasses.replace(cfg, sources=tuple(positional))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cliquecnn",
        description="CliqueCNN on Ray: unsupervised visual similarity learning from unlabelled video frames.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = common_parser()
    sub.add_parser(
        "pipeline", parents=[parent], help="the whole method: ingest, features, rounds, evaluation, report"
    )
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, parents=[parent], help=text, description=text)
        if name not in ("ingest", "features", "report"):
            p.add_argument("--round", type=int, default=0, help="which round (default 0)")
        if name == "ingest":
            p.usage = "cliquecnn ingest SOURCE... --run RUN [--config FILE] [key=value ...]"
        if name == "features":
            p.add_argument("--kind", help="hog_lda (default), hog or raw")
            p.add_argument("--stage", default="features", help="output stage name (baselines use others)")
        if name == "evaluate":
            p.add_argument("--features-stage", default="features", help="which features of the round")
            p.add_argument("--ltp", type=int, default=0, help="Local Temporal Pooling ±p frames first")
            p.add_argument("--labels", help="labels table (Parquet path or URI); overrides evaluate.labels")
    sub.add_parser("baselines", parents=[parent], help="round-0 and CNN baselines on the same protocol")
    text = "features of new videos / image folders / Parquet tables under a run's trained model"
    p = sub.add_parser("embed", parents=[parent], help=text, description=text,
                       usage="cliquecnn embed SOURCE... --run RUN --out URI [--round R] [key=value ...]")
    p.add_argument("--out", required=True, help="where the frames and features go (a directory or s3:// URI)")
    p.add_argument("--round", type=int, help="the run's features round to match (default: the last)")
    text = "search a run's frames: HTTP API and page on Ray Serve"
    p = sub.add_parser("serve", parents=[parent], help=text, description=text)
    p.add_argument("--round", type=int, help="which round's features (default: the last)")
    p.add_argument("--port", type=int, help="HTTP port (overrides serve.port)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    raysetup.setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command in ("ingest", "embed") and not cfg.sources:
        parser.error(f"{args.command} needs at least one SOURCE (a video file, a folder, or a Parquet path/URI)")
    try:
        with hold(cfg.run, break_lock=args.break_lock):  # one writer per run, for the command's whole life
            return _run_command(args, cfg)
    except USER_ERRORS as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"cliquecnn {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _user_errors() -> tuple:
    from .frame_sources import IngestError
    from .lease import LeaseLost, RunLocked
    from .rundir import StageNotCommitted
    from .schema import SchemaError
    from .storage import StorageError

    # ValueError: a stage's own check of its input (ConfigError is one too); never a traceback.
    return (ValueError, IngestError, SchemaError, StageNotCommitted, StorageError, FileNotFoundError, RunLocked,
            LeaseLost)


USER_ERRORS = _user_errors()


def _run_command(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from . import pipeline

    if args.command == "serve":
        return _serve(args, cfg)
    raysetup.init_ray(address=args.address)
    if args.command == "embed":
        from .stages import embed

        result = embed.run(pipeline.resolve_builtin_data(cfg), run=cfg.run, out=args.out, round_index=args.round,
                           force=args.force)
        print(f"embed: {result['features']['stats']['rows']} frames → {args.out} (round {result['round']} features)")
        return 0
    if args.command == "pipeline":
        summary = pipeline.run_pipeline(cfg, force=args.force)
        print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2))
        return 0
    if args.command == "baselines":
        from . import baselines
        from .metrics import format_metrics_table

        print(format_metrics_table(baselines.run(cfg, force=args.force)))
        return 0
    kwargs = {}
    if args.command == "ingest":
        cfg = pipeline.resolve_builtin_data(cfg)
    if args.command == "features":
        kwargs = {"kind": args.kind, "stage": args.stage}
    if args.command == "evaluate":
        if args.labels:
            cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=args.labels))
        cfg = pipeline.prepare_labels(pipeline.resolve_builtin_data(cfg), args.force)
        kwargs = {"features_stage": args.features_stage, "ltp_p": args.ltp}
    if args.command == "report":  # shows the evaluations made with these (resolved) labels
        cfg = pipeline.prepare_labels(pipeline.resolve_builtin_data(cfg))
    round_ = getattr(args, "round", 0)
    record = pipeline.stage_runner(args.command)(cfg, round_, force=args.force, **kwargs)
    state = "skipped (already committed)" if record.get("skipped") else f"done in {record.get('seconds', 0):.1f} s"
    print(f"{args.command}: {state}; stats: {json.dumps(record.get('stats', {}), default=str)[:2000]}")
    return 0


def _serve(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    import time

    from . import service

    if args.port is not None:
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=args.port))
    url = service.start(cfg, cfg.run, args.round, address=args.address)
    print(f"serving {cfg.run} at {url}  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
