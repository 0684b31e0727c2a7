"""A latent passed as a list of per-sample tensors, as one batched latent.

Some DiTs take the noisy latent as a Python list with one ``[C, F, H, W]`` tensor per sample
(Z-Image, WanAnimate 2): the forward patchifies each, and returns a list too. RAS gathers
token rows out of one batched latent, so a list whose tensors all have one shape is passed
on as their ``stack`` to a wrapper (``PerSampleLatent``) that unbinds it into the list the
model expects; the model's outputs that are lists of per-sample tensors of one shape are
stacked the same way, and ``unstack_outputs`` gives the caller the lists back. Samples of
different shapes (two resolutions in one call) have no batched form and are refused.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

__all__ = ["SampleList", "PerSampleLatent", "batch_sample_list", "mixed_samples", "unstack_outputs"]


@dataclass(frozen=True)
class SampleList:
    """The latent argument was a ``kind`` (list or tuple) of ``count`` tensors of one shape."""
    kind: type
    count: int


def _tensor_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(x, torch.Tensor) for x in value)


def _forms(tensors) -> set:
    """The distinct (shape, dtype, device) of ``tensors``: one for a list that stacks into a batch."""
    return {(tuple(x.shape), x.dtype, x.device) for x in tensors}


def batch_sample_list(call: dict, latent_arg: str) -> tuple[dict, SampleList | None]:
    """``call`` with a per-sample latent list of one shape stacked into one tensor, and how it was a
    list; ``call`` itself and None when the latent is no such list (``mixed_samples`` says why a list
    of tensors is not)."""
    latent = call.get(latent_arg)
    if not _tensor_list(latent) or len(_forms(latent)) > 1:
        return call, None
    return {**call, latent_arg: torch.stack(list(latent))}, SampleList(type(latent), len(latent))


def mixed_samples(call: dict, latent_arg: str) -> str | None:
    """Why a per-sample latent list has no batched form (its tensors differ in shape, dtype or device),
    or None."""
    latent = call.get(latent_arg)
    if not _tensor_list(latent):
        return None
    forms = _forms(latent)
    if len(forms) == 1:
        return None
    shown = ", ".join(f"{list(s)} {str(d).replace('torch.', '')} on {v}" for s, d, v in sorted(forms, key=str)[:3])
    return (f"the latent argument '{latent_arg}' is a {type(latent).__name__} of {len(latent)} tensors of different "
            f"shapes, dtypes or devices ({shown}): RAS runs one batched latent, whose samples share one token grid; "
            "call the model once per resolution (one group of same-shape samples per call)")


def _is_sample_list(value, samples: SampleList) -> bool:
    """A list (or, for a tuple latent, a tuple) of one tensor per sample, all of one shape."""
    return type(value) in (list, samples.kind) and len(value) == samples.count and _tensor_list(value) \
        and len(_forms(value)) == 1


def _children(value):
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, tuple)):
        return list(enumerate(value))
    return []


def _rebuilt(value, changes: dict):
    """``value`` (a dict, list or tuple) with the children in ``changes`` replaced."""
    if isinstance(value, dict):
        new = copy.copy(value)  # a ModelOutput keeps its class (its __setitem__ sets the attribute too)
        for key, child in changes.items():
            new[key] = child
        return new
    items = list(value)
    for key, child in changes.items():
        items[key] = child
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)


def _stack_lists(value, samples: SampleList, path: tuple, found: list):
    if _is_sample_list(value, samples):
        found.append((path, type(value)))
        return torch.stack(list(value))
    changes = {}
    for key, child in _children(value):
        new = _stack_lists(child, samples, path + (key,), found)
        if new is not child:
            changes[key] = new
    return _rebuilt(value, changes) if changes else value


def unstack_outputs(value, stacked: tuple):
    """The model's outputs as the caller expects them: the tensor at each ``(path, kind)`` of ``stacked``
    (a per-sample list or tuple, stacked in the graph) unbound into ``kind`` again."""
    for path, kind in stacked:
        if not path:
            return kind(value.unbind(0))
    changes = {}
    for key, child in _children(value):
        below = tuple((p[1:], kind) for p, kind in stacked if p[0] == key)
        if below:
            changes[key] = unstack_outputs(child, below)
    return _rebuilt(value, changes) if changes else value


class PerSampleLatent(torch.nn.Module):
    """``model`` with its per-sample latent list passed as one batched tensor (the list is its
    ``unbind(0)``) and its per-sample output lists returned stacked; each call passes the
    ``(path, list or tuple)`` of the outputs that were such lists to ``report`` (a function, not an
    attribute: torch.export puts back the module's own attributes, lists included, after tracing)."""

    def __init__(self, model: torch.nn.Module, latent_arg: str, samples: SampleList, report):
        super().__init__()
        self.model = model
        self.latent_arg = latent_arg
        self.samples = samples
        self.report = report

    def forward(self, **call):
        call[self.latent_arg] = self.samples.kind(call[self.latent_arg].unbind(0))
        found: list = []
        out = _stack_lists(self.model(**call), self.samples, (), found)
        self.report(tuple(found))
        return out
