"""Task heads on the encoder's tokens (class token + patch tokens), and their registry.

- ``attn``: attention pooling (learned queries over the patch tokens) joined with
  the class token and the mean patch token, then a small MLP. Used for anatomy, view, KL grade.
- ``attn+patch``: the same for the image-level logit, plus a per-patch logit
  (the localisation map), trained from boxes. Used for fracture.
- ``linear``: layer norm + linear on [class token, mean patch token]; the probe
  for label-efficiency experiments and small data (tumour, hardware).
- ``branch``: a task-specific copy of the encoder's last ``branch_depth`` block(s) (initialised
  from them, then fine-tuned) with its own final norm, and an ``attn`` head on top. It reads the
  shared tokens *before* those blocks (:func:`input_layer`), so the encoder still runs once per
  image and the branch adds ``branch_depth / depth`` of a pass, only for the images it applies to.
  Used for the KL grade, whose fine detail (joint-space width, osteophytes) the frozen final
  tokens under-serve.

Any of them with ``members: N`` (N > 1) is an ensemble of N such heads trained with
different seeds, whose probabilities are averaged (tried for the KL grade; no shipped head is one).
"""

from __future__ import annotations

import torch
import torch.nn as nn

HEAD_TYPES = ("attn", "attn+patch", "linear", "branch")


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


class BranchHead(nn.Module):
    def __init__(self, dim: int, n_out: int, depth: int, heads: int, mlp_ratio: float, hidden: int = 256,
                 dropout: float = 0.2, pool_heads: int = 4):
        from inference.vit import Block

        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = AttnHead(dim, n_out, hidden, dropout, pool_heads)

    def init_from(self, encoder: nn.Module) -> BranchHead:
        """Start from the encoder's own last blocks and final norm."""
        for mine, theirs in zip(self.blocks, list(encoder.blocks)[-len(self.blocks):]):
            mine.load_state_dict(theirs.state_dict())
        self.norm.load_state_dict(encoder.norm.state_dict())
        return self

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.head(self.norm(tokens))


def input_layer(arch: dict, encoder_depth: int) -> int | None:
    """The encoder block whose output a head reads: None for the final (normed) tokens."""
    if arch.get("type") != "branch":
        return None
    depth = int(arch.get("branch_depth", 1))
    if not 1 <= depth < encoder_depth:
        raise ValueError(f"branch_depth must be 1..{encoder_depth - 1}, got {depth}")
    return encoder_depth - depth - 1


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


def build_head(arch: dict, dim: int, n_out: int, encoder=None) -> nn.Module:
    """``encoder`` (a :class:`~inference.vit.ViTConfig`, or an Encoder whose last blocks then initialise
    the branch) is needed by ``branch`` heads only."""
    members = int(arch.get("members", 1))
    if members > 1:
        return EnsembleHead([build_head({**arch, "members": 1}, dim, n_out, encoder) for _ in range(members)])
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
    if kind == "branch":
        cfg = getattr(encoder, "cfg", encoder)
        if cfg is None:
            raise ValueError("a branch head needs the encoder's configuration")
        input_layer(arch, cfg.depth)  # validates branch_depth
        head = BranchHead(dim, n_out, int(arch.get("branch_depth", 1)), cfg.heads, cfg.mlp_ratio, hidden, dropout,
                          int(arch.get("pool_heads", 4)))
        return head.init_from(encoder) if hasattr(encoder, "blocks") else head
    raise ValueError(f"unknown head type {kind!r} (known: {', '.join(HEAD_TYPES)})")


def logit_layer(head: nn.Module) -> nn.Linear:
    """The linear layer that produces a head's image-level ``logits``."""
    if isinstance(head, AttnPatchHead):
        return head.image.mlp[-1]
    if isinstance(head, AttnHead):
        return head.mlp[-1]
    if isinstance(head, LinearHead):
        return head.fc
    if isinstance(head, BranchHead):
        return head.head.mlp[-1]
    raise ValueError(f"{type(head).__name__} has no single logit layer (an ensemble averages probabilities)")


@torch.no_grad()
def rescale_logits(head: nn.Module, scale: float, shift: float) -> None:
    """``logits -> scale * logits + shift``, folded into the head's last linear layer (calibration):
    the stored weights then give calibrated probabilities with no extra step at inference."""
    layer = logit_layer(head)
    layer.weight.mul_(scale)
    layer.bias.mul_(scale).add_(shift)


def n_outputs(kind: str, labels) -> int:
    return 1 if kind == "binary" else len(labels)


def probabilities(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """binary: (B,) probability of 'present'; categorical/ordinal: (B, C) softmax."""
    if kind == "binary":
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)
