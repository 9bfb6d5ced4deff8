"""Train stage (docs/method.md#the-loss): Ray Train ``TorchTrainer`` over the batches of cliques of one round.

Three layers, as in Ray Train's examples: the pure step (``cliquecnn_ray.training``) → ``train_func``, the
per-worker glue (load data, ``prepare_model`` for DDP, checkpoints through ``ray.train.report``, resume
from ``ray.train.get_checkpoint``) → ``run``, the driver that builds the trainer and commits ``model.pt``
to ``StageDir(run, round, "model")``.

Checkpoints live beside the stage output in ``<run>/round=<r>/model/_ray_train/<name>`` (local or S3),
where ``<name>`` hashes the stage's config and inputs: Ray Train resumes a run of the same name from its
latest checkpoint, so a driver that died mid-training picks up where it stopped; a changed config or
input gets a fresh name, and ``force`` wipes the old one. The folder is removed once model.pt commits.
Labels are never read here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from .. import schema, storage
from ..config import PipelineConfig, config_hash, hashed_view
from ..model_file import MODEL_FILE, load_model_bytes, model_meta, save_model_bytes
from ..network import build_model, load_backbone, unwrap
from ..progress import Progress
from ..raysetup import init_ray, setup_worker_logging
from ..rundir import StageDir, run_stage
from ..stage_outputs import IMAGE_COLUMNS, decode_frames, read_frames
from ..training import (
    CliqueBatchSampler,
    HeadWarmup,
    augment_params,
    derive_seed,
    head_param_groups,
    log_windows,
    make_optimizer,
    round_lr,
    round_steps,
    run_steps,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
STAGE_SEED = 5  # this stage's offset in the run seed (stages derive their seeds from cfg.seed)


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_step`` to show that training resumes from its last checkpoint."""


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class TrainingData:
    """What one worker trains on."""

    images: torch.Tensor  # (F, C, H, W) uint8: every frame in any clique, decoded once
    sampler: CliqueBatchSampler  # rows index ``images``; targets index ``clique_ids``
    clique_ids: np.ndarray  # (K,) int32: the clique of each head output (ascending within each round's)


def training_rounds(cfg: PipelineConfig, round_: int, variant: str = "") -> list[int]:
    """The rounds whose cliques and batches round ``round_`` trains on: its own, and round 0's too when
    ``train.replay_round0`` (a later round of the method, not a baseline's variant)."""
    return [round_, 0] if cfg.train.replay_round0 and round_ > 0 and not variant else [round_]


def load_training_data(cfg: PipelineConfig, round_: int, seed: int, variant: str = "") -> TrainingData:
    """The cliques and batches ``round_`` trains on (``training_rounds``) and the frames of all their cliques,
    decoded at ``train.input_size``. With several rounds, the head has one output per clique of each round
    (this round's first) and every batch keeps its own round's cliques: a step draws one batch uniformly
    from all of them."""
    parts = [_cliques_and_batches(cfg, r, variant) for r in training_rounds(cfg, round_, variant)]
    members = [m for _, clique_members, _ in parts for m in clique_members]
    offsets = np.cumsum([0] + [len(ids) for ids, _, _ in parts])[:-1]
    matrix = np.concatenate([batches + offset for (_, _, batches), offset in zip(parts, offsets)])
    clique_ids = np.concatenate([ids for ids, _, _ in parts])
    needed = np.unique(np.concatenate([np.asarray(m, np.int64) for m in members]))
    frames = read_frames(cfg.run, needed, IMAGE_COLUMNS)
    have = frames.column(schema.FRAME_ID).to_numpy()
    if len(have) != len(needed):
        missing = np.setdiff1d(needed, have)[0]
        where = next(r for r, (_, clique_members, _) in zip(training_rounds(cfg, round_, variant), parts)
                     if any(missing in m for m in clique_members))
        raise ValueError(f"cliques table ({StageDir(cfg.run, where, 'cliques' + variant)}): frame_id {missing} "
                         f"is not in the frames table")
    clique_rows = [np.searchsorted(have, np.asarray(m, np.int64)) for m in members]
    decoded = decode_frames(frames, cfg.train.input_size, cfg.train.grey)
    images = torch.from_numpy(decoded[:, None] if decoded.ndim == 3 else decoded.transpose(0, 3, 1, 2).copy())
    sampler = CliqueBatchSampler(matrix, clique_rows, cfg.train.images_per_step, seed=seed,
                                 balanced=cfg.train.balance_cliques)
    return TrainingData(images=images.contiguous(), sampler=sampler, clique_ids=clique_ids)


