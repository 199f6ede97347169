"""Fitting heads on frozen embeddings (``dicom-node model fit-heads``): the heads' default kinds,
labels and architectures, training with model selection on a development split, operating points, and
writing a head and its card entry into a bundle; the anomaly statistics too.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.training.augment import augment
from inference.training.calibrate import calibrate
from inference.training.metrics import operating_points, score, threshold_split
from inference.training.runtime import DeviceImages, autocast, to_input
from inference.training.splits import clean_dev_split, dev_split
from inference.training.targets import head_loss, head_targets, patch_targets
from inference.training.tokens import Embedded, geometry_augmented_tokens, predict_tokens
from inference.vocabulary import ANATOMY_LABELS, BINARY_LABELS, FINDING_CONCEPTS, KL_GRADES, VIEW_LABELS, label_concepts

log = logging.getLogger(__name__)

HEAD_DEFAULTS = {
    # name: (kind, labels, arch, source filter)
    "fracture": ("binary", list(BINARY_LABELS), {"type": "attn+patch", "hidden": 256, "dropout": 0.3}),
    "kl_grade": ("ordinal", list(KL_GRADES), {"type": "branch", "branch_depth": 2, "hidden": 256, "dropout": 0.3,
                                              "ordinal_weight": 1.0, "image_augmentation": 1, "token_keep": 1}),
    "anatomy": ("categorical", list(ANATOMY_LABELS), {"type": "attn", "hidden": 256, "dropout": 0.3,
                                                      "geometry_augmentation": 1}),
    "view": ("categorical", list(VIEW_LABELS), {"type": "attn", "hidden": 256, "dropout": 0.3}),
    "hardware": ("binary", list(BINARY_LABELS), {"type": "linear", "dropout": 0.0}),
    "tumour": ("binary", list(BINARY_LABELS), {"type": "linear", "dropout": 0.0}),
}


def selection_score(head, kind: str, tokens: torch.Tensor, y: np.ndarray, boxes: np.ndarray | None = None) -> float:
    """:func:`score` of ``head`` on development ``tokens``; with ``boxes`` (images x patches, > 0 inside a
    fracture box) and a patch map, plus the map's hit rate: the share of boxed images whose map peaks in a box."""
    p, maps = predict_tokens(head, kind, tokens)
    sc = score(kind, np.asarray(y), p)
    if boxes is not None and maps is not None:
        boxed = boxes.max(1) > 0
        if boxed.any():
            peak = maps[boxed].argmax(1)
            sc += float(np.mean(boxes[boxed][np.arange(len(peak)), peak] > 0))
    return sc


