"""Tiny random-weight diffusers transformers of many families, for a conformance suite.

This module holds the record, the helpers and the first 37 families; ``conformance_image``,
``conformance_video`` and ``conformance_audio`` hold the families of newer classes and are
appended to :data:`FAMILIES` here.

Every entry of :data:`FAMILIES` is explicit data: how to build the model (a real diffusers
class from a tiny config, random weights from a seed, eval mode, fp32, well under 1M
parameters), how to make deterministic forward kwargs for it, which kwarg holds the noisy
latent, how many image tokens the example latent makes, and where those tokens sit in an
attention key sequence. Nothing here branches on a class name.

Geometry is fixed per family (batch and seed vary): 2D latents are 8 x 12 latent pixels
(8 x 8 where the model wants a square latent), videos a few frames of 8 x 8, text is
``TEXT_LEN = 7`` tokens (prime: never the token count of an image grid of at least 2 x 2).

Weights: every ``nn.Linear`` is re-drawn N(0, 1/fan_in) (see :func:`_variance_preserving_init`)
so attention moves the output by 10-45% (AuraFlow ~3%, by its architecture); with PyTorch's
default init it moved it by ~1%, too little for a conformance test to notice a broken rewrite.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

TEXT_LEN = 7


# --------------------------------------------------------------------------- the record


@dataclass(frozen=True)
class Family:
    """One architecture with fixed example geometry.

    ``image_rows(seq_len)`` says where image tokens sit in a self / joint attention key
    sequence of length ``seq_len``: the whole sequence when it is exactly the image tokens,
    ``slice(context_before, context_before + num_tokens)`` for a joint sequence of
    ``context_before + num_tokens + context_after`` tokens, else ``None`` (cross-attention
    to text, text-only refiners, temporal attention over frames, ...).
    """

    name: str
    cls_name: str                      # the diffusers class (documentation only; never branched on)
    build: Callable[[int], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, int, int], dict]
    latent_arg: str
    num_tokens: int                    # image tokens in one image self-attention sequence
    patch: tuple[int, ...] | None      # patch size per latent axis ((t,) h, w); None: latent passed as tokens
    output_shape: Callable[[dict], tuple[int, ...]]  # expected shape of out[0] given the inputs
    context_before: int = 0            # non-image tokens before the image in joint attention
    context_after: int = 0             # non-image tokens after the image in joint attention
    notes: str = ""
    timestep_arg: str = "timestep"     # the forward argument holding the timestep
    extra_image_lengths: tuple[int, ...] = field(default=())  # other seq lengths that are image-only
    # (rtol, atol) of "equals the model": fp32 rounding, unless the model computes part of its forward in
    # bf16 itself (a gathered layout may move a sum across a bf16 rounding boundary: one ulp, ~4e-3 at 2)
    tolerance: tuple[float, float] = (1e-5, 1e-5)

    def image_rows(self, seq_len: int) -> slice | None:
        n = self.num_tokens
        if seq_len == n or seq_len in self.extra_image_lengths:
            return slice(0, seq_len)
        if (self.context_before or self.context_after) and seq_len == self.context_before + n + self.context_after:
            return slice(self.context_before, self.context_before + n)
        return None

    def num_params(self, model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- helpers


def _seeded_build(seed: int, make: Callable[[], torch.nn.Module],
                  reinit: tuple[tuple[str, float], ...] = ()) -> torch.nn.Module:
    """Build under ``seed``, eval mode, fp32.

    ``reinit`` lists ``(parameter name, std)`` to draw from N(0, std^2): parameters diffusers makes
    with ``torch.empty`` (garbage memory, not deterministic) or zeros that a trained checkpoint
    fills (a zero gate or zero RoPE frequencies would hide a whole code path).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
        with torch.no_grad():
            for name, std in reinit:
                model.get_parameter(name).normal_(std=std)
            _variance_preserving_init(model)
    return model.float().eval()


