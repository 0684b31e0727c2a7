"""Conformance families, continued: hierarchical / resolution-changing DiTs written in plain PyTorch.

1. crowsonkb/k-diffusion image_transformer_v2 HDiT (global attention at every level)
2. U-DiT (Tian et al. 2024): downsampled-token self-attention, U-Net of DiT stages
3. PixArt-alpha/PixArt-sigma original PixArtMS with KV token compression (sr_ratio conv, some blocks)
4. NVlabs DiffiT latent variant: time-dependent MHSA (TMSA)

einops.rearrange is written as the reshape -> permute -> reshape it lowers to. HDiT keeps its tokens as
[B, h, w, C] grids, which the pass follows only once flattened: supported, but nothing is saved (the
attention output's split back into the grid is densified). U-DiT's pixel-unshuffled sub-maps give each
sub-map a different number of active tokens: refused.

Same record, helpers and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

from conformance_models import TEXT_LEN, Family, H, W, _channels_times, _Rand, _same_as, _seeded_build
from conformance_plain_io import get_2d_sincos_pos_embed_ms, t2i_modulate
from conformance_plain_ops import Attention, FinalLayer, TimestepEmbedder, modulate

import math
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn


# =========================================================================== 1. k-diffusion HDiT (v2)


def hd_rms_norm(x, scale, eps):
    dtype = reduce(torch.promote_types, (x.dtype, scale.dtype, torch.float32))
    mean_sq = torch.mean(x.to(dtype) ** 2, dim=-1, keepdim=True)
    scale = scale.to(dtype) * torch.rsqrt(mean_sq + eps)
    return x * scale.to(x.dtype)


def scale_for_cosine_sim(q, k, scale, eps):
    dtype = reduce(torch.promote_types, (q.dtype, k.dtype, scale.dtype, torch.float32))
    sum_sq_q = torch.sum(q.to(dtype) ** 2, dim=-1, keepdim=True)
    sum_sq_k = torch.sum(k.to(dtype) ** 2, dim=-1, keepdim=True)
    sqrt_scale = torch.sqrt(scale.to(dtype))
    scale_q = sqrt_scale * torch.rsqrt(sum_sq_q + eps)
    scale_k = sqrt_scale * torch.rsqrt(sum_sq_k + eps)
    return q * scale_q.to(q.dtype), k * scale_k.to(k.dtype)


def _apply_rotary_emb_inplace(x, theta, conj):
    dtype = reduce(torch.promote_types, (x.dtype, theta.dtype, torch.float32))
    d = theta.shape[-1]
    assert d * 2 <= x.shape[-1]
    x1, x2 = x[..., :d], x[..., d: d * 2]
    x1_, x2_, theta = x1.to(dtype), x2.to(dtype), theta.to(dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    sin = -sin if conj else sin
    y1 = x1_ * cos - x2_ * sin
    y2 = x2_ * cos + x1_ * sin
    x1.copy_(y1)
    x2.copy_(y2)


def apply_rotary_emb_(x, theta):
    # k-diffusion: ApplyRotaryEmbeddingInplace.apply(x, theta, False) -> _apply_rotary_emb_inplace; returns x
    _apply_rotary_emb_inplace(x, theta, conj=False)
    return x


class LinearGEGLU(nn.Linear):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features * 2, bias=bias)
        self.out_features = out_features

    def forward(self, x):
        x, gate = F.linear(x, self.weight, self.bias).chunk(2, dim=-1)
        return x * F.gelu(gate)


class HDRMSNorm(nn.Module):
    def __init__(self, shape, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(shape))

    def forward(self, x):
        return hd_rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    def __init__(self, features, cond_features, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_features, features, bias=False)  # zero_init in the real code

    def forward(self, x, cond):
        return hd_rms_norm(x, self.linear(cond)[:, None, None, :] + 1, self.eps)


class AxialRoPE(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        log_min = math.log(math.pi)
        log_max = math.log(10.0 * math.pi)
        freqs = torch.linspace(log_min, log_max, n_heads * dim // 4 + 1)[:-1].exp()
        self.register_buffer("freqs", freqs.view(dim // 4, n_heads).T.contiguous())

    def forward(self, pos):
        theta_h = pos[..., None, 0:1] * self.freqs.to(pos.dtype)
        theta_w = pos[..., None, 1:2] * self.freqs.to(pos.dtype)
        return torch.cat((theta_h, theta_w), dim=-1)


class HDSelfAttentionBlock(nn.Module):
    def __init__(self, d_model, d_head, cond_features):
        super().__init__()
        self.d_head = d_head
        self.n_heads = d_model // d_head
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.qkv_proj = nn.Linear(d_model, d_model * 3, bias=False)
        self.scale = nn.Parameter(torch.full([self.n_heads], 10.0))
        self.pos_emb = AxialRoPE(d_head // 2, self.n_heads)
        self.dropout = nn.Dropout(0.0)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)  # zero_init in the real code

    def forward(self, x, pos, cond):
        skip = x
        x = self.norm(x, cond)
        qkv = self.qkv_proj(x)
        # rearrange(pos, "... h w e -> ... (h w) e")
        pos = pos.reshape(*pos.shape[:-3], pos.shape[-3] * pos.shape[-2], pos.shape[-1]).to(qkv.dtype)
        theta = self.pos_emb(pos)
        # rearrange(qkv, "n h w (t nh e) -> t n nh (h w) e", t=3, e=self.d_head)
        n, h, w, _ = qkv.shape
        qkv = qkv.reshape(n, h, w, 3, self.n_heads, self.d_head).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.reshape(3, n, self.n_heads, h * w, self.d_head)
        q, k = scale_for_cosine_sim(q, k, self.scale[:, None, None], 1e-6)
        theta = theta.movedim(-2, -3)
        q = apply_rotary_emb_(q, theta)
        k = apply_rotary_emb_(k, theta)
        x = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        # rearrange(x, "n nh (h w) e -> n h w (nh e)", h=skip.shape[-3], w=skip.shape[-2])
        x = x.reshape(n, self.n_heads, skip.shape[-3], skip.shape[-2], self.d_head).permute(0, 2, 3, 1, 4)
        x = x.reshape(n, skip.shape[-3], skip.shape[-2], self.n_heads * self.d_head)
        x = self.dropout(x)
        x = self.out_proj(x)
        return x + skip


class HDFeedForwardBlock(nn.Module):
    def __init__(self, d_model, d_ff, cond_features):
        super().__init__()
        self.norm = AdaRMSNorm(d_model, cond_features)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x, cond):
        skip = x
        x = self.norm(x, cond)
        x = self.up_proj(x)
        x = self.dropout(x)
        x = self.down_proj(x)
        return x + skip


class GlobalTransformerLayer(nn.Module):
    def __init__(self, d_model, d_ff, d_head, cond_features):
        super().__init__()
        self.self_attn = HDSelfAttentionBlock(d_model, d_head, cond_features)
        self.ff = HDFeedForwardBlock(d_model, d_ff, cond_features)

    def forward(self, x, pos, cond):
        x = self.self_attn(x, pos, cond)  # checkpoint(...) is the identity in eval
        x = self.ff(x, cond)
        return x


class Level(nn.ModuleList):
    def forward(self, x, *args, **kwargs):
        for layer in self:
            x = layer(x, *args, **kwargs)
        return x


class MappingFeedForwardBlock(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.norm = HDRMSNorm(d_model)
        self.up_proj = LinearGEGLU(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        skip = x
        x = self.down_proj(self.up_proj(self.norm(x)))
        return x + skip


class MappingNetwork(nn.Module):
    def __init__(self, n_layers, d_model, d_ff):
        super().__init__()
        self.in_norm = HDRMSNorm(d_model)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(d_model, d_ff) for _ in range(n_layers)])
        self.out_norm = HDRMSNorm(d_model)

    def forward(self, x):
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class TokenMerge(nn.Module):
    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.h, self.w = patch_size
        self.proj = nn.Linear(in_features * self.h * self.w, out_features, bias=False)

    def forward(self, x):
        # rearrange(x, "... (h nh) (w nw) e -> ... h w (nh nw e)", nh=self.h, nw=self.w)
        b, hh, ww, e = x.shape
        x = x.reshape(b, hh // self.h, self.h, ww // self.w, self.w, e).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, hh // self.h, ww // self.w, self.h * self.w * e)
        return self.proj(x)


class TokenSplitWithoutSkip(nn.Module):
    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__()
        self.h, self.w = patch_size
        self.proj = nn.Linear(in_features, out_features * self.h * self.w, bias=False)

    def forward(self, x):
        x = self.proj(x)
        # rearrange(x, "... h w (nh nw e) -> ... (h nh) (w nw) e", nh=self.h, nw=self.w)
        b, hh, ww, f = x.shape
        e = f // (self.h * self.w)
        x = x.reshape(b, hh, ww, self.h, self.w, e).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hh * self.h, ww * self.w, e)


class TokenSplit(TokenSplitWithoutSkip):
    def __init__(self, in_features, out_features, patch_size=(2, 2)):
        super().__init__(in_features, out_features, patch_size)
        self.fac = nn.Parameter(torch.ones(1) * 0.5)

    def forward(self, x, skip):
        x = super().forward(x)
        return torch.lerp(skip, x, self.fac.to(x.dtype))


class FourierFeatures(nn.Module):
    def __init__(self, in_features, out_features, std=1.0):
        super().__init__()
        self.register_buffer("weight", torch.randn([out_features // 2, in_features]) * std)

    def forward(self, input):
        f = 2 * math.pi * input @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


def make_axial_pos(h, w, dtype=None, device=None):
    h_pos = torch.linspace(-1, 1, h + 1, dtype=dtype, device=device)
    w_pos = torch.linspace(-1, 1, w + 1, dtype=dtype, device=device)
    h_pos = (h_pos[1:] + h_pos[:-1]) / 2
    w_pos = (w_pos[1:] + w_pos[:-1]) / 2
    return torch.stack(torch.meshgrid(h_pos, w_pos, indexing="ij"), dim=-1).view(h * w, 2)


def downscale_pos(pos):
    # rearrange(pos, "... (h nh) (w nw) e -> ... h w (nh nw) e", nh=2, nw=2)
    hh, ww, e = pos.shape[-3:]
    pos = pos.reshape(*pos.shape[:-3], hh // 2, 2, ww // 2, 2, e).movedim(-4, -3)
    pos = pos.reshape(*pos.shape[:-5], hh // 2, ww // 2, 4, e)
    return torch.mean(pos, dim=-2)


class HDiT(nn.Module):
    """k_diffusion.models.image_transformer_v2.ImageTransformerDenoiserModelV2, every level global attention."""

    def __init__(self, widths=(16, 32), depths=(1, 1), d_ffs=(32, 64), d_head=8, mapping_width=16,
                 mapping_depth=1, mapping_d_ff=32, in_channels=4, out_channels=4, patch_size=(2, 2),
                 num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.patch_in = TokenMerge(in_channels, widths[0], patch_size)
        self.time_emb = FourierFeatures(1, mapping_width)
        self.time_in_proj = nn.Linear(mapping_width, mapping_width, bias=False)
        self.aug_emb = FourierFeatures(9, mapping_width)
        self.aug_in_proj = nn.Linear(mapping_width, mapping_width, bias=False)
        self.class_emb = nn.Embedding(num_classes, mapping_width) if num_classes else None
        self.mapping_cond_in_proj = None
        self.mapping = MappingNetwork(mapping_depth, mapping_width, mapping_d_ff)
        self.down_levels, self.up_levels = nn.ModuleList(), nn.ModuleList()
        for i, (width, depth, d_ff) in enumerate(zip(widths, depths, d_ffs)):
            make = lambda: GlobalTransformerLayer(width, d_ff, d_head, mapping_width)  # noqa: E731
            if i < len(widths) - 1:
                self.down_levels.append(Level([make() for _ in range(depth)]))
                self.up_levels.append(Level([make() for _ in range(depth)]))
            else:
                self.mid_level = Level([make() for _ in range(depth)])
        self.merges = nn.ModuleList([TokenMerge(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.splits = nn.ModuleList([TokenSplit(b, a) for a, b in zip(widths[:-1], widths[1:])])
        self.out_norm = HDRMSNorm(widths[0])
        self.patch_out = TokenSplitWithoutSkip(widths[0], out_channels, patch_size)

    def forward(self, x, sigma, aug_cond=None, class_cond=None, mapping_cond=None):
        x = x.movedim(-3, -1)
        x = self.patch_in(x)
        pos = make_axial_pos(x.shape[-3], x.shape[-2], device=x.device).view(x.shape[-3], x.shape[-2], 2)
        if class_cond is None and self.class_emb is not None:
            raise ValueError("class_cond must be specified if num_classes > 0")
        c_noise = torch.log(sigma) / 4
        time_emb = self.time_in_proj(self.time_emb(c_noise[..., None]))
        aug_cond = x.new_zeros([x.shape[0], 9]) if aug_cond is None else aug_cond
        aug_emb = self.aug_in_proj(self.aug_emb(aug_cond))
        class_emb = self.class_emb(class_cond) if self.class_emb is not None else 0
        mapping_emb = 0
        cond = self.mapping(time_emb + aug_emb + class_emb + mapping_emb)

        skips, poses = [], []
        for down_level, merge in zip(self.down_levels, self.merges):
            x = down_level(x, pos, cond)
            skips.append(x)
            poses.append(pos)
            x = merge(x)
            pos = downscale_pos(pos)

        x = self.mid_level(x, pos, cond)

        for up_level, split, skip, pos in reversed(list(zip(self.up_levels, self.splits, skips, poses))):
            x = split(x, skip)
            x = up_level(x, pos, cond)

        x = self.out_norm(x)
        x = self.patch_out(x)
        x = x.movedim(-1, -3)
        return x


def _hdit_build(seed):
    return _seeded_build(seed, lambda: HDiT())


def _hdit_inputs(model, batch, seed):
    r = _Rand(seed)
    # K-diffusion samplers call model(x, sigma, class_cond=...); sigma in (0.03, 15) (karras schedule)
    sigma = torch.exp(r.randn(batch) * 1.2)
    return dict(x=r.randn(batch, 4, H, W), sigma=sigma, class_cond=r.randint(10, batch))


# =========================================================================== 2. U-DiT


class UMlp(nn.Module):
    """U-DiT FFN: fc1 -> depthwise 3x3 conv on the token grid -> GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H_, W_):
        x = self.fc1(x)
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H_, W_)
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class UDiTBlock(nn.Module):
    """Downsampled-token self-attention: depthwise conv, PixelUnshuffle(2) into 4 sub-maps (folded into the
    batch), shared-weight attention in each, PixelShuffle(2) back."""

    def __init__(self, dim, heads, mlp_ratio=2.0, down_factor=2):
        super().__init__()
        self.down_factor = down_factor
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.downsampler = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = UMlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c, H_, W_):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        B, N, C = x.shape
        d = self.down_factor
        a = modulate(self.norm1(x), shift_msa, scale_msa)
        # rearrange(a, 'b (h w) c -> b c h w', h=H)
        a = a.transpose(1, 2).reshape(B, C, H_, W_)
        a = self.downsampler(a)
        a = F.pixel_unshuffle(a, d)  # [B, C * d * d, H/d, W/d], channel index c * d*d + (i * d + j)
        # rearrange(a, 'b (c p) h w -> (b p) (h w) c', p=d*d)
        a = a.reshape(B, C, d * d, H_ // d, W_ // d).permute(0, 2, 3, 4, 1).reshape(B * d * d, -1, C)
        a = self.attn(a)
        # rearrange(a, '(b p) (h w) c -> b (c p) h w', p=d*d, h=H/d)
        a = a.reshape(B, d * d, H_ // d, W_ // d, C).permute(0, 4, 1, 2, 3).reshape(B, C * d * d, H_ // d, W_ // d)
        a = F.pixel_shuffle(a, d)  # [B, C, H, W]
        a = a.flatten(2).transpose(1, 2)
        x = x + gate_msa.unsqueeze(1) * a
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), H_, W_)
        return x


