"""Small DiTs written in plain PyTorch, unknown to diffusers and to the pass.

``PlainDiT`` is an ordinary DiT (patch conv, self-attention blocks, unpatchify by
reshape/permute); ``token_mixer`` swaps in an operator the pass must refuse.
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

    def forward(self, x, emb):
        b, n, d = x.shape
        shift, scale = self.mod(emb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.out(a)
        if self.token_mixer == "mean":
            x = x + x.mean(dim=1, keepdim=True)  # global pooling over tokens
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
            x = block(x, emb)
        x = self.proj(self.norm(x))
        x = x.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, height, width)
