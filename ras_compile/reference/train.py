"""Train the reference DiT with rectified flow on the synthetic generator.

    python -m ras_compile.reference.train --out DIR --minutes M [--steps N] [--seed S]

Objective (diffusers' flow-matching convention, the one ``FlowMatchEulerDiscreteScheduler``
integrates): draw ``sigma`` in (0, 1) (logit-normal by default), ``x_sigma = (1 - sigma) x0
+ sigma noise``, and regress the model's output at ``timestep = 1000 sigma`` onto the
velocity ``noise - x0`` with a mean squared error. The scheduler's Euler step
``x + (sigma_next - sigma) v`` then moves a sample from noise (sigma = 1) to data
(sigma = 0).

Classes are dropped to the null class (index ``NUM_CLASSES``) with probability
``label_dropout`` so the model also learns the unconditional velocity for classifier-free
guidance. The dropout is drawn here from the run's generator; diffusers' own label
dropout (which draws from the global RNG, independently in every block) is switched off.

Every random draw of step ``k`` comes from generators seeded by ``(seed, k)``: the data
(:func:`~ras_compile.reference.data.training_seed`) and the noise / sigma / dropout.
So a run is a function of its arguments and thread count, and ``--resume`` continues a
run exactly where its last checkpoint stopped. Stopping is by ``--steps`` (reproducible)
or ``--minutes`` (a wall-clock cap), whichever comes first.

Budget (pilot on this project's 2-core AMD EPYC, AVX2, one thread, while another job ran):
one training sample (forward + backward, 256 tokens) costs ~0.09 s, i.e. ~11-12
samples/s, ~22 steps/min at batch 32. The loss (per-step mean over ``sigma``) fell from
1.25 to ~0.55 after 50 steps, ~0.30 after 100 and ~0.27 after 150. Three hours on one
thread is ~4000 steps of 32; with two threads expect roughly 1.5-1.8x that.

History, on the generator's first data (objects at any rotation, centred anywhere):

* The first GPU run (``--device cuda --workers 14``, the recipe of that time): on the lent
  NVIDIA H100 with 16 cores, batch 128 ran at ~31 steps/s (~3,900 samples/s; the CPU-side
  generator in the 14 loader processes is the limit, not the GPU). A 3.5-minute run
  (6,400 steps, 820 k samples) reached a loss of 0.11, but its dense 28-step samples were
  classified right only 18 % of the time (chance is 12.5 %): backgrounds and colours,
  blobs instead of shapes. Its label gap (:func:`~ras_compile.reference.check.label_gap`:
  how much the loss rises with a wrong class) was +0.0012 / +0.0021 / +0.0036 / +0.0005
  at sigma 0.3 / 0.6 / 0.8 / 0.95, 1-2 % of the loss: the model had barely started to
  use its class label, and with guidance scale 3 its accuracy rose only to 27 %.
  ``--gap-every`` logs the gap during training, so a run shows whether conditioning is
  emerging without sampling.
* ``--class-embedding-std`` sets the class embeddings' initial std. A CPU pilot (one
  thread per run, seed 0, batch 32, both runs side by side) compared the DiT paper's 0.02
  with 1.0: at step 1200 the loss was the same (0.153), the gap at sigma 0.3 / 0.6 / 0.8
  was +0.0004 / +0.0003 / +0.0003 with 0.02 and +0.0008 / +0.0008 / +0.0012 with 1.0
  (2-4x larger, as at steps 300, 600 and 900); both gaps at sigma 0.95 were within the
  measurement's noise. 1.0 is the default since.
* A CPU pilot with 1.0 (two threads, 1,245 steps, 40 k samples) drew colour blobs on
  backgrounds: 12.5 % class accuracy at guidance 1 and at 4 (64 samples, 20 steps).

On the current data (upright objects near the centre; :mod:`~ras_compile.reference.data`
says why) the same model and recipe learns its classes far sooner. Two threads, 15-20
samples/s: after 1,103 steps (35 k samples, 30 min) 14 % class accuracy at guidance 1
and 33 % at guidance 4 (64 samples, 28 steps, the shipped classifier), with circles,
triangles, crescents and hearts recognisable; after 1,728 steps 47 % at guidance 4 (32
samples); after 3,466 steps (111 k samples, 115 min; the default settings, ``--threads 2``)
20 % at guidance 1 and 64 % at guidance 4 (64 samples: rings, triangles and crescents
mostly right, stars and crosses mostly not). That run went on to step 3,983 and then
decayed the learning rate linearly to 0 over 1,000 steps (``--cooldown-from 3983
--cooldown-steps 1000``): after 4,983 steps (159 k samples, about 3 hours) 28 % at guidance
1, 75 % at guidance 4 and 77 % at 6, short of the issue's 90 % bar. A second run started from
those weights (``--init-from`` that run's ``--out``, ``--seed 1`` for fresh data, 8,000 steps
with a cooldown from 6,000 over 2,000 steps: 256 k samples, 105 min at 41 samples/s) reached
50 % at guidance 1, 91 % at 4 and 94 % at 6 (64 samples): those are the shipped weights
(docs/quality.md gives the commands and larger checks). ``--resume`` continues a run from
``training_state.pt`` (about 34 MB at the default size), so the budget can be split over several sessions or device calls.

The GPU recipe after the first GPU run (``benchmarks/gpu_checks/train_reference.sh``, not run yet:
no session since has had a GPU) changes what limited it and what the issue asks of a GPU
run: the batches are rendered on the GPU (``--workers 0``, the default: the random draws
stay on the CPU, so the data is the same up to float rounding), which removes the loader
bound; 1024 tokens per sample (``--patch-size 1`` on the same 32x32 images, so the shipped
classifier still judges them); a wider, deeper model (``--heads 3 --layers 8``: 6.1 M
parameters, 11.7 MiB as float16 safetensors, inside the 25 MB budget); bf16 autocast and
``--compile``. ``--resume`` refuses a state trained with other model options. On this
CPU the recipe's model runs (3 steps of 8 with ``--compile``: 1.4 min, mostly the
compile), but a label gap of it takes minutes per measurement: leave ``--gap-every`` off
on a CPU at that size.

Outputs in ``DIR``: the EMA model (``config.json`` + ``diffusion_pytorch_model.safetensors``,
loadable with :func:`~ras_compile.reference.model.load_reference_model`),
``training_log.json`` (settings and loss curve), ``training_state.pt`` (for ``--resume``;
not to be shipped) and, with ``--preview``, ``preview.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from diffusers.models.embeddings import LabelEmbedding

from .data import NUM_CLASSES, make_batch, training_seed
from .model import NULL_CLASS, build_reference_model, parameter_count

__all__ = ["TrainSettings", "sample_sigmas", "noisy_pair", "drop_labels", "flow_matching_loss",
           "disable_builtin_label_dropout", "load_initial_weights", "learning_rate", "ema_update", "make_optimizer",
           "step_generator", "train_step", "train", "main"]

_NOISE_STREAM = 2 ** 62  # offset between a step's data seed and its noise seed


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of a training run (all recorded in ``training_log.json``)."""

    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    time_sampling: str = "logit_normal"  # or "uniform"
    image_size: int = 32  # pixels per side; patch 2 -> (image_size / 2) ** 2 tokens
    class_embedding_std: float = 1.0  # initial std of the class embeddings (the DiT paper's is 0.02; see above)
    cooldown_from: int | None = None  # step at which the learning rate starts its linear decay (None: constant)
    cooldown_steps: int = 0  # the decay's length: the rate reaches 0 at cooldown_from + cooldown_steps

    def __post_init__(self) -> None:
        if self.cooldown_steps < 0 or (self.cooldown_from is not None and self.cooldown_from < 0):
            raise ValueError(f"cooldown_from and cooldown_steps must be >= 0, got {self.cooldown_from!r} and "
                             f"{self.cooldown_steps!r}")
        if (self.cooldown_from is None) != (self.cooldown_steps == 0):
            raise ValueError("give both cooldown_from and cooldown_steps (> 0), or neither; got "
                             f"cooldown_from={self.cooldown_from!r}, cooldown_steps={self.cooldown_steps!r}")

    @property
    def last_step(self) -> int | None:
        """The step count at which the cooldown has brought the rate to 0 (None without one)."""
        return None if self.cooldown_from is None else self.cooldown_from + self.cooldown_steps


