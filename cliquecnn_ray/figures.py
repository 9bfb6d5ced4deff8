"""Pictures drawn from arrays (numpy → PNG bytes), every figure of the run report and the evaluate stage
(paper Fig. 1–4, ROC and precision-recall curves); no I/O, no Ray.

Matplotlib through its object API (``Figure`` on an Agg canvas), never pyplot: no global state, no
backend switch, safe in Ray workers and threads.
"""
from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 → PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def clique_mosaic(cliques: Sequence[np.ndarray], columns: int = 0, pad: int = 2, background: int = 255) -> np.ndarray:
    """One batch of cliques as a grid of their mean images (paper Fig. 3).

    Args:
        cliques: one uint8 array per clique, (n_i, H, W) grey or (n_i, H, W, 3) RGB, all the same H, W and
            channels; n_i ≥ 1 member images each.
        columns: grid columns (0: ⌈√count⌉, a near-square grid).
        pad: pixels of ``background`` between cells and around the grid.

    Returns:
        uint8 (rows·(H + pad) + pad, columns·(W + pad) + pad[, 3]); cell i (row-major) is the pixel-wise mean
        of clique i's images, so a compact clique gives a sharp mean and a loose one a blur.
    """
    if not len(cliques):
        raise ValueError("clique_mosaic: no cliques to draw")
    first = np.asarray(cliques[0])
    if first.ndim not in (3, 4) or first.dtype != np.uint8:
        raise ValueError(f"clique_mosaic: clique 0 has shape {first.shape} and dtype {first.dtype}; "
                         "expected uint8 (n, H, W) or (n, H, W, 3)")
    cell = first.shape[1:]
    means = []
    for i, images in enumerate(cliques):
        images = np.asarray(images)
        if images.shape[1:] != cell or len(images) == 0:
            raise ValueError(f"clique_mosaic: clique {i} has images of shape {images.shape}, expected (n ≥ 1, "
                             f"{', '.join(map(str, cell))})")
        means.append(np.rint(images.astype(np.float64).mean(axis=0)).astype(np.uint8))
    count = len(means)
    cols = columns if columns > 0 else math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    h, w = cell[0], cell[1]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad) + tuple(cell[2:]), background, dtype=np.uint8)
    for i, mean in enumerate(means):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[y : y + h, x : x + w] = mean
    return canvas


def clique_mosaic_png(cliques: Sequence[np.ndarray], columns: int = 0, pad: int = 2) -> bytes:
    """``clique_mosaic`` as PNG bytes."""
    return png_bytes(clique_mosaic(cliques, columns, pad))


# ---------------------------------------------------------------------------------------------
# Matplotlib figures


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig, dpi: float = 110, tight: bool = True) -> bytes:
    from matplotlib.text import Text

    # Names are drawn as they are: a category or video named with `$` or `\\` is not TeX for mathtext to
    # parse (an unbalanced one fails to parse, and the whole figure with it).
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    return buf.getvalue()


def similarity_matrices_png(before: np.ndarray, after: np.ndarray, title: str) -> bytes:
    """Fig. 1: S = ΦΦᵀ of one video's frames (n, d_before) and (n, d_after), side by side."""
    fig = _figure(9, 4.2)
    axes = fig.subplots(1, 2)
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
    fig = _figure(5.5, 4)
    ax = fig.subplots()
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
    methods = list(rows[0][1]) if rows else []
    fig = _figure(2.2 * (1 + len(methods)), 2.2 * len(rows))
    axes = fig.subplots(len(rows), 1 + len(methods), squeeze=False)
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


def roc_and_pr_curves_png(result: dict[str, Any], title: str = "") -> tuple[bytes, bytes]:
    """PNG bytes of the mean ROC curves and the mean interpolated precision-recall curves, per category
    (thin) and over all queries (thick), from an evaluation's ``result["curves"]``."""
    curves = result["curves"]
    grid = np.asarray(curves["grid"])
    per_category = curves["per_category"]
    pngs = []
    for key, xlabel, ylabel, name in (
        ("mean_tpr", "false positive rate", "true positive rate (mean over queries)", "ROC"),
        ("mean_precision", "recall", "interpolated precision (mean over queries)", "precision-recall"),
    ):
        fig = _figure(5.5, 5)
        ax = fig.add_subplot(1, 1, 1)
        legend = len(per_category) <= 12
        if len(per_category) > 1:
            for cat, c in per_category.items():
                m = result["per_category"][cat]
                if m["n_queries"]:
                    label = f"{cat} ({m['auc_mean_roc']:.3f})" if key == "mean_tpr" else f"{cat} ({m['map']:.3f})"
                    ax.plot(grid, c[key], linewidth=0.8, alpha=0.7, label=label if legend else None)
        if key == "mean_tpr":
            overall = f"all ({result['auc_mean_roc_all_queries']:.3f})"
        else:
            overall = f"all (mAP {result['map']:.3f})"
        ax.plot(grid, curves["all"][key], color="black", linewidth=2.0, label=overall)
        if key == "mean_tpr":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: {title}" if title else name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right" if key == "mean_tpr" else "lower left")
        pngs.append(_png(fig, dpi=100, tight=False))
    return pngs[0], pngs[1]
