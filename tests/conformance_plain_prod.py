"""Plain-PyTorch DiTs written as four production codebases write them (no diffusers class).

- Tencent/HunyuanVideo ``hyvideo/modules/models.py`` HYVideoDiffusionTransformer: Conv3d patch
  embed, a token refiner (masked self-attention over the text), double-stream blocks (RoPE on the
  image q/k, joint attention with flash-varlen's mask written for SDPA), single-stream blocks
  (one linear split into qkv and the MLP input), an einsum unpatchify, a dict output;
- Lightricks/LTX-Video ``Transformer3DModel``: tokens in, RoPE computed in the forward from
  fractional ``indices_grid`` coordinates, q/k RMSNorm over all heads, adaLN-single, masked
  cross-attention; and with a per-token timestep (image-to-video conditioning);
- Tencent/HunyuanDiT ``HunYuanDiT``: hand-written attention, RoPE tables as inputs, cross-attention
  with RoPE on q only, long skips (``skip_linear(skip_norm(cat([x, skip])))``), AttentionPool,
  size / style conditions, learned sigma;
- Alpha-VLLM/Lumina-Image-2.0 ``NextDiT``: as written (per-sample joint layout from
  ``cap_mask.sum().tolist()``, captions of different lengths: captured for the mask's values, each
  sample's rows reordered image first by passes/sample_offsets.py), and batched with
  padded captions kept in the sequence (context and noise refiners, 3-axis RoPE, GQA by repeat,
  sandwich norms, tanh gates).

Forwards follow the official code (einops rearranges written as reshape / permute). Weights are
random (no zero-init), so attention is visible in every output.
"""
from __future__ import annotations

from conformance_models import TEXT_LEN, VH, VW, Family, F, H, W, _channels_times, _Rand, _same_as, _seeded_build

import math

import torch
import torch.nn.functional as Fn
from torch import nn


def _tuple_out(cls):
    import inspect
    sig = inspect.signature(cls.forward)

    def forward(self, *args, **kwargs):
        return (cls.forward(self, *args, **kwargs),)
    forward.__signature__ = sig
    return type(cls.__name__, (cls,), {"forward": forward})


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        device=t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=64, max_period=10000, out_size=None):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, out_size or hidden_size))

    def forward(self, t):
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period).type(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class RMSNorm(nn.Module):
    """hyvideo / Lumina RMSNorm (float compute, type_as, weight)."""

    def __init__(self, dim, elementwise_affine=True, eps=1e-6):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        if hasattr(self, "weight"):
            output = output * self.weight
        return output


# =========================================================================== 1. HunyuanVideo (official)


def hy_modulate(x, shift=None, scale=None):
    if scale is None and shift is None:
        return x
    elif shift is None:
        return x * (1 + scale.unsqueeze(1))
    elif scale is None:
        return x + shift.unsqueeze(1)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def apply_gate(x, gate=None, tanh=False):
    if gate is None:
        return x
    if tanh:
        return x * gate.unsqueeze(1).tanh()
    return x * gate.unsqueeze(1)


def hy_rotate_half(x):
    x_real, x_imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, S, H, D//2]
    return torch.stack([-x_imag, x_real], dim=-1).flatten(3)


def hy_reshape_for_broadcast(freqs_cis, x, head_first=False):
    ndim = x.ndim
    if head_first:
        assert freqs_cis[0].shape == (x.shape[-2], x.shape[-1])
        shape = [d if i == ndim - 2 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    else:
        assert freqs_cis[0].shape == (x.shape[1], x.shape[-1])
        shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis[0].view(*shape), freqs_cis[1].view(*shape)


def hy_apply_rotary_emb(xq, xk, freqs_cis, head_first=False):
    xk_out = None
    cos, sin = hy_reshape_for_broadcast(freqs_cis, xq, head_first)
    cos, sin = cos.to(xq.device), sin.to(xq.device)
    xq_out = (xq.float() * cos + hy_rotate_half(xq.float()) * sin).type_as(xq)
    if xk is not None:
        xk_out = (xk.float() * cos + hy_rotate_half(xk.float()) * sin).type_as(xk)
    return xq_out, xk_out


def hy_attention(q, k, v, attn_mask=None):
    """hyvideo.modules.attention.attention: [B, S, H, D] in, [B, S, H*D] out (torch mode layout)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    x = Fn.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    x = x.transpose(1, 2)
    b, s, a, d = x.shape
    return x.reshape(b, s, -1)


def get_cu_seqlens(text_mask, img_len):
    """hyvideo get_cu_seqlens (device moved to the mask's): the flash varlen boundaries."""
    batch_size = text_mask.shape[0]
    text_len = text_mask.sum(dim=1)
    max_len = text_mask.shape[1] + img_len
    cu_seqlens = torch.zeros([2 * batch_size + 1], dtype=torch.int32, device=text_mask.device)
    for i in range(batch_size):
        s = text_len[i] + img_len
        s1 = i * max_len + s
        s2 = (i + 1) * max_len
        cu_seqlens[2 * i + 1] = s1
        cu_seqlens[2 * i + 2] = s2
    return cu_seqlens


def varlen_mask(text_mask, img_len):
    """flash_attn_varlen_func with the cu_seqlens above == SDPA where each sample's [img, valid text] rows
    attend each other, and the padding tail attends the padding tail: a [B, 1, L, L] boolean mask."""
    valid = torch.cat([torch.ones(text_mask.shape[0], img_len, dtype=torch.bool, device=text_mask.device),
                       text_mask.bool()], dim=1)
    return (valid[:, None, :, None] == valid[:, None, None, :])


class HyMLP(nn.Module):
    def __init__(self, in_channels, hidden_channels, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_channels)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_channels, in_channels)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    def __init__(self, in_channels, hidden_size, act_layer):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.act_1 = act_layer()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption):
        return self.linear_2(self.act_1(self.linear_1(caption)))


class ModulateDiT(nn.Module):
    def __init__(self, hidden_size, factor, act_layer):
        super().__init__()
        self.act = act_layer()
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, x):
        return self.linear(self.act(x))


