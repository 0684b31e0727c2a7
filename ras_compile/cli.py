"""``ras-compile``: the command line (``python -m ras_compile`` runs the same).

    ras-compile demo      # the reference DiT dense and with RAS: a PNG grid and a table
    ras-compile bench     # whole-loop speed: a preset SD3 shape, a local model folder or a hub id
    ras-compile explain   # what the pass does to a model (tiny presets, folders, hub ids)

``ras-compile <command> --help`` lists each command's options. Errors the user can fix
(bad options, a model the pass refuses, a missing folder, no network) are printed as one
line on stderr with a non-zero exit status; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .machine import contended, cpu_model, cpu_seconds, other_cpu_cores
from .reference import DEFAULT_GUIDANCE_SCALE
from .schedule import flop_bound_speedup, scaled_plan

PROG = "ras-compile"
BACKENDS = ("inductor", "aot_eager", "eager")
EXIT_USAGE = 2    # bad options, unknown model, no network: the user has to change something
EXIT_FAILURE = 1  # anything else that went wrong

# the demo's PNG grid: a header strip, then one row of cells per image row; a label column on the left
DEMO_SCALE = 3            # each 32x32 sample is drawn at 3x (nearest neighbour)
DEMO_LABEL_WIDTH = 170
DEMO_HEADER_HEIGHT = 44
DEMO_MIN_WIDTH = 520      # room for the header's text when there are few columns


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already states its default, or
    the default is None / False (a computed default the help explains, or an off switch).
    argparse's ArgumentDefaultsHelpFormatter would print "(default 28; 8 with --quick) (default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see prog --help)``) instead of usage dumps."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------- options


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: give a number with 0 < ratio <= 1") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: must satisfy 0 < ratio <= 1")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: give a whole number >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid step {text!r}: must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error instead of the one-line message")

    parser = _Parser(prog=PROG, parents=[debug],
                     description="Region-Adaptive Sampling for Diffusion Transformers, as a torch.compile pass: "
                                 "a demo, a speed benchmark and the pass's analysis of a model.",
                     epilog=f"Run '{PROG} <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,explain}", parser_class=_Parser,
                                     help="the command to run")

    # -- demo
    demo = commands.add_parser(
        "demo", parents=[debug], formatter_class=_HelpFormatter,
        help="run the reference DiT dense and with RAS; write a PNG grid and print time, speed-up and PSNR",
        description="Generate images with the shipped reference DiT (a class-conditional DiTTransformer2DModel "
                    "on 32x32 synthetic shapes), dense and with RAS at a few ratios, from the same noise. "
                    "Writes a PNG grid (a row of images per configuration and, for RAS, a heat map of how many "
                    "steps each token was computed) and prints time, speed-up and PSNR vs dense. Without "
                    "trained weights a random-weight stand-in is used, and the image and the output say so.")
    demo.add_argument("--ratios", type=_ratio, nargs="+", default=[0.5, 0.25], metavar="R",
                      help="RAS sample ratios (fraction of image tokens computed in a sparse step)")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help="denoising steps per image (default 28; 8 with --quick)")
    demo.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                      help="classes to draw, by name (circle square triangle star ring cross crescent heart) or "
                           "index, one image each (default: all 8; circle and star with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the starting noise (and of a stand-in's weights)")
    demo.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE,
                      help="classifier-free guidance scale (1: none; otherwise the conditional and null-class "
                           "halves run as one batch)")
    demo.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                      help="RAS dense warm-up steps (default: RASPolicy's 4, scaled to --steps: round(4 steps / 28))")
    demo.add_argument("--reset-steps", type=_non_negative_int, nargs="*", default=None, metavar="STEP",
                      help="RAS dense reset steps, 0-based (default: RASPolicy's 12 20, scaled to --steps)")
    demo.add_argument("--step-cache-interval", type=_positive_int, default=1, metavar="N",
                      help="stack RAS's step cache on every RAS row: after each dense step one sparse step in N "
                           "runs, the others are extrapolated from the last two computed outputs "
                           "(RASPolicy.step_cache_interval; default 1: none)")
    demo.add_argument("--backend", choices=BACKENDS, default="inductor",
                      help="torch.compile backend of the dense baseline and of RAS (aot_eager / eager compile fast "
                           "but run slowly: use them to check, inductor to time)")
    demo.add_argument("--repeats", type=_positive_int, default=None,
                      help="timed generations per configuration after one untimed one (it compiles); the best "
                           "is reported (default 3, --quick 1: the first timed run after a compile is often slow)")
    demo.add_argument("--weights", type=Path, default=None,
                      help="folder of trained reference weights (default: the package's "
                           "ras_compile/reference/weights)")
    demo.add_argument("--quick", action="store_true",
                      help="tiny run: 8 steps, 2 classes (and a 2-layer stand-in when no trained weights are found)")
    demo.add_argument("--out", type=Path, default=Path("ras_demo.png"), help="the PNG grid to write")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    # -- bench
    bench = commands.add_parser(
        "bench", parents=[debug], formatter_class=_HelpFormatter,
        help="whole-loop speed, dense torch.compile vs RAS, on a preset SD3 shape or on your model",
        description="Time whole sampling loops, dense (eager and torch.compile) vs RAS at several ratios. "
                    "Without --model: the preset scaled-down SD3 of benchmarks/bench_speed.py (needs a source "
                    "checkout), with its step-cache comparisons. With --model: a diffusers transformer from a "
                    "local folder (saved with save_pretrained) or a Hugging Face Hub id, on random example "
                    "inputs built from its config. Writes JSON, markdown and (with matplotlib) a PNG plot.")
    bench.add_argument("--model", default=None, metavar="PATH|ORG/NAME",
                       help="a diffusers transformer: a local folder with config.json (a pipeline folder's "
                            "'transformer' subfolder is used), or a hub id (needs network); default: the preset "
                            "SD3 shape")
    bench.add_argument("--subfolder", default=None,
                       help="subfolder of the folder / hub repository holding the transformer (default: the root "
                            "if it has config.json, else 'transformer')")
    bench.add_argument("--ratios", type=_ratio, nargs="+", default=None, metavar="R",
                       help="RAS sample ratios (default: 1.0 0.5 0.25 0.125 for the preset, 0.5 0.25 for --model; "
                            "0.5 with --quick)")
    bench.add_argument("--steps", type=_positive_int, default=None,
                       help="sampling steps (default 28; 8 with --quick for the preset, 6 for --model)")
    bench.add_argument("--repeats", type=_positive_int, default=None,
                       help="timed generations per configuration after a warm-up one (default 3; 1 for --model "
                            "with --quick)")
    bench.add_argument("--latent", type=_positive_int, default=None,
                       help="latent height = width in latent pixels (default: the preset's 64, or the model "
                            "config's sample_size; 16 with --quick)")
    bench.add_argument("--batch", type=_positive_int, default=None, help="batch size (default 2: a CFG batch)")
    bench.add_argument("--text-tokens", type=_positive_int, default=None,
                       help="text tokens of the example conditioning (default 77; 16 with --quick)")
    bench.add_argument("--backend", choices=BACKENDS, default="inductor",
                       help="torch.compile backend of the compiled dense baseline and of RAS")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (on cuda every model call is synchronised)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="model dtype")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help="torch.set_num_threads (default: torch's default, the core count)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the weights (preset), noise and conditioning")
    bench.add_argument("--no-caches", action="store_true",
                       help="preset only: skip diffusers' First Block Cache / TaylorSeer comparisons")
    bench.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run")
    bench.add_argument("--out", type=Path, default=Path("ras_bench"),
                       help="folder for the JSON, markdown and PNG results")

    # -- explain
    explain = commands.add_parser(
        "explain", parents=[debug], formatter_class=_HelpFormatter,
        help="print what the pass finds in a model: token source, rewritten attention, densified values, FLOPs",
        description="Capture a model on example inputs and print the pass's analysis: the token source, the "
                    "attention nodes that read cached K/V, gathered side inputs, what is densified and why, and "
                    "the FLOPs of a sparse step as a fraction of a dense one. Nothing is computed (fake tensors). "
                    "A model the pass refuses is reported with the node, the operator and the reason "
                    "(exit status 2).")
    explain.add_argument("--model", default="sd3", metavar="PRESET|PATH|ORG/NAME",
                         help=f"a preset ({', '.join(PRESETS)}), a local diffusers transformer folder, or a hub id")
    explain.add_argument("--subfolder", default=None,
                         help="subfolder holding the transformer (default: the root if it has config.json, else "
                              "'transformer')")
    explain.add_argument("--ratio", type=_ratio, default=0.5,
                         help="sample ratio at which the sparse step's FLOP fraction is counted")
    explain.add_argument("--latent", type=_positive_int, default=None,
                         help="latent height = width in latent pixels (default: the config's sample_size, capped "
                              "at 64)")
    explain.add_argument("--batch", type=_positive_int, default=2, help="batch size of the example inputs")
    explain.add_argument("--text-tokens", type=_positive_int, default=8, help="text tokens of the example inputs")
    explain.add_argument("--latent-arg", default=None,
                         help="forward argument holding the noisy latent (default: hidden_states, else the first)")
    explain.add_argument("--timestep-arg", default=None,
                         help="forward argument holding the timestep (default: timestep, timesteps or t)")
    explain.add_argument("--seed", type=int, default=0, help="seed of the preset weights and the example inputs")
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------------------- models


def _preset_sd3(seed: int):
    from .tiny_models import tiny_sd3_transformer
    return tiny_sd3_transformer(seed=seed)


def _preset_sd35(seed: int):
    from .tiny_models import tiny_sd3_transformer
    return tiny_sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0,), seed=seed)


def _preset_dit(seed: int):
    from .tiny_models import tiny_dit_transformer
    return tiny_dit_transformer(seed=seed)


def _preset_pixart(seed: int):
    from .tiny_models import tiny_pixart_transformer
    return tiny_pixart_transformer(seed=seed)


def _preset_reference(seed: int):
    model, trained, why = _reference_model(None, seed, quick=False)
    model.ras_cli_description = ("the reference DiT, trained weights" if trained
                                 else f"the reference DiT as a RANDOM-WEIGHT STAND-IN ({why})")
    return model


PRESETS: dict[str, tuple[str, Callable[[int], torch.nn.Module]]] = {
    "sd3": ("tiny random-weight SD3 transformer (MMDiT, joint text/image attention)", _preset_sd3),
    "sd3.5": ("tiny random-weight SD3.5-style transformer (q/k RMS norm, a dual-attention block)", _preset_sd35),
    "dit": ("tiny random-weight class-conditional DiT", _preset_dit),
    "pixart": ("tiny random-weight PixArt transformer (cross-attention to text)", _preset_pixart),
    "reference": ("the reference DiT of the demo (trained weights if shipped, else a random-weight stand-in)",
                  _preset_reference),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _reference_model(weights: Path | None, seed: int, quick: bool) -> tuple[torch.nn.Module, bool, str]:
    """(model, trained?, why it is a stand-in or where it came from)."""
    from .reference.model import WEIGHTS_DIR, build_reference_model, load_reference_model

    try:
        model = load_reference_model(weights)
        return model, True, f"trained weights from {weights or WEIGHTS_DIR}"
    except FileNotFoundError as exc:
        if weights is not None:  # the user named a folder: not finding it is an error, not a fallback
            raise
        overrides = {"num_layers": 2} if quick else {}
        model = build_reference_model(seed, init="diffusers", **overrides).eval()
        return model, False, str(exc).split(". ")[0]


def _hub_error_reason(exc: BaseException) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and there is no cached copy"
    cause = exc.__cause__ or exc.__context__
    text = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:200]


@contextlib.contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR):
    """Raise logger ``name``'s threshold to ``level`` for a while (the CLI reports problems in one line)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _quiet_hub():
    """huggingface_hub logs every retry of a failed download; the CLI reports one line instead."""
    return _quiet_logger("huggingface_hub")


