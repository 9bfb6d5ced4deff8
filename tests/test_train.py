"""Training (paper Sect. 2.4, 3.1; docs/method.md#the-loss): masked loss, sampler, augmentation, model, and the Ray
Train stage (checkpoints, resume after an injected failure, next round from the previous weights, DDP)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from synthetic import class_images, commit_table, frames_table
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from cliquecnn_ray import cnn_features, model_file, network, schema, similarity, storage, training
from cliquecnn_ray.config import load_config
from cliquecnn_ray.rundir import StageDir


@pytest.fixture()
def one_thread():
    """Tiny CPU nets run fastest (and deterministically) on one thread, the Ray workers' setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_masked_loss_equals_cross_entropy_over_the_batch_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.1, 0.2, -0.3, 5.0, 1.0]])
    batch = torch.tensor([0, 2, 4])  # r = 3 cliques of K = 5; logit 3 (large) must not count
    targets = torch.tensor([2, 4])
    loss = training.masked_cross_entropy(logits, targets, batch)
    # By hand: row 0 softmax over (2.0, 0.5, 0.0) at 0.5; row 1 over (0.1, -0.3, 1.0) at 1.0.
    row0 = -(0.5 - math.log(math.exp(2.0) + math.exp(0.5) + math.exp(0.0)))
    row1 = -(1.0 - math.log(math.exp(0.1) + math.exp(-0.3) + math.exp(1.0)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    sub = F.cross_entropy(logits[:, batch], torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(sub.item(), rel=1e-6)
    # Gradients reach only the batch's logits.
    logits.requires_grad_(True)
    training.masked_cross_entropy(logits, targets, batch).backward()
    assert torch.all(logits.grad[:, [1, 3]] == 0) and torch.all(logits.grad[:, [0, 2, 4]] != 0)


def test_sampler_draws_only_frames_of_the_batch_cliques_with_their_targets():
    clique_rows = [np.arange(0, 5), np.arange(5, 8), np.arange(8, 20), np.arange(20, 22), np.arange(22, 30)]
    batches = np.array([[0, 2], [1, 3], [4, 0]])
    owner = np.concatenate([np.full(len(r), k) for k, r in enumerate(clique_rows)])
    sampler = training.CliqueBatchSampler(batches, clique_rows, images_per_step=16, seed=3)
    chosen = set()
    for step in range(30):
        rows, targets, batch = sampler.draw(step)
        chosen.add(tuple(batch))
        assert tuple(batch) in {tuple(b) for b in batches}
        assert len(rows) == 16 and set(targets) <= set(batch)
        assert np.array_equal(owner[rows], targets)  # each frame's target is its clique
        counts = np.bincount(targets, minlength=5)[batch]
        assert counts.min() == counts.max() == 8  # M spread evenly over the r cliques
    assert len(chosen) == 3  # every batch gets picked
    # Stateless: a step is the same whenever it is drawn; workers share x_b and draw their own images.
    a, b = sampler.draw(7), training.CliqueBatchSampler(batches, clique_rows, 16, seed=3).draw(7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    r0, t0, b0 = sampler.draw(7, rank=0, world_size=2)
    r1, t1, b1 = sampler.draw(7, rank=1, world_size=2)
    assert len(r0) == len(r1) == 8 and np.array_equal(b0, b1) and not np.array_equal(r0, r1)
    with pytest.raises(ValueError, match="batch 1 names clique index 9"):
        training.CliqueBatchSampler(np.array([[0, 1], [9, 0]]), clique_rows, 4)


def test_unbalanced_sampler_draws_frames_uniformly_over_the_training_list():
    """balanced=False (the paper's NN-CNN): each clique's share of the images is its share of the frames."""
    clique_rows = [np.arange(0, 10), np.arange(10, 100), np.arange(100, 130)]  # 10 : 90 : 30 frames
    sampler = training.CliqueBatchSampler(np.array([[0, 1, 2]]), clique_rows, images_per_step=128, seed=5,
                                          balanced=False)
    owner = np.concatenate([np.full(len(r), k) for k, r in enumerate(clique_rows)])
    draws = [sampler.draw(step) for step in range(200)]
    for rows, targets, _ in draws:
        assert np.array_equal(owner[rows], targets)
    targets = np.concatenate([t for _, t, _ in draws])
    np.testing.assert_allclose(np.bincount(targets) / len(targets), [10 / 130, 90 / 130, 30 / 130], atol=0.01)
    rows = np.concatenate([r for r, _, _ in draws])
    assert np.bincount(rows, minlength=130).min() > 0.5 * len(rows) / 130  # every frame, about equally often


def test_round_steps_set_each_rounds_budget():
    cfg = load_config(None, ["rounds=3", "train.steps=50", "train.round_steps=[200, 80]"])
    assert [training.round_steps(cfg, r) for r in range(3)] == [200, 80, 50]
    assert training.total_steps(cfg) == 330
    with pytest.raises(ValueError, match="round 1 has 0 steps"):
        training.round_steps(load_config(None, ["train.round_steps=[5, 0]"]), 1)


def test_augmentation_is_torchvision_v2_per_image():
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    angle = torch.tensor([0.0, 17.0, -33.0])
    shift = torch.tensor([[0.0, 0.0], [2.5, -1.0], [-3.0, 4.0]])
    scale = torch.tensor([1.0, 0.8, 1.2])
    warped = training.affine_batch(x, angle, shift, scale)
    bright, contrast = torch.tensor([0.7, 1.0, 1.3]), torch.tensor([1.2, 0.5, 0.9])
    coloured = training.colour_batch(x, bright, contrast)
    for i in range(3):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=shift[i].tolist(), scale=float(scale[i]),
                        shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
        torch.testing.assert_close(warped[i], ref, atol=1e-5, rtol=0)
        ref = TF.adjust_contrast(TF.adjust_brightness(x[i], float(bright[i])), float(contrast[i]))
        torch.testing.assert_close(coloured[i], ref, atol=1e-6, rtol=0)
    out = training.augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out[0], out[1] * 0 + out[0].mean())  # not degenerate
    assert torch.equal(out, training.augment(x, torch.Generator().manual_seed(1)))  # seeded


def test_build_model_and_features():
    net = network.build_model("alexnet_small", num_classes=7, input_size=28, in_channels=1)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert net(cnn_features.to_input(images)).shape == (5, 7)
    fc7 = cnn_features.extract_features(net, images, "fc7")
    fc6 = cnn_features.extract_features(net, images, "fc6")
    assert fc7.shape == (5, network.FC_DIM) and fc6.shape == (5, network.FC_DIM) and (fc7 >= 0).all()  # post-ReLU
    assert net.training  # extract_features runs in eval mode and restores the mode it found
    # fc7 is exactly what the head sees; pool5 is the flattened convolution map that fc6 takes.
    net.eval()
    assert torch.allclose(net.head(fc7), net(cnn_features.to_input(images)), atol=1e-5)
    pool5 = cnn_features.extract_features(net, images, "pool5")
    assert torch.allclose(pool5, net.features(cnn_features.to_input(images)), atol=1e-6)
    assert pool5.shape == (5, 128 * 16)
    assert torch.allclose(torch.relu(net.fc6(pool5)), fc6, atol=1e-5)
    with pytest.raises(ValueError, match="'pool9' is not pool5, fc6, fc7"):
        cnn_features.extract_features(net, images, "pool9")
    rgb = network.build_model("resnet18", num_classes=3, input_size=32, in_channels=3)
    feats = cnn_features.extract_features(rgb, np.zeros((2, 32, 32, 3), np.uint8) + 100)
    assert feats.shape == (2, 512) and network.head_name(rgb).endswith("fc")
    with pytest.raises(ValueError, match="alexnet.*cannot take 32×32"):
        network.build_model("alexnet", 4, 32, 1)
    with pytest.raises(ValueError, match="unknown model 'nosuchnet'"):
        network.build_model("nosuchnet", 4, 32, 1)
    p = similarity.pearson_normalise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert np.allclose(p[0], np.array([-1, 0, 1]) / math.sqrt(2)) and np.allclose(p[1], 0)


def test_model_file_round_trip_and_backbone_loading():
    a = network.build_model("alexnet_small", 5, 32, 1)
    meta = {"name": "alexnet_small", "num_classes": 5, "input_size": 32, "in_channels": 1, "feature_layer": "fc7"}
    b, meta_b = model_file.load_model_bytes(model_file.save_model_bytes(a, meta))
    assert meta_b == meta
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = network.build_model("alexnet_small", 9, 32, 1)  # next round: K differs
    info = network.load_backbone(c, a.state_dict())
    assert info["skipped"] == ["head.bias", "head.weight"]
    assert torch.equal(c.fc7.weight, a.fc7.weight) and torch.equal(c.features[1].weight, a.features[1].weight)
    d = network.build_model("alexnet_small", 5, 32, 1)  # same K: the head is still fresh (new cliques)
    network.load_backbone(d, a.state_dict())
    assert not torch.equal(d.head.weight, a.head.weight)


def planted_task() -> tuple[torch.Tensor, training.CliqueBatchSampler, torch.nn.Module]:
    """4 cliques of 12 synthetic images (one batch of all 4) and a fresh 16 px network."""
    images, labels = class_images(n_classes=4, per_class=12, size=16, seed=0)
    rows = [np.flatnonzero(labels == c) for c in range(4)]
    sampler = training.CliqueBatchSampler(np.array([[0, 1, 2, 3]]), rows, images_per_step=16, seed=0)
    torch.manual_seed(0)
    return torch.from_numpy(images)[:, None], sampler, network.build_model("alexnet_small", 4, 16, 1)


def test_a_few_steps_on_a_planted_task_reduce_the_loss(one_thread):
    x, sampler, net = planted_task()
    opt = training.make_optimizer(net.parameters(), "adagrad", lr=0.001)
    losses = training.run_steps(net, opt, x, sampler, 0, 24)
    assert losses[0] == pytest.approx(math.log(4), abs=0.3)  # chance over the r = 4 cliques
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])


def test_head_warmup_moves_only_the_head_first(one_thread):
    x, sampler, net = planted_task()
    groups = training.head_param_groups(net)
    assert [len(g["params"]) for g in groups] == [len(list(net.parameters())) - 2, 2]  # head weight + bias
    opt = training.make_optimizer(groups, "adagrad", lr=0.001, weight_decay=5e-4)
    warm = training.HeadWarmup(steps=3, lr=0.01, base_lr=0.001)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    training.run_steps(net, opt, x, sampler, 0, 3, head_warmup=warm)
    after = net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"head.weight", "head.bias"} <= moved
    # no backbone weight moved (BatchNorm running statistics do: they are buffers, not trained)
    assert all(k.startswith("head.") or "running_" in k or "num_batches" in k for k in moved)
    assert all(opt.state[p]["sum"].abs().sum() == 0 for p in groups[0]["params"] if p in opt.state)
    assert opt.param_groups[1]["lr"] == 0.01
    training.run_steps(net, opt, x, sampler, 3, 4, head_warmup=warm)
    assert not torch.equal(before["features.1.weight"], net.state_dict()["features.1.weight"])
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == 0.001