class IndividualTokenRefinerBlock(nn.Module):
    def __init__(self, hidden_size, heads_num, mlp_width_ratio=2.0):
        super().__init__()
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, hidden_size * 3)
        self.self_attn_q_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=1e-6)
        self.self_attn_k_norm = nn.LayerNorm(head_dim, elementwise_affine=True, eps=1e-6)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = HyMLP(hidden_size, int(hidden_size * mlp_width_ratio), nn.SiLU)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, attn_mask=None):
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        norm_x = self.norm1(x)
        qkv = self.self_attn_qkv(norm_x)
        b, l, _ = qkv.shape
        q, k, v = qkv.reshape(b, l, 3, self.heads_num, -1).permute(2, 0, 1, 3, 4)  # B L (K H D) -> K B L H D
        q = self.self_attn_q_norm(q).to(v)
        k = self.self_attn_k_norm(k).to(v)
        attn = hy_attention(q, k, v, attn_mask=attn_mask)
        x = x + apply_gate(self.self_attn_proj(attn), gate_msa)
        x = x + apply_gate(self.mlp(self.norm2(x)), gate_mlp)
        return x


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size, heads_num, depth):
        super().__init__()
        self.blocks = nn.ModuleList(IndividualTokenRefinerBlock(hidden_size, heads_num) for _ in range(depth))

    def forward(self, x, c, mask=None):
        self_attn_mask = None
        if mask is not None:
            batch_size = mask.shape[0]
            seq_len = mask.shape[1]
            mask = mask.to(x.device)
            self_attn_mask_1 = mask.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
            self_attn_mask_2 = self_attn_mask_1.transpose(2, 3)
            self_attn_mask = (self_attn_mask_1 & self_attn_mask_2).bool()
            self_attn_mask[:, :, :, 0] = True  # avoids NaN for padding tokens
        for block in self.blocks:
            x = block(x, c, self_attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, in_channels, hidden_size, heads_num, depth):
        super().__init__()
        self.input_embedder = nn.Linear(in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = TextProjection(in_channels, hidden_size, nn.SiLU)
        self.individual_token_refiner = IndividualTokenRefiner(hidden_size, heads_num, depth)

    def forward(self, x, t, mask=None):
        timestep_aware_representations = self.t_embedder(t)
        if mask is None:
            context_aware_representations = x.mean(dim=1)
        else:
            mask_float = mask.float().unsqueeze(-1)
            context_aware_representations = (x * mask_float).sum(dim=1) / mask_float.sum(dim=1)
        context_aware_representations = self.c_embedder(context_aware_representations)
        c = timestep_aware_representations + context_aware_representations
        x = self.input_embedder(x)
        return self.individual_token_refiner(x, c, mask)


class HyPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class MMDoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, heads_num, mlp_width_ratio=2.0):
        super().__init__()
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        mlp_hidden_dim = int(hidden_size * mlp_width_ratio)
        gelu_tanh = lambda: nn.GELU(approximate="tanh")  # noqa: E731
        self.img_mod = ModulateDiT(hidden_size, 6, nn.SiLU)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn_qkv = nn.Linear(hidden_size, hidden_size * 3)
        self.img_attn_q_norm = RMSNorm(head_dim, eps=1e-6)
        self.img_attn_k_norm = RMSNorm(head_dim, eps=1e-6)
        self.img_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = HyMLP(hidden_size, mlp_hidden_dim, gelu_tanh)
        self.txt_mod = ModulateDiT(hidden_size, 6, nn.SiLU)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn_qkv = nn.Linear(hidden_size, hidden_size * 3)
        self.txt_attn_q_norm = RMSNorm(head_dim, eps=1e-6)
        self.txt_attn_k_norm = RMSNorm(head_dim, eps=1e-6)
        self.txt_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = HyMLP(hidden_size, mlp_hidden_dim, gelu_tanh)

    def _qkv(self, t):
        b, l, _ = t.shape
        return t.reshape(b, l, 3, self.heads_num, -1).permute(2, 0, 1, 3, 4)  # B L (K H D) -> K B L H D

    def forward(self, img, txt, vec, attn_mask=None, freqs_cis=None):
        (img_mod1_shift, img_mod1_scale, img_mod1_gate, img_mod2_shift, img_mod2_scale,
         img_mod2_gate) = self.img_mod(vec).chunk(6, dim=-1)
        (txt_mod1_shift, txt_mod1_scale, txt_mod1_gate, txt_mod2_shift, txt_mod2_scale,
         txt_mod2_gate) = self.txt_mod(vec).chunk(6, dim=-1)
        img_modulated = hy_modulate(self.img_norm1(img), shift=img_mod1_shift, scale=img_mod1_scale)
        img_q, img_k, img_v = self._qkv(self.img_attn_qkv(img_modulated))
        img_q = self.img_attn_q_norm(img_q).to(img_v)
        img_k = self.img_attn_k_norm(img_k).to(img_v)
        if freqs_cis is not None:
            img_qq, img_kk = hy_apply_rotary_emb(img_q, img_k, freqs_cis, head_first=False)
            assert img_qq.shape == img_q.shape and img_kk.shape == img_k.shape
            img_q, img_k = img_qq, img_kk
        txt_modulated = hy_modulate(self.txt_norm1(txt), shift=txt_mod1_shift, scale=txt_mod1_scale)
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn_qkv(txt_modulated))
        txt_q = self.txt_attn_q_norm(txt_q).to(txt_v)
        txt_k = self.txt_attn_k_norm(txt_k).to(txt_v)
        q = torch.cat((img_q, txt_q), dim=1)
        k = torch.cat((img_k, txt_k), dim=1)
        v = torch.cat((img_v, txt_v), dim=1)
        attn = hy_attention(q, k, v, attn_mask=attn_mask)
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
        img = img + apply_gate(self.img_attn_proj(img_attn), gate=img_mod1_gate)
        img = img + apply_gate(self.img_mlp(hy_modulate(self.img_norm2(img), shift=img_mod2_shift,
                                                        scale=img_mod2_scale)), gate=img_mod2_gate)
        txt = txt + apply_gate(self.txt_attn_proj(txt_attn), gate=txt_mod1_gate)
        txt = txt + apply_gate(self.txt_mlp(hy_modulate(self.txt_norm2(txt), shift=txt_mod2_shift,
                                                        scale=txt_mod2_scale)), gate=txt_mod2_gate)
        return img, txt


class MMSingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, heads_num, mlp_width_ratio=2.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        self.mlp_hidden_dim = int(hidden_size * mlp_width_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.q_norm = RMSNorm(head_dim, eps=1e-6)
        self.k_norm = RMSNorm(head_dim, eps=1e-6)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = ModulateDiT(hidden_size, 3, nn.SiLU)

    def forward(self, x, vec, txt_len, attn_mask=None, freqs_cis=None):
        mod_shift, mod_scale, mod_gate = self.modulation(vec).chunk(3, dim=-1)
        x_mod = hy_modulate(self.pre_norm(x), shift=mod_shift, scale=mod_scale)
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        b, l, _ = qkv.shape
        q, k, v = qkv.reshape(b, l, 3, self.heads_num, -1).permute(2, 0, 1, 3, 4)
        q = self.q_norm(q).to(v)
        k = self.k_norm(k).to(v)
        if freqs_cis is not None:
            img_q, txt_q = q[:, :-txt_len, :, :], q[:, -txt_len:, :, :]
            img_k, txt_k = k[:, :-txt_len, :, :], k[:, -txt_len:, :, :]
            img_qq, img_kk = hy_apply_rotary_emb(img_q, img_k, freqs_cis, head_first=False)
            q = torch.cat((img_qq, txt_q), dim=1)
            k = torch.cat((img_kk, txt_k), dim=1)
        attn = hy_attention(q, k, v, attn_mask=attn_mask)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + apply_gate(output, gate=mod_gate)


class HyFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, math.prod(patch_size) * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = hy_modulate(self.norm_final(x), shift=shift, scale=scale)
        return self.linear(x)


class HYVideoDiffusionTransformer(nn.Module):
    def __init__(self, in_channels=4, patch_size=(1, 2, 2), hidden_size=32, heads_num=2, mlp_width_ratio=2.0,
                 mm_double_blocks_depth=1, mm_single_blocks_depth=2, text_states_dim=24, text_states_dim_2=20,
                 guidance_embed=True, use_attention_mask=True, refiner_depth=1, varlen=True):
        super().__init__()
        self.patch_size = list(patch_size)
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.unpatchify_channels = self.out_channels
        self.guidance_embed = guidance_embed
        self.use_attention_mask = use_attention_mask
        self.varlen = varlen   # flash-attn varlen semantics (the default "flash" mode) vs torch mode (no mask)
        self.hidden_size, self.heads_num = hidden_size, heads_num
        self.img_in = HyPatchEmbed(self.patch_size, in_channels, hidden_size)
        self.txt_in = SingleTokenRefiner(text_states_dim, hidden_size, heads_num, depth=refiner_depth)
        self.time_in = TimestepEmbedder(hidden_size)
        self.vector_in = MLPEmbedder(text_states_dim_2, hidden_size)
        self.guidance_in = TimestepEmbedder(hidden_size) if guidance_embed else None
        self.double_blocks = nn.ModuleList(MMDoubleStreamBlock(hidden_size, heads_num, mlp_width_ratio)
                                           for _ in range(mm_double_blocks_depth))
        self.single_blocks = nn.ModuleList(MMSingleStreamBlock(hidden_size, heads_num, mlp_width_ratio)
                                           for _ in range(mm_single_blocks_depth))
        self.final_layer = HyFinalLayer(hidden_size, self.patch_size, self.out_channels)

    def unpatchify(self, x, t, h, w):
        c = self.unpatchify_channels
        pt, ph, pw = self.patch_size
        assert t * h * w == x.shape[1]
        x = x.reshape(shape=(x.shape[0], t, h, w, c, pt, ph, pw))
        x = torch.einsum("nthwcopq->nctohpwq", x)
        return x.reshape(shape=(x.shape[0], c, t * pt, h * ph, w * pw))

    def forward(self, x, t, text_states=None, text_mask=None, text_states_2=None, freqs_cos=None, freqs_sin=None,
                guidance=None, return_dict=True):
        out = {}
        img = x
        txt = text_states
        _, _, ot, oh, ow = x.shape
        tt, th, tw = ot // self.patch_size[0], oh // self.patch_size[1], ow // self.patch_size[2]
        vec = self.time_in(t)
        vec = vec + self.vector_in(text_states_2)
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(guidance)
        img = self.img_in(img)
        txt = self.txt_in(txt, t, text_mask if self.use_attention_mask else None)
        txt_seq_len = txt.shape[1]
        img_seq_len = img.shape[1]
        cu_seqlens_q = get_cu_seqlens(text_mask, img_seq_len)  # noqa: F841 (flash varlen boundaries)
        attn_mask = varlen_mask(text_mask, img_seq_len) if self.varlen else None
        freqs_cis = (freqs_cos, freqs_sin) if freqs_cos is not None else None
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, attn_mask, freqs_cis)
        x = torch.cat((img, txt), 1)
        for block in self.single_blocks:
            x = block(x, vec, txt_seq_len, attn_mask, (freqs_cos, freqs_sin))
        img = x[:, :img_seq_len, ...]
        img = self.final_layer(img, vec)
        img = self.unpatchify(img, tt, th, tw)
        if return_dict:
            out["x"] = img
            return out
        return img


def _hy_1d_rope(dim, pos, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(pos.float(), freqs)
    return freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)


def get_nd_rotary_pos_embed(rope_dim_list, sizes, theta=256.0):
    """hyvideo posemb_layers.get_nd_rotary_pos_embed(use_real=True) for start=0, stop=sizes."""
    axes = [torch.arange(s, dtype=torch.float32) for s in sizes]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    cos, sin = [], []
    for i, d in enumerate(rope_dim_list):
        c, s = _hy_1d_rope(d, grid[i].reshape(-1), theta)
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def _hy_video_build(varlen=True):
    return lambda seed: _seeded_build(seed, lambda: HYVideoDiffusionTransformer(varlen=varlen))


HY_TXT2 = 20


def _hy_video_inputs(model, batch, seed):
    r = _Rand(seed)
    pt, ph, pw = model.patch_size
    freqs_cos, freqs_sin = get_nd_rotary_pos_embed([4, 6, 6], (F // pt, VH // ph, VW // pw))
    text_mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
    text_mask[0, 4:] = 0   # tokenizer padding: the first prompt is shorter
    return dict(x=r.randn(batch, 4, F, VH, VW), t=r.timestep(batch, 1000.0),
                text_states=r.randn(batch, TEXT_LEN, 24), text_mask=text_mask,
                text_states_2=r.randn(batch, HY_TXT2), freqs_cos=freqs_cos, freqs_sin=freqs_sin,
                guidance=torch.full((batch,), 6.0 * 1000.0), return_dict=True)


# =========================================================================== 2. LTX-Video (official)


class LtxRMSNorm(nn.Module):
    """diffusers RMSNorm as LTX uses it (variance in fp32, optional weight)."""

    def __init__(self, dim, eps=1e-6, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            hidden_states = hidden_states.to(self.weight.dtype) * self.weight
        else:
            hidden_states = hidden_states.to(input_dtype)
        return hidden_states


class LtxAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head, cross_attention_dim=None, use_rope=False):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.use_rope = use_rope
        self.is_cross = cross_attention_dim is not None
        cross_attention_dim = cross_attention_dim or query_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=True)
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=True)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=True)
        self.q_norm = LtxRMSNorm(inner_dim, eps=1e-5)   # qk_norm="rms_norm": across heads
        self.k_norm = LtxRMSNorm(inner_dim, eps=1e-5)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=True), nn.Dropout(0.0)])

    @staticmethod
    def apply_rotary_emb(input_tensor, freqs_cis):
        cos_freqs, sin_freqs = freqs_cis[0], freqs_cis[1]
        t_dup = input_tensor.reshape(*input_tensor.shape[:-1], -1, 2)   # "... (d r) -> ... d r", r=2
        t1, t2 = t_dup.unbind(dim=-1)
        t_dup = torch.stack((-t2, t1), dim=-1)
        input_tensor_rot = t_dup.flatten(-2)                            # "... d r -> ... (d r)"
        return input_tensor * cos_freqs + input_tensor_rot * sin_freqs

    def prepare_attention_mask(self, attention_mask, target_length, batch_size, out_dim=3):
        head_size = self.heads
        if attention_mask is None:
            return attention_mask
        current_length = attention_mask.shape[-1]
        if current_length != target_length:
            attention_mask = Fn.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * head_size:
                attention_mask = attention_mask.repeat_interleave(head_size, dim=0)
        return attention_mask

    def forward(self, hidden_states, freqs_cis=None, encoder_hidden_states=None, attention_mask=None):
        # AttnProcessor2_0.__call__
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = self.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, self.heads, -1, attention_mask.shape[-1])
        query = self.to_q(hidden_states)
        query = self.q_norm(query)
        if encoder_hidden_states is not None:
            key = self.to_k(encoder_hidden_states)
            key = self.k_norm(key)
        else:
            encoder_hidden_states = hidden_states
            key = self.to_k(hidden_states)
            key = self.k_norm(key)
            if self.use_rope:
                key = self.apply_rotary_emb(key, freqs_cis)
                query = self.apply_rotary_emb(query, freqs_cis)
        value = self.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // self.heads
        query = query.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        hs = Fn.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        hs = hs.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim)
        hs = hs.to(query.dtype)
        hs = self.to_out[0](hs)
        return self.to_out[1](hs)


