"""Adapting the encoder to radiographs: the MAE's encoder fine-tuned together with the heads that have
training data (:data:`ADAPT_HEADS`), MAE reconstruction kept as a regulariser.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.training import data as D
from inference.training.augment import augment_params, lattice_keep, warp
from inference.training.heads_fit import HEAD_DEFAULTS
from inference.training.metrics import score
from inference.training.runtime import DeviceImages, autocast, device_name, seed_everything, stop_early
from inference.training.splits import dev_split
from inference.training.targets import head_loss, head_targets, patch_targets
from inference.vit import MAE
from inference.vocabulary import HEAD_NAMES

log = logging.getLogger(__name__)

#: heads trained with the encoder while it adapts: every reported head that has training data
ADAPT_HEADS = tuple(name for name in HEAD_NAMES if name != "tumour")


def adapt(init: str, data_dir: str, out: str, *, epochs: int = 3, batch_size: int = 48, lr: float = 2e-4,
          head_lr: float = 1e-3, mae_weight: float = 1.0, seed: int = 0, cache: str | None = None,
          threads: int | None = None, device: str = "cpu", max_minutes: float | None = None,
          command: str = "", stop_after_epochs: int | None = None, gamma: float = 0.25,
          augment_strength: float = 1.0, head_weights: dict[str, float] | None = None,
          dev_split_by: str = "patient") -> Path:
    """Fine-tune the MAE encoder on the training labels (fracture with boxes, KL grade, anatomy, view)
    while keeping the MAE reconstruction loss, so that the decoder (anomaly maps) stays valid.

    The development split (the same 10 % of train by hash that ``fit-heads`` selects its epochs on)
    is held out: after every epoch the temporary heads are scored on it and the encoder of the best
    epoch is what ``out`` keeps. Images are augmented (flip, scale, shift, rotation, gamma) and the
    fracture boxes' patch targets are warped with their image. The temporary heads are discarded;
    ``fit-heads`` trains the shipped heads on the adapted encoder's frozen embeddings. The
    ``hardware`` label is never used, so the label-efficiency experiment on it measures transfer
    to an unseen task.
    """
    from inference.bundle import load_mae, read_metadata, write_metadata, write_pretrained_bundle
    from inference.card import adapt_stages
    from inference.heads import build_head, n_outputs

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    mae, cfg, card = load_mae(init, device)
    records = [r for r in D.read_layout(data_dir) if r.split == "train"]
    cache = cache or str(Path("/tmp") / f"msk-cache-{cfg.image_size}.npz")
    canvases, geos = D.build_cache(records, cfg.image_size, cache)
    images = DeviceImages(canvases, geos, device)
    train_idx, dev_idx = dev_split(np.arange(len(records)), records, by=dev_split_by)

    heads = torch.nn.ModuleDict()
    targets = {}
    for name in ADAPT_HEADS:
        kind, labels, arch = HEAD_DEFAULTS[name]
        if arch.get("type") == "branch":  # adaptation heads read the final tokens; branches come later
            arch = {**arch, "type": "attn"}
        heads[name] = build_head(arch, cfg.dim, n_outputs(kind, labels))
        usable, target = head_targets(name, records)
        ok = np.array([usable(r) for r in records])
        y = np.array([target(r) if usable(r) else (0, 0, 0) if name == "view" else 0 for r in records])
        targets[name] = (kind, ok, y)
    pt, pok = patch_targets(records, geos, cfg.grid)
    pt_dev = torch.from_numpy(pt).to(device)
    weights = {name: float((head_weights or {}).get(name, 1.0)) for name in ADAPT_HEADS}
    mae.train()
    heads.to(device).train()
    opt = torch.optim.AdamW([{"params": mae.parameters(), "lr": lr}, {"params": heads.parameters(), "lr": head_lr}],
                            betas=(0.9, 0.95), weight_decay=0.05)
    base = [lr, head_lr]
    n = len(train_idx)
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, int(0.05 * total))
    gen = torch.Generator().manual_seed(seed)
    frac_pos = float(np.mean([r.fractured for r in records if r.fractured >= 0]))
    history, t0, step = [], time.time(), 0
    best_score, best_epoch = -1e9, -1
    pre = dict(card.meta["msk_node"]["training"].get("pretrain", {}))
    earlier = adapt_stages(pre)
    for epoch in range(epochs):
        mae.train()
        heads.train()
        perm = train_idx[torch.randperm(n, generator=gen).numpy()]
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = np.sort(perm[s * batch_size:(s + 1) * batch_size])
            x, black = images.batch(idx, gen, gamma)
            theta = augment_params(len(idx), gen, augment_strength)
            x = warp(x, theta, black)
            pts = warp(pt_dev[torch.from_numpy(idx).to(device)].view(len(idx), 1, cfg.grid, cfg.grid), theta)
            pts = pts.view(len(idx), -1).clamp(0, 1)
            with autocast(device):
                tokens = mae.encoder(x)
                loss = torch.zeros((), device=device)
                for name, head in heads.items():
                    kind, ok, y = targets[name]
                    sel = torch.from_numpy(ok[idx]).to(device)
                    if not bool(ok[idx].any()):
                        continue
                    ho = head(tokens[sel])
                    yy = torch.from_numpy(y[idx]).to(device)[sel]
                    pos_weight = (1 - frac_pos) / frac_pos if name == "fracture" else None
                    ordinal_weight = float(HEAD_DEFAULTS[name][2].get("ordinal_weight", 0.25))
                    loss = loss + weights[name] * head_loss(kind, ho, yy, pos_weight, ordinal_weight)
                    if name == "fracture":
                        pk_np = pok[idx][ok[idx]]
                        if pk_np.any():
                            pk = torch.from_numpy(pk_np).to(device)
                            tgt = pts[sel][pk]
                            w = torch.where(tgt > 0.05, 8.0, 1.0)
                            loss = loss + (F.binary_cross_entropy_with_logits(
                                ho["patch_logits"].float()[pk], tgt, reduction="none") * w).mean()
                if mae_weight:
                    keep = lattice_keep(cfg, len(idx), gen) if s % 4 == 3 else mae.random_keep(len(idx), gen)
                    loss = loss + mae_weight * mae.loss(x, keep.to(device)).float()
            f = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * f
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(mae.parameters()) + list(heads.parameters()), 1.0)
            opt.step()
            loss_sum += loss.detach().float()
            step += 1
            if s % 50 == 0:
                log.info("adapt epoch %d step %d/%d loss %.4f (%.0f s)", epoch, s, steps_per_epoch,
                         float(loss.detach()), time.time() - t0)
        dev = _adapt_dev_scores(mae, heads, images, dev_idx, targets, device)
        history.append({"epoch": epoch, "loss": round(float(loss_sum) / steps_per_epoch, 5),
                        "dev": {k: round(v, 4) for k, v in dev.items()}, "seconds": round(time.time() - t0, 1)})
        log.info("adapt epoch %d loss %.4f dev %s (%.0f s)", epoch, history[-1]["loss"], history[-1]["dev"],
                 time.time() - t0)
        stop = epoch + 1 == epochs or stop_early(epoch, epochs, t0, max_minutes, stop_after_epochs)
        if dev["score"] > best_score:
            best_score, best_epoch = dev["score"], epoch
            stage = {"command": command, "init": str(init), "seed": seed, "epochs_done": epoch + 1, "epochs": epochs,
                     "batch_size": batch_size, "lr": lr, "head_lr": head_lr, "mae_weight": mae_weight,
                     "gamma": gamma, "augment_strength": augment_strength, "labels": list(ADAPT_HEADS),
                     "head_weights": weights,
                     "device": device_name(device), "train_images": int(n), "dev_images": int(len(dev_idx)),
                     "dev_split": dev_split_by,
                     "best_epoch": best_epoch, "dev_score": round(best_score, 4), "history": history}
            write_pretrained_bundle(out, mae, cfg, training={**pre, "adapt": stage, "adapt_stages": earlier + [stage]})
        else:  # keep the best epoch's weights; only the history grows
            meta = read_metadata(out)
            tr = meta["msk_node"]["training"]["pretrain"]
            for stage in (tr["adapt"], tr["adapt_stages"][-1]):
                stage["history"], stage["epochs_done"] = history, epoch + 1
            write_metadata(out, meta)
        if stop:
            break
    return Path(out)


@torch.no_grad()
def _adapt_dev_scores(mae: MAE, heads, images: DeviceImages, dev_idx: np.ndarray, targets: dict, device: str,
                      batch_size: int = 256) -> dict[str, float]:
    """Scores of the temporary heads on the development images; ``score``: their mean (fracture AUROC,
    KL accuracy and kappa averaged, anatomy accuracy, view agreement)."""
    from inference.heads import probabilities

    mae.eval()
    heads.eval()
    probs = {name: [] for name in heads}
    for s in range(0, len(dev_idx), batch_size):
        idx = dev_idx[s:s + batch_size]
        x, _ = images.batch(idx)
        with autocast(device):
            tokens = mae.encoder(x)
            for name, head in heads.items():
                probs[name].append(probabilities(targets[name][0], head(tokens)["logits"].float()).cpu().numpy())
    out = {}
    for name in heads:
        kind, ok, y = targets[name]
        sel = ok[dev_idx]
        if not sel.any():
            continue
        p = np.concatenate(probs[name])[sel]
        sc = score(kind, y[dev_idx][sel], p)
        out[name] = sc / 2 if kind == "ordinal" else sc
    out["score"] = float(np.mean(list(out.values()))) if out else 0.0
    return out
