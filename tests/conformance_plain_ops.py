"""Conformance families, continued: plain-PyTorch DiTs that exercise operator styles of research code, unknown
to diffusers: Swin windowed attention (with and without shifted windows), a LightningDiT-style block (RMSNorm,
SwiGLU, QK-LayerNorm, grouped-query SDPA), gradient checkpointing with DropPath and a baddbmm masked
cross-attention, dense mixture-of-experts FFNs (top-1 and top-2 token-choice routing, on [B, N, D] and on
tokens flattened to [B * N, D]; expert-choice routing, which mixes tokens and is refused), and Fourier token
mixers (GFNet's global filter, an AFNO-style fft2 over the grid, FNet's fft2 over [tokens, hidden]; an fft
over channels only, which is token-wise).

Geometry: latent [B, 4, 8, 12], patch 2 -> a 4 x 6 grid of 24 tokens. Every forward returns a 1-tuple
(diffusers' return_dict=False form). Same record, helpers and rules as tests/conformance_models.py, which
appends these entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from conformance_models import TEXT_LEN, Family, H, W, _channels_times, _Rand, _same_as, _seeded_build

C_IN, P, D, HEADS = 4, 2, 32, 2
GH, GW = H // P, W // P
N_TOK = GH * GW


# --------------------------------------------------------------------------- shared DiT pieces (facebookresearch/DiT)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
            device=t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):  # timm PatchEmbed, flatten=True
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(dim, gh, gw):
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    gy, gx = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    return torch.cat([one(dim // 2, gy), one(dim // 2, gx)], dim=1).float()[None]  # [1, N, D]


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x, c, p, h, w):  # facebookresearch/DiT, non-square grid
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, w * p))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):  # timm Attention, fused_attn path
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mixer=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = mixer if mixer is not None else Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 2 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiTBase(nn.Module):
    """facebookresearch/DiT DiT with pluggable token mixers per block; forward(x, t, y)."""

    def __init__(self, mixers, learn_sigma=True, num_classes=10):
        super().__init__()
        self.out_channels = C_IN * 2 if learn_sigma else C_IN
        self.x_embedder = PatchEmbed(P, C_IN, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D)
        self.register_buffer("pos_embed", sincos_pos_embed(D, GH, GW), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS, m) for m in mixers)
        self.final_layer = FinalLayer(D, P, self.out_channels)

    def forward(self, x, t, y):
        h, w = x.shape[-2] // P, x.shape[-1] // P
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return (unpatchify(x, self.out_channels, P, h, w),)


def _dit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, C_IN, H, W), t=r.randint(1000, batch), y=r.randint(10, batch))


def _family(name, cls_name, build, notes, inputs=_dit_inputs, out_factor=2, latent="x", t="t"):
    out = _channels_times(latent, out_factor) if out_factor != 1 else _same_as(latent)
    return Family(name=name, cls_name=cls_name, build=build, inputs=inputs, latent_arg=latent, num_tokens=N_TOK,
                  patch=(P, P), output_shape=out, notes=notes, timestep_arg=t)


# --------------------------------------------------------------------------- 1. Swin-style windowed attention


def window_partition(x, window_size):  # microsoft/Swin-Transformer
    B, H_, W_, C = x.shape
    x = x.view(B, H_ // window_size, window_size, W_ // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H_, W_):
    B = int(windows.shape[0] / (H_ * W_ / window_size / window_size))
    x = windows.view(B, H_ // window_size, W_ // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H_, W_, -1)


class WindowAttention(nn.Module):
    """Swin WindowAttention (manual q k^T + relative position bias + shift mask), wrapped as a token mixer
    [B, N, C] -> [B, N, C] over the grid (GH, GW) with optional cyclic shift (torch.roll)."""

    def __init__(self, dim, num_heads, window_size=2, shift_size=0, fused=False):
        super().__init__()
        self.dim, self.ws, self.shift, self.num_heads, self.fused = dim, window_size, shift_size, num_heads, fused
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        ws = window_size
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * ws - 1) * (2 * ws - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        rel = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if shift_size > 0:
            img_mask = torch.zeros((1, GH, GW, 1))
            cnt = 0
            for hs in (slice(0, -ws), slice(-ws, -shift_size), slice(-shift_size, None)):
                for wsl in (slice(0, -ws), slice(-ws, -shift_size), slice(-shift_size, None)):
                    img_mask[:, hs, wsl, :] = cnt
                    cnt += 1
            mw = window_partition(img_mask, ws).view(-1, ws * ws)
            attn_mask = mw.unsqueeze(1) - mw.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def window_attn(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        if self.fused:  # Swin-V2 / modern: SDPA with the bias as attn_mask
            m = bias.unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                m = (m.unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(B_ // nW, -1, -1, -1, -1)
                m = m.reshape(B_, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn + bias.unsqueeze(0)
            if mask is not None:
                nW = mask.shape[0]
                attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, GH, GW, C)
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        xw = window_partition(x, self.ws).view(-1, self.ws * self.ws, C)
        aw = self.window_attn(xw, mask=self.attn_mask).view(-1, self.ws, self.ws, C)
        x = window_reverse(aw, self.ws, GH, GW)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x.view(B, GH * GW, C)


def _swin_build(shift, fused):
    def build(seed):
        return _seeded_build(seed, lambda: DiTBase(
            [WindowAttention(D, HEADS, 2, 0, fused), None]
            + ([WindowAttention(D, HEADS, 2, 1, fused)] if shift else []) + [None]))
    return build


# --------------------------------------------------------------------------- 2. GQA + SwiGLU + RMSNorm + QK-LN


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False), \
            nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GQAttention(nn.Module):
    def __init__(self, dim, num_heads, num_kv_heads):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.wq = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.wq(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)
        return self.wo(x.transpose(1, 2).reshape(B, N, -1))


class GQABlock(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = GQAttention(dim, heads, kv_heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2 * dim * 4 / 3) // 8 * 8)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class GQADiT(DiTBase):
    """LightningDiT-style: RMSNorm, SwiGLU, QK-LayerNorm, grouped-query SDPA (4 q heads, 2 kv heads)."""

    def __init__(self):
        super().__init__([None, None])
        self.blocks = nn.ModuleList(GQABlock(D, 4, 2) for _ in range(2))


# --------------------------------------------------------------------------- 3. checkpoint + DropPath + baddbmm


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):  # timm
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class ClassicAttention(nn.Module):
    """diffusers' classic AttnProcessor written out: heads folded into the batch, baddbmm scores
    (beta=0 over torch.empty for self-attention, beta=1 over the padding bias for cross-attention)."""

    def __init__(self, dim, heads, kv_dim=None):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(0.1)

    def head_to_batch_dim(self, t):
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, n, d // self.heads)

    def batch_to_head_dim(self, t):
        bh, n, d = t.shape
        return t.reshape(bh // self.heads, self.heads, n, d).permute(0, 2, 1, 3).reshape(bh // self.heads, n, d * self.heads)

    def forward(self, x, context=None, bias=None):
        context = x if context is None else context
        q, k, v = (self.head_to_batch_dim(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if bias is None:
            base, beta = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device), 0
        else:
            base, beta = bias, 1
        scores = torch.baddbmm(base, q, k.transpose(-1, -2), beta=beta, alpha=self.scale)
        probs = self.attn_drop(scores.softmax(dim=-1))
        return self.to_out(self.batch_to_head_dim(torch.bmm(probs, v)))


class CkptBlock(nn.Module):
    """PixArt-alpha-style block: self-attn, masked cross-attn, MLP; functional layer norms, DropPath,
    token-wise dropout, adaLN-single table."""

    def __init__(self, dim, heads, text_dim, drop_path_p=0.1):
        super().__init__()
        self.dim = dim
        self.attn = ClassicAttention(dim, heads)
        self.cross_attn = ClassicAttention(dim, heads, text_dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.drop_path = DropPath(drop_path_p)
        self.drop = nn.Dropout(0.1)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        self.cross_w = nn.Parameter(torch.ones(dim))
        self.cross_b = nn.Parameter(torch.zeros(dim))

    def forward(self, x, y, t, bias):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        h = F.layer_norm(x, (self.dim,), eps=1e-6) * (1 + scale_msa) + shift_msa
        x = x + self.drop_path(gate_msa * self.attn(h))
        x = x + self.drop(self.cross_attn(F.layer_norm(x, (self.dim,), self.cross_w, self.cross_b), y, bias))
        h = F.layer_norm(x, (self.dim,), eps=1e-6) * (1 + scale_mlp) + shift_mlp
        x = x + self.drop_path(gate_mlp * self.mlp(h))
        return x


class CkptDiT(nn.Module):
    """PixArt-alpha-style DiT: forward(x, timestep, y, mask) with an int text mask [B, L]; every block
    run under torch.utils.checkpoint (use_reentrant=False), as training code leaves it."""

    def __init__(self, text_dim=24, depth=2):
        super().__init__()
        self.out_channels = 2 * C_IN
        self.x_embedder = PatchEmbed(P, C_IN, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = nn.Sequential(nn.Linear(text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.register_buffer("pos_embed", sincos_pos_embed(D, GH, GW), persistent=False)
        self.blocks = nn.ModuleList(CkptBlock(D, HEADS, D) for _ in range(depth))
        self.final_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.final_linear = nn.Linear(D, P * P * self.out_channels)

    def forward(self, x, timestep, y, mask=None):
        h, w = x.shape[-2] // P, x.shape[-1] // P
        x = self.x_embedder(x) + self.pos_embed
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)
        y = self.y_embedder(y)
        heads = self.blocks[0].attn.heads
        bias = (1 - mask.to(x.dtype)) * -10000.0           # [B, L]
        bias = bias[:, None, :].repeat_interleave(heads, dim=0)  # [B * heads, 1, L]
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, y, t0, bias, use_reentrant=False)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift
        return (unpatchify(self.final_linear(x), self.out_channels, P, h, w),)


def _ckpt_inputs(model, batch, seed):
    r = _Rand(seed)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
    mask[0, 5:] = 0
    if batch > 1:
        mask[1, 3:] = 0
    return dict(x=r.randn(batch, C_IN, H, W), timestep=r.timestep(batch), y=r.randn(batch, TEXT_LEN, 24),
                mask=mask)


# --------------------------------------------------------------------------- 4. MoE FFN, dense routing


class DenseMoE(nn.Module):
    """Token-choice routing computed densely: every expert runs on every token, a one-hot (top-1) or
    top-k gate combines them. flat=True flattens [B, N, D] -> [B * N, D] first, as most MoE code does."""

    def __init__(self, dim, hidden, num_experts=4, top_k=1, flat=False, shared=False):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))
        self.shared = SwiGLU(dim, hidden) if shared else None
        self.top_k, self.flat, self.num_experts = top_k, flat, num_experts

    def forward(self, x):
        shape = x.shape
        if self.flat:
            x = x.view(-1, shape[-1])
        probs = self.gate(x).softmax(dim=-1)                                    # [..., E]
        outs = torch.stack([e(x) for e in self.experts], dim=-2)                # [..., E, D]
        if self.top_k == 1:
            idx = probs.argmax(dim=-1, keepdim=True)                             # [..., 1]
            weight = torch.gather(probs, -1, idx)                                # [..., 1]
            onehot = torch.zeros_like(probs).scatter(-1, idx, 1.0)               # [..., E]
            y = (outs * (onehot * weight).unsqueeze(-1)).sum(dim=-2)
        else:
            weight, idx = torch.topk(probs, self.top_k, dim=-1)                  # [..., k]
            weight = weight / weight.sum(dim=-1, keepdim=True)
            sel = torch.gather(outs, -2, idx.unsqueeze(-1).expand(*idx.shape, outs.shape[-1]))  # [..., k, D]
            y = (sel * weight.unsqueeze(-1)).sum(dim=-2)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


def _moe_build(top_k, flat):
    def build(seed):
        def make():
            m = DiTBase([None, None])
            for b in m.blocks:
                b.mlp = DenseMoE(D, 32, 4, top_k, flat, shared=top_k > 1)
            return m
        return _seeded_build(seed, make)
    return build


# --------------------------------------------------------------------------- 5. FFT token mixers


class GlobalFilter(nn.Module):  # raoyongming/GFNet, non-square grid (GH, GW)
    def __init__(self, dim, h=GH, w=GW // 2 + 1):
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(h, w, dim, 2, dtype=torch.float32) * 0.5 + torch.tensor([1.0, 0.0]))

    def forward(self, x):
        B, N, C = x.shape
        x = x.view(B, GH, GW, C).to(torch.float32)
        x = torch.fft.rfft2(x, dim=(1, 2), norm="ortho")
        weight = torch.view_as_complex(self.complex_weight)
        x = x * weight
        x = torch.fft.irfft2(x, s=(GH, GW), dim=(1, 2), norm="ortho")
        return x.reshape(B, N, C)


class FNetMixer(nn.Module):  # google-research FNet: fft over hidden then tokens, real part
    def forward(self, x):
        return torch.fft.fft2(x, dim=(-2, -1)).real


class GridFFT2(nn.Module):  # fft2 over the token grid, real part
    def forward(self, x):
        B, N, C = x.shape
        return torch.fft.fft2(x.view(B, GH, GW, C), dim=(1, 2), norm="ortho").real.reshape(B, N, C)


def _fft_build(mixer_cls):
    def build(seed):
        return _seeded_build(seed, lambda: DiTBase([None, mixer_cls(D) if mixer_cls is GlobalFilter else mixer_cls(),
                                                    None]))
    return build


PLAIN_OPS_FAMILIES: list[Family] = [
    _family("plain_swin_window", "microsoft/Swin-Transformer WindowAttention in a DiT (no shift)", _swin_build(False, False),
            "blocks: 2x2-window attention (manual q k^T + rel-pos bias), global SDPA"),
    _family("plain_swin_window_sdpa", "Swin-V2-style windowed SDPA with rel-pos bias mask in a DiT", _swin_build(False, True),
            "blocks: 2x2-window SDPA with bias attn_mask, global SDPA"),
    _family("plain_swin_shift", "microsoft/Swin-Transformer W-MSA + SW-MSA (torch.roll, shift mask) in a DiT",
            _swin_build(True, False), "blocks: window, global, shifted window (roll + -100 mask), global"),
    _family("plain_gqa_swiglu", "LightningDiT-style DiT: RMSNorm, SwiGLU, QK-LayerNorm, SDPA scale= enable_gqa", 
            lambda seed: _seeded_build(seed, GQADiT), "4 q heads, 2 kv heads"),
    _family("plain_ckpt_baddbmm", "PixArt-alpha-style DiT: checkpoint(use_reentrant=False), DropPath, F.layer_norm, baddbmm",
            lambda seed: _seeded_build(seed, CkptDiT), "self-attn baddbmm(empty, beta=0), cross-attn baddbmm(bias)",
            inputs=_ckpt_inputs, t="timestep"),
    _family("plain_moe_top1", "DiT with dense token-choice top-1 MoE FFN (argmax, gather, scatter)", _moe_build(1, False),
            "4 SwiGLU experts, [B, N, E, D]"),
    _family("plain_moe_topk", "DiT with dense top-2 MoE FFN (topk + gather on the expert axis) + shared expert",
            _moe_build(2, False), "4 SwiGLU experts, [B, N, E, D]"),
    _family("plain_moe_topk_flat", "DiT-MoE-style top-2 MoE FFN on tokens flattened to [B*N, D]", _moe_build(2, True),
            "x.view(-1, D) before routing, view back after"),
    _family("plain_gfnet_filter", "raoyongming/GFNet GlobalFilter (rfft2 / irfft2 on the grid) in a DiT",
            _fft_build(GlobalFilter), "attention, global filter, attention"),
    _family("plain_fnet_mixer", "FNet token mixing fft2 over (tokens, hidden).real in a DiT", _fft_build(FNetMixer),
            "attention, fnet, attention"),
    _family("plain_grid_fft2", "fft2 over the token grid .real (AFNO-style mixing) in a DiT", _fft_build(GridFFT2),
            "attention, grid fft2, attention"),
]


# --------------------------------------------------------------------------- negative controls for the prototype


class ExpertChoiceMoE(DenseMoE):
    """Expert-choice routing written densely: each expert takes its top-c TOKENS (topk over the token
    axis) and its output is scattered back: tokens compete, so it is no token-wise operator."""

    def forward(self, x):
        B, N, Dm = x.shape
        probs = self.gate(x).softmax(dim=-1)                                     # [B, N, E]
        cap = N // 2
        weight, idx = torch.topk(probs.transpose(1, 2), cap, dim=-1)             # [B, E, cap] over tokens
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            sel = torch.gather(x, 1, idx[:, e, :, None].expand(B, cap, Dm))      # tokens of expert e
            out = expert(sel) * weight[:, e, :, None]
            y = y.scatter_add(1, idx[:, e, :, None].expand(B, cap, Dm), out)
        return y


class FeatureFFT(nn.Module):  # fft over the channel axis only: token-wise
    def forward(self, x):
        return torch.fft.fft(x, dim=-1).real


def _ec_build(seed):
    def make():
        m = DiTBase([None, None])
        for b in m.blocks:
            b.mlp = ExpertChoiceMoE(D, 32, 4)
        return m
    return _seeded_build(seed, make)


PLAIN_OPS_FAMILIES += [
    _family("plain_moe_expert_choice", "dense expert-choice MoE (topk over tokens, gather / scatter_add on tokens)",
            _ec_build, "must be refused or densified, never token-wise"),
    _family("plain_feature_fft", "fft over the channel axis only (.real): token-wise", _fft_build(FeatureFFT),
            "attention, channel fft, attention"),
]
