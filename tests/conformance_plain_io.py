"""Conformance families, continued: DiTs written in plain PyTorch with unusual conditioning and I/O forms.

1. FiT / FiTv2 (whlzy/FiT): latent passed as tokens [B, N, p*p*C] + padding mask [B, N] + per-token grid
   positions [B, 2, N] (2D RoPE built from them inside the forward), masked SDPA, SwiGLU, QK-norm (v2).
2. REPA SiT (sihyun-yu/REPA models/sit.py): forward returns (x, zs), zs a list of projector features of
   the tokens after block `encoder_depth` (projector applied on x.reshape(-1, D), reshaped back to [N, T, z]).
3. PixArt-alpha ControlNet (diffusion/model/nets/pixart_controlnet.py, ControlPixArtMSHalf): a control
   latent c, patch-embedded, fed through copies of the first blocks, after_proj outputs added to the base
   blocks' hidden states. Cross-attention batched (SDPA) or in the original flattened xformers form
   ([1, B*N] queries, block-diagonal mask) written with SDPA and a dense block-diagonal mask.
4. MDTv2 (sail-sg/MDT masked_diffusion/models.py): encoder in/out blocks with long skips (skip_linear on a
   cat), relative position bias (BEiT table gathered by an index buffer), side-interpolator with learned mask
   tokens where masked (mask all ones at inference), decoder blocks; a variant with the ids_restore unshuffle
   gather (identity ids at inference): refused, the gather's index is a forward argument.

Same record, helpers and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

from conformance_models import Family, H, W, SQ, TEXT_LEN, _Rand, _same_as, _channels_times, _seeded_build
from conformance_plain_dit import (PatchEmbed, Attention, Mlp, modulate, TimestepEmbedder, LabelEmbedder,
                                   DiTBlock, FinalLayer, get_2d_sincos_pos_embed)


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

C_IN, P = 4, 2
GH, GW = H // P, W // P          # 4 x 6 grid
N_TOK = GH * GW                  # 24
N_SQ = (SQ // P) ** 2            # 16


# =========================================================================== 1. FiT / FiTv2


def rotate_half(x):
    # einops: '... (d r) -> ... d r', r=2 ; stack((-x2, x1)) ; '... d r -> ... (d r)'
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(-1)
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    """FiT's 2D RoPE: half the head dim rotates with the row position, half with the column; positions come
    from the per-token grid tensor [B, 2, N] the data pipeline / sampler passes in."""

    def __init__(self, head_dim, theta=10000.0):
        super().__init__()
        dim = head_dim // 2
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, grid):  # grid: [B, 2, N] float
        freqs_h = torch.einsum("bn,f->bnf", grid[:, 0], self.freqs)
        freqs_w = torch.einsum("bn,f->bnf", grid[:, 1], self.freqs)
        freqs_h = freqs_h.repeat_interleave(2, dim=-1)
        freqs_w = freqs_w.repeat_interleave(2, dim=-1)
        freqs = torch.cat([freqs_h, freqs_w], dim=-1)  # [B, N, head_dim]
        return freqs.cos()[:, None], freqs.sin()[:, None]  # [B, 1, N, hd]


class FiTAttention(nn.Module):
    def __init__(self, dim, num_heads, qk_norm):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, mask):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :].bool()                          # B 1 1 N (keys)
            attn_mask = attn_mask.expand(-1, self.num_heads, N, -1)            # B H N N
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class FiTBlock(nn.Module):
    def __init__(self, dim, heads, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = FiTAttention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, 2 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope, mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FiT(nn.Module):
    """FiT(x, t, y, grid, mask, size): x already patchified [B, N, p*p*C] (tokens padded to max length,
    valid ones first), output [B, N, p*p*2C] tokens, unpatchified by the sampler."""

    def __init__(self, patch=2, in_channels=4, dim=32, depth=2, heads=2, num_classes=10, qk_norm=True,
                 learn_sigma=True):
        super().__init__()
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.Linear(patch * patch * in_channels, dim, bias=True)
        self.t_embedder = TimestepEmbedder(dim, 64)
        self.y_embedder = LabelEmbedder(num_classes, dim, 0.1)
        self.rope = VisionRotaryEmbedding(dim // heads)
        self.blocks = nn.ModuleList(FiTBlock(dim, heads, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, self.out_channels)

    def forward(self, x, t, y, grid, mask, size=None):
        x = self.x_embedder(x)
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = t + y
        rope = self.rope(grid.float())
        for block in self.blocks:
            x = block(x, c, rope, mask)
        x = self.final_layer(x, c)
        x = x * mask[..., None]          # padding tokens predict zero
        return x


def _fit_build(seed):
    return _seeded_build(seed, lambda: FiT())


def _fit_inputs(model, batch, seed):
    r = _Rand(seed)
    latent = r.randn(batch, C_IN, H, W)
    # the sampler's patchify: B C (h p1) (w p2) -> B (h w) (p1 p2 C)
    x = latent.reshape(batch, C_IN, GH, P, GW, P).permute(0, 2, 4, 3, 5, 1).reshape(batch, N_TOK, P * P * C_IN)
    gy, gx = torch.meshgrid(torch.arange(GH), torch.arange(GW), indexing="ij")
    grid = torch.stack([gy.reshape(-1), gx.reshape(-1)]).float()[None].expand(batch, -1, -1).contiguous()
    mask = torch.ones(batch, N_TOK)
    size = torch.tensor([[GH, GW]] * batch)[:, None]
    return dict(x=x, t=r.randint(1000, batch), y=r.randint(10, batch), grid=grid, mask=mask, size=size)


def _fit_inputs_padded(model, batch, seed):
    """Sample 1 holds 20 valid tokens (a 4 x 5 image) and 4 padding tokens at the end."""
    kw = _fit_inputs(model, batch, seed)
    gy, gx = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    kw["grid"][1, :, :20] = torch.stack([gy.reshape(-1), gx.reshape(-1)]).float()
    kw["grid"][1, :, 20:] = 0
    kw["mask"][1, 20:] = 0
    kw["x"][1, 20:] = 0
    return kw


# =========================================================================== 2. REPA SiT


def build_mlp(hidden_size, projector_dim, z_dim):
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class REPASiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                 mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=10, encoder_depth=2, projector_dim=48,
                 z_dims=(24, 16), learn_sigma=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.encoder_depth = encoder_depth
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, int(num_patches ** 0.5))).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth))
        self.projectors = nn.ModuleList(build_mlp(hidden_size, projector_dim, z) for z in z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x, patch_size=None):
        c = self.out_channels
        p = self.x_embedder.patch_size[0] if patch_size is None else patch_size
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x, t, y, return_logvar=False):
        x = self.x_embedder(x) + self.pos_embed
        N, T, D = x.shape
        t_embed = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = t_embed + y
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x.reshape(-1, D)).reshape(N, T, -1) for projector in self.projectors]
        x = self.final_layer(x, c)
        x = self.unpatchify(x)
        return x, zs


def _repa_build(seed):
    return _seeded_build(seed, lambda: REPASiT())


def _repa_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, SQ, SQ), t=r.timestep(batch, 1.0), y=r.randint(10, batch))


# =========================================================================== 3. PixArt-alpha ControlNet


def get_2d_sincos_pos_embed_ms(embed_dim, grid_size, lewei_scale=1.0, base_size=16):
    """PixArt's get_2d_sincos_pos_embed with a (h, w) grid, lewei_scale and base_size."""
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    grid_h = np.arange(grid_size[0], dtype=np.float32) / (grid_size[0] / base_size) / lewei_scale
    grid_w = np.arange(grid_size[1], dtype=np.float32) / (grid_size[1] / base_size) / lewei_scale
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size[1], grid_size[0]])

    def one(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb_h = one(embed_dim // 2, grid[0])
    emb_w = one(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class MultiHeadCrossAttention(nn.Module):
    """PixArt's cross-attention. ``flat=True``: the original xformers form (queries of every sample in one
    [1, B*N] sequence, keys [1, B*L], BlockDiagonalMask.from_seqlens([N]*B, y_lens)), written with SDPA and the
    dense block-diagonal mask; ``flat=False``: batched SDPA (what the torch-2 ports do)."""

    def __init__(self, d_model, num_heads, flat):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.flat = flat
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cond, mask=None):
        B, N, C = x.shape
        if self.flat:
            # cond: [1, B*L, C]; mask: y_lens python list
            q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
            kv = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim)
            k, v = kv.unbind(2)
            L = cond.shape[1] // B
            qi = torch.arange(B * N, device=x.device) // N
            ki = torch.arange(B * L, device=x.device) // L
            bias = qi[:, None] == ki[None, :]           # BlockDiagonalMask.from_seqlens([N]*B, [L]*B)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=bias)
            o = o.transpose(1, 2).reshape(B, -1, C)
        else:
            q = self.q_linear(x).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
            kv = self.kv_linear(cond).view(B, -1, 2, self.num_heads, self.head_dim)
            k, v = kv.unbind(2)
            o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
            o = o.transpose(1, 2).reshape(B, -1, C)
        return self.proj(o)


class PixArtBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=2.0, flat=False):
        super().__init__()
        self.hidden_size = hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads, flat)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, y, t, mask=None):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa)).reshape(B, N, C)
        x = x + self.cross_attn(x, y, mask)
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels, hidden_size, token_num=TEXT_LEN):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels ** 0.5)

    def forward(self, caption, train):
        return self.y_proj(caption)


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))


