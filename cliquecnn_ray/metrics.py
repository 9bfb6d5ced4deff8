"""Evaluation metrics (docs/evaluation.md): per-query ROC AUC, the AUC of the mean ROC, k-NN accuracy, retrieval mAP.

Everything is computed from features, over whole similarity ROWS produced block by block by the similarity
engine (``neighbours.iter_similarity_blocks``): memory O(row_block · N), never an N×N matrix.

Two label forms (docs/data-contracts.md#labels):
- class labels — every evaluated frame is a query; its positives are the other frames with its label, its
  negatives all the rest; the query itself is left out of its own database (leave-one-out).
- candidate lists (Olympic Sports style) — each query has listed positives and negatives; only the query's
  scores against its own candidates are needed.

Similarity is the Pearson correlation where the protocol asks for it (the paper's PASCAL protocol):
``similarity.pearson_normalise`` centres each vector over its d entries and L2-normalises it, so a dot product in the
engine is the correlation.

A query with no positive or no negative has no ROC: it is skipped for every metric (kNN included, so that
all figures are over the same queries), counted and reported as ``skipped_queries``.

Pure numpy / torch; never imports ray (the Ray layer is ``stages/evaluate.py``). Results of query chunks are
``Partial`` sums, merged by addition, so a sharded evaluation equals a one-shot one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from .similarity import iter_similarity_blocks, pearson_normalise

ROC_POINTS = 101
GRID = np.linspace(0.0, 1.0, ROC_POINTS)  # the authors' FPR grid (calculate_roc_auc.py); also our recall grid
BYTES_PER_ENTRY = 160  # peak bytes per (query, candidate) entry: ranking_metrics' arrays (more with ties) + the block


def row_block_for(n_database: int, memory_mb: float) -> int:
    """Query rows per similarity block so that whole rows (R, N_db) and their ranks fit in ``memory_mb``."""
    return max(1, int(memory_mb * 2**20 // (BYTES_PER_ENTRY * max(1, n_database))))


# ---------------------------------------------------------------------------------------------
# Per-query ranking metrics over one block of rows


def ranking_metrics(scores, positive, valid=None) -> dict[str, np.ndarray]:
    """ROC AUC, average precision and interpolated curves of each row of a block of queries.

    Args:
        scores: (R, C) similarity of each query to each candidate (higher = more similar).
        positive: (R, C) bool, the candidate is a positive of the query.
        valid: (R, C) bool, the candidate takes part (False: the query itself, padding); default all.
    Returns:
        auc (R,) float64: ROC AUC = P(score of a positive > score of a negative) + ½ P(tie), i.e.
            average ranks for ties: equal to ``sklearn.metrics.roc_auc_score`` of the row.
        ap (R,): average precision Σ_n (R_n − R_{n−1}) P_n over distinct score thresholds (tied scores form
            one threshold): equal to ``sklearn.metrics.average_precision_score``.
        tpr (R, 101): the ROC (points of ``sklearn.metrics.roc_curve``) linearly interpolated at FPR = GRID
            with ``np.interp``: on a vertical stretch of the ROC the upper TPR (see olympic.py).
        precision (R, 101): interpolated precision (the largest precision at recall ≥ ρ) at recall ρ = GRID.
        n_pos, n_neg (R,) int64 over valid candidates; skipped (R,) bool: no positive or no negative
            (metrics NaN there).
    """
    s = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    r, c = s.shape
    pos = np.asarray(positive, dtype=bool)
    val = np.ones_like(pos) if valid is None else np.asarray(valid, dtype=bool)
    pos = pos & val
    neg = ~pos & val
    # Left-out candidates sink below every real score (into their own tie group at the end). numpy's
    # argsort is SIMD-vectorised: faster than torch.sort on CPU. Order inside a tie is irrelevant (ties are grouped).
    s = np.where(val, s, -np.inf)
    order = np.argsort(-s, axis=1)
    ss = np.take_along_axis(s, order, 1)
    p = np.take_along_axis(pos, order, 1)
    n = np.take_along_axis(neg, order, 1)
    del order
    tp = np.cumsum(p, 1, dtype=np.int64)
    fp = np.cumsum(n, 1, dtype=np.int64)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    tp_end, fp_end, fp_before = tp, fp, fp  # untied entry: its own counts; a positive has no negative at it
    tie_r, tie_c = np.nonzero((ss[:, 1:] == ss[:, :-1]) & np.isfinite(ss[:, 1:]))
    del ss
    if tie_r.size:
        # Tied scores form one threshold (as sklearn): every member of a tie group takes the counts at the
        # group's end, and the negatives strictly above the group. Ties are rare: fix only their entries.
        link = tie_r * c + tie_c  # flat position i whose score equals that of i + 1 (row-major: sorted)
        new_run = np.ones(link.size, dtype=bool)
        new_run[1:] = link[1:] != link[:-1] + 1
        run = np.cumsum(new_run) - 1
        run_start = link[new_run]
        run_last = np.append(link[:-1][new_run[1:]], link[-1]) + 1  # last member of each run
        tp_end, fp_end = tp.copy().reshape(-1), fp.copy().reshape(-1)
        fp_before = fp.copy().reshape(-1)
        above = (fp - n).reshape(-1)
        members = np.concatenate([link, run_last])
        member_run = np.concatenate([run, np.arange(run_start.size)])
        tp_end[members] = tp.reshape(-1)[run_last[member_run]]
        fp_end[members] = fp.reshape(-1)[run_last[member_run]]
        fp_before[members] = above[run_start[member_run]]
        tp_end, fp_end, fp_before = (x.reshape(r, c) for x in (tp_end, fp_end, fp_before))
    skipped = (n_pos == 0) | (n_neg == 0)
    big_p = np.maximum(n_pos, 1).astype(np.float64)
    big_n = np.maximum(n_neg, 1).astype(np.float64)
    # Mann–Whitney: a positive beats the negatives below it and half of those tied with it (counts ×2).
    wins2 = np.where(p, 2 * n_neg[:, None] - fp_before - fp_end, 0).sum(1)
    auc = wins2 / (2 * big_p * big_n)
    prec = tp_end / np.maximum(tp_end + fp_end, 1)
    ap = np.where(p, prec, 0.0).sum(1) / big_p
    # Curves on the grid, vectorised over rows: the ROC points (0, 0), (fp/N, tp/P) per threshold as
    # sklearn.metrics.roc_curve, interpolated exactly as np.interp does it (x == xp[j] → fp[j], j the last
    # such point, i.e. the upper TPR on a vertical stretch).
    xs = np.concatenate([np.zeros((r, 1)), fp_end / big_n[:, None]], 1)
    ys = np.concatenate([np.zeros((r, 1)), tp_end / big_p[:, None]], 1)
    grid = np.tile(GRID, (r, 1))
    j = _searchsorted_rows(xs, grid, right=True) - 1
    j1 = np.minimum(j + 1, c)
    x0, x1 = np.take_along_axis(xs, j, 1), np.take_along_axis(xs, j1, 1)
    y0, y1 = np.take_along_axis(ys, j, 1), np.take_along_axis(ys, j1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr_grid = np.where((x0 == grid) | (j == c), y0, (y1 - y0) / (x1 - x0) * (grid - x0) + y0)
    del xs, ys
    recall = tp_end / big_p[:, None]
    best_prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # largest precision at this recall or beyond
    at = np.minimum(_searchsorted_rows(recall, grid, right=False), c - 1)
    prec_grid = np.take_along_axis(best_prec, at, 1)
    auc[skipped] = np.nan
    ap[skipped] = np.nan
    tpr_grid[skipped] = np.nan
    prec_grid[skipped] = np.nan
    return {
        "auc": auc,
        "ap": ap,
        "tpr": tpr_grid,
        "precision": prec_grid,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "skipped": skipped,
    }


def _searchsorted_rows(sorted_rows: np.ndarray, values: np.ndarray, right: bool) -> np.ndarray:
    """Row-wise np.searchsorted of (R, M) values in (R, C) ascending rows → (R, M) int64 (torch batches it)."""
    return torch.searchsorted(
        torch.from_numpy(np.ascontiguousarray(sorted_rows)), torch.from_numpy(values), right=right
    ).numpy()


def mean_roc_auc(mean_tpr: np.ndarray, start_at_origin: bool = False) -> float:
    """Trapezoid AUC of a mean ROC sampled at FPR = GRID: the authors' ``auc(grid_x, mean_y)``.

    ``start_at_origin=True`` applies scikit-learn's cross-validation-example convention instead
    (``mean_tpr[0] = 0``, ``mean_tpr[-1] = 1``); the authors' script forces neither, nor do we by default.
    """
    y = np.array(mean_tpr, dtype=np.float64)
    if start_at_origin:
        y[0], y[-1] = 0.0, 1.0
    return float(np.trapezoid(y, GRID))


# ---------------------------------------------------------------------------------------------
# k-NN classification


def knn_vote(neighbour_labels, neighbour_sims, n_labels: int) -> np.ndarray:
    """Majority vote of each query's k nearest neighbours.

    Args:
        neighbour_labels: (R, k) int label codes 0..n_labels−1 of the neighbours.
        neighbour_sims: (R, k) their similarities to the query.
    Returns (R,) int64 predicted codes. A tie in votes goes to the tied label whose voters have the larger
    summed similarity; a tie in that too to the smallest label code.
    """
    labels = torch.as_tensor(np.asarray(neighbour_labels), dtype=torch.int64)
    sims = torch.as_tensor(np.asarray(neighbour_sims), dtype=torch.float64)
    r = labels.shape[0]
    votes = torch.zeros(r, n_labels, dtype=torch.int64).scatter_add_(1, labels, torch.ones_like(labels))
    summed = torch.zeros(r, n_labels, dtype=torch.float64).scatter_add_(1, labels, sims)
    top = votes == votes.max(1, keepdim=True).values
    # argmax returns the first maximum: the smallest label code among equal sums.
    return summed.masked_fill(~top, float("-inf")).argmax(1).numpy()


# ---------------------------------------------------------------------------------------------
# Additive summaries


@dataclass
class Partial:
    """Sums over a set of evaluated queries (a category or a chunk of one); partials merge by ``+``."""

    n_queries: int = 0  # queries with a ROC (not skipped)
    skipped: int = 0  # queries without a positive or without a negative
    auc_sum: float = 0.0
    ap_sum: float = 0.0
    knn_correct: int = 0
    knn_queries: int = 0  # 0 where labels have no classes (candidate lists): kNN undefined
    tpr_sum: np.ndarray = field(default_factory=lambda: np.zeros(ROC_POINTS))
    precision_sum: np.ndarray = field(default_factory=lambda: np.zeros(ROC_POINTS))

    def __add__(self, other: Partial) -> Partial:
        return Partial(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )

    @classmethod
    def of_rows(cls, rows: dict[str, np.ndarray], knn_correct: Optional[np.ndarray] = None) -> Partial:
        """Sum the rows of ``ranking_metrics`` (and per-query kNN hits (R,) bool, if any) over used queries."""
        used = ~rows["skipped"]
        part = cls(
            n_queries=int(used.sum()),
            skipped=int((~used).sum()),
            auc_sum=float(rows["auc"][used].sum()),
            ap_sum=float(rows["ap"][used].sum()),
            tpr_sum=rows["tpr"][used].sum(0),
            precision_sum=rows["precision"][used].sum(0),
        )
        if knn_correct is not None:
            part.knn_correct = int(np.asarray(knn_correct)[used].sum())
            part.knn_queries = part.n_queries
        return part


def merge(parts: Sequence[Partial]) -> Partial:
    total = Partial()
    for part in parts:
        total = total + part
    return total


def summarise(part: Partial) -> dict[str, Any]:
    """Metrics of one set of queries: auc (mean per-query AUC), auc_mean_roc (AUC of the mean interpolated
    ROC), knn (accuracy, None without classes), map, n_queries, skipped_queries; NaN where nothing counted."""
    n = part.n_queries
    nan = float("nan")
    return {
        "auc": part.auc_sum / n if n else nan,
        "auc_mean_roc": mean_roc_auc(part.tpr_sum / n) if n else nan,
        "knn": (part.knn_correct / part.knn_queries if part.knn_queries else None) if n else None,
        "map": part.ap_sum / n if n else nan,
        "n_queries": n,
        "skipped_queries": part.skipped,
    }


def _curves(part: Partial) -> dict[str, list]:
    n = max(part.n_queries, 1)
    return {"mean_tpr": (part.tpr_sum / n).round(6).tolist(),
            "mean_precision": (part.precision_sum / n).round(6).tolist()}


def summarise_categories(parts: Mapping[str, Partial]) -> dict[str, Any]:
    """The metrics JSON over categories (categories are evaluated separately, docs/architecture.md#categories).

    Pooled over all queries: ``auc`` (mean per-query AUC), ``auc_mean_roc_all_queries`` (AUC of one mean ROC
    over every query), ``knn``, ``map``. Unweighted means over categories with at least one query:
    ``auc_mean_roc`` (the Olympic Sports figure), ``auc_category_mean``, ``knn_category_mean``,
    ``map_category_mean``. ``per_category`` holds each category's ``summarise``; ``curves`` the mean ROC
    (TPR at FPR = ``grid``) and the mean interpolated precision (at recall = ``grid``) per category and pooled.
    """
    total = merge(list(parts.values()))
    per_category = {cat: summarise(p) for cat, p in parts.items()}
    pooled = summarise(total)
    counted = [m for m in per_category.values() if m["n_queries"]]

    def cat_mean(key: str) -> Optional[float]:
        values = [m[key] for m in counted if m[key] is not None]
        return float(np.mean(values)) if values else (None if key == "knn" else float("nan"))

    return {
        "auc": pooled["auc"],
        "auc_category_mean": cat_mean("auc"),
        "auc_mean_roc": cat_mean("auc_mean_roc"),
        "auc_mean_roc_all_queries": pooled["auc_mean_roc"],
        "knn": pooled["knn"],
        "knn_category_mean": cat_mean("knn"),
        "map": pooled["map"],
        "map_category_mean": cat_mean("map"),
        "n_queries": pooled["n_queries"],
        "skipped_queries": pooled["skipped_queries"],
        "n_categories": len(counted),
        "per_category": per_category,
        "curves": {
            "grid": GRID.round(6).tolist(),
            "all": _curves(total),
            "per_category": {cat: _curves(p) for cat, p in parts.items()},
        },
    }


# ---------------------------------------------------------------------------------------------
# Class labels: leave-one-out over one category's frames, block by block


def class_partial(
    features: np.ndarray,
    labels: np.ndarray,
    k: int = 5,
    start: int = 0,
    stop: Optional[int] = None,
    row_block: int = 1024,
    rescore: Optional[Callable[[np.ndarray, torch.Tensor], torch.Tensor]] = None,
    videos: Optional[np.ndarray] = None,
) -> Partial:
    """Queries ``features[start:stop]`` against the whole set ``features`` (N, d), leave-one-out.

    Args:
        features: (N, d) one category's evaluated frames (Pearson-normalised by the caller when asked).
        labels: (N,) int64 class codes 0..L−1.
        k: neighbours voting in k-NN (at most N − 1).
        rescore: re-ranking of a block: (query positions (R,), similarities (R, N)) → new scores (R, N)
            (``diffusion.DiffusionRescorer``); every metric, kNN included, then ranks by the new scores.
        videos: (N,) int64 clip code of each frame, or None. Given, evaluation is cross-video: a query's
            candidates (ranking and k-NN) exclude every frame of its own clip, so near-duplicate frames of
            one clip cannot inflate the figures.
    Positives of query i: the other frames with labels[i]; negatives: the rest; i itself excluded.
    """
    # Arrays from Ray's object store are read-only; torch wants writable memory (copy only then).
    features = np.require(features, dtype=np.float32, requirements=["C", "W"])
    labels_t = torch.as_tensor(np.require(labels, dtype=np.int64, requirements=["W"]))
    n = len(labels_t)
    stop = n if stop is None else stop
    n_labels = int(labels_t.max()) + 1 if n else 1
    videos_t = None if videos is None else torch.as_tensor(np.require(videos, dtype=np.int64, requirements=["W"]))
    k = min(k, n - 1)
    parts = []
    for offset, sims in iter_similarity_blocks(features[start:stop], features, row_block):
        rows = torch.arange(start + offset, start + offset + sims.shape[0])
        if rescore is not None:
            sims = rescore(rows.numpy(), sims)
        r_idx = torch.arange(sims.shape[0])
        valid = torch.ones(sims.shape, dtype=torch.bool)
        valid[r_idx, rows] = False
        if videos_t is not None:
            valid &= videos_t[None, :] != videos_t[rows][:, None]
        positive = labels_t[None, :] == labels_t[rows][:, None]
        metrics = ranking_metrics(sims, positive.numpy(), valid.numpy())
        correct = None
        if k > 0:
            sims.masked_fill_(~valid, float("-inf"))  # a query (and its clip) is not its own neighbour
            top_sims, top_ids = torch.topk(sims, k, dim=1)
            predicted = knn_vote(labels_t[top_ids], top_sims, n_labels)
            correct = predicted == labels_t[rows].numpy()
        parts.append(Partial.of_rows(metrics, correct))
    return merge(parts)


def encode_labels(labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Any labels (N,) → (codes (N,) int64, the sorted distinct labels): code order = sorted label order."""
    values, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64).reshape(-1), values


