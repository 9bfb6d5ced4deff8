"""Pictures drawn from arrays (numpy → PNG bytes); no I/O, no Ray. The run report places them."""
from __future__ import annotations

import io
import math
from typing import Sequence

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
