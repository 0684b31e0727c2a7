"""An eager RAS reference that shares no code with the pass.

It runs the *unmodified* model on every token and intercepts
``torch.nn.functional.scaled_dot_product_attention``: in self-attention calls the
K/V rows of inactive image tokens are replaced by the rows cached from earlier
steps, and afterwards the prediction of inactive tokens is replaced by the cached
prediction. Active tokens only ever see other tokens through attention, so their
outputs are exactly what RAS computes; inactive tokens return their cache.

The caller says where image rows sit in an attention sequence (``image_rows``),
which it knows from the architecture (SD3 puts image tokens before text tokens).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F


class EagerRASReference:
    def __init__(self, model: torch.nn.Module, num_tokens: int, patch_size: int,
                 image_rows: Callable[[int], slice | None]):
        self.model = model
        self.num_tokens = num_tokens
        self.patch = patch_size
        self.image_rows = image_rows
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.prediction: torch.Tensor | None = None

    @contextlib.contextmanager
    def _intercept(self, active: torch.Tensor | None):
        original = F.scaled_dot_product_attention
        calls = [0]

        def sdpa(q, k, v, *args, **kwargs):
            rows = self.image_rows(k.shape[-2])
            if rows is None:  # cross-attention to text: untouched
                return original(q, k, v, *args, **kwargs)
            j = calls[0]
            calls[0] += 1
            if active is not None:
                k, v = k.clone(), v.clone()
                cached_k, cached_v = self.kv[j]
                inactive = ~_token_mask(active, self.num_tokens)  # [B, N]
                for b in range(k.shape[0]):
                    ids = inactive[b].nonzero().flatten() + rows.start
                    k[b, :, ids] = cached_k[b, :, ids]
                    v[b, :, ids] = cached_v[b, :, ids]
                self.kv[j] = (k, v)
            else:
                if j < len(self.kv):
                    self.kv[j] = (k.clone(), v.clone())
                else:
                    self.kv.append((k.clone(), v.clone()))
            return original(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original

    @torch.no_grad()
    def step(self, kwargs: dict, active: torch.Tensor | None) -> torch.Tensor:
        """One call: dense when ``active`` is None, else RAS with active token ids ``[B, k]``."""
        with self._intercept(active):
            out = self.model(**kwargs)
        prediction = out[0] if isinstance(out, tuple) else out.sample
        if active is not None:
            mask = _token_mask(active, self.num_tokens)
            batch, _, height, width = prediction.shape
            grid = mask.reshape(batch, 1, height // self.patch, width // self.patch)
            pixel = grid.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
            prediction = torch.where(pixel, prediction, self.prediction)
        self.prediction = prediction
        return prediction


def _token_mask(active: torch.Tensor, num_tokens: int) -> torch.Tensor:
    mask = torch.zeros(active.shape[0], num_tokens, dtype=torch.bool, device=active.device)
    mask.scatter_(1, active, True)
    return mask