# ---------------------------------------------------------------------------------------------
# The Ray Train stage


CLASSES, PER_CLASS, SIZE = 4, 8, 32


def tiny_run(run: str) -> np.ndarray:
    """Frames (4 classes × 8, one video per class), 8 cliques (half a class each, ids 100..107, not
    dense), 4 batches of r = 2 cliques from different classes; the same cliques and batches in rounds
    0 and 1. Returns the labels, which no stage sees."""
    images, labels = class_images(CLASSES, PER_CLASS, SIZE, seed=0)
    position = np.tile(np.arange(PER_CLASS), CLASSES)
    commit_table(run, 0, "frames", frames_table(images, [f"v{c}" for c in labels], position))
    half = PER_CLASS // 2
    members = [list(range(c * PER_CLASS + h * half, c * PER_CLASS + (h + 1) * half))
               for c in range(CLASSES) for h in range(2)]
    ids = [100 + i for i in range(len(members))]
    cliques = pa.table({"clique_id": pa.array(ids, pa.int32()), "category": ["all"] * len(ids),
                        "frame_ids": pa.array(members, pa.list_(pa.int64())),
                        "compactness": pa.array([0.5] * len(ids), pa.float32())}, schema=schema.CLIQUES)
    pairs = [[100, 102], [104, 106], [101, 105], [103, 107]]
    batches = pa.table({"batch_id": pa.array(range(4), pa.int32()), "category": ["all"] * 4,
                        "clique_ids": pa.array(pairs, pa.list_(pa.int32()))}, schema=schema.BATCHES)
    for r in (0, 1):
        commit_table(run, r, "cliques", cliques)
        commit_table(run, r, "batches", batches)
    return labels


