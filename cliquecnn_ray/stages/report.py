"""Report stage: gathers the run's committed outputs into ``<run>/report/index.html`` with its PNGs.

The report is a view of committed stages, rebuilt in full each time (cheap), so it is written directly
(each file atomically) rather than committed as a round's stage.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import html_report, schema, storage
from ..config import PipelineConfig
from ..similarity import similarity_tile
from ..rundir import StageDir

log = logging.getLogger(__name__)

NEIGHBOURS_SHOWN = 50  # paper Fig. 2 averages the 50 nearest neighbours
QUERIES_SHOWN = 4


def _features(cfg: PipelineConfig, round_: int, stage: str = "features"):
    out = StageDir(cfg.run, round_, stage)
    if out.record() is None:
        return None
    return schema.table_to_features(out.read_table(), source=str(out))


def _metrics_rows(cfg: PipelineConfig) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for r in range(cfg.rounds + 1):
        record = StageDir(cfg.run, r, "evaluate").record()
        if record:
            name = "round 0 (HOG-LDA)" if r == 0 else f"round {r}" + (" (final)" if r == cfg.rounds else "")
            rows[name] = record["stats"]
    baselines = storage.join(cfg.run, "baselines.json")
    if storage.exists(baselines):
        for name, metrics in storage.read_json(baselines).items():
            rows[f"baseline: {name}"] = metrics
    return rows


def run(cfg: PipelineConfig, round_index: int = 0, force: bool = False) -> dict:
    started = time.time()
    out = storage.join(cfg.run, "report")
    sections: list[tuple[str, str]] = []
    files: dict[str, bytes] = {}

    rows = _metrics_rows(cfg)
    sections.append(("Metrics across rounds and baselines",
                     html_report.metrics_table_html(rows) if rows else "<p>No evaluation (no labels configured).</p>"))

    for r in (0, cfg.rounds):
        record = StageDir(cfg.run, r, "evaluate").record()
        if record:
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
            files["fig1_similarity_matrix.png"] = html_report.similarity_matrices_png(
                before[1][idx], after[1][idx], f"video {video_ids[idx[0]]}"
            )
            sections.append(("Similarity matrix of one video (paper Fig. 1)", "<img src='fig1_similarity_matrix.png'>"))
        files["fig2_nearest_neighbours.png"] = _neighbour_means(cfg, before[1], after[1], final_round)
        sections.append((f"Mean of the {NEIGHBOURS_SHOWN} nearest neighbours of a few queries (paper Fig. 2)",
                         "<img src='fig2_nearest_neighbours.png'>"))
        files["fig4_spectrum.png"] = html_report.spectrum_png(
            {"HOG-LDA (round 0)": html_report.eigen_spectrum(before[1]),
             f"round {final_round}": html_report.eigen_spectrum(after[1])}
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
    seconds = time.time() - started
    log.info("report: %s (%.1f s)", storage.join(out, "index.html"), seconds)
    return {"skipped": False, "seconds": seconds, "stats": {"uri": storage.join(out, "index.html"),
                                                            "figures": sorted(files)}}


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
    return html_report.neighbour_means_png(rows)
