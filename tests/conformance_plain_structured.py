"""Conformance families, continued: video DiTs written in plain PyTorch with structured attention.

Open-Sora-Plan v1.3's Skiparse attention (sequence-first blocks whose q/k/v are regrouped into strided
groups: exact, but the skip blocks run densified), Open-Sora v1.2's STDiT3 as written (separate spatial
and temporal block lists, interleaved RoPE on the temporal q/k, a host read of ``height[0].item()``;
tokens are tubes led by the frames), Vchitect-2.0-style parallel spatial + temporal attention, and a
CogVideoX-style full-3D DiT whose joint sequence puts the video first.

Same record, helpers and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn

from conformance_models import TEXT_LEN, VH, VW, F, Family, _Rand, _same_as, _channels_times, _seeded_build
from conformance_plain_video import TimestepEmbedder, Mlp, sincos_2d

D, HEADS, TXT = 32, 2, 16
HD = D // HEADS


def _build(make):
    return lambda seed: _seeded_build(seed, make)


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


# =========================================================================== 1. Open-Sora-Plan v1.3 Skiparse


def rope_1d_cos_sin(pos, dim, theta=10000.0):
    """Open-Sora-Plan RoPE3D-style per-axis table (rotate-half, real)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    f = pos.float()[:, None] * inv[None]
    f = torch.cat([f, f], dim=-1)
    return f.cos(), f.sin()


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class RoPE3D(nn.Module):
    """opensora/models/diffusion/opensora_v1_3/modules.py RoPE3D (t, h, w thirds of the head dim), on [s, b, h, d]."""

    def __init__(self, head_dim):
        super().__init__()
        self.dims = (4, 6, 6) if head_dim == 16 else (head_dim // 3,) * 3

    def forward(self, tokens, positions):
        # tokens [S, B, heads, d]; positions [S, 3]
        parts = torch.split(tokens, list(self.dims), dim=-1)
        out = []
        for i, (p, dim) in enumerate(zip(parts, self.dims)):
            cos, sin = rope_1d_cos_sin(positions[:, i], dim)
            cos, sin = cos[:, None, None], sin[:, None, None]
            out.append(p * cos + rotate_half(p) * sin)
        return torch.cat(out, dim=-1)


class OSPAttention(nn.Module):
    """diffusers Attention + OpenSoraAttnProcessor2_0 (v1.3): sequence-first [S, B, C] hidden states,
    RoPE3D on q/k, Skiparse rearrangement of q/k/v (1D single skip or group skip), SDPA, reverse."""

    def __init__(self, dim, heads, cross=False, sparse1d=False, sparse_n=2, sparse_group=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        self.sparse1d, self.sparse_n, self.sparse_group = sparse1d, sparse_n, sparse_group
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.rope = RoPE3D(dim // heads)

    def _sparse_1d(self, x, frame, height, width):
        """require the shape of (ntokens x batch_size x dim)"""
        l = x.shape[0]
        assert l == frame * height * width
        pad_len = 0
        if l % (self.sparse_n * self.sparse_n) != 0:
            pad_len = self.sparse_n * self.sparse_n - l % (self.sparse_n * self.sparse_n)
        if pad_len != 0:
            x = Fn.pad(x, (0, 0, 0, 0, 0, pad_len))
        s, b, d = x.shape
        k = self.sparse_n
        if not self.sparse_group:
            # rearrange(x, '(g k) b d -> g (k b) d', k=sparse_n)
            x = x.view(s // k, k, b, d).reshape(s // k, k * b, d)
        else:
            # rearrange(x, '(n m k) b d -> (n k) (m b) d', m=sparse_n, k=sparse_n)
            x = x.view(s // (k * k), k, k, b, d).permute(0, 2, 1, 3, 4).reshape(s // k, k * b, d)
        return x, pad_len

    def _reverse_sparse_1d(self, x, frame, height, width, pad_len):
        g, kb, d = x.shape
        k = self.sparse_n
        b = kb // k
        if not self.sparse_group:
            # rearrange(x, 'g (k b) d -> (g k) b d', k=sparse_n)
            x = x.view(g, k, b, d).reshape(g * k, b, d)
        else:
            # rearrange(x, '(n k) (m b) d -> (n m k) b d', m=sparse_n, k=sparse_n)
            x = x.view(g // k, k, k, b, d).permute(0, 2, 1, 3, 4).reshape(g * k, b, d)
        x = x[: frame * height * width]
        return x

    def _sparse_1d_kv(self, x):
        # repeat(x, 's b d -> s (k b) d', k=sparse_n)
        s, b, d = x.shape
        return x[:, None].expand(s, self.sparse_n, b, d).reshape(s, self.sparse_n * b, d)

    def forward(self, hidden_states, encoder_hidden_states=None, frame=1, height=1, width=1, pos_thw=None):
        sequence_length, batch_size, _ = hidden_states.shape
        query = self.to_q(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key = self.to_k(ctx)
        value = self.to_v(ctx)
        head_dim = query.shape[-1] // self.heads
        query = query.view(-1, batch_size, self.heads, head_dim)
        key = key.view(-1, batch_size, self.heads, head_dim)
        if not self.cross:
            query = self.rope(query, pos_thw)
            key = self.rope(key, pos_thw)
        query = query.view(-1, batch_size, self.heads * head_dim)
        key = key.view(-1, batch_size, self.heads * head_dim)
        pad_len = 0
        if self.sparse1d:
            query, pad_len = self._sparse_1d(query, frame, height, width)
            if self.cross:
                key = self._sparse_1d_kv(key)
                value = self._sparse_1d_kv(value)
            else:
                key, pad_len = self._sparse_1d(key, frame, height, width)
                value, pad_len = self._sparse_1d(value, frame, height, width)
        # rearrange(query, 's b (h d) -> b h s d')
        q = query.view(query.shape[0], query.shape[1], self.heads, head_dim).permute(1, 2, 0, 3)
        k = key.view(key.shape[0], key.shape[1], self.heads, head_dim).permute(1, 2, 0, 3)
        v = value.view(value.shape[0], value.shape[1], self.heads, head_dim).permute(1, 2, 0, 3)
        out = Fn.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], self.heads * head_dim)  # b h s d -> s b (h d)
        if self.sparse1d:
            out = self._reverse_sparse_1d(out, frame, height, width, pad_len)
        return self.to_out[1](self.to_out[0](out))


class OSPBlock(nn.Module):
    """BasicTransformerBlock of Open-Sora-Plan v1.3 (ada_norm_single): self-attn, cross-attn, FF; seq-first."""

    def __init__(self, dim, heads, sparse1d, sparse_group, sparse_n=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn1 = OSPAttention(dim, heads, sparse1d=sparse1d, sparse_n=sparse_n, sparse_group=sparse_group)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn2 = OSPAttention(dim, heads, cross=True, sparse1d=sparse1d, sparse_n=sparse_n, sparse_group=sparse_group)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = Mlp(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, hidden_states, encoder_hidden_states, timestep, frame, height, width, pos_thw):
        # hidden_states [S, B, D]; timestep [B, 6D]
        batch_size = hidden_states.shape[1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[:, None] + timestep.reshape(6, batch_size, -1)).chunk(6, dim=0)
        norm_hidden_states = self.norm1(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa
        attn_output = self.attn1(norm_hidden_states, frame=frame, height=height, width=width, pos_thw=pos_thw)
        hidden_states = gate_msa * attn_output + hidden_states
        norm_hidden_states = self.norm2(hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states, frame=frame, height=height, width=width)
        hidden_states = attn_output + hidden_states
        norm_hidden_states = self.norm3(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
        ff_output = self.ff(norm_hidden_states)
        return gate_mlp * ff_output + hidden_states


class OpenSoraPlanV13(nn.Module):
    """OpenSoraT2V_v1_3: per-frame PatchEmbed2D, adaLN-single, blocks in [S, B, D] with Skiparse
    (full, single skip, group skip, full), PixArt-style out layer, unpatchify to [B, C, T, H, W]."""

    def __init__(self, c=4, patch=2, sparse_n=2, cfg=((False, False), (True, False), (True, True), (False, False))):
        super().__init__()
        self.c, self.patch = c, patch
        self.proj = nn.Conv2d(c, D, patch, stride=patch)   # PatchEmbed2D
        self.t_embedder = TimestepEmbedder(D)
        self.adaln_single_linear = nn.Linear(D, 6 * D)
        self.caption_projection = Mlp(D)
        self.caption_in = nn.Linear(TXT, D)
        self.transformer_blocks = nn.ModuleList(OSPBlock(D, HEADS, s, g, sparse_n) for s, g in cfg)
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, patch * patch * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        batch_size, c, frame, h, w = hidden_states.shape
        p = self.patch
        height, width = h // p, w // p
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(batch_size * frame, c, h, w)  # b c t h w -> (b t) c h w
        x = self.proj(x).flatten(2).transpose(1, 2)                                  # (b t) (h w) c
        x = x.reshape(batch_size, frame * height * width, D)                         # -> b (t h w) c
        t = self.t_embedder(timestep)
        timestep6 = self.adaln_single_linear(Fn.silu(t))                             # [B, 6D]
        embedded_timestep = t
        ctx = self.caption_projection(self.caption_in(encoder_hidden_states))        # [B, L, D]
        # 3D positions (t, h, w) of every token
        tt, hh, ww = torch.meshgrid(torch.arange(frame), torch.arange(height), torch.arange(width), indexing="ij")
        pos_thw = torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=-1)
        # b s h -> s b h
        x = x.transpose(0, 1).contiguous()
        ctx = ctx.transpose(0, 1).contiguous()
        timestep6 = timestep6.view(batch_size, 6, -1).transpose(0, 1).contiguous()   # b (6 d) -> 6 b d
        for block in self.transformer_blocks:
            x = block(x, ctx, timestep6, frame, height, width, pos_thw)
        x = x.transpose(0, 1)                                                         # s b h -> b s h
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)
        x = x.reshape(batch_size, frame, height, width, p, p, c)
        x = torch.einsum("nthwpqc->ncthpwq", x)
        return x.reshape(batch_size, c, frame, h, w)


def _osp_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT))


def _osp_pad_inputs(model, batch, seed):  # 3 x 4 x 6 = 72 tokens, sparse_n = 4: 72 % 16 = 8, padded by 8
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, 8, 12), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT))


# =========================================================================== 2. Open-Sora v1.2 STDiT3


class RotaryEmbedding(nn.Module):
    """lucidrains rotary_embedding_torch RotaryEmbedding(dim).rotate_queries_or_keys (interleaved pairs)."""

    def __init__(self, dim, theta=10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    @staticmethod
    def rotate_half(x):
        x = x.reshape(*x.shape[:-1], -1, 2)          # '... (d r) -> ... d r'
        x1, x2 = x.unbind(dim=-1)
        x = torch.stack((-x2, x1), dim=-1)
        return x.reshape(*x.shape[:-2], -1)          # '... d r -> ... (d r)'

    def forward(self, t, seq_len=None):
        freqs = torch.einsum("..., f -> ... f", t.type(self.freqs.dtype), self.freqs)
        return freqs.repeat_interleave(2, dim=-1)    # '... n -> ... (n r)', r=2

    def rotate_queries_or_keys(self, t, seq_dim=-2, offset=0):
        seq_len = t.shape[seq_dim]
        seq = torch.arange(seq_len, device=t.device, dtype=t.dtype) + offset
        freqs = self.forward(seq, seq_len=seq_len)
        rot_dim = freqs.shape[-1]
        t_left, t_middle, t_right = t[..., :0], t[..., 0:rot_dim], t[..., rot_dim:]
        t_middle = (t_middle * freqs.cos()) + (self.rotate_half(t_middle) * freqs.sin())
        return torch.cat((t_left, t_middle, t_right), dim=-1)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(dt)


class STAttention(nn.Module):
    """opensora/models/layers/blocks.py Attention (qk_norm=True, rope for temporal blocks), SDPA path."""

    def __init__(self, dim, heads, qk_norm=True, rope=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = LlamaRMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = LlamaRMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope is not None
        self.rotary_emb = rope

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q = self.rotary_emb(q)
            k = self.rotary_emb(k)
        x = Fn.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class MultiHeadCrossAttention(nn.Module):
    """Open-Sora MultiHeadCrossAttention. mode "per_sample": the SDPA form of the xformers call per sample;
    "block_diag": as the real code calls xformers, the batch flattened into one [1, B*N] query sequence and one
    [1, B*L] key sequence with a BlockDiagonalMask (built as a dense boolean mask from the seqlens)."""

    def __init__(self, dim, heads, mode="per_sample"):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond, mask=None):
        B, N, C = x.shape
        hd = C // self.heads
        if self.mode == "per_sample":
            q = self.q_linear(x).view(B, -1, self.heads, hd).transpose(1, 2)
            kv = self.kv_linear(cond).view(B, -1, 2, self.heads, hd)
            k, v = kv.unbind(2)
            x = Fn.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
            x = x.transpose(1, 2).reshape(B, -1, C)
        else:
            q = self.q_linear(x).view(1, -1, self.heads, hd)
            kv = self.kv_linear(cond).view(1, -1, 2, self.heads, hd)
            k, v = kv.unbind(2)
            # BlockDiagonalMask.from_seqlens([N] * B, mask): query row i of sample i // N sees key rows of that sample
            q_seg = torch.arange(B * N, device=x.device) // N
            k_seg = torch.cat([torch.full((n,), i, device=x.device) for i, n in enumerate(mask)])  # seqlens are Python ints
            attn_bias = q_seg[:, None] == k_seg[None, :]
            x = Fn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                attn_mask=attn_bias)
            x = x.transpose(1, 2).reshape(B, -1, C)
        return self.proj(x)


class STDiT3Block(nn.Module):
    def __init__(self, dim, heads, rope=None, temporal=False, cross_mode="per_sample"):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = STAttention(dim, heads, qk_norm=True, rope=rope)
        self.cross_attn = MultiHeadCrossAttention(dim, heads, cross_mode)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:
            x_m = x_m.view(B, T, S, C).permute(0, 2, 1, 3).reshape(B * S, T, C)   # B (T S) C -> (B S) T C
            x_m = self.attn(x_m)
            x_m = x_m.view(B, S, T, C).permute(0, 2, 1, 3).reshape(B, T * S, C)   # (B S) T C -> B (T S) C
        else:
            x_m = x_m.view(B * T, S, C)                                            # B (T S) C -> (B T) S C
            x_m = self.attn(x_m)
            x_m = x_m.view(B, T * S, C)
        x = x + gate_msa * x_m
        x = x + self.cross_attn(x, y, mask)
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + gate_mlp * self.mlp(x_m)
        return x


class PositionEmbedding2D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        half_dim = dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half_dim, 2).float() / half_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _get_sin_cos_emb(self, t):
        out = torch.einsum("i,d->id", t, self.inv_freq)
        return torch.cat((torch.sin(out), torch.cos(out)), dim=-1)

    def forward(self, x, h, w, scale=1.0, base_size=None):
        grid_h = torch.arange(h, device=x.device) / scale
        grid_w = torch.arange(w, device=x.device) / scale
        if base_size is not None:
            grid_h = grid_h * (base_size / h)
            grid_w = grid_w * (base_size / w)
        grid_h, grid_w = torch.meshgrid(grid_w, grid_h, indexing="ij")
        grid_h = grid_h.t().reshape(-1)
        grid_w = grid_w.t().reshape(-1)
        emb_h = self._get_sin_cos_emb(grid_h)
        emb_w = self._get_sin_cos_emb(grid_w)
        return torch.concat([emb_h, emb_w], dim=-1).unsqueeze(0).to(x.dtype)


