"""Conformance families, continued: DiTs written in plain PyTorch as research code writes them, unknown to
diffusers: facebookresearch/DiT (and its ``forward_with_cfg``), willisma/SiT, baofff/U-ViT and a DiT with
register tokens.

Written from the real code (models.py of DiT / SiT, libs/uvit.py of U-ViT); timm's PatchEmbed / Attention /
Mlp are reproduced inline and einops.rearrange is written as the reshape -> permute -> reshape it lowers to
(neither package is a dependency). Tiny configs, random weights; the adaLN-Zero gates and zero-initialised
final layers of the real code are re-drawn (``_seeded_build``'s variance-preserving init covers every
nn.Linear). Same record, helpers and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

from conformance_models import SQ, Family, _channels_times, _Rand, _same_as, _seeded_build

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- timm pieces (timm 0.9 / 1.0)


class PatchEmbed(nn.Module):
    """timm.layers.PatchEmbed (strict_img_size, flatten=True, output_fmt NCHW, norm Identity)."""

    def __init__(self, img_size=8, patch_size=2, in_chans=4, embed_dim=32, bias=True):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = True
        self.strict_img_size = True
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x):
        B, C, H, W = x.shape
        if self.strict_img_size:
            torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
            torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        x = self.norm(x)
        return x


class Attention(nn.Module):
    """timm.models.vision_transformer.Attention (fused_attn=True unless told otherwise)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0., proj_drop=0.,
                 fused_attn=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Mlp(nn.Module):
    """timm.layers.Mlp."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


# --------------------------------------------------------------------------- facebookresearch/DiT models.py


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
        ).to(device=t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        t_emb = self.mlp(t_freq)
        return t_emb


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        labels = torch.where(drop_ids, self.num_classes, labels)
        return labels

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        embeddings = self.embedding_table(labels)
        return embeddings


class DiTBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, **block_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, **block_kwargs)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        x = self.linear(x)
        return x


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False, extra_tokens=0):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token and extra_tokens > 0:
        pos_embed = np.concatenate([np.zeros([extra_tokens, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum('m,d->md', pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class DiT(nn.Module):
    """facebookresearch/DiT models.DiT; ``sit=True``: willisma/SiT models.SiT (same backbone, chunk of the
    learned sigma in forward, CFG over in_channels); ``num_registers``: register tokens appended after the
    patch tokens and dropped before the final layer; ``pos_embed_buffer``: the sin-cos table as a buffer
    (fast-DiT / many re-implementations) instead of the frozen Parameter of the reference code."""

    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True, sit=False,
                 num_registers=0, pos_embed_buffer=False, fused_attn=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.sit = sit
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, int(num_patches ** 0.5))).float().unsqueeze(0)
        if pos_embed_buffer:
            self.register_buffer("pos_embed", pos)
        else:
            self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.num_registers = num_registers
        if num_registers:
            self.register_tokens = nn.Parameter(torch.randn(1, num_registers, hidden_size) * 0.02)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, fused_attn=fused_attn) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c = self.out_channels
        p = self.x_embedder.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1]
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum('nhwpqc->nchpwq', x)
        imgs = x.reshape(shape=(x.shape[0], c, h * p, h * p))
        return imgs

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)                   # (N, D)
        y = self.y_embedder(y, self.training)    # (N, D)
        c = t + y                                # (N, D)
        if self.num_registers:
            n = x.shape[1]
            x = torch.cat([x, self.register_tokens.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x, c)                      # (N, T, D)
        if self.num_registers:
            x = x[:, :n]
        x = self.final_layer(x, c)               # (N, T, patch_size ** 2 * out_channels)
        x = self.unpatchify(x)                   # (N, out_channels, H, W)
        if self.sit and self.learn_sigma:
            x, _ = x.chunk(2, dim=1)
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        if self.sit:
            eps, rest = model_out[:, :self.in_channels], model_out[:, self.in_channels:]
        else:
            eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class CFGForward(nn.Module):
    """The module the sampler sees when sample.py passes ``model.forward_with_cfg`` to p_sample_loop."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y, cfg_scale):
        return self.model.forward_with_cfg(x, t, y, cfg_scale)


