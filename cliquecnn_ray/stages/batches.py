"""Stage ``batches`` of round r: batches of mutually distant cliques by CCCP (paper Sect. 2.3, docs/method.md#cccp).

Inputs: ``StageDir(run, r, "cliques")`` (the cliques table and S' per category,
``stage_outputs.read_clique_similarity``) and ``StageDir(run, 0, "frames")`` (frame ids, checked against
the cliques; images for the mosaic). The math is ``cliquecnn_ray.cccp``.

Work: every category is its own problem with B = ``batches.num_batches`` batches *per category* of
r = ``batches.cliques_per_batch`` of that category's cliques. Each category's problem is built once on the
driver and put in the object store; its ``batches.restarts`` random starts run as parallel Ray tasks
(``num_cpus = resources.cpus_per_task``, one torch thread each), all categories at once. The restart with
the lowest rounded objective (Eq. 1 at the batches actually written) wins; ties go to the lower restart.
A solver that fails falls back to the other one inside the task, and the stats say so; if both fail the
stage fails and commits nothing.

Outputs (committed together by ``rundir.run_stage`` into ``StageDir(run, r, "batches")``):

- ``batches.parquet`` — ``schema.BATCHES``: ``batch_id`` int32, dense 0..B·categories−1 (categories sorted,
  then batch order); ``category``; ``clique_ids`` list<int32>, exactly r global clique ids, ascending.
- ``stats.json`` — per category ``batches.batch_stats`` (objective relaxed/rounded/random, binary fraction,
  within-batch similarity and high-similarity pair share vs random batches, per-batch and total coverage,
  distinct batches), the solver used, any fallback, and every restart's objective.
- ``mosaic.png`` — batch 0 of the first category as a grid of its cliques' mean images (paper Fig. 3).
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from .. import cccp, figures, schema, storage
from ..config import PipelineConfig
from ..rundir import StageDir, run_stage
from ..stage_outputs import IMAGE_COLUMNS, decode_frames, read_clique_similarity, read_frames

log = logging.getLogger(__name__)

BATCHES_FILE = "batches.parquet"
STATS_FILE = "stats.json"
MOSAIC_FILE = "mosaic.png"
MOSAIC_SIZE = 64  # pixels per clique cell


def load_cliques(cliques_dir: StageDir) -> dict[str, dict]:
    """The committed cliques → {category: {"clique_ids" (K,) int32 ascending, "frames" (K arrays of frame
    ids), "S" (K, K) float64}}, categories sorted. Errors name the category and the clique."""
    table = schema.check_columns(cliques_dir.read_table(), schema.CLIQUES, "cliques", str(cliques_dir))
    sims = read_clique_similarity(cliques_dir)
    ids = table.column(schema.CLIQUE_ID).to_numpy()
    cats = np.asarray(table.column(schema.CATEGORY).to_pylist(), dtype=object)
    frames = table.column(schema.FRAME_IDS).to_pylist()
    out = {}
    for cat in sorted(set(cats.tolist())):
        rows = np.flatnonzero(cats == cat)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        cids = ids[rows].astype(np.int32)
        if cat not in sims:
            raise cccp.BatchesError(f"category {cat!r}: the cliques stage has no clique similarity S' for it")
        sim_ids, S = sims[cat]
        if not np.array_equal(np.asarray(sim_ids), cids):
            raise cccp.BatchesError(f"category {cat!r}: S' covers clique ids {list(sim_ids[:5])}…, the cliques "
                                  f"table {list(cids[:5])}… ({len(sim_ids)} vs {len(cids)} cliques)")
        out[cat] = {
            "clique_ids": cids,
            "frames": [np.asarray(frames[i] if frames[i] is not None else [], dtype=np.int64) for i in rows],
            "S": np.asarray(S, dtype=np.float64),
        }
    return out


def _frame_ids(frames_dir: StageDir) -> np.ndarray:
    return np.sort(frames_dir.read_table(columns=[schema.FRAME_ID]).column(schema.FRAME_ID).to_numpy())


def mosaic_png(frames_dir: StageDir, clique_frames: list[np.ndarray]) -> bytes:
    """The mosaic of one batch: ``clique_frames`` (r arrays of frame ids) → PNG bytes."""
    table = read_frames(frames_dir.run, np.unique(np.concatenate(clique_frames)), IMAGE_COLUMNS)
    order = {int(f): i for i, f in enumerate(table.column(schema.FRAME_ID).to_numpy())}
    images = decode_frames(table, MOSAIC_SIZE, grey=False)
    return figures.clique_mosaic_png([images[[order[int(f)] for f in frames]] for frames in clique_frames])


def _finite(obj):
    """NaN/inf → None, so stats.json is strict JSON (a ratio to a zero random figure is undefined)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _restart_task(prob: cccp.Problem, seed: int, solver: str, iters: int, tol: float, lambda3_start: float) -> dict:
    return cccp.solve_restart(prob, seed, solver, iters, tol, lambda3_start, threads=1)


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    """Select the batches of round ``round_index`` and commit them (see the module docstring)."""
    cliques_dir = StageDir(cfg.run, round_index, "cliques")
    frames_dir = StageDir(cfg.run, 0, "frames")
    inputs = {"cliques": cliques_dir.fingerprint(), "frames": frames_dir.fingerprint()}
    bc = cfg.batches
    config = {"batches": bc}
    if bc.solver not in ("fast", "exact"):
        raise cccp.BatchesError(f"batches.solver = {bc.solver!r}; use 'fast' or 'exact'")
    if bc.restarts < 1:
        raise cccp.BatchesError(f"batches.restarts = {bc.restarts}; it must be at least 1")

    def compute(attempt_uri: str) -> dict:
        import ray

        categories = load_cliques(cliques_dir)
        known = _frame_ids(frames_dir)
        task = ray.remote(num_cpus=cfg.resources.cpus_per_task)(_restart_task)
        pending = {}
        for cat, data in categories.items():
            cccp.validate_inputs(data["S"], data["frames"], bc.num_batches, bc.cliques_per_batch, cat,
                               clique_ids=data["clique_ids"], known_frames=known)
            prob = cccp.make_problem(data["S"], data["frames"], bc.num_batches, bc.cliques_per_batch, bc.p,
                                   (bc.lambda1, bc.lambda2, bc.lambda3), category=cat)
            prob_ref = ray.put(prob)
            seeds = [cccp.restart_seed(bc.seed, cat, i) for i in range(bc.restarts)]
            pending[cat] = (prob, [task.remote(prob_ref, s, bc.solver, bc.cccp_iters, bc.cccp_tol, bc.lambda3_start)
                                   for s in seeds])
            log.info("batches: category %r: K=%d cliques, %d frames in M=%d patterns, B=%d, r=%d, %d restarts",
                     cat, prob.K, prob.n_frames, prob.M, prob.B, prob.r, bc.restarts)

        batch_rows, per_category = [], {}
        for cat, (prob, refs) in pending.items():
            results = ray.get(refs)
            best = cccp.best_restart(results)
            fallbacks = [res["fallback"] for res in results if res["fallback"]]
            if fallbacks:  # once per category, not once per restart or CCCP step
                log.warning("batches: category %r: solver fallback in %d of %d restarts: %s", cat, len(fallbacks),
                            len(results), fallbacks[0])
            stats = cccp.batch_stats(best["batches"], prob, best["X"], seed=bc.seed)
            stats.update({
                "solver": best["solver"],
                "fallback": best["fallback"],
                "cccp_iters": best["iters"],
                "cccp_seconds": round(best["seconds"], 3),
                "restart_objectives": [r["objective_rounded"] for r in results],
                "K": prob.K, "B": prob.B, "r": prob.r, "patterns": prob.M,
            })
            per_category[cat] = stats
            global_ids = categories[cat]["clique_ids"][best["batches"]]  # (B, r) local → global clique ids
            batch_rows.append((cat, np.sort(global_ids, axis=1)))
            log.info("batches: category %r: %s solver, within-batch S' %.3f (random %.3f), high pairs %.3f "
                     "(random %.3f), coverage/batch %.1f (random %.1f), total %.2f, %d distinct, binary %.3f",
                     cat, best["solver"],
                     stats["within_batch_sim"], stats["within_batch_sim_random"], stats["high_pair_share"],
                     stats["high_pair_share_random"], stats["coverage_per_batch_mean"],
                     stats["coverage_per_batch_random"], stats["total_coverage"], stats["distinct_batches"],
                     stats["binary_fraction"])

        if not batch_rows:
            raise cccp.BatchesError(f"{cliques_dir}: the cliques table has no cliques")
        cats = [c for c, b in batch_rows for _ in range(len(b))]
        lists = [row.astype(np.int32) for _, b in batch_rows for row in b]
        table = pa.table(
            {
                schema.BATCH_ID: pa.array(np.arange(len(lists), dtype=np.int32), pa.int32()),
                schema.CATEGORY: pa.array(cats, pa.string()),
                schema.CLIQUE_IDS: pa.array(lists, pa.list_(pa.int32())),
            },
            schema=schema.BATCHES,
        )
        first = batch_rows[0][0]
        local = [int(np.flatnonzero(categories[first]["clique_ids"] == cid)[0]) for cid in batch_rows[0][1][0]]
        png = mosaic_png(frames_dir, [categories[first]["frames"][k] for k in local])
        storage.write_parquet(table, storage.join(attempt_uri, BATCHES_FILE))
        storage.write_bytes(storage.join(attempt_uri, STATS_FILE), json.dumps(_finite(per_category), indent=1).encode())
        storage.write_bytes(storage.join(attempt_uri, MOSAIC_FILE), png)
        return {"rows": table.num_rows, "categories": _finite({
            cat: {k: s[k] for k in ("within_batch_sim_ratio", "high_pair_share_ratio", "coverage_ratio_vs_random",
                                    "total_coverage", "distinct_batches", "binary_fraction", "solver", "fallback")}
            for cat, s in per_category.items()})}

    return run_stage(StageDir(cfg.run, round_index, "batches"), config, inputs, compute, force)
