"""Small random-weight diffusers models, built from configs, for the demo and the tests.

No weights are downloaded: every model here is a real diffusers / transformers class
constructed from a small config and initialised from a seed, so the same seed gives the
same weights on every machine. The tokenizers of the tiny SD3 pipeline are built from
vocabulary files written to a temporary folder (see :func:`tiny_clip_tokenizer` and
:func:`tiny_t5_tokenizer`), so the whole pipeline needs no network either.

:func:`example_inputs` makes the keyword arguments of a transformer's ``forward``
from its config and forward signature (never from its class name), so it also works for
a model of another family that takes the same kinds of inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
from typing import Any, Iterator

import torch

__all__ = [
    "tiny_sd3_transformer",
    "tiny_dit_transformer",
    "tiny_pixart_transformer",
    "tiny_clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_sd3_pipeline",
    "example_inputs",
    "packed_image_ids",
]


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Initialise weights from ``seed`` without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # diffusers warns on every .to(dtype), even to the dtype the model already has
    return model if dtype == torch.float32 else model.to(dtype)


# --------------------------------------------------------------------------- transformers


def tiny_sd3_transformer(
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    in_channels: int = 4,
    sample_size: int = 16,
    joint_attention_dim: int = 64,
    pooled_projection_dim: int = 48,
    pos_embed_max_size: int = 64,
    qk_norm: str | None = None,
    dual_attention_layers: tuple[int, ...] = (),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A tiny ``SD3Transformer2DModel`` (MMDiT: joint text/image attention), in eval mode.

    ``joint_attention_dim`` and ``pooled_projection_dim`` match the text encoders of
    :func:`tiny_sd3_pipeline` (T5 width 64; CLIP projections 16 + 32). The positional
    table covers latents up to ``pos_embed_max_size * patch_size`` pixels a side.
    ``qk_norm="rms_norm"`` with ``dual_attention_layers`` gives an SD3.5-style model.
    """
    from diffusers import SD3Transformer2DModel

    inner_dim = num_attention_heads * attention_head_dim
    with _seeded(seed):
        model = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            # the context stream runs at the image stream's width
            caption_projection_dim=inner_dim,
            pooled_projection_dim=pooled_projection_dim,
            pos_embed_max_size=max(pos_embed_max_size, sample_size // patch_size),
            dual_attention_layers=tuple(dual_attention_layers),
            qk_norm=qk_norm,
        )
    return _cast(model, dtype).eval()


def tiny_dit_transformer(
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    in_channels: int = 4,
    out_channels: int | None = None,
    sample_size: int = 16,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A tiny class-conditional ``DiTTransformer2DModel`` (adaLN-zero blocks), in eval mode.

    ``num_classes`` becomes the config's ``num_embeds_ada_norm``. ``out_channels=None``
    means ``2 * in_channels`` (mean and learned variance, as in the released DiT).
    Note: diffusers' DiT unpatchifies assuming a square latent, so feed it square inputs.
    """
    from diffusers import DiTTransformer2DModel

    with _seeded(seed):
        model = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=2 * in_channels if out_channels is None else out_channels,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=patch_size,
            num_embeds_ada_norm=num_classes,
        )
    return _cast(model, dtype).eval()


def tiny_pixart_transformer(
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    patch_size: int = 2,
    in_channels: int = 4,
    out_channels: int | None = None,
    sample_size: int = 16,
    caption_channels: int = 32,
    use_additional_conditions: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A tiny ``PixArtTransformer2DModel`` (adaLN-single, cross-attention to text), in eval mode.

    ``out_channels=None`` means ``2 * in_channels`` as in PixArt-alpha. With
    ``use_additional_conditions=True`` the model also takes resolution / aspect-ratio
    conditions (PixArt-alpha 1024), which :func:`example_inputs` then provides.
    """
    from diffusers import PixArtTransformer2DModel

    inner_dim = num_attention_heads * attention_head_dim
    if use_additional_conditions and inner_dim % 3:
        # diffusers splits the width three ways (timestep, resolution, aspect ratio)
        raise ValueError(
            f"use_additional_conditions needs a model width divisible by 3, got {inner_dim}"
        )
    with _seeded(seed):
        model = PixArtTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=2 * in_channels if out_channels is None else out_channels,
            num_layers=num_layers,
            # captions are projected to the model width before cross-attention
            cross_attention_dim=inner_dim,
            caption_channels=caption_channels,
            sample_size=sample_size,
            patch_size=patch_size,
            use_additional_conditions=use_additional_conditions,
        )
    return _cast(model, dtype).eval()


