"""Hooks attached to a model, and what capturing its forward once would do to them.

``ras_compile`` captures the forward as one graph per input signature. Anything a
hook does in Python runs once, while the graph is traced, and never again: the
graph holds what the hook computed then. For a hook that is a pure function of its
inputs (a scale, a cast) that is the same computation. For a hook that keeps state
between calls (diffusers' step caches: First Block Cache, TaylorSeer, FasterCache,
MagCache, Pyramid Attention Broadcast; they mark themselves ``_is_stateful``) it is
not: the captured graph would replay the decision the hook made at capture time, on
every later step, so the cache would silently do nothing, or worse, replay a stale
residual. Those models are refused; plain ``torch`` forward hooks are reported with a
warning, since torch cannot tell a pure hook from a stateful one.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn.modules import module as torch_module

from .errors import UnsupportedModelError

__all__ = ["stateful_diffusers_hooks", "torch_forward_hooks", "check_capturable_hooks"]


def _label(path: str) -> str:
    return path or "the model itself"


def stateful_diffusers_hooks(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """``(module path, hook name, hook class)`` of every stateful diffusers hook on ``model`` or its
    submodules (diffusers keeps them in a ``HookRegistry`` at ``module._diffusers_hook``)."""
    found = []
    for path, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None)
        if not isinstance(hooks, dict):
            continue
        for name, hook in hooks.items():
            if getattr(hook, "_is_stateful", False):
                found.append((path, str(name), type(hook).__name__))
    return found


def torch_forward_hooks(model: torch.nn.Module) -> list[str]:
    """Paths of the modules with ``torch`` forward or forward-pre hooks, plus ``"(global)"`` when a
    global module hook is registered (``torch.nn.modules.module.register_module_forward_hook``)."""
    found = [_label(path) for path, module in model.named_modules()
             if module._forward_hooks or module._forward_pre_hooks]
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        found.append("(global)")
    return found


def check_capturable_hooks(model: torch.nn.Module) -> None:
    """Refuse a model carrying stateful diffusers hooks; warn about torch forward hooks."""
    stateful = stateful_diffusers_hooks(model)
    if stateful:
        listed = ", ".join(f"{cls} '{name}' on {_label(path)}" for path, name, cls in stateful[:3])
        more = f" and {len(stateful) - 3} more" if len(stateful) > 3 else ""
        raise UnsupportedModelError(
            f"the model carries stateful diffusers hooks ({listed}{more}), e.g. a step cache such as First Block "
            "Cache or TaylorSeer; the forward is captured once as a graph, so the hook's per-call decisions would "
            "be frozen at capture time. Remove the cache before ras_compile (model.disable_cache() after "
            "model.enable_cache(...); for hooks added with diffusers.hooks.apply_*, load the model again without "
            "them), or keep the cache and run without RAS. To skip whole steps with RAS, use its own step "
            "cache, which stacks: RASPolicy(step_cache_interval=2)")
    hooked = torch_forward_hooks(model)
    if hooked:
        shown = ", ".join(hooked[:5]) + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
        warnings.warn(
            f"ras_compile: forward hooks on {shown} run once, while the graph is captured, and not on later calls: "
            "a hook that only transforms its inputs or outputs is captured with the graph, one that records or "
            "keeps state is not. Remove stateful hooks before ras_compile.", UserWarning, stacklevel=4)
