"""What every command's argument parser shares: the ``--manifest`` option and number checks."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def add_command(group, name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that runs ``func(args)`` and takes ``--manifest``."""
    sub = group.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(func=func)
    sub.add_argument("--manifest", help="manifest file (default: $GHOSTNET_HUB_MANIFEST or weights_manifest.json)")
    return sub


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse
