"""What the commands' argument parsers share: ``--manifest``, the model's weights
(published, or ``--checkpoint``), number checks, and the options that mean the same in every
command that has them (``--json``, ``--amp``/``--amp-dtype``): defined once, here."""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from .. import api
from ..weights import Weights, get_weights


def add_command(group, name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that runs ``func(args)`` and takes ``--manifest``."""
    sub = group.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(func=func)
    sub.add_argument("--manifest", help="manifest file (default: $GHOSTNET_HUB_MANIFEST or weights_manifest.json)")
    return sub


def json_argument(sub: argparse.ArgumentParser, what: str) -> None:
    """``--json FILE``: ``what`` as JSON into FILE, or with ``-`` on standard output in place of
    the text. A FILE that exists and is not JSON (``--json photo.jpg``: an image taken for the
    file) is refused rather than overwritten."""
    sub.add_argument("--json", metavar="FILE", type=_json_target,
                     help=f"write {what} as JSON to FILE (-: to standard output, instead of the text)")


def _json_target(value: str) -> str:
    path = pathlib.Path(value)
    if value != "-" and path.exists() and (not path.is_file() or path.suffix.lower() not in (".json", ".jsonl")):
        raise argparse.ArgumentTypeError(f"{value} exists and is not a .json/.jsonl file: --json takes the file to "
                                         "write (- for standard output), not an input")
    return value


def write_json(target: str, data: Any) -> None:
    """``data`` as indented JSON to ``target`` (a ``--json`` value: a file, or ``-``)."""
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        pathlib.Path(target).write_text(text)


def amp_arguments(sub: argparse.ArgumentParser) -> None:
    """``--amp`` (autocast in the device's half precision) and ``--amp-dtype`` (another one)."""
    sub.add_argument("--amp", action="store_true",
                     help="mixed precision (autocast): bfloat16 on CPU, float16 on CUDA")
    sub.add_argument("--amp-dtype", choices=("bfloat16", "float16"), help="with --amp: this autocast dtype instead")


def amp_dtype(amp: bool, dtype: str | None, device_type: str) -> str | None:
    """The autocast dtype that ``--amp`` and ``--amp-dtype`` ask for on ``device_type`` (the
    device's half precision unless named), or None (no autocast)."""
    if dtype and not amp:
        raise ValueError("--amp-dtype applies to --amp: pass both")
    if not amp:
        return None
    return dtype or ("float16" if device_type == "cuda" else "bfloat16")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def real_in(low: float, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Callable[[str | float], float]:
    """A parser of a finite real number in [low, high] (an end left out with ``*_open``;
    no ``high``: unbounded). NaN and infinity are refused: they would pass as numbers and
    turn a run into NaN."""
    span = (("(" if low_open else "[") + f"{low:g}, " + (f"{high:g}" if high is not None else "inf")
            + (")" if high_open or high is None else "]"))

    def parse(text: str | float) -> float:
        try:
            value = float(text) if not isinstance(text, bool) else math.nan
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (
                high is not None and (value > high or (high_open and value == high))):
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value
    return parse


def check_numbers(options: dict[str, Any], parsers: dict[str, Callable[[Any], float]]) -> None:
    """The Python API's numbers through the parsers the command line uses (a ``ValueError``
    naming the option); each value becomes what its parser returns."""
    for name, parse in parsers.items():
        if options.get(name) is not None:
            try:
                options[name] = parse(options[name])
            except argparse.ArgumentTypeError as exc:
                raise ValueError(f"{name} {exc}") from None


class _Renamed(argparse.Action):
    """An option that was renamed: using it is an error naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new} (your own checkpoint file or URL)")


def model_source_arguments(sub: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (any model, your weights) instead of the published weights."""
    sub.add_argument("--checkpoint", metavar="FILE|URL",
                     help="your checkpoint (e.g. fine-tuned) instead of the published weights; any model")
    sub.add_argument("--checkpoint-sha256", metavar="HEX", help="the SHA-256 the --checkpoint file must have")
    sub.add_argument("--num-classes", type=int_at_least(1), default=None,
                     help="classes of --checkpoint (default: 1000)")
    sub.add_argument("--weights", action=_Renamed, new="--checkpoint")


def published_weights(args: argparse.Namespace) -> Weights | None:
    """The published weights that ``args`` ask for: None with ``--checkpoint``; an error for
    a model that has none, which points at ``--checkpoint``."""
    if args.checkpoint:
        return None  # the model is checked where the file is read (finetune's files name their own)
    if args.model not in api.list_models():
        raise ValueError(f"unknown model {args.model!r}; models: {', '.join(api.list_models())}")
    for option, value in (("--checkpoint-sha256", args.checkpoint_sha256), ("--num-classes", args.num_classes)):
        if value is not None:
            raise ValueError(f"{option} applies to the file given with --checkpoint; none was given")
    try:
        return get_weights(args.model, args.manifest)
    except ValueError as exc:
        raise ValueError(f"{exc}; pass --checkpoint FILE to use weights of your own") from None


def build_model(args: argparse.Namespace, **options: Any):
    """The eager model ``args`` ask for: ``args.checkpoint`` (read once; a checkpoint written by
    ``finetune`` names its model, class names and preprocessing, and ``--model``/``--num-classes``
    must agree with it), else ``args.model`` with its published weights from ``args.manifest``.
    ``args.model`` is set to the model built."""
    if args.checkpoint:
        model = api.from_checkpoint(args.checkpoint, model=args.model, checkpoint_sha256=args.checkpoint_sha256,
                                    num_classes=args.num_classes, **options)
    else:
        if args.model is None:
            raise ValueError("--model is needed (a checkpoint or exported file written by this package names its "
                             "model; nothing else does)")
        model = api.get_model(args.model, weights=published_weights(args), **options)
    args.model = model.pretrained_cfg["architecture"]
    return model
