"""Configuration: one frozen dataclass per stage, a pipeline config holding them, YAML + overrides.

YAML files state only what differs from the defaults; ``key=value`` overrides use dotted paths
(``train.lr=0.01``, ``rounds=2``) and are type-checked against the dataclass fields. Unknown keys are
an error that names the key. Every default carries a one-line reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def setting(default: Any, *, min: Any = None, above: Any = None, max: Any = None, hashed: bool = True,  # noqa: A002
            added_later: bool = False) -> Any:
    """A field with its constraints beside it, checked when the config loads (``min``/``max`` inclusive,
    ``above`` exclusive; on a list, each entry). ``added_later``: a field whose default keeps the behaviour
    from before it existed enters the config hash only when set away from that default, so that runs
    committed before it was added are still recognised as done."""
    checks = {k: v for k, v in (("min", min), ("above", above), ("max", max)) if v is not None}
    return field(default=default, metadata={"hashed": hashed, "added_later": added_later, **checks})


def not_hashed(default: Any, **checks: Any) -> Any:
    """A field that changes how the work runs, never its result (block sizes, actor counts, logging):
    marked so that the run directory's config hash leaves it out, and re-tiling a job does not redo it."""
    return setting(default, hashed=False, **checks)


@dataclass(frozen=True)
class ResourcesConfig:
    """What each Ray task asks for, so an autoscaler adds the right nodes (docs/architecture.md#the-stages)."""

    cpus_per_task: float = not_hashed(1.0, above=0)  # one core per similarity / CCCP / decode task is the natural grain
    gpus_for_training: bool = False  # CPU by default: CI and laptops have no GPU; set True on a GPU cluster
    gpus_for_impute: bool = False  # same as training: feature extraction uses a GPU only when asked


@dataclass(frozen=True)
class IngestConfig:
    frame_stride: int = setting(1, min=1)  # keep every frame: the paper uses all frames of each video
    max_frames: int = setting(0, min=0)  # 0 = no limit per video; set it to bound a quick look at long videos
    resize_to: int = setting(0, min=0)  # 0 = store frames at their size; >0 shrinks the longer side to this many pixels
    image_format: str = "png"  # lossless, so features do not depend on re-encoding
    on_bad_frame: str = "error"  # "error" stops on an undecodable frame; "skip" skips and lists it
    column_map: dict = field(default_factory=dict)  # Parquet sources: {source column: canonical column}
    category_from_folder: bool = False  # folder tree whose first level is the category
    default_category: str = "all"  # a single category unless the data say otherwise (docs/architecture.md#categories)
    uri_roots: tuple = ()  # a `uri` column may also point below these folders / s3:// prefixes (besides its source's)
    motion_crop: bool = False  # still-camera videos: a bbox per frame around what moves (motion_crop.py)
    motion_threshold: float = setting(0.08, above=0, max=1)  # grey-level change (0..1) that counts as motion


@dataclass(frozen=True)
class FeaturesConfig:
    kind: str = "hog_lda"  # paper Sect. 2.1: whitened HOG; also "hog" (unwhitened) and "raw" pixels
    image_size: int = setting(64, min=8)  # frames resized to 64×64 grey before HOG (docs/method.md#hog-lda)
    hog_orientations: int = setting(9, min=1)  # Dalal–Triggs / skimage default
    hog_cell: int = setting(8, min=1)  # 8-pixel cells, as the authors' HOG-LDA
    hog_block: int = setting(2, min=1)  # 2×2-cell blocks, skimage default
    lda_lambda: float = setting(1.0, min=0)  # Σ = cov + λ·tr(cov)/D·I, scale-free (README: Benchmarks)
    batch_size: int = not_hashed(512, min=1)  # frames per Ray Data batch: large enough to amortise, small in memory
    stats_batch_size: int = setting(8192, min=1)  # frames per partial Σ sum and per output file


@dataclass(frozen=True)
class NeighboursConfig:
    k: int = setting(50, min=1)  # only the extremes of the similarity distribution are trusted (paper Fig. 4b)
    row_block: int = not_hashed(4096, min=1)  # rows per Ray task: seconds at Olympic Sports size; cheap retries
    col_block: int = not_hashed(32768, min=1)  # columns per tile: wide tiles amortise per-tile top-k work
    tile_rows: int = not_hashed(1024, min=1)  # rows per tile: a 1024 × 32768 fp32 tile is 128 MB, reused within a task
    across_categories: bool = False  # the paper learns per category; never mix them unless asked
    # Rounds ≥ 1 build their neighbours and cliques from (1 − w)·s_r + w·s_0; their output features stay s_r's.
    anchor_round0: float = setting(0.0, min=0, max=1, added_later=True)  # w; 0: the paper (method.md)


