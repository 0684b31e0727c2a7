"""A deterministic, seeded generator of labelled synthetic images.

Every image is a foreground object of one of :data:`NUM_CLASSES` shape classes on a
background. Both carry variety the model must learn:

* background: a flat colour, a linear gradient, stripes (random angle, frequency,
  phase) or a smooth noise texture (upsampled low-resolution noise), in two random
  colours;
* foreground: the shape (the label), upright, with a random size (radius
  :data:`RADIUS_RANGE` of the image side) and centre (up to :data:`CENTRE_JITTER` from
  the image centre on each axis), filled with a texture in its own frame (solid, stripes,
  checker or noise) in one or two colours chosen to differ from both background colours
  and from each other. Edges are anti-aliased by 2x2 supersampling.

So an image has regions that are easy to denoise (a flat or gradient background) and
regions that are not (a textured object with sharp edges), which is what Region-Adaptive
Sampling exploits.

Objects are upright and near the centre so that the class-conditional model can learn its
classes within the CPU training budget of ``ras_compile.reference.train``. With random
rotations and centres anywhere, the average image of every class at high noise is the same
blur, so the label only matters late in sampling and in a few edge pixels. CPU pilots of
the same model and recipe scored 12.5 % class accuracy (chance) on those images after 40 k
training samples and 33 % on these after 35 k (guidance 4; docs/quality.md).

Every random number is drawn on the CPU from a ``torch.Generator`` seeded with ``seed``
(the global RNG is never touched), in an order that never depends on the data, so
``make_batch(seed, n, size)`` is a pure function of its arguments. The images are then
rendered with vectorised torch ops on ``device`` (the CPU by default: a few thousand 32x32
images take well under a second per thousand). Rendering on a GPU gives the same images up
to float rounding, and is what keeps a GPU training run from waiting on the CPU for data.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "BACKGROUNDS", "TEXTURES", "RADIUS_RANGE", "CENTRE_JITTER", "EVAL_SEED_BASE",
           "make_batch", "class_name", "training_seed"]

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "crescent", "heart")
NUM_CLASSES: int = len(CLASS_NAMES)
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "stripes", "noise")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "noise")

#: The object's radius (the shape fits in a disc of this radius), as a fraction of the image side.
RADIUS_RANGE: tuple[float, float] = (0.24, 0.34)
#: How far the object's centre may sit from the image centre, on each axis, as a fraction of the side.
CENTRE_JITTER: float = 0.12

_SUPERSAMPLE = 2

#: Seeds at or above this are for evaluation sets; :func:`training_seed` stays below it.
EVAL_SEED_BASE: int = 10 ** 15
_STEPS_PER_RUN = 10 ** 9


def class_name(label: int) -> str:
    """The name of class ``label``."""
    return CLASS_NAMES[int(label)]


def training_seed(run_seed: int, step: int) -> int:
    """The data seed of training step ``step`` of a run seeded ``run_seed``.

    Distinct runs and steps get distinct seeds, all below :data:`EVAL_SEED_BASE`, so
    training batches never coincide with evaluation sets drawn from seeds above it."""
    if not (0 <= run_seed < EVAL_SEED_BASE // _STEPS_PER_RUN and 0 <= step < _STEPS_PER_RUN):
        raise ValueError(f"run_seed must be in [0, {EVAL_SEED_BASE // _STEPS_PER_RUN}) and step in "
                         f"[0, {_STEPS_PER_RUN}), got {run_seed}, {step}")
    return run_seed * _STEPS_PER_RUN + step


def _rand(gen: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``U[0, 1)`` samples drawn on the CPU from ``gen``, moved to ``device``."""
    return torch.rand(shape, generator=gen).to(device)


