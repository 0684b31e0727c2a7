"""Where in the model's own code something happened, for messages.

A refusal or a densified value names an FX node (``gather_3``); the user needs the line
of their model that made it. Two sources: the traceback of a failed capture, and the
``stack_trace`` / ``nn_module_stack`` that ``torch.export`` records on every node. In
both, the model's frame is the innermost one outside torch and outside this package
(diffusers' and the user's own files are model code).
"""
from __future__ import annotations

import linecache
import os
import re
import traceback

import torch

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in [^\n]*(?:\n(?!\s*File ")(?P<code>[^\n]*))?')


def is_model_file(filename: str) -> bool:
    """Not torch's, not ours, not ``contextlib``'s wrappers, not code torch.fx generated (``filename`` as a frame names it: the
    package imported through a relative path, ``docs/../ras_compile``, is still ours)."""
    if filename.startswith("<eval_with_key>"):  # code torch.fx generated while tracing
        return False
    filename = os.path.abspath(filename)
    return not filename.startswith((_TORCH_DIR, _PACKAGE_DIR)) and os.sep + "contextlib.py" not in filename


def _where(filename: str, lineno: int, code: str | None) -> str:
    code = (code or linecache.getline(filename, lineno)).strip()
    where = f" at {os.path.basename(filename)}:{lineno}"
    return f"{where} `{code}`" if code else where  # (a source file edited since it was loaded reads blank)


def model_frame(exc: BaseException) -> str:
    """Where in the model's own code a failed capture stopped: `` at file.py:line `source` ``,
    or ``""`` when every frame is torch's."""
    frames, seen = [], set()
    # the first exception of the chain whose traceback reaches the model's code: torch may re-raise
    # the failure as another exception (its cause or context then holds the model's frame), and a
    # context further down may be an unrelated exception torch was handling
    while exc is not None and id(exc) not in seen and not frames:
        seen.add(id(exc))
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if is_model_file(f.filename)]
        exc = exc.__cause__ or exc.__context__
    if not frames:
        return ""
    frame = frames[-1]
    return _where(frame.filename, frame.lineno, frame.line)


def module_of(node: torch.fx.Node) -> str:
    """The submodule a node was traced in: `` in blocks.3.attn (Attention)``, or ``""`` at the root
    or where export recorded no module stack (nodes a pass created)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    if not path:
        return ""
    name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f" in {path} ({name})"


def node_frame(node: torch.fx.Node) -> str:
    """Where in the model's code a graph node comes from: `` in blocks.3.attn (Attention) at
    attention.py:120 `scores = q @ k.transpose(-2, -1)` ``; ``""`` when export recorded neither."""
    trace = node.meta.get("stack_trace") or ""
    frames = [m for m in _FRAME.finditer(trace) if is_model_file(m["file"])]
    line = _where(frames[-1]["file"], int(frames[-1]["line"]), frames[-1]["code"]) if frames else ""
    return module_of(node) + line
