"""``cliquecnn serve``: one round of a run as a search service on Ray Serve, with a page to browse it.

Three deployments (the search itself lives in ``search.py``, ``ann.py`` and ``diffusion.py``):
- ``IndexShard`` × ``serve.shards``: each replica reads only its slice of the round's features and answers
  top-k by inner product (exact by default, faiss IVF / HNSW as ``serve.index``), so a collection larger than
  one node's memory spreads over a cluster;
- ``Embedder``: the round's model; concurrent image queries are batched into one forward pass (``serve.batch``);
- ``SearchApi``: the HTTP ingress (FastAPI): fans a query out to every shard, merges their top-k, optionally
  re-ranks by diffusion on the round's k-NN graph, and answers with each frame's video, index and category.
  A frame-id query that the round's committed neighbours table answers (k ≤ its k, no re-ranking, one group:
  ``search.read_neighbour_answers``) is a lookup there instead: the same answer, no search
  (``serve.neighbours_table``).

HTTP API (JSON): ``GET /api/info``, ``GET /api/frames?count=&offset=`` (frames spread over the run),
``GET /api/frames/{frame_id}`` (a frame and its video's strip), ``GET /api/frames/{frame_id}/similar?k=&rerank=``,
``GET /api/frames/{frame_id}/image`` (PNG thumbnail), ``POST /api/search?k=&rerank=`` (body: an image file);
``GET /`` is the page. A frame's own similar list leaves the frame out.
"""
# No `from __future__ import annotations`: FastAPI reads the route parameters' annotations at run time.
import asyncio
import dataclasses
import importlib.resources
import logging
import math
import os

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from . import raysetup, search
from .config import ConfigError, PipelineConfig, ServeConfig, to_dict
from .search import QueryError
from .storage import absolute_uri

log = logging.getLogger(__name__)

APP_NAME = "cliquecnn"
STRIP_FRAMES = 24  # frames of the query's video shown around it
BROWSE_MAX = 500  # frames one /api/frames call lists at most
SEARCH_BATCH = 16  # concurrent queries gathered into one call per shard, and one pass over its features
SEARCH_BATCHES = 4  # batches of queries the ingress has in flight at once (one would serialise its queries)
MAX_ONGOING = SEARCH_BATCH * SEARCH_BATCHES  # requests a replica takes at once (Serve's default, 5, would
# queue them before they could be batched)
# Every replica runs Serve's throughput-optimised request path (user code and router on the replica's own
# event loop, gRPC between replicas), which spends less CPU per call. Direct ingress stays off, so HTTP
# reaches the service only through the proxy on serve.host:serve.port.
SERVE_PATH_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
# Idle BLAS and OpenMP threads sleep at once instead of spinning for the next call: a search or forward pass
# takes milliseconds, and between two of them spinning threads would take the cores the proxy and the other
# replicas need (benchmarks/serve.py measures both: ``idle_threads``).
IDLE_THREADS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE"}

api = FastAPI(title="cliquecnn search", docs_url=None, redoc_url=None)


@api.exception_handler(QueryError)
async def _query_error(_request: Request, exc: QueryError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content={"detail": str(exc)})


