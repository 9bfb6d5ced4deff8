"""Diffusion re-ranking (issue 13 §3) on the Fashion-MNIST benchmark's protocol: mAP with minus without.

The database is the 10,000 test images, leave-one-out, as benchmarks/fashion_mnist.py measures them
(Pearson similarities, ``metrics.class_partial`` as the evaluate stage runs it); the queries are the first
2,000 of them (the same queries with and without). With diffusion (``evaluate.rerank = diffusion``'s
``DiffusionRescorer``) each query's initial results come from all 70,000 frames, labelled or not, and are
diffused on the round's k-NN graph. α and the graph's k are chosen on validation labels only: 5,000 of the
60,000 training images, fixed by seed, as database (1,000 of them as queries); the test labels are read
once, for the reported figures. Average query expansion, the simple alternative, is tuned and measured the
same way.

    .venv/bin/python benchmarks/diffusion.py [RUN] [--round R]   # default runs/fashion_mnist, its last round

Runs the neighbours stage for the last round first when that round has none (an ordinary stage; the
pipeline computes neighbours only for rounds it trains on). Writes benchmarks/results/diffusion.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cliquecnn_ray import datasets, diffusion, metrics, raysetup, schema, similarity, storage  # noqa: E402
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
VALIDATION_SIZE = 5000
VALIDATION_QUERIES = 1000  # of the 5,000 (against all 5,000): the candidates' solves fit a shared machine
TEST_QUERIES = 2000  # of the 10,000 test images (against all 10,000), with and without on the same queries
KEYS = ("auc", "knn", "map")


def validation_frame_ids(n_train: int = 60000, size: int = VALIDATION_SIZE) -> np.ndarray:
    """The validation split: ``size`` of the Fashion-MNIST training images fixed by seed 0, as frame ids (the
    training images are frames 0..59,999 in the benchmark's source). Sorted."""
    return np.sort(np.random.default_rng(0).permutation(n_train)[:size])


def last_round(run: str) -> int:
    """The highest round with committed features (the run's final features)."""
    r = 0
    while StageDir(run, r + 1, "features").record() is not None:
        r += 1
    return r


def _pick(stats: dict) -> dict:
    return {k: round(float(stats[k]), 4) for k in KEYS}


def write_validation_labels(run: str) -> str:
    """The validation split's labels (training labels, never the test split's) as a labels table in the run."""
    uri = storage.join(run, "labels", "fashion_mnist_validation.parquet")
    if not storage.exists(uri):
        _, train_labels = datasets.load_fashion_mnist("train")
        ids = validation_frame_ids(len(train_labels))
        names = [datasets.FASHION_CLASSES[c] for c in train_labels[ids]]
        storage.write_parquet(pa.table({schema.FRAME_ID: pa.array(ids), schema.LABEL: pa.array(names)},
                                       schema=schema.CLASS_LABELS), uri)
    return uri


def labelled_rows(ids: np.ndarray, labels_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """A labels table → (feature rows (M,) in frame_id order, class codes (M,))."""
    labels = storage.read_parquet(labels_uri)
    frame_ids = labels.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    order = np.argsort(frame_ids)
    codes, _ = metrics.encode_labels(np.asarray(labels.column(schema.LABEL).to_pylist())[order])
    return np.searchsorted(ids, frame_ids[order]), codes


def protocol_metrics(cfg: PipelineConfig, feats: np.ndarray, rows: np.ndarray, codes: np.ndarray, rescore=None,
                     queries: int | None = None) -> dict:
    """The evaluate stage's protocol in this process (one category: Fashion-MNIST's): the first ``queries`` of
    the labelled frames (the frames are in random class order) against all of them, leave-one-out, by the
    same ``metrics.class_partial``, optionally re-scored."""
    part = metrics.class_partial(feats[rows], codes, k=cfg.evaluate.knn_k, stop=queries, rescore=rescore,
                                 row_block=metrics.row_block_for(len(rows), cfg.evaluate.memory_mb))
    return _pick(metrics.summarise(part))


def compare(cfg: PipelineConfig, feats: np.ndarray, rows: np.ndarray, codes: np.ndarray, graphs: dict, settings,
            qe_sizes, queries: int) -> dict:
    """Without, diffusion at each (k, α) of ``settings`` and query expansion at each n of ``qe_sizes``, on the
    first ``queries`` labelled frames; every setting re-ranks the same initial results (computed once)."""
    truncate = cfg.evaluate.diffusion.truncate
    initial = diffusion.initial_results(feats[rows[:queries]], feats, max(truncate, *qe_sizes),
                                        exclude=rows[:queries])
    everything = np.arange(len(feats))  # one category: every frame is a candidate, labelled or not
    out = {"without": protocol_metrics(cfg, feats, rows, codes, queries=queries), "diffusion": [],
           "query_expansion": []}
    for k, alpha in settings:
        rescorer = diffusion.DiffusionRescorer(graphs[k], everything, feats, rows, alpha, truncate, initial=initial)
        out["diffusion"].append({"k": k, "alpha": alpha, **protocol_metrics(cfg, feats, rows, codes, rescorer,
                                                                           queries=queries)})
        print(f"diffusion k {k}, α {alpha}: {out['diffusion'][-1]}", flush=True)
    for n in qe_sizes:
        rescorer = QueryExpansionRescorer(feats, rows, n, initial=initial)
        out["query_expansion"].append({"n": n, **protocol_metrics(cfg, feats, rows, codes, rescorer, queries=queries)})
        print(f"query expansion n {n}: {out['query_expansion'][-1]}", flush=True)
    return out


def measure_diffusion_gain(run_uri: str, config: str | Path = CONFIG, alphas=ALPHAS, graph_ks=GRAPH_KS,
                           validation_queries: int = VALIDATION_QUERIES, test_queries: int = TEST_QUERIES,
                           round_index: int | None = None) -> dict:
    """mAP on the test queries with diffusion (α, k chosen on validation labels) minus without, and the same
    for average query expansion (n chosen the same way), on ``round_index``'s features (default: the last
    round's). Returns the results dict."""
    started = time.time()
    cfg = resolve_builtin_data(load_config(config, [f"run={run_uri}"]))
    round_index = last_round(cfg.run) if round_index is None else round_index
    neighbours.run(cfg, round_index)  # the ordinary stage; committed already → skipped
    graph_ks = tuple(k for k in graph_ks if k <= cfg.neighbours.k)
    graphs = {k: diffusion.load_knn_graph(cfg.run, round_index, k, cfg.evaluate.diffusion.gamma) for k in graph_ks}
    features = StageDir(cfg.run, round_index, "features")
    ids, feats = schema.table_to_features(features.read_table(), source=str(features))
    if cfg.evaluate.pearson:
        feats = similarity.pearson_normalise(feats)

    # Validation: training images' labels only; every candidate setting.
    val_rows, val_codes = labelled_rows(ids, write_validation_labels(cfg.run))
    val = compare(cfg, feats, val_rows, val_codes, graphs, [(k, a) for k in graph_ks for a in alphas], QE_SIZES,
                  validation_queries)
    best = max(val["diffusion"], key=lambda c: c["map"])
    best_qe = max(val["query_expansion"], key=lambda c: c["map"])

    # The test labels, once: without, the chosen diffusion and the chosen query expansion.
    test_rows, test_codes = labelled_rows(ids, cfg.evaluate.labels)
    test = compare(cfg, feats, test_rows, test_codes, graphs, [(best["k"], best["alpha"])], [best_qe["n"]],
                   test_queries)
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
        "validation": {"frames": VALIDATION_SIZE, "queries": validation_queries, "seed": 0, **val},
        "test_queries": test_queries,
        "test_database": len(test_rows),
        "gamma": cfg.evaluate.diffusion.gamma,
        "truncate": cfg.evaluate.diffusion.truncate,
        "round": round_index,
        "d": int(feats.shape[1]),
        "run": cfg.run,
        "seconds": round(time.time() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default=str(ROOT / "runs" / "fashion_mnist"), help="a finished run")
    parser.add_argument("--round", type=int, dest="round_index", help="whose features (default: the last round)")
    args = parser.parse_args()
    raysetup.setup_logging()
    result = measure_diffusion_gain(args.run, round_index=args.round_index)
    val = result["validation"]
    rows = {"validation: without": val["without"]}
    rows.update({f"validation: diffusion k {c['k']}, α {c['alpha']}": c for c in val["diffusion"]})
    rows.update({f"validation: query expansion n {c['n']}": c for c in val["query_expansion"]})
    rows["test: without"] = result["without"]
    rows[f"test: query expansion n {result['query_expansion']['n']}"] = result["query_expansion"]
    rows[f"test: diffusion k {result['selected']['k']}, α {result['selected']['alpha']}"] = result["with_diffusion"]
    print(f"\nFashion-MNIST, round {result['round']} features: re-ranking, settings chosen on validation "
          f"({val['queries']} of {val['frames']} training images); test: {result['test_queries']} queries against "
          f"{result['test_database']} test images")
    print(format_metrics_table(rows))
    ratio = result["with_diffusion"]["map"] / result["without"]["map"]
    print(f"\ndiffusion_map_gain {result['diffusion_map_gain']:+.4f} (mAP ×{ratio:.3f} of without); query expansion "
          f"{result['query_expansion_map_gain']:+.4f}; diffusion minus query expansion "
          f"{result['diffusion_minus_query_expansion_map']:+.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