def _variance_preserving_init(model: torch.nn.Module) -> None:
    """Every ``nn.Linear`` weight ~ N(0, 1/fan_in) (PyTorch's default is ~1/sqrt(3) of that).

    With the default init the adaLN modulation chain (timestep MLP -> SiLU -> Linear) gives gates
    of ~0.05, so a tiny model's attention moves its output by only ~1%: a conformance test could
    not tell a correct attention rewrite from a broken one. One rule for every class.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.normal_(std=module.in_features ** -0.5)


class _Rand:
    """Deterministic random tensors from one generator."""

    def __init__(self, seed: int):
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def timestep(self, batch: int, scale: float = 999.0) -> torch.Tensor:
        return torch.rand(batch, generator=self.gen) * scale

    def randint(self, high: int, batch: int) -> torch.Tensor:
        return torch.randint(0, high, (batch,), generator=self.gen)


def _same_as(key: str) -> Callable[[dict], tuple[int, ...]]:
    return lambda kw: tuple(kw[key].shape)


def _channels_times(key: str, factor: int, dim: int = 1) -> Callable[[dict], tuple[int, ...]]:
    def shape(kw):
        s = list(kw[key].shape)
        s[dim] *= factor
        return tuple(s)
    return shape


# 2D geometry
H, W = 8, 12           # latent pixels
SQ = 8                 # square latent side (DiT, LuminaNext)
# video geometry
F, VH, VW = 3, 8, 8    # latent frames, height, width


# --------------------------------------------------------------------------- DiT


def _dit_build(seed):
    from diffusers import DiTTransformer2DModel
    return _seeded_build(seed, lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=SQ, patch_size=2, num_embeds_ada_norm=10))


def _dit_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, SQ, SQ), timestep=r.randint(1000, batch),
                class_labels=r.randint(10, batch), return_dict=False)


# --------------------------------------------------------------------------- PixArt


def _pixart_build(seed):
    from diffusers import PixArtTransformer2DModel
    return _seeded_build(seed, lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=2,
        use_additional_conditions=False))


def _pixart_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False)


# --------------------------------------------------------------------------- SD3 / SD3.5


def _sd3_build_with(qk_norm, dual):
    def build(seed):
        from diffusers import SD3Transformer2DModel
        return _seeded_build(seed, lambda: SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
            pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual))
    return build


def _sd3_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                pooled_projections=r.randn(batch, 24), timestep=r.timestep(batch), return_dict=False)


# --------------------------------------------------------------------------- Flux


def _flux_build(seed):
    from diffusers import FluxTransformer2DModel
    return _seeded_build(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6)))


def _flux_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2      # a 4-channel 8x12 latent packed 2x2 -> 4x6 tokens of 16 channels
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                pooled_projections=r.randn(batch, 24), timestep=r.timestep(batch, 1.0),
                img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(TEXT_LEN, 3),
                guidance=torch.full((batch,), 3.5), return_dict=False)


# --------------------------------------------------------------------------- Lumina-Next


def _lumina_next_build(seed):
    from diffusers import LuminaNextDiT2DModel
    return _seeded_build(seed, lambda: LuminaNextDiT2DModel(
        sample_size=SQ, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, norm_eps=1e-5, learn_sigma=True, qk_norm=True, cross_attention_dim=32),
        # pad_token: torch.empty; the cross-attention gates (tanh) start at zero
        reinit=(("pad_token", 0.02), ("layers.0.gate", 1.0), ("layers.1.gate", 1.0)))


def _lumina_next_inputs(model, batch, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    r = _Rand(seed)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return dict(hidden_states=r.randn(batch, 4, SQ, SQ), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                # the pipeline builds a 384 x 384 table; a small one covering the grid is the same rows
                image_rotary_emb=get_2d_rotary_pos_embed_lumina(head_dim, 16, 16),
                # proportional attention: softmax scale sqrt(log_base(seq_len)) * 1/sqrt(d)
                cross_attention_kwargs={"base_sequence_length": 16},
                return_dict=False)


# --------------------------------------------------------------------------- Sana


def _sana_build(seed):
    from diffusers import SanaTransformer2DModel
    return _seeded_build(seed, lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=16, patch_size=1))


def _sana_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), return_dict=False)


# --------------------------------------------------------------------------- HunyuanDiT


def _hunyuan_dit_build(seed):
    from diffusers import HunyuanDiT2DModel
    return _seeded_build(seed, lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=16,
        hidden_size=16, num_layers=2, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32,
        cross_attention_dim_t5=24, pooled_projection_dim=16, text_len=TEXT_LEN, text_len_t5=TEXT_LEN,
        use_style_cond_and_image_meta_size=False))


def _hunyuan_dit_inputs(model, batch, seed):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid
    r = _Rand(seed)
    p = model.config.patch_size
    grid = (H // p, W // p)
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // p)
    rope = get_2d_rotary_pos_embed(model.inner_dim // model.num_heads, crops, grid, output_type="pt")
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                text_embedding_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                encoder_hidden_states_t5=r.randn(batch, TEXT_LEN, 24),
                text_embedding_mask_t5=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                image_meta_size=None, style=None, image_rotary_emb=rope, return_dict=False)


# --------------------------------------------------------------------------- AuraFlow


def _auraflow_build(seed):
    from diffusers import AuraFlowTransformer2DModel
    return _seeded_build(seed, lambda: AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        out_channels=4, pos_embed_max_size=64))


def _auraflow_inputs(model, batch, seed):
    r = _Rand(seed)
    # the pipeline passes t / 1000: the timestep embedding multiplies by 1000 itself
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), return_dict=False)


# --------------------------------------------------------------------------- Lumina2


def _lumina2_build(seed):
    from diffusers import Lumina2Transformer2DModel
    return _seeded_build(seed, lambda: Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32), cap_feat_dim=32))


def _lumina2_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool), return_dict=False)


# --------------------------------------------------------------------------- CogView4


def _cogview4_build(seed):
    from diffusers import CogView4Transformer2DModel
    return _seeded_build(seed, lambda: CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=16,
        rope_axes_dim=(32, 32)))


def _cogview4_inputs(model, batch, seed):
    r = _Rand(seed)
    size = torch.tensor([[H * 8.0, W * 8.0]]).repeat(batch, 1)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), original_size=size, target_size=size.clone(),
                crop_coords=torch.zeros(batch, 2), return_dict=False)


# --------------------------------------------------------------------------- LTX-Video


def _ltx_build(seed):
    from diffusers import LTXVideoTransformer3DModel
    return _seeded_build(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=32))


def _ltx_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, F * VH * VW, 8), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                num_frames=F, height=VH, width=VW, rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)


# --------------------------------------------------------------------------- CogVideoX


def _cogvideox_build(seed):
    from diffusers import CogVideoXTransformer3DModel
    return _seeded_build(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=VW, sample_height=VH, sample_frames=(F - 1) * 4 + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN))


def _cogvideox_inputs(model, batch, seed):
    r = _Rand(seed)
    # CogVideoX takes [B, F, C, H, W] (frames before channels)
    return dict(hidden_states=r.randn(batch, F, 4, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.randint(1000, batch), return_dict=False)


# --------------------------------------------------------------------------- Latte


def _latte_build(seed):
    from diffusers import LatteTransformer3DModel
    return _seeded_build(seed, lambda: LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=VH, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=32, video_length=F))


def _latte_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), enable_temporal_attentions=True,
                return_dict=False)


# --------------------------------------------------------------------------- Wan


def _wan_build(seed):
    from diffusers import WanTransformer3DModel
    return _seeded_build(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32))


def _wan_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), return_dict=False)


# --------------------------------------------------------------------------- Allegro


def _allegro_build(seed):
    from diffusers import AllegroTransformer3DModel
    return _seeded_build(seed, lambda: AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=24, sample_height=VH, sample_width=VW, sample_frames=F,
        caption_channels=32))


def _allegro_inputs(model, batch, seed):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro
    r = _Rand(seed)
    c = model.config
    gh, gw = VH // c.patch_size, VW // c.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=c.attention_head_dim, crops_coords=((0, 0), (gh, gw)), grid_size=(gh, gw), temporal_size=F,
        interpolation_scale=(c.interpolation_scale_t, c.interpolation_scale_h, c.interpolation_scale_w))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    rope = ((freqs_t, freqs_h, freqs_w), tuple(pos))
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                image_rotary_emb=rope, return_dict=False)


# --------------------------------------------------------------------------- Mochi


def _mochi_build(seed):
    from diffusers import MochiTransformer3DModel
    return _seeded_build(seed, lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=32, time_embed_dim=16, max_sequence_length=TEXT_LEN),
        reinit=(("pos_frequencies", 1.0),))  # learned RoPE frequencies start at zero (RoPE = identity)


def _mochi_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), encoder_attention_mask=_prompt_mask(batch), return_dict=False)


# --------------------------------------------------------------------------- HunyuanVideo


def _hunyuan_video_build(seed):
    from diffusers import HunyuanVideoTransformer3DModel
    return _seeded_build(seed, lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(4, 6, 6)))


def _hunyuan_video_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                pooled_projections=r.randn(batch, 24), guidance=torch.full((batch,), 6000.0), return_dict=False)


# --------------------------------------------------------------------------- Stable Audio (1D)

AUDIO_LEN = 24


def _stable_audio_build(seed):
    from diffusers import StableAudioDiTModel
    return _seeded_build(seed, lambda: StableAudioDiTModel(
        sample_size=AUDIO_LEN, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=24, cross_attention_input_dim=32))


def _stable_audio_inputs(model, batch, seed):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    r = _Rand(seed)
    rope = get_1d_rotary_pos_embed(model.config.attention_head_dim // 2, AUDIO_LEN + 1, use_real=True,
                                   repeat_interleave_real=False)
    # the cosine DPM-solver's timesteps are atan(sigma) * 2 / pi, in [0, 1]
    return dict(hidden_states=r.randn(batch, 4, AUDIO_LEN), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), global_hidden_states=r.randn(batch, 1, 24),
                rotary_embedding=rope, return_dict=False)


# --------------------------------------------------------------------------- QwenImage


def _qwen_image_build(seed):
    from diffusers import QwenImageTransformer2DModel
    return _seeded_build(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))


def _qwen_image_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2      # a 4-channel 8x12 latent packed 2x2 -> 4x6 tokens of 16 channels
    # the pipeline passes t / 1000 and img_shapes [[(1, h, w)]] * batch
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_hidden_states_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                timestep=r.timestep(batch, 1.0), img_shapes=[[(1, h, w)]] * batch, return_dict=False)


# --------------------------------------------------------------------------- Chroma


def _chroma_build(seed):
    from diffusers import ChromaTransformer2DModel
    return _seeded_build(seed, lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1))


def _chroma_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    # the pipeline's attention_mask covers the joint sequence: text mask, then ones for the image tokens
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(TEXT_LEN, 3),
                attention_mask=torch.ones(batch, TEXT_LEN + h * w, dtype=torch.bool), return_dict=False)


# --------------------------------------------------------------------------- CogView3-Plus


def _cogview3plus_build(seed):
    from diffusers import CogView3PlusTransformer2DModel
    return _seeded_build(seed, lambda: CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=16))


def _cogview3plus_inputs(model, batch, seed):
    r = _Rand(seed)
    size = torch.tensor([[H * 8.0, W * 8.0]]).repeat(batch, 1)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), original_size=size, target_size=size.clone(),
                crop_coords=torch.zeros(batch, 2), return_dict=False)


# --------------------------------------------------------------------------- HiDream-I1


def _hidream_build(seed):
    from diffusers import HiDreamImageTransformer2DModel
    return _seeded_build(seed, lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[24, 32], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(2, 2, 4), max_resolution=(16, 16), llama_layers=[0, 1]))


def _hidream_inputs(model, batch, seed):
    r = _Rand(seed)
    n_llama = len(model.config.llama_layers)
    # the pipeline passes the stacked hidden states of the Llama layers [L, B, T, C] and the scheduler's timestep
    return dict(hidden_states=r.randn(batch, 4, SQ, SQ), timesteps=r.timestep(batch),
                encoder_hidden_states_t5=r.randn(batch, TEXT_LEN, 24),
                encoder_hidden_states_llama3=r.randn(n_llama, batch, TEXT_LEN, 32),
                pooled_embeds=r.randn(batch, 16), return_dict=False)


def _hidream_dense_build(seed):
    from diffusers import HiDreamImageTransformer2DModel
    return _seeded_build(seed, lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[24, 32], text_emb_dim=16, num_routed_experts=0,
        num_activated_experts=0, axes_dims_rope=(2, 2, 4), max_resolution=(16, 16), llama_layers=[0, 1]))


# --------------------------------------------------------------------------- Flux.2


def _flux2_build(seed):
    from diffusers import Flux2Transformer2DModel
    return _seeded_build(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True))


def _flux2_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2      # a 4-channel 8x12 latent packed 2x2 -> 4x6 tokens of 16 channels
    # the pipeline's 4-axis ids (t, h, w, l), [B, S, 4]: image (0, y, x, 0), text (0, 0, 0, i)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT_LEN))
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), img_ids=img_ids.expand(batch, -1, -1),
                txt_ids=txt_ids.expand(batch, -1, -1), guidance=torch.full((batch,), 4.0), return_dict=False)


# --------------------------------------------------------------------------- Z-Image

ZW = 16                # Z-Image pads each sequence to a multiple of 32 tokens: an 8x16 latent is exactly 32


def _z_image_build(seed, frame_positions: int = 64):
    """``frame_positions``: the length of the first RoPE axis, which numbers the caption rows and then the
    image (a 64-row caption puts the image at position 65)."""
    from diffusers import ZImageTransformer2DModel
    return _seeded_build(seed, lambda: ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[frame_positions, 32, 32]),
        # pad tokens: torch.empty
        reinit=(("x_pad_token", 0.02), ("cap_pad_token", 0.02)))


def _z_image_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the pipeline: a list of per-sample [C, 1, H, W] latents, a list of per-sample [T, C] caption
    # features, timestep (1000 - t) / 1000 in [0, 1] with 1 = clean image
    return dict(x=list(r.randn(batch, 4, 1, H, ZW).unbind(0)), t=r.timestep(batch, 1.0),
                cap_feats=list(r.randn(batch, TEXT_LEN, 32).unbind(0)), return_dict=False)


# --------------------------------------------------------------------------- Cosmos (1.0 / Predict2 DiT)


def _cosmos_build(seed):
    from diffusers import CosmosTransformer3DModel
    return _seeded_build(seed, lambda: CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
        # the shipped configs concatenate a padding-mask channel, resized with torchvision (not installed here)
        concat_padding_mask=False, extra_pos_embed_type="learnable"))


def _cosmos_inputs(model, batch, seed):
    r = _Rand(seed)
    # EDM: the pipeline's timestep is the scheduler's c_noise (a small real number), fps an int
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), fps=30, return_dict=False)


# --------------------------------------------------------------------------- SkyReels-V2 (diffusion forcing)


def _skyreels_v2_build(seed):
    from diffusers import SkyReelsV2Transformer3DModel
    return _seeded_build(seed, lambda: SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, inject_sample_info=False,
        num_frame_per_block=1))


def _skyreels_v2_inputs(model, batch, seed):
    r = _Rand(seed)
    # the diffusion-forcing pipeline: one timestep per latent frame [B, F]
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch * F).view(batch, F),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), enable_diffusion_forcing=True,
                return_dict=False)


# --------------------------------------------------------------------------- EasyAnimate


def _easyanimate_build(seed):
    from diffusers import EasyAnimateTransformer3DModel
    return _seeded_build(seed, lambda: EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=VW,
        sample_height=VH, num_layers=2, mmdit_layers=1, time_embed_dim=16, add_norm_text_encoder=True,
        text_embed_dim=32, text_embed_dim_t5=None, after_norm=False, time_position_encoding_type="3d_rope"))


def _easyanimate_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), return_dict=False)


# --------------------------------------------------------------------------- OmniGen


def _omnigen_build(seed):
    from diffusers import OmniGenTransformer2DModel
    head_half = 16 // 2 // 2       # rotary factors: one per frequency (head_dim / 2)
    return _seeded_build(seed, lambda: OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, num_layers=2, pad_token_id=0, vocab_size=64, max_position_embeddings=131072,
        original_max_position_embeddings=4096, pos_embed_max_size=16, time_step_dim=16,
        rope_scaling={"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(head_half)],
                      "long_factor": [2.0 + 0.1 * i for i in range(head_half)]}))


def _omnigen_inputs(model, batch, seed):
    r = _Rand(seed)
    n = (H // 2) * (W // 2)
    s = TEXT_LEN + 1 + n
    # as OmniGenCollator for text-to-image with unpadded prompts: sequence = prompt tokens, one time token,
    # image tokens; causal over prompt + time token, image rows see everything; positions 0..S-1
    mask = torch.zeros(s, s)
    mask[: TEXT_LEN + 1, : TEXT_LEN + 1] = torch.tril(torch.ones(TEXT_LEN + 1, TEXT_LEN + 1))
    mask[TEXT_LEN + 1:, :] = 1.0
    ids = torch.randint(1, model.config.vocab_size, (batch, TEXT_LEN), generator=r.gen)
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch, 1.0), input_ids=ids,
                input_img_latents=[], input_image_sizes={}, attention_mask=mask.expand(batch, s, s).clone(),
                position_ids=torch.arange(s).expand(batch, s).clone(), return_dict=False)


# --------------------------------------------------------------------------- HunyuanImage-2.1


def _hunyuan_image_build(seed):
    from diffusers import HunyuanImageTransformer2DModel
    return _seeded_build(seed, lambda: HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), qk_norm="rms_norm",
        guidance_embeds=False, text_embed_dim=32, text_embed_2_dim=None, rope_axes_dim=(8, 8)))


def _hunyuan_image_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long), return_dict=False)


# --------------------------------------------------------------------------- Bria 3.x


def _packed_img_ids(h, w, start=(0, 0), modality=0.0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = modality
    ids[..., 1] = torch.arange(h)[:, None] + start[0]
    ids[..., 2] = torch.arange(w)[None, :] + start[1]
    return ids.reshape(h * w, 3)


def _bria_build(seed):
    from diffusers import BriaTransformer2DModel
    return _seeded_build(seed, lambda: BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, guidance_embeds=False,
        axes_dims_rope=[4, 6, 6]))


def _bria_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    # the pipeline passes 3D ids [B, S, 3] (text all zeros) and the scheduler's timestep unscaled
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), img_ids=_packed_img_ids(h, w).expand(batch, -1, -1),
                txt_ids=torch.zeros(batch, TEXT_LEN, 3), return_dict=False)


# --------------------------------------------------------------------------- LongCat-Image


def _longcat_image_build(seed):
    from diffusers import LongCatImageTransformer2DModel
    return _seeded_build(seed, lambda: LongCatImageTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]))


def _longcat_image_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    # the pipeline's ids: text (0, i, i); image (1, y + L, x + L) with L the tokenizer max length (512)
    txt_ids = torch.zeros(TEXT_LEN, 3)
    txt_ids[:, 1] = torch.arange(TEXT_LEN)
    txt_ids[:, 2] = torch.arange(TEXT_LEN)
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), img_ids=_packed_img_ids(h, w, (512, 512), 1.0), txt_ids=txt_ids,
                return_dict=False)


# --------------------------------------------------------------------------- Wan-VACE


def _wan_vace_build(seed):
    from diffusers import WanVACETransformer3DModel
    return _seeded_build(seed, lambda: WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, vace_layers=[0, 1],
        vace_in_channels=12))


def _wan_vace_inputs(model, batch, seed):
    r = _Rand(seed)
    # control latent: the pipeline's [inactive video, reactive video, 8x8-unshuffled mask] channels, same grid
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                control_hidden_states=r.randn(batch, 12, F, VH, VW),
                control_hidden_states_scale=torch.tensor([1.0, 0.5]), return_dict=False)


# --------------------------------------------------------------------------- Sana-Video


def _sana_video_build(seed):
    from diffusers import SanaVideoTransformer3DModel
    return _seeded_build(seed, lambda: SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=VH, patch_size=(1, 2, 2), rope_max_seq_len=32))


def _sana_video_inputs(model, batch, seed):
    r = _Rand(seed)
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), encoder_attention_mask=_prompt_mask(batch), return_dict=False)


def _prompt_mask(batch):
    """A padded prompt's mask: sample ``i`` has ``TEXT_LEN - 2 * i`` valid tokens (at least 1), as a
    batch of prompts of different lengths (or a prompt and an empty negative prompt) has."""
    return (torch.arange(TEXT_LEN)[None] < torch.tensor([max(1, TEXT_LEN - 2 * i) for i in range(batch)])[:, None]).long()


# --------------------------------------------------------------------------- Kandinsky 5


def _kandinsky5_build(seed):
    from diffusers import Kandinsky5Transformer3DModel
    return _seeded_build(seed, lambda: Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=32, in_text_dim2=24, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
        attention_type="regular"))


def _kandinsky5_inputs(model, batch, seed):
    r = _Rand(seed)
    # channels-last latent [B, F, H, W, C]; rope positions as the pipeline builds them (token grid per axis);
    # scale_factor (1, 2, 2) is the pipeline's value for 480p
    return dict(hidden_states=r.randn(batch, F, VH, VW, 4), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), pooled_projections=r.randn(batch, 24),
                visual_rope_pos=[torch.arange(F), torch.arange(VH // 2), torch.arange(VW // 2)],
                text_rope_pos=torch.arange(TEXT_LEN), scale_factor=(1.0, 2.0, 2.0), sparse_params=None,
                # return_dict=False returns the bare tensor (not a tuple); the output object indexes like one
                return_dict=True)


# --------------------------------------------------------------------------- ConsisID


CONSISID_VIT_TOKENS = 5


def _consisid_build(seed):
    from diffusers import ConsisIDTransformer3DModel
    # face conditioning on: its perceiver output width must be 2/3 of the transformer width (48 -> 32)
    return _seeded_build(seed, lambda: ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
        text_embed_dim=32, num_layers=2, sample_width=VW, sample_height=VH, sample_frames=(F - 1) * 4 + 1,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True, is_train_face=True,
        is_kps=False, cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=16,
        LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4,
        LFE_output_dim=32, LFE_ff_mult=2, LFE_num_scale=2))


def _consisid_inputs(model, batch, seed):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.consisid.pipeline_consisid import get_resize_crop_region_for_grid
    r = _Rand(seed)
    c = model.config
    gh, gw = VH // c.patch_size, VW // c.patch_size
    crops = get_resize_crop_region_for_grid((gh, gw), c.sample_width // c.patch_size, c.sample_height // c.patch_size)
    rope = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                   temporal_size=F)
    # [B, F, C, H, W]: noisy latent (4 ch) concatenated with the reference image latent (4 ch); the face
    # embedding id_cond [B, id_dim] and per-scale ViT hidden states, as process_face_embeddings gives them
    return dict(hidden_states=r.randn(batch, F, 8, VH, VW), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.randint(1000, batch), image_rotary_emb=rope, id_cond=r.randn(batch, c.LFE_id_dim),
                id_vit_hidden=[r.randn(batch, CONSISID_VIT_TOKENS, c.LFE_vit_dim) for _ in range(c.LFE_num_scale)],
                return_dict=False)


# --------------------------------------------------------------------------- the registry

_P2 = (2, 2)
_N2 = (H // 2) * (W // 2)          # 24 tokens of an 8x12 latent at patch 2
_NSQ = (SQ // 2) ** 2              # 16 tokens of an 8x8 latent at patch 2
_NV = F * (VH // 2) * (VW // 2)    # 48 tokens of a 3x8x8 video at patch (1, 2, 2)

FAMILY_LIST: list[Family] = [
    Family("dit", "DiTTransformer2DModel", _dit_build, _dit_inputs, "hidden_states", _NSQ, _P2,
           _channels_times("hidden_states", 2),
           notes="class-conditional (class_labels), integer timestep; learned sigma: out has 2x channels; "
                 "unpatchify assumes a square latent, so inputs are 8x8"),
    Family("pixart", "PixArtTransformer2DModel", _pixart_build, _pixart_inputs, "hidden_states", _N2, _P2,
           _channels_times("hidden_states", 2),
           notes="adaLN-single; cross-attention to text; added_cond_kwargs with None entries; learned sigma"),
    Family("sd3", "SD3Transformer2DModel", _sd3_build_with(None, ()), _sd3_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="MMDiT joint attention: image tokens first, then text"),
    Family("sd35", "SD3Transformer2DModel", _sd3_build_with("rms_norm", (0,)), _sd3_inputs, "hidden_states",
           _N2, _P2, _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="SD3.5-style: RMS qk-norm; layer 0 has a second image-only self-attention (attn2)"),
    Family("flux", "FluxTransformer2DModel", _flux_build, _flux_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="latent passed packed [B, N, C] (2x2 patches of a 4-channel latent); img_ids / txt_ids are 2D "
                 "[N, 3]; timestep in [0, 1] (scaled by 1000 inside); guidance-distilled (guidance kwarg); "
                 "joint attention text first, then image, in both double and single blocks; real RoPE "
                 "(cos, sin) from the ids"),
    Family("lumina_next", "LuminaNextDiT2DModel", _lumina_next_build, _lumina_next_inputs, "hidden_states",
           _NSQ, _P2, _channels_times("hidden_states", 2),
           notes="needs image_rotary_emb precomputed (complex freqs_cis from get_2d_rotary_pos_embed_lumina); "
                 "GQA (num_kv_heads=1 of 2 heads); proportional attention: cross_attention_kwargs "
                 "base_sequence_length makes the softmax scale depend on the sequence length; timestep in "
                 "[0, 1] with 1 = clean image; self- and cross-attention outputs are summed before to_out; "
                 "learned sigma; unpatchify assumes square"),
    Family("sana", "SanaTransformer2DModel", _sana_build, _sana_inputs, "hidden_states", H * W, (1, 1),
           _same_as("hidden_states"),
           notes="linear (ReLU-kernel) self-attention, not softmax; patch 1; the Mix-FFN (GLUMBConv) runs a "
                 "depthwise 3x3 conv over the token grid, so tokens mix spatially outside attention"),
    Family("hunyuan_dit", "HunyuanDiT2DModel", _hunyuan_dit_build, _hunyuan_dit_inputs, "hidden_states", _N2, _P2,
           _channels_times("hidden_states", 2),
           notes="needs image_rotary_emb precomputed (get_2d_rotary_pos_embed with the pipeline's crop region); "
                 "two text streams (CLIP-like + T5) with masks, concatenated for cross-attention (14 keys); "
                 "long skip connections between first and second half of blocks; learned sigma; "
                 "v1.2 config (no style / image_meta_size)"),
    Family("auraflow", "AuraFlowTransformer2DModel", _auraflow_build, _auraflow_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=8 + TEXT_LEN,
           notes="8 learned register tokens are prepended to the text: joint sequence is registers, text, image; "
                 "MMDiT blocks then single-stream DiT blocks; timestep in [0, 1]; the attention output "
                 "reaches the residual stream only through the feed-forward (norm2(residual + gate * attn) "
                 "feeds ff, the residual skips attn), so attention moves the output only ~3% here"),
    Family("lumina2", "Lumina2Transformer2DModel", _lumina2_build, _lumina2_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="GQA (num_kv_heads=1 of 2); complex RoPE computed inside from position ids; image-only noise "
                 "refiner, text-only context refiner, then joint blocks with text first; the effective text "
                 "length is the mask sum; timestep in [0, 1] with 1 = clean image; supports proportional "
                 "attention via attention_kwargs base_sequence_length"),
    Family("cogview4", "CogView4Transformer2DModel", _cogview4_build, _cogview4_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="needs original_size / target_size / crop_coords [B, 2]; joint attention text first; RoPE "
                 "computed inside (from the latent's grid)"),
    Family("ltx_video", "LTXVideoTransformer3DModel", _ltx_build, _ltx_inputs, "hidden_states", F * VH * VW, None,
           _same_as("hidden_states"),
           notes="latent passed packed [B, F*H*W, C] with num_frames / height / width ints; "
                 "rope_interpolation_scale (as the pipeline: temporal 8/frame_rate, spatial 32); patch 1; "
                 "self-attention over all video tokens, cross-attention to text; qk RMS-norm across heads"),
    Family("cogvideox", "CogVideoXTransformer3DModel", _cogvideox_build, _cogvideox_inputs, "hidden_states", _NV,
           (1, 2, 2), _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="latent is [B, F, C, H, W] (frames before channels); integer timestep; joint attention text "
                 "first (text length must equal max_text_seq_length when using sincos positions); "
                 "no RoPE in this (1.0, 2B-style) config"),
    Family("latte", "LatteTransformer3DModel", _latte_build, _latte_inputs, "hidden_states", (VH // 2) * (VW // 2),
           _P2, _channels_times("hidden_states", 2),
           notes="factorised attention: spatial blocks attend within a frame (num_tokens = tokens per frame, "
                 "batch*frames sequences), temporal blocks attend across the F frames at each position "
                 "(image_rows returns None for those); cross-attention to text in spatial blocks; learned sigma. "
                 "Frames are folded into the batch before the patch embedding: tokens are tubes (one patch "
                 "position in every frame); the temporal blocks fold the token axis into the batch"),
    Family("wan", "WanTransformer3DModel", _wan_build, _wan_inputs, "hidden_states", _NV, (1, 2, 2),
           _same_as("hidden_states"),
           notes="self-attention over all video tokens with complex 3D RoPE, cross-attention to text; qk RMS-norm "
                 "across heads"),
    Family("allegro", "AllegroTransformer3DModel", _allegro_build, _allegro_inputs, "hidden_states", _NV, (1, 2, 2),
           _same_as("hidden_states"),
           notes="needs image_rotary_emb precomputed (get_3d_rotary_pos_embed_allegro freqs + integer grid "
                 "positions, as the pipeline builds it); head_dim must split in 3 even parts (t, h, w) so 2 x 12; self-attention over video, cross-attention to text"),
    Family("mochi", "MochiTransformer3DModel", _mochi_build, _mochi_inputs, "hidden_states", _NV, (1, 2, 2),
           _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="asymmetric joint attention: image first, then only the valid (mask) text tokens, per sample in "
                 "a Python loop; text stream is narrower than the image stream; RoPE computed inside"),
    Family("hunyuan_video", "HunyuanVideoTransformer3DModel", _hunyuan_video_build, _hunyuan_video_inputs,
           "hidden_states", _NV, (1, 2, 2), _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="token refiner on text first (text-only attention); double then single stream blocks, joint "
                 "sequence image first then text; guidance-distilled (guidance kwarg, x1000 scale); RoPE "
                 "computed inside"),
    Family("stable_audio", "StableAudioDiTModel", _stable_audio_build, _stable_audio_inputs, "hidden_states",
           AUDIO_LEN, (1,), _same_as("hidden_states"), context_before=1,
           notes="1D latent [B, C, L]; one global (timestep + conditioning) token is prepended to the sequence, "
                 "so self-attention is 1 + L keys with image rows 1..L; needs rotary_embedding precomputed "
                 "(real cos/sin over L+1 positions); GQA (1 kv head of 2); cross-attention to text"),
    Family("qwen_image", "QwenImageTransformer2DModel", _qwen_image_build, _qwen_image_inputs, "hidden_states", _N2,
           None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="latent passed packed [B, N, C] (2x2 patches of a 4-channel latent) with img_shapes "
                 "[[(1, h, w)]] * B (a Python list, read for RoPE); timestep in [0, 1] (x1000 inside); "
                 "double-stream blocks only, joint attention text first then image; complex RoPE (centred "
                 "image positions, text positions after the image's max index); text RMS-norm before txt_in; "
                 "encoder_hidden_states_mask builds a joint [B, 1, 1, T + N] boolean mask inside the processor"),
    Family("chroma", "ChromaTransformer2DModel", _chroma_build, _chroma_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux-like (double then single stream, text first, img_ids / txt_ids 2D [N, 3], packed latent, "
                 "timestep in [0, 1]); no pooled text / guidance: modulation comes from a distilled "
                 "approximator MLP per layer; attention_mask [B, T + N] covers the joint sequence (text mask "
                 "then ones for image tokens) and is expanded to an outer-product [B, 1, T+N, T+N] mask"),
    Family("cogview3plus", "CogView3PlusTransformer2DModel", _cogview3plus_build, _cogview3plus_inputs,
           "hidden_states", _N2, _P2, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="needs original_size / target_size / crop_coords [B, 2]; joint attention text first (CogVideoX "
                 "processor); the feed-forward runs over the concatenated text + image sequence; sincos "
                 "positions cropped from a pos_embed_max_size grid; integer-scale timestep"),
    Family("hidream", "HiDreamImageTransformer2DModel", _hidream_build, _hidream_inputs, "hidden_states", _NSQ, _P2,
           _same_as("hidden_states"), context_after=3 * TEXT_LEN, timestep_arg="timesteps",
           notes="joint attention image first, then text = T5 + last-Llama-layer tokens (carried through the "
                 "double blocks) + this block's Llama-layer tokens (a fresh slice per block, dropped after it); "
                 "encoder_hidden_states_llama3 is a stacked [L, B, T, C] tensor indexed by config.llama_layers; "
                 "pooled text added to the timestep embedding; MoE feed-forward on image tokens (top-k gate, "
                 "argsort / bincount dispatch in eval); inputs square 8x8: a non-square latent is zero-padded "
                 "to max_resolution tokens with a key mask (hidden_states_masks); RoPE (2x2 rotation matrices) "
                 "from ids computed inside"),
    Family("hidream_dense", "HiDreamImageTransformer2DModel", _hidream_dense_build, _hidream_inputs,
           "hidden_states", _NSQ, _P2, _same_as("hidden_states"), context_after=3 * TEXT_LEN, timestep_arg="timesteps",
           notes="the hidream entry with num_routed_experts=0 (plain SwiGLU feed-forward instead of the MoE, "
                 "not a shipped config): the rest of the architecture without the data-dependent expert "
                 "dispatch"),
    Family("flux2", "Flux2Transformer2DModel", _flux2_build, _flux2_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux.2: latent passed packed [B, N, C]; 4-axis ids (t, h, w, l) passed 3D [B, S, 4] as the "
                 "pipeline does (the model reads ids[0]); timestep and guidance in [0, 1]-ish, x1000 inside; "
                 "modulation shared across blocks (computed once from temb); double then single stream, text "
                 "first; SwiGLU feed-forward; single blocks use a fused QKV+MLP projection"),
    Family("z_image", "ZImageTransformer2DModel", _z_image_build, _z_image_inputs, "x", (H // 2) * (ZW // 2), _P2,
           lambda kw: tuple(kw["x"][0].shape), context_after=32, timestep_arg="t",
           notes="x is a LIST of per-sample [C, 1, H, W] latents and cap_feats a list of per-sample [T, C] "
                 "(variable lengths allowed); out[0] is a list too: output_shape is one element's shape; each "
                 "sequence is padded to a multiple of 32 tokens with a learned pad token (latent 8x16 so the "
                 "image is exactly 32 tokens, text 7 -> 32 with 25 pad tokens); image-only noise refiner, "
                 "text-only context refiner, then joint layers image first then (padded) text; complex RoPE "
                 "from position ids; timestep in [0, 1] with 1 = clean image; ~360k parameters, ~300k of them the "
                 "timestep MLP whose hidden width 1024 is hard-coded"),
    Family("cosmos", "CosmosTransformer3DModel", _cosmos_build, _cosmos_inputs, "hidden_states", _NV, (1, 2, 2),
           _same_as("hidden_states"),
           notes="self-attention over all video tokens with 3D RoPE (fps-scaled temporal axis; head_dim split "
                 "t/h/w, so 12) plus a learnable absolute position embedding added to q/k, cross-attention to "
                 "text; adaLN with a LoRA-style low-rank modulation; concat_padding_mask=False (the shipped "
                 "configs concatenate a resized padding-mask channel, which needs torchvision); EDM timestep"),
    Family("skyreels_v2", "SkyReelsV2Transformer3DModel", _skyreels_v2_build, _skyreels_v2_inputs,
           "hidden_states", _NV, (1, 2, 2), _same_as("hidden_states"),
           notes="Wan-like (self-attention over all video tokens with complex 3D RoPE, cross-attention to text) in "
                 "diffusion-forcing mode: timestep is per latent frame [B, F], so the modulation is per token "
                 "(broadcast over each frame's tokens); num_frame_per_block=1 (no block-causal mask); "
                 "inject_sample_info=False: with it, diffusers 0.42.1 adds the fps modulation [B*F, 6, D] to the "
                 "per-frame one [B, F, 6, D], which only broadcasts for batch 1"),
    Family("easyanimate", "EasyAnimateTransformer3DModel", _easyanimate_build, _easyanimate_inputs, "hidden_states",
           _NV, (1, 2, 2), _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="joint attention over text first, then all video tokens, with 3D real RoPE (computed inside, "
                 "HunyuanDiT-style crop region) on the video part; block 0 is MMDiT (separate text q/k/v), "
                 "block 1 a shared-weight block (text concatenated before the projections inside the "
                 "processor); the feed-forward runs on text and video separately with the same weights; "
                 "patch embedding is a per-frame Conv2d"),
    Family("omnigen", "OmniGenTransformer2DModel", _omnigen_build, _omnigen_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=TEXT_LEN + 1,
           notes="one Phi-3-style decoder over [prompt token embeddings, 1 time token, image tokens] (single "
                 "stream, no adaLN in the layers); input_ids are token ids (learned embedding); a 3D [B, S, S] "
                 "0/1 attention_mask from the collator (causal over prompt + time token, image rows attend to "
                 "everything) turned additive inside; position_ids [B, S]; su-scaled (LongRoPE) rotary "
                 "embedding; text-to-image: no input images (input_img_latents=[], input_image_sizes={}); "
                 "timestep in [0, 1]"),
    Family("hunyuan_image", "HunyuanImageTransformer2DModel", _hunyuan_image_build, _hunyuan_image_inputs,
           "hidden_states", H * W, (1, 1), _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="HunyuanVideo-like: token refiner on text (text-only attention, timestep-conditioned), double then "
                 "single stream blocks, joint sequence image first then text, key mask = text mask padded with "
                 "True for the image; patch 1; 2D RoPE computed inside; no byT5 second text stream "
                 "(text_embed_2_dim=None): its projection has a hard-coded 2048-wide hidden layer (~4M "
                 "parameters), and with it the text tokens are reordered per sample by boolean masks "
                 "(valid byT5, valid MLLM, invalid ...)"),
    Family("bria", "BriaTransformer2DModel", _bria_build, _bria_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux-like (packed latent, double then single stream, text first, RoPE from ids); no pooled text, "
                 "no guidance; ids passed 3D [B, S, 3] as the pipeline does (the model reads ids[0]); timestep "
                 "unscaled (0..1000)"),
    Family("longcat_image", "LongCatImageTransformer2DModel", _longcat_image_build, _longcat_image_inputs,
           "hidden_states", _N2, None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux-like (packed latent, double then single stream, text first); 2D ids: text (0, i, i), image "
                 "(1, y + 512, x + 512) as the pipeline builds them; timestep in [0, 1] (x1000 inside); no "
                 "pooled text at runtime"),
    Family("wan_vace", "WanVACETransformer3DModel", _wan_vace_build, _wan_vace_inputs, "hidden_states", _NV,
           (1, 2, 2), _same_as("hidden_states"),
           notes="Wan plus a VACE control stream: control_hidden_states (same latent grid, own patch embedding, "
                 "zero-padded to the video's token count) runs through its own Wan blocks (the first adds the "
                 "video tokens), each producing a hint added (x control_hidden_states_scale[i]) to the "
                 "video stream after main block vace_layers[i]; self-attention in both streams is over all "
                 "video tokens with the same complex 3D RoPE; cross-attention to text"),
    Family("sana_video", "SanaVideoTransformer3DModel", _sana_video_build, _sana_video_inputs, "hidden_states", _NV,
           (1, 2, 2), _same_as("hidden_states"),
           notes="linear (ReLU-kernel) self-attention over all video tokens with 3D RoPE, cross-attention to "
                 "text (softmax, masked); the Mix-FFN (GLUMBTempConv) runs a depthwise 3x3 conv per frame plus "
                 "a temporal conv across frames, so tokens mix spatially and temporally outside attention"),
    Family("kandinsky5", "Kandinsky5Transformer3DModel", _kandinsky5_build, _kandinsky5_inputs, "hidden_states",
           _NV, (1, 2, 2), _same_as("hidden_states"),
           notes="channels-LAST latent [B, F, H, W, C]; text-only encoder blocks first (text self-attention with "
                 "1D RoPE), then visual blocks: self-attention over all video tokens (3D RoPE from "
                 "visual_rope_pos, a list of per-axis position ranges, scaled by scale_factor), "
                 "cross-attention to text; pooled CLIP text added to the time embedding; the out layer is "
                 "modulated; regular (dense) attention, no sparse_params / fractal token order"),
    Family("consisid", "ConsisIDTransformer3DModel", _consisid_build, _consisid_inputs, "hidden_states", _NV,
           (1, 2, 2), lambda kw: (kw["hidden_states"].shape[0], F, 4, VH, VW), context_before=TEXT_LEN,
           notes="CogVideoX-5B-I2V-style: latent [B, F, C, H, W] (frames before channels) with the reference "
                 "image latent concatenated on channels (8 in, 4 out); joint attention text first; needs "
                 "image_rotary_emb precomputed (get_3d_rotary_pos_embed with the pipeline's crop region); "
                 "learned positional embedding; integer timestep; face identity: a perceiver "
                 "(LocalFacialExtractor) turns id_cond + id_vit_hidden into 4 face tokens, and after every "
                 "cross_attn_interval-th block the video tokens cross-attend to them (residual add)"),
]

BASE_FAMILY_NAMES = tuple(f.name for f in FAMILY_LIST)  # the families of this module

# the families of newer diffusers classes live in their own modules, which import the helpers above
from conformance_audio import AUDIO_FAMILIES  # noqa: E402
from conformance_image import IMAGE_FAMILIES  # noqa: E402
from conformance_plain_dit import PLAIN_DIT_FAMILIES  # noqa: E402
from conformance_plain_mmdit import PLAIN_MMDIT_FAMILIES  # noqa: E402
from conformance_plain_ops import PLAIN_OPS_FAMILIES  # noqa: E402
from conformance_plain_video import PLAIN_VIDEO_FAMILIES  # noqa: E402
from conformance_plain_io import PLAIN_IO_FAMILIES  # noqa: E402
from conformance_plain_structured import PLAIN_STRUCTURED_VIDEO_FAMILIES  # noqa: E402
from conformance_plain_hier import PLAIN_HIERARCHICAL_FAMILIES  # noqa: E402
from conformance_plain_prod import PLAIN_PRODUCTION_FAMILIES  # noqa: E402
from conformance_video import VIDEO_FAMILIES  # noqa: E402

# and DiTs written in plain PyTorch as research code writes them (no diffusers class)
FAMILY_LIST += (IMAGE_FAMILIES + VIDEO_FAMILIES + AUDIO_FAMILIES
                + PLAIN_DIT_FAMILIES + PLAIN_MMDIT_FAMILIES + PLAIN_OPS_FAMILIES + PLAIN_VIDEO_FAMILIES
                + PLAIN_IO_FAMILIES + PLAIN_STRUCTURED_VIDEO_FAMILIES + PLAIN_HIERARCHICAL_FAMILIES
                + PLAIN_PRODUCTION_FAMILIES)
FAMILIES: dict[str, Family] = {f.name: f for f in FAMILY_LIST}
assert len(FAMILIES) == len(FAMILY_LIST), "two families share a name"

# Skipped: none of the families asked for. Every class above builds tiny on CPU in about a second
# (the first build of a process pays diffusers' import). Deviations from the shipped configs, each noted in
# its entry: Cosmos without the padding-mask channel (needs torchvision), SkyReels-V2 without
# inject_sample_info (broken for batch > 1 in diffusers 0.42.1 diffusion forcing), HunyuanImage without the
# byT5 stream (~4M-parameter projection), HiDream also as a dense-FF variant, Z-Image at 8x16 (its sequences
# pad to multiples of 32); the newer classes' deviations are in their modules' notes. Not covered: Flux.1-
# Kontext-style reference tokens and CogView4-Control (variants of covered classes).

__all__ = ["BASE_FAMILY_NAMES", "Family", "FAMILIES", "FAMILY_LIST", "TEXT_LEN"]
