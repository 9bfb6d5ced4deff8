"""Training the CNN on batches of cliques (paper Sect. 2.4, 3.1; docs/method.md#the-loss): sampler, augmentation, loss,
step. Pure torch / numpy; no Ray, no torch.distributed calls (a DDP-wrapped model works unchanged).

One SGD step: pick one batch x_b of r cliques at random, draw M images from the frames of those r
cliques, and classify each image into its clique with a softmax over the r cliques of x_b only
(Eq. 7: the gradient depends only on the cliques of x_b, which the batch optimisation made mutually
distant, so no two cliques of one step are near-duplicates with different labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PipelineConfig
from .network import head_name, unwrap

ADAGRAD_EPS = 1e-4  # paper Sect. 3.1: AdaGrad "smoothing term of 0.0001"


# ---------------------------------------------------------------------------------------------
# Sampling


class CliqueBatchSampler:
    """Draws the images of one SGD step from the cliques of one batch.

    Sampling rule: the batch x_b is uniform over the B batches; the M images are spread evenly over its
    r cliques (each clique gets ⌊M/r⌋ or ⌈M/r⌉ images, which ones get the extra image is random), and
    within a clique frames are uniform with replacement. Balancing over cliques rather than over frames
    keeps every class of the r-way problem present in every step, whatever the clique sizes.
    ``balanced=False`` draws the M images uniformly from the frames of the r cliques instead (a frame in
    two cliques counts twice): an ordinary classifier's SGD over its training list, as the paper's
    1-sample CNN and NN-CNN baselines are trained.

    Stateless: step ``t`` of worker ``rank`` depends only on (seed, t, rank), so a run resumed from a
    checkpoint at step t draws exactly what an uninterrupted run would. All workers of a step share the
    batch x_b (one batch per step, as the paper) and draw different images from it.

    Args:
        batches: (B, r) int array of clique indices (rows of ``clique_rows``, i.e. head outputs).
        clique_rows: K arrays; clique k's frames as rows of the image tensor the caller holds.
        images_per_step: M, split over workers (each draws ⌈M / world_size⌉).
        seed: sampling seed.
        balanced: spread each step's images evenly over the batch's cliques (True) or uniformly over
            their frames (False).
    """

    def __init__(self, batches: np.ndarray, clique_rows: Sequence[np.ndarray], images_per_step: int, seed: int = 0,
                 balanced: bool = True):
        self.batches = np.asarray(batches, dtype=np.int64)
        if self.batches.ndim != 2 or self.batches.shape[0] == 0:
            raise ValueError(f"sampler: batches must be a non-empty (B, r) array, got shape {self.batches.shape}")
        self.clique_rows = [np.asarray(rows, dtype=np.int64) for rows in clique_rows]
        k = len(self.clique_rows)
        bad = np.flatnonzero((self.batches < 0) | (self.batches >= k))
        if bad.size:
            b = bad[0] // self.batches.shape[1]
            raise ValueError(f"sampler: batch {b} names clique index {self.batches.flat[bad[0]]}, only {k} cliques")
        empty = [i for i, rows in enumerate(self.clique_rows) if rows.size == 0]
        if empty:
            raise ValueError(f"sampler: clique index {empty[0]} has no frames")
        if images_per_step < 1:
            raise ValueError(f"sampler: images_per_step must be ≥ 1, got {images_per_step}")
        self.images_per_step = int(images_per_step)
        self.seed = int(seed)
        self.balanced = bool(balanced)
        self.clique_sizes = np.asarray([len(rows) for rows in self.clique_rows], dtype=np.float64)

    @property
    def num_classes(self) -> int:
        return len(self.clique_rows)

    def draw(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The images of ``step`` for worker ``rank``.

        Returns:
            rows (m,) int64 rows of the caller's image tensor, targets (m,) int64 clique indices
            (head outputs), batch_cliques (r,) int64 the clique indices of the chosen batch x_b;
            m = ⌈M / world_size⌉.
        """
        step_rng = np.random.default_rng([self.seed, step])
        batch_cliques = self.batches[step_rng.integers(len(self.batches))]
        rng = np.random.default_rng([self.seed, step, rank + 1])
        r = len(batch_cliques)
        m = -(-self.images_per_step // world_size)
        if self.balanced:
            slots = np.resize(rng.permutation(r), m)  # ⌊m/r⌋ or ⌈m/r⌉ per clique
            rng.shuffle(slots)
        else:
            sizes = self.clique_sizes[batch_cliques]
            slots = rng.choice(r, size=m, p=sizes / sizes.sum())
        targets = batch_cliques[slots]
        rows = np.empty(m, dtype=np.int64)
        for k in np.unique(targets):
            where = np.flatnonzero(targets == k)
            pool = self.clique_rows[k]
            rows[where] = pool[rng.integers(len(pool), size=len(where))]
        return rows, targets.astype(np.int64), batch_cliques.copy()


# ---------------------------------------------------------------------------------------------
# Augmentation (paper Sect. 3.1: "random translation, scaling, rotation and color transformation")


@dataclass(frozen=True)
class AugmentParams:
    rotate: float = 10.0  # degrees, uniform in ±rotate
    translate: float = 0.1  # fraction of the side, uniform in ±translate per axis
    scale: float = 0.1  # zoom uniform in [1 − scale, 1 + scale]
    colour: float = 0.3  # brightness and contrast factors uniform in [1 − colour, 1 + colour]


def affine_batch(x: torch.Tensor, angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-image affine warp of a batch, numerically ``torchvision.transforms.v2.functional.affine``
    (bilinear, zero fill, centre of rotation at the image centre, no shear) applied to each image with its
    own parameters — v2's transforms draw one set of parameters per call, so on a batch tensor every image
    would get the same warp; this builds v2's inverse matrices and sampling grid for all images at once.

    Args:
        x: (N, C, H, W) float.
        angle: (N,) degrees, counter-clockwise; translate: (N, 2) pixels (x, y); scale: (N,).

    Returns:
        (N, C, H, W) float.
    """
    n, _, h, w = x.shape
    dtype, device = x.dtype, x.device
    rot = torch.deg2rad(angle.to(device, dtype))
    tx, ty = translate[:, 0].to(device, dtype), translate[:, 1].to(device, dtype)
    s = scale.to(device, dtype)
    # torchvision's _get_inverse_affine_matrix with centre (0, 0) and no shear: RS⁻¹ · T⁻¹.
    m0, m1 = torch.cos(rot) / s, torch.sin(rot) / s
    m3, m4 = -torch.sin(rot) / s, torch.cos(rot) / s
    m2 = m0 * -tx + m1 * -ty
    m5 = m3 * -tx + m4 * -ty
    theta = torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)  # (N, 2, 3)
    # torchvision's _affine_grid: pixel-centre base grid, theta applied, then normalised by half sizes.
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device, dtype=dtype)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device, dtype=dtype)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=device, dtype=dtype)], -1)
    half = torch.tensor([0.5 * w, 0.5 * h], device=device, dtype=dtype)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / half).view(n, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def colour_batch(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Per-image brightness then contrast, as ``v2.functional.adjust_brightness`` / ``adjust_contrast``
    on float images in [0, 1]: x·b clamped, then blended with its mean grey level by factor c.

    Args:
        x: (N, C, H, W) float in [0, 1], C = 1 or 3; brightness, contrast: (N,) factors.
    """
    n = x.shape[0]
    b = brightness.to(x.device, x.dtype).view(n, 1, 1, 1)
    c = contrast.to(x.device, x.dtype).view(n, 1, 1, 1)
    x = (x * b).clamp(0.0, 1.0)
    if x.shape[1] == 3:  # v2 takes the mean of the ITU-R 601 luma
        grey = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    else:
        grey = x
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    return (c * x + (1.0 - c) * mean).clamp(0.0, 1.0)


def augment(x: torch.Tensor, generator: torch.Generator, params: AugmentParams = AugmentParams()) -> torch.Tensor:
    """Random translation, scaling, rotation, brightness and contrast, drawn independently per image from
    ``generator`` (a CPU generator, so results do not depend on the device).

    Args:
        x: (N, C, H, W) float in [0, 1].

    Returns:
        (N, C, H, W) float in [0, 1].
    """
    n, _, h, w = x.shape
    if n == 0:
        return x

    def uniform(size, lo, hi):
        return lo + (hi - lo) * torch.rand(size, generator=generator)

    angle = uniform(n, -params.rotate, params.rotate)
    translate = uniform((n, 2), -params.translate, params.translate) * torch.tensor([w, h], dtype=torch.float32)
    scale = uniform(n, 1.0 - params.scale, 1.0 + params.scale)
    brightness = uniform(n, 1.0 - params.colour, 1.0 + params.colour)
    contrast = uniform(n, 1.0 - params.colour, 1.0 + params.colour)
    if params.rotate or params.translate or params.scale:
        x = affine_batch(x, angle, translate, scale)
    if params.colour:
        x = colour_batch(x, brightness, contrast)
    return x


# ---------------------------------------------------------------------------------------------
# Loss, optimiser, step


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, batch_cliques: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the r cliques of the step's batch only (paper Sect. 2.4).

    The K-way logits outside x_b are set to −inf, which equals a softmax over the r logits of x_b.

    Args:
        logits: (M, K); targets: (M,) clique indices, each in ``batch_cliques``; batch_cliques: (r,).

    Returns:
        scalar mean loss (float32).
    """
    mask = torch.full((logits.shape[1],), float("-inf"), device=logits.device)
    mask[batch_cliques.to(logits.device)] = 0.0
    return F.cross_entropy(logits.float() + mask, targets.to(logits.device))


def make_optimizer(params, optimizer: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """AdaGrad (paper Sect. 3.1) or SGD with momentum (Eq. 8: V ← μV − α∇L, W ← W + V); weight decay is
    the λ r(W) of Eq. 7."""
    if optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay, eps=ADAGRAD_EPS)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer '{optimizer}' (adagrad or sgd)")


@dataclass(frozen=True)
class HeadWarmup:
    """A round that starts from trained weights first trains only its new, randomly initialised head: the
    first ``steps`` steps update the optimiser's param group 1 (the head) at ``lr`` and leave group 0 (the
    backbone) untouched; then both groups train at ``base_lr``. Without it the random head's gradients
    scramble the backbone and the new round starts by losing what the previous one learned."""

    steps: int
    lr: float
    base_lr: float


def head_param_groups(model: nn.Module) -> list[dict]:
    """[{"params": backbone}, {"params": head}] for ``make_optimizer`` (the head is the last nn.Linear)."""
    net = unwrap(model)
    head = set(id(p) for p in net.get_submodule(head_name(net)).parameters())
    params = list(model.parameters())  # the (possibly DDP-wrapped) model's own parameter objects
    return [{"params": [p for p in params if id(p) not in head]}, {"params": [p for p in params if id(p) in head]}]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    batch_cliques: torch.Tensor,
    amp: bool = False,
    frozen: Sequence[torch.nn.Parameter] = (),
) -> float:
    """One SGD step on the masked loss. ``amp``: bf16 autocast (GPU; no loss scaling needed for bf16).

    Args:
        images: (M, C, H, W) float, on the model's device; targets: (M,); batch_cliques: (r,).
        frozen: parameters this step leaves as they are (their gradients are dropped after backward, so
            the optimiser skips them: no update, no weight decay, no AdaGrad accumulation).

    Returns:
        the loss before the update.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(images)
    loss = masked_cross_entropy(logits, targets, batch_cliques)
    loss.backward()
    for p in frozen:
        p.grad = None
    optimizer.step()
    return float(loss.detach())


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    sampler: CliqueBatchSampler,
    start: int,
    stop: int,
    rank: int = 0,
    world_size: int = 1,
    augment_params: Optional[AugmentParams] = AugmentParams(),
    amp: bool = False,
    head_warmup: Optional[HeadWarmup] = None,
    on_step: Optional[Callable[[float], None]] = None,
) -> list[float]:
    """Steps ``start .. stop−1``: draw (sampler), augment, step; every random choice of step t is seeded
    by (sampler seed, t, rank), so the steps are reproducible one by one.

    Args:
        images: (F, C, H, W) uint8 tensor of the frames the sampler's rows index (kept on CPU or on the
            device; each step moves only its M images).
        augment_params: None turns augmentation off.
        head_warmup: head-only first steps (the optimiser must have ``head_param_groups``' two groups).
        on_step: called with each step's loss (progress display).

    Returns:
        the loss of each step.
    """
    device = next(model.parameters()).device
    losses = []
    for step in range(start, stop):
        # Dropout draws from torch's global generator: reseed it per (seed, step, rank) so that a run
        # resumed from a checkpoint at step t repeats an uninterrupted run exactly.
        torch.manual_seed(derive_seed(sampler.seed, step, rank, 11))
        rows, targets, batch_cliques = sampler.draw(step, rank, world_size)
        x = images[torch.from_numpy(rows).to(images.device)].to(device, non_blocking=True).float().div_(255.0)
        if augment_params is not None:
            gen = torch.Generator().manual_seed(derive_seed(sampler.seed, step, rank, 7))
            x = augment(x, gen, augment_params)  # parameters drawn on the CPU, warp done on the device
        frozen: Sequence[torch.nn.Parameter] = ()
        if head_warmup is not None:
            warming = step < head_warmup.steps
            optimizer.param_groups[0]["lr"] = head_warmup.base_lr
            optimizer.param_groups[1]["lr"] = head_warmup.lr if warming else head_warmup.base_lr
            frozen = optimizer.param_groups[0]["params"] if warming else ()
        losses.append(
            train_step(model, optimizer, x, torch.from_numpy(targets), torch.from_numpy(batch_cliques), amp=amp,
                       frozen=frozen)
        )
        if on_step is not None:
            on_step(losses[-1])
    return losses


