"""Compact cliques (paper Sect. 2.2, docs/method.md#compact-cliques): pure functions over numpy arrays; the Ray layer is
``stages/cliques.py``.

The pipeline for one category, on frames indexed locally 0..n-1:

1. ``seed_clique`` — around each seed frame, complete-linkage agglomerative clustering of
   {seed} ∪ its ``neighbourhood`` nearest frames on the distance 1 − s (s = φ_iᵀφ_j); the clique is the
   dendrogram cluster holding the seed, grown merge by merge while the complete-linkage distance stays
   ≤ 1 − ``min_sim`` (so every pair is at least ``min_sim`` similar; ``min_sim`` = −1 cuts by size only)
   and the size, counted after the per-video cap, stays ≤ ``target_size``; at most ``max_per_video``
   frames of one video (the later-joined ones beyond the cap are dropped, the seed is kept; counting after
   the cap lets a clique reach frames of other videos beyond a shot's near-duplicates).
   ``seed_cliques`` does a chunk of seeds (one Ray task).
2. ``merge_cliques`` — identical cliques are collapsed, then overlapping cliques are merged by
   farthest-neighbour (complete-linkage) agglomeration of cliques: the pair with the smallest
   d(A, B) = 1 − min_{i∈A, j∈B} s_ij merges first. Candidate pairs come from shared frames only (never
   all pairs): for each frame f, every clique holding f is paired with f's *anchor* clique (the clique
   seeded at f, else the lowest-numbered clique holding f) — a star per frame, so the candidate graph
   has at most Σ|clique| edges yet connects every group of overlapping cliques; a merged clique inherits
   its constituents' candidates. A merge is refused (the pair is dropped, other merges go on) when
   (a) the paper's stop rule fails: compactness(A ∪ B) < ½ · ½(compactness(A) + compactness(B)), i.e.
       below half the unweighted mean of the two constituents' compactness;
   (b) the union, after the per-video cap, has more than ``max_size`` frames (``max_size`` ≤ 0: no limit;
       checked first, from video counts alone, and pairs failing it are pruned as soon as they appear —
       safe because that capped size never shrinks as cliques grow);
   and agglomeration ends when the smallest candidate distance exceeds 1 − ``min_sim``, so merged
   cliques keep the complete-linkage property (every pair ≥ ``min_sim``). Where a union holds more than
   ``max_per_video`` frames of one video, the frames of that video least similar to the union's mean
   are dropped.
3. ``select_cliques`` — K of the cliques of at least ``min_size`` frames. ``selection = "spread"``
   (default): the cliques are grouped into K groups by spherical k-means of their mean features and the
   most compact clique of each group is taken, so the K cliques spread over the whole data rather than
   piling up in its densest mode (where the K most compact cliques would mostly come from one class).
   ``selection = "compact"``: greedy in decreasing
   compactness. Either way a clique is skipped while more than ``max_covered`` of its frames are already
   in chosen cliques; if fewer than K are chosen, the skipped ones fill up in the same order.
4. ``clique_similarity`` — S'_ab = mean_{i∈a, j∈b} φ_iᵀφ_j = m_aᵀm_b with m_a the clique's mean feature
   (O(K·d), never a frame-by-frame matrix). The diagonal S'_aa = ‖m_a‖² is the mean over all pairs of a
   *including* self-pairs, so S' = M Mᵀ is a Gram matrix (PSD up to rounding); ``project_psd`` zeroes
   negative eigenvalues and projects back (docs/method.md#clique-similarity) as a guard.

Compactness = mean pairwise similarity over distinct pairs (self-pairs excluded):
(‖Σ_i φ_i‖² − Σ_i ‖φ_i‖²) / (m(m − 1)); a single frame has compactness 1.
A clique is an int64 array of frame indices; a seed clique starts with its seed.
"""
from __future__ import annotations

import heapq
import zlib
from collections import Counter
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from .config import CliquesConfig


