"""Batch selection by CCCP (paper Sect. 2.3, Eq. 1–6): the math, both solvers, the ablations, the Ray stage."""
import io
import json

import cvxpy as cp
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from cliquecnn_ray import cccp, figures, rundir, schema, storage
from cliquecnn_ray.config import load_config
from cliquecnn_ray.stage_outputs import write_clique_similarity
from cliquecnn_ray.stages import batches as stage
from cliquecnn_ray.stages.cliques import CLIQUES_FILE
from tests.synthetic import class_images, commit_table, frames_table

# ---------------------------------------------------------------------------------------------
# Problem shrinking and the objective


def test_coverage_patterns_merge_frames_with_the_same_cliques():
    # frame 0: {0}; frames 1, 2: {0, 1}; frame 3: {1}; frame 9: {2}; frames 4–8 in no clique
    patterns, weights = cccp.coverage_patterns([np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([9])])
    cols = {tuple(np.flatnonzero(patterns[:, m])): weights[m] for m in range(patterns.shape[1])}
    assert cols == {(0,): 1.0, (0, 1): 2.0, (1,): 1.0, (2,): 1.0}
    # ||x_b C||_p^p over the full C (K × N) equals Σ_m w_m (x_b C_m)^p
    C = np.zeros((3, 10))
    for k, f in enumerate([[0, 1, 2], [1, 2, 3], [9]]):
        C[k, f] = 1
    X = np.random.default_rng(0).random((4, 3))
    p = 1 / 16
    assert np.allclose(((X @ C) ** p).sum(1), (X @ patterns) ** p @ weights)
    assert np.isclose(((X.sum(0) @ C) ** p).sum(), (X.sum(0) @ patterns) ** p @ weights)


def _small_problem(K=12, B=5, r=3, seed=0, lambdas=(1.0, 4.0, 2.0)):
    S, frames, _ = cccp.synthetic_cliques(K, N=K * 8, clique_size=10, n_classes=4, d=8, seed=seed)
    return cccp.make_problem(S, frames, B, r, lambdas=lambdas)


def test_objective_at_binary_x_is_eq1_and_grad_v_is_the_gradient():
    prob = _small_problem()
    rng = np.random.default_rng(1)
    Xb = cccp.random_binary(prob.B, prob.K, prob.r, rng)
    terms = cccp.objective_terms(Xb, prob)
    assert terms["nonbinary"] == pytest.approx(0.0, abs=1e-12)  # λ3's term vanishes at binary X
    # Eq. 1 by hand: pairs inside each batch (diag removed), per-batch and total coverage
    sim = sum(prob.S[np.ix_(row, row)].sum() - np.trace(prob.S[np.ix_(row, row)])
              for row in (np.flatnonzero(x) for x in Xb)) / prob.scales["sim"]
    assert terms["sim"] == pytest.approx(sim)
    # ∇v by central differences of v(X) = tr(X D Xᵀ)/s_sim + λ3 ||X − 0.5||²/s_bin
    X = rng.random((prob.B, prob.K))

    def v(X):
        quad = (X**2 @ np.diag(prob.S)).sum() / prob.scales["sim"]
        return quad + prob.lambdas[2] * ((X - 0.5) ** 2).sum() / prob.scales["bin"]

    num = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        e = np.zeros_like(X)
        e[idx] = 1e-6
        num[idx] = (v(X + e) - v(X - e)) / 2e-6
    assert np.allclose(cccp.grad_v(X, prob), num, atol=1e-6)
    # f = u − v up to a constant: f(X) − f(Y) = [u(X) − u(Y)] − [v(X) − v(Y)]
    Y = cccp.random_start(prob, 3)
    u = lambda Z: cccp.subproblem_objective(Z, prob, np.zeros_like(Z))  # noqa: E731
    assert cccp.objective(X, prob) - cccp.objective(Y, prob) == pytest.approx((u(X) - u(Y)) - (v(X) - v(Y)))


# ---------------------------------------------------------------------------------------------
# The capped-simplex projection