@dataclass(frozen=True)
class CliquesConfig:
    neighbourhood: int = setting(20, min=1)  # seed + its 20 nearest frames are clustered (paper: ~20 per clique)
    min_sim: float = setting(0.0, min=-1, max=1)  # complete linkage: every pair at least this similar (−1: size only)
    target_size: int = setting(20, min=1)  # paper Fig. 3: cliques of at least 20 samples... at most this many here
    min_size: int = setting(4, min=1)  # a clique of fewer frames teaches little
    max_per_video: int = setting(5, min=0)  # not one shot's frames; ≤ 0: no cap (docs/method.md#compact-cliques)
    num_cliques: int = setting(100, min=1)  # K, paper Sect. 3.1
    seeds_per_task: int = not_hashed(512, min=1)  # seeds per parallel Ray task
    max_seeds: int = setting(0, min=0)  # 0 = every frame seeds a clique (paper); >0 a seeded random subset
    max_size: int = setting(40, min=1)  # ≤ 2·target_size: overlaps merge, chains do not grow into classes
    max_covered: float = setting(0.5, min=0, max=1)  # skip a clique whose frames are mostly in already chosen ones
    selection: str = "spread"  # one clique per k-means group of clique means: K cliques cover the data; "compact"


@dataclass(frozen=True)
class BatchesConfig:
    num_batches: int = setting(100, min=1)  # B per category, paper Sect. 3.1
    cliques_per_batch: int = setting(20, min=1)  # r, paper Sect. 3.1
    p: float = setting(0.0625, above=0)  # p = 1/16 approximates a step function (paper Sect. 2.3)
    lambda1: float = setting(1.0, min=0)  # per-batch coverage, relative to the S' term (both scaled at random X)
    lambda2: float = setting(4.0, min=0)  # total coverage: the relaxation credits unused cliques ~65% (0.001^p)
    lambda3: float = setting(2.0, min=0)  # push to binary; 1: binary X stable for any K/r (cccp.make_problem)
    lambda3_start: float = setting(0.0625, above=0)  # λ3 doubles from here each CCCP step: X is arranged while soft
    solver: str = "fast"  # "fast" (torch, diagonally scaled projected gradient); "exact" (cvxpy + Clarabel)
    cccp_iters: int = setting(30, min=1)  # CCCP outer iterations; paper scale needs fewer (cccp.json: paper_fast_iters)
    cccp_tol: float = setting(1e-4, min=0)  # stop when f changes by less than this (relative) once λ3 is at its value
    restarts: int = setting(4, min=1)  # independent random starts, solved as parallel Ray tasks; best objective wins
    seed: int = 0  # seeds the restarts: same seed, same batches


@dataclass(frozen=True)
class TrainConfig:
    model: str = "alexnet_small"  # AlexNet-style from scratch (paper); any torchvision classifier by name
    input_size: int = setting(64, min=8)  # network input in pixels; 64 keeps CPU training affordable
    images_per_step: int = setting(128, min=1)  # M, paper Sect. 3.1
    balance_cliques: bool = True  # M spread evenly over a batch's cliques; False: uniform over their frames
    steps: int = setting(300, min=0)  # SGD steps per round; the paper's 1e5 is a GPU budget
    round_steps: tuple[int, ...] = setting((), min=0)  # steps of round r where listed, `steps` beyond
    optimizer: str = "adagrad"  # paper: AdaGrad, lr 0.001; "sgd" uses momentum (Eq. 8)
    lr: float = setting(0.001, above=0)  # paper Sect. 3.1; ten times more from scratch makes the loss spike early
    lr_round_decay: float = setting(1.0, above=0)  # round r trains at lr · decay^r: its optimiser restarts
    fresh_rounds: bool = setting(False, added_later=True)  # later rounds train anew, not from the last (paper)
    replay_round0: bool = setting(False, added_later=True)  # later rounds also train on round 0's batches (method.md)
    head_warmup_steps: int = setting(100, min=0)  # of `steps`, head-only after a round (its new head is random)
    head_warmup_lr: float = setting(0.005, above=0)  # head lr then: a random head catches up with a trained backbone
    momentum: float = setting(0.9, min=0, max=1)  # μ of Eq. 8 when optimizer = "sgd"
    weight_decay: float = setting(5e-4, min=0)  # λ r(W) of Eq. 7
    num_workers: int = setting(1, min=1)  # Ray Train workers (DDP); raise on a cluster
    checkpoint_every: int = not_hashed(100, min=1)  # steps between checkpoints; a failed worker loses at most this many
    max_failures: int = not_hashed(2, min=0)  # FailureConfig: restarts from the latest checkpoint before giving up
    fail_at_step: int = not_hashed(-1, min=-1)  # tests: the first attempt dies at this step (-1: never)
    seed: int = 0  # seeds weights and sampling
    grey: bool = True  # train on luminance like the HOG-LDA start; False: RGB (in_channels 3)
    log_every: int = not_hashed(10, min=1)  # steps per logged mean loss in the stage's stats
    augment: bool = True  # paper Sect. 3.1: random translation, scaling, rotation, colour
    aug_rotate: float = setting(10.0, min=0)  # degrees, ±; small: a posture must stay the same posture
    aug_translate: float = setting(0.1, min=0)  # fraction of the side, ± per axis
    aug_scale: float = setting(0.1, min=0, max=1)  # zoom in [1 − s, 1 + s]
    aug_colour: float = setting(0.3, min=0, max=1)  # brightness and contrast factors in [1 − c, 1 + c]