def _randint(gen: torch.Generator, high: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Integers in ``[0, high)`` drawn on the CPU from ``gen``, moved to ``device``."""
    return torch.randint(high, shape, generator=gen).to(device)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float, device: torch.device
             ) -> torch.Tensor:
    """Uniform samples in ``[low, high)`` drawn from ``gen``, on ``device``."""
    return low + (high - low) * _rand(gen, shape, device)


def _grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in ``[0, 1]``, as ``(x, y)`` each ``[1, size, size]``."""
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x[None], y[None]


def _per_image(v: torch.Tensor) -> torch.Tensor:
    """Reshape a per-image vector ``[n]`` to broadcast against ``[n, H, W]``."""
    return v[:, None, None]


def _lerp_colours(c1: torch.Tensor, c2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-pixel mix ``(1 - w) c1 + w c2``: colours ``[n, 3]``, weights ``[n, H, W]`` -> ``[n, 3, H, W]``."""
    c1 = c1[:, :, None, None]
    return c1 + (c2[:, :, None, None] - c1) * w[:, None]


def _upsample_matrix(cells: int, size: int, device: torch.device) -> torch.Tensor:
    """The ``[size, cells]`` matrix of 1-D bicubic upsampling from ``cells`` to ``size`` samples.

    Bicubic upsampling is separable, so a ``cells x cells`` grid ``g`` upsamples to
    ``A @ g @ A.T``: a batched matmul, much cheaper than ``interpolate`` per image."""
    rows = torch.eye(cells)[:, :, None].expand(cells, cells, cells)  # row j: e_j outer ones
    up = torch.nn.functional.interpolate(rows[:, None], size=(size, size), mode="bicubic", align_corners=False)
    return up[:, 0, :, 0].T.contiguous().to(device)


def _smooth_noise(gen: torch.Generator, n: int, size: int, cells: torch.Tensor) -> torch.Tensor:
    """Smooth noise in ``[0, 1]``, ``[n, size, size]``: random 4x4 and 8x8 grids upsampled
    bicubically and mixed per image (``cells`` in ``[4, 8]``: 4 is all coarse, 8 all fine)."""
    device = cells.device
    out = torch.zeros((n, size, size), device=device)
    w = _per_image((cells - 4.0) / 4.0).clamp(0, 1)
    for k, weight in ((4, 1 - w), (8, w)):
        a = _upsample_matrix(k, size, device)
        out = out + weight * (a @ _rand(gen, (n, k, k), device) @ a.T)
    return out.clamp(0, 1)


def _stripes(coord: torch.Tensor, freq: torch.Tensor, phase: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Soft stripes in ``[0, 1]`` along ``coord`` with per-image frequency and phase."""
    s = torch.sin(2 * math.pi * _per_image(freq) * coord + _per_image(phase))
    return torch.sigmoid(sharpness * s)


def _backgrounds(gen: torch.Generator, n: int, size: int, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Backgrounds ``[n, 3, H, W]`` in ``[0, 1]`` and their two colours (each ``[n, 3]``), on ``x``'s device."""
    device = x.device
    kind = _randint(gen, len(BACKGROUNDS), (n,), device)
    c1 = _rand(gen, (n, 3), device)
    c2 = _rand(gen, (n, 3), device)
    angle = _uniform(gen, (n,), 0.0, 2 * math.pi, device)
    along = x * _per_image(torch.cos(angle)) + y * _per_image(torch.sin(angle))  # [n, H, W]
    ramp = (along - along.amin(dim=(1, 2), keepdim=True)) / (
        along.amax(dim=(1, 2), keepdim=True) - along.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-6)
    stripes = _stripes(along, _uniform(gen, (n,), 2.0, 6.0, device), _uniform(gen, (n,), 0.0, 2 * math.pi, device))
    noise = _smooth_noise(gen, n, size, _uniform(gen, (n,), 4.0, 8.0, device))
    weights = torch.stack([torch.zeros_like(ramp), ramp, stripes, noise])  # [4, n, H, W]
    w = weights[kind, torch.arange(n, device=device)]
    image = _lerp_colours(c1, c2, w)
    return image, (c1, c2)


def _placements(gen: torch.Generator, n: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each object's radius and centre ``(radius, cx, cy)``, each ``[n]``, as fractions of the
    image side: radius in :data:`RADIUS_RANGE`, centre within :data:`CENTRE_JITTER` of 0.5."""
    radius = _uniform(gen, (n,), *RADIUS_RANGE, device)
    cx = 0.5 + _uniform(gen, (n,), -CENTRE_JITTER, CENTRE_JITTER, device)
    cy = 0.5 + _uniform(gen, (n,), -CENTRE_JITTER, CENTRE_JITTER, device)
    return radius, cx, cy


def _local_frame(x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates in the object's frame: centred on ``(cx, cy)``, in units of ``radius``."""
    return (x - _per_image(cx)) / _per_image(radius), (y - _per_image(cy)) / _per_image(radius)


def _shape_mask(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of class ``label``'s shape in the object frame ``(u, v)``.

    Shapes follow :data:`CLASS_NAMES` and each fits in the unit disc."""
    name = CLASS_NAMES[label]
    rho = torch.sqrt(u * u + v * v)
    if name == "circle":
        return rho <= 0.95
    if name == "square":
        return (u.abs() <= 0.7) & (v.abs() <= 0.7)
    if name == "triangle":  # equilateral, circumradius 1: three half-planes at distance 0.5
        inside = torch.ones_like(rho, dtype=torch.bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside = inside & (u * math.cos(a) + v * math.sin(a) >= -0.5)
        return inside
    if name == "star":  # five points: the radius bound is a triangle wave of the polar angle
        phi = torch.atan2(v, u)
        wave = torch.abs(torch.remainder(phi * 5 / (2 * math.pi), 1.0) - 0.5) * 2  # 1 at the points
        return rho <= 0.4 + 0.6 * wave
    if name == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if name == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    if name == "crescent":
        return (rho <= 0.95) & (torch.sqrt((u - 0.45) ** 2 + v * v) >= 0.75)
    if name == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, scaled into the unit disc
        hx, hy = u * 1.25, -v * 1.25 + 0.15
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy ** 3 <= 0
    raise ValueError(f"unknown class {label}")


def _shape_masks(labels: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float masks ``[n, H, W]`` of each image's own shape (computed class by class)."""
    mask = torch.zeros_like(u)
    for label in range(NUM_CLASSES):
        idx = (labels == label).nonzero(as_tuple=True)[0]
        if idx.numel():
            mask[idx] = _shape_mask(label, u[idx], v[idx]).float()
    return mask


def _textures(gen: torch.Generator, n: int, size: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Texture weights in ``[0, 1]`` in the object frame, ``[n, H, W]`` (one kind per image), on ``u``'s device."""
    device = u.device
    kind = _randint(gen, len(TEXTURES), (n,), device)
    freq = _uniform(gen, (n,), 1.0, 2.2, device)
    phase = _uniform(gen, (n,), 0.0, 2 * math.pi, device)
    solid = torch.zeros_like(u)
    stripes = _stripes(u, freq, phase, sharpness=6.0)
    checker = torch.sigmoid(6.0 * torch.sin(math.pi * _per_image(freq) * u * 1.5)
                            * torch.sin(math.pi * _per_image(freq) * v * 1.5))
    noise = _smooth_noise(gen, n, size, _uniform(gen, (n,), 6.0, 8.0, device))
    weights = torch.stack([solid, stripes, checker, noise])
    return weights[kind, torch.arange(n, device=device)]


def _pick_colours(gen: torch.Generator, n: int, avoid: list[torch.Tensor], min_distance: float = 0.3,
                  tries: int = 8) -> torch.Tensor:
    """One random colour ``[n, 3]`` per image, far from every colour in ``avoid`` (each ``[n, 3]``,
    all on one device: the result's).

    Draws ``tries`` candidates per image and keeps the first whose mean absolute channel
    distance to each avoided colour is at least ``min_distance``, or else the candidate
    farthest from them (so the draw count, hence the RNG stream, never depends on data)."""
    device = avoid[0].device
    candidates = _rand(gen, (tries, n, 3), device)
    distance = torch.stack([(candidates - c).abs().mean(dim=2) for c in avoid]).amin(dim=0)  # [tries, n]
    first_ok = 1e3 - torch.arange(tries, dtype=torch.float32, device=device)[:, None]
    choice = torch.where(distance >= min_distance, first_ok, distance).argmax(dim=0)
    return candidates[choice, torch.arange(n, device=device)]


def _balanced_labels(gen: torch.Generator, n: int) -> torch.Tensor:
    """``n`` labels with every class as equally often as ``n`` allows, in random order."""
    labels = torch.arange(n) % NUM_CLASSES
    return labels[torch.randperm(n, generator=gen)]


def make_batch(seed: int, n: int, size: int = 32, device: str | torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``n`` labelled images, a pure function of ``(seed, n, size)``.

    Returns ``(images, labels)``: ``images`` float32 ``[n, 3, size, size]`` in
    ``[-1, 1]``, ``labels`` int64 ``[n]`` in ``[0, NUM_CLASSES)``, balanced over the
    classes (each appears ``n // NUM_CLASSES`` or one more times), both on ``device``
    (default: the CPU). The random draws are the same on every device; only the
    rendering's float rounding differs.
    """
    if n < 0 or size < 4:
        raise ValueError(f"need n >= 0 and size >= 4, got n={n}, size={size}")
    device = torch.device(device if device is not None else "cpu")
    gen = torch.Generator().manual_seed(int(seed))
    hi = size * _SUPERSAMPLE
    x, y = _grid(hi, device)
    labels = _balanced_labels(gen, n)
    background, bg_colours = _backgrounds(gen, n, hi, x, y)

    radius, cx, cy = _placements(gen, n, device)
    u, v = _local_frame(x, y, cx, cy, radius)

    mask = _shape_masks(labels, u, v)  # [n, H, W]
    fg1 = _pick_colours(gen, n, list(bg_colours))
    fg2 = _pick_colours(gen, n, [*bg_colours, fg1])  # a visible texture inside the object
    foreground = _lerp_colours(fg1, fg2, _textures(gen, n, hi, u, v))

    m = mask[:, None]
    image = background * (1 - m) + foreground * m
    image = torch.nn.functional.avg_pool2d(image, _SUPERSAMPLE)  # anti-aliased edges
    return (image * 2 - 1).clamp(-1, 1).contiguous(), labels.to(device)
