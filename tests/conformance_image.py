"""Conformance families, continued: image transformers of diffusers 0.42.1 (Flux.3, Krea 2, Ovis, Bria FIBO,
QwenImage 2.1, NucleusMoE, GLM-Image, ERNIE-Image, PRX, DreamLite, Ideogram 4, JoyImage-Edit).

Same record, helpers and rules as tests/conformance_models.py (which appends these entries to its
registry); entries that exercise a refusal are listed in test_conformance.REFUSED.
"""
from __future__ import annotations

import torch

from conformance_models import (F, Family, H, TEXT_LEN, VH, VW, W, _N2, _P2, _Rand, _packed_img_ids, _same_as,
                                _seeded_build)

IMAGE_FAMILIES: list[Family] = []


# --------------------------------------------------------------------------- Flux.3


def _flux3_ids(grid_h, grid_w, t=0):
    # 4-axis (t, h, w, l) ids, [S, 4]; the model has no pipeline in diffusers 0.42.1: Flux.2-style ids
    return torch.cartesian_prod(torch.arange(t, t + 1), torch.arange(grid_h), torch.arange(grid_w),
                                torch.arange(1)).float()


def _flux3_build_with(flow_map):
    def build(seed):
        from diffusers import Flux3Transformer2DModel
        return _seeded_build(seed, lambda: Flux3Transformer2DModel(
            in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, mlp_ratio=2.0,
            axes_dims_rope=(4, 4, 4, 4), flow_map=flow_map))
    return build


def _flux3_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2      # a 4-channel 8x12 latent packed 2x2 -> 4x6 tokens of 16 channels
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                   torch.arange(TEXT_LEN)).float()
    kw = dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
              timestep=r.timestep(batch, 1.0), img_ids=_flux3_ids(h, w), txt_ids=txt_ids, return_dict=False)
    if model.config.flow_map:
        kw["target_timestep"] = kw["timestep"] * 0.5
    return kw


FLUX3_COND_H, FLUX3_COND_W = 2, 3      # reference image tokens (a 4x6 latent packed 2x2)


def _flux3_edit_inputs(model, batch, seed):
    kw = _flux3_inputs(model, batch, seed)
    r = _Rand(seed + 1000)
    n_cond = FLUX3_COND_H * FLUX3_COND_W
    # reference image on its own time plane t = 1 (Flux.2 / Kontext convention)
    return dict(kw, image_cond_hidden_states=r.randn(batch, n_cond, 16),
                image_cond_ids=_flux3_ids(FLUX3_COND_H, FLUX3_COND_W, t=1))


# --------------------------------------------------------------------------- Krea 2

KREA2_TEXT_LAYERS = 3


def _krea2_build(seed):
    from diffusers import Krea2Transformer2DModel
    return _seeded_build(seed, lambda: Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=32, num_text_layers=KREA2_TEXT_LAYERS,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=64,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6)),
        # zero-centred RMSNorm weights and additive modulation tables all start at zero (a checkpoint fills them)
        reinit=(("transformer_blocks.0.scale_shift_table", 0.1), ("transformer_blocks.1.scale_shift_table", 0.1),
                ("final_layer.scale_shift_table", 0.1)))


def _krea2_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    # the pipeline: [B, T, L, C] stacked encoder layers; a bool mask padded in the middle of the template
    # ([prefix | prompt | PAD | suffix]); position_ids [T + N, 3] with text rows zero; timestep t / 1000
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, 3:5] = False
    text_ids = torch.zeros(TEXT_LEN, 3)
    return dict(hidden_states=r.randn(batch, h * w, 16),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, KREA2_TEXT_LAYERS, 32),
                timestep=r.timestep(batch, 1.0), position_ids=torch.cat([text_ids, _packed_img_ids(h, w)]),
                encoder_attention_mask=mask, return_dict=False)


# --------------------------------------------------------------------------- Ovis-Image


def _ovis_image_build(seed):
    from diffusers import OvisImageTransformer2DModel
    return _seeded_build(seed, lambda: OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))


def _ovis_image_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    # the pipeline: 2D ids, text (0, i, i), image (0, y, x); timestep t / 1000 (x1000 inside)
    txt_ids = torch.zeros(TEXT_LEN, 3)
    txt_ids[:, 1] = torch.arange(TEXT_LEN)
    txt_ids[:, 2] = torch.arange(TEXT_LEN)
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), img_ids=_packed_img_ids(h, w), txt_ids=txt_ids,
                return_dict=False)


# --------------------------------------------------------------------------- Bria FIBO


def _bria_fibo_build(seed):
    from diffusers import BriaFiboTransformer2DModel
    return _seeded_build(seed, lambda: BriaFiboTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 6, 6], text_encoder_dim=24))


