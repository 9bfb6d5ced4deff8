"""Configuration: one frozen dataclass per stage, a pipeline config holding them, YAML + overrides.

YAML files state only what differs from the defaults; ``key=value`` overrides use dotted paths
(``train.lr=0.01``, ``rounds=2``) and are type-checked against the dataclass fields. Unknown keys are
an error that names the key. Every default carries a one-line reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def not_hashed(default: Any) -> Any:
    """A field that changes how the work runs, never its result (block sizes, actor counts, logging):
    marked so that the run directory's config hash can leave it out."""
    return field(default=default, metadata={"hashed": False})


@dataclass(frozen=True)
class ResourcesConfig:
    """What each Ray task asks for, so an autoscaler adds the right nodes (docs/architecture.md#the-stages)."""

    cpus_per_task: float = 1.0  # one core per similarity / CCCP / decode task is the natural grain
    gpus_for_training: bool = False  # CPU by default: CI and laptops have no GPU; set True on a GPU cluster
    gpus_for_impute: bool = False  # same as training: feature extraction uses a GPU only when asked


@dataclass(frozen=True)
class IngestConfig:
    frame_stride: int = 1  # keep every frame: the paper uses all frames of each video
    max_frames: int = 0  # 0 = no limit per video; set it to bound a quick look at long videos
    resize_to: int = 0  # 0 = store frames at their size; >0 shrinks the longer side to this many pixels
    image_format: str = "png"  # lossless, so features do not depend on re-encoding
    on_bad_frame: str = "error"  # "error" stops on an undecodable frame; "skip" skips and lists it
    column_map: dict = field(default_factory=dict)  # Parquet sources: {source column: canonical column}
    category_from_folder: bool = False  # folder tree whose first level is the category
    default_category: str = "all"  # a single category unless the data say otherwise (docs/architecture.md#categories)


@dataclass(frozen=True)
class FeaturesConfig:
    kind: str = "hog_lda"  # paper Sect. 2.1: whitened HOG; also "hog" (unwhitened) and "raw" pixels
    image_size: int = 64  # frames resized to 64×64 grey before HOG (docs/method.md#hog-lda)
    hog_orientations: int = 9  # Dalal–Triggs / skimage default
    hog_cell: int = 8  # 8-pixel cells, as the authors' HOG-LDA
    hog_block: int = 2  # 2×2-cell blocks, skimage default
    lda_lambda: float = 0.02  # Σ + λI as in the authors' MATLAB HOG-LDA; keeps Σ invertible
    batch_size: int = 512  # frames per Ray Data batch: large enough to amortise, small in memory
    stats_batch_size: int = 8192  # frames per partial Σ sum and per output file: few partials, few files


@dataclass(frozen=True)
class NeighboursConfig:
    k: int = 50  # only the extremes of the similarity distribution are trusted (paper Fig. 4b)
    row_block: int = 4096  # rows per Ray task: ~6 s of one core at N = 113k, d = 512; little lost on a retry
    col_block: int = 32768  # columns per tile: wide tiles amortise the per-tile top-k work (gemm_ratio)
    tile_rows: int = 1024  # rows per tile: a 1024 × 32768 fp32 tile is 128 MB, reused within a task
    across_categories: bool = False  # the paper learns per category; never mix them unless asked


@dataclass(frozen=True)
class CliquesConfig:
    neighbourhood: int = 20  # seed + its 20 nearest frames are clustered (paper: ~20 per clique)
    min_sim: float = 0.0  # complete-linkage cut: every pair in a clique at least this similar (−1: size only)
    target_size: int = 20  # paper Fig. 3: cliques of at least 20 samples... at most this many here
    min_size: int = 4  # a clique of fewer frames teaches little
    max_per_video: int = 5  # stop a clique from being neighbouring frames of one shot (docs/method.md#compact-cliques)
    num_cliques: int = 100  # K, paper Sect. 3.1
    seeds_per_task: int = 512  # seeds per parallel Ray task
    max_seeds: int = 0  # 0 = every frame of a category seeds a clique (paper); >0 a seeded random subset
    max_size: int = 40  # merged cliques stay ≤ 2·target_size: overlaps merge, chains do not grow into classes
    max_covered: float = 0.5  # selection skips a clique whose frames are mostly in already chosen ones
    selection: str = "spread"  # one clique per k-means group of clique means, so K cliques cover all the data; "compact"


@dataclass(frozen=True)
class BatchesConfig:
    num_batches: int = 100  # B per category, paper Sect. 3.1
    cliques_per_batch: int = 20  # r, paper Sect. 3.1
    p: float = 0.0625  # p = 1/16 approximates a step function (paper Sect. 2.3)
    lambda1: float = 1.0  # per-batch coverage, relative to the S' term (both scaled by their size at random X)
    lambda2: float = 4.0  # total coverage: the relaxation credits unused cliques ~65% (0.001^p), so weigh it up
    lambda3: float = 2.0  # push to binary; 1 = where binary X becomes stable for any K/r (batches.make_problem)
    lambda3_start: float = 0.0625  # continuation: λ3 doubles from here each CCCP step, so X is arranged while soft
    solver: str = "fast"  # "fast" (torch, diagonally scaled projected gradient); "exact" (cvxpy + Clarabel)
    cccp_iters: int = 30  # CCCP outer iterations; the paper-scale instance converges in ~10
    cccp_tol: float = 1e-4  # stop when f changes by less than this (relative) once λ3 is at its value
    restarts: int = 4  # independent random starts, solved as parallel Ray tasks; best objective wins
    seed: int = 0  # seeds the restarts: same seed, same batches