# --------------------------------------------------------------------------- baofff/U-ViT libs/uvit.py


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def uvit_unpatchify(x, channels=3):
    patch_size = int((x.shape[2] // channels) ** 0.5)
    h = w = int(x.shape[1] ** .5)
    assert h * w == x.shape[1] and patch_size ** 2 * channels == x.shape[2]
    # einops.rearrange(x, 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)', h=h, p1=patch_size, p2=patch_size)
    B = x.shape[0]
    x = x.reshape(B, h, w, patch_size, patch_size, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * patch_size, w * patch_size)


class UViTAttention(nn.Module):
    """U-ViT's Attention in ATTENTION_MODE 'flash' (torch 2: F.scaled_dot_product_attention exists)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(x)
        # einops.rearrange(qkv, 'B L (K H D) -> K B H L D', K=3, H=self.num_heads).float()
        qkv = qkv.reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).float()
        q, k, v = qkv[0], qkv[1], qkv[2]  # B H L D
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        # einops.rearrange(x, 'B H L D -> B L (H D)')
        x = x.permute(0, 2, 1, 3).reshape(B, L, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class UViTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, skip=False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = UViTAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W = x.shape
        assert H % self.patch_size == 0 and W % self.patch_size == 0
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x


class UViT(nn.Module):
    def __init__(self, img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.,
                 qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm, mlp_time_embed=False, num_classes=11,
                 conv=True, skip=True):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_embed = UPatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        self.in_blocks = nn.ModuleList([
            UViTBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_scale=qk_scale, norm_layer=norm_layer) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                   qk_scale=qk_scale, norm_layer=norm_layer)
        self.out_blocks = nn.ModuleList([
            UViTBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_scale=qk_scale, norm_layer=norm_layer, skip=skip) for _ in range(depth // 2)])
        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(self.in_chans, self.in_chans, 3, padding=1) if conv else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=.02)

    def forward(self, x, timesteps, y=None):
        x = self.patch_embed(x)
        B, L, D = x.shape

        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim))
        time_token = time_token.unsqueeze(dim=1)
        x = torch.cat((time_token, x), dim=1)
        if y is not None:
            label_emb = self.label_emb(y)
            label_emb = label_emb.unsqueeze(dim=1)
            x = torch.cat((label_emb, x), dim=1)
        x = x + self.pos_embed

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)

        x = self.mid_block(x)

        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.norm(x)
        x = self.decoder_pred(x)
        assert x.size(1) == self.extras + L
        x = x[:, self.extras:, :]
        x = uvit_unpatchify(x, self.in_chans)
        x = self.final_layer(x)
        return x


# --------------------------------------------------------------------------- families

N_SQ = (SQ // 2) ** 2   # 16 tokens: 8x8 latent, patch 2
R = 4                   # register tokens


def _dit_build_with(_reinit=(), **kw):
    def build(seed):
        return _seeded_build(seed, lambda: DiT(**kw), reinit=_reinit)
    return build


def _dit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, SQ, SQ), t=r.randint(1000, batch), y=r.randint(10, batch))


def _sit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, SQ, SQ), t=r.timestep(batch, 1.0), y=r.randint(10, batch))


def _cfg_build_with(**kw):
    def build(seed):
        return _seeded_build(seed, lambda: CFGForward(DiT(**kw)))
    return build


def _cfg_inputs(model, batch, seed):
    # sample.py: z = cat([z, z]); y = cat([y, y_null]); the loop passes t for the whole doubled batch
    assert batch % 2 == 0
    r = _Rand(seed)
    z = r.randn(batch // 2, 4, SQ, SQ)
    labels = r.randint(10, batch // 2)
    t = r.randint(1000, batch // 2)
    return dict(x=torch.cat([z, z]), t=torch.cat([t, t]), y=torch.cat([labels, torch.full_like(labels, 10)]),
                cfg_scale=4.0)


def _uvit_build(seed):
    return _seeded_build(seed, lambda: UViT(), reinit=(("pos_embed", 0.5),))


def _uvit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, SQ, SQ), timesteps=r.timestep(batch), y=r.randint(11, batch))


PLAIN_DIT_FAMILIES: list[Family] = [
    Family("plain_dit", "facebookresearch/DiT DiT (fused timm attention, learn_sigma)", _dit_build_with(),
           _dit_inputs, "x", N_SQ, (2, 2), _channels_times("x", 2), timestep_arg="t"),
    Family("plain_dit_cfg", "facebookresearch/DiT DiT.forward_with_cfg (doubled batch, guidance on 3 channels)",
           _cfg_build_with(), _cfg_inputs, "x", N_SQ, (2, 2), _channels_times("x", 2), timestep_arg="t"),
    Family("plain_sit", "willisma/SiT SiT (continuous t in [0, 1], learn_sigma=False)",
           _dit_build_with(sit=True, learn_sigma=False), _sit_inputs, "x", N_SQ, (2, 2), _same_as("x"),
           timestep_arg="t"),
    Family("plain_sit_sigma_chunk", "willisma/SiT SiT (learn_sigma=True: x.chunk(2, dim=1) after the unpatchify)",
           _dit_build_with(sit=True, learn_sigma=True), _sit_inputs, "x", N_SQ, (2, 2), _same_as("x"),
           timestep_arg="t"),
    Family("plain_uvit", "baofff/U-ViT UViT (time + label tokens concatenated, long skips, final 3x3 conv)",
           _uvit_build, _uvit_inputs, "x", N_SQ, (2, 2), _same_as("x"), context_before=2,
           timestep_arg="timesteps"),
    Family("plain_dit_registers", "DiT with 4 register tokens appended after the patch tokens (pos_embed buffer)",
           _dit_build_with(num_registers=R, pos_embed_buffer=True, _reinit=(("register_tokens", 1.0),)), _dit_inputs, "x", N_SQ, (2, 2),
           _channels_times("x", 2), context_after=R, timestep_arg="t"),
]
