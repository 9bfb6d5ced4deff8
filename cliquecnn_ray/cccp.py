"""Batches of mutually distant cliques (paper Sect. 2.3, Eq. 1–6; docs/method.md#the-batch-problem).

Pure math over numpy / torch / cvxpy; no Ray here (the Ray layer is ``stages/batches.py``).

X ∈ [0,1]^{B×K} assigns K cliques to B batches; every row sums to r (Eq. 2/6). We minimise

    f(X) =   [tr(X S' Xᵀ) − tr(X diag(S') Xᵀ)] / s_sim          similar cliques in one batch        (Eq. 1)
           − λ1 Σ_b ||x_b C||_p^p / s_cov                       frames covered by each batch
           − λ2 ||1 X C||_p^p / s_tot                           frames covered by all batches
           + λ3 (B·K/4 − ||X − 0.5||_F²) / s_bin                the push to binary X (Sect. 2.3)

with p = 1/16, C ∈ {0,1}^{K×N} the clique-to-frame assignment. Three departures from the printed Eq. 1;
none changes which X are optimal for some choice of the λ's:

* Problem shrinking (``coverage_patterns``): frames no clique covers add 0^p = 0 and are dropped; frames
  covered by the same set of cliques have equal columns of C and merge into one of M patterns with a
  multiplicity w_m, so ||x_b C||_p^p = Σ_m w_m (x_b C_m)^p exactly (M is far below N when cliques
  overlap).
* Term normalisation (``make_problem``): the S' and coverage terms are divided by their size at a random
  feasible binary X, the λ3 term by the point where binary X becomes stable, so λ1, λ2, λ3 are *relative*
  weights and one set of defaults holds from K = 30 to K = 2,000.
* λ3's term −λ3||X − 0.5||² is shifted by its constant value B·K/4 at binary X: it is 0 at every binary X,
  so f at a rounded X is exactly Eq. 1 (normalised), and relative objective changes mean something.

DC form (Eq. 3–4): with S' PSD, u(X) = tr(X S' Xᵀ)/s_sim − λ1(...)/s_cov − λ2(...)/s_tot is convex (a PSD
quadratic minus concave t^p of linear maps) and v(X) = tr(X diag(S') Xᵀ)/s_sim + λ3||X − 0.5||²/s_bin
(+ const) is convex, so f = u − v is solved by CCCP: X^{t+1} = argmin_{X feasible} u(X) − <X, ∇v(X^t)>.
That convex sub-problem (Eq. 5–6) has two solvers with the same objective:

* ``solve_subproblem_exact``: cvxpy, interior point (Clarabel), t^p through exact conic forms; SCS fallback.
* ``solve_subproblem_fast``: a diagonally scaled projected gradient method on the capped simplex, all
  rows at once in torch; reaches the exact solver's objective (tests: within 1e-6 relative).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .linkage import project_psd


class BatchesError(ValueError):
    """Bad input to batch selection; the message names the category and the offending value."""


class SolverError(RuntimeError):
    """A sub-problem could not be solved by the requested solver (nor by its fallbacks)."""


# ---------------------------------------------------------------------------------------------
# The problem


@dataclass
class Problem:
    """One category's batch-selection problem, shrunk and normalised.

    Attributes:
        S: (K, K) float64 PSD clique similarity S'.
        patterns: (K, M) float64 0/1; column m = the set of cliques covering the frames of pattern m.
        weights: (M,) float64; w_m = the number of frames with pattern m (Σ w = covered frames).
        B, r, p: batches, cliques per batch, the exponent of Eq. 1.
        lambdas: (λ1, λ2, λ3), relative weights.
        scales: the normalisers {"sim", "cov", "tot", "bin"} (``make_problem``).
        category: named in messages.
    """

    S: np.ndarray
    patterns: np.ndarray
    weights: np.ndarray
    B: int
    r: int
    p: float
    lambdas: tuple
    scales: dict = field(default_factory=dict)
    category: str = ""

    @property
    def K(self) -> int:
        return self.S.shape[0]

    @property
    def M(self) -> int:
        return self.patterns.shape[1]

    @property
    def n_frames(self) -> int:
        return int(self.weights.sum())


def coverage_patterns(clique_frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Shrink C ∈ {0,1}^{K×N} to its distinct non-zero columns.

    Args:
        clique_frames: K arrays of frame ids (any integers), one per clique.

    Returns:
        patterns (K, M) float64 0/1 and weights (M,) float64 (frames per pattern), patterns ordered by
        their first frame id.
    """
    K = len(clique_frames)
    uniq = [np.unique(np.asarray(f, dtype=np.int64)) for f in clique_frames]
    rows = np.concatenate([np.full(len(u), k, dtype=np.int64) for k, u in enumerate(uniq)] + [np.zeros(0, np.int64)])
    frames = np.concatenate(uniq + [np.zeros(0, np.int64)])
    order = np.lexsort((rows, frames))
    frames, rows = frames[order], rows[order]
    starts = np.flatnonzero(np.r_[True, frames[1:] != frames[:-1]]) if len(frames) else np.zeros(0, np.int64)
    keys: dict[tuple, int] = {}
    counts: list[int] = []
    members: list[np.ndarray] = []
    for s, e in zip(starts, np.r_[starts[1:], len(frames)].astype(np.int64)):
        key = tuple(rows[s:e].tolist())  # the sorted cliques covering this frame
        m = keys.get(key)
        if m is None:
            keys[key] = len(counts)
            counts.append(1)
            members.append(rows[s:e])
        else:
            counts[m] += 1
    patterns = np.zeros((K, len(counts)), dtype=np.float64)
    for m, ks in enumerate(members):
        patterns[ks, m] = 1.0
    return patterns, np.asarray(counts, dtype=np.float64)


