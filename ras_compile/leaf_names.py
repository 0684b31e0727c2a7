"""The leaves of a call's arguments with a readable name each (``['mask']``, ``['cache'][0]``).

``pytree.tree_flatten_with_path`` names leaves through each node type's key function, which a
type registered with ``register_pytree_node`` but no ``flatten_with_keys_fn`` lacks: then it raises.
Error messages and host-read keys must not depend on that, so such a node's children are named by
their place under it (``['state'].<Box 0>``).
"""
from __future__ import annotations

import torch.utils._pytree as pytree

__all__ = ["named_leaves"]


def named_leaves(tree) -> list[tuple[str, object]]:
    """``(name, leaf)`` for every leaf of ``tree``, in pytree order."""
    try:
        flat, _ = pytree.tree_flatten_with_path(tree)
        return [(pytree.keystr(path), leaf) for path, leaf in flat]
    except ValueError:  # a node type without key paths
        leaves, spec = pytree.tree_flatten(tree)
        return list(zip(_names(spec, ""), leaves))


def _names(spec: pytree.TreeSpec, prefix: str):
    if spec.is_leaf():
        yield prefix or "<the argument>"
        return
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    if spec.type is not None and issubclass(spec.type, dict):
        labels = [f"[{key!r}]" for key in spec.context]
    elif spec.type in (list, tuple):
        labels = [f"[{i}]" for i in range(len(children))]
    elif isinstance(spec.type, type) and issubclass(spec.type, tuple) and hasattr(spec.type, "_fields"):
        labels = [f".{name}" for name in spec.type._fields]
    else:
        labels = [f".<{getattr(spec.type, '__name__', 'node')} {i}>" for i in range(len(children))]
    for label, child in zip(labels, children):
        yield from _names(child, prefix + label)


def keyless_argument(call: dict) -> str | None:
    """Why torch.export cannot take ``call``: an argument holding a pytree node type registered without
    key paths (export names every input by its path), by name and type; None if there is none."""
    for name, value in call.items():
        try:
            pytree.tree_flatten_with_path(value)
        except ValueError:
            _, spec = pytree.tree_flatten(value)
            keyless = _keyless_type(spec)
            return (f"argument [{name!r}] holds a {keyless} object, a pytree node type registered without key "
                    "paths, which torch.export needs to name its inputs; register it with "
                    "torch.utils._pytree.register_pytree_node(..., flatten_with_keys_fn=...)")
    return None


def _keyless_type(spec: pytree.TreeSpec) -> str:
    if spec.is_leaf():
        return "node"
    if spec.type not in (list, tuple, dict) and not pytree.SUPPORTED_NODES[spec.type].flatten_with_keys_fn:
        return getattr(spec.type, "__name__", str(spec.type))
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    found = [_keyless_type(c) for c in children if not c.is_leaf()]
    return next((t for t in found if t != "node"), "node")
