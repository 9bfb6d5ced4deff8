"""`cliquecnn embed`: new sources through ingest and impute under a run's model, into a directory of their own."""
from __future__ import annotations

import numpy as np
import pytest
from synthetic import video_source

from cliquecnn_ray import cli, schema
from cliquecnn_ray.rundir import StageDir, StageNotCommitted


def _features_by_key(run: str, round_index: int) -> dict:
    ids, feats = schema.table_to_features(StageDir(run, round_index, "features").read_table())
    frames = StageDir(run, 0, "frames").read_table([schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX])
    frames = frames.sort_by(schema.FRAME_ID)
    assert np.array_equal(frames.column(schema.FRAME_ID).to_numpy(), ids)
    keys = zip(frames.column(schema.VIDEO_ID).to_pylist(), frames.column(schema.FRAME_INDEX).to_pylist())
    return dict(zip(keys, feats))


def test_embed_gives_the_runs_own_features_for_frames_it_imputed(searchable_run, tmp_path):
    run, _, known = searchable_run
    new = video_source(str(tmp_path / "new.parquet"), videos=2, seed=7)
    out = str(tmp_path / "embedded")

    # Through the command line, as a user would; the new clips first, so frame ids differ from the run's.
    assert cli.main(["embed", new, known, "--run", run, "--out", out, "impute.batch_size=5", "-q"]) == 0

    mine, theirs = _features_by_key(out, 1), _features_by_key(run, 1)
    assert len(mine) == len(theirs) + 12 and set(theirs) < set(mine)
    for key, feature in theirs.items():  # same preprocessing, layer, Pearson normalisation and LTP (p = 1)
        np.testing.assert_allclose(mine[key], feature, atol=1e-5, err_msg=str(key))
    assert StageDir(out, 1, "features").require()["stats"]["ltp_p"] == 1


def test_embed_refuses_a_run_without_a_model(ray_session, tmp_path):
    from cliquecnn_ray.config import load_config
    from cliquecnn_ray.stages import embed

    source = video_source(str(tmp_path / "clips.parquet"), videos=1)
    with pytest.raises(StageNotCommitted, match="no round to serve.*found no committed features"):
        embed.run(load_config(None, [f"sources=[{source}]"]), run=str(tmp_path / "empty"), out=str(tmp_path / "o"))