def log_windows(losses: Sequence[float], every: int, offset: int = 0) -> list[list[float]]:
    """Mean loss per window of ``every`` steps: [[last step of the window, mean loss], ...]."""
    out = []
    for start in range(0, len(losses), max(1, every)):
        chunk = losses[start : start + every]
        out.append([offset + start + len(chunk) - 1, float(np.mean(chunk))])
    return out


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from several integers (e.g. run seed, stage seed, round)."""
    return int(np.random.default_rng([int(p) for p in parts]).integers(2**31 - 1))


# ---------------------------------------------------------------------------------------------
# Round policy: how long and how fast each round trains


def round_steps(cfg: PipelineConfig, round_index: int) -> int:
    """The SGD steps of round ``round_index``: train.round_steps[round_index] where listed, else train.steps.
    Paper Sect. 2.6: once the similarities are more reliable, fewer batches cover the data, so a later
    round may need fewer steps than the first, which starts from HOG-LDA."""
    listed = cfg.train.round_steps
    steps = int(listed[round_index]) if round_index < len(listed) else cfg.train.steps
    if steps < 1:
        raise ValueError(f"train.round_steps / train.steps: round {round_index} has {steps} steps, need at least 1")
    return steps


def total_steps(cfg: PipelineConfig) -> int:
    """All rounds' steps: the training budget a baseline gets to be compared at the same cost."""
    return sum(round_steps(cfg, r) for r in range(cfg.rounds))


def round_lr(cfg: PipelineConfig, round_index: int) -> float:
    """The learning rate of round ``round_index``: lr · lr_round_decay^round_index. Each round builds a new
    optimiser (AdaGrad's accumulators start at zero, so its first steps are the largest) on the previous
    round's weights; a decay keeps those steps from undoing what the earlier rounds learned."""
    return cfg.train.lr * cfg.train.lr_round_decay ** round_index


def augment_params(cfg: PipelineConfig) -> Optional[AugmentParams]:
    """The configured augmentation (train.aug_*), or None when train.augment is off."""
    t = cfg.train
    if not t.augment:
        return None
    return AugmentParams(rotate=t.aug_rotate, translate=t.aug_translate, scale=t.aug_scale, colour=t.aug_colour)
