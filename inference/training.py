"""Training: MAE pretraining of the encoder, heads on frozen embeddings, anomaly statistics.

Everything is seeded; CPU by default (``device='cuda'`` where there is one).
The same preprocessing as inference (:mod:`inference.preprocess`) through the
uint8 canvas cache of :mod:`inference.data`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference import data as D
from inference.preprocess import Geometry
from inference.vit import MAE, ViTConfig, complementary_keeps

log = logging.getLogger("inference.training")



def _stop_early(epoch: int, epochs: int, t0: float, max_minutes: float | None, stop_after_epochs: int | None) -> bool:
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


def pretrain(data_dir: str, out: str, *, image_size: int = 256, epochs: int = 10, batch_size: int = 64,
             lr: float = 5e-4, weight_decay: float = 0.05, seed: int = 0, cache: str | None = None,
             splits: tuple[str, ...] = ("train",), init: str | None = None, threads: int | None = None,
             device: str = "cpu", max_minutes: float | None = None, command: str = "",
             stop_after_epochs: int | None = None, arch: dict | None = None, gamma: float = 0.25) -> Path:
    """MAE-pretrain an encoder on every image of ``splits`` under ``data_dir``; write a bundle to ``out``.

    ``arch`` overrides :class:`ViTConfig` fields (dim, depth, heads, decoder_*). Images and
    augmentation stay on ``device``; bf16 autocast on CUDA.
    """
    from inference.bundle import load_mae, write_pretrained_bundle

    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    records = [r for r in D.read_layout(data_dir) if r.split in splits]
    if init:
        mae, cfg, _ = load_mae(init)
        log.info("continuing from %s", init)
    else:
        cfg = ViTConfig.from_dict({**ViTConfig().to_dict(), "image_size": image_size, **(arch or {})})
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
        last = epoch + 1 == epochs or _stop_early(epoch, epochs, t0, max_minutes, stop_after_epochs)
        if last or (epoch + 1) % 10 == 0:
            write_pretrained_bundle(out, mae, cfg, training={
                "command": command, "seed": seed, "epochs_done": epoch + 1, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "gamma": gamma,
                "splits": list(splits), "images": n, "device": _device_name(device), "history": history,
                "init": init, "data_pack": (D.pack_info(data_dir) or {}).get("command")})
        if last:
            break
    return Path(out)


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------------
# Frozen embeddings and heads

HEAD_DEFAULTS = {
    # name: (kind, labels, arch, source filter)
    "fracture": ("binary", ["absent", "present"], {"type": "attn+patch", "hidden": 256, "dropout": 0.3}),
    "kl_grade": ("ordinal", list(D.KL_GRADES), {"type": "branch", "branch_depth": 2, "hidden": 256, "dropout": 0.3,
                                                "ordinal_weight": 1.0, "image_augmentation": 1, "token_keep": 1}),
    "anatomy": ("categorical", list(D.ANATOMY), {"type": "attn", "hidden": 256, "dropout": 0.3,
                                                 "geometry_augmentation": 1}),
    "view": ("categorical", list(D.VIEWS), {"type": "attn", "hidden": 256, "dropout": 0.3}),
    "hardware": ("binary", ["absent", "present"], {"type": "linear", "dropout": 0.0}),
    "tumour": ("binary", ["absent", "present"], {"type": "linear", "dropout": 0.0}),
}


@torch.no_grad()
def extract_tokens(mae: MAE, canvases: np.ndarray, means: np.ndarray, stds: np.ndarray, batch_size: int = 64,
                   device: str = "cpu", layer: int | None = None, flip: bool = False) -> torch.Tensor:
    """Encoder tokens of every canvas (no augmentation, as at inference): float16 (N, 1+P, dim).

    ``layer``: the raw tokens after that block instead of the final ones (the input of a branch head);
    ``flip``: of the horizontally mirrored canvases (left and right knees look alike, mirrored)."""
    mae.eval()
    out = []
    t0 = time.time()
    for s in range(0, len(canvases), batch_size):
        c = canvases[s:s + batch_size]
        x = to_input(np.ascontiguousarray(c[:, :, ::-1]) if flip else c, means[s:s + batch_size], stds[s:s + batch_size])
        with autocast(device):
            final, taps = mae.encoder.forward_taps(x.to(device), taps=() if layer is None else (layer,))
            out.append((final if layer is None else taps[layer]).to(torch.float16).cpu())
        if (s // batch_size) % 20 == 0:
            log.info("embedded %d/%d (%.0f s)", s + len(x), len(canvases), time.time() - t0)
    return torch.cat(out)


class Embedded:
    """Records of a data layout with their frozen tokens (memoised on disk per bundle + image set)."""

    def __init__(self, bundle: str | Path, records: list[D.Record], cache_dir: str | Path | None = None,
                 device: str = "cpu"):
        from inference.bundle import load_mae

        self.mae, self.cfg, self.card = load_mae(bundle, device)
        self.device = device
        self.records = records
        cache_dir = Path(cache_dir) if cache_dir else Path("/tmp")
        self.canvases, self.geos = D.build_cache(records, self.cfg.image_size,
                                                 cache_dir / f"msk-cache-{self.cfg.image_size}-{_key(records)}.npz")
        self.means, self.stds = canvas_stats(self.canvases, self.geos)
        enc_sha = self.card.weights[self.card.architecture["file"]][:16]
        self._tok_path = cache_dir / f"msk-tokens-{enc_sha}-{_key(records)}.pt"
        self._inputs: dict[int | None, torch.Tensor] = {}
        self.tokens = self.inputs(None)

    def index(self, split: str, predicate) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split and predicate(r)], dtype=np.int64)

    def inputs(self, layer: int | None) -> torch.Tensor:
        """The tokens a head reads: the final ones (``layer`` None) or those after block ``layer``;
        memoised in memory and on disk (per encoder, image set and layer)."""
        if layer not in self._inputs:
            path = (self._tok_path if layer is None
                    else self._tok_path.with_name(self._tok_path.stem + f"-L{layer}.pt"))
            if path.exists():
                self._inputs[layer] = torch.load(path)
            else:
                log.info("embedding %d images%s", len(self.records), "" if layer is None else f" up to block {layer}")
                self._inputs[layer] = extract_tokens(self.mae, self.canvases, self.means, self.stds,
                                                     device=self.device, layer=layer)
                tmp = path.with_name(path.name + ".tmp")
                torch.save(self._inputs[layer], tmp)
                tmp.replace(path)
        return self._inputs[layer]

    def mirrored(self, idx: np.ndarray, layer: int | None) -> torch.Tensor:
        """Tokens of the horizontally mirrored images ``idx`` (a training augmentation)."""
        return extract_tokens(self.mae, self.canvases[idx], self.means[idx], self.stds[idx], device=self.device,
                              layer=layer, flip=True)


def _key(records) -> str:
    import hashlib

    return hashlib.sha256("\n".join(r.path for r in records).encode()).hexdigest()[:12]


def geometry_augmented_tokens(emb: "Embedded", idx: np.ndarray, seed: int) -> torch.Tensor:
    """Tokens of random re-framings of the images ``idx``: a crop of random aspect ratio (0.6-1.67) and
    area (60-100 % of the largest such crop), letterboxed again.

    The knee crops are all square and fill the canvas while FracAtlas images are letterboxed, so
    without this an anatomy head learns "square, no padding = knee". Re-framing breaks that cue.
    """
    from inference.preprocess import resize_to_canvas

    rng = np.random.default_rng(seed)
    size = emb.cfg.image_size
    canvases = np.empty((len(idx), size, size), np.uint8)
    geos = []
    for k, i in enumerate(idx):
        g = emb.geos[i]
        img = emb.canvases[i, g.off_y:g.off_y + g.height, g.off_x:g.off_x + g.width]
        h_img, w_img = img.shape
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1 / 0.6)))  # width / height
        h, w = (h_img, aspect * h_img) if w_img / h_img > aspect else (w_img / aspect, w_img)
        f = math.sqrt(rng.uniform(0.6, 1.0))
        h, w = max(8, int(h * f)), max(8, int(w * f))
        y0 = int(rng.integers(0, max(1, h_img - h + 1)))
        x0 = int(rng.integers(0, max(1, w_img - w + 1)))
        c, geo = resize_to_canvas(img[y0:y0 + h, x0:x0 + w], size)
        canvases[k] = np.rint(c * 255).astype(np.uint8)
        geos.append(geo)
    means, stds = canvas_stats(canvases, geos)
    return extract_tokens(emb.mae, canvases, means, stds, device=emb.device)


def head_targets(name: str, records: list[D.Record]):
    """(predicate selecting usable records, target function record -> label)."""
    if name == "fracture":
        return (lambda r: r.fractured >= 0), (lambda r: r.fractured)
    if name == "hardware":
        return (lambda r: r.hardware >= 0), (lambda r: r.hardware)
    if name == "kl_grade":
        return (lambda r: r.kl >= 0), (lambda r: r.kl)
    if name == "anatomy":
        return (lambda r: r.anatomy >= 0), (lambda r: r.anatomy)
    if name == "view":
        return (lambda r: min(r.views) >= 0 and sum(r.views) > 0), (lambda r: r.views)
    return (lambda r: r.label >= 0), (lambda r: r.label)


def patch_targets(records: list[D.Record], geos: list[Geometry], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch fracture targets from boxes: (targets (N, P) 0..1, usable mask (N,)).

    Images without a fracture: every patch 0. Fractured images with boxes: the share of
    each patch covered by a box, scaled so that a quarter-covered patch counts as positive.
    Fractured images without boxes are left out of the patch loss.
    """
    n = len(records)
    tgt = np.zeros((n, grid * grid), np.float32)
    usable = np.zeros(n, bool)
    for i, (r, g) in enumerate(zip(records, geos)):
        if r.fractured == 0:
            usable[i] = True
        elif r.fractured == 1 and r.boxes:
            mask = np.zeros((g.size, g.size), np.float32)
            for (x0, y0, x1, y1) in r.boxes:
                cx0, cy0, cx1, cy1 = g.box_to_canvas((x0 * g.columns, y0 * g.rows, x1 * g.columns, y1 * g.rows))
                mask[int(np.floor(cy0)):int(np.ceil(cy1)), int(np.floor(cx0)):int(np.ceil(cx1))] = 1.0
            p = g.size // grid
            cov = mask.reshape(grid, p, grid, p).mean(axis=(1, 3)).ravel()
            tgt[i] = np.clip(cov * 4.0, 0.0, 1.0)
            usable[i] = True
    return tgt, usable