def _bria_fibo_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    n_blocks = model.config.num_layers + model.config.num_single_layers
    # the pipeline (do_patching=False): latent packed 1x1 [B, H*W, C] -- here a 16-channel 4x6 latent; text = last
    # two encoder layers concatenated, plus one encoder layer per block (a list); txt_ids zeros; timestep unscaled
    return dict(hidden_states=r.randn(batch, h * w, 16), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                text_encoder_layers=[r.randn(batch, TEXT_LEN, 24) for _ in range(n_blocks)],
                timestep=r.timestep(batch, 1000.0), img_ids=_packed_img_ids(h, w), txt_ids=torch.zeros(TEXT_LEN, 3),
                return_dict=False)


def _bria_fibo_masked_inputs(model, batch, seed):
    kw = _bria_fibo_inputs(model, batch, seed)
    h, w = H // 2, W // 2
    # with CFG the prompts are padded to the longer one: the pipeline then passes a bool key mask [B, 1, 1, T + N]
    # in joint_attention_kwargs (text mask then ones for the image)
    mask = torch.ones(batch, TEXT_LEN + h * w, dtype=torch.bool)
    mask[0, TEXT_LEN - 3:TEXT_LEN] = False
    return dict(kw, joint_attention_kwargs={"attention_mask": mask[:, None, None, :]})


# --------------------------------------------------------------------------- Bria FIBO 2

FIBO2_GIST = 4          # min = max gist tokens for text_len 7 (a config choice; shipped: 256..512)
FIBO2_INJECT = (1,)


def _bria_fibo2_build(seed):
    from diffusers import BriaFibo2Transformer2DModel
    return _seeded_build(seed, lambda: BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
        injection_layer_ids=FIBO2_INJECT, perceiver_num_layers=1, min_num_gist_tokens=FIBO2_GIST,
        max_num_gist_tokens=FIBO2_GIST, gist_step=2, gist_min_text_len=4, gist_max_text_len=16,
        axes_dims=(4, 6, 6), axes_lens=(16, 16, 16)),
        reinit=tuple((f"layers.{i}.cross_attn_gate", 1.0) for i in FIBO2_INJECT))  # tanh gate starts at zero


def _bria_fibo2_inputs(model, batch, seed):
    r = _Rand(seed)
    n_bundles = 1 + len(model.config.injection_layer_ids)
    # the pipeline: [B, 1 + injections, T, C] bundles, mask None when nothing is padded (one prompt per pass),
    # timestep t / 1000 in [0, 1] (x t_scale inside); latent unpacked [B, C, H, W], patchified inside
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, n_bundles, TEXT_LEN, 24), encoder_attention_mask=None,
                return_dict=False)


def _bria_fibo2_edit_inputs(model, batch, seed):
    kw = _bria_fibo2_inputs(model, batch, seed)
    r = _Rand(seed + 1000)
    # one image to edit: a list with one batched [B, C, h, w] latent, its own size (4x4 -> 4 tokens)
    return dict(kw, context_latents=[r.randn(batch, 4, 4, 4)])


def _bria_fibo2_masked_inputs(model, batch, seed):
    kw = _bria_fibo2_inputs(model, batch, seed)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    mask[0, -2:] = False
    return dict(kw, encoder_attention_mask=mask)


