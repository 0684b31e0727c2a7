"""The reference DiT: a small class-conditional ``diffusers.DiTTransformer2DModel``.

It works directly on 32x32 RGB pixels (no VAE: the 3-channel image in ``[-1, 1]`` is its
"latent"), with patch size 2, so every sample is 16 x 16 = 256 image tokens. It is
conditioned on a class of :mod:`ras_compile.reference.data` through the DiT's adaLN-Zero
embedding (``num_embeds_ada_norm`` = number of classes; diffusers adds one more
embedding row, index ``NUM_CLASSES``, which is the "null" class used for classifier-free
guidance) and on the flow-matching time ``1000 * sigma``.

Being a stock diffusers class, it loads with ``from_pretrained`` and goes through
``ras_compile`` like any other DiT. Its trained weights ship in :data:`WEIGHTS_DIR`
(reproduced by ``python -m ras_compile.reference.train``; docs/quality.md gives the
command and what they score).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiTTransformer2DModel

from .data import NUM_CLASSES

__all__ = ["WEIGHTS_DIR", "NULL_CLASS", "IMAGE_SIZE", "reference_config", "dit_initialise", "build_reference_model",
           "load_reference_model", "parameter_count"]

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
NULL_CLASS: int = NUM_CLASSES  # diffusers' LabelEmbedding keeps row ``num_classes`` for "no class"
IMAGE_SIZE: int = 32


def reference_config() -> dict[str, Any]:
    """Constructor kwargs of the reference ``DiTTransformer2DModel``.

    256 tokens per sample (32x32 pixels, patch 2), width 128 (2 heads of 64), 6 blocks:
    about 2.1 M parameters, ~8.5 MB as fp32 safetensors (each diffusers DiT block carries
    its own timestep/class embedder, a tenth of the total). The size is set by the
    training budget (a few hours on a 2-core CPU): at 256 tokens attention costs about as
    much as all the token-wise layers, and a training sample (forward + backward) takes
    ~0.1 s of one core. The exact GELU is used because the tanh approximation is twice as
    slow on CPU.
    """
    return dict(
        num_attention_heads=2,
        attention_head_dim=64,
        in_channels=3,
        out_channels=3,
        num_layers=6,
        dropout=0.0,
        attention_bias=True,
        sample_size=IMAGE_SIZE,
        patch_size=2,
        activation_fn="gelu",
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def dit_initialise(model: DiTTransformer2DModel, class_embedding_std: float = 0.02) -> DiTTransformer2DModel:
    """Re-initialise ``model`` in place the way the DiT paper does, and return it.

    Xavier-uniform linear weights with zero biases; N(0, 0.02) timestep-MLP and class
    embeddings (the class embeddings' std is ``class_embedding_std``); and zeros for every
    adaLN modulation and the final projection, so each block starts as the identity and
    the model starts by predicting 0 ("adaLN-Zero"). diffusers leaves PyTorch's default
    initialisation, which trains more slowly."""
    if not class_embedding_std > 0:
        raise ValueError(f"class_embedding_std must be > 0, got {class_embedding_std!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=class_embedding_std)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for linear in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    return model


def build_reference_model(seed: int = 0, init: str = "dit", class_embedding_std: float = 0.02, **overrides: Any
                          ) -> DiTTransformer2DModel:
    """A freshly initialised reference model (weights from ``seed``; the global RNG is restored).

    ``init="dit"`` applies :func:`dit_initialise` (with ``class_embedding_std``);
    ``init="diffusers"`` keeps the library's default initialisation (non-zero outputs,
    useful for tests of a random model). ``overrides`` replace entries of
    :func:`reference_config` (the tests use this for a tiny model)."""
    if init not in ("dit", "diffusers"):
        raise ValueError(f"init must be 'dit' or 'diffusers', got {init!r}")
    config = {**reference_config(), **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**config)
        return dit_initialise(model, class_embedding_std) if init == "dit" else model


def parameter_count(model: torch.nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _missing_weights_message(path: Path) -> str:
    """The error text for a weights folder that holds no model."""
    return (f"no reference DiT weights in {path} (expected config.json and diffusion_pytorch_model.safetensors). "
            f"Train them with `python -m ras_compile.reference.train --out {path}` "
            f"(see ras_compile/reference/train.py for the budget), or pass the folder of a trained model "
            f"as load_reference_model(path=...).")


def load_reference_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32
                         ) -> DiTTransformer2DModel:
    """Load a trained reference model with ``from_pretrained``, in eval mode.

    ``path`` defaults to the package's :data:`WEIGHTS_DIR`. Raises ``FileNotFoundError``
    saying how to train the weights if the folder has no model."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(_missing_weights_message(folder))
    # low_cpu_mem_usage=False: a 2 M-parameter model gains nothing from it, and without accelerate
    # diffusers would warn on every load.
    model = DiTTransformer2DModel.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    return model.eval()
