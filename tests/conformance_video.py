"""Conformance families, continued: video transformers of diffusers 0.42.1 (ChronoEdit, Wan-Animate,
AnyFlow, Helios, HunyuanVideo-1.5, FramePack, LTX-2, Kandinsky 6, Motif-Video, MiniMax-H3, SANA-WM).

Same record, helpers and rules as tests/conformance_models.py (which appends these entries to its
registry); entries that exercise a refusal are listed in test_conformance.REFUSED.
"""
from __future__ import annotations

import math
import torch

from conformance_models import (F, Family, TEXT_LEN, VH, VW, _NV, _Rand, _same_as, _seeded_build)

VIDEO_FAMILIES: list[Family] = []


WAN_TEXT_LEN = 512     # Wan I2V-style cross-attention (add_k_proj): the processor splits off the LAST 512 keys as text
CLIP_TOKENS = 5        # stands in for CLIP's 257 image tokens


# --------------------------------------------------------------------------- ChronoEdit


CHRONO_F = 2           # the pipeline's default (no temporal reasoning): 5 pixel frames -> 2 latent frames


def _chronoedit_build(seed):
    from diffusers import ChronoEditTransformer3DModel
    # Wan2.1-I2V-style: in = noisy latent (4) + mask (4) + condition latent (4); image embedding + add_k/v
    return _seeded_build(seed, lambda: ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=24,
        rope_max_seq_len=32, rope_temporal_skip_len=8))


def _chronoedit_inputs_with(frames):
    def inputs(model, batch, seed):
        r = _Rand(seed)
        # latent_model_input = cat([latents, condition]) on channels: condition = 4 mask channels (first-frame
        # mask, 4x temporally unshuffled) + the VAE latent of [image, zeros...]; prompt padded to 512 tokens;
        # CLIP hidden states [B, 257, 1280] (here 5 x 16); timestep t.expand(B) in 0..1000
        mask = torch.zeros(batch, 4, frames, VH, VW)
        mask[:, :, 0] = 1.0
        lat = torch.cat([r.randn(batch, 4, frames, VH, VW), mask, r.randn(batch, 4, frames, VH, VW)], dim=1)
        return dict(hidden_states=lat, timestep=r.timestep(batch),
                    encoder_hidden_states=r.randn(batch, WAN_TEXT_LEN, 32),
                    encoder_hidden_states_image=r.randn(batch, CLIP_TOKENS, 16), return_dict=False)
    return inputs


def _out4(kw):
    s = list(kw["hidden_states"].shape)
    s[1] = 4
    return tuple(s)


# --------------------------------------------------------------------------- Wan-Animate


ANIM_FACE = 8          # face crop side (motion_encoder_size); the shipped model uses 512
ANIM_FACE_FRAMES = 5   # pixel frames of the face video per segment -> 2 face-encoder frames (= F - 1)


def _wan_animate_build(seed):
    from diffusers import WanAnimateTransformer3DModel
    return _seeded_build(seed, lambda: WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=16, added_kv_proj_dim=24,
        rope_max_seq_len=32, motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=ANIM_FACE,
        motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=1, motion_encoder_batch_size=8),
        # the face encoder's padding tokens start at zero
        reinit=(("face_encoder.padding_tokens", 1.0),))


def _wan_animate_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the pipeline: cat([latents (C), reference_latents (4 mask + C)]) on channels, frames = 1 reference
    # frame + T segment frames; pose latents [B, C, T, H, W]; face video in pixels [B, 3, S, face, face] in
    # [-1, 1]; prompt padded to 512; CLIP hidden states
    t = F - 1
    lat = torch.cat([r.randn(batch, 4, F, VH, VW), torch.ones(batch, 4, F, VH, VW), r.randn(batch, 4, F, VH, VW)], 1)
    lat[:, 4:8, 1:] = 0.0
    return dict(hidden_states=lat, timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, WAN_TEXT_LEN, 32),
                encoder_hidden_states_image=r.randn(batch, CLIP_TOKENS, 16),
                pose_hidden_states=r.randn(batch, 4, t, VH, VW),
                face_pixel_values=r.randn(batch, 3, ANIM_FACE_FRAMES, ANIM_FACE, ANIM_FACE).clamp(-1, 1),
                return_dict=False)


# --------------------------------------------------------------------------- Wan-Animate-2


def _wan_animate2_build(seed):
    from diffusers import WanAnimate2Transformer3DModel
    return _seeded_build(seed, lambda: WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=WAN_TEXT_LEN, in_dim=12, dim=24, ffn_dim=32, freq_dim=16, text_dim=32,
        out_dim=4, num_heads=2, num_layers=2, use_img_emb=False))