def _cliques_and_batches(cfg: PipelineConfig, round_: int, variant: str) -> tuple[np.ndarray, list, np.ndarray]:
    """One round's committed cliques and batches, checked → (clique_ids (K,) int32 ascending, members (K lists
    of frame ids), batches (B, r) int64 rows of clique_ids)."""
    cliques_dir = StageDir(cfg.run, round_, "cliques" + variant)
    batches_dir = StageDir(cfg.run, round_, "batches" + variant)
    cliques = schema.check_columns(cliques_dir.read_table(), schema.CLIQUES, "cliques", str(cliques_dir))
    batches = schema.check_columns(batches_dir.read_table(), schema.BATCHES, "batches", str(batches_dir))
    if cliques.num_rows == 0 or batches.num_rows == 0:
        raise ValueError(f"round {round_}: nothing to train on ({cliques.num_rows} cliques, "
                         f"{batches.num_rows} batches)")
    cliques = cliques.sort_by(schema.CLIQUE_ID)
    clique_ids = cliques.column(schema.CLIQUE_ID).to_numpy().astype(np.int32)
    if len(np.unique(clique_ids)) != len(clique_ids):
        dup = clique_ids[np.flatnonzero(np.diff(clique_ids) == 0)[0]]
        raise ValueError(f"cliques table ({cliques_dir}): clique_id {dup} appears twice")
    members = cliques.column(schema.FRAME_IDS).to_pylist()
    empty = [int(clique_ids[i]) for i, m in enumerate(members) if len(m) == 0]
    if empty:
        raise ValueError(f"cliques table ({cliques_dir}): clique_id {empty[0]} has no frames")
    batch_lists = batches.column(schema.CLIQUE_IDS).to_pylist()
    r = len(batch_lists[0])
    matrix = np.empty((len(batch_lists), r), dtype=np.int64)
    batch_ids = batches.column(schema.BATCH_ID).to_numpy()
    for i, ids in enumerate(batch_lists):
        if len(ids) != r:
            raise ValueError(f"batches table ({batches_dir}): batch_id {batch_ids[i]} has {len(ids)} cliques, "
                             f"batch_id {batch_ids[0]} has {r} (every batch holds exactly r)")
        pos = np.searchsorted(clique_ids, ids)
        bad = (pos >= len(clique_ids)) | (clique_ids[np.minimum(pos, len(clique_ids) - 1)] != ids)
        if bad.any():
            raise ValueError(f"batches table ({batches_dir}): batch_id {batch_ids[i]} names clique_id "
                             f"{ids[int(np.flatnonzero(bad)[0])]}, which is not in the cliques table")
        matrix[i] = pos
    return clique_ids, members, matrix


# ---------------------------------------------------------------------------------------------
# Per-worker glue


