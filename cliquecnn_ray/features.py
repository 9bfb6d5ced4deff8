"""Initial similarities (paper Sect. 2.1, DESIGN §3): decode → crop → resize → HOG → LDA whitening.

Pure functions over arrays (numpy / torch / PIL); no Ray here. The Ray layer is ``stages/features.py``.
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