def train_head(name: str, kind: str, labels: list[str], arch: dict, tokens: torch.Tensor, y: np.ndarray,
               dev_tokens: torch.Tensor, dev_y: np.ndarray, *, epochs: int = 40, lr: float = 1e-3,
               weight_decay: float = 0.05, batch_size: int = 128, seed: int = 0,
               patch_y: np.ndarray | None = None, patch_ok: np.ndarray | None = None, patch_weight: float = 1.0,
               device: str = "cpu", dev_boxes: np.ndarray | None = None, encoder=None,
               images: DeviceImages | None = None):
    """Train one head on frozen tokens; keep the epoch that scores best on the development split.

    ``dev_boxes`` (development images x patches, > 0 inside a fracture box, all 0 for images without
    boxes): a head with a patch map then also scores by its localisation hit rate there (the share
    of boxed images whose map peaks inside a box), so the epoch kept is good at both.

    A ``branch`` head (``encoder``: the encoder whose last blocks it starts from) fine-tunes its
    blocks at ``branch_lr`` (default 1e-4) and its attention head at ``lr``; it sees a random
    ``token_keep`` share (default 0.6) of the patch tokens per step, the others dropped.

    ``images`` (the training images, in the order of ``y``; ``tokens`` then None): a branch head's
    inputs are made afresh each step from randomly augmented images (:func:`augment` at strength
    ``arch['image_augmentation']``, gamma ``arch['gamma']``, default 0.25) through the frozen
    encoder up to the branch's input block, instead of being read from ``tokens``."""
    from inference.heads import build_head, input_layer, n_outputs

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    branch = arch.get("type") == "branch"
    if images is not None:
        if not branch or encoder is None:
            raise ValueError("image_augmentation trains branch heads only (on the encoder's tapped tokens)")
        layer = input_layer(arch, len(encoder.blocks))
        strength, gamma = float(arch["image_augmentation"]), float(arch.get("gamma", 0.25))
        encoder.eval()
    dim = encoder.norm.normalized_shape[0] if images is not None else tokens.shape[-1]
    head = build_head(arch, dim, n_outputs(kind, labels), encoder).to(device)
    if branch:
        trunk = list(head.blocks.parameters()) + list(head.norm.parameters())
        groups = [{"params": trunk, "lr": float(arch.get("branch_lr", 1e-4))},
                  {"params": list(head.head.parameters()), "lr": lr}]
        batch_size = int(arch.get("batch_size", 64))
    else:
        groups = [{"params": list(head.parameters()), "lr": lr}]
    base_lr = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    token_keep = float(arch.get("token_keep", 0.6))
    yt = torch.from_numpy(np.asarray(y)).to(device)
    pos_weight = None
    if kind == "binary":
        pos = float(np.mean(y))
        pos_weight = min(10.0, (1 - pos) / max(pos, 1e-3)) if 0 < pos < 1 else None
    n = len(images) if images is not None else len(tokens)
    steps = max(1, math.ceil(n / batch_size))
    total = steps * epochs
    best, best_state, history = -1e9, None, []
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) == 0:
                continue
            if images is not None:
                x, black = images.batch(idx.numpy(), gen, gamma)
                with torch.no_grad(), autocast(device):
                    _, taps = encoder.forward_taps(augment(x, black, gen, strength), taps=(layer,), final=False)
                tok = taps[layer].float()
            else:
                tok = tokens[idx].to(device).float()
            if branch:  # drop patch tokens outright: the branch's attention then sees a random subset
                n_keep = max(1, int(round((tok.shape[1] - 1) * token_keep)))
                keep = (torch.argsort(torch.rand(tok.shape[0], tok.shape[1] - 1, generator=gen), 1)[:, :n_keep]
                        + 1).to(device)
                tok = torch.cat([tok[:, :1], torch.gather(tok, 1, keep[..., None].expand(-1, -1, tok.shape[-1]))], 1)
            else:
                # token dropout: hide a random 20 % of the patch tokens (a cheap augmentation on frozen features)
                keep = (torch.rand(tok.shape[0], tok.shape[1] - 1, generator=gen) > 0.2).to(device)
                tok = torch.cat([tok[:, :1], tok[:, 1:] * keep[..., None]], 1)
            with autocast(device):
                out = head(tok)
            loss = head_loss(kind, out, yt[idx.to(device)], pos_weight, float(arch.get("ordinal_weight", 0.25)))
            if patch_y is not None and "patch_logits" in out:
                ok = torch.from_numpy(patch_ok[idx.numpy()]).to(device)
                if ok.any():
                    pt = torch.from_numpy(patch_y[idx.numpy()]).to(device)[ok]
                    pl = out["patch_logits"][ok]
                    w = torch.where(pt > 0, 8.0, 1.0)
                    patch_loss = F.binary_cross_entropy_with_logits(pl, pt, reduction="none") * w
                    loss = loss + patch_weight * patch_loss.mean()
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for g, b0 in zip(opt.param_groups, base_lr):
                g["lr"] = b0 * factor
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if dev_tokens is None:  # no selection (label-efficiency runs): the last epoch
            best, best_state = float("nan"), {k: v.detach().clone() for k, v in head.state_dict().items()}
            history.append({"epoch": epoch})
            continue
        sc = selection_score(head, kind, dev_tokens, dev_y, dev_boxes)
        history.append({"epoch": epoch, "dev_score": round(sc, 4)})
        log.info("head %s epoch %d: dev score %.4f (%.0f s)", name, epoch, sc, time.time() - t0)
        if sc > best:
            best, best_state = sc, {k: v.detach().clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    head.cpu().eval()
    best_epoch = (int(np.argmax([h["dev_score"] for h in history])) if dev_tokens is not None
                  else len(history) - 1)
    return head, {"dev_score": best, "best_epoch": best_epoch, "history": history}


def subsample_labels(idx: np.ndarray, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` labelled images, up to half of them positive (binary labels), seeded."""
    rng = np.random.default_rng(seed)
    if n >= len(idx):
        return idx
    pos, neg = idx[y == 1], idx[y == 0]
    n_pos = min(len(pos), max(1, n // 2))
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)]))


def fit_head(emb: Embedded, name: str, *, kind: str | None = None, labels: list[str] | None = None,
             arch: dict | None = None, epochs: int = 40, seed: int = 0, max_labels: int | None = None,
             lr: float = 1e-3, dev_split_by: str | None = None) -> dict:
    """Train head ``name`` on ``emb``'s train split; thresholds and metrics on its val split."""
    d_kind, d_labels, d_arch = HEAD_DEFAULTS.get(name, ("binary", ["absent", "present"], {"type": "linear"}))
    kind, labels, arch = kind or d_kind, labels or d_labels, {**d_arch, **(arch or {})}
    usable, target = head_targets(name, emb.records)
    tr_all = emb.index("train", usable)
    va = emb.index("val", usable)
    if len(tr_all) == 0:
        raise ValueError(f"no training images with a {name!r} label")
    y_all = [target(r) if usable(r) else None for r in emb.records]

    def ys(idx):
        return np.array([y_all[i] for i in idx], dtype=np.int64) if len(idx) else np.zeros(0, np.int64)

    if dev_split_by is None:  # held out of the encoder's adaptation too (see clean_dev_split)
        dev_split_by = clean_dev_split(emb.card.meta.get("msk_node", {}).get("training", {}))
    tr, dev = dev_split(tr_all, emb.records, by=dev_split_by)
    if max_labels is not None:
        # a label budget covers everything: no extra development labels to pick the epoch with
        tr = subsample_labels(tr_all, ys(tr_all), max_labels, seed)
        dev = None
        if kind == "binary" and len(set(ys(tr).tolist())) < 2:
            raise ValueError(f"{max_labels} labels do not include both classes")
    patch_y = patch_ok = None
    if arch.get("type") == "attn+patch":
        pt, ok = patch_targets([emb.records[i] for i in tr], [emb.geos[i] for i in tr], emb.cfg.grid)
        patch_y, patch_ok = pt, ok
    from inference.heads import input_layer

    layer = input_layer(arch, emb.cfg.depth)
    tokens = emb.inputs(layer)  # development and val inputs (and training inputs, unless made from images)
    train_y, images = ys(tr), None
    if arch.get("image_augmentation"):  # augmented images through the frozen encoder each step (mirroring included)
        if layer is None or patch_y is not None:
            raise ValueError("image_augmentation is for branch heads without patch maps")
        arch = {k: v for k, v in arch.items() if k != "flip_augmentation"}
        images, train_tokens = DeviceImages(emb.canvases[tr], [emb.geos[i] for i in tr], emb.device), None
    else:
        train_tokens = tokens[tr]
    if int(arch.get("geometry_augmentation", 0)) and layer is not None:
        raise ValueError("geometry_augmentation re-frames final tokens only; not for branch heads")
    for copy in range(int(arch.get("geometry_augmentation", 0))):
        log.info("re-framing %d training images for head %s (copy %d)", len(tr), name, copy + 1)
        train_tokens = torch.cat([train_tokens, geometry_augmented_tokens(emb, tr, seed + 1000 * (copy + 1))])
        train_y = np.concatenate([train_y, ys(tr)])
    if arch.get("flip_augmentation"):
        if patch_y is not None:
            raise ValueError("flip_augmentation would mirror images but not their fracture boxes")
        log.info("mirroring %d training images for head %s", len(tr), name)
        train_tokens = torch.cat([train_tokens, emb.mirrored(tr, layer)])
        train_y = np.concatenate([train_y, ys(tr)])
    dev_boxes = None
    if arch.get("type") == "attn+patch" and dev is not None:
        dev_boxes, _ = patch_targets([emb.records[i] for i in dev], [emb.geos[i] for i in dev], emb.cfg.grid)
    members = int(arch.get("members", 1))
    fits = [train_head(name, kind, labels, {**arch, "members": 1}, train_tokens, train_y,
                       tokens[dev] if dev is not None else None, ys(dev) if dev is not None else None,
                       epochs=epochs, seed=seed + k, patch_y=patch_y, patch_ok=patch_ok, lr=lr, device=emb.device,
                       dev_boxes=dev_boxes, encoder=emb.mae.encoder, images=images)
            for k in range(members)]
    if members == 1:
        head, info = fits[0]
    else:  # an ensemble of heads trained with seeds seed .. seed+members-1, each picking its own epoch
        from inference.heads import EnsembleHead

        head = EnsembleHead([h for h, _ in fits]).eval()
        info = {"best_epoch": [i["best_epoch"] for _, i in fits],
                "member_dev_scores": [i["dev_score"] for _, i in fits],
                "history": [i["history"] for _, i in fits], "dev_score": float("nan")}
        if dev is not None:
            info["dev_score"] = selection_score(head, kind, tokens[dev], ys(dev), dev_boxes)
    from inference.bundle import half
    from inference.results import DECISIONS

    head.load_state_dict(half(head.state_dict()))  # as it will be stored and loaded: thresholds fit those weights
    calibration = None
    if kind == "binary" and dev is not None and members == 1 and len(set(ys(dev).tolist())) == 2:
        # probabilities a reader can take at face value: Platt scaling on the development split
        calibration = calibrate(head, tokens[dev], ys(dev))
        log.info("head %s: Platt scaling %.3f x logit %+.3f, development log loss %.4f -> %.4f", name,
                 calibration["scale"], calibration["shift"], calibration["log_loss_before"],
                 calibration["log_loss_after"])
    if kind == "ordinal" and dev is not None and "decision" not in arch:
        # how grades are read from the probabilities: the mode or the median, whichever scores better on dev
        p_dev, _ = predict_tokens(head, kind, tokens[dev])
        info["decision_scores"] = {rule: round(score(kind, ys(dev), p_dev, rule), 4) for rule in DECISIONS}
        arch = {**arch, "decision": max(DECISIONS, key=lambda r: info["decision_scores"][r])}
    result = {"head": head, "kind": kind, "labels": labels, "arch": arch, "train_images": int(len(tr)),
              "dev_images": int(len(dev)) if dev is not None else 0, "val_images": int(len(va)), "selection": info,
              "dev_split": dev_split_by, "calibration": calibration}
    if len(va):
        p, _ = predict_tokens(head, kind, tokens[va])
        result["val_y"], result["val_p"] = ys(va), p
    split = threshold_split(ys(dev) if dev is not None else None, ys(va), name) if kind == "binary" else None
    if split is not None:  # thresholds, like epochs, on the development split
        on = dev if split == "development" else va
        p_on, _ = predict_tokens(head, kind, tokens[on])
        result["operating_points"] = {**operating_points(ys(on), p_on), "split": split}
    return result


def save_head(bundle: str | Path, name: str, fit: dict, command: str = "", extra: dict | None = None) -> None:
    """Write the head's weights and its card entry into ``bundle``."""
    from inference.bundle import _now, half, read_metadata, save_tensors, write_metadata

    bundle = Path(bundle)
    meta = read_metadata(bundle)
    rel = f"models/heads/{name}.safetensors"
    save_tensors(bundle, rel, half(fit["head"].state_dict()), meta)
    entry = {"kind": fit["kind"], "labels": list(fit["labels"]), "weights": rel, "arch": fit["arch"]}
    if name in FINDING_CONCEPTS:
        entry["concept"] = FINDING_CONCEPTS[name].as_dict()
    concepts = label_concepts(name, fit["labels"])
    if concepts is not None:
        entry["label_concepts"] = [c.as_dict() for c in concepts]
    if fit["kind"] == "binary":
        ops = fit.get("operating_points")
        if ops is None:
            raise ValueError(f"head {name!r}: no validation images with both classes to choose thresholds on")
        entry["operating_points"] = ops
    if fit.get("calibration"):
        entry["calibration"] = fit["calibration"]
    if name == "kl_grade":
        entry["applies_to"] = ["knee"]
        entry["notes"] = ("Trained on CLAHE-enhanced 224x224 knee-joint crops; reported only when the anatomy "
                          "head (or BodyPartExamined) says knee. On a full knee radiograph it is out of its "
                          "training distribution.")
    entry["training"] = {"command": command, "train_images": fit["train_images"], "dev_images": fit["dev_images"],
                         "dev_split": fit["dev_split"],
                         "val_images": fit["val_images"], "best_epoch": fit["selection"]["best_epoch"],
                         "dev_score": (None if math.isnan(fit["selection"]["dev_score"])
                                       else round(fit["selection"]["dev_score"], 4)), "fitted": _now(),
                         **({"decision_scores": fit["selection"]["decision_scores"]}
                            if "decision_scores" in fit["selection"] else {}),
                         **(extra or {})}
    meta["msk_node"]["heads"][name] = entry
    write_metadata(bundle, meta)


def fit_anomaly(emb: Embedded, bundle: str | Path, groups: int = 4, passes: tuple[int, ...] | None = (0, 3),
                max_images: int = 1500, seed: int = 0, command: str = "") -> dict:
    """Per-position mean/std of the reconstruction error on normal training images -> bundle."""
    from inference.anomaly import reconstruction_error
    from inference.bundle import ANOMALY_FILE, read_metadata, save_tensors, write_metadata

    normal = emb.index("train", lambda r: (r.source == "fracatlas" and r.fractured == 0 and r.hardware == 0)
                       or (r.source == "knee" and r.kl == 0))
    rng = np.random.default_rng(seed)
    if len(normal) > max_images:
        normal = np.sort(rng.choice(normal, max_images, replace=False))
    errs = []
    for s in range(0, len(normal), 64):
        idx = normal[s:s + 64]
        x = to_input(emb.canvases[idx], emb.means[idx], emb.stds[idx]).to(emb.device)
        errs.append(reconstruction_error(emb.mae, x, groups, passes).float().cpu().numpy())
    errs = np.concatenate(errs)
    from inference.anomaly import coverage

    cov = np.stack([coverage(emb.geos[i], emb.cfg.grid).ravel() for i in normal]) >= 0.5
    mean = np.array([errs[cov[:, j], j].mean() if cov[:, j].any() else 0.0 for j in range(errs.shape[1])])
    std = np.array([errs[cov[:, j], j].std() if cov[:, j].sum() > 1 else 1.0 for j in range(errs.shape[1])])
    std = np.maximum(std, 0.05 * np.median(std))
    meta = read_metadata(bundle)
    save_tensors(bundle, ANOMALY_FILE, {"mean": torch.tensor(mean, dtype=torch.float32),
                                        "std": torch.tensor(std, dtype=torch.float32)}, meta)
    meta["msk_node"]["anomaly"] = {
        "file": ANOMALY_FILE, "groups": groups, "passes": list(passes) if passes else None,
        "statistic": "per-position mean/std of patch MSE on normal images",
        "normal_images": int(len(normal)), "z_max": 6.0, "region_threshold": 0.5, "smooth_patches": 0.6,
        "min_coverage": 0.5, "erode_patches": 1,
        "display": "map = clip(z / z_max, 0, 1); regions: connected components of map >= region_threshold",
        "command": command,
    }
    write_metadata(bundle, meta)
    return meta["msk_node"]["anomaly"]