class LtxFeedForward(nn.Module):
    def __init__(self, dim, mult=2):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Dropout(0.0),
                                  nn.Linear(inner, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class LtxBasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, cross_attention_dim):
        super().__init__()
        self.norm1 = LtxRMSNorm(dim, eps=1e-6, elementwise_affine=False)   # standardization_norm="rms_norm"
        self.attn1 = LtxAttention(dim, heads, dim_head, use_rope=True)
        self.attn2 = LtxAttention(dim, heads, dim_head, cross_attention_dim=cross_attention_dim, use_rope=True)
        self.norm2 = LtxRMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = LtxFeedForward(dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, hidden_states, freqs_cis=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, timestep=None):
        batch_size = hidden_states.shape[0]
        norm_hidden_states = self.norm1(hidden_states)
        assert timestep.ndim == 3
        num_ada_params = self.scale_shift_table.shape[0]
        ada_values = self.scale_shift_table[None, None] + timestep.reshape(
            batch_size, timestep.shape[1], num_ada_params, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada_values.unbind(dim=2)
        norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa
        norm_hidden_states = norm_hidden_states.squeeze(1)
        attn_output = self.attn1(norm_hidden_states, freqs_cis=freqs_cis, attention_mask=attention_mask)
        attn_output = gate_msa * attn_output
        hidden_states = attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        attn_output = self.attn2(hidden_states, freqs_cis=freqs_cis, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask)
        hidden_states = attn_output + hidden_states
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
        ff_output = self.ff(norm_hidden_states)
        ff_output = gate_mlp * ff_output
        hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1,
                           max_period=10000):
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32,
                                                    device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    return emb


class AdaLayerNormSingle(nn.Module):
    def __init__(self, embedding_dim, embedding_coefficient=6):
        super().__init__()
        self.linear_1 = nn.Linear(64, embedding_dim)   # TimestepEmbedding(256 -> dim) in the real one
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, embedding_coefficient * embedding_dim)

    def forward(self, timestep, added_cond_kwargs=None, batch_size=None, hidden_dtype=None):
        proj = get_timestep_embedding(timestep, 64).to(hidden_dtype)
        embedded_timestep = self.linear_2(self.act(self.linear_1(proj)))
        return self.linear(self.silu(embedded_timestep)), embedded_timestep


class PixArtAlphaTextProjection(nn.Module):
    def __init__(self, in_features, hidden_size):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption):
        return self.linear_2(self.act_1(self.linear_1(caption)))


class Transformer3DModel(nn.Module):
    def __init__(self, num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8, num_layers=2,
                 caption_channels=24, positional_embedding_theta=10000.0,
                 positional_embedding_max_pos=(20, 2048, 2048), timestep_scale_multiplier=1000):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.inner_dim = inner_dim
        self.dtype = torch.float32
        self.patchify_proj = nn.Linear(in_channels, inner_dim, bias=True)
        self.positional_embedding_theta = positional_embedding_theta
        self.positional_embedding_max_pos = list(positional_embedding_max_pos)
        self.timestep_scale_multiplier = timestep_scale_multiplier
        self.transformer_blocks = nn.ModuleList(
            LtxBasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, inner_dim)
            for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner_dim) / inner_dim ** 0.5)
        self.proj_out = nn.Linear(inner_dim, out_channels)
        self.adaln_single = AdaLayerNormSingle(inner_dim)
        self.caption_projection = PixArtAlphaTextProjection(caption_channels, inner_dim)

    def get_fractional_positions(self, indices_grid):
        return torch.stack([indices_grid[:, i] / self.positional_embedding_max_pos[i] for i in range(3)], dim=-1)

    def precompute_freqs_cis(self, indices_grid, spacing="exp"):
        dtype = torch.float32
        dim = self.inner_dim
        theta = self.positional_embedding_theta
        fractional_positions = self.get_fractional_positions(indices_grid)
        start, end = 1, theta
        device = fractional_positions.device
        indices = theta ** (torch.linspace(math.log(start, theta), math.log(end, theta), dim // 6, device=device,
                                           dtype=dtype))
        indices = indices.to(dtype=dtype)
        indices = indices * math.pi / 2
        freqs = (indices * (fractional_positions.unsqueeze(-1) * 2 - 1)).transpose(-1, -2).flatten(2)
        cos_freq = freqs.cos().repeat_interleave(2, dim=-1)
        sin_freq = freqs.sin().repeat_interleave(2, dim=-1)
        if dim % 6 != 0:
            cos_padding = torch.ones_like(cos_freq[:, :, : dim % 6])
            sin_padding = torch.zeros_like(cos_freq[:, :, : dim % 6])
            cos_freq = torch.cat([cos_padding, cos_freq], dim=-1)
            sin_freq = torch.cat([sin_padding, sin_freq], dim=-1)
        return cos_freq.to(self.dtype), sin_freq.to(self.dtype)

    def forward(self, hidden_states, indices_grid, encoder_hidden_states=None, timestep=None, class_labels=None,
                cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None, skip_layer_mask=None,
                skip_layer_strategy=None, return_dict=True):
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
            encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
        hidden_states = self.patchify_proj(hidden_states)
        if self.timestep_scale_multiplier:
            timestep = self.timestep_scale_multiplier * timestep
        freqs_cis = self.precompute_freqs_cis(indices_grid)
        batch_size = hidden_states.shape[0]
        timestep, embedded_timestep = self.adaln_single(timestep.flatten(), {"resolution": None, "aspect_ratio": None},
                                                        batch_size=batch_size, hidden_dtype=hidden_states.dtype)
        timestep = timestep.view(batch_size, -1, timestep.shape[-1])
        embedded_timestep = embedded_timestep.view(batch_size, -1, embedded_timestep.shape[-1])
        encoder_hidden_states = self.caption_projection(encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, hidden_states.shape[-1])
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, freqs_cis=freqs_cis, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, timestep=timestep)
        scale_shift_values = self.scale_shift_table[None, None] + embedded_timestep[:, :, None]
        shift, scale = scale_shift_values[:, :, 0], scale_shift_values[:, :, 1]
        hidden_states = self.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale) + shift
        hidden_states = self.proj_out(hidden_states)
        if not return_dict:
            return (hidden_states,)
        return {"sample": hidden_states}


def _ltx_build(seed):
    return _seeded_build(seed, lambda: Transformer3DModel())


def ltx_fractional_coords(batch, f, h, w, frame_rate=25.0, scale=(8, 32, 32)):
    """SymmetricPatchifier.get_latent_coords -> latent_to_pixel_coords(causal_fix=True) -> / frame_rate."""
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), dim=0)
    latent_coords = grid.reshape(3, -1)[None].repeat(batch, 1, 1)            # [B, 3, N]
    pixel_coords = latent_coords * torch.tensor(scale)[None, :, None]
    pixel_coords[:, 0] = (pixel_coords[:, 0] + 1 - scale[0]).clamp(min=0)
    fractional_coords = pixel_coords.to(torch.float32)
    fractional_coords[:, 0] = fractional_coords[:, 0] * (1.0 / frame_rate)
    return fractional_coords


