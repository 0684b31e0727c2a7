"""The tiny random-weight models the demo and the tests build on."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ras_compile.tiny_models import (
    example_inputs,
    tiny_clip_tokenizer,
    tiny_dit_transformer,
    tiny_pixart_transformer,
    tiny_sd3_transformer,
    tiny_t5_tokenizer,
)

# (builder keyword arguments, latent height, latent width): diffusers' DiT unpatchifies
# assuming a square latent, the others take any multiple of the patch size.
FAMILIES = {
    "sd3": (tiny_sd3_transformer, {}, 16, 12),
    "sd3.5": (tiny_sd3_transformer, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, 16, 12),
    "dit": (tiny_dit_transformer, {}, 16, 16),
    "pixart": (tiny_pixart_transformer, {}, 16, 12),
    "pixart-1024": (tiny_pixart_transformer, {"use_additional_conditions": True, "num_attention_heads": 3}, 16, 12),
}


def public_config(model) -> dict:
    # as JSON stores it: tuples come back as lists
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_forward_with_example_inputs(family):
    builder, kwargs, height, width = family
    model = builder(**kwargs)
    assert not model.training
    inputs = example_inputs(model, batch=2, height=height, width=width)
    out = run(model, inputs)
    out_channels = model.config.out_channels or model.config.in_channels
    assert out.shape == (2, out_channels, height, width)
    assert torch.isfinite(out).all()
    # random weights, yet the output must depend on the input (no zero-initialised dead end)
    other = dict(inputs, hidden_states=torch.randn_like(inputs["hidden_states"]))
    assert not torch.allclose(run(model, other), out)


def test_same_seed_same_model_and_inputs(family):
    builder, kwargs, height, width = family
    a, b, c = builder(**kwargs, seed=1), builder(**kwargs, seed=1), builder(**kwargs, seed=2)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    ia, ib = example_inputs(a, height=height, width=width, seed=3), example_inputs(a, height=height, width=width, seed=3)
    assert torch.equal(run(a, ia), run(b, ib))
    ic = example_inputs(a, height=height, width=width, seed=4)
    assert not torch.equal(ia["hidden_states"], ic["hidden_states"])


def test_builders_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    tiny_sd3_transformer(seed=123)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_save_and_load_round_trip(family, tmp_path):
    builder, kwargs, height, width = family
    model = builder(**kwargs)
    inputs = example_inputs(model, height=height, width=width)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_bfloat16_model():
    model = tiny_sd3_transformer(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    inputs = example_inputs(model)
    assert inputs["hidden_states"].dtype == torch.bfloat16
    assert torch.isfinite(run(model, inputs).float()).all()


def test_example_inputs_read_the_config_not_the_class():
    """A model of no known class gets its inputs from its config keys and forward signature."""

    class Unknown(torch.nn.Module):
        config = {"in_channels": 3, "caption_channels": 5, "pooled_projection_dim": 7, "num_embeds_ada_norm": 11}

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, class_labels):
            return (hidden_states,)

    inputs = example_inputs(Unknown(), batch=3, height=4, width=6, text_len=2)
    assert set(inputs) == set(inspect.signature(Unknown.forward).parameters) - {"self"}
    assert inputs["hidden_states"].shape == (3, 3, 4, 6)
    assert inputs["timestep"].shape == (3,)
    assert inputs["encoder_hidden_states"].shape == (3, 2, 5)
    assert inputs["pooled_projections"].shape == (3, 7)
    assert inputs["class_labels"].dtype == torch.int64
    assert int(inputs["class_labels"].max()) < 11


def test_clip_tokenizer_offline():
    tok = tiny_clip_tokenizer()
    ids = tok("A painting of a Squirrel", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id
    end = ids.index(tok.eos_token_id)
    assert all(i == tok.pad_token_id for i in ids[end:])
    assert tok.decode(ids[1:end]).strip() == "a painting of a squirrel"  # CLIP lowercases
    assert max(ids) < len(tok)


def test_t5_tokenizer_offline():
    tok = tiny_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a cat eating a burger", padding="max_length", max_length=12).input_ids
    assert tok.convert_ids_to_tokens(ids[:6]) == ["▁a", "▁cat", "▁eating", "▁a", "▁burger", "</s>"]
    assert ids[6:] == [0] * 6
    spelled = tok("zq").input_ids  # an unknown word falls back to characters
    assert tok.convert_ids_to_tokens(spelled) == ["▁z", "q", "</s>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a cat eating a burger"