def sample_sigmas(n: int, gen: torch.Generator, kind: str = "logit_normal") -> torch.Tensor:
    """``n`` noise levels in (0, 1): ``sigmoid(N(0, 1))`` ("logit_normal") or ``U(0, 1)`` ("uniform")."""
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn((n,), generator=gen))
    if kind == "uniform":
        return torch.rand((n,), generator=gen)
    raise ValueError(f"time_sampling must be 'logit_normal' or 'uniform', got {kind!r}")


def noisy_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow input ``(1 - sigma) x0 + sigma noise`` and its velocity target ``noise - x0``."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def drop_labels(labels: torch.Tensor, p: float, gen: torch.Generator, null_class: int = NULL_CLASS
                ) -> torch.Tensor:
    """``labels`` with each entry replaced by ``null_class`` with probability ``p``."""
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def disable_builtin_label_dropout(model: torch.nn.Module) -> int:
    """Switch off diffusers' in-model label dropout (global RNG, per block); returns how many
    embedders were changed. The null-class embedding row stays, so guidance still works."""
    changed = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
            changed += 1
    return changed


def flow_matching_loss(model: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
                       settings: TrainSettings = TrainSettings(), autocast: torch.dtype | None = None
                       ) -> torch.Tensor:
    """The rectified-flow MSE of ``model`` on clean images ``x0`` with classes ``labels``.

    The noise, noise levels and label dropout are drawn on the CPU from ``gen`` (CPU
    generator) and moved to ``x0``'s device, so a run draws the same numbers on any
    device. ``autocast`` (e.g. ``torch.bfloat16``) runs the forward under autocast."""
    device = x0.device
    noise = torch.randn(x0.shape, generator=gen).to(device)
    sigma = sample_sigmas(x0.shape[0], gen, settings.time_sampling).to(device)
    labels = drop_labels(labels.cpu(), settings.label_dropout, gen).to(device)
    x_t, target = noisy_pair(x0, noise, sigma)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        pred = model(hidden_states=x_t, timestep=sigma * 1000.0, class_labels=labels, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then constant; with a cooldown, a linear decay
    from ``cooldown_from`` that reaches 0 at ``cooldown_from + cooldown_steps``
    (warm-up / stable / decay)."""
    rate = settings.lr * min(1.0, (step + 1) / max(1, settings.warmup_steps))
    if settings.cooldown_from is not None and step >= settings.cooldown_from:
        rate *= max(0.0, 1.0 - (step - settings.cooldown_from) / settings.cooldown_steps)
    return rate


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """``ema <- d ema + (1 - d) model`` with ``d = min(decay, (1 + step) / (10 + step))`` (fast early on)."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over all parameters."""
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                             weight_decay=settings.weight_decay)