IMAGE_FAMILIES += [
    Family("flux3", "Flux3Transformer2DModel", _flux3_build_with(False), _flux3_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux.3 (no pipeline in diffusers 0.42.1; inputs from the forward's docstring): latent packed "
                 "[B, N, C]; 4-axis ids (t, h, w, l) 2D [S, 4]; timestep in [0, 1], x1000 inside; per-TOKEN "
                 "modulation (the timestep embedding is expanded to [B, N, D] before the modulation linears; text "
                 "at timestep 0); per-mode blocks first: image-only and text-only self-attention (parallel "
                 "attention + SwiGLU feed-forward from one modulated input), then joint single blocks over text "
                 "first, then image; no biases anywhere"),
    Family("flux3_edit", "Flux3Transformer2DModel", _flux3_build_with(False), _flux3_edit_inputs, "hidden_states",
           _N2, None, _same_as("hidden_states"), context_before=TEXT_LEN,
           context_after=FLUX3_COND_H * FLUX3_COND_W,
           notes="the flux3 entry with a reference image (image_cond_hidden_states [B, 6, C] + image_cond_ids on "
                 "time plane 1): the reference tokens run through their own per-mode blocks (reference-only "
                 "self-attention, 6 keys), then the joint sequence is text, image, reference; only the image "
                 "tokens reach the output"),
    Family("flux3_flow_map", "Flux3Transformer2DModel", _flux3_build_with(True), _flux3_inputs, "hidden_states",
           _N2, None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="the flux3 entry as a step-distilled flow map (flow_map=True): target_timestep [B] embedded by a "
                 "second MLP and added to every mode's modulation"),
    Family("krea2", "Krea2Transformer2DModel", _krea2_build, _krea2_inputs, "hidden_states", _N2, None,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="single-stream: text fusion first (layer-wise attention across the L stacked encoder layers "
                 "per token, batch*T sequences of L, then a linear over L and text-only refiner attention), then "
                 "[text, image] joint blocks text first; position_ids [T + N, 3] (text rows zero); bool text mask "
                 "padded in the middle (as the pipeline's template) -> [B, 1, 1, T + N] key mask; GQA (1 kv head "
                 "of 2, repeat_interleave'd); sigmoid output gate per head channel; zero-centred RMSNorm (1 + w); "
                 "one shared modulation vector plus per-block additive tables (zero-init, reinit); timestep in "
                 "[0, 1] (x1000 inside)"),
    Family("ovis_image", "OvisImageTransformer2DModel", _ovis_image_build, _ovis_image_inputs, "hidden_states", _N2,
           None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux-like (packed latent, double then single stream, text first, real RoPE from 2D ids); text "
                 "ids (0, i, i) as the pipeline builds them; RMS-norm on the text before context_embedder; SwiGLU "
                 "feed-forwards; no pooled text, no guidance; timestep in [0, 1] (x1000 inside)"),
    Family("bria_fibo", "BriaFiboTransformer2DModel", _bria_fibo_build, _bria_fibo_inputs, "hidden_states", _N2,
           None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="Flux-like (packed latent, double then single stream, text first, RoPE from 2D ids); "
                 "text_encoder_layers is a Python LIST of per-block encoder layers [B, T, C]: each block projects "
                 "its own and replaces the second half of the text stream's channels with it; timestep unscaled "
                 "(0..1000); no mask when nothing is padded"),
    Family("bria_fibo_masked", "BriaFiboTransformer2DModel", _bria_fibo_build, _bria_fibo_masked_inputs,
           "hidden_states", _N2, None, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="the bria_fibo entry as the pipeline runs it with padded prompts (CFG): a bool key mask "
                 "[B, 1, 1, T + N] in joint_attention_kwargs['attention_mask'], text mask then ones for the image, "
                 "used by both double and single blocks"),
    Family("bria_fibo2", "BriaFibo2Transformer2DModel", _bria_fibo2_build, _bria_fibo2_inputs, "hidden_states",
           _N2, _P2, _same_as("hidden_states"), context_before=FIBO2_GIST,
           notes="Z-Image-like single stream: latent [B, C, H, W] patchified inside; image-only noise refiner; a "
                 "perceiver turns the first text bundle into gist tokens (count from the text length, a Python "
                 "int; 4 here); joint blocks over [gist, image] with complex RoPE and PER-TOKEN modulation "
                 "(torch.where on a noise mask built by slice assignment: image noisy, gist clean at t = 0); "
                 "injection blocks cross-attend to their own text bundle through a tanh gate (zero-init, reinit); "
                 "encoder_hidden_states [B, 1 + injections, T, C]; timestep in [0, 1]; t_embedder's 1024-wide hidden "
                 "layer is hard-coded (~290k of the parameters)"),
    Family("bria_fibo2_edit", "BriaFibo2Transformer2DModel", _bria_fibo2_build, _bria_fibo2_edit_inputs,
           "hidden_states", _N2, _P2, _same_as("hidden_states"), context_before=FIBO2_GIST, context_after=4,
           notes="the bria_fibo2 entry with one image to edit (context_latents, a list of one batched 4x4 "
                 "latent -> 4 clean tokens after the image): the noise refiner also sees the context tokens with "
                 "per-token modulation; joint sequence gist, image, context"),
    Family("bria_fibo2_masked", "BriaFibo2Transformer2DModel", _bria_fibo2_build, _bria_fibo2_masked_inputs,
           "hidden_states", _N2, _P2, _same_as("hidden_states"), context_before=FIBO2_GIST,
           notes="the bria_fibo2 entry with a padded prompt batch (bool encoder_attention_mask): the gist count "
                 "is computed on the host from mask.sum().tolist()"),
]


_N1 = H * W                        # 96 tokens of an 8x12 latent at patch 1


# --------------------------------------------------------------------------- Qwen-Image 2.1


def _qwen_image21_build(seed):
    from diffusers import QwenImage21Transformer2DModel
    return _seeded_build(seed, lambda: QwenImage21Transformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6), causal_condition=True))