@pytest.mark.parametrize("weighted", [False, True])
def test_projection_onto_capped_simplex_matches_cvxpy(weighted):
    rng = np.random.default_rng(0)
    for K, r in [(5, 2), (10, 1), (10, 9), (30, 7), (8, 8), (8, 0)]:
        Y = rng.normal(size=(6, K)) * 2
        w = rng.random((6, K)) + 0.1 if weighted else np.ones((6, K))
        low = rng.random((6, K)) * min(0.05, r / K / 2) if weighted else np.zeros((6, K))
        X = cccp.project_capped_simplex(torch.as_tensor(Y), r, scale=torch.as_tensor(w) if weighted else None,
                                      lower=torch.as_tensor(low) if weighted else None).numpy()
        for i in range(6):
            x = cp.Variable(K)
            cp.Problem(cp.Minimize(cp.sum(cp.multiply(1 / w[i], cp.square(x - Y[i])))),
                       [x >= low[i], x <= 1, cp.sum(x) == r]).solve(
                solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
            assert np.abs(X[i] - x.value).max() < 1e-6
        assert np.abs(X.sum(1) - r).max() < 1e-12 and X.min() >= 0 and X.max() <= 1
    ties = cccp.project_capped_simplex(torch.tensor([[5.0, 5.0, 5.0, 0.0, 0.0]], dtype=torch.float64), 2).numpy()
    assert np.allclose(ties, [[2 / 3, 2 / 3, 2 / 3, 0, 0]])


# ---------------------------------------------------------------------------------------------
# The two solvers of the convex sub-problem (Eq. 5–6), and CCCP


@pytest.mark.parametrize("lambda3", [0.0625, 2.0])
def test_fast_subproblem_solver_reaches_the_exact_optimum(lambda3):
    prob = _small_problem(lambdas=(1.0, 4.0, lambda3))
    X0 = cccp.random_start(prob, 1)
    G = cccp.grad_v(X0, prob)
    exact = cccp.subproblem_objective(cccp.solve_subproblem_exact(prob, G), prob, G)
    power = cccp.subproblem_objective(cccp.solve_subproblem_exact(prob, G, order=[("CLARABEL", "power")]), prob, G)
    Xf, info = cccp.solve_subproblem_fast(prob, G, X0, tol=1e-12)
    fast = cccp.subproblem_objective(Xf, prob, G)
    assert power == pytest.approx(exact, rel=1e-6)  # SOC tower and power cones: the same exact problem
    assert abs(fast - exact) <= 1e-6 * abs(exact)
    assert np.abs(Xf.sum(1) - prob.r).max() < 1e-9 and Xf.min() >= 0 and Xf.max() <= 1


def test_fast_cccp_within_one_percent_of_exact_cccp():
    prob = _small_problem(K=16, B=6, r=4, seed=2)
    X0 = cccp.random_start(prob, 5)
    Xe, ie = cccp.cccp(prob, X0, "exact")
    Xf, info = cccp.cccp(prob, X0, "fast")
    assert abs(info["objective"] - ie["objective"]) <= 0.01 * abs(ie["objective"])
    assert np.all(np.diff(info["history"][-3:]) <= 1e-9)  # monotone once λ3 is at its value
    assert cccp.objective(cccp.round_top_r(Xf, prob.r), prob) == pytest.approx(
        cccp.objective(cccp.round_top_r(Xe, prob.r), prob), rel=0.01)


def test_exact_solver_failure_falls_back_to_fast(monkeypatch):
    prob = _small_problem()

    def broken(*args, **kwargs):
        raise cccp.SolverError("injected numerical failure")

    monkeypatch.setattr(cccp, "solve_subproblem_exact", broken)
    res = cccp.solve_restart(prob, seed=0, solver="exact")
    assert res["solver"] == "fast" and "exact solver failed" in res["fallback"]
    assert res["batches"].shape == (prob.B, prob.r)


# ---------------------------------------------------------------------------------------------
# Batches on data with classes, and bad input


def test_batches_on_classes_are_dissimilar_covering_and_binary():
    S, frames, classes = cccp.synthetic_cliques(K=40, N=800, clique_size=20, n_classes=10, seed=0)
    out = cccp.select_batches(S, frames, B=20, r=8, restarts=2, seed=0)
    st = out["stats"]
    assert out["batches"].shape == (20, 8) and all(len(set(b)) == 8 for b in out["batches"].tolist())
    assert st["within_batch_sim"] < 0.5 * st["within_batch_sim_random"]
    assert st["high_pair_share"] <= 0.5 * st["high_pair_share_random"]
    assert st["coverage_ratio_vs_random"] >= 1.0 and st["total_coverage"] >= 0.95
    assert st["binary_fraction"] >= 0.95
    # the same seed gives the same batches
    again = cccp.select_batches(S, frames, B=20, r=8, restarts=2, seed=0)
    assert np.array_equal(again["batches"], out["batches"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 5}, "3 cliques, fewer than r = 5"),
        ({"B": 0}, "B = 0"),
        ({"nan": True}, "S' is nan"),
        ({"empty": True}, "clique 12 has no frames"),
        ({"unknown": True}, "clique 11 names frame_id 999"),
    ],
)
def test_bad_input_names_category_and_value(change, message):
    S = np.eye(3)
    frames = [np.array([0, 1]), np.array([2]), np.array([3])]
    if change.get("nan"):
        S[0, 1] = np.nan
    if change.get("empty"):
        frames[2] = np.array([], dtype=np.int64)
    if change.get("unknown"):
        frames[1] = np.array([999])
    with pytest.raises(cccp.BatchesError, match=message) as err:
        cccp.validate_inputs(S, frames, change.get("B", 2), change.get("r", 2), "walking",
                           clique_ids=np.array([10, 11, 12]), known_frames=np.arange(4))
    assert "'walking'" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Ablation of Eq. 1 on planted instances (paper Sect. 2.3, (i)–(iii))


