"""Similarity engine benchmark (issue 3): top-k / bottom-k neighbours against the bare GEMM of the same tiles.

    .venv/bin/python benchmarks/similarity_engine.py            # N = 60,000, d = 512, k = 50
    .venv/bin/python benchmarks/similarity_engine.py --n 20000  # quicker
    .venv/bin/python benchmarks/similarity_engine.py --ray      # also through the Ray stage's tasks

engine_seconds: ``block_extremes`` over every row block (the stage's default row_block / col_block), in
process. gemm_seconds: exactly the same tile matmuls into the same reused buffer, nothing else, timed in
the same run. gemm_ratio = gemm_seconds / engine_seconds (1.0 would mean selection is free; target ≥ 0.7).
peak_mem_gb_above_features: the process's peak resident memory during the engine above its resident memory
with the features loaded (Linux VmHWM, reset through /proc/self/clear_refs; torch allocations are not seen
by tracemalloc). Writes benchmarks/results/similarity_engine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cliquecnn_ray.config import NeighboursConfig  # noqa: E402
from cliquecnn_ray.similarity import block_extremes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "similarity_engine.json"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_features(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) L2-normalised float32, made in chunks so that no float64 copy inflates the baseline."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 8192):
        chunk = rng.standard_normal((min(8192, n - s), d), dtype=np.float32)
        out[s : s + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def time_engine_and_gemm(
    feats: np.ndarray, ids: np.ndarray, k: int, row_block: int, col_block: int, tile_rows: int
) -> dict:
    """Engine and GEMM timed row block by row block in turn, so that both see the same load on a shared
    machine. The GEMM reference is the engine's matmuls alone: the same tile_rows × col_block tiles into
    one reused output buffer, nothing else. Returns wall and process-CPU seconds of both, the median of
    the per-block ratios (robust to another process's burst), and the peak memory: the largest rise of
    the resident set's high-water mark over its level just before a block_extremes call."""
    n = len(feats)
    feats_t = torch.from_numpy(feats)
    buf = torch.empty(min(tile_rows, n) * min(col_block, n))
    buf.fill_(0)  # touched once up front
    wall = {"engine": 0.0, "gemm": 0.0}
    cpu = {"engine": 0.0, "gemm": 0.0}
    block_ratios = []
    peak_kb = 0
    for r0 in range(0, n, row_block):
        w0, c0_ = time.perf_counter(), time.process_time()
        for t0 in range(r0, min(r0 + row_block, n), tile_rows):
            q = feats_t[t0 : min(t0 + tile_rows, r0 + row_block, n)]
            for c0 in range(0, n, col_block):
                c = feats_t[c0 : c0 + col_block]
                torch.matmul(q, c.T, out=buf[: len(q) * len(c)].view(len(q), len(c)))
        gemm_wall = time.perf_counter() - w0
        cpu["gemm"] += time.process_time() - c0_
        reset = _reset_peak()
        base_kb = _status_kb("VmRSS")
        w0, c0_ = time.perf_counter(), time.process_time()
        block_extremes(feats[r0 : r0 + row_block], ids[r0 : r0 + row_block], feats, ids, k, col_block, tile_rows)
        engine_wall = time.perf_counter() - w0
        cpu["engine"] += time.process_time() - c0_
        if reset:
            peak_kb = max(peak_kb, _status_kb("VmHWM") - base_kb)
        wall["gemm"] += gemm_wall
        wall["engine"] += engine_wall
        block_ratios.append(gemm_wall / engine_wall)
    return {
        "engine_seconds": wall["engine"],
        "gemm_seconds": wall["gemm"],
        "engine_cpu_seconds": cpu["engine"],
        "gemm_cpu_seconds": cpu["gemm"],
        "median_block_ratio": float(np.median(block_ratios)),
        "peak_gb": peak_kb / 2**20,
    }


def time_ray(
    feats: np.ndarray, ids: np.ndarray, k: int, row_block: int, col_block: int, tile_rows: int, cpus: float
) -> float:
    from cliquecnn_ray import raysetup
    from cliquecnn_ray.stages.neighbours import extremes_with_ray

    raysetup.init_ray()
    extremes_with_ray(feats[:1000], ids[:1000], k, row_block, col_block, tile_rows, cpus)  # warm the workers
    start = time.perf_counter()
    extremes_with_ray(feats, ids, k, row_block, col_block, tile_rows, cpus)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    defaults = NeighboursConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--row-block", type=int, default=defaults.row_block)
    parser.add_argument("--col-block", type=int, default=defaults.col_block)
    parser.add_argument("--tile-rows", type=int, default=defaults.tile_rows)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--ray", action="store_true", help="also time the stage's Ray tasks")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, help="Ray task size for --ray")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    feats = random_features(args.n, args.d, args.seed)
    ids = np.arange(args.n, dtype=np.int64)

    # Warm-up: first-call costs (thread pools, MKL kernels) on a small problem for both.
    time_engine_and_gemm(feats[:2048], ids[:2048], args.k, 1024, 1024, 512)
    t = time_engine_and_gemm(feats, ids, args.k, args.row_block, args.col_block, args.tile_rows)
    result = {
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "row_block": args.row_block,
        "col_block": args.col_block,
        "tile_rows": args.tile_rows,
        "threads": args.threads,
        "engine_seconds": round(t["engine_seconds"], 3),
        "gemm_seconds": round(t["gemm_seconds"], 3),
        "gemm_ratio": round(t["gemm_seconds"] / t["engine_seconds"], 3),
        # The same ratio less sensitive to other processes: median over row blocks, and on CPU time.
        "gemm_ratio_median_block": round(t["median_block_ratio"], 3),
        "gemm_ratio_cpu_time": round(t["gemm_cpu_seconds"] / t["engine_cpu_seconds"], 3),
        "gemm_gflops": round(2.0 * args.n * args.n * args.d / t["gemm_seconds"] / 1e9, 1),
        "peak_mem_gb_above_features": round(t["peak_gb"], 3),
        "features_gb": round(feats.nbytes / 2**30, 3),
        "load_average": round(os.getloadavg()[0], 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
    }
    if args.ray:
        result["ray_seconds"] = round(
            time_ray(feats, ids, args.k, args.row_block, args.col_block, args.tile_rows, args.cpus_per_task), 3
        )
        result["ray_cpus_per_task"] = args.cpus_per_task

    width = max(len(key) for key in result)
    print(f"similarity engine: N={args.n}, d={args.d}, k={args.k}, row blocks of {args.row_block}, "
          f"tiles {args.tile_rows}×{args.col_block}")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