def _hub_config(repo_id: str, subfolder: str | None) -> tuple[dict, str | None]:
    """The transformer's config.json from the hub (root, else 'transformer/'), and its subfolder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    candidates = [subfolder] if subfolder is not None else [None, "transformer"]
    last: BaseException | None = None
    with _quiet_hub():
        for sub in candidates:
            try:
                path = hf_hub_download(repo_id, "config.json", subfolder=sub)
                return json.loads(Path(path).read_text()), sub
            except LocalEntryNotFoundError as exc:  # offline, no connection, nothing cached
                raise CLIError(f"cannot reach the Hugging Face Hub to fetch {repo_id}: {_hub_error_reason(exc)}; "
                               "pass a local folder (a transformer saved with save_pretrained)") from exc
            except GatedRepoError as exc:
                raise CLIError(f"{repo_id} is gated on the Hugging Face Hub: accept its licence on its page and "
                               "log in (hf auth login), or pass a local folder") from exc
            except RepositoryNotFoundError as exc:
                raise CLIError(f"the Hugging Face Hub has no model {repo_id} (or it is private: log in with "
                               "hf auth login); check the id or pass a local folder") from exc
            except EntryNotFoundError as exc:
                last = exc
            except OSError as exc:  # connection errors of the HTTP client
                raise CLIError(f"cannot reach the Hugging Face Hub to fetch {repo_id}: {_hub_error_reason(exc)}; "
                               "pass a local folder (a transformer saved with save_pretrained)") from exc
    where = f"'{subfolder}/config.json'" if subfolder else "config.json nor transformer/config.json"
    raise CLIError(f"{repo_id} on the Hugging Face Hub has no {where}; pass --subfolder naming the folder of the "
                   "diffusers transformer") from last


def _local_config(folder: Path, subfolder: str | None) -> tuple[dict, str | None]:
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder; pass a folder written by save_pretrained (with config.json), "
                       "a hub id org/name, or a preset")
    candidates = [subfolder] if subfolder is not None else [None, "transformer"]
    for sub in candidates:
        path = folder / sub / "config.json" if sub else folder / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()), sub
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path} is not valid JSON ({exc})") from None
    where = f"{subfolder}/config.json" if subfolder else "config.json (nor transformer/config.json)"
    raise CLIError(f"{folder} has no {where}; pass the folder a diffusers transformer was saved to with "
                   "save_pretrained, or --subfolder")


def load_model(source: str, *, subfolder: str | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, presets: bool = True) -> tuple[torch.nn.Module, str]:
    """A model from a preset name, a local folder or a hub id; returns (model in eval mode, description)."""
    if presets and source in PRESETS:
        description, build = PRESETS[source]
        model = build(seed)
        description = model.__dict__.pop("ras_cli_description", description)
        return (model.to(dtype) if dtype != torch.float32 else model).eval(), description
    folder = Path(source).expanduser()
    if folder.exists():
        config, sub = _local_config(folder, subfolder)
        location, where = str(folder), f"folder {folder}"
    elif _HUB_ID.match(source):
        config, sub = _hub_config(source, subfolder)
        location, where = source, f"hub model {source}"
    else:
        known = f"a preset ({', '.join(PRESETS)}), " if presets else ""
        raise CLIError(f"no folder {source!r} and not a hub id (org/name); pass {known}a local folder or a hub id")
    import diffusers

    class_name = config.get("_class_name")
    if not class_name:
        raise CLIError(f"the config.json of {where} has no _class_name: it was not written by a diffusers "
                       "model's save_pretrained")
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module) and hasattr(cls, "from_pretrained")):
        raise CLIError(f"{where} is a {class_name}, which diffusers {diffusers.__version__} does not provide as a "
                       "model class (a pipeline? pass its transformer subfolder); upgrade diffusers or pass "
                       "another model")
    try:
        with _quiet_hub(), _quiet_logger("diffusers"):  # e.g. the advice to install accelerate, on every load
            model = cls.from_pretrained(location, subfolder=sub, torch_dtype=dtype)
    except (ValueError, OSError, RuntimeError) as exc:
        hint = "; pip install accelerate" if "low_cpu_mem_usage" in str(exc) else ""
        raise CLIError(f"diffusers could not load {class_name} from {where}: {_one_line(exc)}{hint}") from exc
    return model.eval(), f"{class_name} from {where}" + (f" (subfolder {sub})" if sub else "")


def default_latent(model: torch.nn.Module, cap: int | None = None) -> int:
    size = getattr(model.config, "sample_size", None) if hasattr(model, "config") else None
    if isinstance(size, (list, tuple)):
        size = size[0] if size else None
    size = size if isinstance(size, int) and size > 0 else 32
    return min(size, cap) if cap else size


def model_inputs(model: torch.nn.Module, *, batch: int, latent: int, text_tokens: int, seed: int,
                 where: str) -> dict:
    """Example forward kwargs built from the config (``tiny_models.example_inputs``), checked on fake tensors.

    Raises ``CLIError`` naming what is missing when the forward needs inputs that cannot be
    built from the config alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tiny_models import example_inputs

    patch = getattr(model.config, "patch_size", None)
    if isinstance(patch, int) and latent % patch:
        raise CLIError(f"--latent {latent} is not a multiple of the model's patch size {patch}")
    try:
        inputs = example_inputs(model, batch=batch, height=latent, width=latent, seed=seed, text_len=text_tokens)
    except Exception as exc:
        raise CLIError(f"cannot build example inputs for {where} from its config ({type(exc).__name__}: "
                       f"{_one_line(exc)}); call ras_compile.explain from Python with your own inputs") from exc
    params = inspect.signature(model.forward).parameters
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in inputs
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    built = ", ".join(k for k in inputs if k != "return_dict")
    if missing:
        raise CLIError(f"{where}'s forward needs {', '.join(missing)}, which ras-compile cannot build from the config "
                       f"(it builds {built}); call ras_compile.explain / ras_compile from Python with your own inputs")
    try:  # shapes only: nothing is computed, so this is cheap for a large model too
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), \
                _quiet_logger("torch._subclasses.fake_tensor", logging.CRITICAL):
            model(**inputs)
    except Exception as exc:
        raise CLIError(f"{where}'s forward fails on the example inputs built from its config ({built}): "
                       f"{type(exc).__name__}: {_one_line(exc)}; it probably needs other inputs: call "
                       "ras_compile.explain from Python with your own") from exc
    return inputs


