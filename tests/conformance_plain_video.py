"""Conformance families, continued: video, 1D-audio and input/output conventions of DiTs written in plain
PyTorch, unknown to diffusers: a full-3D video DiT with a Conv3d patch embedding (Open-Sora-Plan /
CogVideoX-plain), Latte's factorised blocks (frames folded into the batch: tokens are tubes), Stable-Audio /
ACE-Step-style 1D DiTs (a ConvTranspose1d or a reshape unpatchify), a DiT on channels-last audio tokens,
forwards that return a dict or a tuple with a per-sample auxiliary output, run under ``torch.autocast``, or
interpolate their position table to the latent's size; and Open-Sora's STDiT, whose frames are folded into
the batch only after the token sequence exists (tokens are tubes led by the frames: one ``[B, F * S, D]``
sequence, rows ``(frame, token)``).

Same record, helpers and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn

from conformance_models import TEXT_LEN, VH, VW, F, Family, H, W, _Rand, _same_as, _seeded_build

D, HEADS, TXT = 32, 2, 16


# --------------------------------------------------------------------------- shared pieces (DiT reference code)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """facebookresearch/DiT TimestepEmbedder."""

    def __init__(self, dim, freq=64):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.freq))


class Attention(nn.Module):
    """timm-style packed-qkv self-attention (SDPA)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = Fn.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """PixArt / Open-Sora MultiHeadCrossAttention (per-sample form, no xformers BlockDiagonalMask)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cond):
        b, n, c = x.shape
        d = c // self.heads
        q = self.q_linear(x).view(b, n, self.heads, d).transpose(1, 2)
        kv = self.kv_linear(cond).view(b, -1, 2, self.heads, d)
        k, v = kv.unbind(2)
        x = Fn.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, ratio=2):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block (+ optional PixArt-style cross-attention after self-attention)."""

    def __init__(self, dim, heads, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross = CrossAttention(dim, heads) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, ctx=None):
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_msa, sc_msa))
        if self.cross is not None:
            x = x + self.cross(x, ctx)
        x = x + g_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_mlp, sc_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_1d(dim, pos):
    """MAE / DiT get_1d_sincos_pos_embed_from_grid, in torch (float64 as numpy does)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim, h, w):
    gh, gw = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, gh), sincos_1d(dim // 2, gw)], dim=1)  # [h*w, dim]


def sincos_3d(dim, t, h, w):
    """CogVideoX / Open-Sora-Plan get_3d_sincos_pos_embed: 3/4 spatial, 1/4 temporal, concatenated."""
    spatial = sincos_2d(dim * 3 // 4, h, w)                          # [h*w, 3D/4]
    temporal = sincos_1d(dim // 4, torch.arange(t, dtype=torch.float64))  # [t, D/4]
    spatial = spatial[None].expand(t, -1, -1)
    temporal = temporal[:, None].expand(-1, h * w, -1)
    return torch.cat([temporal, spatial], dim=-1).reshape(t * h * w, dim).float()  # [t*h*w, dim]


def _build(make):
    return lambda seed: _seeded_build(seed, make)


# --------------------------------------------------------------------------- 1. full-3D video DiT


class Video3DDiT(nn.Module):
    """Open-Sora-Plan / CogVideoX-plain style: Conv3d patch (1, 2, 2), full 3D self-attention over F*H*W tokens,
    3D sin-cos positions computed in forward from the grid shape, cross-attention to text, unpatchify by
    view + permute back to [B, C, F, H, W]."""

    def __init__(self, c=4, patch=(1, 2, 2), depth=2):
        super().__init__()
        self.c, self.patch = c, patch
        self.x_embedder = nn.Conv3d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Sequential(nn.Linear(TXT, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS, cross=True) for _ in range(depth))
        self.final_layer = FinalLayer(D, math.prod(patch) * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, hh, ww = hidden_states.shape
        pt, ph, pw = self.patch
        t_, h_, w_ = f // pt, hh // ph, ww // pw
        x = self.x_embedder(hidden_states)                      # [B, D, t, h, w]
        x = x.flatten(2).transpose(1, 2)                        # [B, N, D]
        x = x + sincos_3d(D, t_, h_, w_).to(x.dtype)[None]
        cond = self.t_embedder(timestep)
        ctx = self.y_embedder(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, cond, ctx)
        x = self.final_layer(x, cond)                           # [B, N, pt*ph*pw*C]
        x = x.view(b, t_, h_, w_, pt, ph, pw, c)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                   # b c t pt h ph w pw
        return x.reshape(b, c, f, hh, ww)


def _video_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT))


# --------------------------------------------------------------------------- 2. Latte-style factorised video DiT


class LatteDiT(nn.Module):
    """maxin-cn/Latte latte.py (variant 1, alternating spatial / temporal blocks): frames folded into the batch."""

    def __init__(self, c=4, patch=2, depth=4, frames=F):
        super().__init__()
        self.c, self.patch = c, patch
        self.x_embedder = nn.Conv2d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Linear(TXT, D)
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS, cross=(i % 2 == 0)) for i in range(depth))
        self.temp_embed = nn.Parameter(sincos_1d(D, torch.arange(frames, dtype=torch.float64)).float()[None])
        self.final_layer = FinalLayer(D, patch * patch * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, hh, ww = hidden_states.shape
        p = self.patch
        h_, w_ = hh // p, ww // p
        x = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * f, c, hh, ww)     # rearrange b c f h w -> (b f) c h w
        x = self.x_embedder(x).flatten(2).transpose(1, 2)                      # [(B F), N, D]
        x = x + sincos_2d(D, h_, w_).float()[None]
        n = x.shape[1]
        t = self.t_embedder(timestep)                                          # [B, D]
        t_spatial = t.repeat_interleave(f, dim=0)                              # [(B F), D]
        t_temp = t.repeat_interleave(n, dim=0)                                 # [(B N), D]
        ctx = self.y_embedder(encoder_hidden_states).repeat_interleave(f, dim=0)
        for i in range(0, len(self.blocks), 2):
            x = self.blocks[i](x, t_spatial, ctx)                              # spatial: [(B F), N, D]
            x = x.reshape(b, f, n, D).permute(0, 2, 1, 3).reshape(b * n, f, D)  # (b f) n d -> (b n) f d
            if i == 0:
                x = x + self.temp_embed
            x = self.blocks[i + 1](x, t_temp)                                  # temporal: [(B N), F, D]
            x = x.reshape(b, n, f, D).permute(0, 2, 1, 3).reshape(b * f, n, D)  # (b n) f d -> (b f) n d
        x = self.final_layer(x, t_spatial)
        x = x.reshape(b * f, h_, w_, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b * f, c, hh, ww)
        return x.reshape(b, f, c, hh, ww).permute(0, 2, 1, 3, 4)              # (b f) c h w -> b c f h w


# --------------------------------------------------------------------------- 3. 1D audio / sequence DiTs

L1 = 24  # latent length


class AudioDiT1D(nn.Module):
    """Stable-Audio-Open / ACE-Step-style: latent [B, C, L], Conv1d patch (kernel = stride = 2), DiT blocks with
    cross-attention, unpatchify by ConvTranspose1d ("convT") or by reshape + permute ("reshape")."""

    def __init__(self, c=8, patch=2, depth=2, out="convT"):
        super().__init__()
        self.c, self.patch, self.out = c, patch, out
        self.proj_in = nn.Conv1d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Linear(TXT, D)
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS, cross=True) for _ in range(depth))
        self.norm_out = nn.LayerNorm(D)
        if out == "convT":
            self.proj_out = nn.ConvTranspose1d(D, c, patch, stride=patch)
        else:
            self.proj_out = nn.Linear(D, patch * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, length = hidden_states.shape
        x = self.proj_in(hidden_states).transpose(1, 2)                        # [B, L/2, D]
        x = x + sincos_1d(D, torch.arange(x.shape[1], dtype=torch.float64)).float()[None]
        cond = self.t_embedder(timestep)
        ctx = self.y_embedder(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, cond, ctx)
        x = self.norm_out(x)
        if self.out == "convT":
            return self.proj_out(x.transpose(1, 2))                            # [B, C, L]
        x = self.proj_out(x).reshape(b, length // self.patch, self.patch, c)   # [B, L/2, p, C]
        return x.permute(0, 3, 1, 2).reshape(b, c, length)


class TokenAudioDiT(nn.Module):
    """The latent already channels-last as tokens [B, L, C] (DiffRhythm / F5-TTS style): Linear in, Linear out."""

    def __init__(self, c=8, depth=2):
        super().__init__()
        self.proj_in = nn.Linear(c, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Linear(TXT, D)
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS, cross=True) for _ in range(depth))
        self.final_layer = FinalLayer(D, c)

    def forward(self, x, time, cond):
        h = self.proj_in(x)
        h = h + sincos_1d(D, torch.arange(h.shape[1], dtype=torch.float64)).float()[None]
        c = self.t_embedder(time)
        ctx = self.y_embedder(cond)
        for block in self.blocks:
            h = block(h, c, ctx)
        return self.final_layer(h, c)


def _audio_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 8, L1), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, TXT))


def _token_audio_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, L1, 8), time=r.timestep(batch, 1.0), cond=r.randn(batch, TEXT_LEN, TXT))


# --------------------------------------------------------------------------- 4. input / output conventions


class ConventionDiT(nn.Module):
    """facebookresearch/DiT / SiT forward(x, t, y) (class-conditional), in several calling conventions:

    - "float_t": the sampler calls model(x, 0.5) with a Python-float timestep (SiT/flow-matching loops that
      pass `t` as a float and broadcast it inside);
    - "dict_out": returns {"sample": out};
    - "tuple_aux": returns (out, aux) with aux a per-sample scalar (a logvar-style uncertainty head on the timestep
      embedding plus a pooled-token head);
    - "autocast": the forward runs under torch.autocast("cpu", dtype=torch.bfloat16) and casts the result back;
    - "interp_pos": a learned positional table [1, D, 4, 4] resized with F.interpolate to the latent's grid
      (dynamic resolution).
    """

    def __init__(self, mode, c=4, patch=2, depth=2, classes=10):
        super().__init__()
        self.mode, self.c, self.patch = mode, c, patch
        self.x_embedder = nn.Conv2d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Embedding(classes + 1, D)
        self.blocks = nn.ModuleList(DiTBlock(D, HEADS) for _ in range(depth))
        self.final_layer = FinalLayer(D, patch * patch * c)
        if mode == "interp_pos":
            self.pos_embed = nn.Parameter(torch.randn(1, D, 4, 4) * 0.5)
        if mode == "tuple_aux":
            self.logvar = nn.Linear(D, 1)
            self.pool_head = nn.Linear(D, 1)

    def unpatchify(self, x, h_, w_):
        p, c = self.patch, self.c
        x = x.reshape(x.shape[0], h_, w_, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)  # DiT's own unpatchify
        return x.reshape(x.shape[0], c, h_ * p, w_ * p)

    def body(self, x, t, y):
        b, c, hh, ww = x.shape
        h_, w_ = hh // self.patch, ww // self.patch
        if not torch.is_tensor(t):
            t = torch.full((b,), float(t), device=x.device)
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        if self.mode == "interp_pos":
            pos = Fn.interpolate(self.pos_embed, size=(h_, w_), mode="bicubic", align_corners=False)
            h = h + pos.flatten(2).transpose(1, 2)
        else:
            h = h + sincos_2d(D, h_, w_).float()[None]
        temb = self.t_embedder(t * 1000)
        cond = temb + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, cond)
        out = self.unpatchify(self.final_layer(h, cond), h_, w_)
        if self.mode == "tuple_aux":
            aux = self.logvar(temb).squeeze(-1) + self.pool_head(h.mean(dim=1)).squeeze(-1)  # [B]
            return out, aux
        return out

    def forward(self, x, t, y):
        if self.mode == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.body(x, t, y)
            return out.float()
        out = self.body(x, t, y)
        if self.mode == "dict_out":
            return {"sample": out}
        return out


def _conv_inputs(float_t):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        t = 0.5 if float_t else r.timestep(batch, 1.0)
        return dict(x=r.randn(batch, 4, H, W), t=t, y=r.randint(10, batch))
    return inputs


_NV3 = F * (VH // 2) * (VW // 2)   # 48
_N2 = (H // 2) * (W // 2)          # 24

PLAIN_VIDEO_FAMILIES: list[Family] = [
    Family("plain_video3d", "Open-Sora-Plan / CogVideoX-plain full-3D video DiT (Conv3d patch)", _build(Video3DDiT),
           _video_inputs, "hidden_states", _NV3, (1, 2, 2), _same_as("hidden_states"),
           notes="full 3D self-attention over F*H*W tokens, 3D sincos computed in forward, cross-attention to text"),
    Family("plain_latte", "maxin-cn/Latte Latte (plain)", _build(LatteDiT), _video_inputs, "hidden_states",
           (VH // 2) * (VW // 2), (2, 2), _same_as("hidden_states"),
           notes="frames folded into the batch; spatial [(B F), N, D] / temporal [(B N), F, D] blocks alternate"),
    Family("plain_audio_conv_transpose", "Stable-Audio/ACE-Step-style 1D DiT, ConvTranspose1d out", _build(AudioDiT1D),
           _audio_inputs, "hidden_states", L1 // 2, (2,), _same_as("hidden_states")),
    Family("plain_audio_reshape", "Stable-Audio/ACE-Step-style 1D DiT, reshape unpatchify",
           _build(lambda: AudioDiT1D(out="reshape")), _audio_inputs, "hidden_states", L1 // 2, (2,),
           _same_as("hidden_states")),
    Family("plain_audio_tokens", "DiffRhythm/F5-TTS-style DiT on channels-last tokens [B, L, C]", _build(TokenAudioDiT),
           _token_audio_inputs, "x", L1, None, _same_as("x"), timestep_arg="time"),
    Family("plain_dict_out", "DiT returning {'sample': out}", _build(lambda: ConventionDiT("dict_out")),
           _conv_inputs(False), "x", _N2, (2, 2), _same_as("x"), timestep_arg="t"),
    Family("plain_tuple_aux", "EDM2-style DiT returning (out, logvar[B])", _build(lambda: ConventionDiT("tuple_aux")),
           _conv_inputs(False), "x", _N2, (2, 2), _same_as("x"), timestep_arg="t"),
    Family("plain_autocast", "DiT with torch.autocast(bf16) inside forward", _build(lambda: ConventionDiT("autocast")),
           _conv_inputs(False), "x", _N2, (2, 2), _same_as("x"), timestep_arg="t"),
    Family("plain_interp_pos", "DiT with F.interpolate'd positional table (dynamic resolution)",
           _build(lambda: ConventionDiT("interp_pos")), _conv_inputs(False), "x", _N2, (2, 2), _same_as("x"),
           timestep_arg="t"),
]


# --------------------------------------------------------------------------- 2b. Open-Sora STDiT: token sequence first, then folded


class STDiT(nn.Module):
    """hpcaitech/Open-Sora STDiT (v1.0/1.1) / STDiT3 (v1.2): Conv3d patch embed to one [B, T*S, D] sequence, then each
    block does rearrange("B (T S) C -> (B T) S C") for spatial attention and "B (T S) C -> (B S) T C" for temporal
    attention, cross-attention over the whole sequence, adaLN-single (t_block + per-block scale_shift_table)."""

    def __init__(self, c=4, patch=(1, 2, 2), depth=2, frames=F, pos_split=True):
        super().__init__()
        self.c, self.patch, self.pos_split = c, patch, pos_split
        self.x_embedder = nn.Conv3d(c, D, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = nn.Linear(TXT, D)
        self.temp_embed = nn.Parameter(sincos_1d(D, torch.arange(frames, dtype=torch.float64)).float()[None])
        self.norms = nn.ModuleList(nn.LayerNorm(D, elementwise_affine=False, eps=1e-6) for _ in range(2 * depth))
        self.attn = nn.ModuleList(Attention(D, HEADS) for _ in range(depth))
        self.attn_temp = nn.ModuleList(Attention(D, HEADS) for _ in range(depth))
        self.cross = nn.ModuleList(CrossAttention(D, HEADS) for _ in range(depth))
        self.mlp = nn.ModuleList(Mlp(D) for _ in range(depth))
        self.scale_shift_table = nn.Parameter(torch.randn(depth, 6, D) / D ** 0.5)
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.final_linear = nn.Linear(D, math.prod(patch) * c)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, hh, ww = hidden_states.shape
        pt, ph, pw = self.patch
        nt, nh, nw = f // pt, hh // ph, ww // pw
        s = nh * nw
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2)          # [B, T*S, D]
        if self.pos_split:
            x = x.reshape(b, nt, s, D) + sincos_2d(D, nh, nw).float()[None, None]  # B (T S) C -> B T S C, + pos
            x = x.reshape(b, nt * s, D)
        else:  # the same positions added on the flat sequence
            x = x + sincos_2d(D, nh, nw).float().repeat(nt, 1)[None]
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)                                                   # [B, 6D]
        ctx = self.y_embedder(encoder_hidden_states)
        for i in range(len(self.attn)):
            sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = (self.scale_shift_table[i][None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)
            x_m = self.norms[2 * i](x) * (1 + sc_msa) + sh_msa
            x_s = x_m.reshape(b * nt, s, D)                                    # B (T S) C -> (B T) S C
            x_s = self.attn[i](x_s).reshape(b, nt * s, D)
            x = x + g_msa * x_s
            x_t = x.reshape(b, nt, s, D).permute(0, 2, 1, 3).reshape(b * s, nt, D)  # B (T S) C -> (B S) T C
            if i == 0:
                x_t = x_t + self.temp_embed
            x_t = self.attn_temp[i](x_t)
            x = x + g_msa * x_t.reshape(b, s, nt, D).permute(0, 2, 1, 3).reshape(b, nt * s, D)
            x = x + self.cross[i](x, ctx)
            x = x + g_mlp * self.mlp[i](self.norms[2 * i + 1](x) * (1 + sc_mlp) + sh_mlp)
        shift, scale = (self.final_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(self.final_norm(x) * (1 + scale) + shift)
        x = x.view(b, nt, nh, nw, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f, hh, ww)


PLAIN_VIDEO_FAMILIES.append(
    Family("plain_stdit", "hpcaitech/Open-Sora STDiT (sequence first, then (B T) S / (B S) T folds)", _build(STDiT),
           _video_inputs, "hidden_states", (VH // 2) * (VW // 2), (2, 2), _same_as("hidden_states"),
           notes="tokens [B, T*S, D] from the patch embedding; spatial / temporal attention fold part of the token "
                 "axis into the batch: tokens are tubes through the frames (num_tokens = tokens per frame), "
                 "the sequence holds rows (frame, token)"))

PLAIN_VIDEO_FAMILIES.append(
    Family("plain_stdit_flatpos", "Open-Sora STDiT, positions added on the flat [B, T*S, D] sequence",
           _build(lambda: STDiT(pos_split=False)), _video_inputs, "hidden_states", (VH // 2) * (VW // 2), (2, 2),
           _same_as("hidden_states"), notes="the flat position table is a side input gathered at the tube rows"))