class UDownsample(nn.Module):  # U-DiT Downsample: conv 3x3 (C -> C/2), PixelUnshuffle(2): tokens / 4, C * 2
    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, 1, 1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x, H_, W_):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H_, W_)
        x = self.body(x)
        return x.flatten(2).transpose(1, 2)


class UUpsample(nn.Module):  # conv 3x3 (C -> 2C), PixelShuffle(2): tokens * 4, C / 2
    def __init__(self, n_feat):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, 1, 1, bias=False), nn.PixelShuffle(2))

    def forward(self, x, H_, W_):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H_, W_)
        x = self.body(x)
        return x.flatten(2).transpose(1, 2)


class UDiT(nn.Module):
    """U-DiT: patch 1 embed, encoder stage (DSA blocks) -> Downsample -> mid stage -> Upsample -> concat skip,
    1x1 fuse (Linear) -> decoder stage -> final layer, unpatchify. forward(x, t, y)."""

    def __init__(self, in_channels=4, dim=16, heads=2, patch=1, num_classes=10, learn_sigma=True):
        super().__init__()
        self.p = patch
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.t2 = nn.Linear(dim, 2 * dim)  # cond for the mid stage (2x width)
        self.enc = UDiTBlock(dim, heads)
        self.down = UDownsample(dim)
        self.mid = nn.ModuleList([UDiTBlock(2 * dim, heads), UDiTBlock(2 * dim, heads)])
        self.up = UUpsample(2 * dim)
        self.fuse = nn.Linear(2 * dim, dim)
        self.dec = UDiTBlock(dim, heads)
        self.final_layer = FinalLayer(dim, patch, self.out_channels)

    def forward(self, x, t, y):
        B, _, Hh, Ww = x.shape
        h, w = Hh // self.p, Ww // self.p
        x = self.x_embedder(x).flatten(2).transpose(1, 2)
        c = self.t_embedder(t) + self.y_embedder(y)
        c2 = self.t2(c)
        x = self.enc(x, c, h, w)
        skip = x
        x = self.down(x, h, w)
        for blk in self.mid:
            x = blk(x, c2, h // 2, w // 2)
        x = self.up(x, h // 2, w // 2)
        x = self.fuse(torch.cat([x, skip], dim=-1))
        x = self.dec(x, c, h, w)
        x = self.final_layer(x, c)
        p, oc = self.p, self.out_channels
        x = x.reshape(B, h, w, p, p, oc)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, oc, h * p, w * p)


def _udit_build(seed):
    return _seeded_build(seed, lambda: UDiT())


def _dit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, H, W), t=r.randint(1000, batch), y=r.randint(10, batch))


