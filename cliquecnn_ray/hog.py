"""Initial similarities (paper Sect. 2.1, docs/method.md#hog-lda): decode → crop → resize → HOG → LDA whitening.

Pure functions over arrays (numpy / torch / PIL); no Ray here. The Ray layer is ``stages/features.py``.

Decisions: HOG is ``skimage.feature.hog`` (L2-Hys blocks, no sqrt transform) and ``hog_batch`` replicates it
up to float32 rounding. LDA: Σ = cov (ML, /n) + λI with λ absolute (not scaled), W = Σ^{-1/2} (symmetric, eigh).
Feature kinds: "hog_lda" φ = normalise((x − μ)W); "hog" normalise(x) (cosine); "raw" centred pixels,
normalised (Pearson). A descriptor of norm ~0 (a blank frame under "hog" / "raw") becomes the zero vector:
similarity 0 to everything, never NaN; the stage reports such frames.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from . import storage

# ---------------------------------------------------------------------------------------------
# Decoding


def decode_images(
    images: Optional[Sequence[Optional[bytes]]],
    uris: Optional[Sequence[Optional[str]]] = None,
    bboxes: Optional[Sequence[Optional[Sequence[float]]]] = None,
    size: int = 64,
    grey: bool = True,
    frame_ids=None,
) -> np.ndarray:
    """Decode frames to fixed-size arrays.

    Args:
        images: (N,) PNG/JPEG bytes, or None per row (then ``uris`` is read); or None for all rows.
        uris: (N,) image file URIs (local or s3://, read through ``storage.read_bytes``) or None.
        bboxes: (N,) ``(x0, y0, x1, y1)`` crop in pixels, or None per row / for all rows.
        size: output side in pixels; each frame is resized to ``size × size`` (bilinear, antialiased).
        grey: True → (N, size, size) luminance; False → (N, size, size, 3) RGB.
        frame_ids: (N,) ids used in error messages (default: row numbers).

    Returns:
        uint8 array (N, size, size) when ``grey`` else (N, size, size, 3).

    Raises:
        ValueError naming the frame_id when a frame has no payload, cannot be decoded, or its bbox is empty.
    """
    if images is None and uris is None:
        raise ValueError("decode_images: give images (bytes) or uris")
    n = len(images) if images is not None else len(uris)
    for name, seq in (("uris", uris), ("bboxes", bboxes), ("frame_ids", frame_ids)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"decode_images: {name} has {len(seq)} entries, expected {n}")
    ids = list(range(n)) if frame_ids is None else [int(i) for i in frame_ids]
    out = np.empty((n, size, size) if grey else (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        data = images[i] if images is not None else None
        uri = uris[i] if uris is not None else None
        if data is None:
            if uri is None:
                raise ValueError(f"frame_id {ids[i]}: has neither image bytes nor a uri")
            try:
                data = storage.read_bytes(uri)
            except storage.StorageError as exc:
                raise ValueError(f"frame_id {ids[i]}: cannot read image {uri}: {exc}") from exc
        where = f" ({uri})" if uri is not None and images is None else ""
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
            raise ValueError(f"frame_id {ids[i]}: cannot decode image{where}: {exc}") from exc
        img = img.convert("L" if grey else "RGB")
        box = bboxes[i] if bboxes is not None else None
        if box is not None:
            img = _crop(img, box, ids[i])
        if img.size != (size, size):
            # Pillow's resize is antialiased when shrinking (the filter support scales with the factor).
            img = img.resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(img, dtype=np.uint8)
    return out


def _crop(img: Image.Image, box: Sequence[float], frame_id: int) -> Image.Image:
    """Crop to ``(x0, y0, x1, y1)`` pixels, clipped to the image; an empty crop is an error."""
    if len(box) != 4 or not np.all(np.isfinite(np.asarray(box, dtype=np.float64))):
        raise ValueError(f"frame_id {frame_id}: bbox {list(box)} is not four finite numbers (x0, y0, x1, y1)")
    w, h = img.size
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"frame_id {frame_id}: bbox {list(box)} is empty inside the {w}×{h} image")
    return img.crop((x0, y0, x1, y1))


# ---------------------------------------------------------------------------------------------
# HOG (docs/method.md#hog-lda): skimage.feature.hog is the reference; hog_batch is a batched torch replica of it


def hog_reference(image: np.ndarray, orientations: int = 9, cell: int = 8, block: int = 2) -> np.ndarray:
    """The reference descriptor of one grey image (H, W): ``skimage.feature.hog`` with
    ``orientations``, ``pixels_per_cell=(cell, cell)``, ``cells_per_block=(block, block)``,
    ``block_norm="L2-Hys"``, ``transform_sqrt=False``, ``feature_vector=True``.

    Returns (D,) float64 with D = (H//cell − block + 1)·(W//cell − block + 1)·block²·orientations.
    """
    from skimage.feature import hog

    return hog(
        image,
        orientations=orientations,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        transform_sqrt=False,
        feature_vector=True,
    )


def hog_dim(size: int | tuple[int, int], orientations: int = 9, cell: int = 8, block: int = 2) -> int:
    """Length D of the HOG descriptor of an image of ``size`` (side, or (H, W)) pixels."""
    h, w = (size, size) if isinstance(size, int) else size
    nbr, nbc = h // cell - block + 1, w // cell - block + 1
    if nbr <= 0 or nbc <= 0:
        raise ValueError(f"HOG: a {h}×{w} image is smaller than one block of {block}×{block} cells of {cell} pixels")
    return nbr * nbc * block * block * orientations


def _bin_edges(orientations: int) -> np.ndarray:
    """Upper bin edges in degrees, float64, rounded exactly as skimage's _hoghistogram.pyx does: there
    ``orientation_start = number_of_orientations_per_180 * (i + 1)`` is C ``float`` (float32) arithmetic
    and a pixel votes for bin i when ``edge_i <= angle < edge_{i+1}``."""
    per_180 = np.float32(180.0 / orientations)
    return np.array([np.float32(per_180 * np.float32(i + 1)) for i in range(orientations)], dtype=np.float64)


def _orientation_degrees(g_row: np.ndarray, g_col: np.ndarray) -> np.ndarray:
    """``np.rad2deg(np.arctan2(g_row, g_col)) % 180`` in float64, as skimage; the remainder is done
    in place with the same floating-point operations numpy's ``%`` performs for values in [−180, 180]
    (180 → 0 first, then negative → +180), at a fraction of its cost."""
    angle = np.arctan2(g_row.astype(np.float64, copy=False), g_col.astype(np.float64, copy=False))
    np.rad2deg(angle, out=angle)
    angle[angle == 180.0] = 0.0
    np.add(angle, 180.0, out=angle, where=angle < 0.0)
    return angle


def _orientation_bins(angle: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin i with ``edges[i-1] <= angle < edges[i]`` (edges[-1] = 0), or n (no bin) for angle >= edges[n-1].

    Exactly ``searchsorted(edges, angle, side="right")``, faster: the candidate ``floor(angle·n/180)`` is
    off by at most one from the true bin (the float32 edges are within 1e-5° of i·180/n), so one
    comparison with each neighbouring edge corrects it.
    """
    n = len(edges)
    lower = np.concatenate([[0.0], edges])  # lower edge of bin i (bin n: edges[n-1])
    upper = np.concatenate([edges, [np.inf]])  # upper edge of bin i (bin n: none)
    b = (angle * (n / 180.0)).astype(np.int64)
    np.minimum(b, n, out=b)
    b -= angle < lower[b]
    b += angle >= upper[b]
    return b


def hog_batch(
    images,
    orientations: int = 9,
    cell: int = 8,
    block: int = 2,
    chunk: Optional[int] = None,
    threads: Optional[int] = None,
) -> np.ndarray:
    """HOG of a batch of grey images, numerically the ``hog_reference`` (skimage) definition.

    skimage's steps, replicated: (1) gradients by central differences ``I[r+1] − I[r−1]`` with zero
    gradient on the image border; (2) magnitude ``hypot`` and unsigned orientation
    ``rad2deg(arctan2(g_row, g_col)) % 180`` in float64; (3) each pixel of a cell votes its magnitude
    into exactly one bin (no interpolation) with skimage's float32 bin edges; pixels right of / below the
    last whole cell are ignored; the cell histogram is the vote sum divided by the cell area; (4) blocks
    of ``block × block`` cells at stride one cell, each L2-Hys normalised: ``v / sqrt(‖v‖² + eps²)``,
    clipped at 0.2, renormalised the same way, eps = 1e-5; (5) flattened in skimage's order
    (block row, block col, cell row in block, cell col in block, orientation).

    Differences from skimage are rounding only (cell sums in float32, as skimage's ``float total``):
    tests/test_features.py bounds the difference; benchmarks/results/hog.json holds max_abs_diff_vs_skimage.

    Chunks of images run on ``threads`` Python threads, each with single-threaded torch ops (torch and
    numpy release the GIL): on these small tensors OpenMP's intra-op threads cost more than they give,
    and collapse when the machine is oversubscribed.

    Args:
        images: (N, H, W) uint8 or float array / tensor (grey).
        chunk: images per vectorised step (default: ~256k pixels, which keeps a step in cache).
        threads: worker threads (default: ``torch.get_num_threads()``, i.e. the cores torch may use).

    Returns:
        (N, D) float32, D = ``hog_dim((H, W), orientations, cell, block)``.
    """
    import torch

    x_all = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x_all.ndim != 3:
        raise ValueError(f"hog_batch: images must be (N, H, W) grey, got shape {tuple(x_all.shape)}")
    n, h, w = x_all.shape
    d = hog_dim((h, w), orientations, cell, block)
    chunk = chunk or max(16, (1 << 18) // (h * w))
    starts = list(range(0, n, chunk))
    threads = max(1, min(threads or torch.get_num_threads(), len(starts)))
    out = np.empty((n, d), dtype=np.float32)
    plan = _HogPlan(h, w, orientations, cell, block)

    def work(start: int) -> None:
        out[start : start + chunk] = plan(x_all[start : start + chunk])

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1:
            for start in starts:
                work(start)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, starts))
    finally:
        torch.set_num_threads(previous)
    return out


class _HogPlan:
    """What every chunk of one image size shares: bin edges and the pixel → cell map."""

    def __init__(self, h: int, w: int, orientations: int, cell: int, block: int):
        import torch

        self.orientations, self.cell, self.block = orientations, cell, block
        self.ncr, self.ncc = h // cell, w // cell
        self.nbr, self.nbc = self.ncr - block + 1, self.ncc - block + 1
        self.hh, self.ww = self.ncr * cell, self.ncc * cell  # the region covered by whole cells
        self.d = self.nbr * self.nbc * block * block * orientations
        self.edges = _bin_edges(orientations)
        self.nbins = orientations + 1  # bin `orientations` collects angles skimage puts in no bin (180.0)
        rows = torch.arange(self.hh) // cell
        cols = torch.arange(self.ww) // cell
        self.cell_of_pixel = (rows[:, None] * self.ncc + cols[None, :]).view(1, self.hh, self.ww) * self.nbins

    def __call__(self, x) -> np.ndarray:
        """(m, H, W) tensor → (m, D) float32 numpy."""
        import torch

        hh, ww, nbins = self.hh, self.ww, self.nbins
        # Gradients in skimage's precision: float32 images in float32, others in float64 (exact for uint8).
        x = x.to(torch.float32 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64)
        m = x.shape[0]
        # (1) central differences; border rows / columns keep zero gradient, as skimage.
        g_row = torch.zeros_like(x)
        g_col = torch.zeros_like(x)
        g_row[:, 1:-1, :] = x[:, 2:, :] - x[:, :-2, :]
        g_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
        g_row = g_row[:, :hh, :ww]
        g_col = g_col[:, :hh, :ww]
        # (2) magnitude, and the orientation with skimage's own float64 numpy operations, so that
        # bin membership is bit-identical (torch.atan2 differs from numpy's in the last ulp).
        mag = torch.hypot(g_row, g_col).to(torch.float32)
        angle = _orientation_degrees(g_row.numpy(), g_col.numpy())
        # (3) one vote per pixel into (cell, bin).
        bins = torch.from_numpy(_orientation_bins(angle, self.edges))
        index = (self.cell_of_pixel + bins).reshape(m, -1)
        hist = torch.zeros((m, self.ncr * self.ncc * nbins), dtype=torch.float32)
        hist.scatter_add_(1, index, mag.reshape(m, -1))
        hist = hist.view(m, self.ncr, self.ncc, nbins)[..., : self.orientations]
        hist = hist.to(torch.float64) / float(self.cell * self.cell)
        # (4) blocks (m, nbr, nbc, block, block, orientations) in skimage's order, L2-Hys.
        nbr, nbc, block = self.nbr, self.nbc, self.block
        blocks = torch.stack(
            [torch.stack([hist[:, r : r + nbr, c : c + nbc] for c in range(block)], dim=3) for r in range(block)],
            dim=3,
        )
        blocks = blocks.reshape(m, nbr, nbc, -1)
        eps2 = 1e-5**2
        blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + eps2)
        blocks = torch.clamp(blocks, max=0.2)
        blocks = blocks / torch.sqrt((blocks**2).sum(-1, keepdim=True) + eps2)
        return blocks.reshape(m, self.d).to(torch.float32).numpy()


