"""MAE pretraining of the encoder (``dicom-node model pretrain``), seeded, on the uint8 canvas cache
of :mod:`inference.training.data`; writes a bundle with the encoder and no heads.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from inference.training import data as D
from inference.training.augment import augment, lattice_keep
from inference.training.pack import pack_info
from inference.training.runtime import DeviceImages, autocast, device_name, seed_everything, stop_early
from inference.vit import MAE, ViTConfig

log = logging.getLogger(__name__)

def pretrain(data_dir: str, out: str, *, image_size: int | None = None, epochs: int = 10, batch_size: int = 64,
             lr: float = 5e-4, weight_decay: float = 0.05, seed: int = 0, cache: str | None = None,
             splits: tuple[str, ...] = ("train",), init: str | None = None, threads: int | None = None,
             device: str = "cpu", max_minutes: float | None = None, command: str = "",
             stop_after_epochs: int | None = None, arch: dict | None = None, gamma: float = 0.25) -> Path:
    """MAE-pretrain an encoder on every image of ``splits`` under ``data_dir``; write a bundle to ``out``.

    ``arch`` overrides :class:`ViTConfig` fields (dim, depth, heads, decoder_*). Images and
    augmentation stay on ``device``; bf16 autocast on CUDA. ``image_size`` (default 256, or ``init``'s):
    with ``init``, a different size continues that encoder at this input size (the position embeddings
    are fixed sine-cosine, made for the new grid; every weight carries over), the cheap way to a
    higher-resolution encoder on a short accelerator budget.
    """
    from inference.bundle import load_mae, write_pretrained_bundle

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    records = [r for r in D.read_layout(data_dir) if r.split in splits]
    if init:
        mae, cfg, _ = load_mae(init)
        log.info("continuing from %s", init)
        if image_size is not None and image_size != cfg.image_size:
            resized = ViTConfig.from_dict({**cfg.to_dict(), "image_size": image_size})
            state = mae.state_dict()
            mae = MAE(resized)
            mae.load_state_dict(state)  # the position embeddings are buffers made for the new grid
            log.info("input size %d -> %d (grid %d -> %d)", cfg.image_size, image_size, cfg.grid, resized.grid)
            cfg = resized
    else:
        cfg = ViTConfig.from_dict({**ViTConfig().to_dict(), "image_size": image_size or 256, **(arch or {})})
        mae = MAE(cfg)
    log.info("encoder %s: %.2f M parameters (decoder %.2f M)", cfg.to_dict(),
             sum(p.numel() for p in mae.encoder.parameters()) / 1e6,
             sum(p.numel() for p in mae.decoder.parameters()) / 1e6)
    cache = cache or str(Path("/tmp") / f"msk-cache-{cfg.image_size}.npz")
    canvases, geos = D.build_cache(records, cfg.image_size, cache if cache != "none" else None)
    images = DeviceImages(canvases, geos, device)
    mae.to(device).train()
    opt = torch.optim.AdamW(mae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    n = len(records)
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, int(0.05 * total))
    gen = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            x, black = images.batch(idx, gen, gamma)
            x = augment(x, black, gen)
            keep = lattice_keep(cfg, len(idx), gen) if s % 4 == 3 else mae.random_keep(len(idx), gen)
            lr_now = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            for g in opt.param_groups:
                g["lr"] = lr_now
            with autocast(device):
                loss = mae.loss(x, keep.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
            opt.step()
            loss_sum += loss.detach().float()
            step += 1
            if s % 50 == 0:
                log.info("epoch %d step %d/%d loss %.4f lr %.2e (%.0f s)", epoch, s, steps_per_epoch,
                         float(loss.detach()), lr_now, time.time() - t0)
        history.append({"epoch": epoch, "loss": round(float(loss_sum) / steps_per_epoch, 5),
                        "seconds": round(time.time() - t0, 1)})
        log.info("epoch %d mean loss %.4f (%.0f s)", epoch, history[-1]["loss"], time.time() - t0)
        last = epoch + 1 == epochs or stop_early(epoch, epochs, t0, max_minutes, stop_after_epochs)
        if last or (epoch + 1) % 10 == 0:
            write_pretrained_bundle(out, mae, cfg, training={
                "command": command, "seed": seed, "epochs_done": epoch + 1, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "gamma": gamma,
                "splits": list(splits), "images": n, "device": device_name(device), "history": history,
                "init": init, "data_pack": (pack_info(data_dir) or {}).get("command")})
        if last:
            break
    return Path(out)
