"""The run report's HTML (docs/architecture.md#the-report): the metrics table, the page, the choice of the
video Fig. 1 shows.

The pictures themselves, after the paper (the similarity matrix of one video before and after learning,
Fig. 1; the mean image of the nearest neighbours of a few queries, Fig. 2; one batch of cliques, Fig. 3;
the cumulative eigenvalue spectrum, Fig. 4), are drawn by ``figures``; the report stage
(``stages/report.py``) gathers the run's committed outputs and writes ``<run>/report/index.html``.
"""
from __future__ import annotations

import html
from typing import Optional

import numpy as np


def metrics_table_html(rows: dict[str, dict]) -> str:
    """{name: {auc, auc_mean_roc, knn, map}} → an HTML table."""
    cols = ("auc", "auc_mean_roc", "knn", "map")
    head = "".join(f"<th>{c}</th>" for c in ("similarity",) + cols)
    body = []
    for name, metrics in rows.items():
        cells = "".join(
            f"<td>{metrics[c]:.3f}</td>" if isinstance(metrics.get(c), (int, float)) else "<td>–</td>" for c in cols
        )
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def page_html(title: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained page: [(heading, inner HTML)]."""
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "td:first-child{text-align:left}img{max-width:100%}"
    )
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    for heading, inner in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{inner}")
    parts.append("</body></html>")
    return "".join(parts)


def pick_longest_video(video_ids: np.ndarray, limit: int = 200) -> Optional[np.ndarray]:
    """Row indices of the longest video (at most ``limit`` frames, evenly spaced), or None."""
    if len(video_ids) == 0:
        return None
    values, counts = np.unique(video_ids, return_counts=True)
    if counts.max() < 2:
        return None
    rows = np.flatnonzero(video_ids == values[np.argmax(counts)])
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).astype(int)]
    return rows
