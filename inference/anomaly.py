"""Anomaly maps from the masked autoencoder's reconstruction error, and regions from maps.

Complementary masks: the patch grid is split into ``groups`` regular lattices
(2x2 -> 4 groups, matching the 75 % mask ratio of training); pass *g* shows the
encoder lattice *g* only and the decoder reconstructs the rest. With all four
passes every patch is reconstructed three times from the others; the shipped
setting runs the two diagonal lattices (``passes: [0, 3]``), whose visible sets
are disjoint, so every patch is still reconstructed from the others (once or
twice) at half the cost: the encoder sees half an image's worth of tokens. The per-patch error is
normalised against its distribution on normal training images (per grid
position: z = (error - mean) / std) and patches outside the image (letterbox
padding) are set to 0. ``z`` is mapped to 0..1 for display by ``clip(z / z_max)``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from inference.preprocess import Geometry
from inference.results import Region
from inference.vit import MAE, complementary_keeps, patchify


@torch.no_grad()
def reconstruction_error(mae: MAE, x: torch.Tensor, groups: int = 4, passes: tuple[int, ...] | None = None
                         ) -> torch.Tensor:
    """(B, 1, S, S) -> (B, N) mean squared error of every patch, each reconstructed from the others.

    ``passes`` picks which of the ``groups`` lattices are shown to the encoder (default: all).
    Two diagonal lattices of a 2x2 split (0 and 3) already mask every patch at least once
    (their visible sets are disjoint) at half the cost of all four.
    """
    cfg = mae.cfg
    keeps = complementary_keeps(cfg, groups).to(x.device)  # (G, K)
    if passes is not None:
        keeps = keeps[list(passes)]
    groups = keeps.shape[0]
    b = x.shape[0]
    xs = x.repeat(groups, 1, 1, 1)  # (G*B, ...), pass-major
    keep = keeps.repeat_interleave(b, dim=0)  # (G*B, K)
    pred = mae.reconstruct(xs, keep)
    target = patchify(xs, cfg.patch_size)
    err = (pred - target).pow(2).mean(-1)  # (G*B, N)
    masked = torch.ones_like(err)
    masked.scatter_(1, keep, 0.0)
    err = (err * masked).view(groups, b, -1).sum(0) / masked.view(groups, b, -1).sum(0)
    return err


@torch.no_grad()
def random_mask_error(mae: MAE, x: torch.Tensor, passes: int = 10, ratio: float = 0.75, seed: int = 0
                      ) -> torch.Tensor:
    """(B, 1, S, S) -> (B, N): SKELEX's recipe, the per-patch squared error averaged over ``passes`` random
    masks hiding ``ratio`` of the patches (each patch is scored on the passes that hid it; a patch never
    hidden gets 0). Tried for issue 17 against :func:`reconstruction_error` (complementary lattices): no
    better at locating fractures, at five times the decoder passes; not used at inference."""
    from inference.vit import patchify

    cfg = mae.cfg
    n = cfg.num_patches
    k = n - int(round(n * ratio))
    g = torch.Generator().manual_seed(seed)
    target = patchify(x, cfg.patch_size)
    total = torch.zeros(x.shape[0], n, device=x.device)
    count = torch.zeros_like(total)
    for _ in range(passes):
        keep = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(x.shape[0])]).to(x.device)
        err = (mae.reconstruct(x, keep) - target).pow(2).mean(-1)
        hidden = torch.ones_like(err)
        hidden.scatter_(1, keep, 0.0)
        total += err * hidden
        count += hidden
    return total / count.clamp_min(1)


def coverage(geo: Geometry, grid: int) -> np.ndarray:
    """(grid, grid) fraction of each patch covered by the image (not letterbox padding)."""
    p = geo.size / grid
    edges = np.arange(grid + 1) * p
    cov_y = np.clip(np.minimum(edges[1:], geo.off_y + geo.height) - np.maximum(edges[:-1], geo.off_y), 0, p) / p
    cov_x = np.clip(np.minimum(edges[1:], geo.off_x + geo.width) - np.maximum(edges[:-1], geo.off_x), 0, p) / p
    return np.outer(cov_y, cov_x).astype(np.float32)


def normalise(err: np.ndarray, mean: np.ndarray, std: np.ndarray, geo: Geometry, grid: int,
              min_coverage: float = 0.5, erode: int = 0) -> np.ndarray:
    """Per-patch errors (N,) -> z-scores on the (grid, grid) lattice, padding patches 0.

    ``erode`` > 0 also zeroes that many rings of patches along the image's edge (and the grid's):
    there the MAE lacks context on one side, and anatomy leaving the field of view is not an anomaly.
    """
    z = (err.reshape(grid, grid) - mean.reshape(grid, grid)) / np.maximum(std.reshape(grid, grid), 1e-6)
    valid = coverage(geo, grid) >= min_coverage
    if erode:
        valid = ndimage.binary_erosion(valid, iterations=int(erode), border_value=0)
    z[~valid] = 0.0
    return z.astype(np.float32)


def smooth_grid(values: np.ndarray, sigma_patches: float) -> np.ndarray:
    """Gaussian smoothing of a (g, g) patch map (sigma in patches)."""
    v = values.astype(np.float32)
    return ndimage.gaussian_filter(v, sigma_patches, mode="nearest") if sigma_patches else v


def grid_to_canvas(values: np.ndarray, size: int, sigma_patches: float = 0.6) -> np.ndarray:
    """(g, g) patch values -> (size, size), smoothed (Gaussian, in patches) and bilinearly upsampled."""
    g = values.shape[0]
    v = smooth_grid(values, sigma_patches)
    zoom = size / g
    return ndimage.zoom(v, zoom, order=1, mode="nearest", grid_mode=True).astype(np.float32)


def regions_from_map(canvas_map: np.ndarray, geo: Geometry, threshold: float, source: str,
                     max_regions: int = 5, min_area_fraction: float = 0.002) -> tuple[Region, ...]:
    """Connected components of ``canvas_map >= threshold`` inside the image, as boxes in source pixels."""
    inside = np.zeros_like(canvas_map, dtype=bool)
    inside[geo.off_y:geo.off_y + geo.height, geo.off_x:geo.off_x + geo.width] = True
    labels, n = ndimage.label((canvas_map >= threshold) & inside)
    if n == 0:
        return ()
    regions = []
    px_per_canvas = (geo.rows / geo.height) * (geo.columns / geo.width)
    min_area = min_area_fraction * geo.height * geo.width
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == i
        area = int(comp.sum())
        if area < min_area:
            continue
        peak = float(canvas_map[sl][comp].max())
        box = geo.box_to_source((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        regions.append(Region(box=box, score=peak, area_px=int(round(area * px_per_canvas)), source=source))
    regions.sort(key=lambda r: -r.score)
    return tuple(regions[:max_regions])


def peak_regions(canvas_map: np.ndarray, geo: Geometry, relative: float, source: str, max_regions: int = 2,
                 second: float = 0.5) -> tuple[Region, ...]:
    """Regions around the map's peaks, whatever the map's absolute level: the connected components of
    ``canvas_map >= relative * peak`` inside the image, strongest first, the first always (where the map
    is not all zero), the others only where their own peak reaches ``second * peak``.

    The fracture call says whether there is a fracture; the map only has to say where, so its strongest
    place is reported even when the map never reaches an absolute threshold (issue 17: a "definite"
    fracture with no box)."""
    inside = np.zeros_like(canvas_map, dtype=bool)
    inside[geo.off_y:geo.off_y + geo.height, geo.off_x:geo.off_x + geo.width] = True
    values = np.where(inside, canvas_map, 0.0)
    peak = float(values.max()) if values.size else 0.0
    if not peak > 0.0:
        return ()
    labels, n = ndimage.label(values >= relative * peak)
    px_per_canvas = (geo.rows / geo.height) * (geo.columns / geo.width)
    regions = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == i
        top = float(values[sl][comp].max())
        if top < second * peak and regions:
            continue
        box = geo.box_to_source((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        regions.append(Region(box=box, score=top, area_px=int(round(int(comp.sum()) * px_per_canvas)), source=source))
    regions.sort(key=lambda r: -r.score)
    regions = [r for k, r in enumerate(regions) if k == 0 or r.score >= second * peak]
    return tuple(regions[:max_regions])