class UPatch(nn.Module):  # timm PatchEmbed without strict size (PixArtMS: strict_img_size=False)
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class PixArtMS(nn.Module):
    def __init__(self, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, caption_channels=24,
                 learn_sigma=True, flat=False):
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.base_size, self.lewei_scale = 4, 1.0
        self.flat = flat
        self.x_embedder = UPatch(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(PixArtBlock(hidden_size, num_heads, flat=flat) for _ in range(depth))
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)

    def pos(self, h, w, device):
        return torch.from_numpy(get_2d_sincos_pos_embed_ms(self.hidden_size, (h, w), self.lewei_scale,
                                                           self.base_size)).unsqueeze(0).to(device).float()

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        x = x.reshape(shape=(x.shape[0], self.h, self.w, p, p, c))
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(shape=(x.shape[0], c, self.h * p, self.w * p))


class ControlT2IDitBlockHalf(nn.Module):
    def __init__(self, base_block, block_index=0):
        super().__init__()
        import copy
        self.copied_block = copy.deepcopy(base_block)
        self.block_index = block_index
        hidden_size = base_block.hidden_size
        if self.block_index == 0:
            self.before_proj = nn.Linear(hidden_size, hidden_size)   # zero-init in the real code; re-drawn
        self.after_proj = nn.Linear(hidden_size, hidden_size)        # zero-init in the real code; re-drawn

    def forward(self, x, y, t, mask=None, c=None):
        if self.block_index == 0:
            c = self.before_proj(c)
            c = self.copied_block(x + c, y, t, mask)
            c_skip = self.after_proj(c)
        else:
            c = self.copied_block(c, y, t, mask)
            c_skip = self.after_proj(c)
        return c, c_skip


