"""The method's own settings chosen on validation labels only (issue 11): Moving Fashion-MNIST
(configs/moving_fashion_mnist.yaml) under alternative clique and training settings, every round evaluated on
the validation clips (cross-video, labels from training images). No test label is read: a variant's run
evaluates nothing on its own (``evaluate.labels`` empty), and ``evidence.evaluate_validation`` scores each
round's committed features on the validation clips afterwards.

    .venv/bin/python benchmarks/variants.py [NAME ...]      # default: every variant below

Each variant runs in runs/moving_variants/NAME (committed stages are reused; one that differs from another
only from a later stage on starts from a copy of that one's run, ``STARTS_FROM``; repeats under another
seed, ``REPEATS``, are never selected). The variant whose final round
has the best validation AUC is ``selected``, and the config carries its settings. Writes
benchmarks/results/variants.json.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import evidence  # noqa: E402
from benchmarks.moving_fashion_mnist import clique_purity  # noqa: E402
from cliquecnn_ray import raysetup, rundir  # noqa: E402
from cliquecnn_ray.config import config_hash, load_config  # noqa: E402
from cliquecnn_ray.pipeline import resolve_builtin_data, run_pipeline  # noqa: E402
from cliquecnn_ray.rundir import StageDir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "variants.json"
CONFIG = ROOT / "configs" / "moving_fashion_mnist.yaml"
# Every variant was measured over these settings, the config's when the sweep ran; pinned so that the sweep
# reruns as it was whatever the config now carries (λ was re-selected after it, on a wider grid: tune.py).
BASE = ["features.lda_lambda=30.0", "ingest.motion_crop=false", "impute.feature_layer=fc7"]
MOTION_CROP_POOL5 = ["train.steps=1500", "ingest.motion_crop=true", "impute.feature_layer=pool5"]
SHORTER_ROUNDS = [*MOTION_CROP_POOL5, "cliques.num_cliques=800", "train.round_steps=[1500,500,500]"]  # selected
VARIANTS = {
    # The config's budget before this sweep: 500 steps per round.
    "steps_500": ["train.steps=500"],
    # Cliques from one clip's frames (no cap per clip): the network tells clips apart, item and background.
    "temporal_cliques": ["train.steps=500", "cliques.max_per_video=0"],
    # Three times the training per round: is the budget what holds the rounds back?
    "more_steps": ["train.steps=1500"],
    # Frames cropped to what moves in each clip (ingest.motion_crop: median background, no labels), as
    # Olympic Sports gives person boxes: do HOG-LDA's neighbourhoods then see the item, not the photograph?
    "motion_crop": ["train.steps=1500", "ingest.motion_crop=true"],
    # The same, imputing pool5: on round 0's model it has the best validation kNN and mAP of the layers
    # (fc7 the best AUC), and next round's cliques are built from nearest neighbours.
    "motion_crop_pool5": MOTION_CROP_POOL5,
    # Four times the cliques: 200 cliques of 8 are 1,600 frames, which 1,500 steps of 64 images see some 60
    # times over; does a wider training set carry the later rounds past round 1?
    "more_cliques": [*MOTION_CROP_POOL5, "cliques.num_cliques=800"],
    # The same with λ as tune.py selects it on the widened grid (the config's λ when this was measured): the
    # choices were made one after another, so do they compose?
    "more_cliques_tuned_lambda": [*MOTION_CROP_POOL5, "cliques.num_cliques=800", "features.lda_lambda=10000.0"],
    # Later rounds at a third of the learning rate of the round before (each round's AdaGrad starts afresh,
    # so its first steps are its largest): do the rounds after the first then refine instead of falling back?
    "gentle_rounds": [*MOTION_CROP_POOL5, "cliques.num_cliques=800", "train.lr_round_decay=0.3"],
    # Later rounds a third as long (paper Sect. 2.6: once the similarities are more reliable, fewer batches).
    "shorter_rounds": SHORTER_ROUNDS,
    # Later rounds' neighbours and cliques from the network's similarity mixed half and half with round 0's
    # (docs/method.md#anchored-rounds): the network ranks the collection better than HOG-LDA but its nearest
    # neighbours, which the next cliques come from, are worse; the output features stay the network's.
    "anchored_rounds": [*SHORTER_ROUNDS, "neighbours.anchor_round0=0.5"],
    # The same purer cliques, each later round training a new network from scratch for as long as round 1
    # (train.fresh_rounds): is it fine-tuning the last round's network that makes the later rounds fall back?
    "fresh_rounds": [*MOTION_CROP_POOL5, "cliques.num_cliques=800", "neighbours.anchor_round0=0.5",
                     "train.fresh_rounds=true", "train.round_steps=[1500,1500,1500]"],
    # The selected later rounds (shorter_rounds) also training on round 0's batches (train.replay_round0):
    # round 0's cliques were the purest measured, and each later round fell back from the one before.
    "replay_rounds": [*SHORTER_ROUNDS, "train.replay_round0=true"],
    # Both changes to the later rounds together: anchored cliques, and round 0's batches replayed beside them.
    "anchored_replay": [*SHORTER_ROUNDS, "neighbours.anchor_round0=0.5", "train.replay_round0=true"],
    # replay_rounds with half the steps in its last round: with replay round 2 gained and round 3 fell back,
    # so does the last fine-tuning overshoot?
    "replay_short_last": [*MOTION_CROP_POOL5, "cliques.num_cliques=800", "train.round_steps=[1500,500,250]",
                          "train.replay_round0=true"],
    # The selected variant (shorter_rounds) with augmentation as wide as the clips' own slow drifts (rotation
    # ±20°, scale 0.8–1.2; moving_fashion_mnist.py) instead of the defaults' ±10° and 0.9–1.1: cross-video
    # queries meet the item at another scale and angle than any frame of their own clip.
    "clip_range_augment": [*SHORTER_ROUNDS, "train.aug_rotate=20.0", "train.aug_scale=0.2"],
    # The selected variant again with another training seed (weights and sampling; the clips are the run's):
    # how far apart do identical settings land, and do its later rounds fall back under this seed too?
    "shorter_rounds_seed1": [*SHORTER_ROUNDS, "train.seed=1"],
    # A third seed: two runs give one difference, which says little about how far apart seeds land.
    "shorter_rounds_seed2": [*SHORTER_ROUNDS, "train.seed=2"],
    # Five times the learning rate: round 0's loss is still falling steadily at its last step (``train_loss``
    # against chance, ln 20), so is the network under-trained at AdaGrad's 0.001 rather than short of steps?
    "higher_lr": [*SHORTER_ROUNDS, "train.lr=0.005"],
}
# Repeats of a variant's settings under another seed measure the spread; choosing among seeds would be
# choosing noise, so they are never selected.
REPEATS = {"shorter_rounds_seed1": "shorter_rounds", "shorter_rounds_seed2": "shorter_rounds"}
# A variant that shares its first stages with others (it differs only from a later stage on) starts from a
# copy of the first of their runs that this machine has: the stages they share are committed already and are
# skipped (``seconds`` then counts only the rest). Without one it is computed from its first stage.
STARTS_FROM = {"gentle_rounds": ("more_cliques",), "shorter_rounds": ("more_cliques", "replay_short_last"),
               "anchored_rounds": ("shorter_rounds",), "fresh_rounds": ("anchored_rounds",),
               "replay_rounds": ("shorter_rounds",), "anchored_replay": ("anchored_rounds",),
               "replay_short_last": ("replay_rounds",), "shorter_rounds_seed1": ("shorter_rounds",),
               "shorter_rounds_seed2": ("shorter_rounds",), "higher_lr": ("shorter_rounds",)}
# The selection rule, fixed before the anchored_rounds sweep: the variant the config carries (the last
# ``selected``) stays unless another's final-round validation AUC is more than MARGIN above it. Validation
# and test once disagreed by less than this about two variants that differ only in their later rounds' length.
# Where the incumbent's settings have been repeated under other seeds and land further apart than MARGIN, the
# margin is that spread instead (``margin``).
# Only variants measured with the same package code on the same kind of CPU as the incumbent's figures are
# compared (``measured_with``): identical settings gave figures further apart than MARGIN across the two.
MARGIN = 0.005


def copy_run(parent: Path, run: Path) -> None:
    """``parent``'s run directory copied to ``run``, its committed stages reusable there. The built-in source
    is generated inside the run, and ingest fingerprints a source by its path: the copy's frames record is
    pointed at the copy's own (byte-identical) source, its fingerprint kept, so that nothing is recomputed
    for having moved."""
    shutil.copytree(parent, run)
    record_path = run / "round=0" / "frames" / "_SUCCESS.json"
    record = json.loads(record_path.read_text())
    old_prefix, new_prefix = str(parent.relative_to(ROOT)), str(run.relative_to(ROOT))
    sources = [source.replace(old_prefix, new_prefix, 1) for source in record["config"]["sources"]]
    record["config"]["sources"] = sources
    record["config_hash"] = config_hash(record["config"])
    record["inputs"] = {source: rundir.source_fingerprint(source) for source in sources}
    record_path.write_text(json.dumps(record, indent=2))


def measure(name: str, overrides: list[str], earlier: dict | None = None) -> dict:
    started = time.time()
    run = ROOT / "runs" / "moving_variants" / name
    parent = next((p for p in STARTS_FROM.get(name, ()) if (ROOT / "runs" / "moving_variants" / p).exists()), None)
    if parent and not run.exists():
        copy_run(ROOT / "runs" / "moving_variants" / parent, run)
    cfg = load_config(CONFIG, [*BASE, *overrides, f"run={run.relative_to(ROOT)}", "evaluate.labels="])
    records = run_pipeline(cfg)["records"]
    resolved = resolve_builtin_data(cfg)
    per_round = [evidence.evaluate_validation(resolved, r) for r in range(cfg.rounds + 1)]
    seconds = round(time.time() - started, 1)
    if earlier and all(r["skipped"] for key, r in records.items() if not key.endswith("report")):
        seconds = earlier["seconds"]  # every stage was committed already: the time is the run that made them
    # What each round's cliques gather (photograph or class), read from training clips only for diagnosis.
    return {"overrides": overrides, "per_round_validation": per_round, "seconds": seconds,
            "clique_purity": clique_purity(cfg), "train_loss": train_loss(cfg), "measured_with": measured_with(),
            **({"started_from": parent} if parent else {})}


def train_loss(cfg) -> list[float]:
    """Each round's training loss at its end (the mean of its last ten logged losses, from the model stage's
    record): how far the network got at telling its cliques apart (chance is ln(cliques_per_batch))."""
    out = []
    for r in range(cfg.rounds):
        losses = [loss for _, loss in StageDir(cfg.run, r, "model").require()["stats"]["losses"][-10:]]
        out.append(round(sum(losses) / len(losses), 3))
    return out


def measured_with() -> dict:
    """What a measurement's figures depend on besides its settings: the package's code (a digest of its
    Python sources) and the CPU. The pipeline is deterministic given both; across either, the same settings
    have given validation AUCs further apart than MARGIN (replay_short_last's first rounds vs replay_rounds')."""
    import hashlib
    import platform

    digest = hashlib.sha256()
    for path in sorted((ROOT / "cliquecnn_ray").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return {"package_sha256": digest.hexdigest()[:16], "cpu": cpu}


def ineligible(measured: dict, incumbent: str | None) -> dict[str, str]:
    """Variants left out of the selection, and why: those not measured with the incumbent's code and CPU
    (``measured_with``; an older entry without it counts as different), whose figures cannot be compared
    with the incumbent's to within MARGIN; and repeats under another seed (REPEATS), always."""
    repeats = {name: f"a repeat of {of}'s settings under another seed: it measures the spread, and is never "
                     "selected" for name, of in REPEATS.items() if name in measured}
    if incumbent not in measured:
        return repeats
    reference = measured[incumbent].get("measured_with")
    return {**{name: f"not measured with the code and CPU of {incumbent}'s figures (measured_with): the same "
                     "settings have differed by more than the margin across those"
               for name, m in measured.items() if name != incumbent and (reference is None
                                                                        or m.get("measured_with") != reference)},
            **repeats}


