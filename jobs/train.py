"""The main job: the whole CliqueCNN pipeline on an embedded local Ray, or on a cluster.

    python jobs/train.py --config configs/demo.yaml                        # laptop: embedded Ray
    python jobs/train.py --config demo                                     # the same config, shipped in the package
    ray submit cluster.yaml jobs/train.py -- --config configs/fashion_mnist.yaml run=s3://bucket/run
    RAY_ADDRESS=http://head:8265 python jobs/train.py --config ...          # an existing cluster

Connects to Ray at --address or RAY_ADDRESS when given (``auto`` on a cluster head), else starts an
embedded local Ray. Reruns resume: committed stages are skipped.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cliquecnn_ray import raysetup  # noqa: E402
from cliquecnn_ray.cli import common_parser, config_from_args, parse_args  # noqa: E402
from cliquecnn_ray.pipeline import run_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_args(parser)
    raysetup.setup_logging(logging.WARNING if args.quiet else logging.INFO)
    cfg = config_from_args(args)
    # Without an address, ray.init() joins a Ray started on this machine (the head under `ray submit`),
    # else starts an embedded one.
    raysetup.init_ray(address=args.address)
    summary = run_pipeline(cfg, force=args.force, break_lock=args.break_lock)
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2))


if __name__ == "__main__":
    main()
