"""Keep a capture from leaving fake tensors in the model.

Non-strict ``torch.export`` runs the forward's Python on fake tensors. A forward that
memoises a tensor in Python keeps the fake one: an attribute filled on first call (a
RoPE helper's ``self.freqs_cis = ...``, Bria-FIBO-2) or a ``functools.lru_cache`` on a
method or a module-level function (NucleusMoE's RoPE). Every later eager call of the
model then computes with a fake tensor (``Tensor must have a last dimension of size 2``),
and every later capture finds a fake tensor among its constants. The exported graph
computes those tables itself, so the fix is to forget what the capture memoised:
``snapshot`` before export, ``forget_capture_memos`` after it (also after a failed one).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

__all__ = ["Snapshot", "snapshot", "forget_capture_memos"]

_DEPTH = 2  # plain objects held by a module, and the objects they hold


@dataclass
class Snapshot:
    attributes: list      # (object, its __dict__ copied shallowly)
    lru_caches: list      # (functools cache wrapper, its miss count)


def _holds_objects(value):
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, dict):
        return value.values()
    return (value,)


def _lru_caches_of(cls: type) -> list:
    """The ``functools.lru_cache`` wrappers on ``cls`` (and its bases) and in the Python modules
    that define them: where a forward's memoised helpers live."""
    found = []
    for klass in cls.__mro__:
        if klass.__module__.startswith(("torch", "builtins")):
            continue
        namespaces = [vars(klass), vars(sys.modules[klass.__module__]) if klass.__module__ in sys.modules else {}]
        for namespace in namespaces:
            for value in list(namespace.values()):
                value = getattr(value, "__func__", value)  # staticmethod / classmethod
                if isinstance(value, functools._lru_cache_wrapper):
                    found.append(value)
    return found


def snapshot(model: torch.nn.Module) -> Snapshot:
    attributes, caches, seen, classes = [], {}, set(), set()

    def visit(obj, depth):
        if id(obj) in seen or isinstance(obj, (torch.Tensor, type)) or not hasattr(obj, "__dict__"):
            return
        seen.add(id(obj))
        attributes.append((obj, dict(vars(obj))))
        if type(obj) not in classes:  # a model repeats its block classes: scan each class once
            classes.add(type(obj))
            for cache in _lru_caches_of(type(obj)):
                caches.setdefault(id(cache), cache)
        if depth:
            for value in list(vars(obj).values()):
                for item in _holds_objects(value):
                    if not isinstance(item, torch.nn.Module):  # modules are visited on their own
                        visit(item, depth - 1)

    for module in model.modules():
        visit(module, _DEPTH)
    return Snapshot(attributes, [(c, c.cache_info().misses) for c in caches.values()])


def _is_fake(value) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(leaf, FakeTensor) for leaf in pytree.tree_leaves(value))


def forget_capture_memos(before: Snapshot) -> list[str]:
    """Put back every attribute that now holds a fake tensor (or delete it, if the capture added it)
    and clear every lru cache that computed new entries during the capture. Returns what it reset,
    for tests and debugging."""
    reset = []
    for obj, saved in before.attributes:
        for name, value in list(vars(obj).items()):
            if _is_fake(value):
                if name in saved:
                    setattr(obj, name, saved[name])
                else:
                    delattr(obj, name)
                reset.append(f"{type(obj).__name__}.{name}")
    for cache, misses in before.lru_caches:
        if cache.cache_info().misses != misses:  # entries computed while tracing may be fake
            cache.cache_clear()
            reset.append(getattr(cache, "__qualname__", repr(cache)))
    return reset