def _loss(kind: str, out: dict, y: torch.Tensor, pos_weight: float | None = None,
          ordinal_weight: float = 0.25) -> torch.Tensor:
    """binary: BCE; soft targets: cross-entropy; categorical: CE with label smoothing; ordinal: that CE
    plus ``ordinal_weight`` x smooth-L1 between the expected grade and the true grade."""
    logits = out["logits"].float()
    y = y.to(logits.device)
    if kind == "binary":
        pw = torch.tensor(pos_weight, device=logits.device) if pos_weight else None
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), pos_weight=pw)
    if y.ndim == 2:  # soft targets (views)
        t = y.float() / y.float().sum(1, keepdim=True)
        return -(t * F.log_softmax(logits, 1)).sum(1).mean()
    ce = F.cross_entropy(logits, y.long(), label_smoothing=0.05)
    if kind == "ordinal":
        grades = torch.arange(logits.shape[1], dtype=torch.float32, device=logits.device)
        expected = (torch.softmax(logits, 1) * grades).sum(1)
        ce = ce + ordinal_weight * F.smooth_l1_loss(expected, y.float())
    return ce


def score(kind: str, y: np.ndarray, p: np.ndarray, decision: str = "argmax") -> float:
    """Selection score on the development split (higher is better); ordinal: accuracy + quadratic kappa
    of the grades that ``decision`` (:func:`inference.results.decide`) reads from ``p``."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    from inference.results import decide

    if kind == "binary":
        return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else 0.0
    if y.ndim == 2:
        return float(np.mean(y[np.arange(len(y)), p.argmax(1)] > 0))
    pred = decide(p, decision)
    if kind == "ordinal":
        return float(np.mean(pred == y) + cohen_kappa_score(y, pred, weights="quadratic"))
    return float(np.mean(pred == y))


def _head_outputs(head, tokens: torch.Tensor, batch_size: int):
    """The head's outputs on ``tokens``, batch by batch (evaluation mode, on the head's device)."""
    head.eval()
    device = next(head.parameters()).device
    for s in range(0, len(tokens), batch_size):
        yield head(tokens[s:s + batch_size].to(device).float())


@torch.no_grad()
def predict_tokens(head, kind: str, tokens: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    from inference.heads import probabilities

    ps, pm = [], []
    for out in _head_outputs(head, tokens, batch_size):
        ps.append(probabilities(kind, out["logits"]).float().cpu().numpy())
        if "patch_logits" in out:
            pm.append(torch.sigmoid(out["patch_logits"]).float().cpu().numpy())
    return np.concatenate(ps), (np.concatenate(pm) if pm else None)


@torch.no_grad()
def predict_logits(head, tokens: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """A binary head's image-level logits (float64) on ``tokens``."""
    return np.concatenate([out["logits"][:, 0].double().cpu().numpy()
                           for out in _head_outputs(head, tokens, batch_size)])


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against 0/1 labels ``y``."""
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling: ``(scale, shift)`` minimising the log loss of ``sigmoid(scale * logit + shift)`` on
    held-out labels, against Platt's smoothed targets ((n+ + 1)/(n+ + 2) and 1/(n- + 2)) so that a
    few dozen held-out positives cannot make it overconfident. ``scale`` > 0 keeps the ranking:
    AUROC, and the sensitivity and specificity at operating points chosen afterwards, do not change."""
    from scipy.optimize import minimize
    from scipy.special import expit

    z, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
    n_pos = float(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs held-out images of both classes")
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(w):
        s = w[0] * z + w[1]
        g = expit(s) - t
        return float(np.sum(np.logaddexp(0.0, s) - t * s)), np.array([np.sum(g * z), np.sum(g)])

    res = minimize(loss, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(1e-3, None), (None, None)])
    return float(res.x[0]), float(res.x[1])