def binary_rows(indices: np.ndarray, K: int) -> np.ndarray:
    """(B, r) clique indices → the binary X (B, K) float64 with a 1 at each row's indices."""
    indices = np.asarray(indices, dtype=np.int64)
    X = np.zeros((len(indices), K))
    np.put_along_axis(X, indices, 1.0, axis=1)
    return X


def random_batches(B: int, K: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """(B, r) random batches: each row r distinct clique indices drawn uniformly from K, ascending."""
    return np.sort(np.argsort(rng.random((B, K)), axis=1)[:, :r], axis=1)


def random_binary(B: int, K: int, r: int, rng: np.random.Generator) -> np.ndarray:
    """(B, K) 0/1 with exactly r ones per row at uniformly random positions (random batches)."""
    return binary_rows(random_batches(B, K, r, rng), K)


def validate_inputs(S: np.ndarray, clique_frames: Sequence[np.ndarray], B: int, r: int, category: str = "",
                    clique_ids: Optional[np.ndarray] = None, known_frames: Optional[np.ndarray] = None) -> None:
    """Raise BatchesError, naming the category and the value, for inputs Eq. 1 cannot take.

    Checks: B ≥ 1, r ≥ 1, K ≥ r, S' (K, K) and finite, every clique has frames, and (with
    ``known_frames``) every frame id a clique names is known.
    """
    where = f"category {category!r}"
    K = len(clique_frames)
    ids = np.arange(K) if clique_ids is None else np.asarray(clique_ids)
    if B < 1:
        raise BatchesError(f"{where}: number of batches B = {B}; it must be at least 1")
    if r < 1:
        raise BatchesError(f"{where}: cliques per batch r = {r}; it must be at least 1")
    if K < r:
        raise BatchesError(f"{where}: {K} cliques, fewer than r = {r} cliques per batch (r > K)")
    S = np.asarray(S)
    if S.shape != (K, K):
        raise BatchesError(f"{where}: S' has shape {S.shape}, expected ({K}, {K}) for its {K} cliques")
    bad = ~np.isfinite(S)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise BatchesError(f"{where}: S' is {S[i, j]} (not finite) for cliques ({ids[i]}, {ids[j]})")
    for k, f in enumerate(clique_frames):
        if len(f) == 0:
            raise BatchesError(f"{where}: clique {ids[k]} has no frames")
    if known_frames is not None:
        known = np.asarray(known_frames)
        for k, f in enumerate(clique_frames):
            unknown = ~np.isin(np.asarray(f), known)
            if unknown.any():
                raise BatchesError(f"{where}: clique {ids[k]} names frame_id {np.asarray(f)[unknown][0]}, "
                                   "which is not in the frames table")


def make_problem(S: np.ndarray, clique_frames: Sequence[np.ndarray], B: int, r: int, p: float = 1 / 16,
                 lambdas: Sequence[float] = (1.0, 4.0, 2.0), category: str = "", n_draws: int = 8) -> Problem:
    """Validate, shrink and normalise one category's problem.

    Normalisers (so λ1, λ2, λ3 are relative weights; docs/method.md#the-batch-problem):
      s_sim = B·r(r−1)·rms(S'_kl, k ≠ l): the pair-similarity sum of random batches, with the entries' root
              mean square in place of their mean so that a centred S' (mean ≈ 0) does not make it vanish;
      s_cov = E Σ_b ||x_b C||_p^p and s_tot = E ||1 X C||_p^p over random binary X (``n_draws`` draws from
              a fixed seed, so the normalisers do not depend on the restart);
      s_bin = 2·B·r / (K − r)^{1−p}: at a binary X, spreading one unit of a batch's mass evenly over the
              K − r cliques outside it gains about (K − r)^{1−p} cliques' worth of per-batch coverage (t^p
              is near 1 even for tiny t) and costs 2 units of ||X − 0.5||² at the CCCP linearisation; this
              s_bin puts λ3 = 1 at that balance for any K/r, so λ3 > 1 keeps a binary X stable (λ3 ≈ the
              normalised size of the other terms).
    S' is symmetrised and, when it has negative eigenvalues, projected onto the PSD cone (paper Sect. 2.3),
    so that u stays convex.
    """
    S = np.asarray(S, dtype=np.float64)
    validate_inputs(S, clique_frames, B, r, category)
    S = project_psd(S)
    patterns, weights = coverage_patterns(clique_frames)
    K = S.shape[0]
    off = S[~np.eye(K, dtype=bool)]
    rms = float(np.sqrt(np.mean(off**2))) if off.size else 0.0
    rng = np.random.default_rng(12345)
    cov = tot = 0.0
    for _ in range(n_draws):
        T = random_binary(B, K, r, rng) @ patterns
        cov += float((T**p @ weights).sum()) / n_draws
        tot += float(T.sum(0) ** p @ weights) / n_draws
    scales = {
        "sim": max(B * r * (r - 1) * rms, 1e-12),
        "cov": max(cov, 1e-12),
        "tot": max(tot, 1e-12),
        "bin": 2.0 * B * r / max(K - r, 1) ** (1.0 - p),
    }
    return Problem(S=S, patterns=patterns, weights=weights, B=int(B), r=int(r), p=float(p),
                   lambdas=tuple(float(x) for x in lambdas), scales=scales, category=category)


def objective_terms(X: np.ndarray, prob: Problem) -> dict:
    """The normalised terms of f at X (B, K), relaxed or binary, with exact t^p, and f itself.

    Returns {"sim", "cov", "tot", "nonbinary", "f"}; f = sim − λ1 cov − λ2 tot + λ3 nonbinary.
    """
    X = np.asarray(X, dtype=np.float64)
    d = np.diag(prob.S)
    sim = float(np.einsum("bk,kl,bl->", X, prob.S, X) - (X**2 @ d).sum()) / prob.scales["sim"]
    T = np.clip(X @ prob.patterns, 0, None)
    cov = float((T**prob.p @ prob.weights).sum()) / prob.scales["cov"]
    tot = float(T.sum(0) ** prob.p @ prob.weights) / prob.scales["tot"]
    nonbinary = (0.25 * X.size - float(((X - 0.5) ** 2).sum())) / prob.scales["bin"]
    l1, l2, l3 = prob.lambdas
    return {"sim": sim, "cov": cov, "tot": tot, "nonbinary": nonbinary,
            "f": sim - l1 * cov - l2 * tot + l3 * nonbinary}


def objective(X: np.ndarray, prob: Problem) -> float:
    """f(X): Eq. 1 plus λ3's term, normalised (module docstring); X (B, K) relaxed or binary."""
    return objective_terms(X, prob)["f"]


def grad_v(X: np.ndarray, prob: Problem) -> np.ndarray:
    """∇v(X^t) (B, K), the linearisation point of a CCCP step (Eq. 5).

    Derivation. v(X) = tr(X D Xᵀ)/s_sim + λ3 ||X − 0.5||_F²/s_bin (+ const), D = diag(S'):
      tr(X D Xᵀ) = Σ_b Σ_k S'_kk x_bk²   → ∂/∂x_bk = 2 S'_kk x_bk,    i.e.  2 X ⊙ (1 diag(S'))
      ||X − 0.5||_F² = Σ_bk (x_bk − ½)²  → ∂/∂x_bk = 2 (x_bk − ½),    i.e.  2X − 1
    so ∇v = 2 X ⊙ (1 diag(S'))/s_sim + λ3 (2X − 1)/s_bin. The paper prints 2X ⊙ (1 diag(S')) + 2X − 1:
    the same with λ3 = 1 (λ3 is missing there) and no normalisation.
    """
    X = np.asarray(X, dtype=np.float64)
    d = np.diag(prob.S)[None, :]
    return 2.0 * X * d / prob.scales["sim"] + prob.lambdas[2] * (2.0 * X - 1.0) / prob.scales["bin"]


def subproblem_objective(X: np.ndarray, prob: Problem, G: np.ndarray) -> float:
    """u(X) − <X, G> (Eq. 5) with exact t^p; G = ∇v(X^t) (B, K)."""
    X = np.asarray(X, dtype=np.float64)
    T = np.clip(X @ prob.patterns, 0, None)
    l1, l2, _ = prob.lambdas
    u = (float(np.einsum("bk,kl,bl->", X, prob.S, X)) / prob.scales["sim"]
         - l1 * float((T**prob.p @ prob.weights).sum()) / prob.scales["cov"]
         - l2 * float(T.sum(0) ** prob.p @ prob.weights) / prob.scales["tot"])
    return u - float((X * G).sum())


# ---------------------------------------------------------------------------------------------
# The exact sub-problem solver (cvxpy)


def _power(expr, p: float, cones: str):
    """t^p for concave 0 < p < 1 in a conic form cvxpy can hand to Clarabel, or None if that form is
    not exact. "power": 3-d power cones (``approx=False``). "soc": cvxpy's default form, a tower of
    second-order cones for a rational p, used only when that rational equals p (``approx_error == 0``;
    for p = 1/16 the tower is four nested square roots, exact), since for other p it is an approximation."""
    import cvxpy as cp

    if cones == "power":
        return cp.power(expr, p, approx=False)
    atom = cp.power(expr, p)
    return atom if float(getattr(atom, "approx_error", 1.0)) == 0.0 else None


def solve_subproblem_exact(prob: Problem, G: np.ndarray, order: Sequence[tuple[str, str]] = (
        ("CLARABEL", "soc"), ("CLARABEL", "power"), ("SCS", "soc")), verbose: bool = False,
        fallbacks: Optional[list[str]] = None) -> np.ndarray:
    """argmin_{X ∈ [0,1]^{B×K}, X1 = r} u(X) − <X, G> (Eq. 5–6) by an interior-point method, exactly.

    The hypograph s ≤ t^p of each concave power is a conic constraint (``_power``), never an
    approximation. tr(X S' Xᵀ) = ||X L||_F² with S' = L Lᵀ; the objective is multiplied by B·r so its
    per-entry coefficients are O(1). Tries (solver, cones) in ``order``; the next one on a failure, and
    appends what failed and what solved it to ``fallbacks`` (the caller reports it once). Clarabel with 3-d
    power cones can stop with InsufficientProgress (p = 1/16 is close to the cone's edge), so the exact
    second-order-cone tower goes first and SCS, slower, last (timings and fallbacks:
    benchmarks/results/cccp.json, exact_s and exact_fallbacks).

    Returns X (B, K) float64 clipped to [0, 1]; raises SolverError when every attempt fails.
    """
    import cvxpy as cp

    B, K, r, p = prob.B, prob.K, prob.r, prob.p
    vals, vecs = np.linalg.eigh(prob.S)
    keep = vals > 1e-12 * max(1.0, float(vals.max()))
    L = vecs[:, keep] * np.sqrt(vals[keep])
    l1, l2, _ = prob.lambdas
    scale = float(B * r)
    errors: list[str] = []
    for name, cones in order:
        X = cp.Variable((B, K))
        T = X @ prob.patterns
        terms = [-scale * cp.sum(cp.multiply(G, X))]
        if L.shape[1]:
            terms.append(scale / prob.scales["sim"] * cp.sum_squares(X @ L))
        pw1 = _power(T, p, cones) if l1 else 0
        pw2 = _power(cp.sum(T, axis=0), p, cones) if l2 else 0
        if pw1 is None or pw2 is None:
            errors.append(f"{name}/{cones}: no exact form for p = {p}")
            continue
        if l1:
            terms.append(-scale * l1 / prob.scales["cov"] * cp.sum(pw1 @ prob.weights))
        if l2:
            terms.append(-scale * l2 / prob.scales["tot"] * (pw2 @ prob.weights))
        problem = cp.Problem(cp.Minimize(cp.sum(cp.hstack(terms))), [X >= 0, X <= 1, cp.sum(X, axis=1) == r])
        try:
            kwargs = {"max_iters": 50000, "eps": 1e-8} if name == "SCS" else {}
            problem.solve(solver=name, verbose=verbose, **kwargs)
        except (cp.error.SolverError, ValueError, ArithmeticError) as exc:
            errors.append(f"{name}/{cones}: {str(exc).splitlines()[0]}")
            continue
        if problem.status in ("optimal", "optimal_inaccurate") and X.value is not None:
            if errors and fallbacks is not None:
                fallbacks.append(f"exact sub-problem: {'; '.join(errors)}; solved by {name}/{cones}")
            return np.clip(np.asarray(X.value, dtype=np.float64), 0.0, 1.0)
        errors.append(f"{name}/{cones}: status {problem.status}")
    raise SolverError(f"category {prob.category!r}: exact sub-problem (B={B}, K={K}, M={prob.M}) failed: "
                      + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# The fast sub-problem solver (torch)


def project_capped_simplex(Y: torch.Tensor, r: float, scale: Optional[torch.Tensor] = None,
                           lower: Optional[torch.Tensor] = None, tau0: Optional[torch.Tensor] = None,
                           max_iter: int = 100, return_tau: bool = False):
    """Projection of each row of Y (R, K) onto {x : lower ≤ x ≤ 1, Σx = r}, exactly; by default the
    Euclidean projection onto the capped simplex {x ∈ [0,1]^K : Σx = r}.

    With ``scale`` w (R, K) > 0 it is the projection in the metric Σ_i (x_i − y_i)²/w_i (the step of a
    diagonally scaled gradient method), with ``lower`` l (R, K) per-entry lower bounds (default 0), and
    ``tau0`` (R, 1) a first guess of τ (returned with ``return_tau``). The solution is
    x = clip(y − τ w, l, 1) with τ the root of g(τ) = Σ_i clip(y_i − τ w_i, l_i, 1) − r:
    continuous, non-increasing, piecewise linear with slope −Σ_free w_i. Safeguarded Newton: a Newton step
    inside the bracket that holds the root, bisection otherwise. Newton is exact as soon as it lands on the
    root's linear piece: 4–7 steps at K = 100–2,000 for the Euclidean projection; 20–30 cold for the
    scaled one of the fast solver, 1–6 there when warm-started from the previous step's τ. A last solve on
    the final free set removes the remaining rounding.
    """
    if Y.ndim != 2:
        raise ValueError(f"project_capped_simplex: Y must be (R, K), got shape {tuple(Y.shape)}")
    K = Y.shape[1]
    if not 0 <= r <= K:
        raise ValueError(f"project_capped_simplex: r = {r} outside [0, K = {K}]")
    w = torch.ones_like(Y) if scale is None else scale
    low = torch.zeros_like(Y) if lower is None else lower
    if lower is not None and bool((low.sum(dim=1) > r * (1 + 1e-12)).any()):
        raise ValueError("project_capped_simplex: the lower bounds of a row sum to more than r")
    lo = ((Y - 1.0) / w).min(dim=1, keepdim=True).values  # τ ≤ lo: every entry at 1, g = K − r ≥ 0
    hi = ((Y - low) / w).max(dim=1, keepdim=True).values  # τ ≥ hi: every entry at its lower bound, g ≤ 0
    if tau0 is None:
        tau = (Y.sum(dim=1, keepdim=True) - r) / w.sum(dim=1, keepdim=True)  # the root when nothing is clipped
    else:  # a guess, e.g. the previous step's τ: the rows' multipliers change little from step to step
        tau = torch.minimum(torch.maximum(tau0, lo), hi)
    tol = 1e-12 * max(K, 1)
    for _ in range(max_iter):
        Z = Y - tau * w
        g = torch.maximum(Z.clamp(max=1.0), low).sum(dim=1, keepdim=True) - r
        done = g.abs() <= tol
        if bool(done.all()):
            break
        wfree = (w * ((Z > low) & (Z < 1.0))).sum(dim=1, keepdim=True)
        lo = torch.where(g > 0, tau, lo)
        hi = torch.where(g < 0, tau, hi)
        newton = tau + g / wfree.clamp(min=torch.finfo(Y.dtype).tiny)
        ok = (wfree > 0) & (newton > lo) & (newton < hi)
        tau = torch.where(done, tau, torch.where(ok, newton, 0.5 * (lo + hi)))
    Z = Y - tau * w
    ones, zeros = Z >= 1.0, Z <= low
    free = ~ones & ~zeros
    wfree = (w * free).sum(dim=1, keepdim=True)
    fixed = ones.sum(dim=1, keepdim=True) + (low * zeros).sum(dim=1, keepdim=True)
    exact = ((Y * free).sum(dim=1, keepdim=True) + fixed - r) / wfree.clamp(min=torch.finfo(Y.dtype).tiny)
    tau = torch.where(wfree > 0, exact, tau)
    x = torch.maximum((Y - tau * w).clamp(max=1.0), low)
    return (x, tau) if return_tau else x


def _phi(t: torch.Tensor, p: float, eps: float, need: int = 3) -> tuple[torch.Tensor, ...]:
    """φ(t) = t^p, φ'(t) and the curvature |φ''(t)|, smoothed below ``eps`` by the tangent line at eps.

    Why not (t + ε)^p − ε^p: with p = 1/16, ε^p is large for any useful ε (1e-6^p = 0.42), which shifts
    every term far from t^p. The tangent extension (concave, C¹) equals t^p wherever t ≥ ε; the fast solver
    keeps X > 0 and optimal coverages are far above ε (t^p's slope is infinite at 0), so it only guards
    t → 0. The curvature is |φ''| at max(t, ε). Returns the first ``need`` of (value, φ', |φ''|).
    """
    te = t.clamp(min=eps)
    pw = te**p
    der = (p * pw).div_(te)
    val = pw.add_(der * (t - te))  # = t^p where t ≥ eps, the tangent below
    if need == 1:
        return (val,)
    if need == 2:
        return val, der
    return val, der, ((1.0 - p) * der).div_(te)


class _Smooth:
    """The sub-problem F(X) = u(X) − <X, G> (Eq. 5) on torch tensors, all rows at once.

    u(X) = tr(X S' Xᵀ)/s_sim − λ1 Σ_bm w_m φ((XC)_bm)/s_cov − λ2 Σ_m w_m φ((1XC)_m)/s_tot, C = the (K, M)
    patterns, φ = t^p (smoothed below eps).
    """

    def __init__(self, prob: Problem, G: np.ndarray, eps: float, dtype=torch.float64):
        self.p, self.eps = prob.p, eps
        # Copies (torch.tensor), not views: a problem that came through the Ray object store is read-only.
        self.S2 = torch.tensor(prob.S, dtype=dtype) * (2.0 / prob.scales["sim"])  # ∇ tr(XS'Xᵀ)/s = X·2S'/s
        self.S2_diag = torch.diagonal(self.S2).clone()[None, :]
        P = torch.tensor(prob.patterns, dtype=dtype)
        self.sparse = prob.K * prob.M > 4_000_000  # large and sparse (a pattern names few cliques): CSR
        if self.sparse:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                self.P, self.PT = P.to_sparse_csr(), P.T.contiguous().to_sparse_csr()
        else:
            self.P, self.PT = P, P.T.contiguous()
        w = torch.tensor(prob.weights, dtype=dtype)
        self.a1 = prob.lambdas[0] / prob.scales["cov"] * w
        self.a2 = prob.lambdas[1] / prob.scales["tot"] * w
        self.G = torch.as_tensor(G, dtype=dtype)

    def cover(self, X: torch.Tensor) -> torch.Tensor:
        """(B, K) → (B, M) = X C."""
        return (self.PT @ X.T).T if self.sparse else X @ self.P

    def cover_T(self, Y: torch.Tensor) -> torch.Tensor:
        """(B, M) → (B, K) = Y Cᵀ."""
        return (self.P @ Y.T).T if self.sparse else Y @ self.PT

    def evaluate(self, X: torch.Tensor, grad: bool = True) -> tuple:
        """F(X), and with ``grad`` also ∇F (B, K) and the diagonal of ∇²F (B, K)."""
        XS = X @ self.S2
        T = self.cover(X)
        need = 3 if grad else 1
        r1 = _phi(T, self.p, self.eps, need)
        r2 = _phi(T.sum(0), self.p, self.eps, need)
        val = float(0.5 * (XS * X).sum() - (r1[0] @ self.a1).sum() - r2[0] @ self.a2 - (self.G * X).sum())
        if not grad:
            return (val,)
        grad_ = XS.sub_(self.cover_T(r1[1].mul_(self.a1).add_(r2[1] * self.a2))).sub_(self.G)
        # ∂²/∂x_bk² of −a φ(Σ_k' x_bk' C_k'm) is a |φ''| C_km (C is 0/1), summed over the patterns m of k.
        diag = self.cover_T(r1[2].mul_(self.a1).add_(r2[2] * self.a2)).add_(self.S2_diag)
        return val, grad_, diag


def solve_subproblem_fast(prob: Problem, G: np.ndarray, X0: np.ndarray, tol: float = 1e-8, max_iter: int = 500,
                          eps: float = 1e-9, shrink: float = 4.0, dtype=torch.float64) -> tuple[np.ndarray, dict]:
    """The sub-problem of ``solve_subproblem_exact`` by a diagonally scaled projected gradient method.

    Each step minimises the local model <∇F, Δ> + ½ Σ D Δ² over the feasible set, all rows at once:
        X ← Π_D(X − ∇F / D),  D = σ · diag ∇²F
    (the exact diagonal: 2 diag(S')/s_sim plus t^p's curvature through C), Π_D the projection in the
    D-metric (``project_capped_simplex`` with scale 1/D); σ doubles until F falls by half the first-order
    decrease (Armijo) and halves after a step accepted at once. Why not plain or accelerated projected
    gradient: t^p's curvature p(1−p)t^{p−2} spans orders of magnitude across entries (off-batch entries sit
    at t ≈ 0.001–0.01), so one step size fits no entry and FISTA with backtracking needs orders of
    magnitude more iterations than this diagonal scaling. Each step also keeps X ≥ X/``shrink`` (a trust
    region from below): a Newton-like step from far above the optimum of a t^p term overshoots to near 0,
    where the curvature explodes.

    Args:
        prob, G: the sub-problem u(X) − <X, G>, G = ∇v(X^t) (B, K).
        X0: (B, K) start (the previous CCCP iterate); made strictly positive and feasible first.
        tol: stop when F changes by less than tol·max(1, |F|) over 5 steps.
        eps: t^p is smoothed below eps (``_phi``).

    Returns (X (B, K) float64, info {"iters", "value"}).
    """
    f = _Smooth(prob, G, eps, dtype)
    r = float(prob.r)
    x = torch.as_tensor(X0, dtype=dtype)
    floor = min(1e-6, 0.5 * r / x.shape[1])  # at x = 0, t^p gives no usable curvature: start inside
    x = project_capped_simplex(x.clamp(floor, 1.0), r, lower=torch.full_like(x, floor))
    fx, g, h = f.evaluate(x)
    sigma = 1.0
    tau = None
    history = [fx]
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 (`it` is the iteration count returned after the loop)
        lower = x / shrink
        first_try = True
        while True:
            step = (h * sigma).reciprocal_()  # 1/D
            x_new, tau = project_capped_simplex(x - g * step, r, scale=step, lower=lower, tau0=tau, return_tau=True)
            model = float((g * (x_new - x)).sum())  # ≤ 0: the first-order decrease of the step
            f_new, g_new, h_new = f.evaluate(x_new)
            if f_new <= fx + 0.5 * model or sigma > 1e12:
                break
            sigma *= 2.0
            first_try = False
        if first_try:
            sigma = max(sigma / 2.0, 0.05)
        x, fx, g, h = x_new, f_new, g_new, h_new
        history.append(fx)
        if len(history) > 5 and abs(history[-6] - history[-1]) <= tol * max(1.0, abs(history[-1])):
            break
    return x.numpy().astype(np.float64), {"iters": it, "value": fx}


# ---------------------------------------------------------------------------------------------
# CCCP


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with ``n`` torch threads (None: unchanged); one per Ray task, and for parallel == serial."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def restart_seed(seed: int, category: str, restart: int) -> int:
    """The seed of one random start: a function of (config seed, category, restart index) only."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(category.encode()), int(restart)]).generate_state(1)[0])


def random_start(prob: Problem, seed: int) -> np.ndarray:
    """A random feasible relaxed X (B, K): uniform [0, 1) entries projected onto the capped simplex."""
    rng = np.random.default_rng(seed)
    Y = torch.as_tensor(rng.random((prob.B, prob.K)), dtype=torch.float64)
    return project_capped_simplex(Y, float(prob.r)).numpy()


def top_r(X: np.ndarray, r: int) -> np.ndarray:
    """(B, r) column indices of each row's r largest entries, ascending (ties: the lower index)."""
    return np.sort(np.argsort(-np.asarray(X), axis=1, kind="stable")[:, :r], axis=1)


def round_top_r(X: np.ndarray, r: int) -> np.ndarray:
    """Binary X (B, K): each row's r largest entries become 1, the rest 0."""
    return binary_rows(top_r(X, r), np.shape(X)[1])


def cccp(prob: Problem, X0: np.ndarray, solver: str = "fast", iters: int = 30, tol: float = 1e-4,
         lambda3_start: Optional[float] = 0.0625, growth: float = 2.0,
         sub_tol: float = 1e-8) -> tuple[np.ndarray, dict]:
    """CCCP (Eq. 5–6) from X0 (B, K): X^{t+1} = argmin_{X feasible} u(X) − <X, ∇v(X^t)>.

    Continuation on λ3: the push to binary starts at ``lambda3_start`` (None: at λ3) and grows by ``growth``
    per step up to prob's λ3, so the first steps arrange cliques while X is soft and the later ones
    binarise it; a full λ3 from the start mostly keeps the rounding of X0, whose batches are little better
    than random ones. Once λ3 is
    at its value f decreases monotonically (CCCP); stop when it changes by less than ``tol``·max(1, |f|)
    or after ``iters`` steps. ``solver``: "fast" (torch) or "exact" (cvxpy).

    Returns (X relaxed (B, K), info {"objective", "history" (f per step), "moved" (rows whose top-r set
    changed per step), "iters", "sub_iters", "seconds", "fallbacks" (the exact solver's fallbacks, each
    once)}).
    """
    if solver not in ("fast", "exact"):
        raise ValueError(f"unknown CCCP solver {solver!r} (fast or exact)")
    started = time.time()
    l1, l2, l3 = prob.lambdas
    l3_t = l3 if lambda3_start is None else min(l3, lambda3_start)
    X = np.asarray(X0, dtype=np.float64)
    history: list[float] = []
    sub_iters: list[int] = []
    moved: list[int] = []
    top = top_r(X, prob.r)
    f_prev = None
    fallbacks: list[str] = []
    for _ in range(iters):
        step = prob if l3_t == l3 else dataclasses.replace(prob, lambdas=(l1, l2, l3_t))
        G = grad_v(X, step)
        if solver == "fast":
            X, info = solve_subproblem_fast(step, G, X, tol=sub_tol)
            sub_iters.append(info["iters"])
        else:
            X = solve_subproblem_exact(step, G, fallbacks=fallbacks)
        if not np.isfinite(X).all():
            raise SolverError(f"category {prob.category!r}: the {solver} CCCP step produced non-finite X")
        f = objective(X, prob)
        history.append(f)
        new_top = top_r(X, prob.r)
        moved.append(int((new_top != top).any(axis=1).sum()))
        top = new_top
        if l3_t == l3 and f_prev is not None and abs(f_prev - f) <= tol * max(1.0, abs(f)):
            break
        f_prev = f if l3_t == l3 else None
        l3_t = min(l3, l3_t * growth)
    return X, {"objective": history[-1] if history else objective(X, prob), "history": history,
               "moved": moved, "iters": len(history), "sub_iters": sub_iters, "seconds": time.time() - started,
               "fallbacks": list(dict.fromkeys(fallbacks))}


def solve_restart(prob: Problem, seed: int, solver: str = "fast", iters: int = 30, tol: float = 1e-4,
                  lambda3_start: Optional[float] = 0.0625, threads: Optional[int] = 1) -> dict:
    """One random start: CCCP with ``solver``, falling back to the other solver if it fails; rounded.

    Returns {"seed", "X" (B, K) relaxed, "batches" (B, r) clique indices, "objective" (f at the relaxed
    X), "objective_rounded" (f at the rounded X: Eq. 1, normalised), "solver" (the one that produced X),
    "fallback" (why the requested solver was abandoned and any sub-problem solver fallback, or ""; the
    caller reports it, once), "iters", "seconds", "history"}.
    Raises SolverError when both solvers fail.
    """
    other = {"fast": "exact", "exact": "fast"}[solver]
    X0 = random_start(prob, seed)
    reason = ""
    with torch_threads(threads):
        try:
            X, info = cccp(prob, X0, solver, iters, tol, lambda3_start)
            used = solver
        except (SolverError, RuntimeError, ValueError, ArithmeticError) as exc:
            reason = f"{solver} solver failed ({exc}); used the {other} solver"
            try:
                X, info = cccp(prob, X0, other, iters, tol, lambda3_start)
            except (SolverError, RuntimeError, ValueError, ArithmeticError) as exc2:
                raise SolverError(f"category {prob.category!r}: both solvers failed: {solver}: {exc}; "
                                  f"{other}: {exc2}") from exc2
            used = other
    batches = top_r(X, prob.r)
    reason = "; ".join([reason] * bool(reason) + info.get("fallbacks", []))
    return {"seed": int(seed), "X": X, "batches": batches, "objective": float(info["objective"]),
            "objective_rounded": objective(binary_rows(batches, prob.K), prob), "solver": used, "fallback": reason,
            "iters": info["iters"], "seconds": info["seconds"], "history": info["history"]}


def best_restart(results: Sequence[dict]) -> dict:
    """The restart with the lowest rounded objective (Eq. 1 at the batches actually used); ties: first."""
    return min(enumerate(results), key=lambda kv: (kv[1]["objective_rounded"], kv[0]))[1]


# ---------------------------------------------------------------------------------------------
# What the batches trade


def _pair_stats(S: np.ndarray, batches: np.ndarray, threshold: float) -> tuple[float, float]:
    """Mean S' over the within-batch clique pairs of ``batches`` (B, r), and the share above threshold."""
    r = batches.shape[1]
    if r < 2:
        return float("nan"), float("nan")
    iu = np.triu_indices(r, 1)
    sims = S[batches[:, iu[0]], batches[:, iu[1]]]  # (B, r(r−1)/2)
    return float(sims.mean()), float((sims > threshold).mean())


def _coverage(batches: np.ndarray, prob: Problem) -> tuple[np.ndarray, float]:
    """Frames covered by each batch (B,) and the fraction of clique-covered frames any batch covers."""
    covered = np.zeros((batches.shape[0], prob.M), dtype=bool)
    for b, row in enumerate(batches):
        covered[b] = prob.patterns[row].any(axis=0)
    per_batch = covered.astype(np.float64) @ prob.weights
    total = float(prob.weights[covered.any(axis=0)].sum() / max(prob.n_frames, 1))
    return per_batch, total


def batch_stats(batches: np.ndarray, prob: Problem, X: Optional[np.ndarray] = None, seed: int = 0) -> dict:
    """What the chosen batches (B, r) trade (docs/method.md#the-batch-problem), each beside random batches
    of r of the same K cliques (seeded), so the figures read as ratios.

    Keys: objective_relaxed (f at X, when given), objective_rounded, objective_random; binary_fraction
    (entries of X within 0.01 of 0 or 1); within_batch_sim / _random / _ratio (mean S' over within-batch
    pairs); high_pair_share / _random / _ratio (share of within-batch pairs above the 90th percentile of
    all clique-pair similarities: the conflicting pairs Sect. 2.3 worries about); coverage_per_batch_mean /
    _min / _random / coverage_ratio_vs_random (distinct frames per batch); total_coverage / _random (share
    of clique-covered frames in some batch); distinct_batches; frames_covered (by cliques).
    """
    batches = np.asarray(batches, dtype=np.int64)
    B, r, K = prob.B, prob.r, prob.K
    rand = random_batches(B, K, r, np.random.default_rng(seed))
    iu = np.triu_indices(K, 1)
    threshold = float(np.percentile(prob.S[iu], 90)) if K > 1 else float("inf")
    sim, high = _pair_stats(prob.S, batches, threshold)
    sim_r, high_r = _pair_stats(prob.S, rand, threshold)
    cov, total = _coverage(batches, prob)
    cov_r, total_r = _coverage(rand, prob)

    def ratio(a, b):
        return float(a / b) if b not in (0, 0.0) and np.isfinite(b) else float("nan")

    out = {
        "objective_rounded": objective(binary_rows(batches, K), prob),
        "objective_random": objective(binary_rows(rand, K), prob),
        "within_batch_sim": sim,
        "within_batch_sim_random": sim_r,
        "within_batch_sim_ratio": ratio(sim, sim_r),
        "high_pair_share": high,
        "high_pair_share_random": high_r,
        "high_pair_share_ratio": ratio(high, high_r),
        "coverage_per_batch_mean": float(cov.mean()),
        "coverage_per_batch_min": float(cov.min()),
        "coverage_per_batch_random": float(cov_r.mean()),
        "coverage_ratio_vs_random": ratio(cov.mean(), cov_r.mean()),
        "total_coverage": total,
        "total_coverage_random": total_r,
        "distinct_batches": int(len({tuple(row) for row in batches.tolist()})),
        "frames_covered": prob.n_frames,
    }
    if X is not None:
        X = np.asarray(X)
        out["objective_relaxed"] = objective(X, prob)
        out["binary_fraction"] = float((np.minimum(X, 1.0 - X) <= 0.01).mean())
    return out


def select_batches(S: np.ndarray, clique_frames: Sequence[np.ndarray], B: int, r: int, p: float = 1 / 16,
                   lambdas: Sequence[float] = (1.0, 4.0, 2.0), solver: str = "fast", iters: int = 30,
                   tol: float = 1e-4, lambda3_start: Optional[float] = 0.0625, restarts: int = 4, seed: int = 0,
                   category: str = "") -> dict:
    """One category end to end, in one process: problem, ``restarts`` CCCP runs, best, stats.

    Args:
        S: (K, K) clique similarity S'; clique_frames: K arrays of frame ids.
        B, r, p, lambdas: Eq. 1 (λ's relative, see ``make_problem``).
        solver, iters, tol, lambda3_start: ``cccp``; restarts, seed: random starts (``restart_seed``).

    Returns {"batches" (B, r) clique indices into S, "best" (the winning ``solve_restart`` result),
    "problem" (the ``Problem``), "restarts" (every start's rounded objective), "stats" (``batch_stats``)}.
    The Ray stage does the same with the restarts as parallel tasks.
    """
    prob = make_problem(S, clique_frames, B, r, p, lambdas, category)
    results = [solve_restart(prob, restart_seed(seed, category, i), solver, iters, tol, lambda3_start)
               for i in range(restarts)]
    best = best_restart(results)
    stats = batch_stats(best["batches"], prob, best["X"], seed=seed)
    return {"batches": best["batches"], "best": best, "problem": prob,
            "restarts": [res["objective_rounded"] for res in results], "stats": stats}


# ---------------------------------------------------------------------------------------------
# Synthetic instances (tests, benchmark)


def synthetic_cliques(K: int = 100, N: int = 2000, clique_size: int = 20, n_classes: int = 25, d: int = 32,
                      noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """A seeded clique set with class structure, for tests and benchmarks.

    N frames in ``n_classes`` equal classes; a frame's feature is its class centre (random Gaussian, so
    similarities between classes are centred at 0) plus ``noise`` × Gaussian, L2-normalised. Each clique
    takes ``clique_size`` random frames of one class (classes round-robin), so cliques of a class overlap
    as real cliques do. S' = mean pairwise frame similarity between cliques = F̄ F̄ᵀ (PSD by construction).

    Returns S' (K, K) float64, clique_frames (K arrays of frame ids), clique_class (K,).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(N) % n_classes
    members = [np.flatnonzero(labels == c) for c in range(n_classes)]
    clique_class = np.arange(K) % n_classes
    frames = [np.sort(rng.choice(members[c], size=min(clique_size, len(members[c])), replace=False))
              for c in clique_class]
    means = np.empty((K, d))
    for k, f in enumerate(frames):
        feats = centres[labels[f]] + noise / np.sqrt(d) * rng.normal(size=(len(f), d))
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        means[k] = feats.mean(0)
    return means @ means.T, frames, clique_class
