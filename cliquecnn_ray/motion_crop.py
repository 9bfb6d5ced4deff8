"""Motion crops: where in each frame of a still-camera video something moves, as a ``bbox`` for every frame.

Olympic Sports gives the paper a person box per frame, so HOG-LDA compares people, not arenas. Videos
without such boxes can get them from motion when the camera stands still. A video's background is its
per-pixel median over time. A frame's foreground is where it differs from that median by more than
``threshold`` (grey levels in [0, 1]), after a 3×3 opening that drops speckle; components smaller than a
tenth of the largest are dropped too. The box is the foreground's extent, widened by ``margin`` pixels and
made square (HOG and the network take square inputs, so a square crop keeps the subject's shape), kept
inside the frame. A frame where nothing moves keeps the whole frame.

It reads no label. It needs a video's frames together and of one size. Pure numpy / scipy; the ingest stage
applies it per video (``ingest.motion_crop``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_PIXELS = 10  # fewer foreground pixels than this: nothing moves in the frame
MIN_COMPONENT = 0.1  # foreground components smaller than this share of the largest are noise


def square_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[float, ...]:
    """The square of side max(box side) centred on the box, shifted (then clipped) to lie inside the frame."""
    side = min(max(x1 - x0, y1 - y0), width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return (left, top, left + side, top + side)


def motion_boxes(frames: np.ndarray, threshold: float = 0.08, margin: int = 2) -> np.ndarray:
    """(T, H, W) grey frames of one video (uint8, or float in [0, 1]) → (T, 4) float32 boxes (x0, y0, x1, y1)
    in pixels, the whole frame where nothing moves."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or 0 in frames.shape:
        raise ValueError(f"motion_boxes wants (frames, height, width) grey frames, got shape {frames.shape}")
    grey = frames.astype(np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
    t, height, width = grey.shape
    background = np.median(grey, axis=0)
    boxes = np.tile(np.array([0, 0, width, height], np.float32), (t, 1))
    for i, frame in enumerate(grey):
        moving = ndimage.binary_opening(np.abs(frame - background) > threshold)
        if moving.sum() < MIN_PIXELS:
            continue
        labels, n = ndimage.label(moving)
        sizes = ndimage.sum(moving, labels, range(1, n + 1))
        ys, xs = np.nonzero(np.isin(labels, 1 + np.flatnonzero(sizes >= MIN_COMPONENT * sizes.max())))
        boxes[i] = square_box(xs.min() - margin, ys.min() - margin, xs.max() + 1 + margin, ys.max() + 1 + margin,
                              width, height)
    return boxes
