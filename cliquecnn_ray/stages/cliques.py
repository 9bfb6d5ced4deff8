"""Stage ``cliques`` of round r: compact cliques per category, their similarity S' (paper Sect. 2.2,
docs/method.md#compact-cliques).

Inputs: ``StageDir(run, r, "neighbours")`` (frame_id, nn_ids), ``StageDir(run, r, "features")`` (φ, L2-normalised)
and ``StageDir(run, 0, "frames")`` (frame_id, video_id, category). The math is ``cliquecnn_ray.linkage``.
In a later round with ``neighbours.anchor_round0`` > 0, φ is the round's features with round 0's beside them,
the similarity its neighbours were built from (``stage_outputs.read_similarity_features``).

Work: per category (sorted), the seeds (every frame that has a neighbours row, or a seeded random subset of
``cliques.max_seeds``) are cut into chunks of ``cliques.seeds_per_task``, each chunk one Ray task
(``num_cpus = resources.cpus_per_task``); the category's features, video codes and neighbour indices go
to the object store once (``ray.put``) and every task of the category shares them. One more task per
category merges the seed cliques, keeps K = ``cliques.num_cliques`` cliques *per category* and computes
S'. Neighbours in another category are ignored (cliques never mix categories).

Outputs (committed together by ``rundir.run_stage`` into ``StageDir(run, r, "cliques")``):

- ``cliques.parquet`` — ``schema.CLIQUES``: ``clique_id`` int32, dense 0..K_total-1 within the run,
  categories in sorted order and, within a category, most compact first; ``category``; ``frame_ids``
  list<int64> (global frame ids, ascending); ``compactness`` float32 (mean pairwise similarity, self-pairs
  excluded). ``StageDir(...).read_table()`` returns this table.
- ``clique_similarity.arrow`` — S' per category as an Arrow IPC file (not Parquet, so ``read_table()`` of
  the stage still reads only the cliques table): one row per clique with ``category`` string,
  ``clique_id`` int32 and ``similarity`` list<float32>, the clique's row of its category's S' over that
  category's cliques in ascending clique_id order. S'_ab = mean pairwise sample similarity of cliques a
  and b; the diagonal includes self-pairs (S' = M Mᵀ of clique mean features), then ``project_psd``.
  Read it with ``stage_outputs.read_clique_similarity(stage_dir)``.

Stats (``_SUCCESS.json``): ``rows`` (cliques in all), and per category the number of cliques, mean size,
mean compactness, frames covered and the fraction of cliques whose frames all come from one video.
"""
from __future__ import annotations

import logging
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import linkage, schema, storage
from ..config import PipelineConfig
from ..rundir import StageDir, run_stage
from ..stage_outputs import read_similarity_features, write_clique_similarity

log = logging.getLogger(__name__)

CLIQUES_FILE = "cliques.parquet"


# ---------------------------------------------------------------------------------------------
# Inputs


