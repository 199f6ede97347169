"""Task heads on the encoder's tokens (class token + patch tokens), and their registry.

- ``attn``: attention pooling (learned queries over the patch tokens) joined with
  the class token and the mean patch token, then a small MLP. Used for anatomy, view, KL grade.
- ``attn+patch``: the same for the image-level logit, plus a per-patch logit
  (the localisation map), trained from boxes. Used for fracture.
- ``linear``: layer norm + linear on [class token, mean patch token]; the probe
  for label-efficiency experiments and small data (tumour, hardware).

Any of them with ``members: N`` (N > 1) is an ensemble of N such heads trained with
different seeds, whose probabilities are averaged (used for the KL grade).
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEAD_TYPES = ("attn", "attn+patch", "linear")


class AttnPool(nn.Module):
    """``queries`` learned vectors score every (layer-normed) patch token; softmax-weighted sums, concatenated.

    Deliberately projection-free: the tokens are frozen and computed once, and this
    costs O(tokens x dim) per query, so heads stay negligible next to the encoder.
    """

    def __init__(self, dim: int, queries: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.scale = dim ** -0.5

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(torch.einsum("bnd,qd->bqn", patches, self.query) * self.scale, dim=-1)
        return torch.einsum("bqn,bnd->bqd", w, patches).flatten(1)


class AttnHead(nn.Module):
    def __init__(self, dim: int, n_out: int, hidden: int = 256, dropout: float = 0.2, pool_heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pool = AttnPool(dim, pool_heads)
        width = (pool_heads + 2) * dim
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.norm(tokens)
        feat = torch.cat([self.pool(t[:, 1:]), t[:, 0], t[:, 1:].mean(1)], dim=1)
        return {"logits": self.mlp(feat)}


class AttnPatchHead(nn.Module):
    def __init__(self, dim: int, n_out: int = 1, hidden: int = 256, dropout: float = 0.2, pool_heads: int = 4,
                 patch_hidden: int = 128):
        super().__init__()
        self.image = AttnHead(dim, n_out, hidden, dropout, pool_heads)
        self.patch = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, patch_hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.Linear(patch_hidden, 1))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.image(tokens)
        out["patch_logits"] = self.patch(tokens[:, 1:])[..., 0]
        return out


class LinearHead(nn.Module):
    def __init__(self, dim: int, n_out: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(2 * dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, n_out)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
        return {"logits": self.fc(self.drop(self.norm(feat)))}


class EnsembleHead(nn.Module):
    """Members' probabilities averaged; returned as logits again (log of the mean softmax, or the
    logit of the mean sigmoid for single outputs and patch maps), so callers see one head."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [m(tokens) for m in self.members]
        merged = {}
        for key in outs[0]:
            logits = torch.stack([o[key].float() for o in outs])
            if key == "logits" and logits.shape[-1] > 1:
                merged[key] = torch.log(torch.softmax(logits, -1).mean(0).clamp_min(1e-12))
            else:
                p = torch.sigmoid(logits).mean(0).clamp(1e-7, 1 - 1e-7)
                merged[key] = torch.log(p) - torch.log1p(-p)
        return merged


def build_head(arch: dict, dim: int, n_out: int) -> nn.Module:
    members = int(arch.get("members", 1))
    if members > 1:
        return EnsembleHead([build_head({**arch, "members": 1}, dim, n_out) for _ in range(members)])
    kind = arch.get("type", "attn")
    hidden = int(arch.get("hidden", 256))
    dropout = float(arch.get("dropout", 0.2))
    if kind == "attn":
        return AttnHead(dim, n_out, hidden, dropout, int(arch.get("pool_heads", 4)))
    if kind == "attn+patch":
        return AttnPatchHead(dim, n_out, hidden, dropout, int(arch.get("pool_heads", 4)),
                             int(arch.get("patch_hidden", 128)))
    if kind == "linear":
        return LinearHead(dim, n_out, float(arch.get("dropout", 0.0)))
    raise ValueError(f"unknown head type {kind!r} (known: {', '.join(HEAD_TYPES)})")


def n_outputs(kind: str, labels) -> int:
    return 1 if kind == "binary" else len(labels)


def probabilities(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """binary: (B,) probability of 'present'; categorical/ordinal: (B, C) softmax."""
    if kind == "binary":
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)