# --------------------------------------------------------------------------- example inputs


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def example_inputs(
    model: torch.nn.Module,
    batch: int = 2,
    height: int = 16,
    width: int = 12,
    seed: int = 0,
    *,
    text_len: int = 8,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)``: random, deterministic from ``seed``.

    ``height`` / ``width`` are in latent pixels (must be multiples of the patch size).
    What is built is read from the config and the forward signature:
    ``encoder_hidden_states`` from ``joint_attention_dim`` / ``caption_channels`` /
    ``cross_attention_dim``; ``pooled_projections`` from ``pooled_projection_dim``;
    ``class_labels`` from ``num_embeds_ada_norm`` when forward takes them;
    ``added_cond_kwargs`` when forward takes them (tensors if the model uses the
    additional conditions, else ``None`` entries, as diffusers' pipelines pass).
    When forward takes ``img_ids`` and ``txt_ids`` (Flux-style), the latent is passed
    packed as tokens, ``[batch, (height / 2) * (width / 2), in_channels]`` (2x2 latent
    pixels per token, ``in_channels`` already counts the four), with ``img_ids`` /
    ``txt_ids`` (2D, one row per token) and ``guidance`` when ``guidance_embeds``.
    When forward takes ``encoder_mask`` it gets an all-ones text mask; with
    ``image_rotary_emb`` too (Lumina-Next-style) the 2D RoPE table of the patch grid and
    proportional attention's ``base_sequence_length``.
    ``return_dict=False`` is added where forward accepts it.
    """
    config = model.config
    params = inspect.signature(model.forward).parameters
    if dtype is None:
        dtype = next(model.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    in_channels = _config_get(config, "in_channels")
    # Flux-style: the latent goes in as tokens, positions as ids (one row per token)
    packed = "img_ids" in params and "txt_ids" in params
    if packed:
        if height % _PACK or width % _PACK:
            raise ValueError(f"a packed latent needs height and width divisible by {_PACK}, got {height}x{width}")
        rows, cols = height // _PACK, width // _PACK
        latent = randn(batch, rows * cols, in_channels)
    else:
        latent = randn(batch, in_channels, height, width)
    kwargs: dict[str, Any] = {
        "hidden_states": latent,
        # a float timestep in the training range works for every family
        "timestep": torch.rand(batch, generator=gen) * 999.0,
    }
    if packed:
        kwargs["img_ids"] = packed_image_ids(rows, cols)
        kwargs["txt_ids"] = torch.zeros(text_len, 3)
        if "guidance" in params and _config_get(config, "guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 3.5)

    text_dim = None
    for key in ("joint_attention_dim", "caption_channels", "cross_attention_dim"):
        if _config_get(config, key) is not None:
            text_dim = _config_get(config, key)
            break
    if text_dim is not None and "encoder_hidden_states" in params:
        kwargs["encoder_hidden_states"] = randn(batch, text_len, text_dim)

    pooled_dim = _config_get(config, "pooled_projection_dim")
    if pooled_dim is not None and "pooled_projections" in params:
        kwargs["pooled_projections"] = randn(batch, pooled_dim)

    num_classes = _config_get(config, "num_embeds_ada_norm")
    if num_classes is not None and "class_labels" in params:
        kwargs["class_labels"] = torch.randint(0, num_classes, (batch,), generator=gen)

    if "added_cond_kwargs" in params:
        # the model resolves a None config value into this attribute
        uses_conditions = getattr(model, "use_additional_conditions", None)
        if uses_conditions is None:
            uses_conditions = bool(_config_get(config, "use_additional_conditions"))
        if uses_conditions:
            resolution = torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1)
            aspect_ratio = torch.tensor([[height / width]]).repeat(batch, 1)
            kwargs["added_cond_kwargs"] = {
                "resolution": resolution.to(dtype),
                "aspect_ratio": aspect_ratio.to(dtype),
            }
        else:
            kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}

    if "encoder_mask" in params and "encoder_hidden_states" in kwargs:
        kwargs["encoder_mask"] = torch.ones(batch, text_len, dtype=torch.long)

    if "image_rotary_emb" in params and "encoder_mask" in params:
        # Lumina-Next-style: complex RoPE frequencies of the 2D patch grid, precomputed by the pipeline
        # (which builds a 384 x 384 table; the rows of a table covering the grid are the same)
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        patch = _config_get(config, "patch_size") or 1
        head_dim = _config_get(config, "hidden_size") // _config_get(config, "num_attention_heads")
        kwargs["image_rotary_emb"] = get_2d_rotary_pos_embed_lumina(head_dim, height // patch, width // patch)
        if "cross_attention_kwargs" in params:
            # proportional attention: the pipeline's base sequence length is the image token count of its
            # default resolution; here that of this latent (the softmax scale is then exactly 1/sqrt(d))
            kwargs["cross_attention_kwargs"] = {"base_sequence_length": (height // patch) * (width // patch)}

    if "return_dict" in params:
        kwargs["return_dict"] = False
    return kwargs


_PACK = 2  # Flux packs 2x2 latent pixels into one token


def packed_image_ids(rows: int, cols: int) -> torch.Tensor:
    """Flux-style position ids of a ``rows x cols`` token grid: ``[rows * cols, 3]`` rows ``(0, row, col)``."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"


def tiny_clip_tokenizer(model_max_length: int = 77):
    """A ``CLIPTokenizer`` over single bytes, loaded from files written to a temp folder.

    The vocabulary has every byte (plus its end-of-word form) and no merges, so every
    character is a token: tiny (514 entries), yet a real byte-level BPE tokenizer that
    handles any text. ``<|endoftext|>`` (eos and pad) is the last id.
    """
    from transformers import CLIPTokenizer

    chars = [_bytes_to_unicode()[b] for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "tokenizer_class": "CLIPTokenizer",
                    "model_max_length": model_max_length,
                    "bos_token": _CLIP_BOS,
                    "eos_token": _CLIP_EOS,
                    "unk_token": _CLIP_EOS,
                    "pad_token": _CLIP_EOS,
                },
                f,
            )
        return CLIPTokenizer.from_pretrained(folder)


