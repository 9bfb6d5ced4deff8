"""Moving Fashion-MNIST clips: the Moving MNIST construction (Srivastava et al., 2015) on Fashion-MNIST items,
with the nuisances of real video.

One item per clip on a 64×64 grey canvas, 20 frames: the item moves with a random velocity and bounces off
the borders, while its scale (0.8–1.2), in-plane rotation (±20°) and brightness drift slowly (each linearly
from a random start to a random end value over the clip). Behind it, a background cut from one of the real
photographs that ship with scikit-image (a random crop of a random size, random photograph per clip), so raw
pixels and HOG see the background as much as the item.

Pure numpy / PIL, deterministic by seed: ``render_clip(item, rng)`` draws everything from ``rng``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CANVAS = 64  # pixels per side, as Moving MNIST
FRAMES = 20  # frames per clip, as Moving MNIST (10 input + 10 predicted there)
SCALE_RANGE = (0.8, 1.2)
ROTATION_DEG = 20.0
BRIGHTNESS_RANGE = (0.75, 1.0)  # the item's peak grey level, relative to white
BACKGROUND_RANGE = (0.1, 0.6)  # the background's grey levels are rescaled into this band: item stays visible
SPEED_RANGE = (1.5, 3.5)  # pixels per frame, as Moving MNIST's ~2-3

# Real photographs shipped inside scikit-image's package data (no download): scenes, textures, micrographs.
PHOTOGRAPHS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
               "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
               "page.png", "retina.jpg", "rocket.jpg", "text.png")


def photographs() -> list[np.ndarray]:
    """The PHOTOGRAPHS as grey float32 arrays in [0, 1], read from scikit-image's data folder."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the backgrounds ship in the scikit-image package: pip install scikit-image")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [name for name in PHOTOGRAPHS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"photograph(s) missing from scikit-image's data folder {folder}: {', '.join(missing)}")
    return [np.asarray(Image.open(folder / name).convert("L"), dtype=np.float32) / 255.0 for name in PHOTOGRAPHS]


def background(photos: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A CANVAS×CANVAS crop of a random photograph (random side from CANVAS to the photo's short side, then
    resized), its grey levels stretched into BACKGROUND_RANGE. → (CANVAS, CANVAS) float32."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape
    side = int(rng.integers(CANVAS, min(h, w) + 1))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((CANVAS, CANVAS), Image.BILINEAR)
    crop = np.asarray(crop, dtype=np.float32)
    lo, hi = float(crop.min()), float(crop.max())
    unit = (crop - lo) / (hi - lo) if hi > lo else np.zeros_like(crop)
    return (BACKGROUND_RANGE[0] + unit * (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0])).astype(np.float32)


def trajectory(size: float, rng: np.random.Generator, frames: int = FRAMES) -> np.ndarray:
    """Top-left corners (frames, 2) of an item of side ``size`` moving at a random velocity, reflected at
    the canvas borders (Moving MNIST's bounce)."""
    limit = CANVAS - size
    pos = rng.uniform(0, limit, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    vel = rng.uniform(*SPEED_RANGE) * np.array([np.cos(angle), np.sin(angle)])
    out = np.empty((frames, 2))
    for t in range(frames):
        out[t] = pos
        pos = pos + vel
        for axis in range(2):
            if pos[axis] < 0:
                pos[axis], vel[axis] = -pos[axis], -vel[axis]
            elif pos[axis] > limit:
                pos[axis], vel[axis] = 2 * limit - pos[axis], -vel[axis]
    return out


def _drift(rng: np.random.Generator, lo: float, hi: float, frames: int) -> np.ndarray:
    return np.linspace(rng.uniform(lo, hi), rng.uniform(lo, hi), frames)


def render_clip(item: np.ndarray, photos: Sequence[np.ndarray], rng: np.random.Generator,
                frames: int = FRAMES) -> np.ndarray:
    """One clip of a 28×28 uint8 item: (frames, CANVAS, CANVAS) uint8.

    Each frame: the item scaled and rotated (its drifts at that frame), its grey level times the brightness
    drift, alpha-composited (alpha = the item's own intensity) over the clip's background at the bounced
    position."""
    bg = background(photos, rng)
    scale = _drift(rng, *SCALE_RANGE, frames)
    rotation = _drift(rng, -ROTATION_DEG, ROTATION_DEG, frames)
    brightness = _drift(rng, *BRIGHTNESS_RANGE, frames)
    side = int(np.ceil(item.shape[0] * SCALE_RANGE[1]))  # every scaled item fits a box of this side
    corners = trajectory(side, rng, frames)
    source = Image.fromarray(np.asarray(item, dtype=np.uint8))
    out = np.empty((frames, CANVAS, CANVAS), dtype=np.uint8)
    for t in range(frames):
        n = max(1, int(round(item.shape[0] * scale[t])))
        box = Image.new("L", (side, side))
        box.paste(source.resize((n, n), Image.BILINEAR), ((side - n) // 2, (side - n) // 2))
        alpha = np.asarray(box.rotate(rotation[t], resample=Image.BILINEAR), dtype=np.float32) / 255.0
        frame = bg.copy()
        y, x = (int(round(c)) for c in corners[t])
        patch = frame[y : y + side, x : x + side]
        frame[y : y + side, x : x + side] = (1 - alpha) * patch + alpha * brightness[t]
        out[t] = np.clip(frame * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def clip_photographs(n_clips: int, seed: int) -> np.ndarray:
    """Index into PHOTOGRAPHS of each clip's background, as ``render_clips(items, seed)`` draws it (the first
    draw of clip i's generator): for diagnostics, never for training. → (n_clips,) int64."""
    return np.array([np.random.default_rng([seed, i]).integers(len(PHOTOGRAPHS)) for i in range(n_clips)],
                    dtype=np.int64)


def render_clips(items: np.ndarray, seed: int, frames: int = FRAMES) -> np.ndarray:
    """Clips of ``items`` (n, 28, 28) → (n, frames, CANVAS, CANVAS) uint8; clip i draws from its own
    generator (seed, i), so a clip does not depend on how many others are rendered."""
    photos = photographs()
    return np.stack([render_clip(item, photos, np.random.default_rng([seed, i]), frames) for i, item in
                     enumerate(items)]) if len(items) else np.zeros((0, frames, CANVAS, CANVAS), np.uint8)