# ------------------------------------------------------------------------------------------- explain


def run_explain(args) -> int:
    from . import RASPolicy
    from .explain import explain

    model, description = load_model(args.model, subfolder=args.subfolder, seed=args.seed)
    latent = args.latent or default_latent(model, cap=64)
    inputs = model_inputs(model, batch=args.batch, latent=latent, text_tokens=args.text_tokens, seed=args.seed,
                          where=description)
    print(f"{description}; example inputs: batch {args.batch}, latent {latent}x{latent}, "
          f"{args.text_tokens} text tokens where the model takes text")
    explain(model, inputs, RASPolicy(sample_ratio=args.ratio), ratio=args.ratio, latent_arg=args.latent_arg,
            timestep_arg=args.timestep_arg)
    return 0


# ------------------------------------------------------------------------------------------- progress


class _Progress:
    """tqdm when importable, else a plain counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self._bar, self.enabled = total, 0, None, enabled
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        self._label = text

    def update(self) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        elif self.count == self.total or self.count % 10 == 0:
            sys.stderr.write(f"\r{getattr(self, '_label', '')} {self.count}/{self.total} steps")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------------------- contention


# ------------------------------------------------------------------------------------------- demo


def _demo_labels(classes: Sequence[str] | None, quick: bool) -> torch.Tensor:
    from .reference.data import CLASS_NAMES

    if classes is None:
        classes = ["circle", "star"] if quick else list(CLASS_NAMES)
    labels = []
    for c in classes:
        if c.isdigit() and int(c) < len(CLASS_NAMES):
            labels.append(int(c))
        elif c in CLASS_NAMES:
            labels.append(CLASS_NAMES.index(c))
        else:
            raise CLIError(f"unknown class {c!r}: use one of {', '.join(CLASS_NAMES)} or an index 0-"
                           f"{len(CLASS_NAMES) - 1}")
    return torch.tensor(labels, dtype=torch.long)


def _generate(model, labels: torch.Tensor, steps: int, seed: int, guidance: float, config,
              after_step: Callable[[], None]) -> torch.Tensor:
    """``reference.sampling.sample`` with a hook after every model call (the loop is the same)."""
    from .reference.sampling import guided_velocity, initial_noise, make_scheduler

    x = initial_noise(labels.shape[0], config.in_channels, config.sample_size, seed)
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = guided_velocity(model, x, t, labels, guidance, null_class=config.num_embeds_ada_norm)
            after_step()
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def _heat_colours(fraction: torch.Tensor) -> torch.Tensor:
    """``[...]`` values in [0, 1] -> uint8 RGB ``[..., 3]`` on a dark-blue -> teal -> yellow ramp."""
    anchors = torch.tensor([[20, 20, 60], [40, 90, 150], [40, 160, 140], [150, 210, 80], [250, 230, 40]],
                           dtype=torch.float32)
    x = fraction.clamp(0, 1) * (len(anchors) - 1)
    low = x.floor().long().clamp(max=len(anchors) - 2)
    w = (x - low).unsqueeze(-1)
    return ((1 - w) * anchors[low] + w * anchors[low + 1]).round().to(torch.uint8)


def demo_grid_size(num_samples: int, num_ras: int, image_size: int = 32) -> tuple[int, int]:
    """(width, height) in pixels of the demo's PNG: a dense row, then an image and a heat-map row per ratio."""
    cell = image_size * DEMO_SCALE
    return (max(DEMO_MIN_WIDTH, DEMO_LABEL_WIDTH + num_samples * cell),
            DEMO_HEADER_HEIGHT + (1 + 2 * num_ras) * cell)