def _wan_animate2_inputs(model, batch, seed):
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    r = _Rand(seed)
    p = model.config.patch_size
    seg_frames = 5                                  # pixel frames per segment -> origin_latent_frames 2
    ref_frames = seg_frames // 4 + 1                # the driving (reference) video's latent frames
    gen = F                                         # generation latent frames = origin_latent_frames + 1
    grid_ref = torch.tensor([[ref_frames, VH // p[1], VW // p[2]]]).repeat(batch, 1)  # one row per sample
    # the reference pass ("extract") fills the per-layer K/V cache once per segment, before denoising
    cache = WanAnimate2KVCache(model.config.num_layers)
    with torch.no_grad():
        model([u for u in r.randn(batch, 4, ref_frames, VH, VW)], timestep=torch.tensor([500.0]),
              encoder_hidden_states=[u for u in r.randn(batch, TEXT_LEN, 32)],
              condition_latents=[u for u in r.randn(batch, 8, ref_frames, VH, VW)], kv_cache=cache,
              kv_cache_mode="extract", seq_len=ref_frames * (VH // 2) * (VW // 2), offset_grid_sizes=grid_ref)
    return dict(hidden_states=[u for u in r.randn(batch, 4, gen, VH, VW)], timestep=r.timestep(1),
                encoder_hidden_states=[u for u in r.randn(batch, TEXT_LEN, 32)],
                condition_latents=[u for u in r.randn(batch, 8, gen, VH, VW)], kv_cache=cache,
                kv_cache_mode="cached", seq_len=gen * (VH // 2) * (VW // 2), reference_grid_sizes=grid_ref,
                origin_len=seg_frames, origin_area=[VH * 8, VW * 8], return_dict=False)


# --------------------------------------------------------------------------- AnyFlow


def _anyflow_build(seed):
    from diffusers import AnyFlowTransformer3DModel
    return _seeded_build(seed, lambda: AnyFlowTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32))


def _anyflow_inputs(model, batch, seed):
    r = _Rand(seed)
    # [B, F, C, H, W]; per-frame source timestep t and target timestep r (t.expand(B, F), r < t), 0..1000
    t = r.timestep(batch)
    frac = torch.rand(batch, generator=r.gen)
    return dict(hidden_states=r.randn(batch, F, 4, VH, VW), timestep=t[:, None].repeat(1, F),
                r_timestep=(t * frac)[:, None].repeat(1, F), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                return_dict=False)


# --------------------------------------------------------------------------- AnyFlow-FAR


FAR_PARTITION = [1, 2]  # chunk frames: the first (1 frame) is cached context, the second (2 frames) is denoised


def _anyflow_far_build(seed):
    from diffusers import AnyFlowFARTransformer3DModel
    return _seeded_build(seed, lambda: AnyFlowFARTransformer3DModel(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
        attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32, chunk_partition=tuple(FAR_PARTITION)))


def _anyflow_far_inputs(model, batch, seed):
    r = _Rand(seed)
    c = model.config
    tpf = (VH // c.patch_size[1]) * (VW // c.patch_size[2])
    ctpf = (VH // c.compressed_patch_size[1]) * (VW // c.compressed_patch_size[2])
    heads, hd = c.num_attention_heads, c.attention_head_dim
    # the pipeline's preallocated KV cache, here holding chunk 0's (pre-RoPE) K/V, as encode_kv_cache leaves it
    full_len = c.full_chunk_limit * max(FAR_PARTITION) * tpf
    comp_len = (len(FAR_PARTITION) - c.full_chunk_limit + 1) * max(FAR_PARTITION) * ctpf
    kv_cache = {}
    for i in range(c.num_layers):
        full = torch.zeros(2, batch, heads, full_len, hd)
        full[:, :, :, : FAR_PARTITION[0] * tpf] = r.randn(2, batch, heads, FAR_PARTITION[0] * tpf, hd)
        kv_cache[i] = {"full_cache": full, "compressed_cache": torch.zeros(2, batch, heads, max(comp_len, 0), hd)}
    n = FAR_PARTITION[-1]
    t = r.timestep(batch)
    frac = torch.rand(batch, generator=r.gen)
    return dict(hidden_states=r.randn(batch, n, 4, VH, VW), timestep=t[:, None].repeat(1, n),
                r_timestep=(t * frac)[:, None].repeat(1, n), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                chunk_partition=list(FAR_PARTITION), kv_cache=kv_cache,
                # the pipeline passes a fresh deepcopy of {"num_cached_chunks", "is_cache_step"} per call and forward
                # adds the two token counts to it; they are given here (same values) so that a caller reusing this
                # dict across steps, as the tests do, does not change the call's signature after the first step
                kv_cache_flag={"num_cached_chunks": 1, "is_cache_step": False,
                               "num_cached_full_tokens": FAR_PARTITION[0] * tpf, "num_cached_compressed_tokens": 0},
                return_dict=False)


# --------------------------------------------------------------------------- Helios


HELIOS_HISTORY = (4, 2, 1)   # long, mid, 1x history latent frames (the pipeline's default is (16, 2, 1))


def _helios_build_with(amplify):
    def build(seed):
        from diffusers import HeliosTransformer3DModel
        reinit = (tuple((f"blocks.{i}.attn1.history_key_scale", 1.0) for i in range(2)) if amplify else ())
        return _seeded_build(seed, lambda: HeliosTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, rope_dim=(4, 6, 6), guidance_cross_attn=True,
            zero_history_timestep=True, has_multi_term_memory_patch=True, is_amplify_history=amplify,
            history_scale_mode="per_head"), reinit=reinit)
    return build


def _helios_inputs(model, batch, seed):
    r = _Rand(seed)
    long_, mid, one = HELIOS_HISTORY
    # keep_first_frame: indices = arange(1 + sum(history) + chunk) split [prefix, long, mid, 1x, chunk];
    # short history = [prefix, 1x] (2 frames); every index tensor is [1, n] (shared by the batch)
    idx = torch.arange(1 + long_ + mid + one + F)
    prefix, i_long, i_mid, i_1x, i_hid = idx.split([1, long_, mid, one, F])
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                indices_hidden_states=i_hid[None], indices_latents_history_short=torch.cat([prefix, i_1x])[None],
                indices_latents_history_mid=i_mid[None], indices_latents_history_long=i_long[None],
                latents_history_short=r.randn(batch, 4, 2, VH, VW), latents_history_mid=r.randn(batch, 4, mid, VH, VW),
                latents_history_long=r.randn(batch, 4, long_, VH, VW), return_dict=False)


# history tokens: long (4 frames, patch 4x8x8 after replicate-pad) 1, mid (2 frames, patch 2x4x4) 4, short 2x4x4 = 32
HELIOS_CONTEXT = 1 + 4 + 32

_NC = CHRONO_F * (VH // 2) * (VW // 2)   # 32

VIDEO_FAMILIES += [
    Family("chronoedit", "ChronoEditTransformer3DModel", _chronoedit_build, _chronoedit_inputs_with(CHRONO_F),
           "hidden_states", _NC, (1, 2, 2), _out4,
           notes="Wan2.1-I2V-style: latent = cat([noisy latent, 4 first-frame-mask channels, image-condition "
                 "latent]) on channels (12 in, 4 out); 2 latent frames (the pipeline's default without temporal "
                 "reasoning) take RoPE's temporal rows [0, -1] of the first rope_temporal_skip_len; self-attention "
                 "over all video tokens, cross-attention to CLIP image tokens (own add_k/add_v) + text, summed; the "
                 "processor takes the last 512 keys as text, so the prompt is padded to 512 as the pipeline does"),
    Family("chronoedit_reasoning", "ChronoEditTransformer3DModel", _chronoedit_build, _chronoedit_inputs_with(F),
           "hidden_states", _NV, (1, 2, 2), _out4,
           notes="the chronoedit entry with 3 latent frames (temporal-reasoning steps): plain RoPE temporal slice"),
    Family("wan_animate", "WanAnimateTransformer3DModel", _wan_animate_build, _wan_animate_inputs, "hidden_states",
           _NV, (1, 2, 2), _out4,
           notes="Wan2.2-Animate: latent = cat([noisy (4), mask (4) + reference/previous-segment latents (4)]) "
                 "(12 in, 4 out), frame 0 is the reference image; pose latents (F-1 frames) are patch-embedded and "
                 "added to tokens of frames 1.. (in-place slice add before flattening); a motion encoder (StyleGAN "
                 "convs + QR) and a causal-conv face encoder turn the face video into per-frame motion tokens [B, F, "
                 "heads+1, D] (zero pad frame prepended); after every inject_face_latents_blocks-th block a face "
                 "adapter cross-attends each frame's video tokens (query unflattened to [B*F, S/F]) to that frame's "
                 "motion tokens; I2V cross-attention (CLIP add_k/v + text padded to 512)"),
    Family("wan_animate2", "WanAnimate2Transformer3DModel", _wan_animate2_build, _wan_animate2_inputs,
           "hidden_states", _NV, (1, 2, 2), lambda kw: (4, F, VH, VW),
           notes="hidden_states / encoder_hidden_states / condition_latents are per-sample LISTS; the "
                 "generation step (kv_cache_mode='cached') attends over [generation | cached reference K/V] packed "
                 "into 128-aligned buffers through a flex BlockMask (same-frame reference keys only); grid sizes "
                 "read on the host (.tolist(), .item()); K/V cache is a Python object filled by a prior 'extract' "
                 "pass; timestep [1]; use_img_emb=False (its MLPProj hard-codes 1280-wide layers, ~3M params)"),
    Family("anyflow", "AnyFlowTransformer3DModel", _anyflow_build, _anyflow_inputs, "hidden_states", _NV, (1, 2, 2),
           _same_as("hidden_states"),
           notes="Wan2.1 backbone with a dual-timestep (flow-map) embedding: timestep t and r_timestep r per "
                 "latent frame [B, F], embedded separately, gated (1-g) t + g r, then repeated per token; latent "
                 "[B, F, C, H, W] (frames before channels); complex 3D RoPE; self-attention over all video "
                 "tokens, cross-attention to text"),
    Family("anyflow_far", "AnyFlowFARTransformer3DModel", _anyflow_far_build, _anyflow_far_inputs, "hidden_states",
           FAR_PARTITION[-1] * (VH // 2) * (VW // 2), (1, 2, 2), _same_as("hidden_states"),
           context_before=FAR_PARTITION[0] * (VH // 2) * (VW // 2),
           notes="chunk-wise autoregressive AnyFlow: the denoised chunk (2 latent frames) attends to the cached "
                 "pre-RoPE K/V of earlier chunks (kv_cache dict of preallocated [2, B, heads, L, d] tensors, "
                 "sliced by Python ints from kv_cache_flag) then its own keys; RoPE on the concatenation; "
                 "flex-attention backend with no mask and the sequence zero-padded to a multiple of 128 (query "
                 "AND key padded by the query's pad length, unmasked zero keys); return_dict=False returns "
                 "(sample, kv_cache)"),
    Family("helios", "HeliosTransformer3DModel", _helios_build_with(False), _helios_inputs, "hidden_states", _NV,
           (1, 2, 2), _same_as("hidden_states"), context_before=HELIOS_CONTEXT,
           notes="joint sequence [long history (patch 4x8x8), mid history (patch 2x4x4), short history (1x2x2), "
                 "noisy chunk]; history latents replicate-padded to the patch, RoPE from frame indices, "
                 "avg-pooled for the coarse patches; history tokens modulated at timestep 0; cross-attention to "
                 "text only for the noisy tokens (split by original_context_length, a Python int); output norm "
                 "keeps the last original_context_length tokens"),
    Family("helios_amplify", "HeliosTransformer3DModel", _helios_build_with(True), _helios_inputs, "hidden_states",
           _NV, (1, 2, 2), _same_as("hidden_states"), context_before=HELIOS_CONTEXT,
           notes="the helios entry with is_amplify_history: history keys scaled per head by 1 + sigmoid(s)(max-1), "
                 "split at history_seq_len = seq_len - original_context_length"),
]




def _channels_to(key: str, channels: int, dim: int = 1):
    def shape(kw):
        s = list(kw[key].shape)
        s[dim] = channels
        return tuple(s)
    return shape


# --------------------------------------------------------------------------- HunyuanVideo-1.5

HV15_IMAGE_TOKENS = 5      # the pipeline passes 729 SigLIP tokens (all zeros for text-to-video)


def _hunyuan_video15_build(seed):
    from diffusers import HunyuanVideo15Transformer3DModel
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15ByT5TextProjection

    def make():
        model = HunyuanVideo15Transformer3DModel(
            in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=32,
            text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(4, 6, 6), task_type="t2v")
        # the byT5 projection's hidden width 2048 is hard-coded (~4.3M parameters): the same class, narrower
        model.context_embedder_2 = HunyuanVideo15ByT5TextProjection(24, 32, 32)
        return model
    return _seeded_build(seed, make)


def _hunyuan_video15_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the t2v pipeline: latent [noise(4) | zero cond latent(4) | zero mask(1)]; Qwen text padded to max length
    # (mask 1 for the valid prefix); byT5 glyph stream all zeros with an all-zero mask (no quoted text in the
    # prompt); image_embeds all zeros (text-to-video); timestep float 0..1000
    latent = torch.cat([r.randn(batch, 4, F, VH, VW), torch.zeros(batch, 5, F, VH, VW)], dim=1)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    mask[:, :5] = 1
    return dict(hidden_states=latent, timestep=r.timestep(batch), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=mask, encoder_hidden_states_2=torch.zeros(batch, TEXT_LEN, 24),
                encoder_attention_mask_2=torch.zeros(batch, TEXT_LEN, dtype=torch.long),
                image_embeds=torch.zeros(batch, HV15_IMAGE_TOKENS, 16), return_dict=False)


# --------------------------------------------------------------------------- HunyuanVideo FramePack (F1 / vanilla)

FP_HISTORY = (16, 2, 1)    # the pipeline's history_sizes (4x, 2x, 1x frames)
FP_IMAGE_TOKENS = 5        # SigLIP image tokens (729 in the pipeline)


def _framepack_build(seed):
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    return _seeded_build(seed, lambda: HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=24, rope_axes_dim=(4, 6, 6),
        image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True))


def _framepack_inputs(model, batch, seed):
    r = _Rand(seed)
    h4, h2, h1 = FP_HISTORY
    # vanilla (F1) sampling: indices = [prefix | 4x history | 2x history | 1x history | window]
    idx = torch.arange(0, 1 + h4 + h2 + h1 + F)
    prefix, i4, i2, i1, window = idx.split([1, h4, h2, h1, F])
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=r.timestep(batch),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN), pooled_projections=r.randn(batch, 24),
                image_embeds=r.randn(batch, FP_IMAGE_TOKENS, 16), indices_latents=window,
                guidance=torch.full((batch,), 10000.0),
                latents_clean=r.randn(batch, 4, 1 + h1, VH, VW), indices_latents_clean=torch.cat([prefix, i1]),
                latents_history_2x=r.randn(batch, 4, h2, VH, VW), indices_latents_history_2x=i2,
                latents_history_4x=r.randn(batch, 4, h4, VH, VW), indices_latents_history_4x=i4,
                return_dict=False)


def _fp_context_before():
    h4, h2, h1 = FP_HISTORY
    n4 = math.ceil(h4 / 4) * math.ceil(VH / 8) * math.ceil(VW / 8)
    n2 = math.ceil(h2 / 2) * math.ceil(VH / 4) * math.ceil(VW / 4)
    n1 = (1 + h1) * (VH // 2) * (VW // 2)
    return n4 + n2 + n1


# --------------------------------------------------------------------------- LTX-2 (audio + video)

LTX2_FPS = 24.0
LTX2_AUDIO_LEN = round(((F - 1) * 8 + 1) / LTX2_FPS * 16000 / 160 / 4)    # 18 audio latents for 17 frames


def _ltx2_build(seed):
    from diffusers import LTX2VideoTransformer3DModel
    return _seeded_build(seed, lambda: LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=32))


def _ltx2_inputs(model, batch, seed):
    r = _Rand(seed)
    rope, arope = model.rope, model.audio_rope
    # as the pipeline: packed video [B, F*H*W, C] and audio [B, L, C*mel] latents, the connector's text (one for
    # each stream) with its all-ones mask (padding replaced by registers), t in 0..1000 also as sigma,
    # precomputed video / audio coordinates, use_cross_timestep=True (the pipeline's default)
    t = r.timestep(batch)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
    return dict(hidden_states=r.randn(batch, F * VH * VW, 8), audio_hidden_states=r.randn(batch, LTX2_AUDIO_LEN, 8),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                audio_encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), timestep=t, sigma=t.clone(),
                encoder_attention_mask=mask, audio_encoder_attention_mask=mask.clone(), num_frames=F, height=VH,
                width=VW, fps=LTX2_FPS, audio_num_frames=LTX2_AUDIO_LEN,
                video_coords=rope.prepare_video_coords(batch, F, VH, VW, torch.device("cpu"), fps=LTX2_FPS),
                audio_coords=arope.prepare_audio_coords(batch, LTX2_AUDIO_LEN, torch.device("cpu")),
                isolate_modalities=False, spatio_temporal_guidance_blocks=None, perturbation_mask=None,
                use_cross_timestep=True, return_dict=False)


# --------------------------------------------------------------------------- Kandinsky 6 (video + audio)

K6_AUDIO_LEN = math.ceil(((F - 1) * 4 + 1) / 24.0 * 44100 / 1024)      # 17 audio latents


def _kandinsky6_build(seed):
    from diffusers import Kandinsky6Transformer3DModel
    return _seeded_build(seed, lambda: Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=32, in_text_dim2=24, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
        in_audio_dim=4, out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True,
        fix_modulation=True))


def _kandinsky6_inputs(model, batch, seed):
    r = _Rand(seed)
    # text-to-video+audio as the pipeline: channels-last [latent(4) | zero cond latent(4) | zero mask(1)];
    # no mask when no prompt is padded; visual_rope_pos / visual_token_type_ids None (no reference frame)
    latent = torch.cat([r.randn(batch, F, VH, VW, 4), torch.zeros(batch, F, VH, VW, 5)], dim=-1)
    return dict(hidden_states=latent, audio_hidden_states=r.randn(batch, K6_AUDIO_LEN, 4),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), pooled_projections=r.randn(batch, 24),
                timestep=r.timestep(batch), visual_rope_pos=None, encoder_attention_mask=None,
                visual_token_type_ids=None, return_dict=False)


# --------------------------------------------------------------------------- Motif-Video


def _motif_build_with(decoder_layers, cross):
    def build(seed):
        from diffusers import MotifVideoTransformer3DModel
        return _seeded_build(seed, lambda: MotifVideoTransformer3DModel(
            in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1 + decoder_layers, num_decoder_layers=decoder_layers, mlp_ratio=2.0, patch_size=2,
            patch_size_t=1, text_embed_dim=32, rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=cross,
            enable_text_cross_attention_single=cross))
    return build


def _motif_inputs(model, batch, seed):
    r = _Rand(seed)
    # t2v pipeline: [latents(4) | zero condition latent(4) | zero mask(1)], boolean text mask, t in 0..1000
    latent = torch.cat([r.randn(batch, 4, F, VH, VW), torch.zeros(batch, 5, F, VH, VW)], dim=1)
    return dict(hidden_states=latent, timestep=r.timestep(batch), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool), return_dict=False)


VIDEO_FAMILIES += [
    Family("hunyuan_video15", "HunyuanVideo15Transformer3DModel", _hunyuan_video15_build, _hunyuan_video15_inputs,
           "hidden_states", _NV, (1, 2, 2), _channels_to("hidden_states", 4), context_after=HV15_IMAGE_TOKENS + 2 * TEXT_LEN,
           notes="HunyuanVideo-1.5 t2v: latent [noise | zero cond latent | zero mask] (9 in, 4 out); Qwen text through "
                 "a timestep-conditioned token refiner (text-only attention), byT5 glyph stream and SigLIP image "
                 "tokens (all zero for t2v; torch.all(image_embeds == 0) picks the mask) projected and tagged with a "
                 "learned cond-type embedding; per sample the text tokens are reordered by boolean masks (valid image, "
                 "valid byT5, valid Qwen, then the invalid ones zeroed); double-stream blocks only, joint attention "
                 "image first then the reordered conditions, outer-product key/query mask; 3D real RoPE inside; the "
                 "byT5 projection is swapped for a narrower instance of its own class (hidden 2048 hard-coded)"),
    Family("hunyuan_framepack", "HunyuanVideoFramepackTransformer3DModel", _framepack_build, _framepack_inputs,
           "hidden_states", _NV, (1, 2, 2), _same_as("hidden_states"), context_before=_fp_context_before(),
           context_after=FP_IMAGE_TOKENS + TEXT_LEN,
           notes="HunyuanVideo double + single stream blocks with FramePack history: clean latents (prefix + 1x, "
                 "patch 1x2x2), 2x (2x4x4) and 4x (4x8x8, replicate-padded) history latents are embedded by their own "
                 "Conv3d and PREPENDED to the noisy window (joint sequence [4x, 2x, 1x, window, image tokens, text]); "
                 "RoPE from 1D frame indices per segment (history RoPE avg-pooled); SigLIP image tokens projected "
                 "and prepended to the refined text; for batch > 1 the key mask is written per sample with a "
                 "tensor-valued slice end (latent length + valid text length); the output keeps the last window "
                 "tokens; guidance x1000 (10.0 * 1000); vanilla (F1) index layout"),
    Family("ltx2", "LTX2VideoTransformer3DModel", _ltx2_build, _ltx2_inputs, "hidden_states", F * VH * VW, None,
           _same_as("hidden_states"),
           notes="LTX-2 joint audio-video: packed video [B, F*H*W, C] and audio [B, L, C] streams, each with "
                 "self-attention (interleaved RoPE from precomputed video_coords [B, 3, N, 2] / audio_coords "
                 "[B, 1, L, 2] patch bounds), cross-attention to its own text, then audio-to-video (video queries, "
                 "audio keys) and video-to-audio (audio queries, video keys) cross-attention with temporal-only "
                 "RoPE; adaLN-single with per-block scale_shift_tables; output (video, audio) tuple; qk RMS-norm "
                 "across heads; text mask 2D -> additive bias; t in 0..1000 also passed as sigma, "
                 "use_cross_timestep=True"),
    Family("kandinsky6", "Kandinsky6Transformer3DModel", _kandinsky6_build, _kandinsky6_inputs, "hidden_states",
           _NV, (1, 2, 2), _channels_to("hidden_states", 4, dim=-1),
           notes="channels-LAST latent [B, F, H, W, 2C+1] (noise, zero cond latent, zero mask; out C); separate "
                 "video and audio text encoders (text self-attention, 1D RoPE, no mask when unpadded); fused "
                 "blocks: video self-attention (3D RoPE as 2x2 rotation matrices), video cross-attention to text, "
                 "audio self/cross-attention, then video<-audio and audio<-video cross-attention (ca_rope: keys "
                 "and queries rotated by their own stream's RoPE; cross_gates, fix_modulation as shipped); pooled "
                 "CLIP added to both time embeddings; output (video, audio) tuple"),
    Family("motif_video", "MotifVideoTransformer3DModel", _motif_build_with(0, True), _motif_inputs, "hidden_states",
           _NV, (1, 2, 2), _channels_to("hidden_states", 4), context_after=TEXT_LEN,
           notes="HunyuanVideo-like double then single stream blocks (joint attention image first, then text, key "
                 "mask = True for image + text mask); latent [noise | zero cond | zero mask] (9 in, 4 out); extra "
                 "text cross-attention per block whose QUERY is the joint attention's image output (RoPE on the "
                 "query only); 3D real RoPE inside"),
    Family("motif_video_decoder", "MotifVideoTransformer3DModel", _motif_build_with(1, False), _motif_inputs,
           "hidden_states", _NV, (1, 2, 2), _channels_to("hidden_states", 4), context_after=TEXT_LEN,
           notes="motif_video with num_decoder_layers=1 and no text cross-attention: the last single block is a "
                 "decoder whose stream restarts from the patch embedding (cloned before the encoder) and whose "
                 "'context' is the encoder's final image tokens: joint attention over [decoder image, encoder "
                 "image] (2N keys, RoPE on the first N only; image_rows gives None there), no mask"),
]


# --------------------------------------------------------------------------- MiniMax-H3 (packed video + audio)

H3_AUDIO = 5           # audio latent rows in the packed sequence
_H3_NV = F * (VH // 2) * (VW // 2)


def _minimax_h3_build(seed):
    from diffusers import MiniMaxH3Transformer3DModel
    return _seeded_build(seed, lambda: MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
        ffn_dim=64, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=32, freq_dim=16,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2))


def _minimax_h3_layout():
    """One packed layout (shared by every batch item): text rows, then audio rows, then the target video rows."""
    nt, na, nv = TEXT_LEN, H3_AUDIO, _H3_NV
    gh, gw = VH // 2, VW // 2
    text_pos = torch.stack([torch.arange(nt), torch.zeros(nt, dtype=torch.long), torch.zeros(nt, dtype=torch.long)], 1)
    audio_pos = torch.stack([torch.arange(na), torch.zeros(na, dtype=torch.long), torch.zeros(na, dtype=torch.long)], 1)
    video_pos = torch.cartesian_prod(torch.arange(F), torch.arange(gh), torch.arange(gw))
    position_ids = torch.cat([text_pos, audio_pos, video_pos])
    token_tags = torch.cat([torch.full((nt,), 1), torch.full((na,), 2), torch.full((nv,), 0)])
    # two distinct noise levels: index 0 = video (and text), index 1 = audio
    timestep_indices = torch.cat([torch.zeros(nt, dtype=torch.long), torch.ones(na, dtype=torch.long),
                                  torch.zeros(nv, dtype=torch.long)])
    return dict(position_ids=position_ids, token_tags=token_tags, timestep_indices=timestep_indices,
                text_indices=torch.arange(nt), audio_indices=torch.arange(nt, nt + na),
                video_indices=torch.arange(nt + na, nt + na + nv))


def _minimax_h3_inputs(model, batch, seed):
    r = _Rand(seed)
    # no pipeline in diffusers 0.42.1: the forward's contract. Video latent rows already patchified
    # [B, N_video, C * 1 * 2 * 2] in (f, y, x) order; timestep = the DISTINCT noise levels [num_timesteps]
    # in [0, 1], not per batch item
    return dict(hidden_states=r.randn(batch, _H3_NV, 16), audio_hidden_states=r.randn(batch, H3_AUDIO, 4),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32), timestep=r.timestep(2, 1.0),
                **_minimax_h3_layout(), return_dict=False)


