"""A single-channel Vision Transformer trained as a masked autoencoder (MAE).

Our own compact implementation rather than MONAI's ``MaskedAutoEncoderViT``:
the anomaly map needs the masks under our control (complementary masks, every
patch reconstructed from the others), and the heads need the encoder's patch
tokens; both are one method here. Fixed 2-D sin-cos position embeddings, a class
token, pre-norm blocks with PyTorch's scaled-dot-product attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 256
    patch_size: int = 16
    dim: int = 256
    depth: int = 8
    heads: int = 4
    mlp_ratio: float = 4.0
    decoder_dim: int = 192
    decoder_depth: int = 3
    decoder_heads: int = 6
    mask_ratio: float = 0.75

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        cfg = cls(**known)
        if cfg.image_size % cfg.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if cfg.dim % cfg.heads or cfg.decoder_dim % cfg.decoder_heads:
            raise ValueError("dim must be divisible by heads")
        return cfg


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sine-cosine position embedding."""
    if dim % 4:
        raise ValueError("embedding dim must be a multiple of 4")
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    out = []
    for pos in (y.flatten(), x.flatten()):
        arg = pos[:, None] * omega[None, :]
        out += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(out, dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Patchify -> (optionally keep a subset of patches) -> transformer -> tokens (B, 1+N, dim)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(1, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos", sincos_2d(cfg.grid, cfg.dim)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        self.apply(_init)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_taps(x, keep)[0]

    def forward_taps(self, x: torch.Tensor, keep: torch.Tensor | None = None, taps=(), final: bool = True
                     ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Final (normed) tokens, and the raw tokens after each block index in ``taps`` (inputs of branch heads).

        ``final`` False: stop after the deepest tap and return None for the final tokens."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        if keep is not None:
            t = torch.gather(t, 1, keep[..., None].expand(-1, -1, t.shape[-1]))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        tapped = {}
        last = len(self.blocks) - 1 if final or not taps else max(taps)
        for i, blk in enumerate(self.blocks[:last + 1]):
            t = blk(t)
            if i in taps:
                tapped[i] = t
        return (self.norm(t) if final else None), tapped


class Decoder(nn.Module):
    """MAE decoder: visible tokens + mask tokens -> pixels of every patch."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.register_buffer("pos", sincos_2d(cfg.grid, cfg.decoder_dim)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, cfg.patch_size ** 2)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """tokens: encoder output (B, 1+K, dim) for the kept patches ``keep`` (B, K) -> (B, N, p*p)."""
        b = tokens.shape[0]
        n = self.cfg.num_patches
        v = self.embed(tokens[:, 1:])
        full = self.mask_token.expand(b, n, -1).to(v.dtype).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, v.shape[-1]), v)
        t = full + self.pos
        t = torch.cat([self.embed(tokens[:, :1]), t], dim=1)
        for blk in self.blocks:
            t = blk(t)
        return self.pred(self.norm(t))[:, 1:]


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, N, p*p)."""
    b, _, h, w = x.shape
    return x.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, (h // p) * (w // p), p * p)


class MAE(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def random_keep(self, b: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        n = self.cfg.num_patches
        n_keep = max(1, int(round(n * (1 - self.cfg.mask_ratio))))
        noise = torch.rand(b, n, generator=generator, device=device)
        return torch.argsort(noise, dim=1)[:, :n_keep]

    def reconstruct(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x, keep), keep)

    def loss(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        pred = self.reconstruct(x, keep)
        target = patchify(x, self.cfg.patch_size)
        err = (pred - target).pow(2).mean(-1)  # (B, N)
        masked = torch.ones_like(err)
        masked.scatter_(1, keep, 0.0)
        return (err * masked).sum() / masked.sum()


def complementary_keeps(cfg: ViTConfig, groups: int) -> torch.Tensor:
    """(groups, N/groups) patch indices: group g keeps the patches whose (row % s, col % s) is g-th.

    With ``groups = s*s`` each pass keeps a regular 1-in-``groups`` lattice; the
    ``groups`` lattices partition the grid, so every patch is masked in
    ``groups - 1`` passes and reconstructed from the others.
    """
    s = int(round(math.sqrt(groups)))
    if s * s != groups or cfg.grid % s:
        raise ValueError(f"anomaly groups must be a square dividing the grid, got {groups}")
    idx = torch.arange(cfg.num_patches).view(cfg.grid, cfg.grid)
    return torch.stack([idx[dy::s, dx::s].flatten() for dy in range(s) for dx in range(s)])