def _ltx_inputs(per_token_t=False):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        n = F * VH * VW
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
        mask[0, 5:] = 0
        t = r.timestep(batch, 1.0)[:, None]                                    # [B, 1]
        if per_token_t:  # image-to-video conditioning: frame-0 tokens are clean (t = 0)
            cond = torch.zeros(batch, n)
            cond[:, : VH * VW] = 1.0
            t = torch.min(t, 1.0 - cond)
        return dict(hidden_states=r.randn(batch, n, 8), indices_grid=ltx_fractional_coords(batch, F, VH, VW),
                    encoder_hidden_states=r.randn(batch, TEXT_LEN, 24), encoder_attention_mask=mask,
                    timestep=t, return_dict=False)
    return inputs


# =========================================================================== 3. Hunyuan-DiT (official)


class FP32_Layernorm(nn.LayerNorm):
    def forward(self, inputs):
        origin_dtype = inputs.dtype
        return Fn.layer_norm(inputs.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                             self.eps).to(origin_dtype)


class FP32_SiLU(nn.SiLU):
    def forward(self, inputs):
        return Fn.silu(inputs.float(), inplace=False).to(inputs.dtype)


class AttentionPool(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x):
        x = x.permute(1, 0, 2)  # NLC -> LNC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = Fn.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x.squeeze(0)


class HyditPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class HyditAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=True):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.Wqkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.out_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, freqs_cis_img=None):
        B, N, C = x.shape
        qkv = self.Wqkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = self.q_norm(q)
        k = self.k_norm(k)
        if freqs_cis_img is not None:
            qq, kk = hy_apply_rotary_emb(q, k, freqs_cis_img, head_first=True)
            assert qq.shape == q.shape and kk.shape == k.shape
            q, k = qq, kk
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.out_proj(x)
        x = self.proj_drop(x)
        return (x,)