def _qwen_image21_inputs(model, batch, seed):
    r = _Rand(seed)
    # text-to-image as the pipeline: the latent unpatched [B, H*W, C] (2.1 packs by a plain flatten), img_shapes
    # [[(1, h, w)]] * B, img_mask [B, T + N/4] (False at the text positions, one True slot per 2x2 group of target
    # tokens), timestep t / 1000; the all-ones prompt mask is dropped (None) by encode_prompt; no kv_cache
    # (use_kv_cache=False: the cache object holds tensors across calls)
    img_mask = torch.cat([torch.zeros(batch, TEXT_LEN, dtype=torch.bool),
                          torch.ones(batch, _N1 // 4, dtype=torch.bool)], dim=1)
    return dict(hidden_states=r.randn(batch, _N1, 4), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch, 1.0), img_shapes=[[(1, H, W)]] * batch, img_mask=img_mask,
                encoder_hidden_states_mask=None, return_dict=False)


# --------------------------------------------------------------------------- Nucleus-MoE-Image


def _nucleus_build_with(moe, grouped_mm=False):
    def build(seed):
        from diffusers import NucleusMoEImageTransformer2DModel
        # layer 0 dense SwiGLU (inner int(32 * 6 * 2/3) // 128 * 128 = 128), layer 1 MoE (with moe=True)
        reinit = (("transformer_blocks.1.img_mlp.experts.gate_up_proj", 32 ** -0.5),
                  ("transformer_blocks.1.img_mlp.experts.down_proj", 16 ** -0.5)) if moe else ()
        return _seeded_build(seed, lambda: NucleusMoEImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            num_key_value_heads=1, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,
            moe_enabled=moe, dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=16,
            capacity_factors=2.0, use_grouped_mm=grouped_mm), reinit=reinit)   # expert weights: torch.empty
    return build


def _nucleus_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2      # a 4-channel 8x12 latent packed 2x2 -> 4x6 tokens of 16 channels
    # the pipeline passes t / 1000, img_shapes [(1, h, w)] * B (flat list) and drops an all-ones prompt mask
    return dict(hidden_states=r.randn(batch, h * w, 16), img_shapes=[(1, h, w)] * batch,
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), encoder_hidden_states_mask=None,
                timestep=r.timestep(batch, 1.0), return_dict=False)


# --------------------------------------------------------------------------- GLM-Image


def _glm_image_build(seed):
    from diffusers import GlmImageTransformer2DModel
    return _seeded_build(seed, lambda: GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64))


def _glm_image_inputs(model, batch, seed):
    r = _Rand(seed)
    h, w = H // 2, W // 2
    # prior tokens from the AR model on the d32 grid, upsampled 2x nearest to the token grid (the pipeline's
    # _upsample_token_ids): one id per image token [B, N]; prior_token_drop all False (the conditional branch)
    d32 = torch.randint(0, model.config.prior_vq_quantizer_codebook_size, (batch, 1, h // 2, w // 2),
                        generator=r.gen)
    prior = torch.nn.functional.interpolate(d32.float(), scale_factor=2, mode="nearest").long().view(batch, h * w)
    # timestep: the scheduler's t (1000 .. 1) minus 1; target_size (height, width) in pixels, crop (0, 0)
    return dict(hidden_states=r.randn(batch, 4, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                prior_token_id=prior, prior_token_drop=torch.zeros(batch, h * w, dtype=torch.bool),
                timestep=r.timestep(batch), target_size=torch.tensor([[H * 8.0, W * 8.0]]).repeat(batch, 1),
                crop_coords=torch.zeros(batch, 2), kv_caches=None, return_dict=False)


# --------------------------------------------------------------------------- ERNIE-Image


def _ernie_image_build(seed):
    from diffusers import ErnieImageTransformer2DModel
    return _seeded_build(seed, lambda: ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=4, out_channels=4,
        patch_size=1, text_in_dim=24, rope_theta=256, rope_axes_dim=(4, 6, 6)))


def _ernie_image_inputs(model, batch, seed):
    r = _Rand(seed)
    # as _pad_text: text_bth zero-padded to the longest prompt, text_lens [B] long (sample 1 two tokens shorter,
    # as a CFG batch of two prompts of different lengths); timestep the scheduler's t (sigma * 1000)
    lens = torch.tensor([TEXT_LEN - 2 * (i % 2) for i in range(batch)])
    text = r.randn(batch, TEXT_LEN, 24) * (torch.arange(TEXT_LEN)[None, :, None] < lens[:, None, None])
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch), text_bth=text, text_lens=lens,
                return_dict=False)


# --------------------------------------------------------------------------- PRX


def _prx_build(seed):
    from diffusers import PRXTransformer2DModel
    return _seeded_build(seed, lambda: PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[8, 8]))


def _prx_pixel_build(seed):
    from diffusers import PRXTransformer2DModel
    return _seeded_build(seed, lambda: PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[8, 8], bottleneck_size=8, resolution_embeds=True))


def _prx_inputs(model, batch, seed):
    r = _Rand(seed)
    # the tokenizer pads to max_length: a boolean text mask [B, T] (sample 1 has 2 padding tokens);
    # timestep t / 1000 in [0, 1]
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor([TEXT_LEN - 2 * (i % 2) for i in range(batch)])[:, None]
    return dict(hidden_states=r.randn(batch, 4, H, W), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), attention_mask=mask, return_dict=False)