def seed_spread(measured: dict, incumbent: str | None) -> float:
    """How far apart the incumbent's settings land across training seeds: the range of the final-round
    validation AUCs of the incumbent and its repeats (REPEATS) measured with the same code and CPU; 0 with
    fewer than two."""
    if incumbent not in measured:
        return 0.0
    reference = measured[incumbent].get("measured_with")
    finals = [m["per_round_validation"][-1]["auc"] for name, m in measured.items()
              if name == incumbent or (REPEATS.get(name) == incumbent and m.get("measured_with") == reference)]
    return round(max(finals) - min(finals), 4)


def margin(measured: dict, incumbent: str | None) -> float:
    """What a challenger must beat the incumbent by: MARGIN, or the seed spread where that is wider (a gain
    smaller than the distance between two seeds of the same settings is not told apart from the seed)."""
    return max(MARGIN, seed_spread(measured, incumbent))


def select(measured: dict, incumbent: str | None) -> str:
    """The variant with the best final-round validation AUC, unless the incumbent is within ``margin`` of it."""
    excluded = ineligible(measured, incumbent)
    final = {name: m["per_round_validation"][-1]["auc"] for name, m in measured.items() if name not in excluded}
    best = max(final, key=final.get)
    if incumbent in final and final[best] <= final[incumbent] + margin(measured, incumbent):
        return incumbent
    return best