@dataclass(frozen=True)
class ImputeConfig:
    feature_layer: str = "fc7"  # paper Sect. 3.1 measures similarities on fc7; also fc6, pool5 or a module name
    ltp_p: int = setting(3, min=0)  # temporal window ±p frames (paper Sect. 3.1); 0 for data without videos
    batch_size: int = not_hashed(256, min=1)  # images per forward pass
    num_actors: int = not_hashed(1, min=1)  # Ray Data actors holding the model; one per GPU on a cluster


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion re-ranking (Iscen et al., CVPR 2017) on the round's reciprocal k-NN graph."""

    alpha: float = 0.9  # α of (I − αS)f = y; overridden by benchmarks/diffusion.py's validation choice
    k: int = 20  # graph neighbours per frame and the query's seeds; ≤ neighbours.k (the table it reads)
    gamma: float = 3.0  # affinities and the query's signal raised to γ = 3, as the paper
    truncate: int = 10000  # initial results diffused per query (paper's truncation): more of the manifold, still not N


@dataclass(frozen=True)
class EvaluateConfig:
    labels: str = ""  # labels table (Parquet path/URI); empty = no evaluation. Training never reads it
    knn_k: int = setting(5, min=1)  # k-NN classification, paper's PASCAL protocol
    category: str = ""  # evaluate one category only ("" = all)
    pearson: bool = True  # similarity = Pearson correlation (centre + L2-normalise each vector), paper's protocol
    exclude_same_video: bool = False  # True: a query's candidates exclude its own clip's frames (cross-video)
    memory_mb: int = not_hashed(1024, min=1)  # per task, for rows and ranks (~160 B per entry): sets row blocks
    queries_per_task: int = not_hashed(4096, min=1)  # query rows per Ray task: tasks of seconds, enough to spread
    rerank: str = "none"  # "diffusion": each query's top results re-ranked on the k-NN graph (needs neighbours)
    diffusion: DiffusionConfig = DiffusionConfig()


@dataclass(frozen=True)
class ServeConfig:
    """The search service (``cliquecnn serve``); nothing here changes a stage's output."""

    host: str = not_hashed("127.0.0.1")  # local only unless asked: the API has no authentication
    port: int = not_hashed(8000)  # Ray Serve's HTTP port
    shards: int = not_hashed(1)  # index replicas, each holding 1/shards of the features (memory per node)
    index: str = not_hashed("exact")  # exact inner product; "ivf" / "hnsw" (faiss) for millions of frames
    max_k: int = not_hashed(100)  # largest k a client may ask for
    default_k: int = not_hashed(20)  # k when the client names none
    max_batch_size: int = not_hashed(16)  # ingress calls (each the uploads that came together) per forward pass
    batch_wait_ms: float = not_hashed(5.0)  # how long a batch waits to fill: latency traded for throughput
    max_upload_mb: float = not_hashed(10.0)  # larger uploads are refused (413)
    thumbnail_size: int = not_hashed(96)  # thumbnail side in pixels
    cpus_per_replica: float = not_hashed(1.0)  # CPUs each replica reserves (cut to fit this machine without --address)
    threads: int = not_hashed(0, min=0)  # BLAS / torch threads per replica; 0: one per reserved CPU (≥ 1), as Ray does
    gpu: bool = not_hashed(False)  # embed image queries on a GPU
    neighbours_table: bool = not_hashed(True)  # frame queries the committed neighbours table answers: a lookup