class ControlPixArtMSHalf(nn.Module):
    """forward(x, timestep, y, mask=None, data_info=None, c=None): c is the control latent [B, C, H, W]
    (VAE-encoded HED edges). ``own_embedder``: c patch-embedded by its own embedder (else the base model's
    x_embedder, as the reference forward_c does)."""

    def __init__(self, copy_blocks_num=2, own_embedder=True, flat=False):
        super().__init__()
        self.base_model = PixArtMS(flat=flat)
        self.copy_blocks_num = copy_blocks_num
        self.controlnet = nn.ModuleList(ControlT2IDitBlockHalf(self.base_model.blocks[i], i)
                                        for i in range(copy_blocks_num))
        self.c_embedder = UPatch(P, C_IN, self.base_model.hidden_size) if own_embedder else None

    def forward_c(self, c):
        m = self.base_model
        h, w = c.shape[-2] // m.patch_size, c.shape[-1] // m.patch_size
        pos_embed = m.pos(h, w, c.device)
        emb = self.c_embedder if self.c_embedder is not None else m.x_embedder
        return emb(c) + pos_embed if c is not None else c

    def forward(self, x, timestep, y, mask=None, data_info=None, c=None, **kwargs):
        m = self.base_model
        if c is not None:
            c = self.forward_c(c)
        m.h, m.w = x.shape[-2] // m.patch_size, x.shape[-1] // m.patch_size
        pos_embed = m.pos(m.h, m.w, x.device)
        x = m.x_embedder(x) + pos_embed
        t = m.t_embedder(timestep)
        t0 = m.t_block(t)
        y = m.y_embedder(y, self.training)          # [B, 1, L, D]
        if m.flat:
            if mask is not None:
                raise NotImplementedError
            y_lens = [y.shape[2]] * y.shape[0]
            y = y.squeeze(1).view(1, -1, x.shape[-1])
        else:
            y = y.squeeze(1)
            y_lens = None
        x = m.blocks[0](x, y, t0, y_lens)
        if c is not None:
            for index in range(1, self.copy_blocks_num + 1):
                c, c_skip = self.controlnet[index - 1](x, y, t0, y_lens, c)
                x = m.blocks[index](x + c_skip, y, t0, y_lens)
            for index in range(self.copy_blocks_num + 1, len(m.blocks)):
                x = m.blocks[index](x, y, t0, y_lens)
        else:
            for index in range(1, len(m.blocks)):
                x = m.blocks[index](x, y, t0, y_lens)
        x = m.final_layer(x, t)
        x = m.unpatchify(x)
        return x


