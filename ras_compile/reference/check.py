"""Check a trained reference DiT: class accuracy and Frechet distance of its dense samples.

    python -m ras_compile.reference.check [--model DIR] [--classifier FILE] [--samples N] [--steps 28]

Samples ``N`` images (balanced over the classes, seeds fixed) with the dense model and
the 28-step flow-matching Euler loop, classifies them with the evaluator and prints the
accuracy (the issue's bar: at least 90 %) and the Frechet distance of their classifier
features to as many real images of the generator. Defaults to the shipped weights.

It also prints the *label gap* (:func:`label_gap`): how much the model's flow-matching
loss on held-out images rises when it is given a wrong class, per noise level. A model
that draws the class's shape must lose a lot without the right label at high noise
levels, where the shape is decided; a gap near zero means the model ignores its label
(and its samples' class accuracy is near chance), which is cheap to see during training
long before sampling is worth it. ``train`` logs it too.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .data import CLASS_NAMES, EVAL_SEED_BASE, NUM_CLASSES, make_batch
from .evaluator import classify, evaluation_set, features, load_classifier
from .metrics import frechet_distance
from .model import load_reference_model
from . import DEFAULT_GUIDANCE_SCALE
from .sampling import sample

__all__ = ["CHECK_SEED", "GAP_SIGMAS", "balanced_labels", "dense_samples", "label_gap", "check_model", "main"]

#: Seed of the starting noise of the check's samples (distinct from training and evaluation seeds).
CHECK_SEED = 20261123
#: Noise levels at which :func:`label_gap` measures the loss.
GAP_SIGMAS = (0.3, 0.6, 0.8, 0.95)
_GAP_SEED = EVAL_SEED_BASE + 7  # the label gap's held-out images (the classifier's sets use + 1 and up)


def balanced_labels(n: int) -> torch.Tensor:
    """``[0, 1, ..., NUM_CLASSES - 1, 0, 1, ...]`` of length ``n``."""
    return torch.arange(n) % NUM_CLASSES


def dense_samples(model: torch.nn.Module, n: int, steps: int = 28, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                  seed: int = CHECK_SEED, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` dense samples (float32, CPU) and their labels, in batches of ``batch_size``."""
    labels = balanced_labels(n)
    chunks = [sample(model, lab, steps=steps, seed=seed + i, guidance_scale=guidance_scale).cpu()
              for i, lab in enumerate(labels.split(batch_size))]
    return torch.cat(chunks), labels


@torch.no_grad()
def label_gap(model: torch.nn.Module, n: int = 128, sigmas: tuple[float, ...] = GAP_SIGMAS, draws: int = 2
              ) -> dict[str, dict[str, float]]:
    """Per noise level ``sigma``: the velocity MSE of ``model`` on ``n`` held-out images with
    their true classes (``loss``) and how much larger it is with a wrong class (``gap``).

    The images, the noise (``draws`` draws per level) and the wrong classes (each true
    class shifted by a random non-zero amount) come from fixed seeds, so the numbers of
    two checkpoints compare. The model runs in eval mode on its own device and dtype;
    its training mode is restored afterwards."""
    device, dtype = next((p.device, p.dtype) for p in model.parameters() if p.is_floating_point())
    size = model.config.sample_size
    images, labels = make_batch(_GAP_SEED, n, size)
    gen = torch.Generator().manual_seed(_GAP_SEED)
    noises = torch.randn((draws, *images.shape), generator=gen)
    wrong = (labels + torch.randint(1, NUM_CLASSES, labels.shape, generator=gen)) % NUM_CLASSES
    was_training = model.training
    model.eval()

    def loss(x_t, t, classes, target):
        out = model(hidden_states=x_t.to(device, dtype), timestep=t, class_labels=classes.to(device),
                    return_dict=False)[0]
        return float(torch.nn.functional.mse_loss(out.float().cpu(), target))

    result = {}
    for sigma in sigmas:
        t = torch.full((n,), 1000.0 * sigma, device=device)
        true_loss = wrong_loss = 0.0
        for noise in noises:
            x_t, target = (1 - sigma) * images + sigma * noise, noise - images
            true_loss += loss(x_t, t, labels, target) / draws
            wrong_loss += loss(x_t, t, wrong, target) / draws
        result[f"{sigma:g}"] = {"loss": round(true_loss, 5), "gap": round(wrong_loss - true_loss, 5)}
    model.train(was_training)
    return result


def check_model(model: torch.nn.Module, classifier: torch.nn.Module, n: int = 64, steps: int = 28,
                guidance_scale: float = DEFAULT_GUIDANCE_SCALE, frechet: bool = True) -> dict:
    """Accuracy (and Frechet distance to real images) of ``n`` dense samples of ``model``."""
    t0 = time.perf_counter()
    images, labels = dense_samples(model, n, steps, guidance_scale)
    right = classify(classifier, images) == labels
    result = {"samples": n, "steps": steps, "guidance_scale": guidance_scale,
              "accuracy": float(right.float().mean()),
              "right_per_class": {CLASS_NAMES[k]: f"{int(right[labels == k].sum())}/{int((labels == k).sum())}"
                                  for k in range(NUM_CLASSES)},
              "sampling_s": round(time.perf_counter() - t0, 2)}
    if frechet:
        real, _ = evaluation_set(n, size=model.config.sample_size)
        result["frechet_distance"] = frechet_distance(features(classifier, images), features(classifier, real))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m ras_compile.reference.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--classifier", default=None, help="classifier file (default: the shipped one)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE_SCALE],
                   help=f"guidance scales to check (default {DEFAULT_GUIDANCE_SCALE:g})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    model = load_reference_model(a.model).to(a.device)
    classifier = load_classifier(a.classifier)
    results = [{"label_gap": label_gap(model)}]
    print(json.dumps(results[0]), flush=True)
    for g in a.guidance:
        r = check_model(model, classifier, a.samples, a.steps, g)
        print(json.dumps(r), flush=True)
        results.append(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