def _use_threads(threads: int) -> None:
    """BLAS and torch thread pools of this replica (Ray starts it with one thread when it reserves < 2 CPUs)."""
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    torch.set_num_threads(threads)


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class IndexShard:
    """Rows [lo, hi) of the round's features (frame ids lo..hi−1) and an index over them."""

    def __init__(self, run: str, round_index: int, lo: int, hi: int, kind: str, threads: int):
        from .ann import build_index

        _use_threads(threads)
        self.lo = lo
        self.frame_ids, features = search.read_feature_slice(run, round_index, lo, hi)
        self.d = int(features.shape[1])
        self.index = build_index(features, kind)  # the index's copy is the only one kept
        log.info("index shard %d..%d: %d frames, d = %d, %s", lo, hi - 1, len(self.frame_ids), self.d, kind)

    def dimension(self) -> int:
        return self.d

    def vectors(self, frame_ids: np.ndarray) -> np.ndarray:
        """The features (m, d) of frames this shard holds."""
        return self.index.vectors(np.asarray(frame_ids, np.int64) - self.lo)

    async def search_frames(self, frame_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` with frames this shard holds as the queries."""
        return await self.search(self.vectors(frame_ids), k)

    async def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) queries → (scores (m, k), frame_ids (m, k)), −1 where the shard holds fewer than k frames."""
        return await self._search_batch((np.atleast_2d(queries), k))

    @serve.batch(max_batch_size=SEARCH_BATCH, batch_wait_timeout_s=0.0)
    async def _search_batch(self, requests: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        # Query blocks that arrived while the previous pass ran (from several ingress replicas) share one pass.
        k = max(k for _, k in requests)
        # In a thread (numpy releases the GIL): the replica's event loop keeps answering Serve's queue-length
        # probes and taking the next queries while a pass runs.
        queries = np.concatenate([q for q, _ in requests])
        scores, rows = await asyncio.to_thread(self.index.search, queries, k)
        ids = np.where(rows >= 0, self.frame_ids[np.maximum(rows, 0)], -1)
        ends = np.cumsum([len(q) for q, _ in requests])
        return [(scores[end - len(q) : end, :ki], ids[end - len(q) : end, :ki])
                for end, (q, ki) in zip(ends, requests)]


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class Embedder:
    """The model that made the round's features; image queries in, features out, batched."""

    def __init__(self, model_uri: str, layer: str, ltp_p: int, max_batch_size: int, batch_wait_s: float,
                 gpu: bool, threads: int):
        import torch

        from . import storage
        from .model_file import load_model_bytes

        _use_threads(threads)
        self.model, self.meta = load_model_bytes(storage.read_bytes(model_uri), source=model_uri)
        self.device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.layer, self.ltp_p = layer, ltp_p
        self.embed.set_max_batch_size(max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def embed(self, requests: list[list[bytes]]) -> list[np.ndarray]:
        # Each request is a list of images (an ingress batch): those of concurrent requests share one pass.
        images = [image for request in requests for image in request]
        # In a thread, as the shards' search: the forward pass must not block the replica's event loop.
        features = await asyncio.to_thread(search.query_features, self.model, self.meta, images, self.layer, self.ltp_p,
                                           device=self.device)
        ends = np.cumsum([len(request) for request in requests])
        return [features[end - len(request) : end] for end, request in zip(ends, requests)]

    async def __call__(self, images: list[bytes]) -> np.ndarray:
        """(m,) encoded images → their (m, d) features."""
        return await self.embed(list(images))


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
@serve.ingress(api)
class SearchApi:
    """The HTTP ingress: frames' metadata and thumbnails, fan-out to the shards, merge, re-rank."""

    def __init__(self, run: str, round_index: int, shards: list, embedder, settings: dict, diffusion: dict):
        self.run, self.round_index = run, round_index
        self.shards, self.embedder = shards, embedder
        self.settings, self.diffusion = settings, diffusion
        self.frames = search.FrameCatalogue(run, settings["thumbnail_size"])
        self.page_html = importlib.resources.files("cliquecnn_ray").joinpath("static/search.html").read_text()
        table = search.read_neighbours_table(run, round_index)  # once, for the frame answers and the graph
        self.answers = None
        if settings["neighbours_table"]:
            self.answers, why_not = search.read_neighbour_answers(run, round_index, table)
            if self.answers is None:
                log.info("search service: frame queries are searched (the neighbours table cannot answer: %s)",
                         why_not)
        self.graph, self.graph_missing = None, ""
        try:
            from .diffusion import load_knn_graph

            self.graph = load_knn_graph(run, round_index, k=diffusion["k"], gamma=diffusion["gamma"], table=table)
        except (search.StageNotCommitted, ValueError) as exc:
            self.graph_missing = str(exc)
            log.warning("search service: diffusion re-ranking unavailable: %s", exc)

    # --- the search itself

    async def _nearest(self, query: np.ndarray | int, k: int, rerank: str, exclude: int | None = None) -> list[dict]:
        """The answer to ``query`` (a feature, or a frame id: that frame's feature)."""
        if rerank == "none" and isinstance(query, int) and self.answers is not None and k <= self.answers.k:
            # The pipeline already searched every frame's neighbours exactly: the answer is a lookup.
            scores, ids = self.answers.answer(query, k)
            return self.frames.describe(ids, scores)
        wanted = k + (exclude is not None)
        if rerank == "diffusion":
            if self.graph is None:
                raise QueryError(409, f"diffusion re-ranking is not available for this round: {self.graph_missing}")
            fetch = max(wanted, self.diffusion["truncate"])
        else:
            fetch = wanted
        scores, ids = await self._top_k((query, fetch))
        if rerank == "diffusion":
            from .diffusion import rerank as diffuse

            rows, scores = diffuse(self.graph, self.graph.rows_of(ids), scores, wanted, self.diffusion["alpha"])
            ids = self.graph.frame_ids[rows]
        keep = ids != exclude if exclude is not None else np.ones(len(ids), bool)
        return self.frames.describe(ids[keep][:k], scores[keep][:k])

    # Concurrent queries are gathered into one call per shard: each call costs the ingress and the shard
    # milliseconds of Serve's routing and (de)serialisation, the search itself little more per query.

    @serve.batch(max_batch_size=SEARCH_BATCH, batch_wait_timeout_s=0.0, max_concurrent_batches=SEARCH_BATCHES)
    async def _top_k(self, requests: list[tuple[np.ndarray | int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(query, k) → the k best (scores, frame_ids) over every shard, merged; a query is a feature (d,) or a
        frame id (that frame's feature)."""
        k = max(k for _, k in requests)
        queries = [q for q, _ in requests]
        answers: list[list] = [[] for _ in requests]  # each shard's (scores, frame_ids) for each query
        frame_rows = [r for r, q in enumerate(queries) if isinstance(q, int)]
        if frame_rows:
            frame_ids = np.array([queries[r] for r in frame_rows], np.int64)
            if len(self.shards) == 1:  # the one shard looks the frames up and searches them in the same call
                scores, found = await self.shards[0].search_frames.remote(frame_ids, k)
                for i, r in enumerate(frame_rows):
                    answers[r].append((scores[i], found[i]))
            else:  # each frame's feature from its shard, then every shard searches it
                owner = np.searchsorted(self.bounds_hi, frame_ids, side="right")
                holding = np.unique(owner)
                parts = await asyncio.gather(*(self.shards[s].vectors.remote(frame_ids[owner == s]) for s in holding))
                for s, vectors in zip(holding, parts):
                    for r, vector in zip(np.asarray(frame_rows)[owner == s], vectors):
                        queries[r] = vector
        rows = [r for r in range(len(requests)) if not answers[r]]
        if rows:
            block = np.stack([np.asarray(queries[r], np.float32).reshape(-1) for r in rows])
            for scores, found in await asyncio.gather(*(shard.search.remote(block, k) for shard in self.shards)):
                for i, r in enumerate(rows):
                    answers[r].append((scores[i], found[i]))
        return [search.merge_top_k(answers[r], ki) for r, (_, ki) in enumerate(requests)]

    @serve.batch(max_batch_size=SEARCH_BATCH, batch_wait_timeout_s=0.0, max_concurrent_batches=SEARCH_BATCHES)
    async def _embed(self, images: list[bytes]) -> list[np.ndarray]:
        """Concurrent uploads → their features, in one call to the embedder (as ``_top_k`` to the shards)."""
        return list(await self.embedder.remote(images))

    def _query(self, k: int | None, rerank: str) -> int:
        k = self.settings["default_k"] if k is None else k
        search.check_query(k, self.settings["max_k"], rerank)
        return k

    # --- routes

    @api.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page_html

    @api.get("/api/info")
    async def info(self) -> dict:
        return {"run": self.run, "round": self.round_index, **self.frames.summary(),
                "dimension": await self.shards[0].dimension.remote(), "shards": len(self.shards),
                "index": self.settings["index"], "max_k": self.settings["max_k"],
                "default_k": self.settings["default_k"], "diffusion": self.graph is not None,
                "frame_answers_from_table_up_to_k": self.answers.k if self.answers is not None else 0,
                "diffusion_unavailable": self.graph_missing}

    @api.get("/api/frames")
    def frames_list(self, count: int = 48, offset: int = 0) -> dict:
        if not 1 <= count <= BROWSE_MAX:
            raise QueryError(422, f"count = {count} is out of range: 1 to {BROWSE_MAX}")
        n = len(self.frames)
        rows = (offset + np.arange(count) * max(1, n // count)) % n
        return {"frames": [self.frames.info(int(r)).as_dict() for r in np.unique(rows)]}

    @api.get("/api/frames/{frame_id}")
    def frame(self, frame_id: int) -> dict:
        row = self.frames.row(frame_id)
        return {**self.frames.info(row).as_dict(), "video": self.frames.video_strip(row, STRIP_FRAMES)}

    @api.get("/api/frames/{frame_id}/similar")
    async def similar(self, frame_id: int, k: int | None = None, rerank: str = "none") -> dict:
        row = self.frames.row(frame_id)
        k = self._query(k, rerank)
        results = await self._nearest(frame_id, k, rerank, exclude=frame_id)
        return {"query": self.frames.info(row).as_dict(), "k": k, "rerank": rerank, "results": results}

    @api.get("/api/frames/{frame_id}/image")
    def image(self, frame_id: int) -> Response:
        png = self.frames.thumbnail(self.frames.row(frame_id))
        return Response(content=png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @api.post("/api/search")
    async def search_image(self, request: Request, k: int | None = None, rerank: str = "none") -> dict:
        k = self._query(k, rerank)
        limit = int(self.settings["max_upload_mb"] * 2**20)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before the body is read into memory
            raise QueryError(413, f"the upload has {declared} bytes; at most {limit} are accepted")
        data = await request.body()
        search.check_image(data, limit)
        vector = await self._embed(data)
        results = await self._nearest(vector, k, rerank)
        return {"query": {"upload": True, "bytes": len(data)}, "k": k, "rerank": rerank, "results": results}

    @property
    def bounds_hi(self) -> list[int]:
        return self.settings["shard_ends"][:-1]


def build_app(cfg: PipelineConfig, run: str, round_index: int | None = None):
    """The Serve application of round ``round_index`` (default: the last) of ``run``; StageNotCommitted
    naming what is missing when the run cannot be served."""
    from .stages.train import MODEL_FILE

    round_index = search.servable_round(run, round_index)
    run = absolute_uri(run)  # replicas run in other working directories
    scfg = cfg.serve
    if scfg.index not in ("exact", "ivf", "hnsw"):
        raise ConfigError(f"config key 'serve.index': {scfg.index!r} is not one of exact, ivf, hnsw")
    bounds = search.shard_bounds(search.feature_count(run, round_index), scfg.shards)
    threads = scfg.threads or max(1, int(scfg.cpus_per_replica))
    options = {"num_cpus": scfg.cpus_per_replica, "runtime_env": {"env_vars": {**SERVE_PATH_ENV, **IDLE_THREADS_ENV}}}
    shards = [IndexShard.options(name=f"IndexShard{i}", ray_actor_options=options).bind(run, round_index, lo, hi,
                                                                                        scfg.index, threads)
              for i, (lo, hi) in enumerate(bounds)]
    model_uri = absolute_uri(search.model_dir(run, round_index).file(MODEL_FILE))
    embedder = Embedder.options(ray_actor_options={**options, "num_gpus": 1 if scfg.gpu else 0}).bind(
        model_uri, *search.feature_settings(run, round_index), scfg.max_batch_size, scfg.batch_wait_ms / 1000, scfg.gpu,
        threads)
    settings = {**to_dict(scfg), "shard_ends": [hi for _, hi in bounds]}
    return SearchApi.options(ray_actor_options=options).bind(run, round_index, shards, embedder, settings,
                                                             to_dict(cfg.evaluate.diffusion))


def fit_to_cpus(scfg: ServeConfig, cpus: float) -> ServeConfig:
    """``scfg`` with every replica's CPU reservation cut to an equal share of ``cpus`` when the replicas (the
    shards, the embedder and the ingress) would together reserve more. On one machine Serve would otherwise
    wait for ever for a node with a free CPU: by default one shard's service reserves 3, and a laptop may
    have 2."""
    replicas = scfg.shards + 2
    if replicas * scfg.cpus_per_replica <= cpus:
        return scfg
    return dataclasses.replace(scfg, cpus_per_replica=math.floor(cpus / replicas * 100) / 100)


def start(cfg: PipelineConfig, run: str, round_index: int | None = None, address: str | None = None) -> str:
    """Deploy the service (on ``address``'s cluster, else the embedded local Ray); returns its URL."""
    app = build_app(cfg, run, round_index)  # refuses a run it cannot serve before Ray starts
    raysetup.init_ray(address=address)
    if not (address or os.environ.get("RAY_ADDRESS")):  # this machine's Ray: every replica must fit on it
        cpus = ray.cluster_resources().get("CPU", 0.0)
        fitted = fit_to_cpus(cfg.serve, cpus)
        if fitted != cfg.serve:
            log.info("serve: %d replicas at serve.cpus_per_replica = %g would reserve more than this machine's "
                     "%g CPUs; each reserves %g", cfg.serve.shards + 2, cfg.serve.cpus_per_replica, cpus,
                     fitted.cpus_per_replica)
            cfg = dataclasses.replace(cfg, serve=fitted)
            app = build_app(cfg, run, round_index)
    quiet = {"log_level": "WARNING"}  # Serve logs every request at INFO
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port}, logging_config=quiet)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=quiet)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    log.info("search service for %s (round %s) at %s", run, round_index if round_index is not None else "last", url)
    return url


def stop() -> None:
    serve.delete(APP_NAME)
