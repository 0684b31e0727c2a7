"""Small DiTs written in plain PyTorch, unknown to diffusers and to the pass.

``PlainDiT`` is an ordinary DiT (patch conv, self-attention blocks, unpatchify by
reshape/permute); ``token_mixer`` adds an operator that mixes tokens: ones the pass
densifies through an activation cache ("mean", "conv", "linear_attention"), one it
recognises as attention ("manual_attention": softmax(h h^T) h, no projections) and ones
it must refuse ("cummax": no rule; "gram": (h h^T) h, a [N, N] product that is no
attention). ``attention`` picks how the blocks write their attention: with
``F.scaled_dot_product_attention`` ("sdpa") or by hand, in the forms of
:data:`HAND_WRITTEN_ATTENTION`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


HAND_WRITTEN_ATTENTION = (
    "timm",           # q * scale @ k^T, softmax, dropout (eval), @ v
    "einsum_masked",  # einsum scores / sqrt(d), masked_fill(-inf) of every 5th key, fp32 softmax, einsum
    "folded_heads",   # heads folded into the batch axis ([B * H, N, d], diffusers' classic processor), bmm
    "rel_bias",       # q @ k^T * scale + a learned [H, N, N] bias (a mask with query and key axes)
    "multi_query",    # one K/V head ([b, 1, n, d]) that matmul broadcasts over every query head
    "in_place",       # MDT / research style: attn.mul_(scale), then attn += a learned [H, N, N] bias
    "channels_first", # guided-diffusion's QKVAttentionLegacy: [B * H, d, N] operands, q and k each scaled
                      # by d^-1/4, einsum "bct,bcs->bts", fp32 softmax, einsum "bts,bcs->bct"
    "folded_views",   # fairseq style: bmm over [B * H, N, d], the scores viewed as [B, H, N, N] for a
                      # per-head bias, viewed back, softmax, bmm
    "heads_last",     # einsum over [B, N, H, d] operands (heads after the tokens): "bnhd,bmhd->bhnm",
                      # softmax, "bhnm,bmhd->bnhd"
)


def _hand_written_attention(form: str, q, k, v, bias=None):
    """Attention of ``q, k, v`` ``[b, heads, n, d]`` written out in ``form``; returns ``[b, heads, n, d]``."""
    b, heads, n, d = q.shape
    scale = d ** -0.5
    if form == "timm":
        attn = (q * scale) @ k.transpose(-2, -1)
        return F.dropout(attn.softmax(dim=-1), p=0.1, training=False) @ v
    if form == "einsum_masked":
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / d ** 0.5
        hidden = (torch.arange(n, device=q.device) % 5 == 3).view(1, 1, 1, n)
        probs = scores.masked_fill(hidden, float("-inf")).float().softmax(dim=-1).to(q.dtype)
        return torch.einsum("bhij,bhjd->bhid", probs, v)
    if form == "folded_heads":
        fold = lambda t: t.reshape(b * heads, n, d)  # noqa: E731
        probs = (torch.bmm(fold(q), fold(k).transpose(1, 2)) * scale).softmax(dim=-1)
        return torch.bmm(probs, fold(v)).reshape(b, heads, n, d)
    if form == "rel_bias":
        scores = q @ k.transpose(-2, -1) * scale + bias[:, :n, :n]
        return scores.softmax(dim=-1) @ v
    if form == "in_place":
        attn = q @ k.transpose(-2, -1)
        attn.mul_(scale)
        attn += bias[:, :n, :n]
        return attn.softmax(dim=-1) @ v
    if form == "channels_first":
        first = lambda t: t.transpose(-2, -1).reshape(b * heads, d, n)  # noqa: E731
        root = d ** -0.25
        weight = torch.einsum("bct,bcs->bts", first(q) * root, first(k) * root)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, first(v))
        return a.reshape(b, heads, d, n).transpose(-2, -1)
    if form == "folded_views":
        fold = lambda t: t.reshape(b * heads, n, d)  # noqa: E731
        scores = torch.bmm(fold(q), fold(k).transpose(1, 2)) * scale
        scores = scores.view(b, heads, n, n) + bias[:, :n, :n]
        probs = scores.view(b * heads, n, n).softmax(dim=-1)
        return torch.bmm(probs, fold(v)).reshape(b, heads, n, d)
    if form == "heads_last":
        last = lambda t: t.transpose(1, 2)  # noqa: E731  [b, n, heads, d]
        probs = (torch.einsum("bnhd,bmhd->bhnm", last(q), last(k)) * scale).softmax(dim=-1)
        return torch.einsum("bhnm,bmhd->bnhd", probs, last(v)).transpose(1, 2)
    if form == "multi_query":
        scores = (q * scale) @ k[:, :1].transpose(-2, -1)
        return scores.softmax(dim=-1) @ v[:, :1]
    raise ValueError(f"unknown attention form {form!r}")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, token_mixer: str | None, attention: str = "sdpa", max_tokens: int = 64):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.bias = nn.Parameter(0.5 * torch.randn(heads, max_tokens, max_tokens)) \
            if attention in ("rel_bias", "in_place", "folded_views") else None
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
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = _hand_written_attention(self.attention, q, k, v, self.bias)
        a = a.transpose(1, 2).reshape(b, n, d)
        x = x + self.out(a)
        if self.token_mixer == "mean":
            x = x + x.mean(dim=1, keepdim=True)  # global pooling over tokens
        elif self.token_mixer == "conv":  # Mix-FFN style depthwise convolution over the token grid
            grid = x.transpose(1, 2).reshape(b, d, *grid_shape)
            x = x + self.dwconv(grid).flatten(2).transpose(1, 2)
        elif self.token_mixer == "linear_attention":
            kv = k.transpose(-1, -2) @ v  # [b, heads, d, d]: a reduction over tokens
            x = x + (q @ kv).transpose(1, 2).reshape(b, n, d) / n
        elif self.token_mixer == "cummax":
            x = x + x.cummax(dim=1).values / n  # an operator the pass has no rule for
        elif self.token_mixer == "manual_attention":
            scores = (h @ h.transpose(1, 2)).softmax(dim=-1)
            x = x + scores @ h
        elif self.token_mixer == "gram":
            x = x + (h @ h.transpose(1, 2)) @ h / n
        return x + self.mlp(self.norm2(x))


class PlainDiT(nn.Module):
    def __init__(self, channels=4, dim=16, heads=2, depth=2, patch=2, token_mixer: str | None = None,
                 attention: str = "sdpa"):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, token_mixer, attention) for _ in range(depth))
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