class HyditCrossAttention(nn.Module):
    def __init__(self, qdim, kdim, num_heads, qkv_bias=True, qk_norm=True):
        super().__init__()
        self.qdim, self.kdim, self.num_heads = qdim, kdim, num_heads
        self.head_dim = qdim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(qdim, qdim, bias=qkv_bias)
        self.kv_proj = nn.Linear(kdim, 2 * qdim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, elementwise_affine=True, eps=1e-6) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.out_proj = nn.Linear(qdim, qdim, bias=qkv_bias)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, y, freqs_cis_img=None):
        b, s1, c = x.shape
        _, s2, c = y.shape
        q = self.q_proj(x).view(b, s1, self.num_heads, self.head_dim)
        kv = self.kv_proj(y).view(b, s2, 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(dim=2)
        q = self.q_norm(q)
        k = self.k_norm(k)
        if freqs_cis_img is not None:
            qq, _ = hy_apply_rotary_emb(q, None, freqs_cis_img)
            assert qq.shape == q.shape
            q = qq
        q = q * self.scale
        q = q.transpose(-2, -3).contiguous()        # B, L1, H, C -> B, H, L1, C
        k = k.permute(0, 2, 3, 1).contiguous()      # B, L2, H, C -> B, H, C, L2
        attn = q @ k
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v.transpose(-2, -3)
        context = x.transpose(1, 2)
        context = context.contiguous().view(b, s1, -1)
        out = self.out_proj(context)
        out = self.proj_drop(out)
        return (out,)


class HyditMlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class HunYuanDiTBlock(nn.Module):
    def __init__(self, hidden_size, c_emb_size, num_heads, mlp_ratio=2.0, text_states_dim=32, qk_norm=True,
                 skip=False):
        super().__init__()
        norm_layer = FP32_Layernorm
        self.norm1 = norm_layer(hidden_size, elementwise_affine=True, eps=1e-6)
        self.attn1 = HyditAttention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = norm_layer(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = HyditMlp(hidden_size, int(hidden_size * mlp_ratio))
        self.default_modulation = nn.Sequential(FP32_SiLU(), nn.Linear(c_emb_size, hidden_size, bias=True))
        self.attn2 = HyditCrossAttention(hidden_size, text_states_dim, num_heads=num_heads, qkv_bias=True,
                                         qk_norm=qk_norm)
        self.norm3 = norm_layer(hidden_size, elementwise_affine=True, eps=1e-6)
        if skip:
            self.skip_norm = norm_layer(2 * hidden_size, elementwise_affine=True, eps=1e-6)
            self.skip_linear = nn.Linear(2 * hidden_size, hidden_size)
        else:
            self.skip_linear = None

    def forward(self, x, c=None, text_states=None, freq_cis_img=None, skip=None):
        if self.skip_linear is not None:
            cat = torch.cat([x, skip], dim=-1)
            cat = self.skip_norm(cat)
            x = self.skip_linear(cat)
        shift_msa = self.default_modulation(c).unsqueeze(dim=1)
        attn_inputs = (self.norm1(x) + shift_msa, freq_cis_img)
        x = x + self.attn1(*attn_inputs)[0]
        cross_inputs = (self.norm3(x), text_states, freq_cis_img)
        x = x + self.attn2(*cross_inputs)[0]
        mlp_inputs = self.norm2(x)
        x = x + self.mlp(mlp_inputs)
        return x


class HyditFinalLayer(nn.Module):
    def __init__(self, final_hidden_size, c_emb_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(final_hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(final_hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c_emb_size, 2 * final_hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.linear(x)


HYDIT_CLIP, HYDIT_T5, HYDIT_T5_LEN = 32, 24, 11


class HunYuanDiT(nn.Module):
    def __init__(self, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, mlp_ratio=2.0,
                 learn_sigma=True, text_states_dim=HYDIT_CLIP, text_states_dim_t5=HYDIT_T5, text_len=TEXT_LEN,
                 text_len_t5=HYDIT_T5_LEN, size_cond=True, use_style_cond=True, qk_norm=True):
        super().__init__()
        self.depth = depth
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.text_states_dim = text_states_dim
        self.text_states_dim_t5 = text_states_dim_t5
        self.text_len, self.text_len_t5 = text_len, text_len_t5
        self.size_cond, self.use_style_cond = size_cond, use_style_cond
        self.mlp_t5 = nn.Sequential(nn.Linear(text_states_dim_t5, text_states_dim_t5 * 4, bias=True), FP32_SiLU(),
                                    nn.Linear(text_states_dim_t5 * 4, text_states_dim, bias=True))
        self.text_embedding_padding = nn.Parameter(torch.randn(text_len + text_len_t5, text_states_dim,
                                                               dtype=torch.float32))
        pooler_out_dim = 16
        self.pooler = AttentionPool(text_len_t5, text_states_dim_t5, num_heads=2, output_dim=pooler_out_dim)
        self.extra_in_dim = pooler_out_dim
        if size_cond:
            self.extra_in_dim += 6 * 16
        if use_style_cond:
            self.style_embedder = nn.Embedding(1, hidden_size)
            self.extra_in_dim += hidden_size
        self.x_embedder = HyditPatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.extra_embedder = nn.Sequential(nn.Linear(self.extra_in_dim, hidden_size * 4), FP32_SiLU(),
                                            nn.Linear(hidden_size * 4, hidden_size, bias=True))
        self.blocks = nn.ModuleList([
            HunYuanDiTBlock(hidden_size, hidden_size, num_heads, mlp_ratio, text_states_dim, qk_norm,
                            skip=layer > depth // 2) for layer in range(depth)])
        self.final_layer = HyditFinalLayer(hidden_size, hidden_size, patch_size, self.out_channels)
        self.unpatchify_channels = self.out_channels

    def forward(self, x, t, encoder_hidden_states=None, text_embedding_mask=None, encoder_hidden_states_t5=None,
                text_embedding_mask_t5=None, image_meta_size=None, style=None, cos_cis_img=None, sin_cis_img=None,
                return_dict=True, controls=None):
        text_states = encoder_hidden_states
        text_states_t5 = encoder_hidden_states_t5
        text_states_mask = text_embedding_mask.bool()
        text_states_t5_mask = text_embedding_mask_t5.bool()
        b_t5, l_t5, c_t5 = text_states_t5.shape
        text_states_t5 = self.mlp_t5(text_states_t5.view(-1, c_t5))
        text_states = torch.cat([text_states, text_states_t5.view(b_t5, l_t5, -1)], dim=1)
        clip_t5_mask = torch.cat([text_states_mask, text_states_t5_mask], dim=-1)
        text_states = torch.where(clip_t5_mask.unsqueeze(2), text_states, self.text_embedding_padding.to(text_states))
        _, _, oh, ow = x.shape
        th, tw = oh // self.patch_size, ow // self.patch_size
        t = self.t_embedder(t)
        x = self.x_embedder(x)
        freqs_cis_img = (cos_cis_img, sin_cis_img)
        extra_vec = self.pooler(encoder_hidden_states_t5)
        if self.size_cond:
            image_meta_size = timestep_embedding(image_meta_size.view(-1), 16)
            image_meta_size = image_meta_size.view(-1, 6 * 16)
            extra_vec = torch.cat([extra_vec, image_meta_size], dim=1)
        if self.use_style_cond:
            style_embedding = self.style_embedder(style)
            extra_vec = torch.cat([extra_vec, style_embedding], dim=1)
        c = t + self.extra_embedder(extra_vec)
        skips = []
        for layer, block in enumerate(self.blocks):
            if layer > self.depth // 2:
                if controls is not None:
                    skip = skips.pop() + controls.pop()
                else:
                    skip = skips.pop()
                x = block(x, c, text_states, freqs_cis_img, skip)
            else:
                x = block(x, c, text_states, freqs_cis_img)
            if layer < (self.depth // 2 - 1):
                skips.append(x)
        x = self.final_layer(x, c)
        x = self.unpatchify(x, th, tw)
        if return_dict:
            return {"x": x}
        return x

    def unpatchify(self, x, h, w):
        c = self.unpatchify_channels
        p = self.x_embedder.patch_size[0]
        assert h * w == x.shape[1]
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))


def hydit_rope(head_dim, th, tw, base_size=32 // 8 // 2):
    """hydit calc_rope: get_2d_rotary_pos_embed(head_dim, start, stop, use_real=True) over the crop region."""
    # get_fill_resize_and_crop((th, tw), base_size)
    r = th / tw
    if r > 1:
        resize_height, resize_width = base_size, int(round(base_size / th * tw))
    else:
        resize_width, resize_height = base_size, int(round(base_size / tw * th))
    crop_top = int(round((base_size - resize_height) / 2.0))
    crop_left = int(round((base_size - resize_width) / 2.0))
    start = (crop_top, crop_left)
    stop = (crop_top + resize_height, crop_left + resize_width)
    gh = torch.linspace(start[0], stop[0], th + 1)[:-1]
    gw = torch.linspace(start[1], stop[1], tw + 1)[:-1]
    gy, gx = torch.meshgrid(gh, gw, indexing="ij")  # get_meshgrid: grid = meshgrid(w, h), stacked [gw, gh]
    grid = torch.stack([gx, gy], dim=0)
    ch, sh = _hy_1d_rope(head_dim // 2, grid[0].reshape(-1), 10000.0)
    cw, sw = _hy_1d_rope(head_dim // 2, grid[1].reshape(-1), 10000.0)
    return torch.cat([ch, cw], dim=1), torch.cat([sh, sw], dim=1)


def _hydit_build(seed):
    return _seeded_build(seed, lambda: HunYuanDiT())


def _hydit_inputs(model, batch, seed):
    r = _Rand(seed)
    p = model.patch_size
    cos, sin = hydit_rope(model.hidden_size // model.num_heads, H // p, W // p)
    m1 = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
    m1[0, 5:] = 0
    m2 = torch.ones(batch, HYDIT_T5_LEN, dtype=torch.int64)
    m2[1, 8:] = 0
    ims = torch.tensor([[1024.0, 1024.0, 1024.0, 1024.0, 0.0, 0.0]]).repeat(batch, 1)
    return dict(x=r.randn(batch, 4, H, W), t=r.randint(1000, batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, HYDIT_CLIP), text_embedding_mask=m1,
                encoder_hidden_states_t5=r.randn(batch, HYDIT_T5_LEN, HYDIT_T5), text_embedding_mask_t5=m2,
                image_meta_size=ims, style=torch.zeros(batch, dtype=torch.long), cos_cis_img=cos, sin_cis_img=sin,
                return_dict=False)


# =========================================================================== 4. Lumina-Image-2.0 NextDiT (official)


def lu_modulate(x, scale):
    return x * (1 + scale.unsqueeze(1))


class LuJointAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, qk_norm):
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_local_heads = n_heads
        self.n_local_kv_heads = self.n_kv_heads
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + self.n_kv_heads + self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    @staticmethod
    def apply_rotary_emb(x_in, freqs_cis):
        x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(2)
        x_out = torch.view_as_real(x * freqs_cis).flatten(3)
        return x_out.type_as(x_in)

    def forward(self, x, x_mask, freqs_cis):
        bsz, seqlen, _ = x.shape
        dtype = x.dtype
        xq, xk, xv = torch.split(self.qkv(x), [self.n_local_heads * self.head_dim,
                                               self.n_local_kv_heads * self.head_dim,
                                               self.n_local_kv_heads * self.head_dim], dim=-1)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = self.q_norm(xq)
        xk = self.k_norm(xk)
        xq = LuJointAttention.apply_rotary_emb(xq, freqs_cis=freqs_cis)
        xk = LuJointAttention.apply_rotary_emb(xk, freqs_cis=freqs_cis)
        xq, xk = xq.to(dtype), xk.to(dtype)
        softmax_scale = math.sqrt(1 / self.head_dim)
        n_rep = self.n_local_heads // self.n_local_kv_heads
        if n_rep >= 1:
            xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        output = Fn.scaled_dot_product_attention(
            xq.permute(0, 2, 1, 3), xk.permute(0, 2, 1, 3), xv.permute(0, 2, 1, 3),
            attn_mask=x_mask.bool().view(bsz, 1, 1, seqlen).expand(-1, self.n_local_heads, seqlen, -1),
            scale=softmax_scale).permute(0, 2, 1, 3).to(dtype)
        output = output.flatten(-2)
        return self.out(output)


class LuFeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, multiple_of, ffn_dim_multiplier=None):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(Fn.silu(self.w1(x)) * self.w3(x))


class LuJointTransformerBlock(nn.Module):
    def __init__(self, layer_id, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm,
                 modulation=True):
        super().__init__()
        self.dim = dim
        self.head_dim = dim // n_heads
        self.attention = LuJointAttention(dim, n_heads, n_kv_heads, qk_norm)
        self.feed_forward = LuFeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
        self.layer_id = layer_id
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim, bias=True))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None):
        if self.modulation:
            assert adaln_input is not None
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(
                self.attention(lu_modulate(self.attention_norm1(x), scale_msa), x_mask, freqs_cis))
            x = x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(
                self.feed_forward(lu_modulate(self.ffn_norm1(x), scale_mlp)))
        else:
            assert adaln_input is None
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis))
            x = x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        return x


class LuFinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(hidden_size, 1024), hidden_size, bias=True))

    def forward(self, x, c):
        scale = self.adaLN_modulation(c)
        x = lu_modulate(self.norm_final(x), scale)
        return self.linear(x)


class RopeEmbedder:
    def __init__(self, theta=10000.0, axes_dims=(16, 56, 56), axes_lens=(1, 512, 512)):
        self.theta = theta
        self.axes_dims = axes_dims
        self.axes_lens = axes_lens
        self.freqs_cis = NextDiT.precompute_freqs_cis(self.axes_dims, self.axes_lens, theta=self.theta)

    def __call__(self, ids):
        self.freqs_cis = [freqs_cis.to(ids.device) for freqs_cis in self.freqs_cis]
        result = []
        for i in range(len(self.axes_dims)):
            index = ids[:, :, i:i + 1].repeat(1, 1, self.freqs_cis[i].shape[-1]).to(torch.int64)
            result.append(torch.gather(self.freqs_cis[i].unsqueeze(0).repeat(index.shape[0], 1, 1), dim=1,
                                       index=index))
        return torch.cat(result, dim=-1)


class NextDiT(nn.Module):
    def __init__(self, patch_size=2, in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                 n_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24,
                 axes_dims=(4, 6, 6), axes_lens=(32, 16, 16), static_caption=False):
        super().__init__()
        self.static_caption = static_caption
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim, bias=True)
        self.noise_refiner = nn.ModuleList([
            LuJointTransformerBlock(i, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm,
                                    modulation=True) for i in range(n_refiner_layers)])
        self.context_refiner = nn.ModuleList([
            LuJointTransformerBlock(i, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm,
                                    modulation=False) for i in range(n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(min(dim, 1024))
        self.cap_embedder = nn.Sequential(RMSNorm(cap_feat_dim, eps=norm_eps), nn.Linear(cap_feat_dim, dim, bias=True))
        self.layers = nn.ModuleList([
            LuJointTransformerBlock(i, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm)
            for i in range(n_layers)])
        self.norm_final = RMSNorm(dim, eps=norm_eps)
        self.final_layer = LuFinalLayer(dim, patch_size, self.out_channels)
        assert (dim // n_heads) == sum(axes_dims)
        self.axes_dims = axes_dims
        self.axes_lens = axes_lens
        self.rope_embedder = RopeEmbedder(axes_dims=axes_dims, axes_lens=axes_lens)
        self.dim = dim
        self.n_heads = n_heads

    @staticmethod
    def precompute_freqs_cis(dim, end, theta=10000.0):
        freqs_cis = []
        for d, e in zip(dim, end):
            freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
            timestep = torch.arange(e, device=freqs.device, dtype=torch.float64)
            freqs = torch.outer(timestep, freqs).float()
            freqs_cis.append(torch.polar(torch.ones_like(freqs), freqs).to(torch.complex64))
        return freqs_cis

    # ---- as written (per-sample Python loops over cap_mask.sum().tolist())

    def unpatchify(self, x, img_size, cap_size, return_tensor=False):
        pH = pW = self.patch_size
        imgs = []
        for i in range(x.size(0)):
            H_, W_ = img_size[i]
            begin = cap_size[i]
            end = begin + (H_ // pH) * (W_ // pW)
            imgs.append(x[i][begin:end].view(H_ // pH, W_ // pW, pH, pW, self.out_channels)
                        .permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
        if return_tensor:
            imgs = torch.stack(imgs, dim=0)
        return imgs

    def patchify_and_embed(self, x, cap_feats, cap_mask, t):
        bsz = len(x)
        pH = pW = self.patch_size
        device = x[0].device
        l_effective_cap_len = cap_mask.sum(dim=1).tolist()
        img_sizes = [(img.size(1), img.size(2)) for img in x]
        l_effective_img_len = [(H_ // pH) * (W_ // pW) for (H_, W_) in img_sizes]
        max_seq_len = max((cap_len + img_len for cap_len, img_len in zip(l_effective_cap_len, l_effective_img_len)))
        max_img_len = max(l_effective_img_len)
        position_ids = torch.zeros(bsz, max_seq_len, 3, dtype=torch.int32, device=device)
        for i in range(bsz):
            cap_len = l_effective_cap_len[i]
            img_len = l_effective_img_len[i]
            H_, W_ = img_sizes[i]
            H_tokens, W_tokens = H_ // pH, W_ // pW
            assert H_tokens * W_tokens == img_len
            position_ids[i, :cap_len, 0] = torch.arange(cap_len, dtype=torch.int32, device=device)
            position_ids[i, cap_len:cap_len + img_len, 0] = cap_len
            row_ids = torch.arange(H_tokens, dtype=torch.int32, device=device).view(-1, 1).repeat(1, W_tokens).flatten()
            col_ids = torch.arange(W_tokens, dtype=torch.int32, device=device).view(1, -1).repeat(H_tokens, 1).flatten()
            position_ids[i, cap_len:cap_len + img_len, 1] = row_ids
            position_ids[i, cap_len:cap_len + img_len, 2] = col_ids
        freqs_cis = self.rope_embedder(position_ids)
        cap_freqs_cis_shape = list(freqs_cis.shape)
        cap_freqs_cis_shape[1] = cap_feats.shape[1]
        cap_freqs_cis = torch.zeros(*cap_freqs_cis_shape, device=device, dtype=freqs_cis.dtype)
        img_freqs_cis_shape = list(freqs_cis.shape)
        img_freqs_cis_shape[1] = max_img_len
        img_freqs_cis = torch.zeros(*img_freqs_cis_shape, device=device, dtype=freqs_cis.dtype)
        for i in range(bsz):
            cap_len = l_effective_cap_len[i]
            img_len = l_effective_img_len[i]
            cap_freqs_cis[i, :cap_len] = freqs_cis[i, :cap_len]
            img_freqs_cis[i, :img_len] = freqs_cis[i, cap_len:cap_len + img_len]
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, cap_freqs_cis)
        flat_x = []
        for i in range(bsz):
            img = x[i]
            C, H_, W_ = img.size()
            img = img.view(C, H_ // pH, pH, W_ // pW, pW).permute(1, 3, 2, 4, 0).flatten(2).flatten(0, 1)
            flat_x.append(img)
        x = flat_x
        padded_img_embed = torch.zeros(bsz, max_img_len, x[0].shape[-1], device=device, dtype=x[0].dtype)
        padded_img_mask = torch.zeros(bsz, max_img_len, dtype=torch.bool, device=device)
        for i in range(bsz):
            padded_img_embed[i, :l_effective_img_len[i]] = x[i]
            padded_img_mask[i, :l_effective_img_len[i]] = True
        padded_img_embed = self.x_embedder(padded_img_embed)
        for layer in self.noise_refiner:
            padded_img_embed = layer(padded_img_embed, padded_img_mask, img_freqs_cis, t)
        mask = torch.zeros(bsz, max_seq_len, dtype=torch.bool, device=device)
        padded_full_embed = torch.zeros(bsz, max_seq_len, self.dim, device=device, dtype=x[0].dtype)
        for i in range(bsz):
            cap_len = l_effective_cap_len[i]
            img_len = l_effective_img_len[i]
            mask[i, :cap_len + img_len] = True
            padded_full_embed[i, :cap_len] = cap_feats[i, :cap_len]
            padded_full_embed[i, cap_len:cap_len + img_len] = padded_img_embed[i, :img_len]
        return padded_full_embed, mask, img_sizes, l_effective_cap_len, freqs_cis

    # ---- static caption length: the same computation batched (every caption full length)

    def patchify_and_embed_static(self, x, cap_feats, cap_mask, t):
        bsz, C, H_, W_ = x.shape
        pH = pW = self.patch_size
        device = x.device
        cap_len = cap_feats.shape[1]
        H_tokens, W_tokens = H_ // pH, W_ // pW
        img_len = H_tokens * W_tokens
        max_seq_len = cap_len + img_len
        position_ids = torch.zeros(bsz, max_seq_len, 3, dtype=torch.int32, device=device)
        position_ids[:, :cap_len, 0] = torch.arange(cap_len, dtype=torch.int32, device=device)
        position_ids[:, cap_len:, 0] = cap_len
        row_ids = torch.arange(H_tokens, dtype=torch.int32, device=device).view(-1, 1).repeat(1, W_tokens).flatten()
        col_ids = torch.arange(W_tokens, dtype=torch.int32, device=device).view(1, -1).repeat(H_tokens, 1).flatten()
        position_ids[:, cap_len:, 1] = row_ids
        position_ids[:, cap_len:, 2] = col_ids
        freqs_cis = self.rope_embedder(position_ids)
        cap_freqs_cis = freqs_cis[:, :cap_len]
        img_freqs_cis = freqs_cis[:, cap_len:]
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, cap_freqs_cis)
        img = x.view(bsz, C, H_tokens, pH, W_tokens, pW).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        img_mask = torch.ones(bsz, img_len, dtype=torch.bool, device=device)
        img = self.x_embedder(img)
        for layer in self.noise_refiner:
            img = layer(img, img_mask, img_freqs_cis, t)
        mask = torch.cat([cap_mask.bool(), img_mask], dim=1)
        full = torch.cat([cap_feats, img], dim=1)
        return full, mask, (H_, W_), cap_len, freqs_cis

    def forward(self, x, t, cap_feats, cap_mask):
        t = self.t_embedder(t)
        adaln_input = t
        cap_feats = self.cap_embedder(cap_feats)
        if self.static_caption:
            x, mask, (H_, W_), cap_len, freqs_cis = self.patchify_and_embed_static(x, cap_feats, cap_mask, t)
            for layer in self.layers:
                x = layer(x, mask, freqs_cis, adaln_input)
            x = self.final_layer(x, adaln_input)
            p = self.patch_size
            return x[:, cap_len:].view(x.shape[0], H_ // p, W_ // p, p, p, self.out_channels) \
                .permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
        x_is_tensor = isinstance(x, torch.Tensor)
        x, mask, img_size, cap_size, freqs_cis = self.patchify_and_embed(x, cap_feats, cap_mask, t)
        freqs_cis = freqs_cis.to(x.device)
        for layer in self.layers:
            x = layer(x, mask, freqs_cis, adaln_input)
        x = self.final_layer(x, adaln_input)
        return self.unpatchify(x, img_size, cap_size, return_tensor=x_is_tensor)


def _lumina_build(static):
    return lambda seed: _seeded_build(seed, lambda: NextDiT(static_caption=static))


def _lumina_inputs(padded):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
        if padded:
            mask[0, 5:] = 0
        return dict(x=r.randn(batch, 4, H, W), t=r.timestep(batch, 1.0), cap_feats=r.randn(batch, TEXT_LEN, 24),
                    cap_mask=mask)
    return inputs


_N2 = (H // 2) * (W // 2)   # 24
_NV = F * (VH // 2) * (VW // 2)  # 48

PLAIN_PRODUCTION_FAMILIES: list[Family] = [
    Family("plain_hunyuan_video", "Tencent/HunyuanVideo hyvideo HYVideoDiffusionTransformer (flash-varlen mask)",
           _hy_video_build(True), _hy_video_inputs, "x", _NV, (1, 2, 2), _same_as("x"), context_after=TEXT_LEN,
           timestep_arg="t",
           notes="Conv3d patch embed; token refiner with masked self-attn; double blocks (img RoPE, joint attention "
                 "with the varlen mask [B,1,L,L]); single blocks (linear1 split by sizes, q[:, :-txt_len]); "
                 "einsum unpatchify; dict output"),
    Family("plain_ltx_video", "Lightricks/LTX-Video ltx_video Transformer3DModel", _ltx_build, _ltx_inputs(False),
           "hidden_states", F * VH * VW, None, _same_as("hidden_states"), timestep_arg="timestep",
           notes="tokens in; RoPE computed in forward from indices_grid [B, 3, N]; q/k RMSNorm over all heads; "
                 "adaLN single with [B, 1, 6D]; masked cross-attention (bias)"),
    Family("plain_ltx_video_i2v", "Lightricks/LTX-Video Transformer3DModel, per-token timestep (i2v conditioning)",
           _ltx_build, _ltx_inputs(True), "hidden_states", F * VH * VW, None, _same_as("hidden_states"),
           timestep_arg="timestep", notes="timestep [B, N]: adaLN values per token"),
    Family("plain_hunyuan_dit", "Tencent/HunyuanDiT hydit HunYuanDiT", _hydit_build, _hydit_inputs, "x", _N2, (2, 2),
           _channels_times("x", 2), timestep_arg="t",
           notes="hand-written attention; RoPE tables as inputs; cross-attn with RoPE on q, k permuted to "
                 "[B,H,C,L]; long skips (cat + skip_norm + skip_linear); AttentionPool; size/style cond"),
    Family("plain_lumina2_loop", "Alpha-VLLM/Lumina-Image-2.0 NextDiT (as written: per-sample loop, .tolist())",
           _lumina_build(False), _lumina_inputs(True), "x", _N2, (2, 2), _same_as("x"), context_before=TEXT_LEN,
           timestep_arg="t", notes="captions of 5 and 7 rows before the image: rows reordered image first"),
    Family("plain_lumina2_padded", "Lumina-Image-2.0 NextDiT batched, padded captions kept in the sequence",
           _lumina_build(True), _lumina_inputs(True), "x", _N2, (2, 2), _same_as("x"), context_before=TEXT_LEN,
           timestep_arg="t", notes="as static, with a 0 in cap_mask (padding masked as keys)"),
]