def _batch_stats_on(S, frames, B, r, lambdas=(1.0, 4.0, 2.0), S_opt=None, seed=0):
    out = cccp.select_batches(S if S_opt is None else S_opt, frames, B, r, lambdas=lambdas, restarts=1, seed=seed)
    return cccp.batch_stats(out["batches"], cccp.make_problem(S, frames, B, r), out["best"]["X"]), out["batches"]


def test_ablation_without_similarity_term_batches_hold_similar_cliques():
    # 6 groups of 5 near-identical cliques, frames disjoint: only S' can keep a group apart
    rng = np.random.default_rng(0)
    group = np.repeat(np.arange(6), 5)
    F = np.eye(6)[group] + 0.15 * rng.normal(size=(30, 6))
    S = F @ F.T
    frames = [np.arange(5 * k, 5 * k + 5) for k in range(30)]
    full, fb = _batch_stats_on(S, frames, B=10, r=6)
    ablated, ab = _batch_stats_on(S, frames, B=10, r=6, S_opt=np.zeros_like(S))
    same_group = lambda bs: np.mean([6 - len(set(group[b])) for b in bs])  # noqa: E731
    assert same_group(ab) >= 2.0 and same_group(fb) <= 0.25 * same_group(ab)
    assert full["high_pair_share"] <= 0.25 * full["high_pair_share_random"]
    assert ablated["high_pair_share"] >= 0.5 * ablated["high_pair_share_random"]  # no better than random


def test_ablation_without_per_batch_coverage_batches_degenerate_to_single_samples():
    # 6 cliques of 20 frames and 18 single-frame cliques; the singles are mildly dissimilar to each other
    rng = np.random.default_rng(0)
    nb, ns = 6, 18
    frames = [np.arange(20 * k, 20 * k + 20) for k in range(nb)] + [np.array([20 * nb + i]) for i in range(ns)]
    M = rng.normal(size=(nb + ns, 6))
    M /= np.linalg.norm(M, axis=1, keepdims=True)
    V = np.eye(ns) - 1.0 / ns
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    Mx = np.zeros((nb + ns, ns))
    Mx[nb:] = V
    S = M @ M.T + Mx @ Mx.T
    full, fb = _batch_stats_on(S, frames, B=20, r=4)
    ablated, ab = _batch_stats_on(S, frames, B=20, r=4, lambdas=(0.0, 4.0, 2.0))
    singles = lambda bs: np.mean([(b >= nb).sum() for b in bs])  # noqa: E731
    assert full["coverage_per_batch_mean"] >= 1.3 * ablated["coverage_per_batch_mean"]
    assert singles(ab) >= 1.5 * singles(fb)


def test_ablation_without_total_coverage_batches_become_identical():
    # 3 mutually distant cliques (a simplex) among 10 of equal size; 30 batches of 3
    rng = np.random.default_rng(0)
    K, r = 10, 3
    F = 0.5 * rng.normal(size=(K, 8)) / np.sqrt(8)
    V = np.eye(r) - 1.0 / r
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    F = np.hstack([F, np.zeros((K, r))])
    F[:r, 8:] = V
    S = F @ F.T
    frames = [np.arange(10 * k, 10 * k + 10) for k in range(K)]
    full, _ = _batch_stats_on(S, frames, B=30, r=r)
    ablated, ab = _batch_stats_on(S, frames, B=30, r=r, lambdas=(1.0, 0.0, 2.0))
    _, counts = np.unique(ab, axis=0, return_counts=True)
    assert ablated["distinct_batches"] <= 2 and counts.max() >= 25  # (nearly) all the same batch
    assert full["distinct_batches"] >= 3 and full["total_coverage"] >= ablated["total_coverage"] + 0.4


# ---------------------------------------------------------------------------------------------
# The mosaic


