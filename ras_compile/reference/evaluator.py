"""The evaluator: a small CNN classifier of the synthetic classes, and the metrics built on it.

    python -m ras_compile.reference.evaluator --out DIR --minutes M [--steps N] [--seed S]

trains the classifier on fresh batches of :func:`~ras_compile.reference.data.make_batch`
(seeded per step, like the DiT's training) with a little Gaussian noise added so that it
tolerates the imperfections of generated samples, reports its accuracy on a held-out set
(seeds from :data:`~ras_compile.reference.data.EVAL_SEED_BASE`), and writes
``DIR/classifier.safetensors`` and ``DIR/classifier_log.json``.

Uses: :func:`classify` gives the class accuracy of generated samples (does a sample of
class c look like a c?); :func:`features` (the pooled penultimate activations) feed
:func:`frechet_distance`, a FID-like distance between generated and real images.
:func:`psnr` and :func:`ssim` (from :mod:`.metrics`) compare a sample with its dense
reference.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from .data import EVAL_SEED_BASE, NUM_CLASSES, make_batch, training_seed
from .metrics import frechet_distance, psnr, ssim
from .model import WEIGHTS_DIR

__all__ = ["ShapeClassifier", "build_classifier", "augment", "train_classifier", "classify", "features",
           "accuracy", "save_classifier", "load_classifier", "evaluation_set", "frechet_distance", "psnr",
           "ssim", "main"]

CLASSIFIER_FILE = "classifier.safetensors"
_EVAL_SET_SEED = EVAL_SEED_BASE + 1


def _conv_block(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    """``convs`` 3x3 convolutions, each followed by GroupNorm and SiLU."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1),
                   nn.GroupNorm(min(8, c_out), c_out), nn.SiLU()]
    return nn.Sequential(*layers)


