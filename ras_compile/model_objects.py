"""Whether a model still holds the parameter and buffer objects its captured graphs read.

A captured graph reads the parameter and buffer objects the model held at capture. Changes made in
place (``load_state_dict``, ``.to()``, fusing LoRA into the weights, ``param.data = ...``) are seen;
a replaced object is not: LoRA adapters wrapping a linear (``setattr(parent, name, LoraLinear(...))``),
a module swapped, ``module.weight = nn.Parameter(...)``. Every such replacement goes through
``nn.Module``'s registration of a parameter, buffer or submodule, which torch lets a hook watch
globally: ``version()`` counts those registrations anywhere in the process, so a module looks again
only after one happened, not on every call. ``replaced(model, program)`` then says whether a parameter
or buffer the captured graph reads is no longer the model's object at that name (or the
name is gone: a linear wrapped by PEFT's LoRA layer keeps its weight at ``...base_layer.weight``, even
though the layer still answers ``.weight`` with it). A tensor
the forward itself assigns on every call (OmniGen's ``self.inv_freq = ...``) is computed inside the
graph, which writes it into the buffer it captured (a ``copy_``) before reading it: no read of the
old value. A write straight into ``module._parameters`` bypasses the
hooks, and replacing a module without parameters (an activation) or a non-module attribute (an
attention processor) changes no tensor the graph reads: neither is seen.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _module

__all__ = ["replaced", "version"]

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


def _overwrites(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` writes a whole new value into ``node`` (``copy_`` / ``fill_`` into it): the
    forward assigning the buffer (``self.inv_freq = ...``, which export writes into it) does not read it."""
    return getattr(user.target, "overloadpacket", None) in (torch.ops.aten.copy_, torch.ops.aten.fill_) \
        and user.args[0] is node


def replaced(model: torch.nn.Module, program: torch.export.ExportedProgram) -> str | None:
    """The name of a parameter or buffer ``program``'s graph reads that ``model`` no longer holds as that
    object; None when every one is still the model's."""
    read = {n.name for n in program.graph_module.graph.nodes if n.op == "placeholder"
            and any(not _overwrites(user, n) for user in n.users)}
    for spec in program.graph_signature.input_specs:
        if spec.kind.name not in ("PARAMETER", "BUFFER") or spec.arg.name not in read:
            continue  # a tensor the graph does not read (one the forward assigns itself before reading it)
        held = program.state_dict.get(spec.target, program.constants.get(spec.target))
        owner_name, _, leaf = spec.target.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            return spec.target
        # registered there, not only reachable (PEFT's LoRA layer answers `.weight` with its base layer's)
        registered = owner._parameters if spec.kind.name == "PARAMETER" else owner._buffers
        now = registered[leaf] if leaf in registered else None  # a dict, or a scripted module's wrapper of one
        if now is not held:
            return spec.target
    return None
