"""Conformance families, continued: MMDiT-style and other DiTs written in plain PyTorch as research and
reference code writes them, unknown to diffusers:

1. ``plain_mmdit``: the SD3-paper MMDiT (sd3_impl.py style): two streams, per-stream adaLN and qkv, a
   hand-written per-head RMSNorm on q / k, joint SDPA on ``cat([txt, img], dim=2)`` of ``[B, H, L, D]``,
   split back by slicing, pooled text added to the timestep embedding, a cropped learned position table,
   an einsum unpatchify, a last block whose text stream only feeds K/V.
2. ``plain_flux``: black-forest-labs/flux model.py: packed image tokens with ids, EmbedND / rope /
   apply_rope ([2, 2] rotation matrices), double-stream blocks, single-stream blocks (linear1 split into
   qkv and the MLP input, linear2 of ``cat(attn, gelu(mlp))``), LastLayer.
3. ``plain_complex_rope``: LLaMA / Lumina-Next complex RoPE (``torch.polar``, ``view_as_complex``,
   ``view_as_real(...).flatten(3)``) on ``[B, L, H, D]``, the table a plain attribute sliced to the grid.
4. ``plain_mha``: a PixArt-alpha-like DiT with ``nn.MultiheadAttention(batch_first=True)`` for self- and
   cross-attention (traced through the sequence-first ``F.multi_head_attention_forward``: heads folded
   into the batch with a feature split, and ``[L * B, E]`` rows for the out-projection); the
   self-attention called as usual, ``attn(h, h, h)[0]``, computes the head-averaged weights and drops them.
5. ``plain_torch_encoder``: a Motion-Diffusion-Model-style DiT built from ``nn.TransformerEncoder``
   (sequence-first ``[L, B, D]``, ``norm_first=True``, GELU, dropout 0.1 in eval): the timestep embedding
   prepended as one more token in front of the patch tokens, and dropped again after the encoder.

The models return a tuple, as diffusers' ``return_dict=False`` does (``_tuple_out``). Same record, helpers
and rules as tests/conformance_models.py, which appends these entries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from conformance_models import TEXT_LEN, Family, H, W, _Rand, _same_as, _seeded_build


def _tuple_out(cls):
    """The harness reads out[0] of a tuple (diffusers' return_dict=False); the models return a bare tensor.
    A subclass with the same signature that wraps the result (forward's own signature kept for the pass)."""
    import inspect
    sig = inspect.signature(cls.forward)

    def forward(self, *args, **kwargs):
        return (cls.forward(self, *args, **kwargs),)
    forward.__signature__ = sig
    return type(cls.__name__, (cls,), {"forward": forward})


def timestep_embedding(t, dim, max_period=10000, time_factor: float = 1.0):
    """DiT / flux sinusoidal embedding (cos first)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=32):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# =========================================================================== 1. MMDiT (SD3 reference style)


class HeadRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class StreamAttention(nn.Module):
    """One stream's qkv + per-head RMS q/k norm (sd3_impl SelfAttention with pre_only / qk_norm='rms')."""

    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.ln_q = HeadRMSNorm(dim // heads)
        self.ln_k = HeadRMSNorm(dim // heads)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x):
        b, l, d = x.shape
        qkv = self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # [B, H, L, D]
        return self.ln_q(q), self.ln_k(k), v


class DismantledBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2.0, pre_only=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(dim, heads, pre_only)
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim))
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def pre_attention(self, x, c):
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, heads)

    def forward(self, context, x, c):
        (cq, ck, cv), c_inter = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_inter = self.x_block.pre_attention(x, c)
        q = torch.cat([cq, xq], dim=2)
        k = torch.cat([ck, xk], dim=2)
        v = torch.cat([cv, xv], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v)            # [B, H, Lt + N, D]
        b, h, l, d = attn.shape
        attn = attn.transpose(1, 2).reshape(b, l, h * d)
        txt_len = context.shape[1]
        c_attn, x_attn = attn[:, :txt_len], attn[:, txt_len:]
        context = None if self.context_block.pre_only else self.context_block.post_attention(c_attn, *c_inter)
        x = self.x_block.post_attention(x_attn, *x_inter)
        return context, x


class MMDiT(nn.Module):
    def __init__(self, in_channels=4, dim=32, heads=2, depth=2, patch=2, text_dim=24, pooled_dim=20,
                 pos_embed_max_size=8):
        super().__init__()
        self.patch, self.out_channels = patch, in_channels
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed_max_size = pos_embed_max_size
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, pos_embed_max_size ** 2, dim))
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context_embedder = nn.Linear(text_dim, dim)
        self.joint_blocks = nn.ModuleList(JointBlock(dim, heads, pre_only=(i == depth - 1)) for i in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(dim, patch * patch * in_channels)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def cropped_pos_embed(self, hw):
        p = self.patch
        h, w = hw[0] // p, hw[1] // p
        m = self.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        spatial = self.pos_embed.reshape(1, m, m, -1)[:, top:top + h, left:left + w, :]
        return spatial.reshape(1, -1, spatial.shape[-1])

    def unpatchify(self, x, hw):
        c, p = self.out_channels, self.patch
        h, w = hw[0] // p, hw[1] // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, context):
        hw = x.shape[-2:]
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.cropped_pos_embed(hw)
        c = self.t_embedder(t) + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, x = block(context, x, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))
        return self.unpatchify(x, hw)


def _mmdit_build(seed):
    # pos_embed_max_size 8 covers the 4 x 6 grid (sd3 crops a 192 x 192 table)
    return _seeded_build(seed, lambda: _tuple_out(MMDiT)(pos_embed_max_size=8))


def _mmdit_inputs(model, batch, seed):
    r = _Rand(seed)
    # sd3_impl's sampling loop: model(x, timestep * 1000, c_crossattn=context, y=pooled) -> forward(x, t, y, context)
    return dict(x=r.randn(batch, 4, H, W), t=r.timestep(batch), y=r.randn(batch, 20),
                context=r.randn(batch, TEXT_LEN, 24))


# =========================================================================== 2. Flux (black-forest-labs/flux)


def rope(pos, dim, theta):
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos, omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    out = out.reshape(*out.shape[:-1], 2, 2)          # rearrange "b n d (i j) -> b n d i j"
    return out.float()


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, l, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, h * d)   # rearrange "B H L D -> B L (H D)"


def split_qkv(qkv, heads):
    b, l, _ = qkv.shape                                  # rearrange "B L (K H D) -> K B H L D"
    return qkv.reshape(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids):
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class FluxRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = FluxRMSNorm(dim)
        self.key_norm = FluxRMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class FluxSelfAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.is_double else None)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = FluxSelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = FluxSelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))

    def forward(self, img, txt, vec, pe):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_modulated = self.img_norm1(img)
        img_modulated = (1 + img_mod1[1]) * img_modulated + img_mod1[0]
        img_qkv = self.img_attn.qkv(img_modulated)
        img_q, img_k, img_v = split_qkv(img_qkv, self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_modulated = self.txt_norm1(txt)
        txt_modulated = (1 + txt_mod1[1]) * txt_modulated + txt_mod1[0]
        txt_qkv = self.txt_attn.qkv(txt_modulated)
        txt_q, txt_k, txt_v = split_qkv(txt_qkv, self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod1[2] * self.img_attn.proj(img_attn)
        img = img + img_mod2[2] * self.img_mlp((1 + img_mod2[1]) * self.img_norm2(img) + img_mod2[0])
        txt = txt + txt_mod1[2] * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2[2] * self.txt_mlp((1 + txt_mod2[1]) * self.txt_norm2(txt) + txt_mod2[0])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_scale=None):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod[1]) * self.pre_norm(x) + mod[0]
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_qkv(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + mod[2] * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class Flux(nn.Module):
    def __init__(self, in_channels=16, vec_in_dim=20, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
                 num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6), theta=10_000, qkv_bias=True,
                 guidance_embed=True):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        pe_dim = hidden_size // num_heads
        assert sum(axes_dim) == pe_dim
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=theta, axes_dim=list(axes_dim))
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=32, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, self.hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=32, hidden_dim=self.hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, self.hidden_size)
        self.guidance_embed = guidance_embed
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias)
                                           for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden_size, num_heads, mlp_ratio)
                                           for _ in range(depth_single_blocks))
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("Input img and txt tensors must have 3 dimensions.")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 32, time_factor=1000.0))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 32, time_factor=1000.0))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1]:, ...]
        return self.final_layer(img, vec)


def _flux_bfl_build(seed):
    return _seeded_build(seed, lambda: _tuple_out(Flux)())


def _flux_bfl_inputs(model, batch, seed):
    """flux/sampling.py prepare(): the 16-ch latent packed 2x2 ("b c (h ph) (w pw) -> b (h w) (c ph pw)"),
    img_ids [B, h*w, 3] with rows / cols in axes 1 / 2, txt_ids zeros [B, L, 3]; denoise() passes
    t_vec = full((B,), t_curr) in [0, 1] and guidance_vec = full((B,), guidance)."""
    r = _Rand(seed)
    h, w = H // 2, W // 2
    latent = r.randn(batch, 4, H, W)
    img = latent.reshape(batch, 4, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, h * w, 16)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = img_ids[..., 1] + torch.arange(h)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.arange(w)[None, :]
    img_ids = img_ids.reshape(1, h * w, 3).repeat(batch, 1, 1)
    t = r.timestep(1, 1.0).item()
    return dict(img=img, img_ids=img_ids, txt=r.randn(batch, TEXT_LEN, 24), txt_ids=torch.zeros(batch, TEXT_LEN, 3),
                timesteps=torch.full((batch,), t), y=r.randn(batch, 20), guidance=torch.full((batch,), 4.0))


# =========================================================================== 3. complex RoPE DiT (LLaMA / Lumina-Next)


def precompute_freqs_cis_2d(dim, end, theta=10000.0):
    """Lumina-Next NextDiT.precompute_freqs_cis: half the rotary pairs for rows, half for columns."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim // 2, 2)[: dim // 4].float() / (dim // 2)))
    t = torch.arange(end, dtype=torch.float32)
    freqs = torch.outer(t, freqs)                                 # [end, dim // 4]
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)        # complex64
    freqs_h = freqs_cis.view(end, 1, dim // 4, 1).repeat(1, end, 1, 1)
    freqs_w = freqs_cis.view(1, end, dim // 4, 1).repeat(end, 1, 1, 1)
    return torch.cat([freqs_h, freqs_w], dim=-1).flatten(2)       # [end, end, dim // 2]


def apply_rotary_emb(xq, xk, freqs_cis):
    """LLaMA: xq [B, L, H, D], freqs_cis [L, D / 2] complex."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[None, :, None, :]                      # reshape_for_broadcast
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class RopeAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n_heads, self.head_dim = heads, dim // heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k_norm = nn.LayerNorm(dim)

    def forward(self, x, freqs_cis):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.q_norm(self.wq(x)), self.k_norm(self.wk(x)), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RopeBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attention = RopeAttention(dim, heads)
        self.feed_forward = SwiGLU(dim, 2 * dim)
        self.attention_norm = RMSNorm(dim)
        self.ffn_norm = RMSNorm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))

    def forward(self, x, freqs_cis, adaln_input):
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
        x = x + gate_msa.unsqueeze(1).tanh() * self.attention(
            modulate(self.attention_norm(x), torch.zeros_like(scale_msa), scale_msa), freqs_cis)
        return x + gate_mlp.unsqueeze(1).tanh() * self.feed_forward(
            modulate(self.ffn_norm(x), torch.zeros_like(scale_mlp), scale_mlp))


class ComplexRopeDiT(nn.Module):
    def __init__(self, in_channels=4, dim=32, heads=2, depth=2, patch=2, max_len=16, num_classes=10):
        super().__init__()
        self.patch, self.in_channels = patch, in_channels
        self.x_embedder = nn.Linear(patch * patch * in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.layers = nn.ModuleList(RopeBlock(dim, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(dim, patch * patch * in_channels)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim))
        # Lumina-Next / LLaMA keep freqs_cis as a plain attribute, not a buffer
        self.freqs_cis = precompute_freqs_cis_2d(dim // heads, max_len)

    def patchify(self, x):
        b, c, h, w = x.shape
        p = self.patch
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        return x, (h // p, w // p)

    def unpatchify(self, x, hw):
        b = x.shape[0]
        p = self.patch
        h, w = hw
        return x.view(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)

    def forward(self, x, t, y):
        self.freqs_cis = self.freqs_cis.to(x.device)
        x, (h, w) = self.patchify(x)
        x = self.x_embedder(x)
        freqs_cis = self.freqs_cis[:h, :w].flatten(0, 1)
        adaln_input = self.t_embedder(t) + self.y_embedder(y)
        for layer in self.layers:
            x = layer(x, freqs_cis, adaln_input)
        scale = self.final_adaLN(adaln_input)
        x = self.final_linear(modulate(self.norm_final(x), torch.zeros_like(scale), scale))
        return self.unpatchify(x, (h, w))


def _complex_rope_build(seed):
    return _seeded_build(seed, lambda: _tuple_out(ComplexRopeDiT)())


def _complex_rope_inputs(model, batch, seed):
    r = _Rand(seed)
    # Lumina-Next: t in [0, 1]
    return dict(x=r.randn(batch, 4, H, W), t=r.timestep(batch, 1.0), y=r.randint(10, batch))


# =========================================================================== 4. nn.MultiheadAttention PixArt-like


def get_2d_sincos_pos_embed(dim, h, w):
    """torch port of DiT/PixArt get_2d_sincos_pos_embed (grid_w first, as the numpy meshgrid)."""
    gh = torch.arange(h, dtype=torch.float32)
    gw = torch.arange(w, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(gw, gh, indexing="xy")       # each [h, w]

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], dim=1)   # [h * w, dim]


class PixArtMHABlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, key_padding_mask=None):
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn(h, h, h)[0]  # the default need_weights=True: averaged weights dropped
        x = x + self.cross_attn(x, y, y, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class MHAPixArt(nn.Module):
    def __init__(self, in_channels=4, dim=32, heads=2, depth=2, patch=2, caption_channels=24):
        super().__init__()
        self.patch, self.in_channels, self.out_channels, self.dim = patch, in_channels, 2 * in_channels, dim
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.y_embedder = nn.Sequential(nn.Linear(caption_channels, dim), nn.GELU(approximate="tanh"),
                                        nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(PixArtMHABlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(dim, patch * patch * self.out_channels)
        self.final_scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, timestep, y, mask=None):
        b, _, height, width = x.shape
        p = self.patch
        h, w = height // p, width // p
        pos = get_2d_sincos_pos_embed(self.dim, h, w).unsqueeze(0).to(x)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + pos
        t = self.t_embedder(timestep)
        t0 = self.t_block(t)
        y = self.y_embedder(y)
        kpm = None if mask is None else ~mask.bool()
        for block in self.blocks:
            x = block(x, y, t0, kpm)
        shift, scale = (self.final_scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = self.final_linear(self.final_norm(x) * (1 + scale) + shift)
        x = x.reshape(b, h, w, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, self.out_channels, h * p, w * p)


def _mha_build(seed):
    return _seeded_build(seed, lambda: _tuple_out(MHAPixArt)())


def _mha_inputs(model, batch, seed):
    r = _Rand(seed)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    mask[:, -2:] = 0   # padded caption tokens
    return dict(x=r.randn(batch, 4, H, W), timestep=r.timestep(batch), y=r.randn(batch, TEXT_LEN, 24), mask=mask)


class TorchEncoderDiT(nn.Module):
    """nn.TransformerEncoder over ``[t token, patch tokens]``, sequence first (MDM's ``seqTransEncoder``)."""

    def __init__(self, in_channels=4, dim=32, heads=2, depth=2, patch=2):
        super().__init__()
        self.patch, self.in_channels = patch, in_channels
        self.x_embedder = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.t_embedder = TimestepEmbedder(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, activation="gelu", norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_linear = nn.Linear(dim, patch * patch * in_channels)

    def forward(self, x, timestep):
        b, _, height, width = x.shape
        p = self.patch
        h, w = height // p, width // p
        pos = get_2d_sincos_pos_embed(self.x_embedder.out_channels, h, w).unsqueeze(1).to(x)
        tokens = self.x_embedder(x).flatten(2).permute(2, 0, 1) + pos  # [N, B, D]
        seq = torch.cat([self.t_embedder(timestep)[None], tokens], 0)  # the timestep token first
        out = self.final_linear(self.encoder(seq)[1:]).permute(1, 0, 2)
        out = out.reshape(b, h, w, p, p, self.in_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, self.in_channels, h * p, w * p)


def _torch_encoder_build(seed):
    return _seeded_build(seed, lambda: _tuple_out(TorchEncoderDiT)())


def _torch_encoder_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(x=r.randn(batch, 4, H, W), timestep=r.timestep(batch))


def _double_channels(kw):
    s = list(kw["x"].shape)
    s[1] *= 2
    return tuple(s)


_N = (H // 2) * (W // 2)

PLAIN_MMDIT_FAMILIES: list[Family] = [
    Family("plain_mmdit", "SD3-paper MMDiT (sd3_impl.py style)", _mmdit_build, _mmdit_inputs, "x", _N, (2, 2),
           _same_as("x"), context_before=TEXT_LEN, timestep_arg="t",
           notes="joint attention text first via cat on dim 2 of [B,H,L,D]; hand-written per-head RMSNorm; "
                 "cropped learned pos-embed; last block context_pre_only; einsum unpatchify"),
    Family("plain_flux", "black-forest-labs/flux Flux", _flux_bfl_build, _flux_bfl_inputs, "img", _N, None,
           _same_as("img"), context_before=TEXT_LEN, timestep_arg="timesteps",
           notes="packed tokens; batched ids [B, N, 3]; rope as [..., 2, 2] matrices; single blocks with fused "
                 "linear1 (qkv | mlp) and linear2 on cat(attn, mlp)"),
    Family("plain_complex_rope", "LLaMA / Lumina-Next complex RoPE DiT", _complex_rope_build, _complex_rope_inputs, "x",
           _N, (2, 2), _same_as("x"), timestep_arg="t",
           notes="view_as_complex RoPE on [B, L, H, D]; freqs_cis plain attribute sliced [:h, :w]; "
                 "patchify by view/permute + Linear"),
    Family("plain_mha", "PixArt-like DiT with nn.MultiheadAttention", _mha_build, _mha_inputs, "x", _N, (2, 2),
           _double_channels, notes="nn.MultiheadAttention(batch_first) self and cross; key_padding_mask"),
    Family("plain_torch_encoder", "GuyTevet/motion-diffusion-model-style DiT on nn.TransformerEncoder",
           _torch_encoder_build, _torch_encoder_inputs, "x", _N, (2, 2), _same_as("x"),
           notes="nn.TransformerEncoder(norm_first, gelu, dropout in eval), sequence first [L, B, D]; the "
                 "timestep embedding prepended as a token and dropped after the encoder"),
]
