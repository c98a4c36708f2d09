"""What many test files share: the repository root, running ``python -m models``, as a
user does (a subprocess) or in this process (``cli``, seconds faster per call), the README's and
docs/ pages' text (``doc``, ``DOCS``), their command lines as they run in this clone or in a
pip-installed venv (``readme_argv``), and what a run builds once for all its workers (``built_once``)."""
import contextlib
import io
import itertools
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the README's `ghostnet-hub` is in this clone, where the package is not installed.
MODELS = [sys.executable, "-m", "models"]


def doc(name="README"):
    """The text of README.md (``"README"``) or of the documentation page docs/NAME.md, where the
    tests read the commands, code and tables they run and check."""
    return (ROOT / "README.md" if name == "README" else ROOT / "docs" / f"{name}.md").read_text()


def doc_pages():
    """README.md and every page under docs/, by name ("README", "using", ...)."""
    return ["README", *sorted(p.stem for p in (ROOT / "docs").glob("*.md"))]


# Everything the documentation says: README.md and every docs/ page, for what may be anywhere in it.
DOCS = "\n".join(doc(name) for name in doc_pages())


def copy_working_tree(target):
    """This repository's files as the working tree has them (committed, and not yet committed
    but not ignored), copied under ``target``; returns ``target``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target / rel)
    return target


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


def readme_argv(line, installed=None):
    """The argv that runs a README command line (a string, or its words) as written.

    In this clone (the default) ``ghostnet-hub ARGS`` is ``python -m models ARGS`` (run it from
    ROOT or with ROOT on PYTHONPATH) and ``python`` is this interpreter; with ``installed`` (the
    ``installed`` fixture's venv) they are the venv's console script and python. ``torchrun``
    runs as ``python -m torch.distributed.run``, and the program after its ``--no-python`` is
    mapped the same way; leading ``NAME=value`` words (the environment, as a shell sets it for
    one command) run it through ``env``. A line that starts with any other program fails the test."""
    words = shlex.split(line, comments=True) if isinstance(line, str) else list(line)
    assert words, f"an empty README command line: {line!r}"
    if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        settings = list(itertools.takewhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w), words))
        return ["env", *settings, *readme_argv(words[len(settings):], installed)]
    program, args = words[0], words[1:]
    python = str(installed.python) if installed else sys.executable
    if program == "ghostnet-hub":
        return [str(installed.bin / "ghostnet-hub")] + args if installed else MODELS + args
    if program in ("python", "python3", ".venv/bin/python"):
        return [python, *args]
    if program == "torchrun":
        if "--no-python" in args:
            at = args.index("--no-python") + 1
            assert at < len(args), f"torchrun --no-python without a program: {line!r}"
            args[at:at + 1] = readme_argv(args[at:at + 1], installed)
        return [python, "-m", "torch.distributed.run", *args]
    raise AssertionError(f"a README command starts with {program!r}, which the tests cannot run: {line!r}")


def readme_cli(line, *extra, env=None):
    """A README ``ghostnet-hub ...`` command line run in this process (``cli``), ``extra``
    arguments appended."""
    argv = readme_argv(line)
    assert argv[:len(MODELS)] == MODELS, f"not a ghostnet-hub command: {line!r}"
    return cli(*argv[len(MODELS):], *extra, env=env)


def run_checked(command, **kwargs):
    """``command`` in a subprocess without this checkout on PYTHONPATH (as a user outside the
    clone runs it), output as text; fails the test unless it exits 0. ``env`` adds to the
    environment."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | kwargs.pop("env", {})
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


# The imagefolder fixture's classes (the first three ImageNet classes, by WordNet id: indices
# 0, 1, 2) and its readable images per class: 7, an odd number.
CLASSES = {"n01440764": 0, "n01443537": 1, "n01484850": 2}
PER_CLASS = {"n01440764": 3, "n01443537": 2, "n01484850": 2}


def built_once(tmp_path_factory, name, build):
    """A folder that ``build(folder)`` fills once per test run, shared by pytest-xdist's workers.

    A session fixture runs once per worker process: a model trained or exported there was made
    twice when the tests that use it were split over the two workers. The folder lies in the
    run's temporary root (the workers' basetemps are ``<root>/popen-gwN``; a run without xdist
    uses its basetemp), which pytest makes afresh for each run; a file lock makes the second
    worker wait for the first one's build, then read it. A build that failed is tried again."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / f"built-once-{name}"
    done = folder / ".done"
    with FileLock(f"{folder}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def marked_slow(names, slow):
    """``names`` as a test's parameters, those also in ``slow`` marked slow: the full run checks
    them, the fast loop does not."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]