# ---------------------------------------------------------------------------------------------
# LDA whitening (Hariharan, Malik, Ramanan, ECCV 2012; paper Sect. 2.1)
#
# φ(x) = W (x − μ) / ‖W (x − μ)‖ with W = Σ^{-1/2} the symmetric inverse square root of
# Σ = cov + λ·(tr(cov)/D)·I. Then φ_iᵀφ_j = (x_i − μ)ᵀ Σ⁻¹ (x_j − μ) / (‖·‖_i ‖·‖_j): the LDA similarity,
# cosine-normalised. (The authors' Cholesky factor L⁻¹ gives the same inner products; the symmetric root is
# chosen because it is unique and keeps φ in HOG coordinates.) λ is relative to the mean variance tr(cov)/D,
# so one λ means the same shrinkage whatever the HOG variant, image size or descriptor scale (the authors'
# absolute Σ + 0.02·I is tied to their descriptor's scale); λ → ∞ tends to plain centred HOG, λ → 0 to full
# whitening. The default is chosen on a validation split (benchmarks/tune.py).

WhiteningStats = tuple  # (sum (D,) float64, sum_outer (D, D) float64, count int)


def whitening_stats(hog: np.ndarray, frame_ids=None) -> WhiteningStats:
    """Partial statistics of one shard of descriptors (n, D): (Σx (D,), Σxxᵀ (D, D), n), in float64.

    Raises ValueError naming the first frame (``frame_ids``, default row number) with a NaN/inf entry.
    """
    x = np.asarray(hog)
    if x.ndim != 2:
        raise ValueError(f"whitening_stats: descriptors must be (n, D), got shape {x.shape}")
    _check_finite(x, frame_ids, "descriptor")
    x = x.astype(np.float64, copy=False)
    return x.sum(axis=0), x.T @ x, int(x.shape[0])


