"""Conformance families, continued: audio transformers of diffusers 0.42.1 (MiniMax Music 3, Stable Audio 3,
ACE-Step, LongCat-Audio-DiT).

Same record, helpers and rules as tests/conformance_models.py (which appends these entries to its
registry); entries that exercise a refusal are listed in test_conformance.REFUSED.
"""
from __future__ import annotations

import torch

from conformance_models import (AUDIO_LEN, Family, TEXT_LEN, _Rand, _same_as, _seeded_build)

AUDIO_FAMILIES: list[Family] = []


# --------------------------------------------------------------------------- MiniMax Music 3 (1D)


def _minimax_music3_build(seed):
    from diffusers import MiniMaxMusic3Transformer1DModel
    return _seeded_build(seed, lambda: MiniMaxMusic3Transformer1DModel(
        in_channels=4, condition_dim=8, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=16))


def _minimax_music3_inputs(model, batch, seed):
    r = _Rand(seed)
    # no pipeline in diffusers 0.42.1: the forward's contract. The conditioning is FRAME-ALIGNED [B, L, cond]
    # (from MiniMaxMusic3ConditionEncoder), flow-matching time in [0, 1] with 1 = data
    return dict(hidden_states=r.randn(batch, 4, AUDIO_LEN), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=r.randn(batch, AUDIO_LEN, 8), return_dict=False)


# --------------------------------------------------------------------------- Stable Audio 3 (1D)

SA3_MEMORY = 3


def _stable_audio3_build_with(patch_size):
    def build(seed):
        from diffusers import StableAudio3DiTModel
        return _seeded_build(seed, lambda: StableAudio3DiTModel(
            io_channels=4, patch_size=patch_size, embed_dim=16, depth=2, num_heads=2, cond_token_dim=24,
            global_cond_dim=24, local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2.0,
            num_memory_tokens=SA3_MEMORY, use_differential_attention=True),
            # pre/post-process 1x1 convs start at zero (identity residual); a checkpoint fills them
            reinit=(("preprocess_conv.weight", 0.3), ("postprocess_conv.weight", 0.3)))
    return build


def _stable_audio3_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the pipeline: the duration embedding is both the global (AdaLN) input [B, D] and one extra
    # cross-attention token appended after the text (prepare_cross_attention), mask extended with a 1;
    # timestep = flow-matching sigma in [0, 1]
    glob = r.randn(batch, 24)
    text = torch.cat([r.randn(batch, TEXT_LEN, 24), glob[:, None]], dim=1)
    return dict(hidden_states=r.randn(batch, 4, AUDIO_LEN), timestep=r.timestep(batch, 1.0),
                encoder_hidden_states=text, global_hidden_states=glob,
                encoder_attention_mask=torch.ones(batch, TEXT_LEN + 1, dtype=torch.long), return_dict=False)


# --------------------------------------------------------------------------- ACE-Step 1.5 (1D)

ACE_WINDOW = 4


def _ace_step_build(seed):
    from diffusers import AceStepTransformer1DModel
    return _seeded_build(seed, lambda: AceStepTransformer1DModel(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=ACE_WINDOW,
        encoder_hidden_size=32))


def _ace_step_inputs(model, batch, seed):
    r = _Rand(seed)
    # channels-last latent [B, L, C]; context_latents = cat(src_latents, chunk_mask) [B, L, 2C] as the pipeline
    # builds it; timestep_r = timestep (standard inference), flow time in [0, 1]
    t = r.timestep(batch, 1.0)
    return dict(hidden_states=r.randn(batch, AUDIO_LEN, 4), timestep=t, timestep_r=t.clone(),
                encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                context_latents=torch.cat([r.randn(batch, AUDIO_LEN, 4), torch.ones(batch, AUDIO_LEN, 4)], -1),
                return_dict=False)


# --------------------------------------------------------------------------- LongCat-AudioDiT (1D)


def _longcat_audio_build(seed):
    from diffusers import LongCatAudioDiTTransformer
    return _seeded_build(seed, lambda: LongCatAudioDiTTransformer(
        dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=32, latent_dim=4, ff_mult=2.0),
        # ConvNeXt-V2 GRN of the text convs: gamma / beta start at zero (GRN = identity)
        reinit=tuple((f"text_conv_layer.{i}.grn.{p}", 0.5) for i in range(4) for p in ("gamma", "beta")))