def step_generator(run_seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s noise, noise levels and label dropout."""
    return torch.Generator().manual_seed(training_seed(run_seed, step) + _NOISE_STREAM)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor, labels: torch.Tensor,
               gen: torch.Generator, lr: float, settings: TrainSettings, autocast: torch.dtype | None = None
               ) -> torch.Tensor:
    """One AdamW step on one batch (with gradient clipping); returns the loss as a 0-d tensor
    on the model's device (reading it is the caller's choice: on a GPU it is a sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = flow_matching_loss(model, x0, labels, gen, settings, autocast)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return loss.detach()


class _StepBatches(torch.utils.data.Dataset):
    """Item ``step`` is training step ``step``'s batch: a pure function of (seed, step), so
    batches made by loader workers are the ones the main process would make."""

    def __init__(self, seed: int, batch_size: int, image_size: int, device: str | torch.device | None = None):
        self.seed, self.batch_size, self.image_size, self.device = seed, batch_size, image_size, device

    def __len__(self) -> int:
        return 10 ** 9

    def __getitem__(self, step: int):
        return make_batch(training_seed(self.seed, step), self.batch_size, self.image_size, self.device)


def batch_stream(seed: int, start_step: int, batch_size: int, image_size: int = 32, workers: int = 0,
                 device: str | torch.device | None = None):
    """Yield ``(images, labels)`` of steps ``start_step, start_step + 1, ...`` in order.

    With ``workers == 0`` the batches are rendered on ``device`` in this process (on a GPU
    that is far faster than any number of CPU workers; the random draws stay on the CPU).
    ``workers > 0`` makes them on the CPU in that many loader processes (``device`` must
    then be the CPU or None). The stream is the same either way, up to float rounding
    on a GPU."""
    if workers > 0 and device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"loader workers render batches on the CPU; use workers=0 to render on {device}")
    data = _StepBatches(seed, batch_size, image_size, device)
    if workers <= 0:
        step = start_step
        while True:
            yield data[step]
            step += 1
    sampler = range(start_step, len(data))
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers,
                                         prefetch_factor=4, persistent_workers=False,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    yield from loader