VIDEO_FAMILIES.append(
    Family("minimax_h3", "MiniMaxH3Transformer3DModel", _minimax_h3_build, _minimax_h3_inputs, "hidden_states",
           _H3_NV, None, _same_as("hidden_states"), context_before=TEXT_LEN + H3_AUDIO,
           notes="ONE packed 1D sequence per sample: text rows (context_embedder + a text-only token refiner), "
                 "audio rows and video rows are index_copy'd into a zero buffer at caller-given positions "
                 "(text_indices / audio_indices / video_indices, here text, audio, then video); full "
                 "self-attention over the whole sequence, no cross-attention; adaLN per ROW: "
                 "timestep is the [num_timesteps] distinct noise levels and the modulation is index_select'ed "
                 "with timestep_indices * 3 + token_tags (per-row tensors of length seq_len); 3-axis RoPE from "
                 "position_ids [seq_len, 3] (rotate-half on the first 6 * rope_freq_dim channels); two output "
                 "heads over all rows, video / audio rows selected with index_select; latent passed packed "
                 "[B, N, C * 4]; no pipeline in diffusers 0.42.1"))


# --------------------------------------------------------------------------- SANA-WM (camera-controlled video)

WM_PIXEL_FRAMES = (F - 1) * 8 + 1      # 17 frames -> 3 latent frames at the LTX-2 VAE's temporal stride 8


