"""docs/cli.md's reference part, generated from the command line's own argparse definitions
(``models.tools.cli.build_parser``), so that the page cannot drift from the commands.

    python docs/cli_reference.py          # rewrite docs/cli.md below its <!-- cli:generated --> line
    python docs/cli_reference.py --check  # exit status 1 if docs/cli.md is not what this writes now

Everything above the marker is written by hand; tests/test_docs.py fails when the part below it
differs from ``reference()``.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "cli.md"
MARKER = "<!-- cli:generated -->"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            metavar = "" if action.nargs == 0 else " " + formatter._format_args(action, action.dest.upper())
            name = ", ".join(action.option_strings) + metavar
        else:
            name = formatter._format_args(action, action.dest)
        help_text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            help_text += " (required)"
        rows.append(f"| `{_cell(name)}` | {_cell(help_text)} |")
    return ["| argument | |", "|---|---|", *rows] if rows else []


def _section(words: list[str], parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} {' '.join(words)}", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines += [f"`{usage}`", ""]
    table = _arguments(parser)
    if table:
        lines += [*table, ""]
    for name, sub in _subcommands(parser):
        lines += _section([*words, name], sub, level + 1 if level < 3 else level)
    return lines


def reference() -> str:
    """The generated part of docs/cli.md: one section per command, from the parser."""
    sys.path.insert(0, str(ROOT))
    from models.tools.cli import build_parser

    parser = build_parser(prog="ghostnet-hub")
    lines = ["## Reference", "",
             "Generated from the commands' argparse definitions by `python docs/cli_reference.py`; "
             "`ghostnet-hub COMMAND --help` prints the same.", ""]
    lines += [f"`{' '.join(parser.format_usage().removeprefix('usage: ').split())}`", ""]
    lines += _arguments(parser) + [""]
    for name, sub in _subcommands(parser):
        lines += _section([name], sub, 3)
    return "\n".join(lines).rstrip() + "\n"


def page() -> str:
    """docs/cli.md as it should be: the hand-written part, the marker, the reference."""
    written = PAGE.read_text().split(MARKER, 1)[0]
    return f"{written}{MARKER}\n\n{reference()}"


if __name__ == "__main__":
    expected = page()
    if sys.argv[1:] == ["--check"]:
        if PAGE.read_text() != expected:
            sys.exit("docs/cli.md is stale: run python docs/cli_reference.py")
    else:
        PAGE.write_text(expected)