def _save_model(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` ``model`` (a copy cast to ``dtype`` if it differs) as safetensors."""
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(out, safe_serialization=True)


def _save_state(path: Path, model, ema, optimizer, step: int, curve: list, gaps: list, wall_s: float,
                init_from: dict | None) -> None:
    """Write the resumable training state (atomically), with the model's config so a resume
    with other model options is refused clearly, and the run's wall time so far."""
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "curve": curve, "label_gaps": gaps, "model_config": _config_dict(model),
                "wall_s": wall_s, "init_from": init_from}, tmp)
    tmp.replace(path)


def _config_dict(model: torch.nn.Module) -> dict:
    """The model's diffusers config as plain ``{key: value}`` (private ``_`` keys dropped)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}


def _config_differences(saved: dict, model: torch.nn.Module) -> str:
    """``"key: saved A, now B, ..."`` for each config entry where ``saved`` and ``model`` differ ("" if none)."""
    now = _config_dict(model)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)


def _check_resumed_config(saved: dict | None, model: torch.nn.Module, state_path: Path) -> None:
    """Refuse to resume a run whose saved model config differs from the one built now."""
    if saved is None:  # a state written before configs were saved
        return
    detail = _config_differences(saved, model)
    if detail:
        raise ValueError(f"{state_path} was trained with another model ({detail}); resume with the run's model "
                         f"options or train into a new --out folder")


def load_initial_weights(model: torch.nn.Module, folder: str | Path) -> dict:
    """Copy the weights of the saved model in ``folder`` (``from_pretrained`` layout, e.g. an
    earlier run's ``--out`` or the shipped weights) into ``model``; returns the provenance
    recorded in the new run's log: the folder, the weights' SHA-256 and that run's own
    ``training_log.json`` if the folder has one.

    Refuses a folder without weights, or whose model config differs from ``model``'s
    (train with the saved model's options: ``--heads``, ``--layers``, ``--patch-size``,
    ``--image-size``)."""
    from .model import load_reference_model

    folder = Path(folder)
    saved = load_reference_model(folder)  # FileNotFoundError with what to do if there are no weights
    detail = _config_differences(_config_dict(saved), model)
    if detail:
        raise ValueError(f"--init-from {folder} holds another model ({detail}); train with that model's options")
    model.load_state_dict(saved.state_dict())
    weights = sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()
    log_path = folder / "training_log.json"
    return {"folder": str(folder), "weights_sha256": digest,
            "log": json.loads(log_path.read_text()) if log_path.is_file() else None}


def _record_gap(ema: torch.nn.Module, step: int) -> dict:
    """The EMA model's label gap at ``step``, printed and returned as a log entry."""
    from .check import label_gap

    gap = label_gap(ema)
    print(f"step {step:6d}  label gap " + "  ".join(f"sigma {s}: {g['gap']:+.4f}" for s, g in gap.items()),
          flush=True)
    return {"step": step, "label_gap": gap}


def _save_preview(ema: torch.nn.Module, out: Path, steps: int = 20) -> Path:
    """Sample two images per class with the EMA model and write ``preview.png``."""
    from .images import save_image_grid
    from .sampling import sample

    labels = torch.arange(NUM_CLASSES).repeat(2)
    images = sample(ema.eval(), labels, steps=steps, seed=0, guidance_scale=1.0).cpu()
    return save_image_grid(images, out / "preview.png", nrow=NUM_CLASSES, scale=3)


def train(out: str | Path, minutes: float | None = None, steps: int | None = None, seed: int = 0,
          settings: TrainSettings = TrainSettings(), log_every: int = 25, checkpoint_minutes: float = 10.0,
          save_dtype: torch.dtype = torch.float32, resume: bool = False, preview: bool = False,
          model_overrides: dict | None = None, device: str | torch.device = "cpu", workers: int = 0,
          autocast: torch.dtype | None = None, gap_every: int = 0, compile_backend: str | None = None,
          init_from: str | Path | None = None) -> dict:
    """Train a reference DiT into ``out`` until ``steps`` steps or ``minutes`` minutes; returns the log.

    ``device`` is where the model trains (all random draws come from CPU generators
    either way); without ``workers`` the batches are rendered on ``device``, with them in
    that many CPU loader processes; ``autocast``
    (bf16 on a GPU) runs forward passes in that dtype with fp32 master weights.
    ``gap_every > 0`` measures the EMA model's :func:`~ras_compile.reference.check.label_gap`
    every that many steps (and at the end) and records it in the log's ``label_gaps``: it
    shows whether the model has started to use its class label. ``model_overrides`` replace
    entries of :func:`~ras_compile.reference.model.reference_config` (width, depth, patch
    size); ``compile_backend`` (e.g. ``"inductor"``) runs the training forward and backward
    through ``torch.compile`` with that backend (the EMA and the saved weights are the plain
    module's). ``init_from`` starts the model (and its EMA) from the weights saved in that
    folder instead of a fresh initialisation, with a fresh optimiser and step count (the
    warm-up re-warms the rate): a continuation of an earlier run whose resumable state is
    gone, or a fine-tune of the shipped weights. A ``resume`` that finds a state ignores it.
    The log records the starting weights' hash and their own training log."""
    if minutes is None and steps is None and settings.last_step is None:
        raise ValueError("give --minutes or --steps (or both), or a cooldown")
    if settings.last_step is not None:  # nothing is learnt once the cooldown has reached a zero rate
        steps = settings.last_step if steps is None else min(steps, settings.last_step)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "training_state.pt"
    device = torch.device(device)
    overrides = {"sample_size": settings.image_size, **(model_overrides or {})}
    model = build_reference_model(seed, class_embedding_std=settings.class_embedding_std, **overrides)
    model = model.to(device).train()
    disable_builtin_label_dropout(model)
    initial = None
    resuming = resume and state_path.exists()
    if init_from is not None and not resuming:
        initial = load_initial_weights(model, init_from)
        print(f"initial weights from {init_from} (sha256 {initial['weights_sha256'][:12]})", flush=True)
    ema = copy.deepcopy(model).eval()
    optimizer = make_optimizer(model, settings)
    start_step, curve, gaps, prior_wall = 0, [], [], 0.0
    if resuming:
        state = torch.load(state_path, weights_only=True, map_location=device)
        _check_resumed_config(state.get("model_config"), model, state_path)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, curve, gaps = state["step"], state["curve"], state.get("label_gaps", [])
        prior_wall, initial = state.get("wall_s", 0.0), state.get("init_from")
        print(f"resumed at step {start_step}", flush=True)
    print(f"reference DiT: {parameter_count(model) / 1e6:.2f} M parameters, batch {settings.batch_size}, "
          f"{(model.config.sample_size // model.config.patch_size) ** 2} tokens, device {device}, {torch.get_num_threads()} threads, "
          f"{workers} loader workers" + (f", compiled ({compile_backend})" if compile_backend else ""), flush=True)
    # The compiled module shares the parameters; state dicts and the EMA use the plain one.
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    t0 = last_ckpt = time.perf_counter()
    window: list[torch.Tensor] = []
    step = start_step
    # The data's size is the model's (model_overrides may change sample_size). Without loader
    # workers the batches are rendered where the model trains.
    batches = batch_stream(seed, start_step, settings.batch_size, model.config.sample_size, workers,
                           device=None if workers > 0 else device)
    while (steps is None or step < steps) and (minutes is None or time.perf_counter() - t0 < minutes * 60):
        x0, labels = next(batches)
        x0, labels = x0.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        window.append(train_step(forward, optimizer, x0, labels, step_generator(seed, step),
                                 learning_rate(step, settings), settings, autocast))
        ema_update(ema, model, settings.ema_decay, step)
        step += 1
        if step % log_every == 0:
            elapsed = time.perf_counter() - t0
            mean = float(torch.stack(window).mean())
            curve.append({"step": step, "loss": mean, "elapsed_s": round(prior_wall + elapsed, 1)})
            rate = (step - start_step) * settings.batch_size / elapsed
            print(f"step {step:6d}  loss {mean:.4f}  {rate:6.1f} samples/s  {elapsed / 60:6.1f} min", flush=True)
            window = []
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss is {mean} at step {step}")
        if gap_every > 0 and step % gap_every == 0:
            gaps.append(_record_gap(ema, step))
        if time.perf_counter() - last_ckpt > checkpoint_minutes * 60:
            _save_state(state_path, model, ema, optimizer, step, curve, gaps,
                        prior_wall + time.perf_counter() - t0, initial)
            last_ckpt = time.perf_counter()

    if gap_every > 0 and (not gaps or gaps[-1]["step"] != step):
        gaps.append(_record_gap(ema, step))
    wall_s = prior_wall + time.perf_counter() - t0
    _save_state(state_path, model, ema, optimizer, step, curve, gaps, wall_s, initial)
    _save_model(ema.cpu(), out, save_dtype)
    log = {"seed": seed, "steps": step, "minutes": minutes, "threads": torch.get_num_threads(),
           "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
           "workers": workers, "autocast": str(autocast) if autocast else None, "compile_backend": compile_backend,
           "model_overrides": model_overrides or {},
           "wall_s": round(wall_s, 1), "init_from": initial, "settings": dataclasses.asdict(settings),
           "parameters": parameter_count(model), "save_dtype": str(save_dtype), "torch": torch.__version__,
           "curve": curve, "label_gaps": gaps}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    if preview:
        _save_preview(ema, out)
    return log


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (defaults from :class:`TrainSettings`)."""
    d = TrainSettings()
    p = argparse.ArgumentParser(prog="python -m ras_compile.reference.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (from_pretrained layout)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget")
    p.add_argument("--steps", type=int, default=None, help="number of optimiser steps (reproducible stop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout)
    p.add_argument("--time-sampling", choices=["logit_normal", "uniform"], default=d.time_sampling)
    p.add_argument("--class-embedding-std", type=float, default=d.class_embedding_std,
                   help="initial std of the class embeddings (larger: the label starts as loud as the time)")
    p.add_argument("--cooldown-from", type=int, default=None, metavar="STEP",
                   help="decay the learning rate linearly to 0 from this step (with --cooldown-steps); "
                        "the run then stops when the rate reaches 0")
    p.add_argument("--cooldown-steps", type=int, default=0, help="length of that decay, in steps")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="image side in pixels (patch 2: 32 -> 256 tokens, 64 -> 1024 tokens)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads of 64 channels (width = 64 x heads; default: the reference config's 2)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the reference config's 6)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch side in pixels (default 2; 1 makes a 32x32 image 1024 tokens)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0,
                   help="data loader processes that render batches on the CPU (0: render them in this process "
                        "on --device, the fast choice on a GPU)")
    p.add_argument("--compile", default=None, metavar="BACKEND", nargs="?", const="inductor",
                   help="train through torch.compile with this backend (bare --compile: inductor)")
    p.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default="none",
                   help="forward-pass autocast dtype (bfloat16 on a GPU)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/training_state.pt")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from the weights saved in this folder (an earlier run's --out, or "
                        "ras_compile/reference/weights) with a fresh optimiser and step count")
    p.add_argument("--preview", action="store_true", help="write DIR/preview.png (2 samples per class)")
    p.add_argument("--gap-every", type=int, default=0,
                   help="log the EMA model's label gap (reference.check.label_gap) every this many steps (0: off)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m ras_compile.reference.train``."""
    a = _parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if str(a.device).startswith("cuda"):  # TF32 tensor cores for the fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        settings = TrainSettings(batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                                 ema_decay=a.ema_decay, label_dropout=a.label_dropout, time_sampling=a.time_sampling,
                                 image_size=a.image_size, class_embedding_std=a.class_embedding_std,
                                 cooldown_from=a.cooldown_from, cooldown_steps=a.cooldown_steps)
    except ValueError as e:
        raise SystemExit(f"error: {e} (use --cooldown-from STEP --cooldown-steps N)") from None
    overrides = {key: value for key, value in (("num_attention_heads", a.heads), ("num_layers", a.layers),
                                               ("patch_size", a.patch_size)) if value is not None}
    for name, value in (("--heads", a.heads), ("--layers", a.layers), ("--patch-size", a.patch_size)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {name} must be a positive integer, got {value}")
    if a.patch_size is not None and a.image_size % a.patch_size:
        raise SystemExit(f"error: --image-size {a.image_size} is not a multiple of --patch-size {a.patch_size}")
    try:
        return train(a.out, a.minutes, a.steps, a.seed, settings, log_every=a.log_every,
                     save_dtype=getattr(torch, a.save_dtype), resume=a.resume, preview=a.preview,
                     model_overrides=overrides, device=a.device,
                     workers=a.workers, autocast=None if a.autocast == "none" else getattr(torch, a.autocast),
                     gap_every=a.gap_every, compile_backend=a.compile, init_from=a.init_from)
    except (FileNotFoundError, ValueError) as e:  # --init-from / --resume with the wrong folder or model
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