def tiny_cfg(run: str, *overrides: str):
    return load_config(None, [
        f"run={run}", f"train.input_size={SIZE}", "train.steps=8", "train.images_per_step=16",
        "train.checkpoint_every=4", "train.log_every=2", "train.max_failures=1",
        # Training must never read labels: point at a labels table that does not exist.
        f"evaluate.labels={run}/no-such-labels.parquet", *overrides,
    ])


def _load_state(run: str, round_: int):
    out = StageDir(run, round_, "model")
    return model_file.load_model_bytes(storage.read_bytes(out.file("model.pt")))


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    """Round 0 trained once without failure (shared by the tests below)."""
    from cliquecnn_ray.stages import train as stage

    run = str(tmp_path_factory.mktemp("train_run"))
    tiny_run(run)
    cfg = tiny_cfg(run)
    return run, cfg, stage.run(cfg, 0)


def test_train_stage_commits_model_pt(trained):
    from cliquecnn_ray.stages import train as stage

    run, cfg, record = trained
    assert not storage.exists(cfg.evaluate.labels)
    stats = record["stats"]
    assert stats["steps"] == 8 and stats["steps_this_attempt"] == 8 and stats["world_size"] == 1
    assert stats["resumed_from_checkpoint"] is False and stats["num_cliques"] == 8 and stats["frames_loaded"] == 32
    assert [s for s, _ in stats["losses"]] == [1, 3, 5, 7] and np.isfinite(stats["final_loss"])
    assert stats["images_per_s"] > 0
    net, meta = _load_state(run, 0)
    assert meta["num_classes"] == 8 and meta["clique_ids"] == list(range(100, 108))
    assert (meta["input_size"], meta["in_channels"]) == (SIZE, 1) and "feature_layer" not in meta  # impute's
    images = class_images(CLASSES, PER_CLASS, SIZE, seed=0)[0]
    assert cnn_features.extract_features(net, images).shape == (32, network.FC_DIM)
    assert not storage.exists(storage.join(StageDir(run, 0, "model").uri, "_ray_train"))  # cleaned up
    assert stage.run(cfg, 0)["skipped"]  # same config and inputs: nothing to do
    # What later rounds train with is not round 0's setting: its model stays committed.
    later = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_round_decay=0.3, round_steps=(8, 2)))
    assert stage.run(later, 0)["skipped"]


