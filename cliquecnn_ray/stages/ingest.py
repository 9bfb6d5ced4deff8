"""Ingest stage: ``cfg.sources`` → the canonical frame table ``StageDir(run, 0, "frames")``
(docs/data-contracts.md#frames).

Two Ray Data passes over small JSON work descriptors, so image bytes never pass through the driver:

1. decode: one task per unit (video file, image folder, Parquet part) decodes it and writes a staging
   Parquet file under the attempt; it returns only counts, (video_id, frame_index) keys and skipped frames;
2. finalize: once the driver has turned the counts into frame_id offsets (units in stable order), one task
   per unit rewrites its staging file as ``part-<unit>.parquet`` with dense global ``frame_id``.

The pure work lives in ``cliquecnn_ray/frame_sources.py``; this module only plans, fans out and commits.
"""
from __future__ import annotations

import json
import logging

from .. import frame_sources, raysetup, rundir, storage
from ..config import PipelineConfig, to_dict
from ..frame_sources import IngestError
from ..rundir import StageDir

log = logging.getLogger(__name__)


def _fan_out(fn, items: list[dict], num_cpus: float) -> list[dict]:
    """Apply ``fn`` to every JSON-able item as one Ray Data task each; results sorted like ``items``."""
    import ray

    def apply(row: dict) -> dict:  # JSON in and out: units of different kinds share one Arrow schema
        return {"i": row["i"], "result": json.dumps(fn(json.loads(row["item"])))}

    ds = ray.data.from_items([{"i": i, "item": json.dumps(x)} for i, x in enumerate(items)],
                             override_num_blocks=len(items))
    rows = ds.map(apply, num_cpus=num_cpus).take_all()
    return [json.loads(r["result"]) for r in sorted(rows, key=lambda r: r["i"])]


def _ingest(units: list[dict], cfg: PipelineConfig, attempt_uri: str) -> dict:
    raysetup.init_ray()  # idempotent: keeps a connected Ray, else starts a local one
    icfg = cfg.ingest
    cpus = cfg.resources.cpus_per_task
    attempt = storage.absolute_uri(attempt_uri)
    staging = storage.join(attempt, "_staging")

    # Pass 1: decode every unit in parallel into staging files.
    summaries = _fan_out(lambda unit: frame_sources.ingest_unit(unit, icfg, staging), units, cpus)
    frame_sources.raise_all([s["error"] for s in summaries if s["error"]])
    skipped = [frame for s in summaries for frame in s["skipped"]]
    for frame in skipped:
        log.warning("ingest: skipped frame %s of video %r (%s): %s", frame["frame_index"], frame["video_id"],
                    frame["file"], frame["reason"])
    frame_sources.check_duplicates(summaries, units)
    total = sum(s["rows"] for s in summaries)
    if total == 0:
        raise IngestError(f"no frames ingested from {', '.join(cfg.sources)} ({len(skipped)} skipped)")

    # Pass 2: global frame_id offsets in unit order, then rewrite each staging file as a final part.
    columns = [c for c in frame_sources.OPTIONAL if any(c in s["columns"] for s in summaries)]
    jobs, offset = [], 0
    for s in summaries:
        if s["rows"]:
            jobs.append({"staging": s["staging"], "final": storage.join(attempt, frame_sources.part_name(s["unit"])),
                         "offset": offset, "rows": s["rows"]})
            offset += s["rows"]
    written = _fan_out(lambda job: frame_sources.finalize_part(job["staging"], job["final"], job["offset"], columns),
                       jobs, cpus)
    if sum(written) != total:  # cannot happen unless a staging file changed under us
        raise IngestError(f"ingest wrote {sum(written)} rows, expected {total}")
    storage.delete(staging)

    categories: dict[str, int] = {}
    videos = set()
    for s in summaries:
        videos.update(s["keys"])
        for c, n in s["categories"].items():
            categories[c] = categories.get(c, 0) + n
    per_source = []
    for pos, source in enumerate(cfg.sources):
        mine = [s for s, u in zip(summaries, units) if u["source_pos"] == pos]
        kind = next(u["kind"] for u in units if u["source_pos"] == pos)
        rows = sum(s["rows"] for s in mine)
        per_source.append({"source": source, "kind": kind, "units": len(mine), "rows": rows})
        noun = {"video": "video", "images": "image folder", "parquet": "Parquet file"}[kind]
        log.info("ingest: %s: %d %s%s → %d frames", source, len(mine), noun, "s" if len(mine) != 1 else "", rows)
    return {
        "rows": total,
        "videos": len(videos),
        "categories": dict(sorted(categories.items())),
        "skipped_frames": skipped,
        "skipped_count": len(skipped),
        "parts": len(jobs),
        "sources": per_source,
    }


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    """Ingest ``cfg.sources`` into ``StageDir(cfg.run, 0, "frames")``; returns run_stage's record.

    Stats: rows, videos, categories {name: rows}, skipped_frames [{source, file, video_id, frame_index,
    reason}], parts, sources [{source, kind, units, rows}]. Sources are checked (exist, reachable, not
    empty) before anything runs; a failure leaves any earlier committed frames intact.
    """
    if round_index != 0:
        raise ValueError(f"ingest writes the frames of round 0 only, not round {round_index}")
    frame_sources.check_config(cfg.ingest)
    units = frame_sources.plan_sources(cfg.sources, cfg.ingest)
    inputs = {source: rundir.source_fingerprint(storage.absolute_uri(source)) for source in cfg.sources}
    # The order of the sources fixes frame_id, so it is configuration: reordering them recomputes.
    config = {**to_dict(cfg.ingest), "sources": list(cfg.sources)}
    out = StageDir(cfg.run, 0, "frames")
    return rundir.run_stage(out, config, inputs, lambda attempt: _ingest(units, cfg, attempt), force=force)