def calibrate(head, tokens: torch.Tensor, y: np.ndarray) -> dict:
    """Platt-scale a binary head on held-out ``tokens``/``y``, in place (folded into its weights, as
    stored: float16); returns the record for the card."""
    from inference.bundle import half
    from inference.heads import rescale_logits

    y = np.asarray(y, np.float64)
    z = predict_logits(head, tokens)
    scale, shift = platt(z, y)
    rescale_logits(head, scale, shift)
    head.load_state_dict(half(head.state_dict()))
    after = predict_logits(head, tokens)
    return {"method": "platt", "scale": round(scale, 5), "shift": round(shift, 5), "images": int(len(y)),
            "positives": int(y.sum()), "log_loss_before": round(log_loss(z, y), 4),
            "log_loss_after": round(log_loss(after, y), 4)}


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
            loss = _loss(kind, out, yt[idx.to(device)], pos_weight, float(arch.get("ordinal_weight", 0.25)))
            if patch_y is not None and "patch_logits" in out:
                ok = torch.from_numpy(patch_ok[idx.numpy()]).to(device)
                if ok.any():
                    pt = torch.from_numpy(patch_y[idx.numpy()]).to(device)[ok]
                    pl = out["patch_logits"][ok]
                    w = torch.where(pt > 0, 8.0, 1.0)
                    loss = loss + patch_weight * (F.binary_cross_entropy_with_logits(pl, pt, reduction="none") * w).mean()
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


