"""How the commands a message tells the user are spelled, which depends on how the user got the
package: pip-installed it is ``ghostnet_hub`` and has the ``ghostnet-hub`` command; under any other
name (``models`` in a clone, torch.hub's private name for its checkout) it is a clone, whose
command is ``python -m models`` from the clone's root and whose extras are requirements files."""
from __future__ import annotations

import pathlib

_INSTALLED = __name__.split(".")[0] == "ghostnet_hub"
_CLONE_ROOT = pathlib.Path(__file__).resolve().parent.parent


def command(args: str = "") -> str:
    """The command line that runs ``args`` (``"prefetch tinynet_e"``) for this copy of the package."""
    program = "ghostnet-hub" if _INSTALLED else "python -m models"
    return f"{program} {args}".rstrip()


def install(extra: str) -> str:
    """The command that installs the optional dependencies of ``extra`` (``export``, ``deploy``);
    in a clone also its requirements file, named as the user can type it from where they are."""
    hint = f'pip install "ghostnet-hub[{extra}]"'
    requirements = _CLONE_ROOT / f"requirements-{extra}.txt"
    if _INSTALLED or not requirements.is_file():
        return hint
    try:  # relative to where the user is, when it is inside the clone
        name = requirements.relative_to(pathlib.Path.cwd().resolve())
    except (ValueError, OSError):
        name = requirements
    return f"{hint} (in this clone: pip install -r {name})"