IMAGE_FAMILIES += [
    Family("qwen_image21", "QwenImage21Transformer2DModel", _qwen_image21_build, _qwen_image21_inputs,
           "hidden_states", _N1, None, lambda kw: (kw["hidden_states"].shape[0], TEXT_LEN + _N1, 4),
           context_before=TEXT_LEN,
           notes="Qwen-Image 2.1: ONE single-stream sequence; the text (txt_in: zero-centred RMS-norm + GELU MLP) "
                 "is laid out by img_mask [B, T + N/4] (vision-language slots, each True slot stands for a 2x2 "
                 "group of latent tokens, expanded by repeat_interleave with tensor repeats) and the unpatched "
                 "latent [B, H*W, C] is written into those positions (text first, image last here); RoPE, "
                 "block ids and the block-causal prefill segments (text causal, every image block "
                 "bidirectional, the target image sees everything) are computed on the host from img_mask "
                 "(tolist, nonzero, int(sum)); one shared modulation for all blocks, causal_condition: text "
                 "rows modulate from an extra t=0 row; out[0] is the whole joint sequence [B, T + N, C] (the "
                 "pipeline keeps the last N); timestep in [0, 1]; no kv_cache (a Python object holding tensors "
                 "across calls)"),
    Family("nucleus_moe", "NucleusMoEImageTransformer2DModel", _nucleus_build_with(True), _nucleus_inputs,
           "hidden_states", _N2, None, _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="Nucleus-MoE: packed latent [B, N, C*4] with img_shapes [(1, h, w)] * B (flat list); single "
                 "stream: image queries attend to [image keys, text keys] (text is K/V only, projected per "
                 "block, no text stream), GQA (1 kv head of 2), complex scaled RoPE (centred image positions, "
                 "text after them); block 0 dense SwiGLU, block 1 an expert-choice MoE: every expert takes the "
                 "top-C tokens of the whole sequence (topk over the token axis, C = ceil(cf * S / E)) plus a "
                 "shared expert, experts run in a Python loop over num_tokens_per_expert.tolist() (torch.empty "
                 "expert weights re-drawn); timestep in [0, 1]; the RoPE table is memoised with "
                 "functools.lru_cache on the method"),
    Family("nucleus_dense", "NucleusMoEImageTransformer2DModel", _nucleus_build_with(False), _nucleus_inputs,
           "hidden_states", _N2, None, _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="the nucleus_moe entry with moe_enabled=False (both blocks dense SwiGLU, inner "
                 "int(dim * mlp_ratio * 2/3) // 128 * 128, so mlp_ratio 6 for dim 32): the architecture "
                 "without the expert-choice routing; still exercises the lru_cache'd RoPE table"),
    Family("glm_image", "GlmImageTransformer2DModel", _glm_image_build, _glm_image_inputs, "hidden_states", _N2,
           _P2, _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="CogView4-like (joint attention text first, RoPE computed inside and applied in place to the "
                 "image rows of q/k, the feed-forward shared by text and image) with a second per-token input: "
                 "prior_token_id [B, N] (AR prior tokens upsampled 2x nearest to the token grid) -> embedding "
                 "-> prior_token_drop boolean mask (x[mask] *= 0, an index / index_put pair) -> MLP, added to "
                 "the patch tokens; target_size / crop_coords [B, 2] pixel conditions; timestep the scheduler's "
                 "t - 1; the pipeline passes a GlmImageKVCache object (mode None for text-to-image, a no-op): "
                 "None here"),
    Family("ernie_image", "ErnieImageTransformer2DModel", _ernie_image_build, _ernie_image_inputs, "hidden_states",
           _N1, (1, 1), _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="SEQUENCE-FIRST layout: tokens as [S, B, D] through the blocks (permuted to [B, S, D] around "
                 "attention only); single stream image first then text, per-token-broadcast adaLN "
                 "(modulation expanded to [S, B, D]); text padded to the longest prompt with text_lens [B] "
                 "building the key mask and the image RoPE's first coordinate; real rotate-half RoPE from 3-axis "
                 "ids; Conv2d patch embedding (patch 1 as shipped); zero-init adaLN and final linear re-drawn; "
                 "timestep the scheduler's t (0..1000)"),
    Family("prx", "PRXTransformer2DModel", _prx_build, _prx_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="PRX: image queries attend to [text keys, image keys] (text is K/V only, no text stream, text "
                 "mask [B, T] bool from max_length padding); patchify / unpatchify by einsum "
                 "('nchpwq->nhwcpq'), the q/k/v of a packed projection taken with select (qkv[0]); RoPE as 2x2 "
                 "rotation matrices from 2D ids; zero-init modulation re-drawn; timestep in [0, 1]"),
    Family("prx_pixel", "PRXTransformer2DModel", _prx_pixel_build, _prx_inputs, "hidden_states", _N2, _P2,
           _same_as("hidden_states"), context_before=TEXT_LEN,
           notes="the prx entry as the pixel-space PRX-7B is configured: a two-layer bottleneck img_in and the "
                 "latent resolution embedded into the timestep vector (resolution_embeds=True)"),
]


