"""Diffusion re-ranking (issue 13 §3) on the Fashion-MNIST benchmark's protocol: mAP with minus without.

The database is the 10,000 test images, leave-one-out, as benchmarks/fashion_mnist.py measures them
(Pearson similarities, ``metrics.class_partial`` as the evaluate stage runs it); the queries are 2,000 of
them drawn by seed (the same queries with and without). With diffusion (``evaluate.rerank = diffusion``'s
``DiffusionRescorer``) each query's initial results come from all 70,000 frames, labelled or not, and are
diffused on the round's k-NN graph. α and the graph's k are chosen on validation labels only: the benchmarks'
validation split (``datasets.fashion_mnist_validation_ids``: 5,000 of the 60,000 training images, fixed by
seed) as database, 1,000 of them as queries; the test labels are read once, for the reported figures. On
Moving Fashion-MNIST (``--config moving_fashion_mnist``) the same runs on its test and validation clips,
cross-video as its benchmark evaluates. Average query expansion, the simple alternative, is tuned and measured the
same way.

    .venv/bin/python benchmarks/diffusion.py [RUN] [--round R]   # default runs/fashion_mnist, its last round
    .venv/bin/python benchmarks/diffusion.py --config moving_fashion_mnist   # cross-video, its own JSON

Runs the neighbours stage for the last round first when that round has none (an ordinary stage; the
pipeline computes neighbours only for rounds it trains on). Writes benchmarks/results/diffusion.json
(Moving Fashion-MNIST: diffusion_moving_fashion_mnist.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import evidence  # noqa: E402
from cliquecnn_ray import diffusion, metrics, raysetup, schema, similarity, storage  # noqa: E402
from cliquecnn_ray.config import PipelineConfig, load_config  # noqa: E402
from cliquecnn_ray.metrics import format_metrics_table  # noqa: E402
from cliquecnn_ray.pipeline import resolve_builtin_data  # noqa: E402
from cliquecnn_ray.query_expansion import QueryExpansionRescorer  # noqa: E402
from cliquecnn_ray.rundir import StageDir  # noqa: E402
from cliquecnn_ray.stages import neighbours  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "diffusion.json"
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
ALPHAS = (0.9, 0.99)  # the paper's range; a query's solve costs the same at either
GRAPH_KS = (10, 20, 30)  # up to the run's neighbours.k
QE_SIZES = (1, 2, 5, 10, 20, 50)  # average query expansion's n: the simple alternative, tuned the same way
VALIDATION_QUERIES = 1000  # of the 5,000 (against all 5,000): the candidates' solves fit a shared machine
TEST_QUERIES = 2000  # of the 10,000 test images (against all 10,000), with and without on the same queries
KEYS = ("auc", "knn", "map")
# how each built-in data set's validation labels are drawn (training images only)
VALIDATION_SPLITS = {"fashion_mnist": "datasets.fashion_mnist_validation_ids",
                     "moving_fashion_mnist": "datasets.moving_fashion_mnist_validation_clips"}


def validation_split(source: str, cfg) -> str:
    """How the validation labels of ``cfg`` (its built-in data resolved; ``source`` its first declared source)
    were drawn: the built-in data set's split and seed, else the labels table they come from."""
    if source in VALIDATION_SPLITS:
        return f"{VALIDATION_SPLITS[source]} (seed {cfg.seed})"
    return evidence.validation_config(cfg).evaluate.labels


def last_round(run: str) -> int:
    """The highest round with committed features (the run's final features)."""
    r = 0
    while StageDir(run, r + 1, "features").record() is not None:
        r += 1
    return r


def _pick(stats: dict) -> dict:
    return {k: round(float(stats[k]), 4) for k in KEYS}