# =========================================================================== 3. PixArt-Sigma original


class PMlp(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None):
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AttentionKVCompress(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, sampling="conv", sr_ratio=1, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.sampling = sampling
        self.sr_ratio = sr_ratio
        if sr_ratio > 1 and sampling == "conv":
            self.sr = nn.Conv2d(dim, dim, groups=dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr.weight.data.fill_(1 / sr_ratio ** 2)
            self.sr.bias.data.zero_()
            self.norm = nn.LayerNorm(dim)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def downsample_2d(self, tensor, H_, W_, scale_factor, sampling=None):
        if sampling is None or scale_factor == 1:
            return tensor
        B, N, C = tensor.shape
        if sampling == "uniform_every":
            return tensor[:, ::scale_factor], int(N // scale_factor)
        tensor = tensor.reshape(B, H_, W_, C).permute(0, 3, 1, 2)
        new_H, new_W = int(H_ / scale_factor), int(W_ / scale_factor)
        new_N = new_H * new_W
        if sampling == "ave":
            tensor = F.interpolate(tensor, scale_factor=1 / scale_factor, mode="nearest").permute(0, 2, 3, 1)
        elif sampling == "uniform":
            tensor = tensor[:, :, ::scale_factor, ::scale_factor].permute(0, 2, 3, 1)
        elif sampling == "conv":
            tensor = self.sr(tensor).reshape(B, C, -1).permute(0, 2, 1)
            tensor = self.norm(tensor)
        else:
            raise ValueError
        return tensor.reshape(B, new_N, C).contiguous(), new_N

    def forward(self, x, mask=None, HW=None, block_id=None):
        B, N, C = x.shape
        new_N = N
        if HW is None:
            H_ = W_ = int(N ** 0.5)
        else:
            H_, W_ = HW
        qkv = self.qkv(x).reshape(B, N, 3, C)
        q, k, v = qkv.unbind(2)
        dtype = q.dtype
        q = self.q_norm(q)
        k = self.k_norm(k)
        if self.sr_ratio > 1:
            k, new_N = self.downsample_2d(k, H_, W_, self.sr_ratio, sampling=self.sampling)
            v, new_N = self.downsample_2d(v, H_, W_, self.sr_ratio, sampling=self.sampling)
        q = q.reshape(B, N, self.num_heads, C // self.num_heads).to(dtype)
        k = k.reshape(B, new_N, self.num_heads, C // self.num_heads).to(dtype)
        v = v.reshape(B, new_N, self.num_heads, C // self.num_heads).to(dtype)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p, is_causal=False)
        x = x.transpose(1, 2)
        x = x.reshape(B, N, C)  # .view in the original (after transpose: reshape)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class MultiHeadCrossAttention(nn.Module):
    """PixArt MultiHeadCrossAttention, torch (non-xformers) path, per sample: [B, N] queries, [B, L] keys."""

    def __init__(self, d_model, num_heads):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.q_linear = nn.Linear(d_model, d_model)
        self.kv_linear = nn.Linear(d_model, d_model * 2)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x, cond, mask=None):
        B, N, C = x.shape
        q = self.q_linear(x).view(B, -1, self.num_heads, self.head_dim)
        kv = self.kv_linear(cond).view(B, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if mask is not None and mask.ndim == 2:
            mask = (1 - mask.to(x.dtype)) * -10000.0
            mask = mask[:, None, None].repeat(1, self.num_heads, 1, 1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        x = x.transpose(1, 2).reshape(B, -1, C)
        return self.proj(x)


class PixArtMSBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=2.0, sampling=None, sr_ratio=1, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = AttentionKVCompress(hidden_size, num_heads=num_heads, qkv_bias=True, sampling=sampling,
                                        sr_ratio=sr_ratio, qk_norm=qk_norm)
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = PMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = nn.Identity()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, y, t, mask=None, HW=None, **kwargs):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        x = x + self.drop_path(gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa), HW=HW))
        x = x + self.cross_attn(x, y, mask)
        x = x + self.drop_path(gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)

    def forward(self, x, t):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels, hidden_size, token_num=TEXT_LEN):
        super().__init__()
        self.y_proj = PMlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels ** 0.5)

    def forward(self, caption, train, force_drop_ids=None):
        return self.y_proj(caption)


class PixArtMS(nn.Module):
    """PixArt-sigma diffusion/model/nets/PixArtMS.py PixArtMS (kv_compress on some blocks, sr_ratio=2 conv)."""

    def __init__(self, in_channels=4, hidden_size=32, patch_size=2, depth=3, num_heads=2, caption_channels=24,
                 kv_compress_layer=(1,), sr_ratio=2, sampling="conv", learn_sigma=True, qk_norm=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.base_size = 4
        self.lewei_scale = 1.0
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.hidden_size = hidden_size
        self.blocks = nn.ModuleList([
            PixArtMSBlock(hidden_size, num_heads, sampling=sampling,
                          sr_ratio=sr_ratio if i in kv_compress_layer else 1, qk_norm=qk_norm)
            for i in range(depth)])
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        c = self.out_channels
        p = self.patch_size
        x = x.reshape(shape=(x.shape[0], self.h, self.w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, self.h * p, self.w * p))

    def forward(self, x, timestep, y, mask=None, data_info=None, **kwargs):
        self.h, self.w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        pos_embed = torch.from_numpy(get_2d_sincos_pos_embed_ms(
            self.hidden_size, (self.h, self.w), lewei_scale=self.lewei_scale, base_size=self.base_size)
        ).unsqueeze(0).to(x.device).to(x.dtype)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + pos_embed
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)
        y = self.y_embedder(y, self.training)  # [B, 1, L, D]
        y = y.squeeze(1)  # per sample: [B, L, D] (the torch cross-attention path)
        for block in self.blocks:
            x = block(x, y, t0, None, (self.h, self.w))
        x = self.final_layer(x, t)
        return self.unpatchify(x)


def _pixart_build(**kw):
    def build(seed):
        return _seeded_build(seed, lambda: PixArtMS(**kw))
    return build


def _pixart_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, H, W), timestep=r.timestep(batch), y=r.randn(batch, 1, TEXT_LEN, 24))