def _sana_wm_build(seed):
    from diffusers import SanaWMTransformer3DModel
    return _seeded_build(seed, lambda: SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1),
        softmax_every_n=2, linear_head_dim=16, t_kernel_size=3, conv_kernel_size=4, caption_channels=32,
        mlp_ratio=2.0, chunk_plucker_post_attn_blocks=2),
        # the Plucker embedder starts at zero (a checkpoint fills it): with zeros the camera rays do nothing
        reinit=(("plucker_embedder.proj.weight", 0.1), ("plucker_embedder.proj.bias", 0.1)))


def _sana_wm_camera(batch):
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import prepare_camera
    # a camera moving forward and panning slightly, as _build_camera_kwargs gets it from c2w + intrinsics
    c2w = np.tile(np.eye(4, dtype=np.float32), (WM_PIXEL_FRAMES, 1, 1))
    c2w[:, 2, 3] = np.linspace(0, 0.5, WM_PIXEL_FRAMES)
    c2w[:, 0, 3] = np.linspace(0, 0.1, WM_PIXEL_FRAMES)
    intr = np.tile(np.array([200.0, 200.0, VW * 16.0, VH * 16.0], dtype=np.float32), (WM_PIXEL_FRAMES, 1))
    cam = prepare_camera(c2w, intr, target_size=(VH * 32, VW * 32), vae_stride=(8, 32, 32))
    return (cam["raymap"].unsqueeze(0).expand(batch, -1, -1).contiguous(),
            cam["chunk_plucker"].unsqueeze(0).expand(batch, -1, -1, -1, -1).contiguous())