def _pixart_cn_build_with(**kw):
    def build(seed):
        return _seeded_build(seed, lambda: ControlPixArtMSHalf(**kw))
    return build


def _pixart_cn_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, C_IN, H, W), timestep=r.randint(1000, batch),
                y=r.randn(batch, 1, TEXT_LEN, 24), mask=None,
                data_info={"img_hw": torch.tensor([[H * 8.0, W * 8.0]] * batch),
                           "aspect_ratio": torch.tensor([[H / W]] * batch)},
                c=r.randn(batch, C_IN, H, W))


# =========================================================================== 4. MDTv2


class RelativePositionBias(nn.Module):
    """BEiT-style relative position bias (MDT: no cls token)."""

    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.num_relative_distance = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        coords_h = torch.arange(window_size[0])
        coords_w = torch.arange(window_size[1])
        coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += window_size[0] - 1
        relative_coords[:, :, 1] += window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * window_size[1] - 1
        self.register_buffer("relative_position_index", relative_coords.sum(-1), persistent=False)

    def forward(self):
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()  # nH, N, N


class MDTAttention(nn.Module):
    def __init__(self, dim, num_heads, num_patches):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        side = int(num_patches ** 0.5)
        self.rel_pos_bias = RelativePositionBias(window_size=[side, side], num_heads=num_heads)

    def forward(self, x, ids_keep=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        rp_bias = self.rel_pos_bias()
        attn += rp_bias
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class MDTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=2.0, skip=False, num_patches=None, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MDTAttention(hidden_size, num_heads, num_patches)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x, c, skip=None, ids_keep=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.inplace:  # research-code style in-place residual updates
            x += gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)
            x += gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
            return x
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class MDTv2(nn.Module):
    """forward(x, t, y, mask=None, ids_restore=None). With ``mask`` ([B, N], 1 = kept, all ones at inference)
    the side-interpolator runs: learned mask tokens where masked (and, with ``ids_restore``, the unshuffle
    gather of the training code), decoder positions, side blocks, masked shortcut."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                 mlp_ratio=2.0, num_classes=10, learn_sigma=True, decode_layer=2, side_blocks=1, inplace_decoder=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, 0.1)
        num_patches = self.x_embedder.num_patches
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, int(num_patches ** 0.5))).float().unsqueeze(0)
        self.pos_embed = nn.Parameter(pos.clone(), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(pos.clone(), requires_grad=False)
        half_depth = (depth - decode_layer) // 2
        self.half_depth = half_depth
        self.en_inblocks = nn.ModuleList(MDTBlock(hidden_size, num_heads, mlp_ratio, num_patches=num_patches)
                                         for _ in range(half_depth))
        self.en_outblocks = nn.ModuleList(MDTBlock(hidden_size, num_heads, mlp_ratio, skip=True,
                                                   num_patches=num_patches) for _ in range(half_depth))
        self.de_blocks = nn.ModuleList(MDTBlock(hidden_size, num_heads, mlp_ratio, skip=(i == 0),
                                                num_patches=num_patches, inplace=inplace_decoder)
                                       for i in range(decode_layer))
        self.sideblocks = nn.ModuleList(MDTBlock(hidden_size, num_heads, mlp_ratio, num_patches=num_patches)
                                        for _ in range(side_blocks))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))

    def unpatchify(self, x):
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward_side_interpolater(self, x, c, mask, ids_restore):
        if ids_restore is not None:
            # training code: x holds the kept tokens; append mask tokens and unshuffle
            n_keep = x.shape[1]  # at inference every token is kept
            mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] - n_keep, 1)
            x_ = torch.cat([x, mask_tokens], dim=1)
            x = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        else:
            m = mask.unsqueeze(-1)
            x = x * m + self.mask_token * (1 - m)
        x = x + self.decoder_pos_embed
        x_before = x
        for sideblock in self.sideblocks:
            x = sideblock(x, c, ids_keep=None)
        mask = mask.unsqueeze(dim=-1)
        x = x * mask + (1 - mask) * x_before
        return x

    def forward(self, x, t, y, mask=None, ids_restore=None):
        x = self.x_embedder(x) + self.pos_embed
        t = self.t_embedder(t)
        y = self.y_embedder(y, self.training)
        c = t + y
        input_skip = x
        skips = []
        for blk in self.en_inblocks:
            x = blk(x, c, ids_keep=None)
            skips.append(x)
        for blk in self.en_outblocks:
            x = blk(x, c, skip=skips.pop(), ids_keep=None)
        if mask is not None:
            x = self.forward_side_interpolater(x, c, mask, ids_restore)
        else:
            x = x + self.decoder_pos_embed
        for i, blk in enumerate(self.de_blocks):
            x = blk(x, c, skip=input_skip if i == 0 else None, ids_keep=None)  # long skip from the input
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def _mdt_build_with(**kw):
    def build(seed):
        rel = tuple((name, 0.5) for name, _ in MDTv2(**kw).named_parameters()
                    if name.endswith("relative_position_bias_table"))
        return _seeded_build(seed, lambda: MDTv2(**kw), reinit=rel + (("mask_token", 1.0),))
    return build


_mdt_build = _mdt_build_with()


def _mdt_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, SQ, SQ), t=r.randint(1000, batch), y=r.randint(10, batch),
                mask=torch.ones(batch, N_SQ))


def _mdt_inputs_gather(model, batch, seed):
    kw = _mdt_inputs(model, batch, seed)
    kw["ids_restore"] = torch.arange(N_SQ)[None].repeat(batch, 1)
    return kw


# =========================================================================== families

PLAIN_IO_FAMILIES: list[Family] = [
    Family("plain_fit", "whlzy/FiT FiTv2 (tokens + padding mask + grid positions, 2D RoPE, masked SDPA, SwiGLU)",
           _fit_build, _fit_inputs_padded, "x", N_TOK, None, _channels_times("x", 2, dim=2), timestep_arg="t",
           notes="latent passed as tokens [B, N, p*p*C]; sample 1 padded (20 valid tokens of 24), the padding mask "
                 "and per-token grid positions are forward arguments, gathered as side inputs"),
    Family("plain_repa_sit", "sihyun-yu/REPA SiT (returns (x, zs), zs projector features of block encoder_depth)",
           _repa_build, _repa_inputs, "x", N_SQ, (2, 2), _same_as("x"), timestep_arg="t",
           notes="the projector runs on x.reshape(-1, D) (batch and tokens merged); zs is a list output"),
    Family("plain_pixart_controlnet", "PixArt-alpha ControlPixArtMSHalf, xformers-form cross-attn ([1, B*N] queries, "
           "block-diagonal mask)", _pixart_cn_build_with(flat=True), _pixart_cn_inputs, "x", N_TOK, (2, 2),
           _channels_times("x", 2), timestep_arg="timestep",
           notes="a control latent through its own patch embedder and copied blocks, added after after_proj"),
    Family("plain_mdt", "sail-sg/MDT MDTv2 (long skips, rel-pos bias added in place, side-interpolator, mask all ones)",
           _mdt_build, _mdt_inputs, "x", N_SQ, (2, 2), _channels_times("x", 2), timestep_arg="t"),
    Family("plain_mdt_gather", "sail-sg/MDT MDTv2 side-interpolator with the ids_restore unshuffle gather",
           _mdt_build, _mdt_inputs_gather, "x", N_SQ, (2, 2), _channels_times("x", 2), timestep_arg="t",
           notes="refused: the gather's index (ids_restore) is a forward argument, it moves values between tokens"),
]
