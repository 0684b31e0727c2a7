"""Benchmark: does a token-selection score pick the tokens whose prediction is about to change?

    python benchmarks/bench_score.py                      # shipped reference DiT, 64 samples, 28 steps, guidance 4
    python benchmarks/bench_score.py --model DIR --samples 16 --steps 10 --out /tmp/score

RAS recomputes the ``ratio`` share of tokens with the highest score and reuses the last
prediction for the rest. Reusing token ``i`` at step ``t`` costs ``e_t(i)``: the mean,
over its patch's pixels and channels, of ``(v_t(i) - v_{t-1}(i)) ** 2``, where ``v`` is
the (guided) velocity of a dense trajectory. A score computed from what is known after
step ``t - 1`` is good if its top tokens carry most of the step's total reuse error. For
each score and ratio this reports:

* **captured**: the share of ``sum_i e_t(i)`` on the score's top ``ratio * N`` tokens,
  averaged over samples and over steps 2 to S - 1 (a random choice gets ``ratio`` on
  average; the oracle, the top tokens of ``e_t`` itself, gets the most any score can);
* **spearman**: the rank correlation of the score with ``e_t``, averaged the same way.

Scores: ``std`` and ``l2norm`` of the previous prediction (``ras_compile.selection.
score_tokens``, what RAS ranks by), ``random``, ``previous change`` (``e_{t-1}``: how
much each token's prediction moved in the step before) and the ``oracle``.

The trajectories are dense ones, not RAS's: this measures the premise of the selection
(that the score finds the tokens whose output changes), not the quality of RAS's
images, which ``bench_quality.py`` measures. Writes ``<out>/<name>.json`` and
``<out>/<name>.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

SCORES = ("std", "l2norm", "random", "previous change", "oracle")


def patch_tokens(v: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p * p, C]``: each token's patch, row-major tokens (for the
    reference DiT, the same cut as ``ras_compile.runtime.prediction_patches``; tested)."""
    b, c, h, w = v.shape
    return (v.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
            .reshape(b, (h // patch) * (w // patch), patch * patch, c))


def reuse_error(v: torch.Tensor, previous: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, N]``: the mean squared change of each token's patch from ``previous`` to ``v``."""
    return ((patch_tokens(v, patch) - patch_tokens(previous, patch)) ** 2).mean(dim=(2, 3))


def captured_share(error: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """``[B]``: the share of each row's total ``error`` on its ``k`` highest-``score`` tokens."""
    top = score.topk(k, dim=1).indices
    return error.gather(1, top).sum(1) / error.sum(1).clamp_min(1e-30)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B]``: the rank correlation of the rows of ``a`` and ``b`` (ties broken by position)."""
    ra, rb = (x.argsort(1).argsort(1).to(torch.float64) for x in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-30)


def candidate_scores(previous: torch.Tensor, previous_error: torch.Tensor, error: torch.Tensor, patch: int,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every score of :data:`SCORES` for one step, from the previous prediction and its change."""
    from ras_compile.selection import score_tokens

    tokens = patch_tokens(previous, patch)
    return {"std": score_tokens(tokens, "std"), "l2norm": score_tokens(tokens, "l2norm"),
            "random": torch.rand(error.shape, generator=generator), "previous change": previous_error,
            "oracle": error}


@torch.no_grad()
def measure(model: torch.nn.Module, samples: int, steps: int, guidance: float, ratios: list[float],
            seed: int = 0) -> dict:
    """Run ``samples`` dense trajectories and score every candidate at every step (see the module doc)."""
    from ras_compile.reference.check import balanced_labels
    from ras_compile.reference.sampling import guided_velocity, initial_noise, make_scheduler

    if steps < 3:
        raise ValueError(f"need at least 3 steps (two changes to compare), got {steps}")
    config = model.config
    patch = config.patch_size
    labels = balanced_labels(samples)
    x = initial_noise(samples, config.in_channels, config.sample_size, seed)
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    sums = {(name, r): {"captured": 0.0, "spearman": 0.0} for name in SCORES for r in ratios}
    previous = previous_error = None
    counted = 0
    for t in scheduler.timesteps:
        v = guided_velocity(model, x, t, labels, guidance, null_class=config.num_embeds_ada_norm)
        if previous is not None:
            error = reuse_error(v, previous, patch)
            if previous_error is not None:
                scores = candidate_scores(previous, previous_error, error, patch, generator)
                for name, score in scores.items():
                    rho = float(spearman(score, error).mean())
                    for r in ratios:
                        k = max(1, round(r * error.shape[1]))
                        sums[name, r]["captured"] += float(captured_share(error, score, k).mean())
                        sums[name, r]["spearman"] += rho
                counted += 1
            previous_error = error
        previous = v
        x = scheduler.step(v, t, x, return_dict=False)[0]
    rows = [{"score": name, "ratio": r, "captured": round(s["captured"] / counted, 4),
             "spearman": round(s["spearman"] / counted, 4)} for (name, r), s in sums.items()]
    return {"samples": samples, "steps": steps, "guidance_scale": guidance, "seed": seed,
            "tokens": (config.sample_size // patch) ** 2, "steps_scored": counted, "rows": rows}


def to_markdown(result: dict) -> str:
    """A table: one row per score, the captured share at each ratio and the rank correlation."""
    ratios = sorted({row["ratio"] for row in result["rows"]}, reverse=True)
    lines = [f"# Token-selection scores vs the change they should predict ({result['machine']})", "",
             f"{result['samples']} dense {result['steps']}-step trajectories of the reference DiT "
             f"({result['tokens']} tokens), guidance {result['guidance_scale']:g}, steps 2 to {result['steps'] - 1} "
             "averaged. *captured*: the share of the step's total reuse error on the score's top tokens "
             "(random: the ratio itself).", "",
             "| score | " + " | ".join(f"captured at ratio {r:g}" for r in ratios) + " | spearman |",
             "|---|" + "---:|" * (len(ratios) + 1)]
    for name in SCORES:
        rows = {row["ratio"]: row for row in result["rows"] if row["score"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{rows[r]['captured']:.3f}" for r in ratios)
                     + f" | {rows[ratios[0]]['spearman']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_score.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="reference model folder (default: the shipped weights)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the reference's)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--name", default="cpu_reference_score_vs_change")
    a = p.parse_args(argv)
    from ras_compile.machine import cores_available, cpu_model
    from ras_compile.reference import DEFAULT_GUIDANCE_SCALE
    from ras_compile.reference.model import load_reference_model

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.samples < 1 or not all(0 < r <= 1 for r in a.ratios):
        raise SystemExit("error: --samples must be >= 1 and every --ratios value in (0, 1]")
    try:
        model = load_reference_model(a.model)
        result = measure(model, a.samples, a.steps, DEFAULT_GUIDANCE_SCALE if a.guidance is None else a.guidance,
                         a.ratios, a.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    result.update(machine=f"{cpu_model()}, {cores_available()} cores, {torch.get_num_threads()} torch threads", torch=torch.__version__, python=platform.python_version(),
                  model=a.model or "shipped", date=datetime.date.today().isoformat())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{a.name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    return result


if __name__ == "__main__":
    main()