def operating_points(y: np.ndarray, p: np.ndarray, sensitivity: float = 0.90, specificity: float = 0.95) -> dict:
    """'suspected': the highest threshold keeping sensitivity >= ``sensitivity``;
    'definite': the lowest threshold reaching specificity >= ``specificity`` (on validation data)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("operating points need positive and negative validation images")
    k = int(math.floor((1 - sensitivity) * len(pos)))  # may miss k positives
    suspected = float(pos[k])
    j = int(math.ceil(specificity * len(neg))) - 1
    definite = float(np.nextafter(neg[min(j, len(neg) - 1)], 1.0))
    definite = min(max(definite, suspected), 1.0)
    return {"suspected": suspected, "definite": definite,
            "target_sensitivity": sensitivity, "target_specificity": specificity}


DEV_SPLITS = ("patient", "image", "image-exclusive")


def dev_split(idx: np.ndarray, records: list[D.Record], fraction: float = 0.1, by: str = "patient"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a deterministic 10 % of the training indices (by hash) to pick the epoch.

    ``by`` "patient": hash the patient where the data names one (the knee set's two knees of a patient
    then fall on the same side; otherwise a head is selected on the other knee of patients it trained
    on); "image": hash the image id (what heads fitted before model 0.4.0 were selected with);
    "image-exclusive": the development images of "image" (so, the images an encoder adapted with
    "image" never trained on), with every other image of their patients left out of training."""
    if by not in DEV_SPLITS:
        raise ValueError(f"dev split by {by!r}: expected one of {', '.join(DEV_SPLITS)}")
    dev = np.array([D.hash_fraction("dev:" + (records[i].split_key if by == "patient" else records[i].image_id))
                    < fraction for i in idx], dtype=bool)
    train = ~dev
    if by == "image-exclusive":
        held = {records[i].split_key for i in idx[dev]}
        train &= np.array([records[i].split_key not in held for i in idx], dtype=bool)
    return idx[train], idx[dev]


