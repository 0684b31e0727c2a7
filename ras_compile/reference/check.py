"""Check a trained reference DiT: class accuracy and Frechet distance of its dense samples.

    python -m ras_compile.reference.check [--model DIR] [--classifier FILE] [--samples N] [--steps 28]

Samples ``N`` images (balanced over the classes, seeds fixed) with the dense model and
the 28-step flow-matching Euler loop, classifies them with the evaluator and prints the
accuracy (the issue's bar: at least 90 %) and the Frechet distance of their classifier
features to as many real images of the generator. Defaults to the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .data import NUM_CLASSES
from .evaluator import classify, evaluation_set, features, load_classifier
from .metrics import frechet_distance
from .model import load_reference_model
from .sampling import sample

__all__ = ["CHECK_SEED", "balanced_labels", "dense_samples", "check_model", "main"]

#: Seed of the starting noise of the check's samples (distinct from training and evaluation seeds).
CHECK_SEED = 20261123


def balanced_labels(n: int) -> torch.Tensor:
    """``[0, 1, ..., NUM_CLASSES - 1, 0, 1, ...]`` of length ``n``."""
    return torch.arange(n) % NUM_CLASSES


def dense_samples(model: torch.nn.Module, n: int, steps: int = 28, guidance_scale: float = 1.0,
                  seed: int = CHECK_SEED, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` dense samples (float32, CPU) and their labels, in batches of ``batch_size``."""
    labels = balanced_labels(n)
    chunks = [sample(model, lab, steps=steps, seed=seed + i, guidance_scale=guidance_scale).cpu()
              for i, lab in enumerate(labels.split(batch_size))]
    return torch.cat(chunks), labels


def check_model(model: torch.nn.Module, classifier: torch.nn.Module, n: int = 64, steps: int = 28,
                guidance_scale: float = 1.0, frechet: bool = True) -> dict:
    """Accuracy (and Frechet distance to real images) of ``n`` dense samples of ``model``."""
    t0 = time.perf_counter()
    images, labels = dense_samples(model, n, steps, guidance_scale)
    result = {"samples": n, "steps": steps, "guidance_scale": guidance_scale,
              "accuracy": float((classify(classifier, images) == labels).float().mean()),
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
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance scales to check")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    model = load_reference_model(a.model).to(a.device)
    classifier = load_classifier(a.classifier)
    results = []
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
