"""What many test files share: the repository root and running ``python -m models``, as a
user does (a subprocess) or in this process (``cli``, seconds faster per call)."""
import contextlib
import io
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_models(*args, env=None, launcher=None, timeout=300, **kwargs):
    """``python -m models ARGS`` from the repository root, output captured as text.
    ``env`` adds to (or overrides) this process's environment; ``launcher`` replaces
    ``python`` (e.g. torchrun's ``python -m torch.distributed.run ...``)."""
    command = [*(launcher or [sys.executable]), "-m", "models", *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def cli(*args, env=None):
    """``python -m models ARGS`` run in this process (the same ``main`` the command runs),
    for tests that check what a command does rather than how Python starts it; returns
    what ``run_models`` returns: ``returncode``, ``stdout``, ``stderr``. ``env`` is set for
    the call and restored after."""
    from models.tools.cli import main

    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse errors and SystemExit("error: ...")
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                    code = 1
                else:
                    code = exc.code or 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["models", *args], code, out.getvalue(), err.getvalue())
