"""`cliquecnn serve`: the HTTP API on a real Ray Serve, over a tiny run made by the real stages; its page in a
real headless Chromium. One application for the whole module (two index shards), on a free 127.0.0.1 port."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from synthetic import png_bytes

from cliquecnn_ray import cli, schema, search, storage
from cliquecnn_ray.ann import build_index
from cliquecnn_ray.config import ServeConfig
from cliquecnn_ray.rundir import StageDir, StageNotCommitted
from tests.raycluster import free_port

MAX_K = 30
# float32 inner products over d = 1536 summed in another order (BLAS blocks a matrix product differently from
# a matrix-vector product) differ in the fifth decimal.
SCORE_ATOL = 5e-5


class Client:
    def __init__(self, url: str):
        self.url = url

    def request(self, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        req = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "")

    def json(self, path: str, body: bytes | None = None, status: int = 200) -> dict:
        code, data, _ = self.request(path, body)
        assert code == status, (path, code, data[:500])
        return json.loads(data)


@pytest.fixture(scope="module")
def served(searchable_run):
    """(client, run, cfg): round 1 of a tiny run served with two shards."""
    from ray import serve

    from cliquecnn_ray import service

    run, cfg, _ = searchable_run
    cfg = dataclasses.replace(cfg, serve=ServeConfig(shards=2, cpus_per_replica=0, threads=2, port=free_port(),
                                                     max_k=MAX_K, thumbnail_size=40, max_upload_mb=0.5))
    url = service.start(cfg, run)
    yield Client(url), run, cfg
    serve.shutdown()


def _features(run: str) -> tuple[np.ndarray, np.ndarray]:
    return schema.table_to_features(StageDir(run, 1, "features").read_table())


def _brute_force(run: str, query: np.ndarray, k: int, exclude: int | None = None):
    """The k frames most similar to ``query`` by a full scan: (frame_ids, scores), ties by frame id."""
    ids, feats = _features(run)
    scores = feats @ query
    order = np.lexsort((ids, -scores))
    order = order[ids[order] != exclude] if exclude is not None else order
    return ids[order[:k]], scores[order[:k]]


def _assert_a_true_top_k(run: str, query: np.ndarray, k: int, ids, scores, exclude: int | None = None,
                         atol: float = SCORE_ATOL) -> None:
    """``ids`` with ``scores`` are a top-k of ``query`` by a full scan, up to float32 rounding: k distinct
    frames (never ``exclude``), each with its scan score, in falling order, and no frame left out scoring
    above the last one kept. The tiny run's features leave some frames within 1e-5 of one another, and
    BLAS may round them into either order, so ids are not compared position by position."""
    all_ids, feats = _features(run)
    scan = dict(zip(all_ids.tolist(), (feats @ query).tolist()))
    ids, scores = [int(i) for i in ids], np.asarray(scores, np.float64)
    assert len(ids) == len(set(ids)) == k and exclude not in ids, (ids, k, exclude)
    np.testing.assert_allclose(scores, [scan[i] for i in ids], rtol=0, atol=atol)
    assert np.all(np.diff(scores) <= 0), scores
    left_out = [score for i, score in scan.items() if i not in ids and i != exclude]
    assert not left_out or max(left_out) <= scores.min() + atol, (ids, scores, _brute_force(run, query, k, exclude))


def _answer(results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r["frame_id"] for r in results]), np.array([r["score"] for r in results])


def _assert_same_answer(got: dict, want: dict) -> None:
    """The same frames, in the same order, with the same metadata; scores equal to float32 rounding (BLAS
    may round a frame's score differently at another position in a shard's block)."""
    drop = lambda answer: {**answer, "results": [{**r, "score": None} for r in answer["results"]]}  # noqa: E731
    assert drop(got) == drop(want)
    np.testing.assert_allclose(_answer(got["results"])[1], _answer(want["results"])[1], rtol=0, atol=SCORE_ATOL)


def test_info_names_the_run_and_its_round(served):
    client, _, _ = served
    info = client.json("/api/info")
    assert info["round"] == 1 and info["frames"] == 24 and info["videos"] == 4
    assert info["categories"] == ["even", "odd"] and info["shards"] == 2 and info["index"] == "exact"
    assert info["dimension"] == 3 * 512 and info["diffusion"] and info["run"].endswith("run")


def test_similar_frames_equal_a_brute_force_search_over_both_shards(served):
    client, run, _ = served
    frames = StageDir(run, 0, "frames").read_table([schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX,
                                                    schema.CATEGORY]).sort_by(schema.FRAME_ID).to_pylist()
    for frame_id, k in ((0, 5), (11, 23), (12, 7), (23, 1)):  # frames of either shard, k up to all the others
        answer = client.json(f"/api/frames/{frame_id}/similar?k={k}")
        ids, scores = _answer(answer["results"])
        _assert_a_true_top_k(run, _features(run)[1][frame_id], k, ids, scores, exclude=frame_id)
        assert answer["query"] == frames[frame_id] and answer["rerank"] == "none" and answer["k"] == k
        assert [{key: r[key] for key in frames[0]} for r in answer["results"]] == [frames[i] for i in ids]

def test_concurrent_queries_batched_by_the_shards_each_get_their_own_answer(served):
    """Queries arriving together are searched in one pass per shard (serve.batch); each keeps its own k."""
    from concurrent.futures import ThreadPoolExecutor

    client, run, _ = served
    feats = _features(run)[1]
    asks = [(frame_id, 1 + frame_id % 9) for frame_id in range(24)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda a: client.json(f"/api/frames/{a[0]}/similar?k={a[1]}"), asks))
    for (frame_id, k), answer in zip(asks, answers):
        ids, scores = _answer(answer["results"])
        _assert_a_true_top_k(run, feats[frame_id], k, ids, scores, exclude=frame_id)


def test_one_shard_with_whole_cpu_replicas_looks_a_frame_up_and_searches_it_in_one_call(served):
    """One index shard at the default reservation (1 CPU for each of 3 replicas) on the tests' 2-CPU Ray:
    the service still starts (Serve would otherwise wait for a free CPU for ever), and a frame query is one
    call to the shard, not a lookup and then a search: the same answers as the two-shard service and a
    brute-force search. (One service checks both, as each start is slow.)"""
    import ray

    from cliquecnn_ray import service

    client, run, cfg = served
    assert ray.cluster_resources()["CPU"] == 2
    feats = _features(run)[1]
    two_shards = client.json("/api/frames/17/similar?k=9")
    try:
        service.start(dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, shards=1, cpus_per_replica=1.0)),
                      run)
        assert client.json("/api/info")["shards"] == 1
        _assert_same_answer(client.json("/api/frames/17/similar?k=9"), two_shards)
        for frame_id, k in ((0, 23), (12, 4)):
            ids, scores = _answer(client.json(f"/api/frames/{frame_id}/similar?k={k}")["results"])
            _assert_a_true_top_k(run, feats[frame_id], k, ids, scores, exclude=frame_id)
    finally:
        service.start(cfg, run)  # the module's two-shard service again, for the tests after this one
    assert client.json("/api/info")["shards"] == 2


def test_frame_queries_the_neighbours_table_answers_are_lookups(served, tmp_path):
    """Over one group of frames, the round's committed neighbours table answers frame queries (k ≤ its k, no
    re-ranking) exactly as the search does; a larger k is searched. Per category (this module's run) it
    answers nothing."""
    from cliquecnn_ray import service
    from cliquecnn_ray.stages import neighbours

    client, run, cfg = served
    answers, why_not = search.read_neighbour_answers(run, 1)
    assert answers is None and "2 categories" in why_not
    assert client.json("/api/info")["frame_answers_from_table_up_to_k"] == 0
    one_group = str(tmp_path / "run")
    shutil.copytree(run, one_group)
    wide = dataclasses.replace(cfg, run=one_group,
                               neighbours=dataclasses.replace(cfg.neighbours, k=12, across_categories=True))
    neighbours.run(wide, 1)
    answers, why_not = search.read_neighbour_answers(one_group, 1)
    assert why_not == "" and answers.k == 12
    feats = _features(one_group)[1]
    for frame_id in range(24):
        scores, ids = answers.answer(frame_id, 12)
        _assert_a_true_top_k(one_group, feats[frame_id], 12, ids, scores, exclude=frame_id)
    try:
        service.start(wide, one_group)
        assert client.json("/api/info")["frame_answers_from_table_up_to_k"] == 12
        for frame_id, k in ((3, 12), (20, 5), (7, 13)):  # the last is more than the table holds: searched
            ids, scores = _answer(client.json(f"/api/frames/{frame_id}/similar?k={k}")["results"])
            _assert_a_true_top_k(one_group, feats[frame_id], k, ids, scores, exclude=frame_id)
    finally:
        service.start(cfg, run)  # the module's service again, for the tests after this one
    assert client.json("/api/info")["frame_answers_from_table_up_to_k"] == 0


def test_replicas_reservations_fit_the_machine():
    """Replicas that would reserve more CPUs than the machine has share it equally; otherwise unchanged."""
    from cliquecnn_ray.service import fit_to_cpus

    default = ServeConfig()  # one shard, the embedder, the ingress: 3 CPUs
    assert fit_to_cpus(default, 8.0) is default
    fitted = fit_to_cpus(default, 2.0)
    assert fitted.cpus_per_replica == 0.66 and 3 * fitted.cpus_per_replica <= 2.0
    assert dataclasses.replace(fitted, cpus_per_replica=1.0) == default  # nothing else changes
    assert fit_to_cpus(ServeConfig(shards=4), 2.0).cpus_per_replica == 0.33
    assert fit_to_cpus(ServeConfig(cpus_per_replica=0), 1.0).cpus_per_replica == 0


def test_sharded_search_equals_unsharded():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    feats[7] = feats[31]  # a tie across shards: broken by frame id, as the unsharded index does
    query = rng.normal(size=8).astype(np.float32)
    want_scores, want_rows = build_index(feats, "exact").search(query[None], 12)
    for shards in (1, 2, 3, 7):
        parts = []
        for lo, hi in search.shard_bounds(50, shards):
            scores, rows = build_index(feats[lo:hi], "exact").search(query[None], 12)
            parts.append((scores[0], np.where(rows[0] >= 0, rows[0] + lo, -1)))
        scores, ids = search.merge_top_k(parts, 12)
        np.testing.assert_array_equal(ids, want_rows[0])
        np.testing.assert_allclose(scores, want_scores[0])


def test_image_search_embeds_the_upload_as_impute_does(served):
    from cliquecnn_ray.model_file import load_model_bytes

    client, run, _ = served
    image = np.asarray(np.random.default_rng(5).integers(0, 255, (32, 32)), np.uint8)
    answer = client.json("/api/search?k=6", body=png_bytes(image))
    model, meta = load_model_bytes(storage.read_bytes(search.model_dir(run, 1).file("model.pt")))
    query = search.query_features(model, meta, [png_bytes(image)], "fc7", ltp_p=1)[0]
    ids, scores = _answer(answer["results"])
    _assert_a_true_top_k(run, query, 6, ids, scores, atol=1e-4)
    assert answer["query"]["upload"] and len(answer["results"]) == 6


def test_diffusion_reranks_the_exact_answer_on_the_rounds_graph(served):
    from cliquecnn_ray import diffusion

    client, run, cfg = served
    d = cfg.evaluate.diffusion
    graph = diffusion.load_knn_graph(run, 1, k=d.k, gamma=d.gamma)
    ids, scores = _brute_force(run, _features(run)[1][4], d.truncate)
    rows, _ = diffusion.rerank(graph, graph.rows_of(ids), scores, 9, d.alpha)
    want = [i for i in graph.frame_ids[rows] if i != 4][:8]
    answer = client.json("/api/frames/4/similar?k=8&rerank=diffusion")
    assert [r["frame_id"] for r in answer["results"]] == want and answer["rerank"] == "diffusion"


def test_bad_requests_are_refused_with_a_reason(served):
    client, _, cfg = served
    detail = client.json("/api/search", body=b"%PDF-1.4 not a picture", status=400)["detail"]
    assert "not an image" in detail and "BytesIO" not in detail  # says what is wrong, not where Pillow read it
    assert "empty" in client.json("/api/search", body=b"", status=400)["detail"]
    too_big = png_bytes(np.zeros((8, 8), np.uint8)) + bytes(int(cfg.serve.max_upload_mb * 2**20))
    assert "at most" in client.json("/api/search", body=too_big, status=413)["detail"]
    assert "not a frame of this run" in client.json("/api/frames/24/similar", status=404)["detail"]
    client.json("/api/frames/-1/similar", status=404)
    client.json("/api/frames/999999/image", status=404)
    for k in (0, -3, MAX_K + 1):
        assert "out of range" in client.json(f"/api/frames/3/similar?k={k}", status=422)["detail"]
    assert "out of range" in client.json(f"/api/search?k={MAX_K + 1}", body=b"x", status=422)["detail"]
    assert "rerank" in client.json("/api/frames/3/similar?rerank=magic", status=422)["detail"]
    client.json("/api/frames/abc/similar", status=422)  # not an integer: FastAPI's own 422
    # A client names frames by id only: no route turns anything it sends into a path.
    for path in ("/api/frames/..%2F..%2Fetc%2Fpasswd/image", "/../../etc/passwd", "/static/..%2F..%2Fpyproject.toml",
                 "/api/frames/%2Fetc%2Fpasswd/image"):
        code, body, _ = client.request(path)
        assert code in (404, 422) and b"root:" not in body and b"[project]" not in body


def test_thumbnails_and_the_video_strip(served):
    from PIL import Image

    client, _, _ = served
    code, data, kind = client.request("/api/frames/8/image")
    assert code == 200 and kind == "image/png" and Image.open(io.BytesIO(data)).size == (40, 40)
    frame = client.json("/api/frames/8")
    assert frame["video_id"] == "clip2-1" and [f["frame_index"] for f in frame["video"]] == list(range(6))
    listed = client.json("/api/frames?count=5")["frames"]
    assert len(listed) == 5 and len({f["frame_id"] for f in listed}) == 5


def test_serve_refuses_a_run_without_model_or_features(ray_session, tmp_path, capsys):
    from synthetic import commit_table, frames_table

    from cliquecnn_ray.config import load_config
    from cliquecnn_ray.service import build_app

    run = str(tmp_path / "run")
    commit_table(run, 0, "frames", frames_table(np.zeros((3, 8, 8), np.uint8)))
    assert cli.main(["serve", "--run", run, "--round", "1"]) == 1
    err = capsys.readouterr().err
    assert "round 1 features" in err and "round 0 model" in err
    with pytest.raises(StageNotCommitted, match="no round to serve"):
        build_app(load_config(None, []), run)



@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium through chromedriver (Debian: apt-get install chromium chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no Chromium with chromedriver on this machine: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_the_page_searches_by_clicking_a_frame(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client, _, _ = served
    browser.get(client.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "grid").get_attribute("data-state") == "ready")
    assert "24 frames" in browser.find_element(By.ID, "info").text
    tiles = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")
    clicked = int(tiles[3].get_attribute("data-frame-id"))
    tiles[3].click()
    wait.until(lambda b: b.find_element(By.ID, "grid").get_attribute("data-state") == "ready"
               and b.find_elements(By.CSS_SELECTOR, "#grid .tile .score"))
    shown = [int(t.get_attribute("data-frame-id")) for t in browser.find_elements(By.CSS_SELECTOR, "#grid .tile")]
    answer = client.json(f"/api/frames/{clicked}/similar?k=20")
    assert shown == [r["frame_id"] for r in answer["results"]]
    scores = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#grid .tile .score")]
    assert scores == [f"{r['score']:.3f}" for r in answer["results"]]
    strip = browser.find_elements(By.CSS_SELECTOR, "#strip img")
    assert len(strip) == 6 and "current" in strip[[int(f["frame_id"]) for f in
                                                  client.json(f"/api/frames/{clicked}")["video"]].index(clicked)
                                                  ].get_attribute("class")
    # Search from a neighbour, with diffusion re-ranking on.
    browser.find_element(By.ID, "diffusion").click()
    wait.until(lambda b: "(diffusion)" in b.find_element(By.ID, "grid-title").text.lower())
    neighbour = browser.find_elements(By.CSS_SELECTOR, "#grid .tile")[0]
    target = int(neighbour.get_attribute("data-frame-id"))
    neighbour.click()
    wait.until(lambda b: f"frame_id {target} " in b.find_element(By.ID, "query").text
               and b.find_element(By.ID, "grid").get_attribute("data-state") == "ready")
    shown = [int(t.get_attribute("data-frame-id")) for t in browser.find_elements(By.CSS_SELECTOR, "#grid .tile")]
    answer = client.json(f"/api/frames/{target}/similar?k=20&rerank=diffusion")
    assert shown == [r["frame_id"] for r in answer["results"]]
    browser.save_screenshot(os.environ.get("CLIQUECNN_SCREENSHOT") or str(tmp_path / "page.png"))