def _padded_lists(table: pa.Table, column: str) -> np.ndarray:
    """A list<int64> column → (rows, k_max) int64, −1 padded."""
    col = table.column(column).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((len(lengths), int(lengths.max()) if len(lengths) else 0), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = values
    return out


def load_inputs(cfg: PipelineConfig, round_: int) -> dict:
    """Read and check the frames, features and neighbours of the round; global arrays indexed by frame id.

    Returns a dict with ``frame_ids`` (N,), ``category`` (N,) str, ``video`` (N,) int codes,
    ``features`` (N_f, d) with ``feature_row`` (N,) (−1: no features), ``nn`` (N, k) global neighbour ids
    (−1 pads; all −1 for frames without a neighbours row) and ``has_nn`` (N,) bool.
    """
    frames_dir = StageDir(cfg.run, 0, "frames")
    feats_dir = StageDir(cfg.run, round_, "features")
    nb_dir = StageDir(cfg.run, round_, "neighbours")
    frames = frames_dir.read_table(columns=[schema.FRAME_ID, schema.VIDEO_ID, schema.CATEGORY])
    frame_ids = frames.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    n = int(frame_ids.max()) + 1 if len(frame_ids) else 0
    known = np.zeros(n, dtype=bool)
    known[frame_ids] = True
    category = np.empty(n, dtype=object)
    category[frame_ids] = frames.column(schema.CATEGORY).to_numpy(zero_copy_only=False)
    _, video = np.unique(frames.column(schema.VIDEO_ID).to_numpy(zero_copy_only=False), return_inverse=True)
    video_codes = np.full(n, -1, dtype=np.int64)
    video_codes[frame_ids] = video

    fids, feats = read_similarity_features(cfg.run, round_, cfg.neighbours.anchor_round0)
    if n:
        bad = np.flatnonzero((fids < 0) | (fids >= n) | ~known[np.clip(fids, 0, max(n - 1, 0))])
    else:
        bad = np.arange(len(fids))
    if len(bad):
        raise schema.SchemaError(
            f"features table ({feats_dir}): column '{schema.FRAME_ID}' names frame {fids[bad[0]]}, "
            f"which the frames table does not have"
        )
    feature_row = np.full(n, -1, dtype=np.int64)
    feature_row[fids] = np.arange(len(fids))

    nb = nb_dir.read_table(columns=[schema.FRAME_ID, schema.NN_IDS])
    nb_ids = nb.column(schema.FRAME_ID).to_numpy().astype(np.int64)
    bad = np.flatnonzero((nb_ids < 0) | (nb_ids >= n) | ~known[np.clip(nb_ids, 0, max(n - 1, 0))])
    if len(bad):
        raise schema.SchemaError(
            f"neighbours table ({nb_dir}): column '{schema.FRAME_ID}' names unknown frame {nb_ids[bad[0]]} "
            f"at row {bad[0]} (the frames table has ids 0..{n - 1})"
        )
    uniq, counts = np.unique(nb_ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[np.argmax(counts > 1)]
        raise schema.SchemaError(
            f"neighbours table ({nb_dir}): frame_id {dup} has {counts.max()} rows (rows "
            f"{', '.join(map(str, np.flatnonzero(nb_ids == dup)[:2]))}); expected one"
        )
    lists = _padded_lists(nb, schema.NN_IDS)
    bad_cells = (lists != -1) & ((lists < 0) | (lists >= n) | ~known[np.clip(lists, 0, max(n - 1, 0))])
    if bad_cells.any():
        row, col = np.argwhere(bad_cells)[0]
        raise schema.SchemaError(
            f"neighbours table ({nb_dir}): column '{schema.NN_IDS}' of frame_id {nb_ids[row]} (row {row}) "
            f"names unknown frame {lists[row, col]}"
        )
    nn = np.full((n, lists.shape[1]), -1, dtype=np.int64)
    nn[nb_ids] = lists
    has_nn = np.zeros(n, dtype=bool)
    has_nn[nb_ids] = True
    return {
        "frame_ids": np.sort(frame_ids),
        "category": category,
        "video": video_codes,
        "features": feats,
        "feature_row": feature_row,
        "nn": nn,
        "has_nn": has_nn,
        "sources": (str(frames_dir), str(feats_dir), str(nb_dir)),
    }


def category_arrays(data: dict, category: str, cfg: PipelineConfig) -> dict:
    """The category's frames re-indexed locally 0..n-1: ``frames`` (n,) global ids, ``features`` (n, d),
    ``video`` (n,), ``nn`` (n, k) local neighbour indices (−1: padding or another category), ``seeds``."""
    frames = data["frame_ids"][data["category"][data["frame_ids"]] == category]
    n = len(frames)
    if n < cfg.cliques.min_size:
        raise linkage.CliqueError(
            f"category {category!r} has {n} frames, fewer than cliques.min_size={cfg.cliques.min_size}"
        )
    rows = data["feature_row"][frames]
    if (rows < 0).any():
        missing = frames[rows < 0]
        raise schema.SchemaError(
            f"features table ({data['sources'][1]}): no feature for frame_id {missing[0]} of category "
            f"{category!r} ({len(missing)} of its {n} frames have none)"
        )
    g2l = np.full(len(data["category"]), -1, dtype=np.int64)
    g2l[frames] = np.arange(n)
    nn_global = data["nn"][frames]
    nn = np.where(nn_global >= 0, g2l[np.clip(nn_global, 0, None)], -1)
    dropped = int(((nn_global >= 0) & (nn < 0)).sum())
    if dropped:
        log.info("cliques: category %r: %d neighbour entries in other categories ignored", category, dropped)
    candidates = np.flatnonzero(data["has_nn"][frames])
    if len(candidates) < n:
        log.warning("cliques: category %r: %d of %d frames have no neighbours row and seed no clique",
                    category, n - len(candidates), n)
    pick = linkage.choose_seeds(len(candidates), cfg.cliques.max_seeds, [cfg.seed, zlib.crc32(category.encode())])
    return {
        "frames": frames,
        "features": np.ascontiguousarray(data["features"][rows], dtype=np.float32),
        "video": data["video"][frames],
        "nn": nn,
        "seeds": candidates[pick],
    }


# ---------------------------------------------------------------------------------------------
# Ray tasks (plain functions; wrapped with ray.remote in run())


def _pack(cliques: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array([len(c) for c in cliques], dtype=np.int64)
    flat = np.concatenate(cliques) if cliques else np.zeros(0, np.int64)
    return flat.astype(np.int64), np.r_[0, np.cumsum(sizes)]


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def _seed_task(seeds, nn, features, video, cliques_cfg):
    return _pack(linkage.seed_cliques(seeds, nn, features, video, cliques_cfg))


def _finish_task(features, video, cliques_cfg, category, seed, *packed):
    seed_cliques = [c for flat, offsets in packed for c in _unpack(flat, offsets)]
    cliques, comp, sim = linkage.finish_category(seed_cliques, features, video, cliques_cfg, category, seed)
    stats = linkage.category_stats(cliques, comp, video)
    stats["seed_cliques"] = len(seed_cliques)
    return _pack(cliques), comp, sim, stats


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    """Compute the compact cliques of round ``round_index`` and commit them (see the module docstring)."""
    frames_dir = StageDir(cfg.run, 0, "frames")
    feats_dir = StageDir(cfg.run, round_index, "features")
    nb_dir = StageDir(cfg.run, round_index, "neighbours")
    inputs = {
        "frames": frames_dir.fingerprint(),
        "features": feats_dir.fingerprint(),
        "neighbours": nb_dir.fingerprint(),
    }
    config = {"cliques": cfg.cliques, "seed": cfg.seed}  # the seed subset and the spread k-means use it
    if round_index > 0 and cfg.neighbours.anchor_round0:  # linkage and S' see the neighbours' mixed similarity
        config["anchor_round0"] = cfg.neighbours.anchor_round0
        inputs["round0_features"] = StageDir(cfg.run, 0, "features").fingerprint()

    def compute(attempt_uri: str) -> dict:
        import ray

        data = load_inputs(cfg, round_index)
        seed_task = ray.remote(num_cpus=cfg.resources.cpus_per_task)(_seed_task)
        finish_task = ray.remote(num_cpus=cfg.resources.cpus_per_task, num_returns=4)(_finish_task)
        categories = sorted(set(data["category"][data["frame_ids"]].tolist()))
        pending = []
        for cat in categories:
            arrays = category_arrays(data, cat, cfg)
            feats_ref = ray.put(arrays["features"])
            video_ref = ray.put(arrays["video"])
            nn_ref = ray.put(arrays["nn"])
            step = max(cfg.cliques.seeds_per_task, 1)
            chunks = [
                seed_task.remote(arrays["seeds"][i : i + step], nn_ref, feats_ref, video_ref, cfg.cliques)
                for i in range(0, len(arrays["seeds"]), step)
            ]
            finished = finish_task.remote(feats_ref, video_ref, cfg.cliques, cat, cfg.seed, *chunks)
            pending.append((cat, arrays["frames"], finished))
            log.info("cliques: category %r: %d frames, %d seeds in %d tasks",
                     cat, len(arrays["frames"]), len(arrays["seeds"]), len(chunks))

        rows = {schema.CLIQUE_ID: [], schema.CATEGORY: [], schema.FRAME_IDS: [], schema.COMPACTNESS: []}
        blocks, per_category, next_id = [], {}, 0
        for cat, frames, refs in pending:
            (flat, offsets), comp, sim, stats = ray.get(list(refs))
            cliques = [frames[c] for c in _unpack(flat, offsets)]  # local → global frame ids (sorted)
            ids = np.arange(next_id, next_id + len(cliques), dtype=np.int32)
            next_id += len(cliques)
            rows[schema.CLIQUE_ID].append(ids)
            rows[schema.CATEGORY] += [cat] * len(cliques)
            rows[schema.FRAME_IDS] += cliques
            rows[schema.COMPACTNESS].append(np.asarray(comp, dtype=np.float32))
            blocks.append((cat, ids, sim))
            per_category[cat] = stats
            if len(cliques) < cfg.cliques.num_cliques:
                log.warning("cliques: category %r: only %d cliques of ≥ %d frames (asked for %d)",
                            cat, len(cliques), cfg.cliques.min_size, cfg.cliques.num_cliques)
            log.info(
                "cliques: category %r: %d cliques, mean size %.1f, compactness %.3f, %d frames covered, "
                "%.0f%% from one video",
                cat, stats["cliques"], stats["mean_size"], stats["mean_compactness"], stats["frames_covered"],
                100 * stats["video_pure_fraction"],
            )
        table = pa.table(
            {
                schema.CLIQUE_ID: pa.array(np.concatenate(rows[schema.CLIQUE_ID]), pa.int32()),
                schema.CATEGORY: pa.array(rows[schema.CATEGORY], pa.string()),
                schema.FRAME_IDS: pa.array(rows[schema.FRAME_IDS], pa.list_(pa.int64())),
                schema.COMPACTNESS: pa.array(np.concatenate(rows[schema.COMPACTNESS]), pa.float32()),
            },
            schema=schema.CLIQUES,
        )
        storage.write_parquet(table, storage.join(attempt_uri, CLIQUES_FILE))
        write_clique_similarity(blocks, attempt_uri)
        return {"rows": table.num_rows, "categories": per_category}

    return run_stage(StageDir(cfg.run, round_index, "cliques"), config, inputs, compute, force)