def draw_demo_grid(rows: list[dict], *, title: str, warning: str | None, image_size: int):
    """A PIL image: header (title, and ``warning`` in red), then per row a label and its cells.

    Each row is ``{"label": str, "images": [n, 3, H, W] in [-1, 1]}`` or ``{"label": str,
    "heat": [n, gh, gw] fractions in [0, 1]}``."""
    from PIL import Image, ImageDraw

    from .reference.images import to_uint8

    n = next(len(r.get("images", r.get("heat"))) for r in rows)
    cell = image_size * DEMO_SCALE
    num_ras = sum("heat" in r for r in rows)
    width, height = demo_grid_size(n, num_ras, image_size)
    assert len(rows) == 1 + 2 * num_ras
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), title, fill=(0, 0, 0))
    if warning:
        draw.rectangle((0, 22, width, DEMO_HEADER_HEIGHT - 2), fill=(200, 30, 30))
        draw.text((6, 26), warning, fill=(255, 255, 255))
    for i, row in enumerate(rows):
        top = DEMO_HEADER_HEIGHT + i * cell
        draw.multiline_text((6, top + 6), row["label"], fill=(0, 0, 0), spacing=3)
        if "images" in row:
            tiles = to_uint8(row["images"]).permute(0, 2, 3, 1)  # [n, H, W, 3]
        else:
            tiles = _heat_colours(row["heat"])                   # [n, gh, gw, 3]
        for j, tile in enumerate(tiles):
            picture = Image.fromarray(tile.contiguous().numpy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(picture, (DEMO_LABEL_WIDTH + j * cell, top))
    return canvas


def _psnr_text(values: torch.Tensor) -> str:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return "inf (identical)"
    return f"{finite.mean().item():.1f}" + (" (some identical)" if finite.numel() < values.numel() else "")


def run_demo(args) -> int:
    from . import RASPolicy, ras_compile
    from .reference.data import class_name
    from .reference.metrics import psnr, ssim

    steps = args.steps or (8 if args.quick else 28)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup, resets = scaled_plan(steps)
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    if args.reset_steps is not None:
        resets = tuple(args.reset_steps)
    labels = _demo_labels(args.classes, args.quick)
    if args.out.suffix.lower() != ".png":
        raise CLIError(f"--out {args.out} must end in .png")
    if args.out.parent and not args.out.parent.exists():
        raise CLIError(f"the folder of --out {args.out} does not exist; create it or pick another path")

    model, trained, why = _reference_model(args.weights, args.seed, args.quick)
    config = model.config
    n, image_size, patch = labels.shape[0], config.sample_size, config.patch_size
    grid_side = image_size // patch
    num_tokens = grid_side * grid_side
    layers = config.num_layers
    if trained:
        print(f"reference DiT: {why}")
        warning = None
    else:
        print(f"NOTE: {why}. Using a RANDOM-WEIGHT STAND-IN ({layers} layers, diffusers' default init): the images "
              "are not trained samples; only the timings, the differences from dense and the heat maps mean "
              "something.")
        warning = "RANDOM-WEIGHT STAND-IN: no trained reference weights found, these are not real samples"
    print(f"{n} images ({', '.join(class_name(int(c)) for c in labels)}), {image_size}x{image_size} pixels, "
          f"patch {patch}: {num_tokens} tokens per image; {steps} steps, guidance {args.guidance:g}; "
          f"RAS dense steps: warm-up {warmup}, resets {', '.join(map(str, resets)) or 'none'}; backend "
          f"{args.backend}; {torch.get_num_threads()} CPU threads", flush=True)

    stacked = f"+sc{args.step_cache_interval}" if args.step_cache_interval > 1 else ""
    configs: list[tuple[str, float | None]] = [("dense", None)] + [(f"RAS r={r:g}{stacked}", r) for r in args.ratios]
    progress = _Progress(len(configs) * (1 + repeats) * steps, enabled=not args.no_progress)
    results = []
    try:
        for name, ratio in configs:
            if ratio is None:
                runner, controller = torch.compile(model, backend=args.backend), None
            else:
                policy = RASPolicy(sample_ratio=ratio, warmup_steps=warmup, reset_steps=resets, num_steps=steps,
                                   step_cache_interval=args.step_cache_interval)
                runner = ras_compile(model, policy, backend=args.backend)
                controller = runner.ras_controller
            counts = torch.zeros(n, num_tokens)

            def after_step():
                progress.update()
                if controller is None:
                    return
                mode = controller.stats[-1].mode
                if mode == "predicted":  # a step cache ran no token
                    return
                if mode == "dense" or controller.last_index is None:
                    counts.add_(1)
                else:  # the active tokens of this step; with guidance the first n rows are the conditional half
                    index = controller.last_index[:n].cpu()
                    counts.scatter_add_(1, index, torch.ones(index.shape))

            best, first, other = math.inf, None, None
            bound = 1.0 if ratio is None else flop_bound_speedup(policy, steps, num_tokens)
            for g in range(1 + repeats):
                progress.describe(f"{name} ({'compiling' if g == 0 else 'timed'})")
                counts.zero_()
                cpu_before, start = cpu_seconds(), time.perf_counter()
                images = _generate(runner, labels, steps, args.seed, args.guidance, config, after_step)
                elapsed = time.perf_counter() - start
                if g == 0:
                    first = elapsed
                elif elapsed < best:
                    best, other = elapsed, other_cpu_cores(cpu_before, cpu_seconds(), elapsed)
            plan = ""
            if controller is not None:
                modes = [s.mode for s in controller.stats]
                plan = f"{modes.count('dense')}D {modes.count('sparse')}S" + \
                    (f" {modes.count('predicted')}P" if "predicted" in modes else "")
            results.append(dict(name=name, ratio=ratio, images=images, seconds=best, first=first, bound=bound,
                                counts=counts.clone(), plan=plan or f"{steps}D", contended=contended(other, torch.get_num_threads())))
    finally:
        progress.close()

    dense = results[0]
    rows = [{"label": f"dense\n{dense['seconds']:.2f} s", "images": dense["images"]}]
    for r in results[1:]:
        r["psnr"] = psnr(r["images"], dense["images"])
        r["ssim"] = ssim(r["images"], dense["images"])
        rows.append({"label": f"{r['name']}\n{r['seconds']:.2f} s\n{dense['seconds'] / r['seconds']:.2f}x\n"
                              f"PSNR {_psnr_text(r['psnr'])} dB", "images": r["images"]})
        rows.append({"label": f"{r['name']}: steps each\ntoken was computed\n(dark {int(r['counts'].min())}, "
                              f"bright {steps}\nof {steps} steps)",
                     "heat": (r["counts"] / steps).view(n, grid_side, grid_side)})
    title = f"ras-compile demo: reference DiT, {steps} steps, {args.backend}; " + \
        " ".join(class_name(int(c)) for c in labels)
    if len(title) > 95:
        title = title[:92] + "..."
    canvas = draw_demo_grid(rows, title=title, warning=warning, image_size=image_size)
    canvas.save(args.out)

    print()
    header = f"{'configuration':<14} {'steps':>11} {'time (s)':>9} {'speed-up':>9} {'FLOP bound':>11} " \
             f"{'PSNR vs dense (dB)':>19} {'SSIM':>6}   first generation (compiles)"
    print(header)
    print("-" * len(header))
    for r in results:
        speed = dense["seconds"] / r["seconds"]
        p = _psnr_text(r["psnr"]) if "psnr" in r else "-"
        s = f"{r['ssim'].mean().item():.3f}" if "ssim" in r else "-"
        print(f"{r['name']:<14} {r['plan']:>11} {r['seconds']:>9.2f} {speed:>8.2f}x {r['bound']:>10.2f}x {p:>19} "
              f"{s:>6}   {r['first']:.1f} s" + ("   (!) contended" if r["contended"] else ""))
    print(f"\nspeed-up: dense time / time, both through torch.compile backend={args.backend} in this run "
          f"(best of {repeats} after one untimed generation); FLOP bound: the speed-up if time followed the "
          "transformer's FLOPs (a measured speed-up far above it means the timings are noise: raise --repeats); "
          "PSNR and SSIM: RAS images vs the dense images from the same noise.")
    if any(r["contended"] for r in results):
        print("(!) other processes kept the CPU busy while these were timed: their times are not trustworthy; "
              "rerun on a quiet machine, or with fewer torch threads (OMP_NUM_THREADS) to leave a core free.")
    if args.backend != "inductor":
        print(f"backend {args.backend} does not generate fused kernels: use --backend inductor to measure speed.")
    if not trained:
        print("These numbers come from a RANDOM-WEIGHT STAND-IN, not the trained reference model.")
    print(f"wrote {args.out} ({canvas.width}x{canvas.height})")
    return 0


# ------------------------------------------------------------------------------------------- bench


def _bench_speed_module():
    """``benchmarks/bench_speed.py`` of the source checkout this package runs from, imported by path."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_speed.py"
    if not path.is_file():
        raise CLIError("the preset benchmark needs benchmarks/bench_speed.py from a source checkout of ras-compile "
                       "(pip install -e .); pass --model PATH to benchmark a model instead")
    name = "ras_compile_bench_speed"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, as a normal import does (dataclasses, pickling look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_bench_preset(args) -> int:
    bench = _bench_speed_module()
    argv = ["--out", str(args.out), "--backend", args.backend, "--device", args.device, "--dtype", args.dtype,
            "--seed", str(args.seed)]
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--latent", args.latent),
                        ("--batch", args.batch), ("--text-tokens", args.text_tokens), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if args.ratios:
        argv += ["--ratios", *map(str, args.ratios)]
    if args.quick:
        argv.append("--quick")
    if args.no_caches:
        argv.append("--no-caches")
    if args.subfolder is not None:
        raise CLIError("--subfolder needs --model")
    args.out.mkdir(parents=True, exist_ok=True)
    # bench_speed points Inductor at a temporary cache in-process; put the caller's settings back afterwards
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    try:
        return int(bench.main(argv) or 0)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _latent_and_timestep_args(model) -> tuple[str, str | None]:
    from .runtime import TIMESTEP_NAMES

    params = list(inspect.signature(model.forward).parameters)
    latent = "hidden_states" if "hidden_states" in params else params[0]
    return latent, next((n for n in TIMESTEP_NAMES if n in params), None)


def _model_loop(model, inputs: dict, steps: int, device: str, latent_arg: str, timestep_arg: str | None,
                after_step: Callable[[], str]) -> tuple[torch.Tensor, list[float], list[str]]:
    """A flow-matching Euler loop over ``model``; every call timed (synchronised on CUDA)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, device=device)
    latents = inputs[latent_arg]
    batch = latents.shape[0]
    sync = device.startswith("cuda")
    times, labels = [], []
    for t in scheduler.timesteps:
        call = dict(inputs)
        call[latent_arg] = latents
        if timestep_arg is not None:
            call[timestep_arg] = t.expand(batch)
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(**call)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        label = after_step()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        labels.append(label)
        if out.shape != latents.shape:  # e.g. DiT's learned variance: keep the channels of the latent
            if out.dim() != latents.dim() or out.shape[1] < latents.shape[1]:
                raise CLIError(f"the model's output {list(out.shape)} does not match its latent "
                               f"{list(latents.shape)}; the benchmark's sampling loop cannot step it")
            out = out[:, :latents.shape[1]]
        latents = scheduler.step(out.to(latents.dtype), t, latents, return_dict=False)[0]
    return latents, times, labels