@dataclass(frozen=True)
class DatasetConfig:
    """Size of a generated built-in data set (``sources: [moving_fashion_mnist]``); its seed is the run's."""

    train_clips: int = setting(3000, min=2)  # 3,000 + 500 clips = 70,000 frames, as many as Fashion-MNIST
    test_clips: int = setting(500, min=1)  # clips of test images, whose labels only the evaluation reads


@dataclass(frozen=True)
class PipelineConfig:
    run: str = "runs/demo"  # run directory: local path or s3://bucket/prefix
    sources: tuple = ()  # what to ingest: video files, image folders, Parquet paths/URIs
    rounds: int = setting(3, min=0)  # paper Sect. 2.6: converges in fewer than four rounds
    seed: int = 0  # one seed for the run; stages derive theirs from it
    dataset: DatasetConfig = DatasetConfig()
    ingest: IngestConfig = IngestConfig()
    features: FeaturesConfig = FeaturesConfig()
    neighbours: NeighboursConfig = NeighboursConfig()
    cliques: CliquesConfig = CliquesConfig()
    batches: BatchesConfig = BatchesConfig()
    train: TrainConfig = TrainConfig()
    impute: ImputeConfig = ImputeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    resources: ResourcesConfig = ResourcesConfig()
    serve: ServeConfig = ServeConfig()


# ---------------------------------------------------------------------------------------------
# Loading and overriding


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Coerce ``value`` to ``annotation`` where lossless, else raise ConfigError naming ``key``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Optional": Optional, "Union": Union})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} fits none of {annotation}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' wants true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' wants an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}' wants a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"config key '{key}' wants a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' wants a string, got {value!r}")
    if annotation in (tuple, list) or origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' wants a list, got {value!r}")
        entry = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if entry:
            return tuple(_check_type(v, entry[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}' wants a mapping, got {value!r}")
    return value


# Keys that have moved, and where to: named in the error a config with the old key gets.
MOVED = {"train.feature_layer": "moved to impute.feature_layer: the layer imputed from, not part of training"}


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict; unknown keys raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{prefix}{key}"
        if key not in fields:
            moved = f" ({MOVED[path]})" if path in MOVED else ""
            raise ConfigError(f"unknown config key '{path}'{moved} (known: {', '.join(sorted(fields))})")
        hint = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give it a mapping, got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{path}.")
        else:
            kwargs[key] = _check_range(_check_type(value, hint, path), fields[key].metadata, path)
    return cls(**kwargs)


def _check_range(value: Any, checks: Any, key: str) -> Any:
    """The field's declared bounds (``setting(min=, above=, max=)``), on each entry of a list."""
    for i, entry in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
        where = key if i is None else f"{key}[{i}]"
        if "min" in checks and entry < checks["min"]:
            raise ConfigError(f"config key '{where}' must be at least {checks['min']}, got {entry!r}")
        if "above" in checks and entry <= checks["above"]:
            raise ConfigError(f"config key '{where}' must be greater than {checks['above']}, got {entry!r}")
        if "max" in checks and entry > checks["max"]:
            raise ConfigError(f"config key '{where}' must be at most {checks['max']}, got {entry!r}")
    return value


def to_dict(config: Any) -> dict:
    """Nested plain dict of a config dataclass (tuples become lists, for YAML/JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML, so 3 is int, 0.5 float, true bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is not a section")
    node[path[-1]] = value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Defaults ← YAML file (if any) ← ``key=value`` overrides, type-checked."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    for text in overrides or []:
        keys, value = parse_override(text)
        merge(data, keys, value)
    return from_dict(PipelineConfig, data)


def hashed_view(config: Any) -> Any:
    """What of a config changes results, as plain JSON data: dataclasses (also inside dicts and lists)
    without their ``not_hashed`` fields, nor their ``added_later`` fields left at the default."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: hashed_view(getattr(config, f.name))
                for f in dataclasses.fields(config) if f.metadata.get("hashed", True)
                and not (f.metadata.get("added_later") and getattr(config, f.name) == f.default)}
    if isinstance(config, dict):
        return {str(k): hashed_view(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [hashed_view(v) for v in config]
    return config


def config_hash(config: Any) -> str:
    """Stable short hash of what of a config changes results (``hashed_view``), used by the run
    directory's skip rule."""
    blob = json.dumps(hashed_view(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
