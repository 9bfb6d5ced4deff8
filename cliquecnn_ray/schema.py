"""The Parquet contracts between stages (docs/data-contracts.md): column names, pyarrow schemas, validators.

Validation errors name the table, the column and the first offending row, so a user can find it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Column names, used everywhere instead of string literals.
FRAME_ID = "frame_id"
VIDEO_ID = "video_id"
FRAME_INDEX = "frame_index"
CATEGORY = "category"
IMAGE = "image"
URI = "uri"
BBOX = "bbox"
FEATURE = "feature"
NN_IDS, NN_SIMS, FAR_IDS, FAR_SIMS = "nn_ids", "nn_sims", "far_ids", "far_sims"
CLIQUE_ID, FRAME_IDS, COMPACTNESS = "clique_id", "frame_ids", "compactness"
BATCH_ID, CLIQUE_IDS = "batch_id", "clique_ids"
LABEL = "label"
QUERY_ID, POSITIVE_IDS, NEGATIVE_IDS = "query_id", "positive_ids", "negative_ids"

FRAMES = pa.schema(
    [
        pa.field(FRAME_ID, pa.int64(), nullable=False),
        pa.field(VIDEO_ID, pa.string(), nullable=False),
        pa.field(FRAME_INDEX, pa.int32(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(URI, pa.string()),
        pa.field(BBOX, pa.list_(pa.float32(), 4)),
    ]
)

NEIGHBOURS = pa.schema(
    [
        pa.field(FRAME_ID, pa.int64(), nullable=False),
        pa.field(NN_IDS, pa.list_(pa.int64())),
        pa.field(NN_SIMS, pa.list_(pa.float32())),
        pa.field(FAR_IDS, pa.list_(pa.int64())),
        pa.field(FAR_SIMS, pa.list_(pa.float32())),
    ]
)

CLIQUES = pa.schema(
    [
        pa.field(CLIQUE_ID, pa.int32(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(FRAME_IDS, pa.list_(pa.int64())),
        pa.field(COMPACTNESS, pa.float32()),
    ]
)

BATCHES = pa.schema(
    [
        pa.field(BATCH_ID, pa.int32(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(CLIQUE_IDS, pa.list_(pa.int32())),
    ]
)

CLASS_LABELS = pa.schema([pa.field(FRAME_ID, pa.int64(), nullable=False), pa.field(LABEL, pa.string())])
QUERY_LABELS = pa.schema(
    [
        pa.field(QUERY_ID, pa.int64(), nullable=False),
        pa.field(POSITIVE_IDS, pa.list_(pa.int64())),
        pa.field(NEGATIVE_IDS, pa.list_(pa.int64())),
    ]
)


def features_schema(d: int) -> pa.Schema:
    """Features as a plain fixed_size_list<float32>[d], readable by any Parquet reader
    (docs/data-contracts.md#features)."""
    return pa.schema(
        [pa.field(FRAME_ID, pa.int64(), nullable=False), pa.field(FEATURE, pa.list_(pa.float32(), d))]
    )


class SchemaError(ValueError):
    """A table breaks its contract; the message names table, column and first bad row."""


def _first_true(mask: pa.Array | np.ndarray) -> Optional[int]:
    mask = np.asarray(mask, dtype=bool)
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def check_columns(table: pa.Table, schema: pa.Schema, name: str, source: str = "", optional=()) -> pa.Table:
    """Check presence and types of ``schema``'s columns; cast where lossless. Returns the table in
    schema order (optional columns that are absent are left out)."""
    where = f" ({source})" if source else ""
    columns = []
    for fld in schema:
        if fld.name not in table.column_names:
            if fld.name in optional:
                continue
            raise SchemaError(
                f"{name} table{where}: required column '{fld.name}' is missing "
                f"(has: {', '.join(table.column_names)})"
            )
        col = table.column(fld.name)
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                bad = _first_uncastable(col, fld.type)
                raise SchemaError(
                    f"{name} table{where}: column '{fld.name}' has type {col.type}, expected {fld.type}"
                    + (f"; first bad row {bad}" if bad is not None else "")
                ) from exc
        if not fld.nullable and col.null_count:
            raise SchemaError(
                f"{name} table{where}: column '{fld.name}' has a null at row {_first_true(col.is_null())}"
            )
        columns.append((fld.name, col))
    return pa.table({n: c for n, c in columns})


def _first_uncastable(col: pa.ChunkedArray, typ: pa.DataType) -> Optional[int]:
    for i, value in enumerate(col.to_pylist()):
        try:
            pa.array([value]).cast(typ, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return None


def validate_frames(table: pa.Table, source: str = "") -> pa.Table:
    """The frame table: ids dense 0..N-1, (video_id, frame_index) unique, an image or a uri per row."""
    where = f" ({source})" if source else ""
    table = check_columns(table, FRAMES, "frames", source, optional=(IMAGE, URI, BBOX))
    if IMAGE not in table.column_names and URI not in table.column_names:
        raise SchemaError(f"frames table{where}: needs an '{IMAGE}' or a '{URI}' column")
    ids = table.column(FRAME_ID).to_numpy()
    expected = np.arange(len(ids))
    if not np.array_equal(np.sort(ids), expected):
        bad = _first_true(np.sort(ids) != expected)
        raise SchemaError(f"frames table{where}: column '{FRAME_ID}' is not dense 0..N-1 (first gap at row {bad})")
    keys = pc.binary_join_element_wise(
        table.column(VIDEO_ID), pc.cast(table.column(FRAME_INDEX), pa.string()), "\x00"
    ).to_numpy(zero_copy_only=False)
    _, first_idx, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup_key = keys[first_idx[np.argmax(counts > 1)]]
        rows = np.flatnonzero(keys == dup_key)
        video, index = dup_key.split("\x00")
        raise SchemaError(
            f"frames table{where}: duplicate ({VIDEO_ID}, {FRAME_INDEX}) = ({video!r}, {index}) at rows "
            f"{rows[0]} and {rows[1]}"
        )
    payload_null = np.ones(len(table), dtype=bool)
    for col in (IMAGE, URI):
        if col in table.column_names:
            payload_null &= np.asarray(table.column(col).is_null())
    bad = _first_true(payload_null)
    if bad is not None:
        raise SchemaError(f"frames table{where}: row {bad} (frame_id {ids[bad]}) has neither image nor uri")
    return table


def features_to_table(frame_ids: np.ndarray, features: np.ndarray) -> pa.Table:
    """(N,) ids and (N, d) float32 features → a features table with a fixed_size_list column."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, d = features.shape
    flat = pa.array(features.reshape(-1), type=pa.float32())
    return pa.table(
        {FRAME_ID: pa.array(np.asarray(frame_ids, dtype=np.int64)),
         FEATURE: pa.FixedSizeListArray.from_arrays(flat, d)},
        schema=features_schema(d),
    )


def table_to_features(table: pa.Table, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A features table → (ids (N,), features (N, d) float32), sorted by frame_id; checks finiteness."""
    where = f" ({source})" if source else ""
    if FRAME_ID not in table.column_names or FEATURE not in table.column_names:
        raise SchemaError(f"features table{where}: needs columns '{FRAME_ID}' and '{FEATURE}'")
    col = table.column(FEATURE).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        values = col.flatten().to_numpy(zero_copy_only=False)
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            bad = _first_true(lengths != lengths[0])
            raise SchemaError(
                f"features table{where}: column '{FEATURE}' has length {lengths[bad]} at row {bad}, "
                f"expected {lengths[0]} (d mismatch)"
            )
        d = int(lengths[0]) if len(lengths) else 0
        values = col.flatten().to_numpy(zero_copy_only=False)
    else:
        raise SchemaError(f"features table{where}: column '{FEATURE}' has type {col.type}, expected a list of floats")
    feats = np.asarray(values, dtype=np.float32).reshape(len(table), d)
    ids = table.column(FRAME_ID).to_numpy().astype(np.int64)
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        bad = _first_true(~finite)
        raise SchemaError(f"features table{where}: column '{FEATURE}' is NaN or infinite for frame_id {ids[bad]}")
    order = np.argsort(ids, kind="stable")
    return ids[order], feats[order]


# Clique similarity S' (a cliques stage's clique_similarity.arrow): one row per clique, its row of its
# category's S' over that category's cliques in ascending clique_id order.
SIMILARITY = "similarity"
CLIQUE_SIMILARITY = pa.schema(
    [
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(CLIQUE_ID, pa.int32(), nullable=False),
        pa.field(SIMILARITY, pa.list_(pa.float32())),
    ]
)


def clique_similarity_from_table(table: pa.Table, source: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The clique-similarity table → {category: (clique_ids (K,), S' (K, K) float32)}; checks shapes."""
    table = check_columns(table, CLIQUE_SIMILARITY, "clique_similarity", source)
    categories = np.asarray(table.column(CATEGORY).to_pylist(), dtype=object)
    ids = table.column(CLIQUE_ID).to_numpy()
    lengths = pc.list_value_length(table.column(SIMILARITY)).to_numpy(zero_copy_only=False)
    values = table.column(SIMILARITY).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    offsets = np.r_[0, np.cumsum(lengths)]
    out = {}
    for cat in sorted(set(categories.tolist())):
        rows = np.flatnonzero(categories == cat)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        k = len(rows)
        bad = rows[lengths[rows] != k]
        if len(bad):
            raise SchemaError(
                f"clique_similarity table ({source}): column '{SIMILARITY}' of clique_id {ids[bad[0]]} "
                f"(category {cat!r}) has {lengths[bad[0]]} values, expected {k} (the category's cliques)"
            )
        sim = np.stack([values[offsets[r] : offsets[r + 1]] for r in rows]).astype(np.float32)
        out[cat] = (ids[rows].astype(np.int32), sim)
    return out


def clique_similarity_to_table(blocks: list[tuple[str, np.ndarray, np.ndarray]]) -> pa.Table:
    """[(category, clique_ids (K,), S' (K, K))] → the clique-similarity table (one row per clique)."""
    cats, ids, rows = [], [], []
    for cat, cids, sim in blocks:
        cats += [cat] * len(cids)
        ids.append(np.asarray(cids, dtype=np.int32))
        rows += [np.asarray(r, dtype=np.float32) for r in sim]
    return pa.table(
        {
            CATEGORY: pa.array(cats, pa.string()),
            CLIQUE_ID: pa.array(np.concatenate(ids) if ids else np.zeros(0, np.int32), pa.int32()),
            SIMILARITY: pa.array(rows, pa.list_(pa.float32())),
        },
        schema=CLIQUE_SIMILARITY,
    )