class ShapeClassifier(nn.Module):
    """A 4-stage CNN (32 -> 16 -> 8 -> 4 pixels; widths ``width/2, width, 2 width, 4 width``;
    one convolution at full resolution, two at each lower one) with global average pooling.

    ``features(x)`` is the pooled ``4 * width``-dimensional vector; ``forward(x)`` the logits.
    About 11 M multiply-adds per 32x32 image at ``width=32``, so it trains in minutes on a CPU."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        self.num_classes, self.width = num_classes, width
        widths = (width // 2, width, 2 * width, 4 * width)
        self.stages = nn.ModuleList([_conv_block(3, widths[0], 1)] + [
            _conv_block(c_in, c_out, 2) for c_in, c_out in zip(widths, widths[1:])])
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features ``[n, 4 * width]`` of images ``[n, 3, H, W]`` in ``[-1, 1]``."""
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else nn.functional.avg_pool2d(x, 2))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[n, num_classes]``."""
        return self.head(self.features(x))


def build_classifier(seed: int = 0, width: int = 32) -> ShapeClassifier:
    """A freshly initialised classifier (weights from ``seed``; the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapeClassifier(NUM_CLASSES, width)


def augment(images: torch.Tensor, gen: torch.Generator, max_noise: float = 0.15) -> torch.Tensor:
    """Add Gaussian noise of a per-image standard deviation in ``[0, max_noise]`` (drawn on the
    CPU from ``gen``, whatever ``images``' device)."""
    level = torch.rand((images.shape[0], 1, 1, 1), generator=gen) * max_noise
    return images + (level * torch.randn(images.shape, generator=gen)).to(images.device)


def evaluation_set(n: int = 1024, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images and labels used to report the classifier's accuracy and as real
    images for the Frechet distance (seeded above the training seeds)."""
    return make_batch(_EVAL_SET_SEED, n, size)


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` applied to ``images`` in chunks of ``batch_size``, concatenated."""
    return torch.cat([fn(chunk) for chunk in images.split(batch_size)]) if len(images) else torch.empty(0)


def classify(classifier: ShapeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class ``[n]`` (int64) of images in ``[-1, 1]`` (values outside are clamped, as
    they are when an image is shown or saved: a sampler's raw output may overshoot)."""
    classifier.eval()
    return _batched(lambda x: classifier(x.float().clamp(-1, 1)).argmax(dim=1), images, batch_size)


def features(classifier: ShapeClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Classifier features ``[n, 4 * width]`` of images in ``[-1, 1]`` (clamped, as in :func:`classify`;
    for :func:`frechet_distance`)."""
    classifier.eval()
    return _batched(lambda x: classifier.features(x.float().clamp(-1, 1)), images, batch_size)


def accuracy(classifier: ShapeClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified as their ``labels``."""
    return float((classify(classifier, images) == labels).float().mean())


def train_classifier(minutes: float | None = None, steps: int | None = None, seed: int = 0, batch_size: int = 128,
                     lr: float = 2e-3, width: int = 32, log_every: int = 50, device: str | torch.device = "cpu",
                     workers: int = 0) -> tuple[ShapeClassifier, dict]:
    """Train a classifier on fresh generator batches until ``steps`` or ``minutes``; returns it and a log.

    AdamW with a cosine decay over ``steps`` (or a constant rate under a minutes-only
    budget); cross-entropy on noise-augmented images. ``device``: where it trains (the
    data's and the augmentation noise's random draws come from CPU generators; without
    ``workers`` the batches are rendered on ``device``); ``workers``: loader processes that
    make the batches on the CPU instead. The returned classifier is on the CPU."""
    from .train import batch_stream

    device = torch.device(device)
    if minutes is None and steps is None:
        raise ValueError("give minutes or steps (or both)")
    clf = build_classifier(seed, width).to(device).train()
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    curve, window, step, t0 = [], [], 0, time.perf_counter()
    batches = batch_stream(seed, 0, batch_size, 32, workers, device=None if workers > 0 else device)
    while (steps is None or step < steps) and (minutes is None or time.perf_counter() - t0 < minutes * 60):
        data_seed = training_seed(seed, step)
        images, labels = next(batches)
        gen = torch.Generator().manual_seed(data_seed + 2 ** 62)
        if steps is not None:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item())
        noisy = augment(images, gen).to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(clf(noisy), labels.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append(loss.detach())
        step += 1
        if step % log_every == 0:
            curve.append({"step": step, "loss": float(torch.stack(window).mean()),
                          "elapsed_s": round(time.perf_counter() - t0, 1)})
            print(f"step {step:5d}  loss {curve[-1]['loss']:.4f}  {curve[-1]['elapsed_s']:7.1f} s", flush=True)
            window = []
    clf = clf.cpu().eval()
    images, labels = evaluation_set()
    log = {"seed": seed, "steps": step, "batch_size": batch_size, "lr": lr, "width": width,
           "wall_s": round(time.perf_counter() - t0, 1), "eval_accuracy": accuracy(clf, images, labels),
           "curve": curve}
    return clf, log


def save_classifier(classifier: ShapeClassifier, path: str | Path) -> Path:
    """Write the classifier's weights (and its width / class count as metadata) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"num_classes": str(classifier.num_classes), "width": str(classifier.width)}
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path), metadata=meta)
    return path


def load_classifier(path: str | Path | None = None) -> ShapeClassifier:
    """Load a classifier written by :func:`save_classifier`, in eval mode.

    ``path`` defaults to ``WEIGHTS_DIR / "classifier.safetensors"``; a missing file raises
    ``FileNotFoundError`` saying how to train it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_DIR / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no evaluator classifier at {path}. Train it with "
                                f"`python -m ras_compile.reference.evaluator --out {path.parent}`.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    clf = ShapeClassifier(int(meta.get("num_classes", NUM_CLASSES)), int(meta.get("width", 32)))
    clf.load_state_dict(load_file(str(path)))
    return clf.eval()


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m ras_compile.reference.evaluator``."""
    p = argparse.ArgumentParser(prog="python -m ras_compile.reference.evaluator",
                                description="Train the evaluator classifier on the synthetic generator.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="number of steps (reproducible stop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (0: make batches in-process)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if str(a.device).startswith("cuda"):  # TF32 tensor cores for the fp32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clf, log = train_classifier(a.minutes, a.steps, a.seed, a.batch_size, a.lr, device=a.device, workers=a.workers)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(clf, out / CLASSIFIER_FILE)
    (out / "classifier_log.json").write_text(json.dumps(log, indent=1))
    print(f"held-out accuracy {log['eval_accuracy']:.4f} after {log['steps']} steps ({log['wall_s']} s)")
    return log


if __name__ == "__main__":
    main()