def _machine(device: str) -> dict:
    import diffusers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


def run_bench_model(args) -> int:
    from . import RASPolicy, explain, ras_compile

    if args.no_caches:
        raise CLIError("--no-caches applies to the preset benchmark only (without --model)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, description = load_model(args.model, subfolder=args.subfolder, seed=args.seed, dtype=dtype,
                                    presets=False)
    model = model.to(args.device)
    latent = args.latent or default_latent(model, cap=16 if args.quick else None)
    batch = args.batch or 2
    text_tokens = args.text_tokens or (16 if args.quick else 77)
    steps = args.steps or (6 if args.quick else 28)
    repeats = args.repeats or (1 if args.quick else 3)
    ratios = args.ratios or ([0.5] if args.quick else [0.5, 0.25])
    warmup, resets = scaled_plan(steps)
    inputs = model_inputs(model, batch=batch, latent=latent, text_tokens=text_tokens, seed=args.seed,
                          where=description)
    inputs = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    latent_arg, timestep_arg = _latent_and_timestep_args(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"{description}: {params / 1e6:.2f} M parameters, {args.dtype}, {args.device}")
    print(f"inputs: batch {batch}, latent {latent}x{latent}, {text_tokens} text tokens where taken; {steps} steps; "
          f"RAS warm-up {warmup}, resets {list(resets)}; backend {args.backend}; best of {repeats} after a warm-up",
          flush=True)

    configs: list[tuple[str, float | None]] = [("eager", None), ("compiled", None)]
    configs += [(f"ras_r{r:g}", r) for r in ratios]
    results = []
    progress = _Progress(len(configs) * (1 + repeats) * steps)
    try:
        for name, ratio in configs:
            progress.describe(name)
            result: dict[str, Any] = {"config": name, "ratio": ratio}
            controller = None
            if name == "eager":
                runner = model
            elif name == "compiled":
                runner = torch.compile(model, backend=args.backend)
            else:
                policy = RASPolicy(sample_ratio=ratio, warmup_steps=warmup, reset_steps=resets, num_steps=steps)
                runner = ras_compile(model, policy, backend=args.backend)
                controller = runner.ras_controller
                result["policy"] = repr(policy)

            def after_step() -> str:
                progress.update()
                return controller.stats[-1].mode if controller is not None else "dense"

            generations = []
            with torch.no_grad():
                for _ in range(1 + repeats):
                    start = time.perf_counter()
                    final, times, labels = _model_loop(runner, inputs, steps, args.device, latent_arg,
                                                       timestep_arg, after_step)
                    generations.append((time.perf_counter() - start, times, labels))
            timed = generations[1:]
            best = min(timed, key=lambda g: g[0])
            result.update(first_generation_s=generations[0][0], steady_s=best[0],
                          compile_s=generations[0][0] - best[0], step_labels=best[2])
            for label in sorted(set(best[2])):
                result[f"{label}_step_ms"] = 1e3 * statistics.median(
                    t for g in timed for t, l in zip(g[1], g[2]) if l == label)
            if controller is not None:
                result["active_tokens"] = [s.active_tokens for s in controller.stats]
                result["sparse_flop_fraction"] = explain(model, inputs, policy, ratio=ratio,
                                                         verbose=False).flop_fraction
            result["final"] = final.float().cpu()
            results.append(result)
    finally:
        progress.close()

    reference = next(r for r in results if r["config"] == "compiled")
    for r in results:
        r["speedup_vs_compiled"] = reference["steady_s"] / r["steady_s"]
        r["max_abs_diff_vs_compiled"] = (r["final"] - reference["final"]).abs().max().item()
    for r in results:
        r.pop("final")
    source = Path(args.model).expanduser()
    report = {"name": _safe_name(source.resolve().name if source.exists() else args.model.replace("/", "__")), "model": description, "parameters": params,
              "machine": _machine(args.device),
              "run": dict(batch=batch, latent=latent, text_tokens=text_tokens, steps=steps, repeats=repeats,
                          warmup_steps=warmup, reset_steps=list(resets), backend=args.backend, dtype=args.dtype,
                          ratios=ratios, quick=args.quick, sampler="FlowMatchEulerDiscreteScheduler(shift=3.0)"),
              "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / report["name"]
    Path(f"{base}.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = bench_markdown(report)
    Path(f"{base}.md").write_text(markdown)
    print("\n" + markdown)
    print(f"wrote {base}.json and {base}.md")
    print(bench_plot(report, Path(f"{base}.png")))
    return 0


def bench_markdown(report: dict) -> str:
    m, run = report["machine"], report["run"]
    lines = [
        f"# RAS speed benchmark: {report['model']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else ""),
        f"- software: Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}; {m['date']}",
        f"- model: {report['parameters'] / 1e6:.2f} M parameters, {run['dtype']}; random example inputs from the "
        f"config: batch {run['batch']}, latent {run['latent']}x{run['latent']}, {run['text_tokens']} text tokens",
        f"- loop: {run['steps']} steps of {run['sampler']}; RAS dense steps: warm-up {run['warmup_steps']}, resets "
        f"{', '.join(map(str, run['reset_steps'])) or 'none'}; backend {run['backend']}; best of {run['repeats']} "
        "timed generations after one warm-up (it compiles)",
        "",
        "| configuration | steps | first gen (s) | steady (s) | dense step (ms) | sparse step (ms) | "
        "speed-up vs compiled | sparse-step FLOP fraction | max abs diff vs compiled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        labels = r["step_labels"]
        plan = " ".join(f"{labels.count(k)}{k[0].upper()}" for k in ("dense", "sparse", "fallback") if k in labels)
        fraction = r.get("sparse_flop_fraction")
        sparse = r.get("sparse_step_ms")
        lines.append(f"| {r['config']} | {plan} | {r['first_generation_s']:.2f} | {r['steady_s']:.3f} | "
                     f"{r.get('dense_step_ms', float('nan')):.1f} | {'—' if sparse is None else f'{sparse:.1f}'} | "
                     f"{r['speedup_vs_compiled']:.2f}x | {'—' if fraction is None else f'{fraction:.3f}'} | "
                     f"{r['max_abs_diff_vs_compiled']:.2e} |")
    lines += ["", "Columns: *steps* D dense, S sparse, F fallback (the pass refused the model and ran it dense); "
                  "*steady* best whole-loop time; *dense/sparse step* median time of one model call of that kind "
                  "(RAS: with the token selection after it); *sparse-step FLOP fraction* FLOPs of one sparse step "
                  "over a dense one, counted by ras_compile.explain; *max abs diff* max |final latent - compiled "
                  "dense final latent|. Random inputs: the numbers measure speed, not image quality."]
    return "\n".join(lines) + "\n"


def bench_plot(report: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ras = sorted((r for r in report["results"] if r["ratio"] is not None), key=lambda r: r["ratio"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["ratio"] for r in ras], [r["speedup_vs_compiled"] for r in ras], "o-", label="RAS vs compiled dense")
    bounds = [(r["ratio"], 1 / r["sparse_flop_fraction"]) for r in ras if r.get("sparse_flop_fraction")]
    if bounds:
        ax.plot(*zip(*bounds), "x--", color="k", label="1 / sparse-step FLOP fraction")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("RAS sample_ratio")
    ax.set_ylabel("speed-up")
    ax.set_title(report["model"][:70], fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def run_bench(args) -> int:
    return run_bench_model(args) if args.model is not None else run_bench_preset(args)


# ------------------------------------------------------------------------------------------- main


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".") or type(exc).__name__


COMMANDS = {"demo": run_demo, "bench": run_bench, "explain": run_explain}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ras-compile`` and ``python -m ras_compile``; returns the exit status."""
    from .errors import RASError, UnsupportedModelError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a one-line usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    debug = getattr(args, "debug", False)
    if args.command is None:
        sys.stderr.write(f"{PROG}: error: choose a command: demo, bench or explain (see {PROG} --help)\n")
        return EXIT_USAGE
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, CLIError):
            message, status = _one_line(exc), EXIT_USAGE
        elif isinstance(exc, UnsupportedModelError):
            message, status = _one_line(exc), EXIT_USAGE
        elif isinstance(exc, (RASError, FileNotFoundError, ValueError)):
            message, status = _one_line(exc), EXIT_USAGE
        elif isinstance(exc, OSError):
            message, status = f"{type(exc).__name__}: {_one_line(exc)}", EXIT_FAILURE
        else:
            message, status = f"unexpected {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the " \
                              "traceback)", EXIT_FAILURE
        sys.stderr.write(f"{PROG} {args.command}: error: {message}\n")
        return status


if __name__ == "__main__":
    sys.exit(main())
