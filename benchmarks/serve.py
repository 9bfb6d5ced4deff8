"""The search service under load (issue 13 §5): `cliquecnn serve` on a finished run's last round, against an
in-process exact search of the same features measured in the same run.

For 1 and 2 index shards with exact search, and 2 shards with the IVF index, closed-loop load on 127.0.0.1
(``concurrency`` clients, each sending its next request when the previous one is answered, a bounded number of
requests per setting): queries per second and p50 / p99 latency of frame-id queries (``GET
/api/frames/{id}/similar?k=10``) and of image queries (``POST /api/search?k=10`` with frames' own images) at
concurrency 1, 8 and 32. As the service runs by default, a frame query is looked up in the round's committed
neighbours table (the pipeline's exact search of every frame, ``serve.neighbours_table``); the same frame
queries are then measured searched by the shards (``frame_search_path``), as every frame query is where the
table cannot answer. The service overhead is the Serve p50 of frame queries at concurrency 1 (one shard) minus
the in-process p50 of the same work: the table lookup, and for the searched path the exact search, each
measured just before its service (on a shared machine the load changes from minute to minute), the search on
as many BLAS threads as that shard's replica has (``serve.threads``: the machine's cores divided among the
shards). The approximate indexes' recall@10 is measured against exact search on 1,000 frames' queries. Every
setting also records the CPU each role (proxy, each deployment, the load generator, the rest) spent per
answered request: on a small machine their sum, not any one hop, is what bounds throughput and so latency
under load. The one-shard service is measured once more with its replicas' idle BLAS and OpenMP threads left
to spin between calls, their default (``idle_threads``: what letting them sleep, as the service does, saves).
``diffusion_map_gain`` comes from benchmarks/diffusion.py's ``measure_diffusion_gain`` (its stages are
committed in the run, so this reads them back unless they were never run).

    .venv/bin/python benchmarks/serve.py RUN        # e.g. runs/fashion_mnist, a finished run
    .venv/bin/python benchmarks/serve.py RUN --no-diffusion   # any servable run: diffusion_map_gain left null
    .venv/bin/python benchmarks/serve.py RUN --diffusion-from benchmarks/results/diffusion.json  # its figure,
                                                      # when benchmarks/diffusion.py has just measured this run
    .venv/bin/python benchmarks/serve.py RUN --hnsw    # also the HNSW index's recall (a long build at d = 2048)

Writes benchmarks/results/serve.json and prints a table.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cliquecnn_ray import raysetup, schema, search  # noqa: E402
from cliquecnn_ray.ann import build_index, recall_at_k  # noqa: E402
from cliquecnn_ray.config import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serve.json"
CONCURRENCY = (1, 8, 32)
# (index shards, index kind, frame queries the neighbours table answers): the service as it runs by default
# (frame queries a lookup in the round's neighbours table, image queries searched), then the frame queries
# searched by the shards, as every frame query is where the table cannot answer (serve.neighbours_table).
SERVICES = ((1, "exact", True), (2, "exact", True), (2, "ivf", True), (1, "exact", False), (2, "exact", False))
K = 10
# Per setting: a p99 from hundreds of samples, so that it is not one slow request (fewer where MAX_SECONDS
# ends a slow setting first: each setting's ``requests`` says how many).
FRAME_REQUESTS = 1000
IMAGE_REQUESTS = 400
MAX_SECONDS = 25  # per setting: bounded load on a shared machine
RECALL_QUERIES = 1000
GOALS = {"frame_p99_ms": 100.0, "image_p99_ms": 300.0, "overhead_ms": 10.0, "ann_recall_at_10": 0.95}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds_by_role() -> dict[str, float]:
    """CPU seconds used so far by this machine's processes, by role: Serve's HTTP proxy, each replica of the
    service (by deployment), the load generator (this process) and everything else (Ray's own daemons, the
    rest of the machine). Read from Linux's /proc; empty elsewhere."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            name = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if int(entry.name) == os.getpid():
            role = "load generator"
        elif name.startswith("ray::ProxyActor"):
            role = "proxy"
        elif name.startswith("ray::ServeReplica:"):
            role = name.rsplit(":", 1)[1]
        else:
            role = "other"
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def closed_loop(port: int, requests: list[tuple[str, str, bytes | None]], concurrency: int) -> dict:
    """Send ``requests`` (method, path, body) from ``concurrency`` keep-alive clients; qps, latencies and the
    CPU each role of the service spent per answered request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    position = iter(range(len(requests)))
    deadline = time.perf_counter() + MAX_SECONDS

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            with lock:
                i = next(position, None)
            if i is None:
                break
            method, path, body = requests[i]
            t0 = time.perf_counter()
            conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"} if body else {})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - t0
            with lock:
                (latencies.append(elapsed) if response.status == 200 else errors.append(str(response.status)))
        conn.close()

    cpu_before = cpu_seconds_by_role()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu = {role: (seconds - cpu_before.get(role, 0.0)) * 1000 / max(1, len(latencies))
           for role, seconds in cpu_seconds_by_role().items()}
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors),
            "qps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "cpu_ms_per_request": {role: round(v, 2) for role, v in sorted(cpu.items(), key=lambda rv: -rv[1])
                                   if v >= 0.05},
            "cpu_cores_busy": round(sum(cpu.values()) * len(latencies) / 1000 / wall, 2)}


def in_process_search_ms(features: np.ndarray, queries: np.ndarray, threads: int) -> float:
    """p50 of one exact top-(K+1) search per query over all features, in this process, on ``threads``
    BLAS threads (those of the one-shard service's replica). Unlike the replica's, they spin between queries
    as BLAS does by default, which only makes this reference faster."""
    from threadpoolctl import threadpool_limits

    index = build_index(features, "exact")
    times = []
    with threadpool_limits(limits=threads):
        for q in queries:
            t0 = time.perf_counter()
            index.search(features[q][None], K + 1)
            times.append(time.perf_counter() - t0)
    return float(np.percentile(np.asarray(times) * 1000, 50))


def in_process_lookup_ms(run: str, round_index: int, queries: np.ndarray) -> float:
    """p50 of one frame query's answer looked up in the round's neighbours table, in this process."""
    answers, why_not = search.read_neighbour_answers(run, round_index)
    if answers is None:
        sys.exit(f"the neighbours table cannot answer frame queries: {why_not}")
    times = []
    for q in queries:
        t0 = time.perf_counter()
        answers.answer(int(q), K)
        times.append(time.perf_counter() - t0)
    return float(np.percentile(np.asarray(times) * 1000, 50))


def ann_recall(features: np.ndarray, queries: np.ndarray) -> dict:
    _, exact = build_index(features, "exact").search(features[queries], K)
    out = {}
    for kind in ("ivf", "hnsw") if "--hnsw" in sys.argv else ("ivf",):
        t0 = time.perf_counter()
        index = build_index(features, kind)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, rows = index.search(features[queries], K)
        out[kind] = {"recall_at_10": round(recall_at_k(rows, exact), 4), "build_s": round(built, 1),
                     "search_ms_per_query": round((time.perf_counter() - t0) * 1000 / len(queries), 3)}
    return out


def frame_images(run: str, frame_ids: np.ndarray) -> list[bytes]:
    from cliquecnn_ray.stages.train import read_frames

    table = read_frames(run, frame_ids=frame_ids, columns=[schema.FRAME_ID, schema.IMAGE])
    return table.column(schema.IMAGE).to_pylist()


def idle_threads_figures(frame: dict, image: dict, frame8: dict, image8: dict) -> dict:
    """The figures that tell sleeping from spinning idle threads apart, from one service's c=1 and c=8 runs."""
    return {"frame_c1_p50_ms": frame["p50_ms"], "frame_c1_cpu_ms": round(sum(frame["cpu_ms_per_request"].values()), 2),
            "image_c1_p50_ms": image["p50_ms"], "image_c1_cpu_ms": round(sum(image["cpu_ms_per_request"].values()), 2),
            "frame_c8_qps": frame8["qps"], "frame_c8_p99_ms": frame8["p99_ms"],
            "image_c8_qps": image8["qps"], "image_c8_p99_ms": image8["p99_ms"]}


def spinning_threads(run: str, round_index: int, port: int, threads: int, frame_requests: list,
                     image_requests: list) -> dict:
    """The one-shard exact service again, its replicas' BLAS and OpenMP threads left to spin between calls
    (their default; the service lets them sleep, ``service.IDLE_THREADS_ENV``), at concurrency 1 and 8."""
    from ray import serve

    from cliquecnn_ray import service

    sleeping, service.IDLE_THREADS_ENV = service.IDLE_THREADS_ENV, {}
    try:
        cfg = load_config(None, [f"run={run}", "serve.shards=1", "serve.index=exact", f"serve.port={port}",
                                 "serve.cpus_per_replica=0", f"serve.threads={threads}"])
        service.start(cfg, run, round_index)
        closed_loop(port, frame_requests[:40] + image_requests[:20], 4)  # the same warm-up as every setting
        runs = [closed_loop(port, requests, c) for c in (1, 8) for requests in (frame_requests, image_requests)]
        serve.delete(service.APP_NAME)
    finally:
        service.IDLE_THREADS_ENV = sleeping
    return idle_threads_figures(*runs)


def main() -> None:
    args = [a for a in sys.argv[1:] if a not in ("--no-diffusion", "--hnsw")]
    diffusion_from = None
    if "--diffusion-from" in args:
        at = args.index("--diffusion-from")
        diffusion_from = Path(args[at + 1])
        del args[at : at + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    run = args[0]
    raysetup.setup_logging()
    load_average = os.getloadavg()[0]
    round_index = search.servable_round(run)
    frame_ids, features = search.read_feature_slice(run, round_index, 0, search.feature_count(run, round_index))
    n, d = features.shape
    rng = np.random.default_rng(0)
    queries = rng.choice(n, size=min(RECALL_QUERIES, n), replace=False)
    ann = ann_recall(features, queries)

    frame_requests = [("GET", f"/api/frames/{int(frame_ids[q])}/similar?k={K}", None)
                      for q in rng.choice(n, size=FRAME_REQUESTS)]
    images = frame_images(run, np.sort(rng.choice(n, size=64, replace=False)))
    image_requests = [("POST", f"/api/search?k={K}", images[i % len(images)]) for i in range(IMAGE_REQUESTS)]

    from ray import serve

    from cliquecnn_ray import service

    raysetup.init_ray(num_cpus=2)
    port = _free_port()
    cores = os.cpu_count() or 1
    settings = []
    for shards, kind, table in SERVICES:
        # Each shard's search gets its share of the cores, as on a node of its own (Ray would give a replica
        # that reserves no CPU one thread); the load generator shares them.
        threads = max(1, cores // shards)
        cfg = load_config(None, [f"run={run}", f"serve.shards={shards}", f"serve.index={kind}", f"serve.port={port}",
                                 "serve.cpus_per_replica=0", f"serve.threads={threads}",
                                 f"serve.neighbours_table={str(table).lower()}"])
        service.start(cfg, run, round_index)
        closed_loop(port, frame_requests[:40] + image_requests[:20], 4)  # warm-up: caches, batching, JIT paths
        # Each reference right before the figure it is subtracted from.
        if shards == 1 and kind == "exact" and table:
            lookup_ms = in_process_lookup_ms(run, round_index, queries[:200])
        if shards == 1 and kind == "exact" and not table:
            reference_ms = in_process_search_ms(features, queries[:200], threads)
        answered_by = "table" if table else "search"
        for concurrency in CONCURRENCY:
            frame = closed_loop(port, frame_requests, concurrency)
            # Image queries are searched whatever the table setting: measured once per index setting.
            image = closed_loop(port, image_requests, concurrency) if table else None
            settings.append({"shards": shards, "index": kind, "threads_per_replica": threads,
                             "frame_answers": answered_by, "concurrency": concurrency, "frame": frame,
                             "image": image})
            print(f"{kind:>5} shards {shards} frames by {answered_by:>6} c={concurrency:>2}: frame "
                  f"{frame['qps']:>7.1f} qps p50 {frame['p50_ms']:>7.2f} p99 {frame['p99_ms']:>7.2f} ms"
                  + (f" | image {image['qps']:>6.1f} qps p50 {image['p50_ms']:>7.2f} p99 {image['p99_ms']:>7.2f} ms"
                     if image else ""), flush=True)
        serve.delete(service.APP_NAME)
    spin = spinning_threads(run, round_index, port, cores, frame_requests, image_requests)
    # The same reference once more after every setting: how much the machine's speed drifted during the run.
    reference_end_ms = in_process_search_ms(features, queries[:200], cores)
    del features
    serve.shutdown()

    gain = None
    if diffusion_from is not None:
        measured = json.loads(diffusion_from.read_text())
        if Path(measured.get("run", run)).resolve() != Path(run).resolve():
            sys.exit(f"{diffusion_from} measured {measured['run']}, not {run}")
        gain = measured["diffusion_map_gain"]
    elif "--no-diffusion" not in sys.argv:
        from diffusion import measure_diffusion_gain

        gain = measure_diffusion_gain(run)["diffusion_map_gain"]

    def at(shards: int, concurrency: int, kind: str = "exact", answers: str = "table") -> dict:
        return next(s for s in settings if s["shards"] == shards and s["concurrency"] == concurrency
                    and s["index"] == kind and s["frame_answers"] == answers)

    headline = at(2, 8)  # the goals' concurrency, the sharded service, exact search, as the service runs
    approximate = at(2, 8, "ivf")
    searched = at(2, 8, answers="search")
    overhead = at(1, 1)["frame"]["p50_ms"] - lookup_ms
    overhead_searched = at(1, 1, answers="search")["frame"]["p50_ms"] - reference_ms
    results = {
        "frame_qps": headline["frame"]["qps"],
        "frame_p50_ms": headline["frame"]["p50_ms"],
        "frame_p99_ms": headline["frame"]["p99_ms"],
        "image_qps": headline["image"]["qps"],
        "image_p50_ms": headline["image"]["p50_ms"],
        "image_p99_ms": headline["image"]["p99_ms"],
        "overhead_ms": round(overhead, 2),
        "ann_recall_at_10": ann["ivf"]["recall_at_10"],
        "ann_index": "ivf (faiss IndexIVFFlat, ann.py defaults)",
        "shards": 2,
        "n": int(n),
        "d": int(d),
        "diffusion_map_gain": gain,
        "headline": ("frame_* and image_* at concurrency 8 with 2 shards, exact search, as the service runs: "
                     "frame queries answered from the round's neighbours table (k = 10 ≤ its k), image queries "
                     "searched; frame queries searched by the shards under 'frame_search_path'; the same with "
                     "the IVF index under 'ivf'; every setting under 'settings'"),
        "frame_search_path": {
            "frame_qps": searched["frame"]["qps"], "frame_p50_ms": searched["frame"]["p50_ms"],
            "frame_p99_ms": searched["frame"]["p99_ms"], "overhead_ms": round(overhead_searched, 2),
            "serve_frame_p50_ms_c1_1shard": at(1, 1, answers="search")["frame"]["p50_ms"],
            "cpu_ms_per_request": searched["frame"]["cpu_ms_per_request"],
            "goals_met": {"frame_p99_ms": searched["frame"]["p99_ms"] <= GOALS["frame_p99_ms"],
                          "overhead_ms": overhead_searched <= GOALS["overhead_ms"]},
            "about": ("frame queries searched by the shards (serve.neighbours_table=false; what every frame query "
                      "with k above the table's, or re-ranked, costs): fetch the frame's feature, fan out, merge; "
                      "overhead_ms against the in-process exact search"),
        },
        "ivf": {"frame_qps": approximate["frame"]["qps"], "frame_p50_ms": approximate["frame"]["p50_ms"],
                "frame_p99_ms": approximate["frame"]["p99_ms"], "image_qps": approximate["image"]["qps"],
                "image_p50_ms": approximate["image"]["p50_ms"], "image_p99_ms": approximate["image"]["p99_ms"],
                "goals_met": {"frame_p99_ms": approximate["frame"]["p99_ms"] <= GOALS["frame_p99_ms"],
                              "image_p99_ms": approximate["image"]["p99_ms"] <= GOALS["image_p99_ms"]}},
        "cpu_ms_per_request": {"frame": headline["frame"]["cpu_ms_per_request"],
                               "image": headline["image"]["cpu_ms_per_request"],
                               "about": ("at the headline setting: CPU milliseconds each role spent per answered "
                                         "request; their sum bounds the queries per second the machine's cores "
                                         "can answer")},
        "idle_threads": {
            "sleep": idle_threads_figures(at(1, 1)["frame"], at(1, 1)["image"], at(1, 8)["frame"], at(1, 8)["image"]),
            "spin": spin,
            "about": ("1 shard, exact search, cores BLAS threads per replica: the replicas' idle BLAS and OpenMP "
                      "threads sleep (the service's setting) or spin (their default); *_cpu_ms: CPU per "
                      "answered request summed over every role"),
        },
        "in_process_lookup_p50_ms": round(lookup_ms, 4),
        "in_process_exact_search_p50_ms": round(reference_ms, 3),
        "in_process_exact_search_p50_ms_at_end": round(reference_end_ms, 3),
        "serve_frame_p50_ms_c1_1shard": at(1, 1)["frame"]["p50_ms"],
        "ann": ann,
        "settings": settings,
        "goals": GOALS,
        "goals_met": {
            "frame_p99_ms": headline["frame"]["p99_ms"] <= GOALS["frame_p99_ms"],
            "image_p99_ms": headline["image"]["p99_ms"] <= GOALS["image_p99_ms"],
            "overhead_ms": overhead <= GOALS["overhead_ms"],
            "ann_recall_at_10": ann["ivf"]["recall_at_10"] >= GOALS["ann_recall_at_10"],
        },
        "run": run,
        "round": round_index,
        "machine": (f"{cores} cores, load average {load_average:.1f} at the start; the service, its "
                    "replicas (0 CPUs reserved each, cores // shards BLAS threads per replica) and the load "
                    "generator share them"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nn = {n}, d = {d}; frame queries from the table: in-process lookup p50 {lookup_ms:.3f} ms, Serve p50 at "
          f"c=1 {at(1, 1)['frame']['p50_ms']:.2f} ms → overhead {overhead:.2f} ms (goal ≤ 10); searched: in-process "
          f"exact search p50 {reference_ms:.2f} ms ({reference_end_ms:.2f} ms after every setting), Serve p50 at "
          f"c=1 {at(1, 1, answers='search')['frame']['p50_ms']:.2f} ms → overhead {overhead_searched:.2f} ms")
    for kind in ("frame", "image"):
        spent = results["cpu_ms_per_request"][kind]
        print(f"c=8, 2 shards, {kind} queries: CPU ms per request {sum(spent.values()):.1f} = "
              + ", ".join(f"{role} {v:.1f}" for role, v in spent.items()))
    sleep, spin = results["idle_threads"]["sleep"], results["idle_threads"]["spin"]
    print(f"1 shard, idle threads sleep vs spin: frame c=1 p50 {sleep['frame_c1_p50_ms']} vs {spin['frame_c1_p50_ms']} "
          f"ms, CPU {sleep['frame_c1_cpu_ms']} vs {spin['frame_c1_cpu_ms']} ms per request "
          f"(spin / sleep {spin['frame_c1_cpu_ms'] / sleep['frame_c1_cpu_ms']:.2f}); c=8 frame p99 "
          f"{sleep['frame_c8_p99_ms']} vs {spin['frame_c8_p99_ms']} ms, image p99 {sleep['image_c8_p99_ms']} vs "
          f"{spin['image_c8_p99_ms']} ms")
    recalls = ", ".join(f"{kind} {a['recall_at_10']:.3f}" for kind, a in ann.items())
    print(f"ANN recall@10: {recalls} (goal ≥ 0.95)")
    print(f"c=8, 2 shards: frame p99 {results['frame_p99_ms']} ms (goal ≤ 100; searched by the shards "
          f"{searched['frame']['p99_ms']} ms), image p99 {results['image_p99_ms']} "
          f"ms (goal ≤ 300); with IVF: frame p99 {results['ivf']['frame_p99_ms']} ms, image p99 "
          f"{results['ivf']['image_p99_ms']} ms; diffusion_map_gain {gain}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