def reduce_stats(parts: Sequence[WhiteningStats]) -> WhiteningStats:
    """Sum partial statistics of shards; the result equals ``whitening_stats`` of all rows at once."""
    parts = list(parts)
    if not parts:
        raise ValueError("reduce_stats: no partial statistics to reduce")
    d = parts[0][0].shape[0]
    total_sum = np.zeros(d, dtype=np.float64)
    total_outer = np.zeros((d, d), dtype=np.float64)
    count = 0
    for i, (s, so, n) in enumerate(parts):
        if s.shape != (d,) or so.shape != (d, d):
            raise ValueError(
                f"reduce_stats: shard {i} has descriptors of length {s.shape[0]} (outer {so.shape}), "
                f"shard 0 has {d}: every frame must be resized to the same size (d mismatch)"
            )
        total_sum += s
        total_outer += so
        count += int(n)
    return total_sum, total_outer, count


def whitening_transform(stats: WhiteningStats, lam: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(μ (D,), W (D, D)) from reduced statistics: Σ = cov + λ·(tr(cov)/D)·I, W = Σ^{-1/2} (symmetric, eigh).

    cov is the maximum-likelihood covariance (divides by n). λ is relative to the mean variance tr(cov)/D
    (scale-free: multiplying every descriptor by c leaves φ unchanged).
    Raises ValueError when fewer than two frames are given or Σ is not positive definite (λ ≤ 0 and
    degenerate data).
    """
    s, so, n = stats
    if n < 2:
        raise ValueError(f"whitening_transform: needs at least 2 frames to estimate a covariance, got {n}")
    if lam < 0:
        raise ValueError(f"whitening_transform: lda_lambda must be ≥ 0, got {lam}")
    mu = s / n
    cov = so / n - np.outer(mu, mu)
    cov = (cov + cov.T) / 2.0  # exact symmetry for eigh
    sigma = cov + lam * (np.trace(cov) / len(mu)) * np.eye(len(mu))
    evals, evecs = np.linalg.eigh(sigma)
    floor = 1e-10 * max(float(evals[-1]), 1e-300)
    if evals[0] <= floor:
        raise ValueError(
            f"whitening_transform: Σ + λI is not positive definite (smallest eigenvalue {evals[0]:.3g} with "
            f"λ = {lam}); raise features.lda_lambda"
        )
    w = (evecs / np.sqrt(evals)) @ evecs.T
    return mu, w


def whiten(hog: np.ndarray, mu: np.ndarray, w: np.ndarray) -> np.ndarray:
    """φ = (x − μ) W, L2-normalised per row: (n, D) → (n, D) float32 (W symmetric, so this is W(x − μ)).

    A row whose whitened vector has norm ~0 (x ≈ μ) becomes the zero vector (see ``l2_normalise``)."""
    x = np.asarray(hog, dtype=np.float32)
    phi = (x - mu.astype(np.float32)) @ w.astype(np.float32)
    return l2_normalise(phi)[0]


# ---------------------------------------------------------------------------------------------
# Feature kinds and normalisation

KINDS = ("hog_lda", "hog", "raw")
NORM_EPS = 1e-6  # below this a descriptor carries no direction (a blank frame for "hog" and "raw")


def l2_normalise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit L2 norm: (n, D) → ((n, D) float32, blank (n,) bool).

    A row of norm < NORM_EPS (a blank / constant frame: its HOG is 0 and its centred pixels are 0) has no
    direction; it becomes the zero vector, so its similarity to every frame is 0 (never NaN) and it is
    reported as blank. This is deterministic and keeps fades and black frames of real videos usable.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    blank = norms < NORM_EPS
    out = x / np.where(blank, 1.0, norms)[:, None]
    out[blank] = 0.0
    return out.astype(np.float32, copy=False), blank


def describe(images: np.ndarray, kind: str, orientations: int = 9, cell: int = 8, block: int = 2) -> np.ndarray:
    """Per-frame descriptor before any data-set-wide step: (N, H, W) grey → (N, D) float32.

    ``hog_lda`` and ``hog``: ``hog_batch``; ``raw``: the pixels as floats, centred per image (so the
    cosine of two raw descriptors is their Pearson correlation).
    """
    if kind not in KINDS:
        raise ValueError(f"features.kind = {kind!r}: unknown (known: {', '.join(KINDS)})")
    if kind == "raw":
        x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
        return x - x.mean(axis=1, keepdims=True)
    return hog_batch(images, orientations, cell, block)


def finish(descriptors: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The similarity features of the kinds that need no data-set statistics ("hog", "raw"):
    L2-normalised descriptors, so φ_iᵀφ_j is the cosine. Returns (features (N, D) float32, blank (N,))."""
    if kind == "hog_lda":
        raise ValueError("finish: hog_lda needs the whitening statistics of the whole data set; use whiten")
    return l2_normalise(descriptors)


def _check_finite(x: np.ndarray, frame_ids, what: str) -> None:
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        fid = int(frame_ids[row]) if frame_ids is not None else row
        raise ValueError(f"{what} of frame_id {fid} is NaN or infinite")