def test_injected_failure_resumes_from_the_last_checkpoint_on_s3(trained, s3_bucket):
    """Checkpoints go to the run directory on S3 (moto); the restarted worker group resumes from there."""
    from cliquecnn_ray.stages import train as stage

    _, _, uninterrupted = trained
    run = f"{s3_bucket}/run"
    tiny_run(run)
    # Dies at step 6 on the first attempt; the checkpoint of step 4 is the latest one.
    record = stage.run(tiny_cfg(run, "train.fail_at_step=6"), 0)
    stats = record["stats"]
    assert stats["resumed_from_checkpoint"] is True and stats["resumed_from_step"] == 4
    assert stats["steps_this_attempt"] == 4 and stats["steps"] == 8
    # Every step is seeded by (seed, step, rank): the resumed run repeats the uninterrupted one.
    np.testing.assert_allclose(np.array(stats["losses"]), np.array(uninterrupted["stats"]["losses"]), rtol=1e-5)
    net, _ = _load_state(run, 0)
    ref, _ = _load_state(trained[0], 0)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert storage.list_files(storage.join(StageDir(run, 0, "model").uri, "_ray_train")) == []  # cleaned up


def test_second_round_starts_from_the_previous_weights_on_two_ddp_workers(trained):
    """Round 1 on 2 workers (the one DDP test: a 2-worker TorchTrainer is slow to start)."""
    from cliquecnn_ray.stages import train as stage

    run, _, _ = trained
    # Both steps are head warm-up: the backbone's weights stay exactly where round 1 started (BatchNorm
    # statistics do move). A zero lr, which this test used before, is now refused when the config loads.
    record = stage.run(tiny_cfg(run, "train.steps=2", "train.num_workers=2"), 1)
    stats = record["stats"]
    assert stats["world_size"] == 2 and stats["steps"] == 2 and np.isfinite(stats["final_loss"])
    assert stats["lr"] > 0 and stats["head_warmup_steps"] == 2  # min(100, steps)
    assert training.round_lr(tiny_cfg(run, "train.lr=0.01", "train.lr_round_decay=0.5"), 2) == pytest.approx(0.0025)
    assert record["inputs"]["previous_model"] == StageDir(run, 0, "model").fingerprint()
    assert stats["initialised_from"].endswith("model.pt") and stats["initialised_tensors"] > 0
    first, _ = _load_state(run, 0)
    second, meta = _load_state(run, 1)
    assert meta["num_classes"] == 8 and not any(k.startswith("module.") for k in second.state_dict())
    for name, param in first.named_parameters():
        if name.startswith("head."):
            assert not torch.equal(second.state_dict()[name], param)  # a fresh head for new cliques
        else:
            assert torch.equal(second.state_dict()[name], param), name