def main() -> None:
    names = sys.argv[1:] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    raysetup.setup_logging()
    raysetup.init_ray()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"variants": {}}
    for name in names:
        results["variants"][name] = measure(name, VARIANTS[name], results["variants"].get(name))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    measured = results["variants"]
    incumbent = results.get("selected")
    best = select(measured, incumbent)
    results.update({"selected_on": "validation", "selected": best,
                    "not_selectable": ineligible(measured, incumbent),
                    "data_set": "moving_fashion_mnist", "base": BASE,
                    "criterion": f"final round's validation AUC (cross-video); the incumbent stays unless beaten "
                                 f"by more than the margin: {MARGIN}, or the spread of the incumbent's final "
                                 f"round across training seeds (seed_spread) where that is wider",
                    "seed_spread": seed_spread(measured, incumbent), "margin": margin(measured, incumbent)})
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\nMoving Fashion-MNIST variants, validation clips (cross-video); AUC per round")
    rounds = len(measured[best]["per_round_validation"])
    print(f"{'variant':<20} " + " ".join(f"{'round ' + str(r):>9}" for r in range(rounds)))
    for name, m in measured.items():
        print(f"{name:<20} " + " ".join(f"{r['auc']:>9.4f}" for r in m["per_round_validation"])
              + f"   ({m['seconds']:.0f} s)")
    print(f"selected on validation: {best}")


if __name__ == "__main__":
    main()