def class_label_metrics(
    features: np.ndarray,
    labels: Sequence,
    categories: Optional[Sequence[str]] = None,
    k: int = 5,
    pearson: bool = True,
    memory_mb: float = 1024,
    videos: Optional[Sequence] = None,
) -> dict[str, Any]:
    """All §9 metrics for class labels in this process (tests, benchmarks; the stage spreads the same
    ``class_partial`` calls over Ray tasks).

    Args:
        features: (N, d); labels: (N,) any sortable labels; categories: (N,) category of each frame
            (default one category "all"): queries and databases never cross categories.
        pearson: centre + L2-normalise each vector first (similarity = Pearson correlation).
        videos: (N,) clip of each frame (any sortable ids), or None; given, a query's own clip is excluded
            from its candidates (``class_partial``).
    Returns ``summarise_categories`` of the categories.
    """
    feats = pearson_normalise(features) if pearson else np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    cats = np.asarray(["all"] * len(labels) if categories is None else categories)
    video_codes = None if videos is None else encode_labels(videos)[0]
    parts = {}
    for cat in sorted(set(cats.tolist())):
        rows = np.flatnonzero(cats == cat)
        codes, _ = encode_labels(labels[rows])
        parts[cat] = class_partial(feats[rows], codes, k=k, row_block=row_block_for(len(rows), memory_mb),
                                   videos=None if video_codes is None else video_codes[rows])
    return summarise_categories(parts)