def labelled_rows(ids: np.ndarray, labels_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """A labels table → (feature rows (M,), class codes (M,)) in a seeded random order, so that the first
    ``queries`` of them are a random sample (of classes and, with videos, of clips)."""
    labels = storage.read_parquet(labels_uri)
    frame_ids = labels.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    order = np.argsort(frame_ids)
    codes, _ = metrics.encode_labels(np.asarray(labels.column(schema.LABEL).to_pylist())[order])
    shuffle = np.random.default_rng(0).permutation(len(order))
    return np.searchsorted(ids, frame_ids[order])[shuffle], codes[shuffle]


def video_codes(run: str, ids: np.ndarray) -> np.ndarray:
    """The clip of each feature row (codes (N,)), for cross-video evaluation."""
    from cliquecnn_ray.stage_outputs import read_frames

    frames = read_frames(run, columns=[schema.FRAME_ID, schema.VIDEO_ID])
    frame_ids = frames.column(schema.FRAME_ID).to_numpy()
    codes, _ = metrics.encode_labels(np.asarray(frames.column(schema.VIDEO_ID).to_pylist()))
    return codes[np.searchsorted(frame_ids, ids)]


def protocol_metrics(cfg: PipelineConfig, feats: np.ndarray, rows: np.ndarray, codes: np.ndarray, rescore=None,
                     queries: int | None = None, videos: np.ndarray | None = None) -> dict:
    """The evaluate stage's protocol in this process (one category: Fashion-MNIST's): the first ``queries`` of
    the labelled frames (the frames are in random class order) against all of them, leave-one-out, by the
    same ``metrics.class_partial``, optionally re-scored; cross-video when ``videos`` (N,) is given."""
    part = metrics.class_partial(feats[rows], codes, k=cfg.evaluate.knn_k, stop=queries, rescore=rescore,
                                 row_block=metrics.row_block_for(len(rows), cfg.evaluate.memory_mb),
                                 videos=None if videos is None else videos[rows])
    return _pick(metrics.summarise(part))


def compare(cfg: PipelineConfig, feats: np.ndarray, rows: np.ndarray, codes: np.ndarray, graphs: dict, settings,
            qe_sizes, queries: int, videos: np.ndarray | None = None) -> dict:
    """Without, diffusion at each (k, α) of ``settings`` and query expansion at each n of ``qe_sizes``, on the
    first ``queries`` labelled frames; every setting re-ranks the same initial results (computed once)."""
    truncate = cfg.evaluate.diffusion.truncate
    initial = diffusion.initial_results(feats[rows[:queries]], feats, max(truncate, *qe_sizes),
                                        exclude=rows[:queries])
    everything = np.arange(len(feats))  # one category: every frame is a candidate, labelled or not
    out = {"without": protocol_metrics(cfg, feats, rows, codes, queries=queries, videos=videos), "diffusion": [],
           "query_expansion": []}
    for k, alpha in settings:
        rescorer = diffusion.DiffusionRescorer(graphs[k], everything, feats, rows, alpha, truncate, initial=initial)
        out["diffusion"].append({"k": k, "alpha": alpha, **protocol_metrics(cfg, feats, rows, codes, rescorer,
                                                                           queries=queries, videos=videos)})
        print(f"diffusion k {k}, α {alpha}: {out['diffusion'][-1]}", flush=True)
    for n in qe_sizes:
        rescorer = QueryExpansionRescorer(feats, rows, n, initial=initial)
        out["query_expansion"].append({"n": n, **protocol_metrics(cfg, feats, rows, codes, rescorer, queries=queries,
                                                                  videos=videos)})
        print(f"query expansion n {n}: {out['query_expansion'][-1]}", flush=True)
    return out


def measure_diffusion_gain(run_uri: str, config: str | Path = CONFIG, alphas=ALPHAS, graph_ks=GRAPH_KS,
                           validation_queries: int = VALIDATION_QUERIES, test_queries: int = TEST_QUERIES,
                           round_index: int | None = None) -> dict:
    """mAP on the test queries with diffusion (α, k chosen on validation labels) minus without, and the same
    for average query expansion (n chosen the same way), on ``round_index``'s features (default: the last
    round's). Returns the results dict."""
    started = time.time()
    declared = load_config(config, [f"run={run_uri}"])
    cfg = resolve_builtin_data(declared)
    round_index = last_round(cfg.run) if round_index is None else round_index
    neighbours.run(cfg, round_index)  # the ordinary stage; committed already → skipped
    graph_ks = tuple(k for k in graph_ks if k <= cfg.neighbours.k)
    graphs = {k: diffusion.load_knn_graph(cfg.run, round_index, k, cfg.evaluate.diffusion.gamma) for k in graph_ks}
    features = StageDir(cfg.run, round_index, "features")
    ids, feats = schema.table_to_features(features.read_table(), source=str(features))
    if cfg.evaluate.pearson:
        feats = similarity.pearson_normalise(feats)
    videos = video_codes(cfg.run, ids) if cfg.evaluate.exclude_same_video else None

    # Validation: training images' labels only; every candidate setting.
    val_rows, val_codes = labelled_rows(ids, evidence.validation_config(cfg).evaluate.labels)
    val = compare(cfg, feats, val_rows, val_codes, graphs, [(k, a) for k in graph_ks for a in alphas], QE_SIZES,
                  validation_queries, videos)
    best = max(val["diffusion"], key=lambda c: c["map"])
    best_qe = max(val["query_expansion"], key=lambda c: c["map"])

    # The test labels, once: without, the chosen diffusion and the chosen query expansion.
    test_rows, test_codes = labelled_rows(ids, cfg.evaluate.labels)
    test = compare(cfg, feats, test_rows, test_codes, graphs, [(best["k"], best["alpha"])], [best_qe["n"]],
                   test_queries, videos)
    without, with_diffusion, with_qe = test["without"], test["diffusion"][0], test["query_expansion"][0]
    return {
        "diffusion_map_gain": round(with_diffusion["map"] - without["map"], 4),
        "without": without,
        "with_diffusion": with_diffusion,
        # The strongest simple alternative, tuned and measured the same way.
        "query_expansion": with_qe,
        "query_expansion_map_gain": round(with_qe["map"] - without["map"], 4),
        "diffusion_minus_query_expansion_map": round(with_diffusion["map"] - with_qe["map"], 4),
        "selected": {"k": best["k"], "alpha": best["alpha"], "query_expansion_n": best_qe["n"]},
        "selected_on": "validation",
        "validation": {"frames": len(val_rows), "queries": validation_queries,
                       "split": validation_split(declared.sources[0], cfg),
                       **val},
        "test_queries": test_queries,
        "test_database": len(test_rows),
        "cross_video": videos is not None,
        "config": Path(config).stem,
        "gamma": cfg.evaluate.diffusion.gamma,
        "truncate": cfg.evaluate.diffusion.truncate,
        "round": round_index,
        "d": int(feats.shape[1]),
        "run": cfg.run,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a finished run (default: the config's, runs/NAME)")
    parser.add_argument("--config", default="fashion_mnist", choices=("fashion_mnist", "moving_fashion_mnist"),
                        help="the benchmark whose run and protocol (moving_fashion_mnist: cross-video) to use")
    parser.add_argument("--round", type=int, dest="round_index", help="whose features (default: the last round)")
    parser.add_argument("--validation-queries", type=int, default=VALIDATION_QUERIES)
    parser.add_argument("--test-queries", type=int, default=TEST_QUERIES)
    args = parser.parse_args()
    raysetup.setup_logging()
    config = ROOT / "configs" / f"{args.config}.yaml"
    run = args.run or f"runs/{args.config}"  # relative to the repository, as the benchmarks record their runs
    result = measure_diffusion_gain(run, config, round_index=args.round_index,
                                    validation_queries=args.validation_queries, test_queries=args.test_queries)
    val = result["validation"]
    rows = {"validation: without": val["without"]}
    rows.update({f"validation: diffusion k {c['k']}, α {c['alpha']}": c for c in val["diffusion"]})
    rows.update({f"validation: query expansion n {c['n']}": c for c in val["query_expansion"]})
    rows["test: without"] = result["without"]
    rows[f"test: query expansion n {result['query_expansion']['n']}"] = result["query_expansion"]
    rows[f"test: diffusion k {result['selected']['k']}, α {result['selected']['alpha']}"] = result["with_diffusion"]
    print(f"\n{args.config}, round {result['round']} features: re-ranking, settings chosen on validation "
          f"({val['queries']} of {val['frames']} training frames); test: {result['test_queries']} queries against "
          f"{result['test_database']} test frames" + (", cross-video" if result["cross_video"] else ""))
    print(format_metrics_table(rows))
    ratio = result["with_diffusion"]["map"] / result["without"]["map"]
    print(f"\ndiffusion_map_gain {result['diffusion_map_gain']:+.4f} (mAP ×{ratio:.3f} of without); query expansion "
          f"{result['query_expansion_map_gain']:+.4f}; diffusion minus query expansion "
          f"{result['diffusion_minus_query_expansion_map']:+.4f}")
    out = RESULTS if args.config == "fashion_mnist" else RESULTS.with_name(f"diffusion_{args.config}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