def clean_dev_split(training: dict) -> str:
    """The development split a head must be selected on so that neither the encoder nor the head has
    trained on it: the encoder's adaptation stages (``training`` of a bundle's card) each held out a
    split; a head's split must be theirs, and patient-disjoint from its own training images.

    No adaptation: "patient". Stages held out by image (or recorded before the split was recorded):
    "image-exclusive". By patient: "patient". Mixed: no split is clean for every stage; "patient"
    (the last resort, logged)."""
    from inference.card import adapt_stages

    modes = {st.get("dev_split", "image") for st in adapt_stages((training or {}).get("pretrain") or {})}
    if not modes or modes == {"patient"}:
        return "patient"
    if modes <= {"image", "image-exclusive"}:
        return "image-exclusive"
    log.warning("the encoder's adaptation stages held out different splits (%s): no development split "
                "is unseen by all of them; selecting heads on a patient-level split", ", ".join(sorted(modes)))
    return "patient"


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
        info = {"best_epoch": [i["best_epoch"] for _, i in fits], "member_dev_scores": [i["dev_score"] for _, i in fits],
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
        if kind == "binary" and len(set(ys(va).tolist())) == 2:
            result["operating_points"] = operating_points(ys(va), p)
    return result


def save_head(bundle: str | Path, name: str, fit: dict, command: str = "", extra: dict | None = None) -> None:
    """Write the head's weights and its card entry into ``bundle``."""
    from inference.bundle import CONCEPTS, LABEL_CONCEPTS, _now, half, read_metadata, save_tensors, write_metadata

    bundle = Path(bundle)
    meta = read_metadata(bundle)
    rel = f"models/heads/{name}.safetensors"
    save_tensors(bundle, rel, half(fit["head"].state_dict()), meta)
    entry = {"kind": fit["kind"], "labels": list(fit["labels"]), "weights": rel, "arch": fit["arch"]}
    if name in CONCEPTS:
        entry["concept"] = CONCEPTS[name]
    if name in LABEL_CONCEPTS and len(LABEL_CONCEPTS[name]) == len(fit["labels"]):
        entry["label_concepts"] = LABEL_CONCEPTS[name]
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


def calibrate_head(emb: Embedded, bundle: str | Path, name: str, command: str = "") -> dict:
    """Platt-scale the binary head ``name`` of ``bundle`` on the development split it was selected on,
    then choose its operating points again on val (same sensitivity and specificity, thresholds on
    the calibrated probabilities). For heads fitted before ``fit-heads`` calibrated them itself.
    Calibrating twice composes: the record gives the total scale and shift."""
    from safetensors.torch import load_file

    from inference.bundle import _now, half, read_metadata, save_tensors, write_metadata
    from inference.heads import build_head, input_layer

    bundle = Path(bundle)
    meta = read_metadata(bundle)
    entry = meta["msk_node"]["heads"].get(name)
    if not entry or not entry.get("weights"):
        raise ValueError(f"{bundle}: no head {name!r} with weights")
    if entry["kind"] != "binary":
        raise ValueError(f"head {name!r} is {entry['kind']}: Platt scaling is for binary heads")
    arch = entry.get("arch", {})
    if int(arch.get("members", 1)) > 1:
        raise ValueError(f"head {name!r} is an ensemble: its members average probabilities, calibrate them on refit")
    head = build_head(arch, emb.cfg.dim, 1, emb.mae.encoder)
    head.load_state_dict(load_file(str(bundle / entry["weights"])))
    head = head.to(emb.device).eval()
    usable, target = head_targets(name, emb.records)
    by = entry.get("training", {}).get("dev_split") or "image"  # heads recorded without one used the image split
    _, dev = dev_split(emb.index("train", usable), emb.records, by=by)
    va = emb.index("val", usable)
    tokens = emb.inputs(input_layer(arch, emb.cfg.depth))
    y_dev = np.array([target(emb.records[i]) for i in dev])
    y_va = np.array([target(emb.records[i]) for i in va])
    if len(set(y_va.tolist())) < 2:
        raise ValueError(f"head {name!r}: no validation images with both classes to choose thresholds on")
    cal = calibrate(head, tokens[dev], y_dev)
    p_va, _ = predict_tokens(head, "binary", tokens[va])
    ops = operating_points(y_va, p_va)
    previous = entry.get("calibration")
    if previous:  # a second Platt step on calibrated logits: a2 (a1 z + c1) + c2
        cal["scale_total"] = round(cal["scale"] * previous.get("scale_total", previous["scale"]), 5)
        cal["shift_total"] = round(cal["scale"] * previous.get("shift_total", previous["shift"]) + cal["shift"], 5)
    cal["dev_split"], cal["command"], cal["calibrated"] = by, command, _now()
    save_tensors(bundle, entry["weights"], half(head.state_dict()), meta)
    entry["operating_points"], entry["calibration"] = ops, cal
    write_metadata(bundle, meta)
    return entry


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
        "file": ANOMALY_FILE, "groups": groups, "passes": list(passes) if passes else None, "statistic": "per-position mean/std of patch MSE on normal images",
        "normal_images": int(len(normal)), "z_max": 6.0, "region_threshold": 0.5, "smooth_patches": 0.6,
        "min_coverage": 0.5, "erode_patches": 1,
        "display": "map = clip(z / z_max, 0, 1); regions: connected components of map >= region_threshold",
        "command": command,
    }
    write_metadata(bundle, meta)
    return meta["msk_node"]["anomaly"]