class CliqueError(ValueError):
    """Cliques cannot be built for a category; the message names the category and the numbers."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def compactness(features: np.ndarray) -> float:
    """Mean pairwise similarity of the rows of ``features`` (m, d), self-pairs excluded; 1.0 for m = 1."""
    m = len(features)
    if m < 2:
        return 1.0
    total = features.sum(axis=0, dtype=np.float64)
    norms = np.einsum("ij,ij->", features, features, dtype=np.float64)
    return float((total @ total - norms) / (m * (m - 1)))


def cap_per_video(order: np.ndarray, video_ids: np.ndarray, cap: int) -> np.ndarray:
    """Keep, in order, at most ``cap`` entries of each video: ``order`` (m,) positions, ``video_ids``
    indexed by those positions. ``cap`` ≤ 0: no cap. Returns the kept positions in their order."""
    if cap <= 0 or len(order) <= cap:
        return order
    videos = video_ids[order]
    # rank of each entry among the earlier entries of its video (stable: first come, first kept)
    sort = np.argsort(videos, kind="stable")
    sorted_videos = videos[sort]
    starts = np.r_[0, np.flatnonzero(sorted_videos[1:] != sorted_videos[:-1]) + 1]
    rank_sorted = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[sort] = rank_sorted
    return order[rank < cap]


def _cut_distance(cfg: CliquesConfig) -> float:
    """Complete-linkage cut on the distance 1 − s (a small slack absorbs float32 rounding)."""
    return 1.0 - cfg.min_sim + 1e-6


def _single_thread_blas():
    """The clique math is many tiny GEMMs, where a multi-threaded BLAS only adds overhead (and thrashes
    on a loaded machine): run it on one thread. Ray workers already get one thread per CPU they ask."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------------------
# 1. Seed cliques


def seed_clique(
    seed: int,
    neighbourhood_ids: np.ndarray,
    features: np.ndarray,
    video_ids: np.ndarray,
    cfg: CliquesConfig,
) -> np.ndarray:
    """The compact clique around one seed, by complete linkage of {seed} ∪ its neighbourhood.

    Args:
        seed: id of the seed frame.
        neighbourhood_ids: (k,) ids of its nearest frames, most similar first; entries < 0 (padding) and
            the seed itself are ignored, and only the first ``cfg.neighbourhood`` valid ones are used.
        features: (1 + k, d) L2-normalised φ of [seed, *neighbourhood_ids] (row 0 is the seed).
        video_ids: (1 + k,) video of each of those rows (any comparable values).
        cfg: ``min_sim``, ``target_size``, ``max_per_video``, ``neighbourhood``.

    Returns:
        (m,) int64 ids, the seed first, then the others in the order they joined the seed's cluster
        (within one dendrogram merge: by similarity to the seed). 1 ≤ m ≤ max(1, target_size).
    """
    neighbourhood_ids = np.asarray(neighbourhood_ids, dtype=np.int64)
    if len(features) != len(neighbourhood_ids) + 1 or len(video_ids) != len(features):
        raise ValueError(
            f"seed_clique(seed={seed}): features has {len(features)} rows and video_ids {len(video_ids)}, "
            f"expected 1 + {len(neighbourhood_ids)} (seed + neighbourhood)"
        )
    valid = (neighbourhood_ids >= 0) & (neighbourhood_ids != seed)
    _, first = np.unique(neighbourhood_ids, return_index=True)
    unique = np.zeros(len(neighbourhood_ids), dtype=bool)
    unique[first] = True
    keep = np.flatnonzero(valid & unique)[: max(cfg.neighbourhood, 0)]
    rows = np.r_[0, keep + 1]
    ids = np.r_[np.int64(seed), neighbourhood_ids[keep]]
    feats = np.asarray(features, dtype=np.float64)[rows]
    videos = np.asarray(video_ids)[rows]
    n = len(ids)
    if n == 1 or cfg.target_size <= 1:
        return ids[:1]

    sims = feats @ feats.T
    dist = 1.0 - (sims + sims.T) / 2
    np.fill_diagonal(dist, 0.0)
    np.clip(dist, 0.0, 2.0, out=dist)
    merges = linkage(squareform(dist, checks=False), method="complete")
    cut = _cut_distance(cfg)

    leaves: list[list[int]] = [[i] for i in range(n)]
    members = np.array([0], dtype=np.int64)  # positions in ids, join order
    cluster = 0  # dendrogram id of the cluster holding the seed
    for step, (a, b, height, _) in enumerate(merges):
        a, b = int(a), int(b)
        leaves.append(leaves[a] + leaves[b])
        if cluster not in (a, b):
            continue
        if height > cut:  # complete-linkage heights only grow: no later merge can pass the cut
            break
        other = np.asarray(leaves[b if a == cluster else a], dtype=np.int64)
        other = other[np.argsort(-sims[0, other], kind="stable")]
        grown = cap_per_video(np.r_[members, other], videos, cfg.max_per_video)
        if len(grown) > cfg.target_size:
            break
        members, cluster = grown, n + step
    return ids[members]


