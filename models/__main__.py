import sys

from .tools.cli import main

# `python -m models` in a clone, `python -m ghostnet_hub` installed: --help says what was typed.
sys.exit(main(prog=f"python -m {__package__}"))