# ----------------------------------------------------------------------------------------------
# Multi-task adaptation of the pretrained encoder (optional second stage of `model pretrain`)

ADAPT_HEADS = ("fracture", "kl_grade", "anatomy", "view")


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
                    loss = loss + weights[name] * _loss(kind, ho, yy, (1 - frac_pos) / frac_pos if name == "fracture"
                                                        else None, float(HEAD_DEFAULTS[name][2].get("ordinal_weight", 0.25)))
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
                log.info("adapt epoch %d step %d/%d loss %.4f (%.0f s)", epoch, s, steps_per_epoch, float(loss.detach()),
                         time.time() - t0)
        dev = _adapt_dev_scores(mae, heads, images, dev_idx, targets, device)
        history.append({"epoch": epoch, "loss": round(float(loss_sum) / steps_per_epoch, 5),
                        "dev": {k: round(v, 4) for k, v in dev.items()}, "seconds": round(time.time() - t0, 1)})
        log.info("adapt epoch %d loss %.4f dev %s (%.0f s)", epoch, history[-1]["loss"], history[-1]["dev"],
                 time.time() - t0)
        stop = epoch + 1 == epochs or _stop_early(epoch, epochs, t0, max_minutes, stop_after_epochs)
        if dev["score"] > best_score:
            best_score, best_epoch = dev["score"], epoch
            stage = {"command": command, "init": str(init), "seed": seed, "epochs_done": epoch + 1, "epochs": epochs,
                     "batch_size": batch_size, "lr": lr, "head_lr": head_lr, "mae_weight": mae_weight,
                     "gamma": gamma, "augment_strength": augment_strength, "labels": list(ADAPT_HEADS),
                     "head_weights": weights,
                     "device": _device_name(device), "train_images": int(n), "dev_images": int(len(dev_idx)),
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