def seed_cliques(
    seeds: np.ndarray,
    nn_ids: np.ndarray,
    features: np.ndarray,
    video_ids: np.ndarray,
    cfg: CliquesConfig,
) -> list[np.ndarray]:
    """``seed_clique`` for a chunk of seeds (the unit of one Ray task), on locally indexed frames.

    Args:
        seeds: (s,) indices of the seed frames.
        nn_ids: (n, k) nearest-neighbour indices of every frame, most similar first; −1 pads.
        features: (n, d) L2-normalised φ.
        video_ids: (n,) video of each frame (e.g. integer codes).
        cfg: the cliques config.

    Returns:
        s cliques, each an int64 array of frame indices starting with its seed.
    """
    out = []
    with _single_thread_blas():
        for seed in np.asarray(seeds, dtype=np.int64):
            nbrs = nn_ids[seed]
            nbrs = nbrs[(nbrs >= 0) & (nbrs != seed)][: cfg.neighbourhood]
            rows = np.r_[seed, nbrs]
            out.append(seed_clique(int(seed), nbrs, features[rows], video_ids[rows], cfg))
    return out


# ---------------------------------------------------------------------------------------------
# 2. Merging overlapping cliques (farthest-neighbour clustering of cliques)


def dedupe_cliques(cliques: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Collapse cliques with the same frame set. Returns (unique cliques in first-seen order, each keeping
    the frame order of its first occurrence; (len(cliques),) index of each input's unique clique)."""
    seen: dict[bytes, int] = {}
    unique: list[np.ndarray] = []
    which = np.empty(len(cliques), dtype=np.int64)
    for i, c in enumerate(cliques):
        key = np.sort(np.asarray(c, dtype=np.int64)).tobytes()
        j = seen.get(key)
        if j is None:
            j = seen[key] = len(unique)
            unique.append(np.asarray(c, dtype=np.int64))
        which[i] = j
    return unique, which


def candidate_pairs(cliques: Sequence[np.ndarray], seeds: Optional[np.ndarray] = None) -> np.ndarray:
    """Pairs of overlapping cliques to consider for merging, at most Σ|clique| of them.

    For each frame f, every clique holding f is paired with f's anchor clique: a clique whose seed is f
    (``seeds`` (M,) frame of each clique; default each clique's first frame) if it holds f, else the
    lowest-numbered clique holding f. Returns (P, 2) int64 pairs (a < b), sorted, unique.
    """
    if len(cliques) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    sizes = np.array([len(c) for c in cliques])
    frames = np.concatenate([np.asarray(c, dtype=np.int64) for c in cliques])
    owner = np.repeat(np.arange(len(cliques)), sizes)
    seeds = np.array([c[0] for c in cliques], dtype=np.int64) if seeds is None else np.asarray(seeds, np.int64)
    uniq, inverse = np.unique(frames, return_inverse=True)
    anchor = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(anchor, inverse, owner)
    seeded = frames == seeds[owner]  # membership (f, a) where a is seeded at f
    seeded_anchor = np.full(len(uniq), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(seeded_anchor, inverse[seeded], owner[seeded])
    anchor = np.where(seeded_anchor < np.iinfo(np.int64).max, seeded_anchor, anchor)
    other = anchor[inverse]
    keep = other != owner
    pairs = np.stack([np.minimum(owner, other)[keep], np.maximum(owner, other)[keep]], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else np.zeros((0, 2), dtype=np.int64)


def _linkage_distances(pairs: np.ndarray, cliques: Sequence[np.ndarray], features: np.ndarray) -> np.ndarray:
    """Complete-linkage distance 1 − min_{i∈a, j∈b} s_ij for each pair (P, 2); one GEMM per clique a."""
    out = np.empty(len(pairs), dtype=np.float64)
    if not len(pairs):
        return out
    starts = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    starts = np.concatenate(([0], starts, [len(pairs)])).tolist()
    firsts, seconds = pairs[:, 0].tolist(), pairs[:, 1].tolist()
    for lo, hi in zip(starts[:-1], starts[1:]):
        parts = [cliques[b] for b in seconds[lo:hi]]
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        sims = features[cliques[firsts[lo]]] @ features[np.concatenate(parts)].T
        out[lo:hi] = 1.0 - np.minimum.reduceat(sims.min(axis=0), offsets)
    return out


def merge_cliques(
    cliques: Sequence[np.ndarray],
    features: np.ndarray,
    video_ids: np.ndarray,
    cfg: CliquesConfig,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Collapse duplicates, then merge overlapping cliques by complete-linkage clustering of cliques with
    the paper's stop rule (see the module docstring for the exact rules).

    Args:
        cliques: seed cliques, int64 arrays of frame indices, each starting with its seed.
        features: (n, d) L2-normalised φ of all frames the cliques index.
        video_ids: (n,) video of each frame.
        cfg: ``min_sim``, ``max_size``, ``max_per_video``.

    Returns:
        (cliques, compactness): merged cliques as sorted int64 arrays, in a deterministic order
        (surviving inputs first, by first occurrence, then merged ones in merge order), and (M,) float64.
    """
    with _single_thread_blas():
        return _merge_cliques(cliques, features, video_ids, cfg)


def _merge_cliques(cliques, features, video_ids, cfg):
    unique, _ = dedupe_cliques(cliques)
    features = np.asarray(features, dtype=np.float32)
    video_ids = np.asarray(video_ids)
    videos = video_ids.tolist()
    cap, max_size = cfg.max_per_video, cfg.max_size

    def capped_size(frames: set) -> int:
        if cap <= 0:
            return len(frames)
        return sum(min(c, cap) for c in Counter(map(videos.__getitem__, frames)).values())

    def too_big(a: int, b: int) -> bool:
        if max_size <= 0:
            return False
        union = sets[a] | sets[b]
        return len(union) > max_size and capped_size(union) > max_size  # the cap only shrinks the union

    members: list[np.ndarray] = [np.asarray(c, dtype=np.int64) for c in unique]
    sets: list[set] = [set(c.tolist()) for c in members]
    comp = [compactness(features[c]) for c in members]
    alive = [True] * len(members)
    pairs = candidate_pairs(members)
    pairs = pairs[[not too_big(a, b) for a, b in pairs.tolist()]] if len(pairs) else pairs
    dists = _linkage_distances(pairs, members, features)
    nbrs: list[dict[int, float]] = [dict() for _ in members]
    heap: list[tuple[float, int, int]] = []
    for (a, b), d in zip(pairs.tolist(), dists.tolist()):
        nbrs[a][b] = d
        nbrs[b][a] = d
        heap.append((d, a, b))
    heapq.heapify(heap)
    cut = _cut_distance(cfg)

    while heap:
        d, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or nbrs[a].get(b) != d:
            continue  # stale entry: a constituent merged, or the pair was refused
        if d > cut:
            break  # every remaining candidate is farther: complete linkage stops at the cut
        union = np.fromiter(sorted(sets[a] | sets[b]), dtype=np.int64)
        capped = union
        if cap > 0 and capped_size(sets[a] | sets[b]) < len(union):
            # keep, per video, the frames most similar to the union's mean
            mean = features[union].mean(axis=0)
            order = np.argsort(-(features[union] @ mean), kind="stable")
            capped = np.sort(union[cap_per_video(order, video_ids[union], cap)])
        merged_comp = compactness(features[capped])
        if merged_comp < 0.5 * 0.5 * (comp[a] + comp[b]):  # paper Sect. 2.2 stop rule
            del nbrs[a][b], nbrs[b][a]
            continue
        u = len(members)
        members.append(capped)
        sets.append(set(capped.tolist()))
        comp.append(merged_comp)
        alive[a] = alive[b] = False
        alive.append(True)
        nbrs.append({})
        others = [c for c in sorted((set(nbrs[a]) | set(nbrs[b])) - {a, b}) if alive[c] and not too_big(u, c)]
        unknown = []
        for c in others:
            da, db = nbrs[a].get(c), nbrs[b].get(c)
            if len(capped) == len(union) and da is not None and db is not None:
                nbrs[u][c] = max(da, db)  # Lance–Williams for complete linkage
            else:
                unknown.append(c)
        if unknown:
            new = _linkage_distances(np.array([[u, c] for c in unknown], dtype=np.int64), members, features)
            nbrs[u].update(zip(unknown, new.tolist()))
        for c in others:
            nbrs[c][u] = nbrs[u][c]
            heapq.heappush(heap, (nbrs[u][c], c, u))
        for old in (a, b):
            for c in nbrs[old]:
                nbrs[c].pop(old, None)
            nbrs[old].clear()

    keep = [i for i, ok in enumerate(alive) if ok]
    return [np.sort(members[i]) for i in keep], np.asarray([comp[i] for i in keep], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# 3. Selection


def select_cliques(
    cliques: Sequence[np.ndarray],
    compactness_: np.ndarray,
    num_cliques: int,
    min_size: int,
    max_covered: float = 0.5,
    groups: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Indices of K cliques of ≥ ``min_size`` frames: the most compact, preferring coverage.

    Greedy in decreasing compactness (ties: lower index first): a clique is taken unless more than
    ``max_covered`` of its frames are already in taken cliques; when fewer than K are taken, the skipped
    eligible cliques fill up in the same order. With ``groups`` (one group id per clique, −1 = none),
    at most one clique per group is taken in that pass (the most compact acceptable one), so the
    selection spreads over the groups. Returns (≤ K,) int64 indices in selection order.
    """
    sizes = np.array([len(c) for c in cliques], dtype=np.int64)
    eligible = np.flatnonzero(sizes >= min_size)
    order = eligible[np.lexsort((eligible, -np.asarray(compactness_)[eligible]))]
    covered: set[int] = set()
    taken_groups: set[int] = set()
    chosen, skipped = [], []
    for i in order:
        if len(chosen) == num_cliques:
            break
        frames = cliques[i].tolist()
        group = -1 if groups is None else int(groups[i])
        if group in taken_groups or sum(f in covered for f in frames) > max_covered * len(frames):
            skipped.append(i)
            continue
        chosen.append(i)
        covered.update(frames)
        if group >= 0:
            taken_groups.add(group)
    chosen += skipped[: max(num_cliques - len(chosen), 0)]
    return np.asarray(chosen, dtype=np.int64)


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Group the rows of ``x`` (n, d) into ≤ k groups by cosine similarity (spherical k-means: centres are
    normalised means, each row joins its most similar centre); seeded start from k distinct rows; stops
    when no row changes group. Returns (n,) int64 group ids in 0..k−1."""
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, n)
    rows = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    start = np.random.default_rng(seed).choice(n, size=k, replace=False)
    centres = rows[torch.from_numpy(start)].clone()
    assign = None
    for _ in range(iters):
        new = torch.cat([(rows[s : s + 8192] @ centres.T).argmax(1) for s in range(0, n, 8192)])
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, rows)
        filled = torch.bincount(assign, minlength=k) > 0  # an empty group keeps its centre
        centres[filled] = sums[filled] / sums[filled].norm(dim=1, keepdim=True).clamp_min(1e-12)
    return assign.numpy().astype(np.int64)


def spread_groups(
    cliques: Sequence[np.ndarray], features: np.ndarray, num_groups: int, min_size: int, seed: int = 0
) -> np.ndarray:
    """Group ids for ``select_cliques``: spherical k-means of the eligible cliques' mean features into
    ``num_groups`` groups (−1 for cliques under ``min_size``). Means are O(#cliques · d), never per pair."""
    groups = np.full(len(cliques), -1, dtype=np.int64)
    eligible = np.flatnonzero(np.array([len(c) for c in cliques], dtype=np.int64) >= min_size)
    if len(eligible):
        means = np.stack([np.asarray(features[cliques[i]], dtype=np.float32).mean(axis=0) for i in eligible])
        groups[eligible] = spherical_kmeans(means, num_groups, seed)
    return groups


# ---------------------------------------------------------------------------------------------
# 4. Clique similarity S'


def clique_similarity(cliques: Sequence[np.ndarray], features: np.ndarray) -> np.ndarray:
    """S' (K, K): mean pairwise sample similarity between cliques, S'_ab = mean_{i∈a, j∈b} φ_iᵀφ_j
    = m_aᵀm_b with m_a the mean φ of clique a (paper Sect. 2.3). The diagonal is the mean over all pairs
    of a clique including self-pairs (‖m_a‖²), so S' = M Mᵀ. float64."""
    means = np.stack([np.asarray(features[c], dtype=np.float64).mean(axis=0) for c in cliques])
    return means @ means.T


def project_psd(sim: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Nearest PSD matrix (Frobenius) of the symmetric part of ``sim`` (K, K): negative eigenvalues
    zeroed and projected back (docs/method.md#clique-similarity). A matrix whose eigenvalues are all
    ≥ −tol·max|λ| is returned unchanged (symmetrised)."""
    sym = (np.asarray(sim, dtype=np.float64) + np.asarray(sim, dtype=np.float64).T) / 2
    if not len(sym):
        return sym
    vals, vecs = np.linalg.eigh(sym)
    scale = max(np.abs(vals).max(), 1e-300)
    if vals.min() >= -tol * scale:
        return sym
    out = (vecs * np.clip(vals, 0.0, None)) @ vecs.T
    return (out + out.T) / 2


# ---------------------------------------------------------------------------------------------
# The whole category, in one process (the reference the Ray stage must equal)


def choose_seeds(n: int, max_seeds: int, rng_seed) -> np.ndarray:
    """Seed frames (sorted local indices): all n frames, or a seeded random subset of ``max_seeds``.
    Seeds come from the data alone — never from evaluation labels (docs/evaluation.md#what-training-never-reads)."""
    if max_seeds <= 0 or max_seeds >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(rng_seed).choice(n, size=max_seeds, replace=False)).astype(np.int64)


def finish_category(
    seed_cliques_: Sequence[np.ndarray],
    features: np.ndarray,
    video_ids: np.ndarray,
    cfg: CliquesConfig,
    category: str = "",
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Merge, select (``cfg.selection``; ``seed`` seeds the spread grouping) and compare the cliques of
    one category.

    Returns (cliques K × sorted int64 local indices, in decreasing compactness; compactness (K,);
    S' (K, K) float64 after ``project_psd``). Raises CliqueError when no clique has ``min_size`` frames.
    """
    merged, comp = merge_cliques(seed_cliques_, features, video_ids, cfg)
    if cfg.selection not in ("spread", "compact"):
        raise ValueError(f"cliques.selection: unknown rule '{cfg.selection}' (spread or compact)")
    groups = None
    if cfg.selection == "spread":
        category_seed = [seed, zlib.crc32(category.encode())]
        groups = spread_groups(merged, features, cfg.num_cliques, cfg.min_size, seed=category_seed)
    chosen = select_cliques(merged, comp, cfg.num_cliques, cfg.min_size, cfg.max_covered, groups)
    if not len(chosen):
        largest = max((len(c) for c in merged), default=0)
        raise CliqueError(
            f"category {category!r}: none of its {len(merged)} cliques (from {len(seed_cliques_)} seeds over "
            f"{len(features)} frames) has min_size={cfg.min_size} frames (largest {largest}); lower "
            f"cliques.min_size or cliques.min_sim, or raise cliques.neighbourhood / max_per_video"
        )
    chosen = chosen[np.lexsort((chosen, -comp[chosen]))]  # most compact first, stable clique order
    cliques = [merged[i] for i in chosen]
    return cliques, comp[chosen], project_psd(clique_similarity(cliques, features))


def build_cliques(
    nn_ids: np.ndarray,
    features: np.ndarray,
    video_ids: np.ndarray,
    cfg: CliquesConfig,
    seeds: Optional[np.ndarray] = None,
    category: str = "",
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One category end to end in one process: seed cliques for ``seeds`` (default every frame),
    then ``finish_category``. ``nn_ids`` (n, k) local indices (−1 pads), ``features`` (n, d),
    ``video_ids`` (n,)."""
    n = len(features)
    if n < cfg.min_size:
        raise CliqueError(f"category {category!r} has {n} frames, fewer than cliques.min_size={cfg.min_size}")
    seeds = np.arange(n) if seeds is None else seeds
    return finish_category(seed_cliques(seeds, nn_ids, features, video_ids, cfg), features, video_ids, cfg, category,
                           seed)


def category_stats(cliques: Sequence[np.ndarray], comp: np.ndarray, video_ids: np.ndarray) -> dict:
    """Stats for the log line: cliques, mean size, mean compactness, frames covered, share of cliques
    whose frames all come from one video."""
    sizes = np.array([len(c) for c in cliques], dtype=np.float64)
    pure = [len(np.unique(video_ids[c])) == 1 for c in cliques]
    covered = len(np.unique(np.concatenate(cliques))) if cliques else 0
    return {
        "cliques": len(cliques),
        "mean_size": round(float(sizes.mean()), 3) if len(sizes) else 0.0,
        "mean_compactness": round(float(np.mean(comp)), 4) if len(comp) else 0.0,
        "frames_covered": int(covered),
        "video_pure_fraction": round(float(np.mean(pure)), 4) if pure else 0.0,
    }