def _sana_wm_inputs(model, batch, seed):
    r = _Rand(seed)
    raymap, plucker = _sana_wm_camera(batch)
    # as the pipeline: per-frame timestep [B, 1, F] (0..1000, the first frame is the clean conditioning anchor,
    # pinned to 0), text [B, 1, L, D] with its mask as `mask`, data_info img_hw, camera raymap [B, F, 20] and
    # chunk Plucker rays [B, 48, F, H, W]
    t = r.timestep(batch)[:, None, None].expand(batch, 1, F).clone()
    t[:, :, 0] = 0.0
    return dict(hidden_states=r.randn(batch, 4, F, VH, VW), timestep=t,
                encoder_hidden_states=r.randn(batch, 1, TEXT_LEN, 32),
                mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                data_info={"img_hw": torch.tensor([[VH * 32.0, VW * 32.0]])},
                camera_conditions=raymap, chunk_plucker=plucker, return_dict=False)


VIDEO_FAMILIES.append(
    Family("sana_wm", "SanaWMTransformer3DModel", _sana_wm_build, _sana_wm_inputs, "hidden_states", F * VH * VW,
           (1, 1, 1), _same_as("hidden_states"),
           tolerance=(1e-2, 5e-3),  # its softmax attention runs in bfloat16 (the processor casts q, k, v)
           notes="SANA-WM camera-controlled video DiT, patch (1, 1, 1); blocks alternate bidirectional "
                 "Gated-DeltaNet linear attention (a chunked state recurrence over frames, per pixel) and "
                 "softmax attention, each with a UCPE camera branch (per-ray transforms from the raymap "
                 "camera_conditions [B, F, 20]); chunk Plucker rays [B, 48, F, H, W] embedded and added after "
                 "attention; per-frame timestep [B, 1, F] (integer, first frame pinned to 0) so the adaLN "
                 "modulation is per frame (tokens reshaped [B, F, H*W, C]); cross-attention to text [B, 1, L, D] "
                 "with mask; GLUMBConvTemp feed-forward (spatial depthwise conv + temporal conv)"))


