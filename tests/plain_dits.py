"""Small DiTs written in plain PyTorch, unknown to diffusers and to the pass.

``PlainDiT`` is an ordinary DiT (patch conv, self-attention blocks, unpatchify by
reshape/permute); ``token_mixer`` adds an operator that mixes tokens: ones the pass
densifies through an activation cache ("mean", "conv", "linear_attention") and ones
it must refuse ("cumsum": no rule; "manual_attention": a [N, N] score matrix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, token_mixer: str | None):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, 2 * dim)
        self.token_mixer = token_mixer
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, emb, grid_shape):
        b, n, d = x.shape
        shift, scale = self.mod(emb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.out(a)
        if self.token_mixer == "mean":
            x = x + x.mean(dim=1, keepdim=True)  # global pooling over tokens
        elif self.token_mixer == "conv":  # Mix-FFN style depthwise convolution over the token grid
            grid = x.transpose(1, 2).reshape(b, d, *grid_shape)
            x = x + self.dwconv(grid).flatten(2).transpose(1, 2)
        elif self.token_mixer == "linear_attention":
            kv = k.transpose(-1, -2) @ v  # [b, heads, d, d]: a reduction over tokens
            x = x + (q @ kv).transpose(1, 2).reshape(b, n, d) / n
        elif self.token_mixer == "cumsum":
            x = x + x.cumsum(dim=1) / n  # an operator the pass has no rule for
        elif self.token_mixer == "manual_attention":
            scores = (h @ h.transpose(1, 2)).softmax(dim=-1)
            x = x + scores @ h
        return x + self.mlp(self.norm2(x))


class PlainDiT(nn.Module):
    def __init__(self, channels=4, dim=16, heads=2, depth=2, patch=2, token_mixer: str | None = None):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, token_mixer) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, patch * patch * channels)

    def forward(self, hidden_states, timestep):
        b, c, height, width = hidden_states.shape
        p = self.patch
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        emb = self.time(timestep.reshape(-1, 1) / 1000.0)
        for block in self.blocks:
            x = block(x, emb, (height // p, width // p))
        x = self.proj(self.norm(x))
        x = x.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, height, width)