# --------------------------------------------------------------------------- DreamLite (U-Net spatial transformer)

DL_CH = 16             # feature-map channels of the U-Net stage the transformer sits in


def _dreamlite_build_with(use_self_attention):
    def build(seed):
        from diffusers import DreamLiteTransformer2DModel
        from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

        def make():
            # as DreamLiteUNetModel builds it (its defaults: GQA with one kv head, RMS qk-norm, ff_mult 6,
            # conv proj_in / proj_out); the U-Net installs its GQA-aware processor on every attention
            model = DreamLiteTransformer2DModel(
                num_attention_heads=2, attention_head_dim=8, in_channels=DL_CH, num_layers=2, norm_num_groups=4,
                cross_attention_dim=32, use_linear_projection=False, qk_norm="rms_norm", num_kv_heads=1, ff_mult=6,
                use_self_attention=use_self_attention)
            for module in model.modules():
                if hasattr(module, "set_processor"):
                    module.set_processor(DreamLiteAttnProcessor2_0())
            return model
        return _seeded_build(seed, make)
    return build


def _dreamlite_inputs(model, batch, seed):
    r = _Rand(seed)
    # the U-Net calls it with (feature map, text) only: no timestep (norm_type layer_norm ignores it); a
    # timestep is passed here so the conformance loop has a schedule to count steps by (it is unused)
    return dict(hidden_states=r.randn(batch, DL_CH, H, W), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=r.timestep(batch), return_dict=False)


# --------------------------------------------------------------------------- Ideogram 4

IDEO_CH = 16           # packed latent channels (ae_channels * patch ** 2)
IDEO_LLM = 32          # per-token text feature width
IDEO_TEXT = (TEXT_LEN - 2, TEXT_LEN)  # per-sample prompt lengths, left-padded to TEXT_LEN


def _ideogram4_build(seed):
    from diffusers import Ideogram4Transformer2DModel
    # head_dim 12 -> 6 frequencies, interleaved t/h/w as mrope_section (2, 2, 2)
    return _seeded_build(seed, lambda: Ideogram4Transformer2DModel(
        in_channels=IDEO_CH, num_layers=2, attention_head_dim=12, num_attention_heads=2, intermediate_size=48,
        adaln_dim=16, llm_features_dim=IDEO_LLM, mrope_section=(2, 2, 2)))


