"""benchmarks/variants.py's selection rule: the incumbent stays unless beaten by more than the margin, and only
figures measured with the incumbent's code and CPU can beat it."""
import pytest

from benchmarks import variants

SAME = {"package_sha256": "a", "cpu": "x"}


def measurement(final_auc: float, measured_with: dict | None = SAME) -> dict:
    rounds = [{"auc": 0.6}, {"auc": final_auc}]
    return {"per_round_validation": rounds, **({"measured_with": measured_with} if measured_with else {})}


def test_incumbent_stays_within_margin_and_falls_beyond_it():
    near = {"inc": measurement(0.70), "new": measurement(0.70 + variants.MARGIN / 2)}
    far = {"inc": measurement(0.70), "new": measurement(0.70 + 2 * variants.MARGIN)}
    assert variants.select(near, "inc") == "inc"
    assert variants.select(far, "inc") == "new"


@pytest.mark.parametrize("other", [{"package_sha256": "b", "cpu": "x"}, {"package_sha256": "a", "cpu": "y"}, None])
def test_figures_measured_with_other_code_or_cpu_cannot_displace_the_incumbent(other):
    measured = {"inc": measurement(0.70), "new": measurement(0.80, other)}
    assert variants.select(measured, "inc") == "inc"
    assert set(variants.ineligible(measured, "inc")) == {"new"}


def test_an_unstamped_incumbent_keeps_its_place_until_measured_again():
    measured = {"inc": measurement(0.70, None), "new": measurement(0.80)}
    assert variants.select(measured, "inc") == "inc"


def test_without_an_incumbent_the_best_final_round_wins():
    measured = {"a": measurement(0.70), "b": measurement(0.72, {"package_sha256": "b", "cpu": "x"})}
    assert variants.ineligible(measured, None) == {}
    assert variants.select(measured, None) == "b"


def test_a_repeat_under_another_seed_is_never_selected():
    measured = {"shorter_rounds": measurement(0.70), "shorter_rounds_seed1": measurement(0.80)}
    assert variants.select(measured, "shorter_rounds") == "shorter_rounds"
    assert variants.select(measured, None) == "shorter_rounds"
    assert set(variants.ineligible(measured, None)) == {"shorter_rounds_seed1"}


def test_measured_with_names_the_code_and_cpu():
    stamp = variants.measured_with()
    assert len(stamp["package_sha256"]) == 16 and stamp["cpu"]
    assert stamp == variants.measured_with()


def test_the_margin_widens_to_the_seed_spread_of_the_incumbents_settings():
    measured = {"shorter_rounds": measurement(0.70), "shorter_rounds_seed1": measurement(0.68),
                "shorter_rounds_seed2": measurement(0.71), "new": measurement(0.72)}
    assert variants.seed_spread(measured, "shorter_rounds") == pytest.approx(0.03)
    assert variants.margin(measured, "shorter_rounds") == pytest.approx(0.03)
    assert variants.select(measured, "shorter_rounds") == "shorter_rounds"  # 0.02 above: within the spread
    measured["new"] = measurement(0.74)
    assert variants.select(measured, "shorter_rounds") == "new"


def test_a_repeat_measured_with_other_code_does_not_count_towards_the_spread():
    measured = {"shorter_rounds": measurement(0.70),
                "shorter_rounds_seed1": measurement(0.60, {"package_sha256": "b", "cpu": "x"})}
    assert variants.seed_spread(measured, "shorter_rounds") == 0.0
    assert variants.margin(measured, "shorter_rounds") == variants.MARGIN