class SizeEmbedder(TimestepEmbedder):
    def forward(self, s, bs):
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != bs:
            s = s.repeat(bs // s.shape[0], 1)
        b, dims = s.shape
        s = s.reshape(b * dims)
        s_emb = self.mlp(self.timestep_embedding(s, self.freq))
        return s_emb.reshape(b, dims * s_emb.shape[-1])


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size, num_patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.out_channels = out_channels

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


class STDiT3(nn.Module):
    """hpcaitech/Open-Sora opensora/models/stdit/stdit3.py STDiT3 (v1.2), x_mask-free path, pred_sigma=True.
    ``host_scale``: the real forward reads height[0].item() * width[0].item() for the position-table scale."""

    def __init__(self, c=4, patch=(1, 2, 2), depth=2, host_scale=True, cross_mode="per_sample", input_sq_size=8):
        super().__init__()
        self.in_channels, self.out_channels = c, 2 * c
        self.patch_size = patch
        self.host_scale, self.input_sq_size = host_scale, input_sq_size
        self.pos_embed = PositionEmbedding2D(D)
        self.rope = RotaryEmbedding(dim=D // HEADS)
        self.x_embedder_proj = nn.Conv3d(c, D, patch, stride=patch)   # PatchEmbed3D
        self.t_embedder = TimestepEmbedder(D)
        self.fps_embedder = SizeEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = nn.Sequential(nn.Linear(TXT, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.spatial_blocks = nn.ModuleList(STDiT3Block(D, HEADS, cross_mode=cross_mode) for _ in range(depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(D, HEADS, rope=self.rope.rotate_queries_or_keys, temporal=True, cross_mode=cross_mode)
            for _ in range(depth))
        self.final_layer = T2IFinalLayer(D, math.prod(patch), self.out_channels)

    def get_dynamic_size(self, x):
        _, _, T, H, W = x.size()
        pt, ph, pw = self.patch_size
        return (T + pt - 1) // pt, (H + ph - 1) // ph, (W + pw - 1) // pw

    def x_embedder(self, x):
        _, _, Dd, Hh, Ww = x.size()
        pt, ph, pw = self.patch_size
        if Ww % pw != 0:
            x = Fn.pad(x, (0, pw - Ww % pw))
        if Hh % ph != 0:
            x = Fn.pad(x, (0, 0, 0, ph - Hh % ph))
        if Dd % pt != 0:
            x = Fn.pad(x, (0, 0, 0, 0, 0, pt - Dd % pt))
        x = self.x_embedder_proj(x)
        return x.flatten(2).transpose(1, 2)

    def encode_text(self, y, mask=None):
        y = self.y_embedder(y)  # [B, 1, N_token, C]
        if self.spatial_blocks[0].cross_attn.mode == "per_sample":
            return y.squeeze(1), None
        y_lens = [y.shape[2]] * y.shape[0]
        y = y.squeeze(1).view(1, -1, D)
        return y, y_lens

    def unpatchify(self, x, N_t, N_h, N_w, R_t, R_h, R_w):
        T_p, H_p, W_p = self.patch_size
        B = x.shape[0]
        # "B (N_t N_h N_w) (T_p H_p W_p C_out) -> B C_out (N_t T_p) (N_h H_p) (N_w W_p)"
        x = x.view(B, N_t, N_h, N_w, T_p, H_p, W_p, self.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, N_t * T_p, N_h * H_p, N_w * W_p)
        return x[:, :, :R_t, :R_h, :R_w]

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, **kwargs):
        dtype = self.x_embedder_proj.weight.dtype
        B = x.size(0)
        x = x.to(dtype)
        timestep = timestep.to(dtype)
        y = y.to(dtype)
        _, _, Tx, Hx, Wx = x.size()
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        base_size = round(S ** 0.5)
        if self.host_scale:
            resolution_sq = (height[0].item() * width[0].item()) ** 0.5
        else:
            resolution_sq = float(Hx * Wx) ** 0.5
        scale = resolution_sq / self.input_sq_size
        pos_emb = self.pos_embed(x, H, W, scale=scale, base_size=base_size)
        t = self.t_embedder(timestep)
        fps = self.fps_embedder(fps.unsqueeze(1), B)
        t = t + fps
        t_mlp = self.t_block(t)
        y, y_lens = self.encode_text(y[:, None], mask)
        x = self.x_embedder(x)                       # [B, N, C]
        x = x.view(B, T, S, D)                       # B (T S) C -> B T S C
        x = x + pos_emb
        x = x.view(B, T * S, D)
        for spatial_block, temporal_block in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial_block(x, y, t_mlp, y_lens, None, None, T, S)
            x = temporal_block(x, y, t_mlp, y_lens, None, None, T, S)
        x = self.final_layer(x, t, None, None, T, S)
        x = self.unpatchify(x, T, H, W, Tx, Hx, Wx)
        return x.to(torch.float32)


def _stdit3_inputs(model, batch, seed):
    r = _Rand(seed)
    # the rflow sampler's model_args: y, mask (None w/o padding), height / width / fps tensors per sample
    return dict(x=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch), y=r.randn(batch, TEXT_LEN, TXT),
                fps=torch.full((batch,), 24.0), height=torch.full((batch,), 8.0 * VH), width=torch.full((batch,), 8.0 * VW))


# =========================================================================== 3. Vchitect-2.0 parallel spatial + temporal


class ParallelSTBlock(nn.Module):
    """Vchitect-2.0-style block: ONE normalised input h feeds spatial attention over (B T) S and temporal attention
    over (B S) T (1D RoPE on the frame axis), each with its own q/k/v; outputs projected and SUMMED; then
    cross-attention to text and an MLP, adaLN-zero gates from the timestep."""

    def __init__(self, dim, heads, joint=False):
        super().__init__()
        self.heads, self.joint = heads, joint
        self.add_kv = nn.Linear(dim, 2 * dim) if joint else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wqkv_t = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)
        self.wo = nn.Linear(dim, dim)
        self.wo_t = nn.Linear(dim, dim)
        self.cross = MultiHeadCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.rope = RotaryEmbedding(dim // heads)

    def _heads(self, qkv, b, n):
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, c, ctx, T, S):
        B, N, C = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        # spatial: b (t s) c -> (b t) s c
        hs = h.reshape(B * T, S, C)
        q, k, v = self._heads(self.wqkv(hs), B * T, S)
        if self.joint:  # text K/V joined after each frame's keys (repeated per frame)
            L = ctx.shape[1]
            tk, tv = self.add_kv(ctx).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            tk, tv = self.k_norm(tk).repeat_interleave(T, dim=0), tv.repeat_interleave(T, dim=0)
            k, v = torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)
        a_s = Fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * T, S, C)
        a_s = self.wo(a_s).reshape(B, T * S, C)
        # temporal: b (t s) c -> (b s) t c, RoPE over frames
        ht = h.reshape(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)
        q, k, v = self._heads(self.wqkv_t(ht), B * S, T)
        q, k = self.rope.rotate_queries_or_keys(q), self.rope.rotate_queries_or_keys(k)
        a_t = Fn.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * S, T, C)
        a_t = self.wo_t(a_t).reshape(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        x = x + g1 * (a_s + a_t)
        x = x + self.cross(x, ctx)
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x


class VchitectDiT(nn.Module):
    """Latent [B, F, C, H, W] (frames before channels, as the Vchitect / CogVideoX pipelines pass it), per-frame
    Conv2d patch embedding joined to [B, F*S, D], 2D sincos per frame, parallel S+T blocks, final adaLN layer."""

    def __init__(self, c=4, patch=2, depth=2, joint=False):
        super().__init__()
        self.c, self.patch = c, patch
        self.x_embedder = nn.Conv2d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.context_embedder = nn.Linear(TXT, D)
        self.blocks = nn.ModuleList(ParallelSTBlock(D, HEADS, joint) for _ in range(depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.proj_out = nn.Linear(D, patch * patch * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, f, c, hh, ww = hidden_states.shape
        p = self.patch
        h_, w_ = hh // p, ww // p
        s = h_ * w_
        x = self.x_embedder(hidden_states.reshape(b * f, c, hh, ww))      # (b f) d h w
        x = x.flatten(2).transpose(1, 2)                                   # (b f) s d
        x = x + sincos_2d(D, h_, w_).float()[None]
        x = x.reshape(b, f * s, D)                                         # b (f s) d
        cemb = self.t_embedder(timestep)
        ctx = self.context_embedder(encoder_hidden_states)
        for blk in self.blocks:
            x = blk(x, cemb, ctx, f, s)
        shift, scale = self.ada_out(cemb).unsqueeze(1).chunk(2, dim=-1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)          # b (f s) (p p c)
        x = x.reshape(b, f, h_, w_, p, p, c).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, f, c, hh, ww)


def _vchitect_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, F, 4, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT))


# =========================================================================== 4. CogVideoX-style, video first, RoPE on the video slice

F5 = 5


def get_3d_rotary_pos_embed(head_dim, t, h, w, theta=10000.0):
    """CogVideoX get_3d_rotary_pos_embed (use_real=True, repeat_interleave real): cos, sin [t*h*w, head_dim]."""
    dim_t, dim_h, dim_w = head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3

    def one(dim, n):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        f = torch.outer(torch.arange(n).float(), freqs)
        return f.repeat_interleave(2, dim=-1)     # [n, dim]
    ft, fh, fw = one(dim_t, t), one(dim_h, h), one(dim_w, w)
    ft = ft[:, None, None, :].expand(-1, h, w, -1)
    fh = fh[None, :, None, :].expand(t, -1, w, -1)
    fw = fw[None, None, :, :].expand(t, h, -1, -1)
    freqs = torch.cat([ft, fh, fw], dim=-1).reshape(t * h * w, -1)
    return freqs.cos(), freqs.sin()


def apply_rotary_emb(x, freqs_cis):
    """diffusers apply_rotary_emb(use_real=True, use_real_unbind_dim=-1) on [B, H, S, D]."""
    cos, sin = freqs_cis
    cos, sin = cos[None, None], sin[None, None]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class CogLayerNormZero(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.silu, self.linear = nn.SiLU(), nn.Linear(D, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb)).chunk(6, dim=1)
        hidden_states = self.norm(hidden_states) * (1 + scale)[:, None, :] + shift[:, None, :]
        encoder_hidden_states = self.norm(encoder_hidden_states) * (1 + enc_scale)[:, None, :] + enc_shift[:, None, :]
        return hidden_states, encoder_hidden_states, gate[:, None, :], enc_gate[:, None, :]


class VideoFirstBlock(nn.Module):
    """CogVideoXBlock with the joint sequence [video, text] (video FIRST), qk LayerNorm, RoPE on the video slice
    written as CogVideoX's processor writes it (in-place slice assignment), split back by slicing."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = CogLayerNormZero(dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = nn.LayerNorm(dim // heads, eps=1e-6), nn.LayerNorm(dim // heads, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = CogLayerNormZero(dim)
        self.ff = Mlp(dim)

    def attn(self, hidden_states, encoder_hidden_states, image_rotary_emb):
        n = hidden_states.size(1)
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        b = hidden_states.shape[0]
        q, k, v = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
        hd = q.shape[-1] // self.heads
        q = q.view(b, -1, self.heads, hd).transpose(1, 2)
        k = k.view(b, -1, self.heads, hd).transpose(1, 2)
        v = v.view(b, -1, self.heads, hd).transpose(1, 2)
        q, k = self.norm_q(q), self.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, :n] = apply_rotary_emb(q[:, :, :n], image_rotary_emb)
            k[:, :, :n] = apply_rotary_emb(k[:, :, :n], image_rotary_emb)
        out = Fn.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * hd))
        hidden_states, encoder_hidden_states = out.split([n, out.size(1) - n], dim=1)
        return hidden_states, encoder_hidden_states

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        n = hidden_states.size(1)
        nh, ne, g, eg = self.norm1(hidden_states, encoder_hidden_states, temb)
        ah, ae = self.attn(nh, ne, image_rotary_emb)
        hidden_states = hidden_states + g * ah
        encoder_hidden_states = encoder_hidden_states + eg * ae
        nh, ne, g, eg = self.norm2(hidden_states, encoder_hidden_states, temb)
        ff = self.ff(torch.cat([nh, ne], dim=1))
        hidden_states = hidden_states + g * ff[:, :n]
        encoder_hidden_states = encoder_hidden_states + eg * ff[:, n:]
        return hidden_states, encoder_hidden_states


class CogVideoFirstDiT(nn.Module):
    """CogVideoX-2B-style (per-frame Conv2d patch, temporal patch 1, latent [B, F, C, H, W]) but with the text
    concatenated AFTER the video tokens; image_rotary_emb passed by the sampling loop (the pipeline computes it)."""

    def __init__(self, c=4, patch=2, depth=2):
        super().__init__()
        self.c, self.patch = c, patch
        self.proj = nn.Conv2d(c, D, patch, stride=patch)
        self.text_proj = nn.Linear(TXT, D)
        self.time_embedding = TimestepEmbedder(D)
        self.transformer_blocks = nn.ModuleList(VideoFirstBlock(D, HEADS) for _ in range(depth))
        self.norm_final = nn.LayerNorm(D, eps=1e-5)
        self.norm_out_linear = nn.Linear(D, 2 * D)
        self.norm_out = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(D, patch * patch * c)

    def forward(self, hidden_states, encoder_hidden_states, timestep, image_rotary_emb=None, return_dict=False):
        batch_size, num_frames, channels, height, width = hidden_states.shape
        p = self.patch
        emb = self.time_embedding(timestep)
        text = self.text_proj(encoder_hidden_states)
        x = self.proj(hidden_states.reshape(-1, channels, height, width))
        x = x.view(batch_size, num_frames, *x.shape[1:])
        x = x.flatten(3).transpose(2, 3).flatten(1, 2)            # [B, F*H*W, D]
        n = x.shape[1]
        for block in self.transformer_blocks:
            x, text = block(x, text, emb, image_rotary_emb)
        x = torch.cat([x, text], dim=1)
        x = self.norm_final(x)
        x = x[:, :n]
        shift, scale = self.norm_out_linear(Fn.silu(emb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale)[:, None, :] + shift[:, None, :]
        x = self.proj_out(x)
        out = x.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
        out = out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)
        return (out,)


def _cog_inputs(model, batch, seed):
    r = _Rand(seed)
    rope = get_3d_rotary_pos_embed(HD, F5, VH // 2, VW // 2)
    return dict(hidden_states=r.randn(batch, F5, 4, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT),
                timestep=r.randint(1000, batch), image_rotary_emb=rope, return_dict=False)


_S = (VH // 2) * (VW // 2)   # 16 tokens per frame

PLAIN_STRUCTURED_VIDEO_FAMILIES: list[Family] = [
    Family("plain_osp_skiparse", "PKU-YuanGroup/Open-Sora-Plan v1.3 OpenSoraT2V_v1_3 (Skiparse)", _build(OpenSoraPlanV13),
           _osp_inputs, "hidden_states", F * _S, (1, 2, 2), _same_as("hidden_states"),
           notes="seq-first [S, B, D] blocks; RoPE3D; skiparse single skip '(g k) b d -> g (k b) d' and group skip "
                 "'(n m k) b d -> (n k) (m b) d' of q/k/v; cross-attn kv repeated per group"),
    Family("plain_stdit3", "hpcaitech/Open-Sora v1.2 STDiT3", _build(STDiT3), _stdit3_inputs, "x", _S, (2, 2),
           _channels_times("x", 2),
           notes="real forward: height[0].item() * width[0].item() for the position-table scale"),
    Family("plain_vchitect_parallel", "Vchitect-2.0-style parallel spatial + temporal attention", _build(VchitectDiT),
           _vchitect_inputs, "hidden_states", _S, (2, 2), _same_as("hidden_states")),
    Family("plain_cogvideo_video_first", "CogVideoX-style full-3D DiT, joint [video, text], RoPE on the video slice",
           _build(CogVideoFirstDiT), _cog_inputs, "hidden_states", F5 * _S, (1, 2, 2), _same_as("hidden_states"),
           context_after=TEXT_LEN),
]

