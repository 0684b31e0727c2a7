"""The runtime controller: one per compiled module, the only state RAS keeps.

It counts denoising steps (a new generation starts when the timestep jumps back
against the direction the loop runs in, or on ``reset()``), decides whether a step
is dense, sparse or (with a step cache, ``RASPolicy.step_cache_interval``)
predicted, keeps the computed steps' outputs a predicted step extrapolates from,
and after each step scores the merged prediction and picks the next active set on
the prediction's device. Nothing here reads a tensor value on the host, so the
selection never waits for the device; only the timestep (a scalar the pipeline
hands in) is read to tell steps and generations apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RASCallError
from .policy import RASPolicy
from .selection import score_tokens, select_active, share_scores
from .stale_tokens import TokenHistory, merge, start
from .step_cache import extrapolate, kept_outputs


@dataclass(frozen=True)
class StepStats:
    """What one call of the compiled module did."""

    step: int
    mode: str            # "dense", "sparse", "predicted" (step cache: not run) or "fallback"
    active_tokens: int   # image tokens computed in this step (0 when predicted)
    num_tokens: int      # image tokens of the latent
    timestep: float | None
    reason: str          # why the step has its mode ("warm-up", "reset step", "scheduled", ...)


class RASController:
    def __init__(self, policy: RASPolicy):
        self.policy = policy
        self.stats: list[StepStats] = []
        self.generation = 0
        self._override: tuple[str, torch.Tensor | None] | None = None
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new generation: step 0 next, drop counts and the active set forgotten.

        Caches stay allocated but are refilled by the next dense step before any
        sparse step reads them.
        """
        self.step = -1
        self.generation += 1
        self.stats = []
        self._previous_timestep: float | None = None
        self._direction: float | None = None
        self._owner = None           # the capture whose caches and drop counts we hold
        self._caches_ready = False
        self._drops: torch.Tensor | None = None
        self.next_index: torch.Tensor | None = None
        self.last_index: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._history: list[tuple[int, list]] = []  # (step, flat outputs) of the last computed steps
        self._token_history: TokenHistory | None = None  # stale_token_order 1: each token's last two values

    def override_next_step(self, mode: str, active_index: torch.Tensor | None = None) -> None:
        """Force the next call's mode (and active set), e.g. to test a sparse step on any mask.

        ``active_index`` is ``[B, k]`` int64 token ids, or ``[k]`` for every sample; any order (they
        are sorted), each id at most once per sample.
        A sparse override still needs caches filled by an earlier dense step.
        """
        if mode not in ("dense", "sparse"):
            raise RASCallError(f"override_next_step(mode={mode!r}): mode must be 'dense' or 'sparse'")
        if mode == "sparse" and active_index is None:
            raise RASCallError("override_next_step(mode='sparse') needs active_index, a [B, k] or [k] tensor")
        self._override = (mode, active_index)

    @property
    def has_override(self) -> bool:
        """True when ``override_next_step`` set the next call's mode."""
        return self._override is not None

    # -- per step --------------------------------------------------------------------------
    def _advance(self, timestep: float | None) -> None:
        """Count a step; a timestep that moves against the loop's direction starts a new generation.

        Most pipelines count time down (1000 -> 0); Lumina's count it up (0 -> 1). The
        first two steps of a generation fix the direction.
        """
        previous = self._previous_timestep
        if timestep is not None and previous is not None:
            moved = timestep - previous
            if self._direction is not None and moved * self._direction < 0:
                self.reset()
            elif self._direction is None and moved != 0:
                self._direction = 1.0 if moved > 0 else -1.0
        self._previous_timestep = timestep
        self.step += 1

    def fallback_step(self, timestep: float | None) -> None:
        """A call served by the dense fallback model (token counts unknown: recorded as 0)."""
        self._advance(timestep)
        self.stats.append(StepStats(self.step, "fallback", 0, 0, timestep, "model unsupported"))

    def begin_step(self, timestep: float | None, owner, num_tokens: int, batch: int,
                   device: torch.device) -> tuple[str, torch.Tensor | None]:
        self._advance(timestep)
        if owner is not self._owner:
            self._owner = owner
            self._caches_ready = False
            self.next_index = None
            self._drops = torch.zeros(batch, num_tokens, device=device)
            self._history = []
            self._token_history = None
        mode, reason, index = self._plan(num_tokens, batch, device)
        self.last_index = index
        k = int(index.shape[1]) if index is not None else (0 if mode == "predicted" else num_tokens)
        self.stats.append(StepStats(self.step, mode, k, num_tokens, timestep, reason))
        return mode, index

    def _plan(self, num_tokens: int, batch: int, device) -> tuple[str, str, torch.Tensor | None]:
        override, self._override = self._override, None
        if override is not None:
            mode, index = override
            if mode == "dense":
                return "dense", "override", None
            index = self._check_index(index, num_tokens, batch, device)
            if not self._caches_ready:
                raise RASCallError("a sparse step was forced before any dense step filled the caches for "
                                   "these input shapes; run one dense step first")
            return "sparse", "override", index
        if self.policy.is_dense_step(self.step):
            return "dense", self._dense_reason(), None
        if self.policy.is_predicted_step(self.step) and self._history:
            return "predicted", "step cache", None
        if not self._caches_ready or self.next_index is None:
            return "dense", "caches empty", None
        return "sparse", "scheduled", self.next_index

    def _dense_reason(self) -> str:
        p = self.policy
        if self.step < p.warmup_steps:
            return "warm-up"
        if self.step in p.reset_steps:
            return "reset step"
        return "after end step"

    def _check_index(self, index: torch.Tensor, num_tokens: int, batch: int, device) -> torch.Tensor:
        index = torch.as_tensor(index, device=device)
        if index.dtype not in (torch.int64, torch.int32):
            raise RASCallError(f"active_index must be an integer tensor, got {index.dtype}")
        if index.dim() == 1:
            index = index.unsqueeze(0).expand(batch, -1)
        if index.dim() != 2 or index.shape[0] != batch or not 1 <= index.shape[1] <= num_tokens:
            raise RASCallError(f"active_index must be [B={batch}, k] with 1 <= k <= {num_tokens}, "
                               f"got shape {list(index.shape)}")
        index = index.to(torch.int64)
        if bool(((index < 0) | (index >= num_tokens)).any()):
            raise RASCallError(f"active_index values must lie in [0, {num_tokens})")
        index = torch.sort(index, dim=1).values.contiguous()
        if bool((index[:, 1:] == index[:, :-1]).any()):
            raise RASCallError("active_index repeats a token id within a sample; give each active token once "
                               "(order does not matter: ids are sorted)")
        return index

    def record_outputs(self, outputs) -> None:
        """After a computed step, with a step cache: keep a copy of its flat outputs (the last
        ``step_cache_order + 1`` steps are kept) for the predicted steps to extrapolate from."""
        if self.policy.step_cache_interval == 1:
            return
        self._history = [*self._history, (self.step, kept_outputs(outputs))][-(self.policy.step_cache_order + 1):]

    def merge_stale(self, prediction: torch.Tensor, index: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """After a computed step, with ``stale_token_order=1``: the prediction with the tokens it did not compute
        (not in ``index``; None: all computed) continued from their last two computed values
        (``stale_tokens.merge``), and the history updated. ``tokens``: the token of each element of one sample."""
        if self.policy.stale_token_order == 0:
            return prediction
        batch, num_tokens = self._drops.shape
        if self._token_history is None:  # the first computed step of this generation and signature: dense
            self._token_history = start(prediction, self.step, num_tokens)
            return prediction
        if index is None:
            active = torch.ones(batch, num_tokens, dtype=torch.bool, device=prediction.device)
        else:
            active = torch.zeros(batch, num_tokens, dtype=torch.bool, device=prediction.device)
            active.scatter_(1, index, True)
        merged, self._token_history = merge(prediction, active, self._token_history, tokens, self.step)
        return merged

    @property
    def kept_steps(self) -> tuple[int, ...]:
        """The computed steps whose outputs the step cache keeps (oldest first; empty without one)."""
        return tuple(step for step, _ in self._history)

    def predicted_outputs(self) -> list:
        """A predicted step's flat outputs: the kept computed steps' extrapolated to this step."""
        return extrapolate(self._history, self.step, self.policy.step_cache_order)

    def end_step(self, mode: str, patches: torch.Tensor) -> None:
        """After a step: remember the caches are full and choose the next active set.

        ``patches`` is the merged prediction as ``[B, N, S, C]`` (see ``selection.score_tokens``).
        The set is chosen at the end of the step right before a sparse step, from that step's
        prediction, computed or predicted; so drop counts grow once per sparse step.
        """
        if mode == "dense":
            self._caches_ready = True
        nxt = self.step + 1
        p = self.policy
        if p.is_dense_step(nxt) or p.is_predicted_step(nxt) or (p.num_steps is not None and nxt >= p.num_steps):
            self.next_index = None
            return
        num_tokens = patches.shape[1]
        k = p.active_tokens(nxt, num_tokens)
        scores = score_tokens(patches, p.metric, self._random(patches.device))
        scores = share_scores(scores, p.share_active_set)
        self.next_index, self._drops = select_active(
            scores, self._drops, k, rule=p.starvation_rule, starvation_scale=p.starvation_scale,
            high_ratio=p.high_ratio)

    @property
    def drops(self) -> torch.Tensor | None:
        """How many sparse steps each token has been left out of, ``[B, N]``."""
        return self._drops

    def _random(self, device) -> torch.Generator | None:
        if self.policy.metric != "random":
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.policy.seed)
        return self._generator