def test_clique_mosaic_draws_mean_images_on_a_grid():
    a = np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 200, np.uint8)])  # mean 100
    b = np.full((1, 4, 4), 50, np.uint8)
    c = np.full((3, 4, 4), 7, np.uint8)
    img = figures.clique_mosaic([a, b, c], pad=1)
    assert img.shape == (2 * 5 + 1, 2 * 5 + 1)  # ⌈√3⌉ = 2 columns, 2 rows
    assert (img[1:5, 1:5] == 100).all() and (img[1:5, 6:10] == 50).all() and (img[6:10, 1:5] == 7).all()
    assert (img[6:10, 6:10] == 255).all()  # empty cell
    png = Image.open(io.BytesIO(figures.clique_mosaic_png([a, b, c])))
    assert png.size == (14, 14)
    with pytest.raises(ValueError, match="clique 1"):
        figures.clique_mosaic([a, np.zeros((2, 5, 5), np.uint8)])


# ---------------------------------------------------------------------------------------------
# The Ray stage


def _commit_cliques(run, blocks):
    """Commit a cliques stage: blocks = [(category, clique_ids, frame lists, S')]."""
    table = pa.table(
        {
            schema.CLIQUE_ID: pa.array(np.concatenate([b[1] for b in blocks]), pa.int32()),
            schema.CATEGORY: pa.array([b[0] for b in blocks for _ in b[1]], pa.string()),
            schema.FRAME_IDS: pa.array([list(map(int, f)) for b in blocks for f in b[2]], pa.list_(pa.int64())),
            schema.COMPACTNESS: pa.array(np.ones(sum(len(b[1]) for b in blocks)), pa.float32()),
        },
        schema=schema.CLIQUES,
    )

    def write(attempt):
        storage.write_parquet(table, storage.join(attempt, CLIQUES_FILE))
        write_clique_similarity([(b[0], b[1], b[3]) for b in blocks], attempt)
        return {"rows": table.num_rows}

    out = rundir.StageDir(run, 0, "cliques")
    rundir.run_stage(out, {"synthetic": "cliques"}, {}, write, force=True)
    return out


def _two_category_run(tmp_path, K_b=4):
    images, _ = class_images(4, 20, size=16)
    commit_table(str(tmp_path), 0, "frames", frames_table(images, category=["a"] * 40 + ["b"] * 40))
    blocks, next_id = [], 0
    for c, (cat, K) in enumerate([("a", 12), ("b", K_b)]):
        S, frames, _ = cccp.synthetic_cliques(K, N=40, clique_size=6, n_classes=4, d=8, seed=c)
        ids = np.arange(next_id, next_id + K, dtype=np.int32)
        next_id += K
        blocks.append((cat, ids, [f + 40 * c for f in frames], S.astype(np.float32)))
    _commit_cliques(str(tmp_path), blocks)
    return blocks


def test_stage_parallel_restarts_equal_serial_and_commit_outputs(tmp_path, ray_session):
    blocks = _two_category_run(tmp_path)
    cfg = load_config(overrides=[f"run={tmp_path}", "batches.num_batches=5", "batches.cliques_per_batch=3",
                                 "batches.restarts=3", "batches.seed=7"])
    record = stage.run(cfg)
    assert not record["skipped"] and record["stats"]["rows"] == 10
    out = rundir.StageDir(str(tmp_path), 0, "batches")
    table = out.read_table()
    assert table.schema.equals(schema.BATCHES)
    assert table.column(schema.BATCH_ID).to_pylist() == list(range(10))
    for cat, ids, frames, S in blocks:
        got = [row[schema.CLIQUE_IDS] for row in table.to_pylist() if row[schema.CATEGORY] == cat]
        serial = cccp.select_batches(S, frames, 5, 3, restarts=3, seed=7, category=cat)
        assert got == [sorted(ids[b].tolist()) for b in serial["batches"]]  # parallel == serial, same seeds
    stats = json.loads(storage.read_bytes(out.file(stage.STATS_FILE)))
    assert set(stats) == {"a", "b"} and stats["a"]["solver"] == "fast" and len(stats["a"]["restart_objectives"]) == 3
    mosaic = Image.open(io.BytesIO(storage.read_bytes(out.file(stage.MOSAIC_FILE))))
    assert mosaic.size == (2 * (stage.MOSAIC_SIZE + 2) + 2,) * 2  # 3 cliques → a 2 × 2 grid
    assert stage.run(cfg)["skipped"]


def test_stage_rejects_a_category_with_fewer_than_r_cliques(tmp_path, ray_session):
    _two_category_run(tmp_path, K_b=2)
    cfg = load_config(overrides=[f"run={tmp_path}", "batches.num_batches=5", "batches.cliques_per_batch=3",
                                 "batches.restarts=1"])
    with pytest.raises(cccp.BatchesError, match="category 'b': 2 cliques, fewer than r = 3"):
        stage.run(cfg)
    assert rundir.StageDir(str(tmp_path), 0, "batches").record() is None  # nothing committed
