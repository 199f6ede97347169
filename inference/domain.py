"""Knowing what the model cannot read: an out-of-domain score from the pixels, and the decline.

The score is a patch-level density on the encoder's own tokens (PatchCore-style): every *content*
patch token of an image (covering the image, not the letterbox padding, and not flat: pixel standard
deviation above ``content_std`` of the standardised input, so blank collimation and saturated areas
do not count) is compared, by cosine distance, with a small memory bank of content patch tokens of the
training radiographs (a greedy k-centre coreset, float16, in ``models/domain.safetensors``); the
image's score is the mean of its ``top_fraction`` largest nearest-neighbour distances. Two pixel
guards come first: an image whose long side is under ``min_side`` pixels, or whose share of content
patches is under ``min_content_share`` (blank, marker-only, heavily collimated crops), is declined.
The threshold is a quantile of the scores of development images of the training split (see the card),
never of validation images.

Caveat (measured, see the card): the score also rises with a shift of acquisition and display style;
pydicom-data's ankle CR (RG3) scores 0.496 against a threshold of 0.498 and the chest CR (RG1) 0.521, so
the margin between an in-domain radiograph of another site and a chest is small.

Images above the threshold are reported not processed with :data:`OUTSIDE_DOMAIN` as the reason and
no findings. A header whose BodyPartExamined names a region outside the model's domain (chest,
abdomen, head...) declines as well, but is only an added signal: the pixels decide without it.

No DICOM in here; torch only for the distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: the reason of a decline (the not-processed reason starts with it)
OUTSIDE_DOMAIN = "outside the model's domain"

#: BodyPartExamined values (DICOM PS3.16 CID 4031 defined terms) of regions the model was never trained on
NON_MSK_BODY_PARTS = frozenset({
    "CHEST", "ABDOMEN", "PELVIS_ABDOMEN", "HEAD", "SKULL", "BRAIN", "BREAST", "HEART", "LUNG", "THORAX",
    "NECK", "FACE", "SINUS", "JAW", "TMJ", "ORBIT", "EAR", "IAC", "MOUTH", "LARYNX", "PHARYNX", "ESOPHAGUS",
    "STOMACH", "COLON", "LIVER", "KIDNEY", "BLADDER", "UTERUS", "PROSTATE", "CHESTABDOMEN", "HEADNECK",
    "CHESTABDPELV", "ABDOMENPELVIS", "WHOLEBODY", "BOWEL", "GALLBLADDER", "PANCREAS", "SPLEEN", "THYROID",
})


def body_part_outside(body_part: str | None) -> bool:
    """Whether a BodyPartExamined value names a region outside the model's domain (an added signal only)."""
    return (body_part or "").strip().upper().replace(" ", "") in NON_MSK_BODY_PARTS


@dataclass(frozen=True)
class DomainScore:
    score: float
    threshold: float
    content_share: float = 1.0
    min_content_share: float = 0.0
    side: int = 0  # the source image's long side
    min_side: int = 0

    @property
    def outside(self) -> bool:
        return (self.side < self.min_side or self.content_share < self.min_content_share
                or not (self.score <= self.threshold))  # NaN declines too

    def reason(self) -> str:
        if self.side < self.min_side:
            why = f"an image of {self.side} pixels is too small to be a radiograph the model reads"
        elif self.content_share < self.min_content_share:
            why = (f"only {100 * self.content_share:.0f} % of the image has structure (blank, marker-only or "
                   f"heavily collimated)")
        else:
            why = (f"its pixels are unlike the musculoskeletal radiographs the model was trained on "
                   f"(out-of-domain score {self.score:.3f} above {self.threshold:.3f})")
        return f"{OUTSIDE_DOMAIN}: {why}"


def content_patches(x: torch.Tensor, patch: int, std: float) -> torch.Tensor:
    """(B, 1, S, S) standardised inputs -> (B, P) bool: patches whose pixel standard deviation exceeds ``std``."""
    from inference.vit import patchify

    return patchify(x.float(), patch).std(-1, correction=0) > std


def patch_features(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 1+P, D) final tokens -> (B, P, D) unit-length patch features."""
    return torch.nn.functional.normalize(tokens[:, 1:].float(), dim=-1)


@torch.no_grad()
def nearest_distances(features: torch.Tensor, bank: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """(B, P, D) unit features, (M, D) unit bank -> (B, P) cosine distance to the nearest bank vector."""
    bank = bank.to(features.device, torch.float32)
    out = [1.0 - (features[s:s + chunk] @ bank.T).amax(-1) for s in range(0, features.shape[0], chunk)]
    return torch.cat(out) if out else features.new_zeros(features.shape[:2])


def image_scores(distances: np.ndarray, valid: np.ndarray, top_fraction: float) -> np.ndarray:
    """(B, P) patch distances and (B, P) valid-patch masks -> (B,) image scores: the mean of the
    ``top_fraction`` largest distances among the valid patches (all patches where none is valid)."""
    scores = np.empty(len(distances), dtype=np.float64)
    for b, (d, v) in enumerate(zip(np.asarray(distances, dtype=np.float64), np.asarray(valid, dtype=bool))):
        d = d[v] if v.any() else d
        k = max(1, int(len(d) * top_fraction))
        scores[b] = float(np.sort(d)[-k:].mean())
    return scores


@torch.no_grad()
def coreset(features: torch.Tensor, n: int, seed: int = 0, pool: int = 40000) -> torch.Tensor:
    """A greedy k-centre coreset of ``n`` rows of unit ``features`` (N, D), drawn from a random ``pool``:
    every pooled feature ends up close to one kept row, so rare patches are kept as well as common ones."""
    g = torch.Generator().manual_seed(seed)
    x = features[torch.randperm(len(features), generator=g)[:min(len(features), pool)]].float()
    n = min(n, len(x))
    chosen = [0]
    dist = 1.0 - x @ x[0]
    for _ in range(n - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, 1.0 - x @ x[i])
    return x[chosen]