# --------------------------------------------------------------------------- SANA-WM LTX-2 refiner (video)


def _sana_wm_refiner_build(seed):
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    return _seeded_build(seed, lambda: SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=32))


def _sana_wm_refiner_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the refiner's denoising call minus its sliding KV cache: packed tokens [B, F*H*W, C] of the active
    # block, timestep per token [B, N] = sigma * timestep_scale_multiplier, RoPE from
    # build_rotary_emb_for_absolute_positions, multiplicative text mask [B, L]
    rope = model.build_rotary_emb_for_absolute_positions(batch_size=batch, frame_positions=list(range(F)),
                                                         height=VH, width=VW, device=torch.device("cpu"), fps=16.0)
    sigma = r.timestep(batch, 1.0)
    return dict(hidden_states=r.randn(batch, F * VH * VW, 8), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                timestep=(sigma * 1000.0)[:, None].expand(batch, F * VH * VW).contiguous(), video_rotary_emb=rope,
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long), return_dict=False)


VIDEO_FAMILIES.append(
    Family("sana_wm_refiner", "SanaWMLTX2RefinerTransformer3DModel", _sana_wm_refiner_build,
           _sana_wm_refiner_inputs, "hidden_states", F * VH * VW, None, _same_as("hidden_states"),
           notes="LTX-2-style video-only refiner (audio modules built, unused): latent passed packed [B, N, C], "
                 "patch 1; per-TOKEN timestep [B, N] (already x timestep_scale_multiplier) so the adaLN "
                 "modulation is per token; video_rotary_emb (cos, sin) precomputed from absolute frame "
                 "positions (build_rotary_emb_for_absolute_positions); self-attention over the tokens, "
                 "cross-attention to text with a multiplicative mask turned additive; qk RMS-norm across heads. "
                 "The shipped refiner runs block-autoregressively with a Python SanaWMRefinerKVCache "
                 "(kv_cache_mode='inject': queries attend to [sink, history, current] K/V); this entry runs "
                 "the documented kv_cache=None mode (plain full self-attention over the current block)"))