def test_fresh_rounds_and_replay_round0_in_a_later_round(trained):
    """``train.fresh_rounds``: a later round trains from scratch, round 0's model untouched;
    ``train.replay_round0``: it trains on round 0's batches too, an input of later rounds only. (One
    training run checks both, as each is slow to start.)"""
    from cliquecnn_ray.stages import train as stage

    run, cfg, _ = trained
    later = tiny_cfg(run, "train.steps=2", "train.fresh_rounds=true", "train.replay_round0=true")
    assert stage.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fresh_rounds=True,
                                                                         replay_round0=True)), 0)["skipped"]
    record = stage.run(later, 1)
    stats = record["stats"]
    assert "previous_model" not in record["inputs"] and stats["head_warmup_steps"] == 0
    assert not stats.get("initialised_from")
    first, _ = _load_state(run, 0)
    second, meta = _load_state(run, 1)
    assert any(not torch.equal(second.state_dict()[name], param) for name, param in first.named_parameters()
               if not name.startswith("head."))
    assert record["inputs"]["round0_batches"] == StageDir(run, 0, "batches").fingerprint()
    assert record["inputs"]["round0_cliques"] == StageDir(run, 0, "cliques").fingerprint()
    assert stats["num_cliques"] == stats["rows"] == 16 and stats["num_batches"] == 8
    assert meta["clique_ids"] == [*range(100, 108)] * 2


def test_replay_round0_trains_on_both_rounds_batches(tmp_path):
    """``train.replay_round0``: a later round's head has an output per clique of its own round and of round
    0's, and every batch keeps its own round's cliques and frames."""
    from cliquecnn_ray.stages import train as stage

    run = str(tmp_path / "run")
    tiny_run(run)
    own = [[0, 9, 18], [27, 1, 10]]  # round 1's two cliques, each across classes: unlike any of round 0's
    commit_table(run, 1, "cliques", pa.table(
        {"clique_id": pa.array([7, 3], pa.int32()), "category": ["all"] * 2,
         "frame_ids": pa.array(own, pa.list_(pa.int64())), "compactness": pa.array([0.5, 0.5], pa.float32())},
        schema=schema.CLIQUES))
    commit_table(run, 1, "batches", pa.table(
        {"batch_id": pa.array([0], pa.int32()), "category": ["all"],
         "clique_ids": pa.array([[3, 7]], pa.list_(pa.int32()))}, schema=schema.BATCHES))
    alone = stage.load_training_data(tiny_cfg(run), 1, seed=0)
    assert alone.sampler.num_classes == 2 and alone.clique_ids.tolist() == [3, 7] and len(alone.images) == 6

    both = stage.load_training_data(tiny_cfg(run, "train.replay_round0=true"), 1, seed=0)
    assert both.clique_ids.tolist() == [3, 7, *range(100, 108)] and both.sampler.num_classes == 10
    assert both.sampler.batches.tolist() == [[0, 1], [2, 4], [6, 8], [3, 7], [5, 9]]
    assert len(both.images) == CLASSES * PER_CLASS  # every frame once, though round 1's are in round 0's too
    reference = stage.load_training_data(tiny_cfg(run), 0, seed=0)
    for k, frames in enumerate([own[1], own[0]]):  # head outputs 0, 1: clique ids 3, 7
        np.testing.assert_array_equal(both.images[both.sampler.clique_rows[k]], reference.images[frames])
    for k in range(8):  # round 0's cliques follow, in the order of their ids
        np.testing.assert_array_equal(both.images[both.sampler.clique_rows[2 + k]],
                                      reference.images[reference.sampler.clique_rows[k]])
    assert stage.training_rounds(tiny_cfg(run, "train.replay_round0=true"), 0) == [0]
    assert stage.training_rounds(tiny_cfg(run, "train.replay_round0=true"), 1, "_nncnn") == [1]
