"""A reference DiT trained on synthetic data, for measuring what RAS costs in quality (issue 6).

* :mod:`.data`: a seeded generator of labelled 32x32 images (a textured shape, the class,
  on a flat / gradient / striped / noisy background);
* :mod:`.model`: the class-conditional pixel-space ``DiTTransformer2DModel`` (256 tokens),
  its config and loader;
* :mod:`.sampling`: rectified-flow Euler sampling with ``FlowMatchEulerDiscreteScheduler``
  and optional classifier-free guidance;
* :mod:`.train`: ``python -m ras_compile.reference.train`` reproduces the weights;
* :mod:`.evaluator` and :mod:`.metrics`: a classifier of the same classes (class accuracy,
  Frechet distance on its features), PSNR and SSIM.

The submodules are imported on demand, e.g. ``from ras_compile.reference.model import
load_reference_model``.
"""

__all__ = ["DEFAULT_GUIDANCE_SCALE"]

#: The classifier-free guidance scale that the demo, the quality benchmark and the check use by
#: default. The shipped
#: reference DiT draws its classes reliably with guidance, not without: docs/quality.md gives its
#: class accuracy at several scales. Defined here, free of imports, so the command line can show it.
DEFAULT_GUIDANCE_SCALE: float = 4.0