def _ideogram4_layout(batch):
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline
    lengths = [IDEO_TEXT[i % len(IDEO_TEXT)] for i in range(batch)]
    return lengths, Ideogram4Pipeline._prepare_ids(lengths, H // 2, W // 2, TEXT_LEN, torch.device("cpu"))


def _ideogram4_inputs(model, batch, seed):
    r = _Rand(seed)
    n = (H // 2) * (W // 2)
    lengths, (pos, seg, ind) = _ideogram4_layout(batch)
    # the conditional pass: ONE packed sequence [left pad][text][image]; hidden_states is zeros over the text
    # region then the latent tokens; encoder_hidden_states the text features (zero on pads) then zeros
    text = r.randn(batch, TEXT_LEN, IDEO_LLM)
    for b, k in enumerate(lengths):
        text[b, : TEXT_LEN - k] = 0
    latents = r.randn(batch, n, IDEO_CH)
    return dict(hidden_states=torch.cat([torch.zeros(batch, TEXT_LEN, IDEO_CH), latents], 1),
                timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=torch.cat([text, torch.zeros(batch, n, IDEO_LLM)], 1),
                position_ids=pos, segment_ids=seg, indicator=ind, return_dict=False)


def _ideogram4_uncond_inputs(model, batch, seed):
    r = _Rand(seed)
    n = (H // 2) * (W // 2)
    _, (pos, seg, ind) = _ideogram4_layout(batch)
    # the unconditional pass (the pipeline's unconditional_transformer): image region only, zero text features
    return dict(hidden_states=r.randn(batch, n, IDEO_CH), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=torch.zeros(batch, n, IDEO_LLM), position_ids=pos[:, TEXT_LEN:],
                segment_ids=seg[:, TEXT_LEN:], indicator=ind[:, TEXT_LEN:], return_dict=False)


# --------------------------------------------------------------------------- JoyImage-Edit


def _joyimage_build_of(cls_name):
    """JoyImage-Edit and JoyImage-Edit-Plus share their config; the Wan-style modulation tables start
    at zero."""
    def build(seed):
        import diffusers
        n_layers = 2
        return _seeded_build(seed, lambda: getattr(diffusers, cls_name)(
            patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=32,
            mlp_width_ratio=2.0, num_layers=n_layers, rope_dim_list=[4, 6, 6], rope_type="rope", theta=256),
            reinit=tuple((f"double_blocks.{i}.{s}_mod.modulate_table", 0.5) for i in range(n_layers)
                         for s in ("img", "txt")))
    return build


def _joyimage_inputs_with(num_items):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        # the pipeline's 6D latent [B, items, C, T=1, H, W]: reference image latents first, the noise last
        # (the model moves the noise item to the front); timestep on the scheduler's 0..1000 scale
        return dict(hidden_states=r.randn(batch, num_items, 4, 1, H, W), timestep=r.timestep(batch),
                    encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), return_dict=False)
    return inputs


# --------------------------------------------------------------------------- JoyImage-Edit-Plus


JOY_REF = (4, 8)       # reference image latent (H, W): 2 x 4 = 8 patches


def _patches(latent):
    """The pipeline's patchify of one [C, T, H, W] item: [T' * H' * W', C, pt, ph, pw], row-major patch grid."""
    c, t, h, w = latent.shape
    p = latent.reshape(c, t, 1, h // 2, 2, w // 2, 2)
    return p.permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c, 1, 2, 2), (t, h // 2, w // 2)


def _joyimage_plus_inputs_with(with_reference):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        samples, shapes = [], []
        for _ in range(batch):
            items = [r.randn(4, 1, H, W)] + ([r.randn(4, 1, *JOY_REF)] if with_reference else [])
            cut = [_patches(x) for x in items]
            samples.append(torch.cat([p for p, _ in cut]))
            shapes.append([s for _, s in cut])
        # [B, max_patches, C, pt, ph, pw] (target noise patches first, then each reference's), per-sample
        # shape_list of (t, h, w) per item, the text mask [B, L]; timestep 0..1000
        return dict(hidden_states=torch.stack(samples), timestep=r.timestep(batch),
                    encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                    encoder_hidden_states_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long), shape_list=shapes,
                    return_dict=False)
    return inputs


# --------------------------------------------------------------------------- Kandinsky 6 SR


def _kandinsky6_sr_build(seed):
    from diffusers import Kandinsky6SRTransformer3DModel
    return _seeded_build(seed, lambda: Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=32, ff_dim=64,
        num_visual_blocks=2, axes_dims=(4, 6, 6)),
        reinit=(("pooled_bias", 0.5),))  # the folded empty-caption pooled text: zeros until the checkpoint


def _kandinsky6_sr_inputs(model, batch, seed):
    r = _Rand(seed)
    # channels-last [B, T, H, W, 2 * C + 1]: noisy latent, anchor latent and anchor mask (zeros: the released
    # checkpoints are anchor-free); the token grid must be divisible by 8 (NABLA's 8x8 blocks)
    latent = r.randn(batch, F, VH, VW, 4)
    return dict(hidden_states=torch.cat([latent, torch.zeros_like(latent), torch.zeros(batch, F, VH, VW, 1)], -1),
                timestep=r.timestep(batch), return_dict=False)


# --------------------------------------------------------------------------- the entries

IMAGE_FAMILIES += [
    Family("dreamlite", "DreamLiteTransformer2DModel", _dreamlite_build_with(True), _dreamlite_inputs,
           "hidden_states", H * W, (1, 1), _same_as("hidden_states"),
           notes="the spatial transformer of the DreamLite U-Net, built standalone (no pipeline calls it): input "
                 "is a U-Net feature map [B, C, H, W], GroupNorm over it (statistics over all positions) before a "
                 "1x1-conv proj_in, then BasicTransformerBlocks (layer_norm: no timestep use) with self-attention "
                 "(GQA, one kv head, RMS qk-norm, the U-Net's DreamLiteAttnProcessor2_0) and cross-attention to "
                 "text; 1x1-conv proj_out plus the input as residual; the timestep kwarg is passed only to give "
                 "the loop a schedule (the model ignores it)"),
    Family("dreamlite_no_self_attn", "DreamLiteTransformer2DModel", _dreamlite_build_with(False), _dreamlite_inputs,
           "hidden_states", H * W, (1, 1), _same_as("hidden_states"),
           notes="the dreamlite entry with use_self_attention=False (DreamLite's CrossAttn*NoSelfAttn* blocks): "
                 "attn1 is not built and norm1's output replaces the residual stream; tokens meet only in the "
                 "input GroupNorm's statistics (no cached attention)"),
    Family("ideogram4", "Ideogram4Transformer2DModel", _ideogram4_build, _ideogram4_inputs, "hidden_states",
           TEXT_LEN + _N2, None, _same_as("hidden_states"),
           notes="the conditional pass: ONE packed sequence [left pad][text][image] of TEXT_LEN + N rows, "
                 "hidden_states is zeros over the text region then the packed latent, so the latent's token "
                 "axis carries text rows too (num_tokens = TEXT_LEN + N); encoder_hidden_states text features "
                 "over the whole sequence (zero on pads and image), both masked inside by indicator (role "
                 "per row); single-stream blocks, boolean block-diagonal mask from segment_ids (pads -1 attend "
                 "only to pads); interleaved 3-axis MRoPE from position_ids [B, L, 3] (image positions offset "
                 "65536); timestep in [0, 1] with 1 = clean; per-row learned image-indicator embedding"),
    Family("ideogram4_uncond", "Ideogram4Transformer2DModel", _ideogram4_build, _ideogram4_uncond_inputs,
           "hidden_states", _N2, None, _same_as("hidden_states"),
           notes="the pipeline's unconditional pass (unconditional_transformer, same class): image rows only, "
                 "zero text features, indicator / segment / position ids sliced to the image region"),
    Family("joyimage", "JoyImageEditTransformer3DModel", _joyimage_build_of("JoyImageEditTransformer3DModel"),
           _joyimage_inputs_with(1),
           "hidden_states", _N2, (1, 2, 2), _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="text-to-image: 6D latent [B, 1, C, 1, H, W] (items, then a Wan-style video latent), Conv3d "
                 "patch embed; double-stream blocks only, joint attention image first then text; fused QKV per "
                 "stream, RMS qk-norm, real RoPE (interleaved pairs) on image tokens only (rope_type 'rope'); "
                 "Wan-style modulation table (zero-init, re-drawn) plus temb; timestep 0..1000"),
    Family("joyimage_edit", "JoyImageEditTransformer3DModel", _joyimage_build_of("JoyImageEditTransformer3DModel"),
           _joyimage_inputs_with(2),
           "hidden_states", 2 * _N2, (1, 2, 2), _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="editing: items = [reference latent, noise]; the model rotates the noise item to the front "
                 "(cat of two item slices), folds items into the frame axis, so one grid of 2 x h x w tokens "
                 "(reference frame second) attends jointly with text; the output covers both items"),
    Family("joyimage_plus", "JoyImageEditPlusTransformer3DModel",
           _joyimage_build_of("JoyImageEditPlusTransformer3DModel"), _joyimage_plus_inputs_with(False), "hidden_states",
           _N2, None, _same_as("hidden_states"),
           context_after=TEXT_LEN,
           notes="latent passed pre-patchified [B, N, C, pt, ph, pw]; the patch embed is a Conv3d with kernel = "
                 "patch applied to [B * N, C, pt, ph, pw] (token axis folded into the batch) and reshaped to "
                 "[B, N, D]; per-sample RoPE tables from shape_list (a Python list of (t, h, w) per item, "
                 "padded with cos 1 / sin 0 to max_patches); joint attention image first then text with a "
                 "[B, 1, 1, N + L] key mask (image padding mask, text mask); output [B, N, C, pt, ph, pw]"),
    Family("joyimage_plus_ref", "JoyImageEditPlusTransformer3DModel",
           _joyimage_build_of("JoyImageEditPlusTransformer3DModel"), _joyimage_plus_inputs_with(True), "hidden_states",
           _N2 + (JOY_REF[0] // 2) * (JOY_REF[1] // 2), None,
           _same_as("hidden_states"), context_after=TEXT_LEN,
           notes="joyimage_plus with one 4 x 8 reference image: its 8 patches follow the target's 24 in the "
                 "patch axis, RoPE temporal offset 1 for the reference; the output covers both"),
    Family("kandinsky6_sr", "Kandinsky6SRTransformer3DModel", _kandinsky6_sr_build, _kandinsky6_sr_inputs,
           "hidden_states", F * VH * VW, (1, 1, 1), lambda kw: tuple(kw["hidden_states"].shape[:-1]) + (4,),
           notes="text-free video SR: channels-last [B, T, H, W, 2C + 1] (noisy, anchor, anchor mask), patch "
                 "(1, 1, 1) linear embed; tokens reordered into 8x8 local blocks (_local_patch) before the "
                 "blocks and back after; NABLA self-attention: a flex_attention BlockMask built per layer from "
                 "block-mean q/k scores (softmax, sort, cumsum threshold) OR a sliding-tile prior; 4D RoPE as "
                 "2x2 rotation matrices; timestep 0..1000"),
]

# Status against /work/main at 52e5b77 (python /work/scratch/check.py /work/scratch/c/families.py):
#   all 4 checks pass: ideogram4, ideogram4_uncond, joyimage, joyimage_plus, joyimage_plus_ref
#   dreamlite, dreamlite_no_self_attn: refused "no token sequence found" (aten.group_norm before the 1x1 conv
#     has no grid-phase rule); all 4 pass with /work/scratch/c/fix_group_norm.diff
#   joyimage_edit: refused "no token sequence found" (slice + cat rotating the items axis before the patch conv)
#   kandinsky6_sr: refused at node 'flex_attention' (NABLA block-sparse flex attention; correct refusal)
# For test_conformance.REFUSED (without the group_norm fix add the two dreamlite entries too):
#   "joyimage_edit": (None, "no token sequence found"),
#   "kandinsky6_sr": ("flex_attention", "no token rule for this operator"),
