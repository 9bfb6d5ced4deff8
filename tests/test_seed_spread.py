"""benchmarks/seeds.py's summary of one config under several training seeds, and its README table."""
import pytest

from benchmarks import seeds, tables


def seed_run(test_aucs: list[float], validation_aucs: list[float], knn: float = 0.5, map_: float = 0.3) -> dict:
    def figures(aucs: list[float]) -> list[dict]:
        return [{"auc": a, "knn": knn, "map": map_} for a in aucs]

    return {"per_round": figures(test_aucs), "per_round_validation": figures(validation_aucs),
            "rounds_monotone": all(b > a for a, b in zip(test_aucs, test_aucs[1:]))}


def test_summary_spreads_every_round_and_scores_each_seed_against_the_best_handmade_similarity():
    per_seed = {"0": seed_run([0.6, 0.76, 0.74], [0.6, 0.75, 0.73], knn=0.5),
                "1": seed_run([0.6, 0.72, 0.73], [0.6, 0.71, 0.72], knn=0.4)}
    out = seeds.summarise(per_seed, best_handcrafted_auc=0.7)
    assert out["test_auc_per_round"][1] == pytest.approx({"mean": 0.74, "min": 0.72, "max": 0.76, "range": 0.04})
    assert out["validation_auc_per_round"][2]["range"] == pytest.approx(0.01)
    assert out["test_knn_final"]["mean"] == pytest.approx(0.45)
    reductions = out["error_reduction_vs_best_handcrafted"]
    assert reductions["0"] == pytest.approx(1 - 0.26 / 0.3, abs=1e-4)
    assert reductions["1"] == pytest.approx(1 - 0.27 / 0.3, abs=1e-4)
    assert reductions["mean"] == pytest.approx(1 - 0.265 / 0.3, abs=1e-4)  # of the mean AUC, not mean of ratios
    assert out["rounds_monotone"] == {"0": False, "1": True}


def test_seeds_table_has_a_row_per_seed_and_the_mean():
    per_seed = {"0": seed_run([0.6, 0.76], [0.6, 0.75]), "1": seed_run([0.6, 0.72], [0.6, 0.71])}
    result = {"per_seed": per_seed, **seeds.summarise(per_seed, 0.7)}
    rows = tables.seeds_table(result)
    assert len(rows) == 2 + 3
    assert rows[2].startswith("| 0 | 0.600 (0.600) | 0.760 (0.750) |")
    assert rows[-1].startswith("| mean | 0.600 (0.600) | 0.740 (0.730) |")
