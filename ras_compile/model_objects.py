"""Whether a model still holds the parameter, buffer and submodule objects its graphs were captured with.

A captured graph reads the parameter and buffer objects the model held at capture. Changes made in
place (``load_state_dict``, ``.to()``, fusing LoRA into the weights, ``param.data = ...``) are seen;
a replaced object is not: LoRA adapters wrapping a linear (``setattr(parent, name, LoraLinear(...))``),
a module swapped, ``module.weight = nn.Parameter(...)``. Every such replacement goes through
``nn.Module``'s registration of a parameter, buffer or submodule, which torch lets a hook watch
globally: ``version()`` counts those registrations anywhere in the process, so a module compares the
model's objects (``objects(model)``, a walk over every submodule) only after one happened, not on
every call. A write straight into ``module._parameters`` bypasses the hooks and is not seen.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _module

__all__ = ["objects", "version"]

_registrations = 0


def _count(*_args):
    global _registrations
    _registrations += 1  # returns None: the registered object is kept as it is


for _register in (_module.register_module_parameter_registration_hook,
                  _module.register_module_buffer_registration_hook,
                  _module.register_module_module_registration_hook):
    _register(_count)


def version() -> int:
    """How many parameters, buffers and submodules have been registered in this process so far."""
    return _registrations


def objects(model: torch.nn.Module) -> tuple:
    """The identities of the model's submodules, parameters and buffers, in order."""
    return (tuple(map(id, model.modules())), tuple(map(id, model.parameters())), tuple(map(id, model.buffers())))
