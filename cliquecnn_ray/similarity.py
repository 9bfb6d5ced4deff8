"""The similarity engine (docs/method.md#neighbours): tiles of S = Φ_R Φ_Cᵀ, never the whole N×N matrix.

Per frame the engine keeps only the extremes of its similarity distribution, the k most and the k least
similar frames (paper Fig. 4b: only those are trusted). A row block of frames walks the database in
column tiles: one GEMM per tile, then a running top-k / bottom-k merged tile by tile, so memory is
O(R·(k + col_block)) whatever N is. Blocks are independent (the Ray layer, ``stages/neighbours.py``,
runs one task per row block); ``merge_extremes`` is the pure reduce should columns be sharded too.

Local Temporal Pooling (Eq. 9, docs/method.md#local-temporal-pooling) is a feature transform, ``ltp_stack``:
the inner product of stacked temporal windows is the pooled similarity, so LTP goes through this same engine.

Pure functions over numpy / torch arrays; no Ray here.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pyarrow as pa
import torch

from . import schema


def pearson_normalise(features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(N, d) → (N, d) float32 of the same kind (numpy or torch), each vector minus its own mean over d,
    then L2-normalised: φ_i·φ_j is then the Pearson correlation of the raw vectors (paper Sect. 2.4:
    "correlation on the learned feature representation"). A constant vector becomes 0 (its correlation is
    undefined)."""
    is_tensor = isinstance(features, torch.Tensor)
    x = torch.as_tensor(features if is_tensor else np.asarray(features), dtype=torch.float64)
    x = x - x.mean(dim=1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    x = torch.where(norm > 1e-12, x / norm.clamp_min(1e-12), torch.zeros_like(x)).to(torch.float32)
    return x if is_tensor else x.numpy()


def similarity_tile(rows: np.ndarray | torch.Tensor, cols: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One tile of similarities: (R, d) × (C, d) → (R, C) = rows @ colsᵀ, fp32 (one GEMM)."""
    rows = torch.as_tensor(rows, dtype=torch.float32)
    cols = torch.as_tensor(cols, dtype=torch.float32)
    return rows @ cols.T


def iter_similarity_blocks(
    queries: np.ndarray, database: np.ndarray, row_block: int = 1024
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (row offset, S block (R, N_db)) for consecutive row blocks of queries (R ≤ row_block).

    Memory is O(row_block · N_db); used where whole rows are needed (per-query ROC AUC, AP).
    """
    db = torch.as_tensor(np.ascontiguousarray(database), dtype=torch.float32)
    for start in range(0, len(queries), row_block):
        yield start, similarity_tile(queries[start : start + row_block], db)


# ---------------------------------------------------------------------------------------------
# Extremes: the k nearest and k farthest of each row


class Extremes(NamedTuple):
    """The k most and k least similar database items of R rows (numpy arrays, picklable for Ray).

    nn_ids (R, k) int64 and nn_sims (R, k) float32, descending; far_ids (R, k) int64 and far_sims (R, k)
    float32, ascending. Self is never included. Partial results (``tile_extremes``) may pad rows that
    have fewer than k candidates with id −1 and sim −inf (nn) / +inf (far); padding sorts last, so
    ``merge_extremes`` drops it as soon as real candidates arrive. ``block_extremes`` never pads: it
    returns k_eff = min(k, candidates of its poorest row) columns (N − 1 when every row is in the database).
    """

    nn_ids: np.ndarray
    nn_sims: np.ndarray
    far_ids: np.ndarray
    far_sims: np.ndarray

    @property
    def k(self) -> int:
        return int(self.nn_ids.shape[1])

    def __len__(self) -> int:  # rows, not tuple fields: Extremes is a table of rows
        return int(self.nn_ids.shape[0])


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor view of ``x`` without a copy where possible. Arrays shared through Ray's object store are
    read-only; the engine never writes to its inputs, so torch's not-writable warning is noise."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == dtype else x.to(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)


def _to_numpy(x: torch.Tensor, dtype) -> np.ndarray:
    return x.detach().to("cpu").numpy().astype(dtype, copy=False)


def _self_columns(row_ids: np.ndarray, col_ids: np.ndarray) -> np.ndarray:
    """(R,) position in ``col_ids`` of each row's own id, −1 where absent (a sorted lookup, no R×C)."""
    if len(col_ids) == 0:
        return np.full(len(row_ids), -1, dtype=np.int64)
    order = np.argsort(col_ids, kind="stable")
    at = np.minimum(np.searchsorted(col_ids[order], row_ids), len(order) - 1)
    return np.where(col_ids[order[at]] == row_ids, order[at], -1).astype(np.int64)


def tile_extremes(
    sims: np.ndarray | torch.Tensor,
    col_ids: np.ndarray,
    k: int,
    row_ids: Optional[np.ndarray] = None,
) -> Extremes:
    """Top-k and bottom-k of one tile of similarities, self excluded.

    Args:
        sims: (R, C) similarities of R rows to C columns.
        col_ids: (C,) global ids of the columns.
        k: how many extremes per side; the result has min(k, C) columns, rows with fewer candidates
            (their own id among the columns) padded with id −1, sim ∓inf.
        row_ids: (R,) global ids of the rows; a column whose id equals its row's id is excluded.
            None: nothing excluded.
    """
    s = _as_tensor(sims).float().clone()
    col_ids = np.asarray(col_ids, dtype=np.int64)
    r, c = s.shape
    kk = min(int(k), c)
    ids_t = torch.as_tensor(col_ids)
    self_rows = self_cols = None
    if row_ids is not None:
        pos = _self_columns(np.asarray(row_ids, dtype=np.int64), col_ids)
        self_rows = torch.as_tensor(np.flatnonzero(pos >= 0))
        self_cols = torch.as_tensor(pos[pos >= 0])
    sides = []
    for largest, pad in ((True, -math.inf), (False, math.inf)):
        if self_rows is not None:
            s[self_rows, self_cols] = pad
        top = torch.topk(s, kk, dim=1, largest=largest, sorted=True)
        ids = ids_t[top.indices]
        ids = torch.where(top.values == pad, torch.full_like(ids, -1), ids)  # self: padding, not a neighbour
        sides.append((_to_numpy(ids, np.int64), _to_numpy(top.values, np.float32)))
    return Extremes(sides[0][0], sides[0][1], sides[1][0], sides[1][1])


def merge_extremes(a: Extremes, b: Extremes, k: int) -> Extremes:
    """Merge two partial results for the same R rows (over disjoint column sets) into the best k."""
    if len(a) != len(b):
        raise ValueError(f"merge_extremes: partial results cover {len(a)} and {len(b)} rows")
    kk = min(int(k), a.k + b.k)
    out = []
    for ids_a, sims_a, ids_b, sims_b, largest in (
        (a.nn_ids, a.nn_sims, b.nn_ids, b.nn_sims, True),
        (a.far_ids, a.far_sims, b.far_ids, b.far_sims, False),
    ):
        sims = torch.as_tensor(np.concatenate([sims_a, sims_b], axis=1).astype(np.float32))
        ids = np.concatenate([ids_a, ids_b], axis=1).astype(np.int64)
        top = torch.topk(sims, kk, dim=1, largest=largest, sorted=True)
        idx = top.indices.numpy()
        out += [np.take_along_axis(ids, idx, axis=1), top.values.numpy()]
    return Extremes(*out)


# Selection without ranking whole tiles. The columns of a tile are split into groups of GROUP neighbouring
# columns; one vectorised max (min) per tile finds the few groups that can hold a new top-k (bottom-k)
# entry: an element better than the running k-th lies in a group whose max beats it, and the k groups with
# the best maxima hold the k best elements. The chosen groups' values are screened the same way once more
# in sub-groups of SUBGROUP, and only the k best sub-groups are ranked. So each side reads the whole tile
# once at memory speed, then ranks ~C/32 + 4k + 8k values per row instead of C: far cheaper than torch.topk
# over the whole tile (the engine's cost against its GEMM: benchmarks/results/similarity_engine.json, gemm_ratio).
GROUP = 32  # columns per group: a max over 32 contiguous floats vectorises well (smaller groups are slower)
SUBGROUP = 8  # second screen: 4k sub-group maxima and 8k values ranked instead of 32k values


@contextlib.contextmanager
def _one_thread():
    """Run the selection on one CPU thread, the GEMM on all. The selection is many small ops on (R, ≤k·GROUP)
    arrays; each multi-threaded op pays an OpenMP wake-up, which on a busy machine costs far more than the
    op itself. Process-wide; restored on exit."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _choose(values: torch.Tensor, m: int, largest: bool) -> torch.Tensor:
    """(R, n) → (R, m) indices of each row's m largest (smallest) values, unordered."""
    return torch.topk(values, m, dim=1, largest=largest, sorted=False).indices


def _gather_groups(groups3: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """groups3 (R, G, S) contiguous, chosen (R, m) group indices → (R, m, S) their values (one memcpy-like
    index_select over rows of S floats; advanced indexing / gather are much slower on CPU)."""
    r, n_groups, size = groups3.shape
    rows = torch.arange(r, device=chosen.device).unsqueeze(1) * n_groups
    return groups3.reshape(r * n_groups, size).index_select(0, (chosen + rows).reshape(-1)).view(r, -1, size)


class _Running:
    """The running k best of one side (largest or smallest) for R rows, merged tile by tile (unsorted)."""

    def __init__(self, r: int, k: int, largest: bool, device: torch.device):
        self.largest = largest
        self.k = k
        self.vals: Optional[torch.Tensor] = None  # (R, ≤k) float32, None before the first tile
        self.pos: Optional[torch.Tensor] = None  # (R, ≤k) int64 global database positions

    def update(self, groups3: torch.Tensor, col0: int) -> None:
        """Merge one tile viewed as (R, G, GROUP): tile column g·GROUP + t is groups3[:, g, t]."""
        r, n_groups, size = groups3.shape
        largest, k = self.largest, self.k
        ext = groups3.amax(dim=2) if largest else groups3.amin(dim=2)  # (R, G) group extremes
        m = min(k, n_groups)
        if self.vals is not None and self.vals.shape[1] == k:  # only groups beating the k-th can matter
            kth = self.vals.amin(dim=1, keepdim=True) if largest else self.vals.amax(dim=1, keepdim=True)
            m = min(m, int((ext > kth if largest else ext < kth).sum(dim=1).max()))
            if m == 0:
                return
        chosen = _choose(ext, m, largest)  # (R, m) groups
        cand = _gather_groups(groups3, chosen)  # (R, m, GROUP)
        # Second screen: sub-groups of SUBGROUP columns inside the chosen groups.
        per = size // SUBGROUP
        sub3 = cand.view(r, m * per, SUBGROUP)
        sub_ext = sub3.amax(dim=2) if largest else sub3.amin(dim=2)
        sub_chosen = _choose(sub_ext, min(k, m * per), largest)  # (R, m2) sub-groups
        vals3 = _gather_groups(sub3, sub_chosen)  # (R, m2, SUBGROUP)
        best = torch.topk(vals3.reshape(r, -1), min(k, vals3[0].numel()), dim=1, largest=largest, sorted=False)
        # Candidate j·SUBGROUP + t is column t of sub-group s = sub_chosen[:, j], which is part s % per of
        # group chosen[:, s // per]: tile column chosen·GROUP + (s % per)·SUBGROUP + t.
        s = torch.gather(sub_chosen, 1, best.indices.div(SUBGROUP, rounding_mode="floor"))
        group = torch.gather(chosen, 1, s.div(per, rounding_mode="floor"))
        cols = group.mul_(size).add_(s.remainder_(per).mul_(SUBGROUP)).add_(best.indices.remainder(SUBGROUP))
        cols.add_(col0)
        vals = best.values.float()
        if self.vals is not None:
            vals = torch.cat([self.vals, vals], dim=1)
            cols = torch.cat([self.pos, cols], dim=1)
        if vals.shape[1] > k:
            keep = torch.topk(vals, k, dim=1, largest=largest, sorted=False)
            vals, cols = keep.values, torch.gather(cols, 1, keep.indices)
        self.vals, self.pos = vals, cols

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(vals, positions), (R, k), sorted best first."""
        vals, order = torch.sort(self.vals, dim=1, descending=self.largest, stable=True)
        return vals, torch.gather(self.pos, 1, order)


def block_extremes(
    rows: np.ndarray | torch.Tensor,
    row_ids: np.ndarray,
    database: np.ndarray | torch.Tensor,
    db_ids: np.ndarray,
    k: int,
    col_block: int = 32768,
    tile_rows: int = 1024,
) -> Extremes:
    """The k most and least similar database items of each row, self excluded: the block function.

    Walks the database in tiles of ``tile_rows`` × ``col_block``: one GEMM per tile (S_tile = Φ_R Φ_Cᵀ; fp32
    on CPU, fp16 when the tensors are on a GPU), then a running top-k / bottom-k per row merged tile by
    tile. One tile buffer is reused throughout (first-touching fresh memory costs as much as a GEMM here).
    Memory is O(R·k + tile_rows·col_block); nothing of size R×N is formed.

    Args:
        rows: (R, d) features of the rows (numpy, or a torch tensor on any device).
        row_ids: (R,) their global ids; a database item with the same id (self) is excluded.
        database: (N, d) features of the database (a tensor on the same device as ``rows``, or numpy).
        db_ids: (N,) global ids of the database items; the result holds these ids.
        k: extremes per side; clamped to k_eff = min(k, fewest candidates of any row), i.e. N − 1 when
            the rows are part of the database.
        col_block: columns per tile.
        tile_rows: rows per tile (the rows are walked in sub-blocks of this many).

    Returns:
        Extremes with (R, k_eff) arrays, nn descending and far ascending.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
    db_ids = np.asarray(db_ids, dtype=np.int64).reshape(-1)
    if rows.ndim != 2 or database.ndim != 2:
        raise ValueError(
            f"block_extremes wants 2-D features, got rows {tuple(rows.shape)}, database {tuple(database.shape)}"
        )
    r, d = rows.shape
    n, d_db = database.shape
    if d != d_db:
        raise ValueError(f"block_extremes: rows have d = {d} but the database has d = {d_db} (d mismatch)")
    if len(row_ids) != r or len(db_ids) != n:
        raise ValueError(
            f"block_extremes: {r} rows with {len(row_ids)} ids, {n} database items with {len(db_ids)} ids"
        )
    if k < 0 or col_block < 1 or tile_rows < 1:
        raise ValueError(
            f"block_extremes: k = {k} must be ≥ 0, col_block = {col_block} and tile_rows = {tile_rows} ≥ 1"
        )
    self_pos = _self_columns(row_ids, db_ids)  # (R,) self's database position or −1
    kk = min(int(k), n - int((self_pos >= 0).any())) if r else 0
    if kk <= 0:
        empty_i, empty_f = np.zeros((r, 0), np.int64), np.zeros((r, 0), np.float32)
        return Extremes(empty_i, empty_f, empty_i.copy(), empty_f.copy())

    gpu = isinstance(database, torch.Tensor) and database.device.type != "cpu"
    dtype = torch.float16 if gpu else torch.float32  # half-precision GEMM on a GPU (docs/method.md#neighbours)
    db = _as_tensor(database, dtype)
    device = db.device
    q_all = _as_tensor(rows, dtype).to(device)
    self_all = torch.as_tensor(self_pos, device=device)
    db_ids_t = torch.as_tensor(db_ids, device=device)

    width = min(int(col_block), n)
    height = min(int(tile_rows), r)
    buffer = torch.empty(height * (-(-width // GROUP) * GROUP), dtype=dtype, device=device)  # reused tile
    out = {key: [] for key in Extremes._fields}
    for r0 in range(0, r, height):
        q = q_all[r0 : r0 + height]
        h = len(q)
        self_t = self_all[r0 : r0 + height]
        top = _Running(h, kk, True, device)
        bottom = _Running(h, kk, False, device)
        for c0 in range(0, n, width):
            c1 = min(c0 + width, n)
            cp = -(-(c1 - c0) // GROUP) * GROUP  # the tile padded to whole groups
            tile = buffer[: h * cp].view(h, cp)
            torch.matmul(q, db[c0:c1].T, out=tile[:, : c1 - c0])  # the GEMM, written in place
            groups3 = tile.view(h, cp // GROUP, GROUP)
            with _one_thread():
                srows = torch.nonzero((self_t >= c0) & (self_t < c1)).reshape(-1)  # rows whose self is here
                scols = self_t[srows] - c0
                for side, pad in ((top, -math.inf), (bottom, math.inf)):
                    # Self and the padding columns sit at the wrong end of this side: never chosen.
                    tile[:, c1 - c0 :] = pad
                    tile[srows, scols] = pad
                    side.update(groups3, c0)
        with _one_thread():
            for side, ids_key, sims_key in ((top, "nn_ids", "nn_sims"), (bottom, "far_ids", "far_sims")):
                vals, pos = side.result()
                out[ids_key].append(_to_numpy(db_ids_t[pos], np.int64))
                out[sims_key].append(_to_numpy(vals, np.float32))
    return Extremes(**{key: np.concatenate(parts) for key, parts in out.items()})


def exact_extremes(features: np.ndarray, ids: np.ndarray, k: int) -> Extremes:
    """One-shot reference: the whole (N, N) matrix in float64, self excluded. Tests only (small N)."""
    f = np.asarray(features, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    n = len(f)
    kk = max(0, min(int(k), n - 1))
    s = f @ f.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1, kind="stable")[:, :kk]
    np.fill_diagonal(s, np.inf)
    far = np.argsort(s, axis=1, kind="stable")[:, :kk]
    return Extremes(
        ids[nn],
        np.take_along_axis(s, nn, axis=1).astype(np.float32),
        ids[far],
        np.take_along_axis(s, far, axis=1).astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# The neighbours table


def extremes_to_table(ids: np.ndarray, ext: Extremes) -> pa.Table:
    """(R,) frame ids and their Extremes → a neighbours table (schema.NEIGHBOURS), plain Arrow lists."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) != len(ext):
        raise ValueError(f"extremes_to_table: {len(ids)} ids for {len(ext)} rows of extremes")

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        r, k = values.shape
        offsets = pa.array(np.arange(r + 1, dtype=np.int32) * k)
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))

    return pa.table(
        {
            schema.FRAME_ID: pa.array(ids),
            schema.NN_IDS: lists(ext.nn_ids, pa.int64()),
            schema.NN_SIMS: lists(ext.nn_sims, pa.float32()),
            schema.FAR_IDS: lists(ext.far_ids, pa.int64()),
            schema.FAR_SIMS: lists(ext.far_sims, pa.float32()),
        },
        schema=schema.NEIGHBOURS,
    )


def table_to_extremes(table: pa.Table, source: str = "") -> tuple[np.ndarray, Extremes]:
    """A neighbours table → (ids (R,), Extremes (R, k)) sorted by frame_id. Rows with shorter lists (a
    category smaller than k + 1) are padded with id −1 and sim −inf (nn) / +inf (far)."""
    table = schema.check_columns(table, schema.NEIGHBOURS, "neighbours", source)
    ids = table.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    order = np.argsort(ids, kind="stable")
    out = []
    for col, fill, dtype in (
        (schema.NN_IDS, -1, np.int64),
        (schema.NN_SIMS, -np.inf, np.float32),
        (schema.FAR_IDS, -1, np.int64),
        (schema.FAR_SIMS, np.inf, np.float32),
    ):
        arr = table.column(col).combine_chunks()
        lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        k = int(lengths.max()) if len(lengths) else 0
        values = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype)
        dense = np.full((len(table), k), fill, dtype=dtype)
        rows = np.repeat(np.arange(len(table)), lengths)
        cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        dense[rows, cols] = values
        out.append(dense[order])
    return ids[order], Extremes(*out)


def read_neighbours(stage) -> tuple[np.ndarray, Extremes]:
    """A committed neighbours stage (a ``rundir.StageDir``) → ``table_to_extremes`` of its table."""
    columns = [schema.FRAME_ID, schema.NN_IDS, schema.NN_SIMS, schema.FAR_IDS, schema.FAR_SIMS]
    return table_to_extremes(stage.read_table(columns), source=str(stage))


def anchored_features(features: np.ndarray, round0_features: np.ndarray, weight: float) -> np.ndarray:
    """A later round's features with round 0's beside them, [√(1−w)·φ_r, √w·φ_0], so that the ordinary engine's
    inner product is the mixed similarity (1 − w)·s_r + w·s_0 (docs/method.md#anchored-rounds).

    Args:
        features: (N, d_r) the round's features; round0_features: (N, d_0) round 0's, row for row.
        weight: w in [0, 1]; 0 returns ``features`` unchanged (as float32).
    Returns:
        (N, d_r + d_0) float32 (or (N, d_r) when w = 0).
    """
    feats = np.asarray(features, dtype=np.float32)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"anchored_features: weight must be in [0, 1], got {weight}")
    if weight == 0.0:
        return feats
    base = np.asarray(round0_features, dtype=np.float32)
    if len(base) != len(feats):
        raise ValueError(f"anchored_features: {len(feats)} rows of the round's features, {len(base)} of round 0's")
    return np.concatenate([feats * np.float32(math.sqrt(1.0 - weight)), base * np.float32(math.sqrt(weight))], axis=1)


# ---------------------------------------------------------------------------------------------
# Local Temporal Pooling (Eq. 9)


def ltp_stack(features: np.ndarray, video_ids: np.ndarray, frame_index: np.ndarray, p: int) -> np.ndarray:
    """Stack each frame's temporal window: Φ_k = [φ_{k−p}; …; φ_{k+p}] / √(2p+1)
    (docs/method.md#local-temporal-pooling).

    Then Φ_kᵀΦ_l = 1/(2p+1) Σ_{n=−p..p} φ_{k+n}ᵀ φ_{l+n}, the pooled similarity s' of Eq. 9, and the
    ordinary engine computes it. Neighbours are the adjacent frames of the same video in ``frame_index``
    order (gaps from a stride are fine), clamped at the video's ends (a video shorter than 2p+1 frames
    clamps at both).

    Args:
        features: (N, d) frame features φ.
        video_ids: (N,) video of each frame (strings or ints).
        frame_index: (N,) position of each frame in its video.
        p: temporal radius; 0 returns the features unchanged (as float32).

    Returns:
        (N, (2p+1)·d) float32, rows in the input order.
    """
    feats = np.asarray(features, dtype=np.float32)
    if p < 0:
        raise ValueError(f"ltp_stack: temporal radius p must be ≥ 0, got {p}")
    if p == 0:
        return feats
    n, d = feats.shape
    video_ids = np.asarray(video_ids)
    frame_index = np.asarray(frame_index, dtype=np.int64)
    if len(video_ids) != n or len(frame_index) != n:
        raise ValueError(f"ltp_stack: {n} features, {len(video_ids)} video ids, {len(frame_index)} frame indices")
    if n == 0:
        return np.zeros((0, (2 * p + 1) * d), np.float32)
    _, video = np.unique(video_ids, return_inverse=True)
    order = np.lexsort((frame_index, video))  # by video, then frame_index
    sorted_video, sorted_index = video[order], frame_index[order]
    dup = np.flatnonzero((sorted_video[1:] == sorted_video[:-1]) & (sorted_index[1:] == sorted_index[:-1]))
    if dup.size:
        i = order[dup[0]]
        raise ValueError(f"ltp_stack: video {video_ids[i]!r} has frame_index {frame_index[i]} twice")
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_video)) + 1]  # first sorted position of each video
    lengths = np.diff(np.r_[starts, n])
    lo = np.repeat(starts, lengths)
    hi = lo + np.repeat(lengths, lengths) - 1
    here = np.arange(n)
    out = np.empty((n, 2 * p + 1, d), dtype=np.float32)
    for j, shift in enumerate(range(-p, p + 1)):  # 2p+1 vectorised gathers, no loop over frames
        out[order, j] = feats[order[np.clip(here + shift, lo, hi)]]
    out *= np.float32(1.0 / math.sqrt(2 * p + 1))
    return out.reshape(n, (2 * p + 1) * d)


def ltp_features(ids: np.ndarray, features: np.ndarray, frames: pa.Table, p: int) -> np.ndarray:
    """``ltp_stack`` for features keyed by frame id: ``frames`` (a frames table, or any table with
    frame_id, video_id, frame_index) supplies each frame's video and position. Returns (N, (2p+1)·d)."""
    ids = np.asarray(ids, dtype=np.int64)
    if p == 0:
        return np.asarray(features, dtype=np.float32)
    for col in (schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX):
        if col not in frames.column_names:
            raise schema.SchemaError(f"frames table: column '{col}' is missing (needed for temporal pooling)")
    frame_ids = frames.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    order = np.argsort(frame_ids, kind="stable")
    at = np.searchsorted(frame_ids[order], ids)
    at = np.minimum(at, len(order) - 1)
    missing = (frame_ids[order][at] != ids) if len(order) else np.ones(len(ids), bool)
    if missing.any():
        raise schema.SchemaError(
            f"frames table: no row for frame_id {ids[np.argmax(missing)]} (needed for temporal pooling)"
        )
    rows = order[at]
    videos = frames.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False)[rows]
    index = frames.column(schema.FRAME_INDEX).to_numpy(zero_copy_only=False)[rows]
    return ltp_stack(features, videos, index, p)
