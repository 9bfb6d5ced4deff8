"""Baselines on the same protocol (paper Sect. 3.1): NN-CNN as the paper trains it (exemplar classes plus
one "other" class, SGD over the training list), the ablation with the method's own sampling, the random
network and the round-0 similarities, each as committed stages beside a tiny run of the method."""
from __future__ import annotations

import numpy as np

from cliquecnn_ray import baselines, schema, storage
from cliquecnn_ray.model_file import load_model_bytes
from cliquecnn_ray.pipeline import run_pipeline
from cliquecnn_ray.rundir import StageDir
from cliquecnn_ray.training import total_steps
from tests.test_pipeline import tiny_config


def test_with_other_class_adds_every_frame_in_no_exemplar_class():
    classes = [("a", [0, 1, 2]), ("b", [2, 5])]
    out = baselines.with_other_class(classes, np.arange(8))
    assert out[:2] == classes and out[2] == (baselines.ALL_CATEGORIES, [3, 4, 6, 7])
    assert baselines.with_other_class([("a", [0, 1])], np.arange(2)) == [("a", [0, 1])]  # nothing left over


def test_baselines_run_beside_the_method_and_resume(ray_session, tmp_path):
    cfg = tiny_config(str(tmp_path), str(tmp_path / "run"))
    run_pipeline(cfg)
    results = baselines.run(cfg)
    expected = {"raw", "hog", "hog-lda", "raw + LTP", "hog + LTP", "hog-lda + LTP", "random cnn", "nn-cnn",
                "nn groups + random batches", "full method without LTP"}
    assert set(results) == expected
    for name, metrics in results.items():
        assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["knn"] <= 1.0, name
    assert storage.read_json(storage.join(cfg.run, "baselines.json")) == results

    # NN-CNN: E exemplar classes of 11 frames and one class of all other frames, all in one batch,
    # trained on uniform draws from the training list for the method's whole budget.
    classes = StageDir(cfg.run, 0, "cliques_nncnn").read_table().sort_by(schema.CLIQUE_ID)
    members = classes.column(schema.FRAME_IDS).to_pylist()
    assert all(len(m) == 11 for m in members[:-1]) and len(members) == cfg.cliques.num_cliques + 1
    assert classes.column(schema.CATEGORY).to_pylist()[-1] == baselines.ALL_CATEGORIES
    assert set().union(*map(set, members)) == set(range(96))
    assert set(members[-1]).isdisjoint(set().union(*map(set, members[:-1])))
    batch = StageDir(cfg.run, 0, "batches_nncnn").read_table()
    assert batch.num_rows == 1 and batch.column(schema.CLIQUE_IDS).to_pylist()[0] == list(range(len(members)))
    record = StageDir(cfg.run, 0, "model_nncnn").record()
    assert record["config"]["train"]["balance_cliques"] is False
    assert record["stats"]["steps"] == total_steps(cfg)
    _, meta = load_model_bytes(storage.read_bytes(StageDir(cfg.run, 0, "model_nncnn").file("model.pt")))
    assert meta["num_classes"] == len(members)

    # The ablation: the same exemplar classes, no "other" class, random batches of r, balanced sampling.
    groups = StageDir(cfg.run, 0, "cliques_nngroups").read_table().sort_by(schema.CLIQUE_ID)
    assert groups.column(schema.FRAME_IDS).to_pylist() == members[:-1]
    batches = StageDir(cfg.run, 0, "batches_nngroups").read_table().column(schema.CLIQUE_IDS).to_pylist()
    assert len(batches) == cfg.batches.num_batches and {len(b) for b in batches} == {cfg.batches.cliques_per_batch}
    assert StageDir(cfg.run, 0, "model_nngroups").record()["config"]["train"]["balance_cliques"] is True

    before = {name: StageDir(cfg.run, 0, name).record()["attempt"]
              for name in ("cliques_nncnn", "model_nncnn", "model_nngroups", "model_random")}
    assert baselines.run(cfg) == results  # a rerun recomputes nothing
    assert all(StageDir(cfg.run, 0, name).record()["attempt"] == a for name, a in before.items())
