"""Benchmark of CCCP batch selection (paper Sect. 2.3, docs/method.md#cccp): the fast solver against the exact one.

Synthetic cliques with class structure (``batches.synthetic_cliques``: class centres random, so similarities
between classes are centred at 0; cliques of ~20 frames of one class, overlapping within a class). All
timings use one torch thread, as one Ray task does. Keys of benchmarks/results/cccp.json:

  paper_fast_s            whole CCCP, fast solver, B = 100, K = 100, r = 20, N = 2,000 (one start)
  exact_scale, exact_s    the largest scale tried where the exact CCCP (cvxpy, interior point) succeeds
  fast_s_same_scale       the fast CCCP there, same start, same tolerance and λ3 continuation
  speedup                 exact_s / fast_s_same_scale
  objective_gap           (f_fast − f_exact)/|f_exact| at the relaxed CCCP results (negative: fast better)
  objective_gap_rounded   the same at the rounded batches
  large_s, large_peak_mem_gb   fast CCCP at K = 2,000, B = 1,000, N = 100,000 (peak RSS of a child process)
  within_batch_sim_ratio_vs_random, high_pair_share_ratio_vs_random, coverage_ratio_vs_random,
  total_coverage, binary_fraction   batch statistics of the paper-scale instance (4 restarts, best kept)

Usage: .venv/bin/python benchmarks/cccp.py [--quick]   (--quick: smaller large case, no paper-scale exact)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cliquecnn_ray import cccp  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "cccp.json")


def instance(K: int, B: int, r: int, N: int, n_classes: int, seed: int = 0) -> cccp.Problem:
    S, frames, _ = cccp.synthetic_cliques(K, N, clique_size=20, n_classes=n_classes, seed=seed)
    return cccp.make_problem(S, frames, B, r)


def timed_cccp(prob: cccp.Problem, solver: str, seed: int = 1) -> dict:
    with cccp.torch_threads(1):
        started = time.time()
        X, info = cccp.cccp(prob, cccp.random_start(prob, seed), solver)
        seconds = time.time() - started
    return {"seconds": seconds, "X": X, "objective": info["objective"], "iters": info["iters"],
            "rounded": cccp.objective(cccp.round_top_r(X, prob.r), prob),
            "fallbacks": info["fallbacks"]}


def _large_child(K, B, N, n_classes, queue):
    prob = instance(K, B, 20, N, n_classes)
    res = timed_cccp(prob, "fast")
    st = cccp.batch_stats(cccp.top_r(res["X"], prob.r), prob, res["X"])
    queue.put({"seconds": res["seconds"], "iters": res["iters"], "M": prob.M, "binary_fraction": st["binary_fraction"],
               "within_batch_sim_ratio": st["within_batch_sim_ratio"], "total_coverage": st["total_coverage"]})


def large_case(K: int, B: int, N: int, n_classes: int) -> dict:
    """Run in a fresh child process so that its peak RSS is this case's alone."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_large_child, args=(K, B, N, n_classes, queue))
    proc.start()
    out = queue.get()
    proc.join()
    out["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB → GiB
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller large case; exact solver only up to K = 50")
    args = parser.parse_args(argv)
    rows = []

    # 1. Paper scale, fast solver: timing (one start) and batch quality (4 restarts, as the stage does).
    paper = instance(100, 100, 20, 2000, n_classes=25)
    fast_paper = timed_cccp(paper, "fast")
    rows.append(("paper scale K=100 B=100 r=20, fast CCCP", f"{fast_paper['seconds']:.2f} s",
                 f"{fast_paper['iters']} CCCP steps, M={paper.M} patterns"))
    S, frames, _ = cccp.synthetic_cliques(100, 2000, 20, 25, seed=0)
    with cccp.torch_threads(1):
        quality = cccp.select_batches(S, frames, 100, 20, restarts=4, seed=0)["stats"]

    # 2. The exact solver at growing scales; the largest that succeeds is compared with the fast one.
    scales = [(30, 10, 5, 600, 10), (50, 30, 10, 1000, 15)] + ([] if args.quick else [(100, 100, 20, 2000, 25)])
    exact = None
    for K, B, r, N, nc in scales:
        prob = instance(K, B, r, N, nc)
        try:
            e = timed_cccp(prob, "exact")
        except cccp.SolverError as exc:
            rows.append((f"exact CCCP K={K} B={B} r={r}", "failed", str(exc)[:80]))
            break
        f = timed_cccp(prob, "fast")
        exact = {"scale": f"K={K},B={B},r={r}", "exact": e, "fast": f}
        rows.append((f"exact CCCP K={K} B={B} r={r}", f"{e['seconds']:.2f} s",
                     f"{e['iters']} steps" + (f"; fallbacks: {e['fallbacks']}" if e["fallbacks"] else "")))
        rows.append((f"fast  CCCP K={K} B={B} r={r}", f"{f['seconds']:.2f} s",
                     f"{f['iters']} steps; gap {(f['objective'] - e['objective']) / abs(e['objective']):+.2e}"))

    # 3. Large scale in a child process (peak memory).
    large_args = (500, 250, 25_000, 125) if args.quick else (2000, 1000, 100_000, 500)
    large = large_case(*large_args)
    rows.append((f"large K={large_args[0]} B={large_args[1]} N={large_args[2]}, fast CCCP", f"{large['seconds']:.1f} s",
                 f"{large['iters']} steps, M={large['M']}, peak {large['peak_mem_gb']:.2f} GiB, "
                 f"binary {large['binary_fraction']:.3f}"))

    e, f = exact["exact"], exact["fast"]
    result = {
        "paper_fast_s": round(fast_paper["seconds"], 3),
        "paper_fast_iters": fast_paper["iters"],
        "exact_scale": exact["scale"],
        "exact_s": round(e["seconds"], 3),
        "exact_fallbacks": e["fallbacks"],
        "fast_s_same_scale": round(f["seconds"], 3),
        "speedup": round(e["seconds"] / f["seconds"], 1),
        "objective_gap": (f["objective"] - e["objective"]) / abs(e["objective"]),
        "objective_gap_rounded": (f["rounded"] - e["rounded"]) / abs(e["rounded"]),
        "large_scale": f"K={large_args[0]},B={large_args[1]},N={large_args[2]}",
        "large_s": round(large["seconds"], 1),
        "large_peak_mem_gb": round(large["peak_mem_gb"], 3),
        "large_binary_fraction": large["binary_fraction"],
        "large_within_batch_sim_ratio_vs_random": large["within_batch_sim_ratio"],
        "large_total_coverage": large["total_coverage"],
        "within_batch_sim_ratio_vs_random": quality["within_batch_sim_ratio"],
        "within_batch_sim": quality["within_batch_sim"],
        "within_batch_sim_random": quality["within_batch_sim_random"],
        "high_pair_share_ratio_vs_random": quality["high_pair_share_ratio"],
        "coverage_ratio_vs_random": quality["coverage_ratio_vs_random"],
        "total_coverage": quality["total_coverage"],
        "binary_fraction": quality["binary_fraction"],
        "quick": args.quick,
    }
    rows += [
        ("within-batch S' vs random batches", f"{quality['within_batch_sim_ratio']:.3f}",
         f"{quality['within_batch_sim']:.4f} vs {quality['within_batch_sim_random']:.4f} (target ≤ 0.5)"),
        ("pairs above S' 90th pct vs random", f"{quality['high_pair_share_ratio']:.3f}",
         f"{quality['high_pair_share']:.3f} vs {quality['high_pair_share_random']:.3f}"),
        ("frames per batch vs random", f"{quality['coverage_ratio_vs_random']:.3f}",
         f"total coverage {quality['total_coverage']:.3f}"),
        ("binary fraction (relaxed X)", f"{quality['binary_fraction']:.3f}", "entries within 0.01 of 0 or 1"),
        ("speedup fast vs exact", f"{result['speedup']:.1f}×", f"at {exact['scale']} (target ≥ 20×)"),
        ("objective gap fast vs exact", f"{result['objective_gap']:+.2e}",
         f"rounded {result['objective_gap_rounded']:+.2e} (target ≤ 1%)"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {RESULTS}")
    return result


if __name__ == "__main__":
    main()
