"""The run report: one static HTML page and its PNGs (docs/architecture.md#the-report).

Figures, after the paper: the similarity matrix of one video before and after learning (Fig. 1), the mean
image of the 50 nearest neighbours of a few queries (Fig. 2), one batch of cliques (Fig. 3), and the
cumulative eigenvalue spectrum of the similarities (Fig. 4). Pure functions over arrays return PNG bytes;
``build_report`` gathers the run's committed outputs and writes ``<run>/report/index.html``.
"""
from __future__ import annotations

import html
import io
import logging
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(width, height))


def similarity_matrices_png(before: np.ndarray, after: np.ndarray, title: str) -> bytes:
    """Fig. 1: S = ΦΦᵀ of one video's frames (n, d_before) and (n, d_after), side by side."""
    fig, axes = _figure(9, 4.2)
    for ax, feats, name in zip(axes, (before, after), ("before (round 0)", "after (final round)")):
        sims = feats @ feats.T
        im = ax.imshow(sims, cmap="viridis")
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.set_xlabel("frame")
        ax.set_ylabel("frame")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def eigen_spectrum(features: np.ndarray) -> np.ndarray:
    """Normalised cumulative eigenvalue spectrum of S = ΦΦᵀ (Fig. 4), from the d×d Gram ΦᵀΦ (same
    non-zero eigenvalues), never the N×N matrix. Returns (min(N, d),) increasing to 1."""
    feats = np.asarray(features, dtype=np.float64)
    gram = feats.T @ feats if feats.shape[0] > feats.shape[1] else feats @ feats.T
    eig = np.clip(np.linalg.eigvalsh(gram)[::-1], 0, None)
    total = eig.sum()
    return np.cumsum(eig) / total if total > 0 else np.zeros_like(eig)


def spectrum_png(curves: dict[str, np.ndarray]) -> bytes:
    """Fig. 4: cumulative spectra over the first eigenvectors (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("number of eigenvectors")
    ax.set_ylabel("normalised cumulative eigenvalue sum")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def neighbour_means_png(rows: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> bytes:
    """Fig. 2: for each query, its image then the mean image of its nearest neighbours per method.

    ``rows``: [(query image (H, W[, 3]) uint8, {method: mean image (H, W[, 3]) float})].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(rows[0][1]) if rows else []
    fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(2.2 * (1 + len(methods)), 2.2 * len(rows)),
                             squeeze=False)
    for i, (query, means) in enumerate(rows):
        cells = [("query", query)] + [(m, means[m]) for m in methods]
        for j, (name, img) in enumerate(cells):
            ax = axes[i][j]
            ax.imshow(np.asarray(img, dtype=np.float32) / 255.0, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    return _png(fig)


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