@dataclass(frozen=True)
class TrainConfig:
    model: str = "alexnet_small"  # AlexNet-style from scratch (paper); any torchvision classifier by name
    input_size: int = 64  # network input in pixels; 64 keeps CPU training affordable
    feature_layer: str = "fc7"  # paper Sect. 3.1 measures similarities on fc7; also fc6, pool5 or a module name
    images_per_step: int = 128  # M, paper Sect. 3.1
    balance_cliques: bool = True  # M spread evenly over a batch's cliques; False: uniform over their frames
    steps: int = 300  # SGD steps per round; the paper's 1e5 is a GPU budget
    round_steps: tuple = ()  # steps of round r where listed (e.g. [1200, 400, 400]), `steps` beyond the list
    optimizer: str = "adagrad"  # paper: AdaGrad, lr 0.001; "sgd" uses momentum (Eq. 8)
    lr: float = 0.001  # paper Sect. 3.1; 0.01 from scratch spiked the loss 1.4 → 28 in the first steps
    lr_round_decay: float = 1.0  # round r trains at lr · decay^r: a new round's optimiser starts afresh on trained weights
    head_warmup_steps: int = 100  # of `steps`, head-only when starting from a previous round (its new head is random)
    head_warmup_lr: float = 0.005  # the head's lr during those steps: a random head must catch up with a trained backbone
    momentum: float = 0.9  # μ of Eq. 8 when optimizer = "sgd"
    weight_decay: float = 5e-4  # λ r(W) of Eq. 7
    num_workers: int = 1  # Ray Train workers (DDP); raise on a cluster
    checkpoint_every: int = 100  # steps between checkpoints; a failed worker loses at most this many
    max_failures: int = 2  # FailureConfig: restarts from the latest checkpoint before giving up
    fail_at_step: int = -1  # failure injection for tests: the first attempt dies at this step (-1: never)
    seed: int = 0  # seeds weights and sampling
    grey: bool = True  # train on luminance like the HOG-LDA start; False: RGB (in_channels 3)
    log_every: int = 10  # steps per logged mean loss in the stage's stats
    augment: bool = True  # paper Sect. 3.1: random translation, scaling, rotation, colour
    aug_rotate: float = 10.0  # degrees, ±; small: a posture must stay the same posture
    aug_translate: float = 0.1  # fraction of the side, ± per axis
    aug_scale: float = 0.1  # zoom in [1 − s, 1 + s]
    aug_colour: float = 0.3  # brightness and contrast factors in [1 − c, 1 + c]


@dataclass(frozen=True)
class ImputeConfig:
    ltp_p: int = 3  # temporal window ±p frames (paper Sect. 3.1); 0 for data without videos
    batch_size: int = 256  # images per forward pass
    num_actors: int = 1  # Ray Data actors holding the model; one per GPU on a cluster


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
    knn_k: int = 5  # k-NN classification, paper's PASCAL protocol
    category: str = ""  # evaluate one category only ("" = all)
    pearson: bool = True  # similarity = Pearson correlation (centre + L2-normalise each vector), paper's protocol
    memory_mb: int = 1024  # per task, for whole similarity rows and their ranks (~160 B per entry): sets row blocks
    queries_per_task: int = 4096  # query rows per Ray task: tasks of seconds, enough of them to spread
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
    max_batch_size: int = not_hashed(16)  # concurrent image queries embedded in one forward pass
    batch_wait_ms: float = not_hashed(5.0)  # how long a batch waits to fill: latency traded for throughput
    max_upload_mb: float = not_hashed(10.0)  # larger uploads are refused (413)
    thumbnail_size: int = not_hashed(96)  # thumbnail side in pixels
    cpus_per_replica: float = not_hashed(1.0)  # CPUs each index / embedding replica reserves
    gpu: bool = not_hashed(False)  # embed image queries on a GPU


@dataclass(frozen=True)
class PipelineConfig:
    run: str = "runs/demo"  # run directory: local path or s3://bucket/prefix
    sources: tuple = ()  # what to ingest: video files, image folders, Parquet paths/URIs
    rounds: int = 3  # paper Sect. 2.6: converges in fewer than four rounds
    seed: int = 0  # one seed for the run; stages derive theirs from it
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' wants a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' wants a string, got {value!r}")
    if annotation in (tuple, list) or origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"config key '{key}' wants a list, got {value!r}")
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}' wants a mapping, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (partial) nested dict; unknown keys raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        hint = typing.get_type_hints(cls)[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' is a section; give it a mapping, got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{path}.")
        else:
            kwargs[key] = _check_type(value, hint, path)
    return cls(**kwargs)


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


def config_hash(config: Any) -> str:
    """Stable short hash of a config dataclass (or dict), used by the run directory's skip rule."""
    payload = to_dict(config) if dataclasses.is_dataclass(config) else config
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