def train_func(config: dict) -> dict:
    """One Ray Train worker. ``config``: {"cfg": PipelineConfig, "round_index": r, "init_model": URI of the
    previous round's model.pt or None, "marker": URI marking that the injected failure happened,
    "log_level": the driver's level for this package (rank 0 logs its progress)}.

    Returns (rank 0's value becomes ``Result.return_value``) the training statistics.
    """
    import ray.train
    import ray.train.torch

    cfg: PipelineConfig = config["cfg"]
    setup_worker_logging(config.get("log_level", logging.INFO))
    round_: int = config["round_index"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = derive_seed(cfg.seed, STAGE_SEED, cfg.train.seed, round_)
    torch.manual_seed(seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    if device.type == "cpu":
        # Each worker gets cpus_per_task cores; torch would otherwise spawn one thread per machine core.
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_task)))

    loaded_at = time.time()
    data = load_training_data(cfg, round_, seed, config.get("variant", ""))
    load_s = time.time() - loaded_at
    num_classes = data.sampler.num_classes
    model = build_model(cfg.train.model, num_classes, cfg.train.input_size, 1 if cfg.train.grey else 3)

    start_step, history, resumed_from, init_info = 0, [], None, None
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        start_step, history, resumed_from = state["step"], state["history"], state["step"]
    elif config.get("init_model"):
        previous, _ = load_model_bytes(storage.read_bytes(config["init_model"]), source=config["init_model"])
        init_info = load_backbone(model, previous.state_dict())

    model = ray.train.torch.prepare_model(model)  # moves to the device; DDP (gloo / NCCL) when world > 1
    lr = round_lr(cfg, round_)
    optimizer = make_optimizer(head_param_groups(model), cfg.train.optimizer, lr,
                               cfg.train.momentum, cfg.train.weight_decay)
    # Only a round that starts from trained weights has a backbone worth protecting from its random head.
    warm = HeadWarmup(cfg.train.head_warmup_steps, cfg.train.head_warmup_lr, lr) if config.get("init_model") else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    images = data.images.to(device)
    amp = device.type == "cuda"
    aug = augment_params(cfg)
    steps, every = round_steps(cfg, round_), max(1, cfg.train.checkpoint_every)
    # Failure injection (tests): the first attempt dies at fail_at_step; a marker beside the checkpoints
    # tells the restarted attempt that it already happened. Decided once, before any rank can write it.
    fail_at = cfg.train.fail_at_step
    inject = start_step <= fail_at < steps and not storage.exists(config["marker"])
    train_s, step = 0.0, start_step
    shown = Progress(f"train round {round_}{config.get('variant', '')}", steps - start_step, log, unit="steps",
                     bar=False) if rank == 0 else None
    while step < steps:
        stop = min(steps, (step // every + 1) * every)  # next checkpoint (or the end)
        if inject and step <= fail_at < stop:
            stop = fail_at
        t0 = time.time()
        history += run_steps(model, optimizer, images, data.sampler, step, stop, rank, world, aug, amp, warm,
                             on_step=(lambda loss: shown.update(1, f"loss {loss:.3f}")) if shown else None)
        train_s += time.time() - t0
        step = stop
        if inject and step == fail_at:
            if rank == 0:
                storage.write_json(config["marker"], {"step": step, "at": time.time()})
            raise InjectedFailure(f"train.fail_at_step: injected failure at step {step} (round {round_})")
        _report(model, optimizer, step, history, rank, resumed_from)
    if shown:
        shown.close()
    done = steps - start_step
    return {
        "steps": steps,
        "lr": lr,
        "head_warmup_steps": min(warm.steps, steps) if warm else 0,
        "steps_this_attempt": done,
        "world_size": world,
        "final_loss": float(np.mean(history[-max(1, cfg.train.log_every):])) if history else None,
        "first_loss": float(history[0]) if history else None,
        "losses": log_windows(history, cfg.train.log_every),
        "images_per_s": round(done * cfg.train.images_per_step / train_s, 2) if train_s > 0 else None,
        "train_seconds": round(train_s, 3),
        "load_seconds": round(load_s, 3),
        "frames_loaded": int(len(images)),
        "num_cliques": int(num_classes),
        "num_batches": int(len(data.sampler.batches)),
        "resumed_from_checkpoint": resumed_from is not None,
        "resumed_from_step": resumed_from,
        "initialised_from": config.get("init_model") if init_info else None,
        "initialised_tensors": init_info["loaded"] if init_info else 0,
        "device": str(device),
        "amp": amp,
    }


def _report(model, optimizer, step: int, history: list, rank: int, resumed_from) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"step": step, "loss": float(np.mean(history[-10:])) if history else float("nan"),
               "resumed_from_step": -1 if resumed_from is None else resumed_from}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(
                {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "history": list(history)},
                os.path.join(tmp, CHECKPOINT_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")


# ---------------------------------------------------------------------------------------------
# Driver


def _train_storage(out: StageDir, name: str) -> tuple[str, Optional[object], str]:
    """(storage_path for RunConfig, storage_filesystem or None, URI of the run's folder)."""
    root = storage.join(out.uri, "_ray_train")
    if storage.is_s3(root):
        fs, path = storage.resolve(root)
        return path, fs, storage.join(root, name)
    return storage.resolve(root)[1], None, storage.join(root, name)


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False, variant: str = "") -> dict:
    """Train the CNN of round ``round_index`` and commit ``model.pt`` (state_dict + model config).

    ``variant`` names another set of training classes (e.g. "_nncnn" reads cliques_nncnn / batches_nncnn and
    writes model_nncnn, for baselines); a variant never starts from an earlier round's weights.

    Returns run_stage's record; its ``stats`` hold steps, final_loss, losses ([step, mean loss] per
    ``train.log_every`` steps), images_per_s, train_seconds, resumed_from_checkpoint / resumed_from_step.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    # Workers do not share the driver's working directory: give them an absolute run path.
    cfg = dataclasses.replace(cfg, run=storage.absolute_uri(cfg.run))
    out = StageDir(cfg.run, round_index, "model" + variant)
    inputs = {
        "frames": StageDir(cfg.run, 0, "frames").fingerprint(),
        "cliques": StageDir(cfg.run, round_index, "cliques" + variant).fingerprint(),
        "batches": StageDir(cfg.run, round_index, "batches" + variant).fingerprint(),
    }
    for replayed in training_rounds(cfg, round_index, variant)[1:]:
        inputs[f"round{replayed}_cliques"] = StageDir(cfg.run, replayed, "cliques").fingerprint()
        inputs[f"round{replayed}_batches"] = StageDir(cfg.run, replayed, "batches").fingerprint()
    init_model = None
    if round_index > 0 and not variant and not cfg.train.fresh_rounds:
        previous = StageDir(cfg.run, round_index - 1, "model")
        inputs["previous_model"] = previous.fingerprint()
        init_model = previous.file(MODEL_FILE)
    # This round's step count and learning rate, not the list and the decay: changing what a later round
    # trains with keeps this round's model.
    train_settings = {**hashed_view(cfg.train),
                      "steps": round_steps(cfg, round_index), "lr": round_lr(cfg, round_index)}
    train_settings.pop("round_steps")
    train_settings.pop("lr_round_decay")
    if round_index == 0:  # round 0 always trains anew, on its own cliques
        train_settings.pop("fresh_rounds", None)
        train_settings.pop("replay_round0", None)
    stage_config = {"train": train_settings, "gpu": cfg.resources.gpus_for_training, "seed": cfg.seed}
    name = "train-" + hashlib.sha256(
        json.dumps([config_hash(stage_config), inputs], sort_keys=True).encode()
    ).hexdigest()[:16]
    storage_path, storage_fs, train_uri = _train_storage(out, name)

    def compute(attempt_uri: str) -> dict:
        init_ray()
        if force:
            storage.delete(train_uri)  # no resuming from an earlier run's checkpoints
        started = time.time()
        trainer = TorchTrainer(
            train_func,
            train_loop_config={"cfg": cfg, "round_index": round_index, "init_model": init_model, "variant": variant,
                               "marker": storage.join(train_uri, "_injected_failure.json"),
                               "log_level": log.getEffectiveLevel()},
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers,
                use_gpu=cfg.resources.gpus_for_training,
                resources_per_worker={"CPU": cfg.resources.cpus_per_task,
                                      **({"GPU": 1} if cfg.resources.gpus_for_training else {})},
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per checkpoint
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"{out}: training finished without a checkpoint ({train_uri})")
        with result.checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
        if state["step"] != round_steps(cfg, round_index):
            raise RuntimeError(f"{out}: last checkpoint is at step {state['step']}, "
                               f"expected {round_steps(cfg, round_index)}")
        stats = dict(result.return_value or {})
        clique_ids = np.concatenate([_clique_ids(cfg, r, variant) for r in training_rounds(cfg, round_index, variant)])
        meta = model_meta(cfg, len(clique_ids), clique_ids)
        model = build_model(meta["name"], meta["num_classes"], meta["input_size"], meta["in_channels"])
        model.load_state_dict(state["model"])
        storage.write_bytes(storage.join(attempt_uri, MODEL_FILE), save_model_bytes(model, meta))
        stats.update({"rows": meta["num_classes"], "fit_seconds": round(time.time() - started, 3),
                      "checkpoint_dir": train_uri})
        if stats.get("final_loss") is None:
            stats["final_loss"] = float(np.mean(state["history"][-max(1, cfg.train.log_every):]))
        return stats

    record = run_stage(out, stage_config, inputs, compute, force=force)
    if not record.get("skipped"):
        root = storage.join(out.uri, "_ray_train")
        try:
            storage.delete(root)  # model.pt is committed; the checkpoints were only for resuming
        except storage.StorageError:
            log.warning("%s: could not remove the training checkpoints in %s", out, root)
    return record


def _clique_ids(cfg: PipelineConfig, round_: int, variant: str = "") -> np.ndarray:
    table = StageDir(cfg.run, round_, "cliques" + variant).read_table(columns=[schema.CLIQUE_ID])
    return np.sort(table.column(schema.CLIQUE_ID).to_numpy()).astype(np.int32)
