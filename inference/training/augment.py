"""Image augmentation on the device: random affine warps (rotation, scale, shift, flip) of canvas
batches, and the lattice token masks of MAE pretraining.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from inference.vit import ViTConfig, complementary_keeps

log = logging.getLogger(__name__)

def augment_params(b: int, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """(B, 2, 3) affine matrices: horizontal flip, scale 0.85-1.15, shift +-8 %, rotation +-10 deg."""
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    scale = 1.0 + (torch.rand(b, generator=gen) * 0.3 - 0.15) * strength
    angle = (torch.rand(b, generator=gen) * 20 - 10) * math.pi / 180 * strength
    shift = (torch.rand(b, 2, generator=gen) * 0.16 - 0.08) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                        torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Apply ``theta`` (normalised coordinates, so any resolution: images and patch-target maps alike)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    if isinstance(fill, torch.Tensor):
        fill = fill.to(x.device, x.dtype)[:, None, None, None]
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def augment(x: torch.Tensor, black: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random flip, scale, shift and rotation (:func:`augment_params`); padding stays black."""
    return warp(x, augment_params(x.shape[0], gen, strength), black)


def lattice_keep(cfg: ViTConfig, b: int, gen: torch.Generator) -> torch.Tensor:
    """Keeps drawn from the complementary lattices the anomaly map uses (so training has seen them)."""
    groups = int(round(1 / (1 - cfg.mask_ratio)))
    keeps = complementary_keeps(cfg, groups)
    return keeps[torch.randint(0, groups, (b,), generator=gen)]