def _longcat_audio_inputs(model, batch, seed):
    r = _Rand(seed)
    # as the pipeline: channels-last latent [B, L, C]; attention_mask = _lens_to_mask(duration) (all True for
    # equal-length batches), text mask bool, latent_cond zeros (text-to-audio), timestep t / 1000 in [0, 1]
    return dict(hidden_states=r.randn(batch, AUDIO_LEN, 4), encoder_hidden_states=r.randn(batch, TEXT_LEN, 32),
                encoder_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool), timestep=r.timestep(batch, 1.0),
                attention_mask=torch.ones(batch, AUDIO_LEN, dtype=torch.bool),
                latent_cond=torch.zeros(batch, AUDIO_LEN, 4), return_dict=False)


AUDIO_FAMILIES += [
    Family("minimax_music3", "MiniMaxMusic3Transformer1DModel", _minimax_music3_build, _minimax_music3_inputs,
           "hidden_states", AUDIO_LEN, (1,), _same_as("hidden_states"), context_before=1,
           notes="1D latent [B, C, L]; the conditioning encoder_hidden_states is frame-aligned [B, L, cond] and "
                 "concatenated on channels with the latent (and a zero block) before a 1x1 conv and proj_in, so "
                 "it is per token; the timestep embedding is prepended as one token (self-attention over 1 + L "
                 "keys, image rows 1..L), no adaLN; partial RoPE (first rotary_dim channels) over 1 + L "
                 "positions computed inside; random-Fourier timestep features, time in [0, 1] with 1 = data; "
                 "no cross-attention; no pipeline in diffusers 0.42.1"),
    Family("stable_audio3", "StableAudio3DiTModel", _stable_audio3_build_with(1), _stable_audio3_inputs,
           "hidden_states", AUDIO_LEN, (1,), _same_as("hidden_states"), context_before=SA3_MEMORY,
           notes="1D latent [B, C, L]; num_memory_tokens learned tokens prepended (self-attention over M + L keys, "
                 "image rows M..M+L); differential attention Attn(q1, k1, v) - Attn(q2, k2, v) in self- and "
                 "cross-attention (fused to_qkv chunked in 5); partial RoPE over M + L positions computed "
                 "inside; RMS qk-norm; adaLN from a global duration embedding + timestep, gates sigmoid(1 - g); "
                 "cross-attention to text + the duration token (pipeline appends it), text mask applied by "
                 "replacing masked tokens with a learned padding embedding; 1x1 pre/post-process convs with a "
                 "residual; timestep in [0, 1]"),
    Family("stable_audio3_p2", "StableAudio3DiTModel", _stable_audio3_build_with(2), _stable_audio3_inputs,
           "hidden_states", AUDIO_LEN // 2, (2,), _same_as("hidden_states"), context_before=SA3_MEMORY,
           notes="the stable_audio3 entry with patch_size=2 (not a shipped config): the channels-last [B, L, C] "
                 "sequence is reshaped to [B, L/2, 2C] (two time steps per token) before proj_in and back "
                 "after proj_out"),
    Family("ace_step", "AceStepTransformer1DModel", _ace_step_build, _ace_step_inputs, "hidden_states",
           AUDIO_LEN // 2, (2,), _same_as("hidden_states"),
           notes="channels-last latent [B, L, C] concatenated on channels with context_latents (source latents + "
                 "chunk mask, per frame) then patchified by a strided Conv1d (patch 2) and un-patchified by a "
                 "ConvTranspose1d; GQA (1 kv head of 2), RMS qk-norm, 1D RoPE over the token positions; "
                 "layers alternate sliding-window (additive band mask |i - j| <= window built inside from "
                 "arange, [1, 1, S, S]) and full self-attention, then cross-attention to the condition "
                 "encoder's tokens; adaLN from two timestep embeddings (t and t - r); timestep in [0, 1]"),
    Family("longcat_audio", "LongCatAudioDiTTransformer", _longcat_audio_build, _longcat_audio_inputs,
           "hidden_states", AUDIO_LEN, None, _same_as("hidden_states"),
           notes="channels-last latent [B, L, C] (no patching); attention_mask [B, L] is a per-token latent "
                 "mask: zeroes masked input / output tokens, is the self-attention key mask and multiplies the "
                 "self- and cross-attention outputs; text goes through an MLP and 4 ConvNeXt-V2 1D blocks "
                 "(depthwise conv over text tokens); global adaLN from timestep + masked text mean; RMS qk-norm "
                 "over all heads; RoPE on self-attention q/k and on cross-attention q (audio positions) and k "
                 "(text positions); long skip (input embedding added before norm_out); timestep in [0, 1]"),
]
