"""Scale benchmark (issue 6): round 0 up to batches on synthetic data shaped like Olympic Sports.

    .venv/bin/python benchmarks/scale.py                       # N ≈ 28k, 57k, 113,516 (the full data set)
    .venv/bin/python benchmarks/scale.py --sizes 5000,10000    # a quick check

Data: Olympic Sports has 113,516 frames in 16 categories (the per-category counts are the line counts of
``cliquecnn_ray/data/olympic_sports/image_pathes/imagePaths_<category>.txt``; the folder of each line is its
video). At size N every category gets round(N · its share) frames, made of videos whose lengths are drawn
from that category's real video lengths (at full size exactly its real videos). Frames are 32×32 grey PNGs
with the structure the method looks for: each category has a movement of 24 keyframes (two gratings and a
bright blob, the "athlete", per keyframe); every video performs it once at its own pace, cross-fading from
keyframe to keyframe, with its own small shift, contrast and noise. So the same moment in two videos is
similar and different moments are not, and every category yields its K cliques even when scaled down to a
few videos. One Parquet source file per category.

Pipeline: ingest → features (HOG-LDA at 32 px, d = 324) → neighbours (k = 50) → cliques (K = 100 per
category) → batches (B = 100 per category, r = 20; paper Sect. 3.1), round 0, on an embedded local Ray with
all cores of this machine. Each size runs in a fresh process with a fresh Ray, so memory never carries over.

Measured per size: each stage's wall time (the driver's call, including Ray scheduling); peak memory: every
0.2 s the sum of PSS (proportional set size, /proc/<pid>/smaps_rollup) over the benchmark process and all
its descendants — the driver, gcs_server, raylet (which holds the object store), dashboard and every Ray
worker. PSS splits shared pages (the object store's shared memory, shared libraries) between the processes
that map them, so the sum counts each page once; the sum of RSS (which counts shared pages once per
process) is reported beside it. ``idle_mem_gb`` is the same sum with Ray started and no stage run.
Exponents: least-squares slope of log(peak memory) and log(total stage seconds) against log N.
Writes benchmarks/results/scale.json: runs [{n, stage_seconds, peak_mem_gb, ...}], mem_exponent,
time_exponent (+ per-stage time exponents and the memory exponent above idle).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
PATHS = ROOT / "cliquecnn_ray" / "data" / "olympic_sports" / "image_pathes"
STAGES = ("ingest", "features", "neighbours", "cliques", "batches")
FULL_SIZES = "28379,56758,113516"  # the full data set and its half and quarter
FRAME_SIZE = 32
# Stated in full so the JSON says what ran; the paper's K = 100, B = 100, r = 20 (Sect. 3.1), per category.
OVERRIDES = [
    "rounds=1",
    f"features.image_size={FRAME_SIZE}",
    "neighbours.k=50",
    "cliques.num_cliques=100",
    "cliques.target_size=20",
    "cliques.neighbourhood=20",
    "batches.num_batches=100",
    "batches.cliques_per_batch=20",
    "resources.cpus_per_task=1",
]


# ---------------------------------------------------------------------------------------------
# Data


def olympic_videos() -> dict[str, list[int]]:
    """{category: frame counts of its videos, in file order} from the Olympic Sports image lists."""
    out = {}
    for path in sorted(PATHS.glob("imagePaths_*.txt")):
        counts = collections.Counter(os.path.dirname(line.strip()) for line in path.open() if line.strip())
        out[path.stem[len("imagePaths_"):]] = list(counts.values())
    return out


def category_sizes(n: int, videos: dict[str, list[int]]) -> dict[str, int]:
    """Split n frames over the categories in proportion to their real sizes (largest remainders)."""
    total = sum(sum(v) for v in videos.values())
    exact = {c: n * sum(v) / total for c, v in videos.items()}
    sizes = {c: int(x) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: sizes[c] - exact[c])[: n - sum(sizes.values())]:
        sizes[c] += 1
    return sizes


def video_lengths(target: int, real: list[int], rng: np.random.Generator) -> list[int]:
    """Video lengths summing to ``target``: the real ones when they fit exactly, else drawn from them."""
    if target == sum(real):
        return list(real)
    lengths = []
    while sum(lengths) < target:
        lengths.append(int(rng.choice(real)))
    lengths[-1] -= sum(lengths) - target
    return [x for x in lengths if x > 0]


POSTURES = 24  # keyframes of a category's movement (run-up, take-off, flight, landing, … in a real sport)


def category_postures(category: int, seed: int) -> np.ndarray:
    """(POSTURES, 32, 32) float32 prototype images of one category: each two gratings of random orientation
    and frequency plus a bright blob (the athlete) at a posture-specific place."""
    rng = np.random.default_rng([seed, 7919, category])
    s = FRAME_SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    out = np.empty((POSTURES, s, s), dtype=np.float32)
    for p in range(POSTURES):
        img = np.zeros((s, s), dtype=np.float32)
        for _ in range(2):
            angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.5, 4.0), rng.uniform(0, 2 * np.pi)
            img += rng.uniform(20, 40) * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        cx, cy = rng.uniform(0.2, 0.8, 2)
        out[p] = img + 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.1**2))
    return out


def synthetic_video(postures: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """(length, 32, 32) uint8: one execution of the category's movement. The video passes through the
    keyframes in order at its own pace (start and end drawn at random), cross-fading between neighbouring
    keyframes, with its own shift of a few pixels, contrast and noise; consecutive frames are near copies,
    the same moment of two videos is similar, different moments are not."""
    p = len(postures)
    u = np.linspace(rng.uniform(0, 2), rng.uniform(p - 3, p - 1), length)  # position along the movement
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, p - 1)
    w = (u - lo)[:, None, None].astype(np.float32)
    frames = (1 - w) * postures[lo] + w * postures[hi]
    frames = np.roll(frames, tuple(rng.integers(-2, 3, 2)), axis=(1, 2))
    frames = 128 + rng.uniform(0.8, 1.2) * frames + rng.normal(0, 6, frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_sources(folder: Path, n: int, seed: int = 0) -> Path:
    """One Parquet file per category under ``folder`` (reused when already written for this n and seed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = folder.parent / f"{folder.name}.done.json"  # beside the folder: ingest reads all of the folder
    if marker.exists() and json.loads(marker.read_text()) == {"n": n, "seed": seed}:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    videos = olympic_videos()
    sizes = category_sizes(n, videos)
    for ci, category in enumerate(sorted(videos)):
        rng = np.random.default_rng([seed, ci])
        postures = category_postures(ci, seed)
        video_ids, frame_index, images = [], [], []
        for vi, length in enumerate(video_lengths(sizes[category], videos[category], rng)):
            frames = synthetic_video(postures, length, rng)
            video_ids += [f"{category}_{vi:04d}"] * length
            frame_index.append(np.arange(length, dtype=np.int32))
            images += [_png(f) for f in frames]
        table = pa.table({
            "video_id": pa.array(video_ids, pa.string()),
            "frame_index": pa.array(np.concatenate(frame_index), pa.int32()),
            "category": pa.array([category] * len(video_ids), pa.string()),
            "image": pa.array(images, pa.binary()),
        })
        pq.write_table(table, folder / f"{ci:02d}_{category}.parquet")
    marker.write_text(json.dumps({"n": n, "seed": seed}))
    return folder


# ---------------------------------------------------------------------------------------------
# Memory of a process tree


def _tree(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    todo += [int(x) for x in fh.read().split()]
        except OSError:
            pass
    return out


def _pss_rss_kb(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            lines = fh.read().splitlines()[1:]  # the first line is the address range of the rollup
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


class MemorySampler(threading.Thread):
    """Samples Σ PSS and Σ RSS over ``root`` and its descendants every ``interval`` s; keeps the peak of
    the whole run and of the current window (``window()`` returns and resets it)."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_pss = self.peak_rss = self.win_pss = self.win_rss = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def sample(self) -> tuple[int, int]:
        pids = _tree(self.root)
        pss = rss = 0
        for pid in pids:
            p, r = _pss_rss_kb(pid)
            pss, rss = pss + p, rss + r
        self.max_procs = max(self.max_procs, len(pids))
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.win_pss, self.win_rss = max(self.win_pss, pss), max(self.win_rss, rss)
        return pss, rss

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def window(self) -> tuple[float, float]:
        self.sample()
        out = (self.win_pss / 2**20, self.win_rss / 2**20)
        self.win_pss = self.win_rss = 0
        return out

    def stop(self):
        self._halt.set()
        self.join()
        self.sample()


# ---------------------------------------------------------------------------------------------
# One size (in its own process)


def run_one(n: int, sources: Path, run: Path) -> dict:
    import shutil

    from cliquecnn_ray import raysetup
    from cliquecnn_ray.config import load_config
    from cliquecnn_ray.pipeline import stage_runner

    raysetup.setup_logging()
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(None, OVERRIDES + [f"run={run}", f"sources=[{sources}]"])
    sampler = MemorySampler(os.getpid())
    sampler.start()
    started = time.time()
    raysetup.init_ray(num_cpus=os.cpu_count())
    ray_start_s = time.time() - started
    time.sleep(2.0)  # let Ray's daemons settle before the idle figure
    idle_pss, idle_rss = sampler.window()
    seconds, stage_mem = {}, {}
    for name in STAGES:
        t0 = time.time()
        record = stage_runner(name)(cfg, round_index=0)
        seconds[name] = round(time.time() - t0, 2)
        pss, rss = sampler.window()
        stage_mem[name] = round(pss, 3)
        print(f"  n={n}: {name:<10} {seconds[name]:8.1f} s   peak {pss:6.2f} GB PSS ({rss:.2f} GB RSS)  "
              f"{json.dumps(record.get('stats', {}), default=str)[:160]}", flush=True)
    sampler.stop()
    import ray

    ray.shutdown()
    return {
        "n": n,
        "stage_seconds": seconds,
        "total_seconds": round(sum(seconds.values()), 2),
        "peak_mem_gb": round(sampler.peak_pss / 2**20, 3),
        "peak_rss_sum_gb": round(sampler.peak_rss / 2**20, 3),
        "idle_mem_gb": round(idle_pss, 3),
        "stage_peak_mem_gb": stage_mem,
        "ray_start_seconds": round(ray_start_s, 2),
        "processes_sampled_max": sampler.max_procs,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def exponent(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log n (None with fewer than two sizes or a non-positive y)."""
    if len(ns) < 2 or min(ys) <= 0:
        return None
    return round(float(np.polyfit(np.log(ns), np.log(ys), 1)[0]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=FULL_SIZES, help=f"comma-separated N (default {FULL_SIZES})")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_scale"), help="sources and runs go here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = parser.parse_args()
    workdir = Path(args.workdir)

    if args.one:
        result = run_one(args.one, workdir / f"sources_{args.one}", workdir / f"run_{args.one}")
        print("RESULT " + json.dumps(result), flush=True)
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    runs = []
    for n in sizes:
        t0 = time.time()
        write_sources(workdir / f"sources_{n}", n, args.seed)
        print(f"n={n}: synthetic sources ready in {time.time() - t0:.1f} s", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--workdir", str(workdir)],
                              stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"n={n}: the measuring process failed (exit {proc.returncode})")
        runs.append(json.loads(lines[-1][len("RESULT "):]))

    ns = [r["n"] for r in runs]
    results = {
        "runs": runs,
        "mem_exponent": exponent(ns, [r["peak_mem_gb"] for r in runs]),
        "time_exponent": exponent(ns, [r["total_seconds"] for r in runs]),
        "mem_exponent_above_idle": exponent(ns, [r["peak_mem_gb"] - r["idle_mem_gb"] for r in runs]),
        "stage_time_exponents": {s: exponent(ns, [r["stage_seconds"][s] for r in runs]) for s in STAGES},
        "config": OVERRIDES,
        "frame_size": FRAME_SIZE,
        "memory_method": "peak over 0.2 s samples of the sum of PSS (/proc/<pid>/smaps_rollup) over the "
                         "benchmark process and all its descendants (driver, GCS, raylet + object store, "
                         "Ray workers); peak_rss_sum_gb: the same with RSS (double-counts shared pages)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }

    print(f"\n{'N':>8} " + " ".join(f"{s:>10}" for s in STAGES) + f" {'total s':>9} {'peak GB':>8} {'idle GB':>8}")
    for r in runs:
        print(f"{r['n']:>8} " + " ".join(f"{r['stage_seconds'][s]:>10.1f}" for s in STAGES)
              + f" {r['total_seconds']:>9.1f} {r['peak_mem_gb']:>8.2f} {r['idle_mem_gb']:>8.2f}")
    print(f"time ∝ N^{results['time_exponent']}, peak memory ∝ N^{results['mem_exponent']} "
          f"(above idle: N^{results['mem_exponent_above_idle']}); per stage: {results['stage_time_exponents']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