_T5_WORDS = (
    "a an the of on in with and at to is by for from photo painting picture portrait "
    "cat dog bird squirrel horse car house tree city street forest mountain river sky "
    "sea beach flower garden man woman child red green blue yellow black white "
    "small big old new eating sitting standing burger night day sunset style art "
    "high quality detailed"
).split()
_T5_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,;:!?'\"-_()[]{}/\\&%$#@*+=<>|~`^"
)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (SentencePiece-style Unigram) built with ``tokenizers`` offline.

    T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then pieces: ``"▁"``, a few
    common prompt words (``"▁cat"``), every listed character alone and word-initial
    (``"c"``, ``"▁c"``). Scores favour whole words, so a known word is one token and any
    other word falls back to characters. No sentinel (``<extra_id_*>``) tokens.
    The ``tokenizer.json`` is written to a temp folder and loaded with
    ``T5TokenizerFast.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _T5_WORDS]
    pieces += [("▁" + c, -6.0) for c in _T5_CHARS]
    pieces += [(c, -7.0) for c in _T5_CHARS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(" +", " "), normalizers.Strip()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    for special in ("<pad>", "</s>", "<unk>"):
        backend.add_special_tokens([special])  # already in the vocab: keeps ids 0..2
    with tempfile.TemporaryDirectory() as folder:
        backend.save(os.path.join(folder, "tokenizer.json"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "tokenizer_class": "T5Tokenizer",
                    "model_max_length": model_max_length,
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "pad_token": "<pad>",
                    "extra_ids": 0,
                    "additional_special_tokens": [],
                },
                f,
            )
        return T5TokenizerFast.from_pretrained(folder)


# --------------------------------------------------------------------------- SD3 pipeline


def tiny_sd3_pipeline(*, seed: int = 0, transformer: torch.nn.Module | None = None):
    """A whole ``StableDiffusion3Pipeline`` of tiny random-weight parts, on CPU, fp32.

    Text side, shaped like SD3's (two CLIPs + T5, concatenated the same way):
    CLIP-1 hidden 16 / projection 16, CLIP-2 hidden 32 / projection 32 (so the pooled
    projection is 48 wide), T5 width 64 (= the transformer's ``joint_attention_dim``;
    the two CLIPs' 48 hidden channels are zero-padded to it by the pipeline).
    The VAE has one block, so its scale factor is 1: ``height=32`` means a 32x32 latent,
    256 image tokens at patch size 2. The default transformer is
    ``tiny_sd3_transformer(sample_size=32)``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if transformer is None:
        transformer = tiny_sd3_transformer(sample_size=32, seed=seed)
    latent_channels = transformer.config.in_channels

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    tokenizer_3 = tiny_t5_tokenizer()

    def clip(hidden: int, projection: int, offset: int):
        config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            projection_dim=projection,
            num_hidden_layers=2,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        )
        with _seeded(seed + offset):
            return CLIPTextModelWithProjection(config).eval()

    text_encoder = clip(16, 16, 1)
    text_encoder_2 = clip(32, 32, 2)

    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=transformer.config.joint_attention_dim,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id,
    )
    with _seeded(seed + 3):
        text_encoder_3 = T5EncoderModel(t5_config).eval()

    with _seeded(seed + 4):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ).eval()

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
