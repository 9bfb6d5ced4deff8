"""Reading what one stage commits for later ones: the frames table (a filtered read, decoded images) and
the clique similarity S' file. Stage modules are the Ray glue of one stage each; what several of them
read lives here. No Ray.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import schema, similarity, storage
from .hog import decode_images
from .rundir import StageDir

IMAGE_COLUMNS = [schema.FRAME_ID, schema.IMAGE, schema.URI, schema.BBOX]  # what decode_frames reads
CLIQUE_SIMILARITY_FILE = "clique_similarity.arrow"  # beside cliques.parquet in a cliques stage


def read_frames(run: str, frame_ids: Optional[np.ndarray] = None, columns: Optional[list[str]] = None) -> pa.Table:
    """Rows of the committed frames table (round 0), only ``frame_ids`` when given (pushed down to the
    Parquet reader, not a scan of the whole table), only the ``columns`` that exist among those asked for;
    sorted by frame_id."""
    uris = StageDir(run, 0, "frames").files(".parquet")
    fs, _ = storage.resolve(uris[0])
    dataset = pads.dataset([storage.resolve(u)[1] for u in uris], filesystem=fs, format="parquet")
    names = dataset.schema.names
    cols = [c for c in (columns or names) if c in names]
    flt = None if frame_ids is None else pc.field(schema.FRAME_ID).isin(pa.array(np.asarray(frame_ids, np.int64)))
    return dataset.to_table(columns=cols, filter=flt).sort_by(schema.FRAME_ID)


def decode_frames(table: pa.Table, size: int, grey: bool) -> np.ndarray:
    """Frames table rows → uint8 (N, size, size) grey or (N, size, size, 3), cropped to bbox if any."""

    def column(name: str):
        return table.column(name).to_pylist() if name in table.column_names else None

    return decode_images(column(schema.IMAGE), uris=column(schema.URI), bboxes=column(schema.BBOX), size=size,
                         grey=grey, frame_ids=table.column(schema.FRAME_ID).to_numpy())


def read_clique_similarity(stage_dir: StageDir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """S' of each category from a committed cliques stage.

    Returns {category: (clique_ids (K,) int32 ascending, S' (K, K) float32)}, S'[a, b] the similarity of
    clique_ids[a] and clique_ids[b].
    """
    uri = stage_dir.file(CLIQUE_SIMILARITY_FILE)
    with pa.ipc.open_file(pa.BufferReader(storage.read_bytes(uri))) as reader:
        table = reader.read_all()
    return schema.clique_similarity_from_table(table, source=uri)


def write_clique_similarity(blocks: list[tuple[str, np.ndarray, np.ndarray]], attempt_uri: str) -> None:
    """[(category, clique_ids (K,), S' (K, K))] → ``CLIQUE_SIMILARITY_FILE`` in a stage attempt, as an Arrow
    IPC file (not Parquet, so ``read_table()`` of the stage still reads only the cliques table)."""
    sink = pa.BufferOutputStream()
    table = schema.clique_similarity_to_table(blocks)
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    storage.write_bytes(storage.join(attempt_uri, CLIQUE_SIMILARITY_FILE), sink.getvalue().to_pybytes())


def read_similarity_features(run: str, round_index: int, anchor_round0: float) -> tuple[np.ndarray, np.ndarray]:
    """(frame_ids, features) that round ``round_index``'s neighbours and cliques are built from: the round's
    features, with round 0's beside them when ``anchor_round0`` > 0 in a later round
    (``similarity.anchored_features``; config ``neighbours.anchor_round0``)."""
    stage = StageDir(run, round_index, "features")
    ids, feats = schema.table_to_features(stage.read_table(), source=str(stage))
    if round_index == 0 or anchor_round0 == 0:
        return ids, feats
    base = StageDir(run, 0, "features")
    base_ids, base_feats = schema.table_to_features(base.read_table(), source=str(base))
    order = np.argsort(base_ids, kind="stable")
    at = np.minimum(np.searchsorted(base_ids[order], ids), max(len(order) - 1, 0))
    missing = (base_ids[order][at] != ids) if len(order) else np.ones(len(ids), bool)
    if missing.any():
        raise schema.SchemaError(
            f"features table ({base}): no round-0 feature for frame_id {ids[np.argmax(missing)]}, which "
            f"{stage} has (neighbours.anchor_round0 = {anchor_round0} needs both)"
        )
    return ids, similarity.anchored_features(feats, base_feats[order[at]], anchor_round0)
