"""Report stage: gathers the run's committed outputs into one HTML page with its PNGs, committed as the
stage ``<run>/report`` (``<run>/report/attempt-*/index.html``; ``<run>/report/index.html`` points at it).

It shows only evaluations made with the current config from the current features
(``evaluate.current_record``), and its fingerprint is made of what it shows, so it is rebuilt when any
of that changes and skipped otherwise.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .. import figures, html_report, schema, storage
from ..config import PipelineConfig
from ..lease import hold
from ..rundir import StageDir, run_stage, source_fingerprint
from ..similarity import similarity_tile
from . import evaluate

log = logging.getLogger(__name__)

NEIGHBOURS_SHOWN = 50  # paper Fig. 2 averages the 50 nearest neighbours
QUERIES_SHOWN = 4
NO_EVALUATION = "<p>No current evaluation (no labels configured, or none made with this config).</p>"


def _features(cfg: PipelineConfig, round_: int, stage: str = "features"):
    out = StageDir(cfg.run, round_, stage)
    if out.record() is None:
        return None
    return schema.table_to_features(out.read_table(), source=str(out))


def _metrics_rows(cfg: PipelineConfig, evaluations: dict[int, dict]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for r, record in evaluations.items():
        if record:
            name = "round 0 (HOG-LDA)" if r == 0 else f"round {r}" + (" (final)" if r == cfg.rounds else "")
            rows[name] = record["stats"]
    baselines = storage.join(cfg.run, "baselines.json")
    if storage.exists(baselines):
        for name, metrics in storage.read_json(baselines).items():
            rows[f"baseline: {name}"] = metrics
    return rows


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    """Commit the report of the run's current outputs (``round_index`` is unused: the report spans the run)."""
    evaluations = {r: evaluate.current_record(cfg, r) for r in range(cfg.rounds + 1)}
    for r, record in evaluations.items():
        if record is None and StageDir(cfg.run, r, "evaluate").record() is not None:
            log.warning("report: the round %d evaluation was made with another config or other features; "
                        "not shown (run evaluate again)", r)
    inputs = {f"evaluate round {r}": record["fingerprint"] for r, record in evaluations.items() if record}
    for r in range(cfg.rounds + 1):
        for name in ("features", "batches"):
            record = StageDir(cfg.run, r, name).record()
            if record:
                inputs[f"{name} round {r}"] = record["fingerprint"]
    inputs["frames"] = StageDir(cfg.run, 0, "frames").fingerprint()
    baselines = storage.join(cfg.run, "baselines.json")
    if storage.exists(baselines):
        inputs["baselines"] = source_fingerprint(baselines)
    out = StageDir(cfg.run, None, "report")
    with hold(cfg.run):
        record = run_stage(out, {"rounds": cfg.rounds, "seed": cfg.seed}, inputs,
                           lambda attempt_uri: _write_report(cfg, evaluations, attempt_uri), force=force)
        # <run>/report/index.html points at the committed page, so the report keeps one address.
        page = f"{record['attempt']}/index.html"
        storage.write_bytes(storage.join(out.uri, "index.html"),
                            f"<meta http-equiv='refresh' content='0; url={page}'><a href='{page}'>report</a>".encode())
    return record


