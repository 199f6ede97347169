"""Frozen embeddings: the encoder's tokens of every image, computed once and cached
(:class:`Embedded`), tokens of geometry-augmented images, and a head's outputs on tokens.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from inference.training import data as D
from inference.training.runtime import autocast, canvas_stats, to_input
from inference.vit import MAE

log = logging.getLogger(__name__)

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
        c = np.ascontiguousarray(c[:, :, ::-1]) if flip else c
        x = to_input(c, means[s:s + batch_size], stds[s:s + batch_size])
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
        cache = cache_dir / f"msk-cache-{self.cfg.image_size}-{records_key(records)}.npz"
        self.canvases, self.geos = D.build_cache(records, self.cfg.image_size, cache)
        self.means, self.stds = canvas_stats(self.canvases, self.geos)
        enc_sha = self.card.weights[self.card.architecture["file"]][:16]
        self._tok_path = cache_dir / f"msk-tokens-{enc_sha}-{records_key(records)}.pt"
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


def records_key(records) -> str:
    import hashlib

    return hashlib.sha256("\n".join(r.path for r in records).encode()).hexdigest()[:12]


def geometry_augmented_tokens(emb: Embedded, idx: np.ndarray, seed: int) -> torch.Tensor:
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


def head_outputs(head, tokens: torch.Tensor, batch_size: int):
    """The head's outputs on ``tokens``, batch by batch (evaluation mode, on the head's device)."""
    head.eval()
    device = next(head.parameters()).device
    for s in range(0, len(tokens), batch_size):
        yield head(tokens[s:s + batch_size].to(device).float())


@torch.no_grad()
def predict_tokens(head, kind: str, tokens: torch.Tensor,
                   batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    from inference.heads import probabilities

    ps, pm = [], []
    for out in head_outputs(head, tokens, batch_size):
        ps.append(probabilities(kind, out["logits"]).float().cpu().numpy())
        if "patch_logits" in out:
            pm.append(torch.sigmoid(out["patch_logits"]).float().cpu().numpy())
    return np.concatenate(ps), (np.concatenate(pm) if pm else None)


@torch.no_grad()
def predict_logits(head, tokens: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """A binary head's image-level logits (float64) on ``tokens``."""
    return np.concatenate([out["logits"][:, 0].double().cpu().numpy()
                           for out in head_outputs(head, tokens, batch_size)])