# ---------------------------------------------------------------------------------------------
# Candidate lists (query_id + positive_ids + negative_ids, Olympic Sports style)


def pad_candidates(
    positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query lists of positive and negative rows → (ids (Q, C) int64, padded with 0;
    positive (Q, C) bool; valid (Q, C) bool), C the longest list. Positives come first in each row."""
    q = len(positives)
    lengths = [len(p) + len(n) for p, n in zip(positives, negatives)]
    c = max(lengths, default=0)
    ids = np.zeros((q, max(c, 1)), dtype=np.int64)
    positive = np.zeros_like(ids, dtype=bool)
    valid = np.zeros_like(ids, dtype=bool)
    for i, (p, n) in enumerate(zip(positives, negatives)):
        row = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1), np.asarray(n, dtype=np.int64).reshape(-1)])
        ids[i, : len(row)] = row
        positive[i, : len(p)] = True
        valid[i, : len(row)] = True
    return ids, positive, valid


def candidate_scores(
    queries: np.ndarray,
    features: np.ndarray,
    ids: np.ndarray,
    flipped: Optional[np.ndarray] = None,
    flip: Optional[np.ndarray] = None,
    chunk: int = 256,
) -> np.ndarray:
    """Scores of each query against its own candidates only: (Q, d) · (N, d)[ids (Q, C)] → (Q, C) float64.

    Where ``flip`` (Q, C) is True and ``flipped`` (N, d) (features of the mirrored frames) is given, the score
    is φ_q·φ_flip(j), as the authors' ``sim_flip``; else φ_q·φ_j. Memory O(chunk · C · d).
    """
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    flipped_t = None if flipped is None else torch.as_tensor(np.asarray(flipped), dtype=torch.float32)
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.int64)
    flip_t = None if flip is None else torch.as_tensor(np.asarray(flip, dtype=bool))
    q_t = torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    out = torch.empty(ids_t.shape, dtype=torch.float64)
    for lo in range(0, len(ids_t), chunk):
        hi = lo + chunk
        cand = feats[ids_t[lo:hi]]  # (q, C, d)
        if flipped_t is not None and flip_t is not None:
            cand = torch.where(flip_t[lo:hi, :, None], flipped_t[ids_t[lo:hi]], cand)
        out[lo:hi] = torch.einsum("qd,qcd->qc", q_t[lo:hi], cand).double()
    return out.numpy()


def candidate_partial(scores: np.ndarray, positive: np.ndarray, valid: np.ndarray) -> Partial:
    """Per-query AUC, mean-ROC and AP sums of candidate lists (no kNN: no classes)."""
    return Partial.of_rows(ranking_metrics(scores, positive, valid))


def candidate_label_metrics(
    features: np.ndarray,
    query_rows: Sequence[int],
    positive_rows: Sequence[np.ndarray],
    negative_rows: Sequence[np.ndarray],
    categories: Optional[Sequence[str]] = None,
    pearson: bool = True,
) -> dict[str, Any]:
    """All §9 metrics for candidate lists in this process: rows index ``features`` (N, d); ``categories``
    (Q,) is each query's category (default "all"). kNN is None (no classes)."""
    feats = pearson_normalise(features) if pearson else np.asarray(features, dtype=np.float32)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    cats = np.asarray(["all"] * len(query_rows) if categories is None else categories)
    parts = {}
    for cat in sorted(set(cats.tolist())):
        sel = np.flatnonzero(cats == cat)
        ids, positive, valid = pad_candidates([positive_rows[i] for i in sel], [negative_rows[i] for i in sel])
        scores = candidate_scores(feats[query_rows[sel]], feats, ids)
        parts[cat] = candidate_partial(scores, positive, valid)
    return summarise_categories(parts)


# ---------------------------------------------------------------------------------------------
# Tables


TABLE_COLUMNS = (
    ("AUC", "auc"),
    ("AUC mean-ROC", "auc_mean_roc"),
    ("kNN", "knn"),
    ("mAP", "map"),
    ("queries", "n_queries"),
    ("skipped", "skipped_queries"),
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


def format_metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text comparison table: one row per name (a round, a baseline, a category), columns AUC (mean
    per-query), AUC mean-ROC (the Olympic figure), kNN accuracy, mAP, queries, skipped; "-" where absent."""
    header = ["", *(title for title, _ in TABLE_COLUMNS)]
    body = [[str(name), *(_cell(m.get(key)) for _, key in TABLE_COLUMNS)] for name, m in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = []
    for j, row in enumerate([header, *body]):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