# =========================================================================== 4. DiffiT latent (TMSA)


class TMSA(nn.Module):
    """DiffiT time-dependent MHSA: q/k/v = x W_s + x_t W_t (time token), relative position bias, manual softmax."""

    def __init__(self, dim, num_heads, grid=(H // 2, W // 2), qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.qkv_time = nn.Linear(dim, dim * 3, bias=False)
        gh, gw = grid
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * gh - 1) * (2 * gw - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(gh), torch.arange(gw)], indexing="ij"))
        cf = torch.flatten(coords, 1)
        rel = (cf[:, :, None] - cf[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += gh - 1
        rel[:, :, 1] += gw - 1
        rel[:, :, 0] *= 2 * gw - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, t):
        B, N, C = x.shape
        qkv = self.qkv(x) + self.qkv_time(t).unsqueeze(1)
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class DiffiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TMSA(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, t):
        x = x + self.attn(self.norm1(x), t)
        x = x + self.mlp(self.norm2(x))
        return x


class LatentDiffiT(nn.Module):
    def __init__(self, in_channels=4, dim=32, heads=2, depth=2, patch=2, num_classes=10, learn_sigma=True):
        super().__init__()
        self.p = patch
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (H // patch) * (W // patch), dim) * 0.5)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList([DiffiTBlock(dim, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(dim, patch, self.out_channels)

    def forward(self, x, t, y):
        B, _, Hh, Ww = x.shape
        h, w = Hh // self.p, Ww // self.p
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            x = blk(x, c)
        x = self.final_layer(x, c)
        p, oc = self.p, self.out_channels
        x = x.reshape(B, h, w, p, p, oc)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(B, oc, h * p, w * p)


def _diffit_build(seed):
    return _seeded_build(seed, lambda: LatentDiffiT())


# =========================================================================== families

_N24 = (H // 2) * (W // 2)

PLAIN_HIERARCHICAL_FAMILIES: list[Family] = [
    Family("plain_hdit", "crowsonkb/k-diffusion image_transformer_v2 HDiT (global attention levels)", _hdit_build,
           _hdit_inputs, "x", _N24, (2, 2), _same_as("x"), timestep_arg="sigma",
           notes="[B,H,W,C] grids, TokenMerge/TokenSplit(lerp), AdaRMSNorm, axial RoPE in place, cosine-sim attn"),
    Family("plain_udit", "U-DiT (Tian et al. 2024) downsampled-token self-attention U-Net", _udit_build,
           _dit_inputs, "x", H * W, (1, 1), _channels_times("x", 2), timestep_arg="t",
           notes="patch 1; pixel-unshuffled sub-maps folded into batch; conv+PixelUnshuffle down, PixelShuffle up"),
    Family("plain_pixart_sigma_kvc", "PixArt-alpha/PixArt-sigma PixArtMS (KV compress sr_ratio=2 conv in block 1)",
           _pixart_build(), _pixart_inputs, "x", _N24, (2, 2), _channels_times("x", 2), timestep_arg="timestep"),
    Family("plain_diffit", "NVlabs/DiffiT latent DiffiT (TMSA, relative position bias)", _diffit_build,
           _dit_inputs, "x", _N24, (2, 2), _channels_times("x", 2), timestep_arg="t"),
]