def _write_report(cfg: PipelineConfig, evaluations: dict[int, Optional[dict]], out: str) -> dict:
    sections: list[tuple[str, str]] = []
    files: dict[str, bytes] = {}

    rows = _metrics_rows(cfg, evaluations)
    sections.append(("Metrics across rounds and baselines",
                     html_report.metrics_table_html(rows) if rows else NO_EVALUATION))

    for r in (0, cfg.rounds):
        if evaluations.get(r):
            for uri in StageDir(cfg.run, r, "evaluate").files(".png"):
                name = f"round{r}_" + uri.rsplit("/", 1)[-1]
                files[name] = storage.read_bytes(uri)
    rocs = [n for n in files if n.endswith(".png")]
    if rocs:
        sections.append(("ROC and precision-recall curves", "".join(f"<img src='{n}'>" for n in sorted(rocs))))

    frames = StageDir(cfg.run, 0, "frames").read_table(
        columns=[schema.FRAME_ID, schema.VIDEO_ID, schema.FRAME_INDEX]
    ).sort_by(schema.FRAME_ID)
    before, after = _features(cfg, 0), _features(cfg, cfg.rounds)
    final_round = cfg.rounds
    if after is None:  # an unfinished run: report the latest round that has features
        final_round = max((r for r in range(cfg.rounds + 1) if StageDir(cfg.run, r, "features").record()), default=0)
        after = _features(cfg, final_round)
    if before is not None and after is not None:
        video_ids = np.asarray(frames.column(schema.VIDEO_ID).to_pylist())
        order = np.lexsort((frames.column(schema.FRAME_INDEX).to_numpy(), video_ids))
        rows_v = html_report.pick_longest_video(video_ids[order])
        if rows_v is not None:
            idx = order[rows_v]
            files["fig1_similarity_matrix.png"] = figures.similarity_matrices_png(
                before[1][idx], after[1][idx], f"video {video_ids[idx[0]]}"
            )
            sections.append(("Similarity matrix of one video (paper Fig. 1)", "<img src='fig1_similarity_matrix.png'>"))
        files["fig2_nearest_neighbours.png"] = _neighbour_means(cfg, before[1], after[1], final_round)
        sections.append((f"Mean of the {NEIGHBOURS_SHOWN} nearest neighbours of a few queries (paper Fig. 2)",
                         "<img src='fig2_nearest_neighbours.png'>"))
        files["fig4_spectrum.png"] = figures.spectrum_png(
            {"HOG-LDA (round 0)": figures.eigen_spectrum(before[1]),
             f"round {final_round}": figures.eigen_spectrum(after[1])}
        )
        sections.append(("Cumulative eigenvalue spectrum of the similarities (paper Fig. 4)",
                         "<img src='fig4_spectrum.png'>"))

    batches = StageDir(cfg.run, 0, "batches")
    if batches.record():
        for uri in batches.files(".png")[:1]:
            files["fig3_batch_of_cliques.png"] = storage.read_bytes(uri)
            sections.append(("One batch of cliques, mean image per clique (paper Fig. 3)",
                             "<img src='fig3_batch_of_cliques.png'>"))

    for name, data in files.items():
        storage.write_bytes(storage.join(out, name), data)
    page = html_report.page_html(f"CliqueCNN run {cfg.run}", sections)
    storage.write_bytes(storage.join(out, "index.html"), page.encode())
    log.info("report: %s", storage.join(out, "index.html"))
    return {"uri": storage.join(out, "index.html"), "figures": sorted(files),
            "rounds_evaluated": sorted(r for r, record in evaluations.items() if record)}


def _neighbour_means(cfg: PipelineConfig, before: np.ndarray, after: np.ndarray, final_round: int) -> bytes:
    """Decode only the query frames and their neighbours (a few hundred images), never all frames."""
    from ..hog import decode_images

    rng = np.random.default_rng(cfg.seed)
    queries = rng.choice(len(before), size=min(QUERIES_SHOWN, len(before)), replace=False)
    k = min(NEIGHBOURS_SHOWN, len(before) - 1)
    wanted: dict[str, np.ndarray] = {}
    for name, feats in (("HOG-LDA", before), (f"round {final_round}", after)):
        sims = similarity_tile(feats[queries], feats)
        sims[np.arange(len(queries)), queries] = -np.inf  # not its own neighbour
        wanted[name] = sims.topk(k, dim=1).indices.numpy()
    needed = np.unique(np.concatenate([queries] + [w.ravel() for w in wanted.values()]))
    table = StageDir(cfg.run, 0, "frames").read_table().sort_by(schema.FRAME_ID).take(needed)
    images = decode_images(
        table.column(schema.IMAGE).to_pylist() if schema.IMAGE in table.column_names else None,
        uris=table.column(schema.URI).to_pylist() if schema.URI in table.column_names else None,
        bboxes=table.column(schema.BBOX).to_pylist() if schema.BBOX in table.column_names else None,
        size=96,
        grey=True,
    )
    position = {int(f): i for i, f in enumerate(needed)}
    rows = []
    for qi, q in enumerate(queries):
        means = {name: images[[position[int(j)] for j in idx[qi]]].astype(np.float32).mean(axis=0)
                 for name, idx in wanted.items()}
        rows.append((images[position[int(q)]], means))
    return figures.neighbour_means_png(rows)
