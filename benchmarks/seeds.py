"""How far the Moving Fashion-MNIST figures move with the training seed alone (issue 11): the config
(configs/moving_fashion_mnist.yaml) run under several values of ``train.seed`` (the network's weights and the
order it samples; the clips, HOG-LDA and round 0's cliques and batches are the same), every round evaluated
on the validation clips and, once, on the test clips, cross-video. Nothing here chooses a setting: the test
figures say how much of one run's figure is its seed.

    .venv/bin/python benchmarks/seeds.py [SEED ...]      # default: 0 1 2

Seed 0 is the config's own run, the one benchmarks/moving_fashion_mnist.py reports; another seed runs in
runs/moving_seeds/seed<N>, starting from a copy of variants.py's repeat of the config under that seed where
this machine has it (``shorter_rounds_seed<N>``: the same settings, so only the evaluations are new), else
from a copy of seed 0's run (its round-0 stages are shared). The hand-made references are
moving_fashion_mnist.json's, measured on the same test clips. Writes benchmarks/results/seeds.json.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import evidence  # noqa: E402
from benchmarks.variants import copy_run, measured_with  # noqa: E402
from cliquecnn_ray import raysetup  # noqa: E402
from cliquecnn_ray.config import load_config  # noqa: E402
from cliquecnn_ray.pipeline import resolve_builtin_data, run_pipeline  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "seeds.json"
CONFIG = ROOT / "configs" / "moving_fashion_mnist.yaml"
BENCHMARK = ROOT / "benchmarks" / "results" / "moving_fashion_mnist.json"


def run_for(seed: int) -> Path:
    """The run directory of ``seed``, copied from the nearest committed run the first time."""
    config_run = ROOT / load_config(CONFIG).run
    if seed == 0:
        return config_run
    run = ROOT / "runs" / "moving_seeds" / f"seed{seed}"
    repeat = ROOT / "runs" / "moving_variants" / f"shorter_rounds_seed{seed}"
    parent = next((p for p in (repeat, config_run) if p.exists()), None)
    if parent is not None and not run.exists():
        run.parent.mkdir(parents=True, exist_ok=True)
        copy_run(parent, run)
    return run


def measure(seed: int) -> dict:
    started = time.time()
    run = run_for(seed)
    cfg = load_config(CONFIG, [f"train.seed={seed}", f"run={run.relative_to(ROOT)}"])
    per_round = [evidence.pick(m) for m in run_pipeline(cfg)["per_round"]]
    resolved = resolve_builtin_data(cfg)
    per_round_validation = [evidence.evaluate_validation(resolved, r) for r in range(cfg.rounds + 1)]
    aucs = [m["auc"] for m in per_round]
    return {"run": str(run.relative_to(ROOT)), "per_round": per_round, "per_round_validation": per_round_validation,
            "rounds_monotone": all(b > a for a, b in zip(aucs, aucs[1:])),
            "seconds_this_invocation": round(time.time() - started, 1)}


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "min": min(values), "max": max(values),
            "range": round(max(values) - min(values), 4)}


def summarise(per_seed: dict, best_handcrafted_auc: float) -> dict:
    """Per round: test and validation AUC across seeds (mean, min, max, range); the final round's error
    reduction against the best hand-made similarity for each seed and for the mean."""
    seeds = list(per_seed.values())
    rounds = len(seeds[0]["per_round"])
    final_aucs = [s["per_round"][-1]["auc"] for s in seeds]
    return {
        "test_auc_per_round": [spread([s["per_round"][r]["auc"] for s in seeds]) for r in range(rounds)],
        "validation_auc_per_round": [spread([s["per_round_validation"][r]["auc"] for s in seeds])
                                     for r in range(rounds)],
        "test_knn_final": spread([s["per_round"][-1]["knn"] for s in seeds]),
        "test_map_final": spread([s["per_round"][-1]["map"] for s in seeds]),
        "best_handcrafted_auc": best_handcrafted_auc,
        "error_reduction_vs_best_handcrafted": {
            **{seed: evidence.error_reduction(s["per_round"][-1]["auc"], best_handcrafted_auc)
               for seed, s in per_seed.items()},
            "mean": evidence.error_reduction(statistics.fmean(final_aucs), best_handcrafted_auc)},
        "rounds_monotone": {seed: s["rounds_monotone"] for seed, s in per_seed.items()},
    }


def main() -> None:
    seeds = [int(s) for s in sys.argv[1:]] or [0, 1, 2]
    benchmark = json.loads(BENCHMARK.read_text())
    if not benchmark.get("complete"):
        sys.exit(f"{BENCHMARK.relative_to(ROOT)} has no hand-made references yet: run "
                 "benchmarks/moving_fashion_mnist.py first")
    raysetup.setup_logging()
    raysetup.init_ray()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"per_seed": {}}
    for seed in seeds:
        results["per_seed"][str(seed)] = measure(seed)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    per_seed = dict(sorted(results["per_seed"].items(), key=lambda item: int(item[0])))
    results.update({"per_seed": per_seed, "seeds": [int(s) for s in per_seed],
                    "evaluation": benchmark["evaluation"], "selected_on": "nothing: no setting is chosen here",
                    "measured_with": measured_with(),
                    **summarise(per_seed, evidence.best_handcrafted_auc(benchmark["round0_references"]))})
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("\nMoving Fashion-MNIST, the config under several training seeds; AUC per round (test | validation)")
    for seed, s in per_seed.items():
        print(f"seed {seed:>3}  " + "  ".join(f"{t['auc']:.4f} | {v['auc']:.4f}"
                                              for t, v in zip(s["per_round"], s["per_round_validation"])))
    print("mean      " + "  ".join(f"{t['mean']:.4f} | {v['mean']:.4f}" for t, v in
                                   zip(results["test_auc_per_round"], results["validation_auc_per_round"])))
    print(f"final round's error reduction vs the best hand-made similarity: "
          f"{results['error_reduction_vs_best_handcrafted']}")


if __name__ == "__main__":
    main()
