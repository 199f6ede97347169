"""What every training loop shares: seeding, the device and its name, mixed precision, per-image
normalisation of canvases, the canvases held on the device (:class:`DeviceImages`) and the stopping rule of
``--max-minutes`` / ``--stop-after-epochs``.
"""

from __future__ import annotations

import logging
import random
import time

import numpy as np
import torch

from inference.preprocess import Geometry

log = logging.getLogger(__name__)

def stop_early(epoch: int, epochs: int, t0: float, max_minutes: float | None, stop_after_epochs: int | None) -> bool:
    """After ``epoch`` (0-based): stop for ``--max-minutes`` or ``--stop-after-epochs``?"""
    if max_minutes is not None and (time.time() - t0) / 60 > max_minutes:
        log.warning("stopping after epoch %d: --max-minutes %.1f reached", epoch, max_minutes)
        return True
    if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs:
        log.info("stopping after epoch %d (--stop-after-epochs; schedule of %d epochs)", epoch, epochs)
        return True
    return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def canvas_stats(canvases: np.ndarray, geos: list[Geometry]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean and std over the image part of each uint8 canvas (0..1 scale)."""
    means = np.empty(len(geos), np.float32)
    stds = np.empty(len(geos), np.float32)
    for i, g in enumerate(geos):
        part = canvases[i, g.off_y:g.off_y + g.height, g.off_x:g.off_x + g.width].astype(np.float32) / 255.0
        means[i], stds[i] = part.mean(), max(float(part.std()), 0.02)
    return means, stds


def to_input(canvases_u8: np.ndarray, means: np.ndarray, stds: np.ndarray) -> torch.Tensor:
    """uint8 canvases (B, S, S) -> standardised float tensor (B, 1, S, S), as preprocess.standardise."""
    x = torch.from_numpy(canvases_u8).float().div_(255.0)[:, None]
    m = torch.from_numpy(means)[:, None, None, None]
    s = torch.from_numpy(stds)[:, None, None, None]
    return (x - m) / s


def autocast(device: str):
    """bf16 autocast on CUDA (the encoder's matrix work), a no-op context on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))


class DeviceImages:
    """The uint8 canvases and their geometries held on ``device``; standardised (optionally augmented) batches.

    On a GPU the whole training set lives in its memory (10k images at 256 px: 0.7 GB), so
    batches never wait on the CPU. Standardisation is recomputed after the intensity
    augmentation over the image part only (letterbox padding excluded), as at inference.
    """

    def __init__(self, canvases: np.ndarray, geos: list[Geometry], device: str = "cpu"):
        self.device = device
        self.canvases = torch.from_numpy(np.ascontiguousarray(canvases)).to(device)
        box = np.array([[g.off_y, g.off_x, g.height, g.width] for g in geos], dtype=np.int64).reshape(-1, 4)
        self.box = torch.from_numpy(box).to(device)
        self.size = canvases.shape[-1]

    def __len__(self) -> int:
        return len(self.canvases)

    def batch(self, idx, gen: torch.Generator | None = None, gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised images (B, 1, S, S), the padding value per image (B,)) for indices ``idx``.

        ``gamma`` > 0 applies a random gamma exp(U(-gamma, gamma)) per image (drawn from ``gen``)."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long).to(self.device)
        x = self.canvases[i].float().div_(255.0)[:, None]
        if gamma > 0:
            g = torch.exp((torch.rand(len(i), generator=gen) * 2 - 1) * gamma).to(self.device)
            x = x.clamp_min(1e-6).pow(g[:, None, None, None])
        b = self.box[i]
        r = torch.arange(self.size, device=self.device)
        rows = (r[None] >= b[:, :1]) & (r[None] < b[:, :1] + b[:, 2:3])
        cols = (r[None] >= b[:, 1:2]) & (r[None] < b[:, 1:2] + b[:, 3:4])
        mask = (rows[:, :, None] & cols[:, None, :])[:, None].float()
        n = mask.sum((1, 2, 3)).clamp_min(1.0)
        mean = (x * mask).sum((1, 2, 3)) / n
        var = (((x - mean[:, None, None, None]) * mask) ** 2).sum((1, 2, 3)) / n
        std = var.sqrt().clamp_min(0.02)
        x = (x * mask - mean[:, None, None, None]) / std[:, None, None, None]
        return x, -mean / std


def device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} threads)"
