"""Fitting the out-of-domain decline (:mod:`inference.domain`): the memory bank and its threshold.

The bank is a greedy k-centre coreset of the final patch tokens (those covering the image) of the
training images that are not development images: every FracAtlas training image and a hashed share of
the knee training crops. The threshold is a quantile (default 99.5 %) of the image scores of the
development images (held out of the bank, as of every head's training), so that about 0.5 % of
in-domain images are expected to be declined; validation images play no part. Tokens are cached.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from inference.training import data as D
from inference.training.splits import dev_split

log = logging.getLogger(__name__)


#: the hashed share of the knee training crops used (about 1,200 of 5,200): knees are one view of one joint
KNEE_SHARE = 1200 / 5200


def domain_records(records: list[D.Record], knee_share: float = KNEE_SHARE) -> tuple[list[int], np.ndarray]:
    """Indices of the records used, and their role ("train": the bank, "dev": the threshold, "val"),
    with the development split of the heads (image-exclusive)."""
    idx = np.arange(len(records))
    tr = idx[[r.split == "train" for r in records]]
    trn, dev = dev_split(tr, records, by="image-exclusive")
    role = np.array(["skip"] * len(records), dtype=object)
    role[trn] = "train"
    role[dev] = "dev"
    role[[r.split == "val" for r in records]] = "val"
    for i, r in enumerate(records):
        if r.source == "knee" and role[i] == "train" and D.hash_fraction("ood:" + r.image_id) > knee_share:
            role[i] = "skip"
    keep = [int(i) for i in idx if role[i] != "skip"]
    return keep, role[keep].astype(str)


@torch.no_grad()
def embed(model, records: list[D.Record], keep: list[int], cache: Path | None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final tokens (float16, N x 1+P x D), patch coverage (N x P) and patch pixel standard deviation
    (N x P, of the standardised input) of ``records[keep]``, through the inference path
    (:meth:`Model.prepare`, the encoder), cached in ``cache`` (.npz)."""
    from inference.anomaly import coverage
    from inference.vit import patchify

    if cache is not None and cache.exists():
        z = np.load(cache)
        return z["fin"], z["cov"], z["std"]
    fin, cov, std = [], [], []
    t0 = time.time()
    for s in range(0, len(keep), 32):
        xs = []
        for i in keep[s:s + 32]:
            x, geo = model.prepare(D.read_image(records[i].path))
            xs.append(x)
            cov.append(coverage(geo, model.cfg.grid).ravel())
        x = torch.from_numpy(np.stack(xs))[:, None]
        std.append(patchify(x, model.cfg.patch_size).std(-1, correction=0).numpy())
        fin.append(model.tokens(x).half().cpu().numpy())
        if s % 640 == 0:
            log.info("domain: embedded %d/%d (%.0f s)", s + len(xs), len(keep), time.time() - t0)
    out = np.concatenate(fin), np.stack(cov), np.concatenate(std)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, fin=out[0], cov=out[1], std=out[2])
    return out


def scores(fin: np.ndarray, content: np.ndarray, bank: torch.Tensor, top_fraction: float) -> np.ndarray:
    from inference.domain import image_scores, nearest_distances, patch_features

    out = []
    for s in range(0, len(fin), 256):
        d = nearest_distances(patch_features(torch.from_numpy(fin[s:s + 256].astype(np.float32))), bank)
        out.append(image_scores(d.numpy(), content[s:s + 256], top_fraction))
    return np.concatenate(out) if out else np.zeros(0)


def fit_domain(bundle: str | Path, data_dir: str | Path, cache_dir: str | Path | None = None, bank_size: int = 1024,
               top_fraction: float = 0.1, quantile: float = 0.995, content_std: float = 0.05, min_side: int = 128,
               seed: int = 0, command: str = "") -> dict:
    """Write ``models/domain.safetensors`` and the card's ``domain`` entry; returns the entry."""
    from inference.bundle import DOMAIN_FILE, load_bundle, read_metadata, save_tensors, write_metadata
    from inference.domain import coreset

    model = load_bundle(bundle, device="cpu")
    records = D.read_layout(data_dir)
    keep, role = domain_records(records)
    enc = model.card.weights[model.card.architecture["file"]][:16]
    cache = Path(cache_dir) / f"domain-tokens-{enc}-{len(keep)}.npz" if cache_dir else None
    fin, cov, std = embed(model, records, keep, cache)
    covered = cov >= 0.5
    content = covered & (std > content_std)
    train, dev = role == "train", role == "dev"
    feats = torch.nn.functional.normalize(torch.from_numpy(fin[train][:, 1:].astype(np.float32)), dim=-1)
    bank = coreset(feats[torch.from_numpy(content[train])], bank_size, seed)
    dev_scores = scores(fin[dev], content[dev], bank, top_fraction)
    threshold = float(np.quantile(dev_scores, quantile))
    share = content.sum(1) / np.maximum(covered.sum(1), 1)
    min_share = float(share[dev].min())  # no development image is declined by this guard
    meta = read_metadata(bundle)
    save_tensors(bundle, DOMAIN_FILE, {"bank": bank.to(torch.float16)}, meta)
    meta["msk_node"]["domain"] = {
        "file": DOMAIN_FILE, "features": "final patch tokens, unit length (cosine distance)",
        "bank_vectors": int(bank.shape[0]), "bank_images": int(train.sum()),
        "score": "mean of the top_fraction largest nearest-bank distances of the content patches (covering the "
                 "image, pixel standard deviation above content_std) of the image",
        "top_fraction": top_fraction, "content_std": content_std, "threshold": threshold,
        "threshold_quantile": quantile, "min_content_share": min_share,
        "min_content_share_rule": "the smallest content share among the development images", "min_side": min_side,
        "dev_images": int(dev.sum()),
        "dev_decline_rate": float(np.mean((dev_scores > threshold) | (share[dev] < min_share))),
        "command": command,
    }
    write_metadata(bundle, meta)
    return meta["msk_node"]["domain"]


def decline_rates(model, data_dir: str | Path, cache_dir: str | Path | None = None, split: str = "val") -> dict:
    """The share of in-domain images of ``split`` the shipped bank and threshold decline, per source."""
    from inference.bundle import Model

    assert isinstance(model, Model) and model.domain_bank is not None, "the bundle has no domain bank"
    records = D.read_layout(data_dir)
    keep, role = domain_records(records)
    enc = model.card.weights[model.card.architecture["file"]][:16]
    cache = Path(cache_dir) / f"domain-tokens-{enc}-{len(keep)}.npz" if cache_dir else None
    fin, cov, std = embed(model, records, keep, cache)
    dm = model.card.domain
    sel = role == split
    covered = cov[sel] >= 0.5
    content = covered & (std[sel] > float(dm.get("content_std", 0.0)))
    s = scores(fin[sel], content, model.domain_bank.cpu(), float(dm.get("top_fraction", 0.25)))
    share = content.sum(1) / np.maximum(covered.sum(1), 1)
    out = (s > float(dm["threshold"])) | (share < float(dm.get("min_content_share", 0.0)))
    src = np.array([records[keep[i]].source for i in np.where(sel)[0]])
    return {"images": int(sel.sum()), "declined": int(out.sum()), "decline_rate": float(out.mean()),
            "by_source": {k: float(out[src == k].mean()) for k in sorted(set(src))}}
