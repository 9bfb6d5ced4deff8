"""Report figures: pure functions checked against direct computations."""
import numpy as np

from cliquecnn_ray import figures, html_report


def test_eigen_spectrum_matches_the_full_similarity_matrix():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6))
    direct = np.clip(np.linalg.eigvalsh(feats @ feats.T)[::-1], 0, None)
    expected = np.cumsum(direct) / direct.sum()
    got = figures.eigen_spectrum(feats)
    np.testing.assert_allclose(got, expected[: len(got)], atol=1e-10)
    assert got[-1] == 1.0 or abs(got[-1] - 1) < 1e-12


def test_structured_similarities_have_a_steeper_spectrum():
    """Features from few clusters need fewer eigenvectors than noise (the paper's Fig. 4 argument)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 32))
    clustered = centres[rng.integers(0, 3, 300)] + 0.1 * rng.normal(size=(300, 32))
    noise = rng.normal(size=(300, 32))
    assert figures.eigen_spectrum(clustered)[2] > 0.9 > figures.eigen_spectrum(noise)[2]


def test_pick_longest_video_and_tables():
    vids = np.array(["a", "b", "b", "c", "b"])
    np.testing.assert_array_equal(html_report.pick_longest_video(vids), [1, 2, 4])
    assert html_report.pick_longest_video(np.array(["a", "b"])) is None
    table = html_report.metrics_table_html({"round 0": {"auc": 0.5, "knn": 0.25}})
    page = html_report.page_html("t", [("Metrics", table)])
    assert "<td>0.500</td>" in page and "<td>0.250</td>" in page and "<td>–</td>" in page


def test_pngs_are_pngs():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 4)), rng.normal(size=(10, 8))
    for data in (
        figures.similarity_matrices_png(a, b, "v"),
        figures.spectrum_png({"x": figures.eigen_spectrum(a)}),
        figures.neighbour_means_png([(np.zeros((8, 8), np.uint8), {"m": np.ones((8, 8))})]),
    ):
        assert data[:8] == b"\x89PNG\r\n\x1a\n"



def test_names_with_mathtext_characters_are_drawn_literally():
    """`$` and `\\` in a category, a video or a title are drawn as they are, not parsed as TeX by matplotlib
    (an unbalanced `$x^$` fails to parse and took the whole figure with it)."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 4))
    assert figures.similarity_matrices_png(a, a, "video $x^$\\").startswith(b"\x89PNG")
    assert figures.spectrum_png({"cat $1": figures.eigen_spectrum(a)}).startswith(b"\x89PNG")
    assert figures.neighbour_means_png([(np.zeros((8, 8), np.uint8), {"$a^$": np.ones((8, 8))})]).startswith(
        b"\x89PNG")
    grid = np.linspace(0, 1, 11).tolist()
    names = ["price $5", "a\\b", "$x^$", "ok"]
    result = {
        "curves": {"grid": grid, "per_category": {n: {"mean_tpr": grid, "mean_precision": grid[::-1]} for n in names},
                   "all": {"mean_tpr": grid, "mean_precision": grid[::-1]}},
        "per_category": {n: {"n_queries": 3, "auc_mean_roc": 0.5, "map": 0.5} for n in names},
        "auc_mean_roc_all_queries": 0.5,
        "map": 0.5,
    }
    roc, pr = figures.roc_and_pr_curves_png(result, title="run $HOME\\x")
    assert roc[:8] == pr[:8] == b"\x89PNG\r\n\x1a\n"
