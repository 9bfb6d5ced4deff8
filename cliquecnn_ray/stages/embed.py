"""``cliquecnn embed``: new videos / image folders / Parquet tables → their features under a run's trained model.

Nothing here is new machinery: the sources go through the ingest stage and the frames through the impute
stage, into an output directory laid out like a run (``OUT/round=0/frames``, ``OUT/round=R/features``,
committed the same way), with the settings that fix a feature taken from the run itself: how frames were
preprocessed (the run's ``ingest`` record: stride, frame limit, resizing, image format), and the layer and
LTP radius of its round R features (the run's ``impute`` record). Round R's features come from round R − 1's
model, so a frame the run already holds gets exactly the run's feature. How the new sources are read (``column_map``,
``category_from_folder``, ``default_category``, ``on_bad_frame``) and the resources (GPU, actors) are the
caller's.
"""
from __future__ import annotations

import dataclasses
import logging

from .. import search
from ..config import PipelineConfig
from ..rundir import StageDir
from . import impute, ingest

log = logging.getLogger(__name__)

# Ingest settings that change the pixels a frame is made of: always the run's.
PREPROCESSING = ("frame_stride", "max_frames", "resize_to", "image_format")


def run_preprocessing(cfg: PipelineConfig, run: str, round_index: int) -> PipelineConfig:
    """``cfg`` with the run's frame preprocessing and round ``round_index``'s layer and LTP radius."""
    committed = StageDir(run, 0, "frames").require()["config"]
    ingest_cfg = dataclasses.replace(cfg.ingest, **{k: committed[k] for k in PREPROCESSING if k in committed})
    layer, ltp_p = search.feature_settings(run, round_index)
    return dataclasses.replace(cfg, ingest=ingest_cfg,
                               impute=dataclasses.replace(cfg.impute, feature_layer=layer, ltp_p=ltp_p))


def run(cfg: PipelineConfig, run: str, out: str, round_index: int | None = None, force: bool = False) -> dict:
    """Embed ``cfg.sources`` with ``run``'s model of the round whose features are ``round_index`` (default:
    the last such round) into ``out``; returns {"round", "frames": ingest record, "features": impute record}.
    """
    if not cfg.sources:
        raise ValueError("embed needs at least one SOURCE (a video file, a folder, or a Parquet path/URI)")
    round_index = search.servable_round(run, round_index)
    if search.same_location(run, out):
        raise ValueError(f"embed: --out {out} is the run itself; name a new directory for the embedded frames")
    cfg = dataclasses.replace(run_preprocessing(cfg, run, round_index), run=out)
    frames = ingest.run(cfg, 0, force=force)
    features = impute.run(cfg, round_index - 1, force=force, model_run=run)
    log.info("embed: %d frames of %d source(s) → %s", features["stats"]["rows"], len(cfg.sources),
             StageDir(out, round_index, "features").uri)
    return {"round": round_index, "frames": frames, "features": features}
