"""The package as users install it: `pip install "ghostnet-hub @ git+<repo>"` (the README's
command, pointed at a git repository made from this working tree) into a fresh virtual
environment (the ``installed`` fixture, tests/conftest.py), then used from outside the checkout,
next to a `models` package of the user's own.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import textwrap

import pytest

import models

from helpers import ROOT, doc, readme_argv, run_checked, run_models
from reference import PRETRAINED

pytestmark = pytest.mark.slow  # git, pip and new Python processes: about 20 s

TABBY = 281


def test_installed_under_its_own_name_beside_the_users_models(installed):
    python, _, project = installed
    code = textwrap.dedent("""
        import importlib.metadata, json, sys
        import models, ghostnet_hub
        from ghostnet_hub.manifest import DEFAULT_MANIFEST, load_manifest
        print(json.dumps({
            "mine": models.MINE, "file": ghostnet_hub.__file__, "version": ghostnet_hub.__version__,
            "metadata": importlib.metadata.version("ghostnet-hub"),
            "requires": importlib.metadata.requires("ghostnet-hub"),
            "files": [str(f) for f in importlib.metadata.files("ghostnet-hub")],
            "manifest": str(DEFAULT_MANIFEST), "released": list(load_manifest().models),
            "listed": ghostnet_hub.list_models(pretrained=True),
            "loaded": sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)),
        }))
    """)
    report = json.loads(run_checked([str(python), "-c", code], cwd=project).stdout)
    assert report["mine"] is True  # the user's models is untouched
    assert "site-packages" in report["file"] and report["version"] == report["metadata"]
    assert report["manifest"].endswith("site-packages/ghostnet_hub/weights_manifest.json")
    assert report["released"] == report["listed"] == models.list_models(pretrained=True)  # as in the clone
    assert not [f for f in report["loaded"] if f.startswith(str(ROOT / "models"))]  # nothing from the checkout
    tops = {f.split("/")[0] for f in report["files"] if not f.startswith("..")}  # (".." : the console script)
    assert tops == {"ghostnet_hub", f"ghostnet_hub-{report['version']}.dist-info"}  # no top-level models, no tests
    assert any(f.endswith("bin/ghostnet-hub") for f in report["files"])
    for bundled in ("weights_manifest.json", "data/chelsea.jpg", "data/imagenet_synsets.txt", "tools/cli.py"):
        assert f"ghostnet_hub/{bundled}" in report["files"], bundled
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line[:1].isalpha()]
    extras = {extra: [line for line in (ROOT / f"requirements-{extra}.txt").read_text().splitlines()
                      if line[:1].isalpha()] for extra in ("export", "deploy")}
    assert report["requires"] == requirements + [f'{r}; extra == "{e}"' for e, rs in extras.items() for r in rs]
    init = (ROOT / "models" / "_version.py").read_text()
    assert re.search(r'^__version__ = "(.*)"$', init, re.M)[1] == report["version"]


def test_console_script_is_python_m_models(installed, tmp_path):
    python, _, project = installed
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    script = python.parent / "ghostnet-hub"
    version = run_checked([str(script), "--version"], cwd=project).stdout.strip()
    assert version == run_checked([str(python), "-m", "ghostnet_hub", "--version"], cwd=project).stdout.strip()
    assert version == run_models("--version").stdout.strip()  # python -m models from the clone still works
    assert re.fullmatch(r"ghostnet-hub \d+\.\d+\.\d+", version)
    listing = run_checked([str(script), "list"], cwd=project, env=env).stdout
    assert listing == run_models("list", env=env).stdout


def test_installed_predict_uses_the_bundled_photo_and_manifest(installed, serve_fixed_logits, monkeypatch):
    python, _, project = installed
    serve_fixed_logits("ghostnet_1x", {TABBY: 10.0})  # sets $GHOSTNET_HUB_MANIFEST for the processes below
    result = run_checked([str(python.parent / "ghostnet-hub"), "predict", "--quiet"], cwd=project,
                  env={"GHOSTNET_HUB_MANIFEST": os.environ["GHOSTNET_HUB_MANIFEST"]})
    lines = result.stdout.splitlines()
    assert lines[0].endswith("site-packages/ghostnet_hub/data/chelsea.jpg")
    assert lines[1].split()[:2] == ["1.", "tabby"]


def test_installed_models_pickle_by_name(installed, tmp_path):
    python, _, project = installed
    save = "import sys, torch, ghostnet_hub; torch.save(ghostnet_hub.tinynet_e(num_classes=3).eval(), sys.argv[1])"
    load = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m).__module__, m(torch.randn(1, 3, 64, 64)).shape)")
    run_checked([str(python), "-c", save, str(tmp_path / "m.pt")], cwd=project)
    assert run_checked([str(python), "-c", load, str(tmp_path / "m.pt")], cwd=project).stdout.split() == [
        "ghostnet_hub.tinynet", "torch.Size([1,", "3])"]


# -- the commands a pip user types, and the ones the package tells them -------------------------

def test_help_names_the_program_the_user_typed(installed):
    python, bin, project = installed
    for command, program in (([str(bin / "ghostnet-hub")], "ghostnet-hub"),
                             ([str(python), "-m", "ghostnet_hub"], "python -m ghostnet_hub")):
        assert run_checked([*command, "--help"], cwd=project).stdout.startswith(f"usage: {program} ")
        assert run_checked([*command, "predict", "--help"], cwd=project).stdout.startswith(
            f"usage: {program} predict ")


def test_installed_hints_name_installed_commands_that_work(installed, tmp_path):
    python, bin, project = installed
    offline = subprocess.run([str(bin / "ghostnet-hub"), "predict", "--model", "tinynet_e", "--quiet"], cwd=project,
                             env={**os.environ, "GHOSTNET_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path)},
                             capture_output=True, text=True, timeout=300)
    assert offline.returncode != 0 and "Traceback" not in offline.stderr
    assert "`ghostnet-hub prefetch tinynet_e`" in offline.stderr and "python -m models" not in offline.stderr
    missing = run_checked([str(python), "-c", "import sys; sys.modules['onnxruntime'] = None\n"
                           "from ghostnet_hub.tools import backends\n"
                           "try: backends.require('onnxruntime', 'for the onnxruntime backend')\n"
                           "except ImportError as exc: print(exc)"], cwd=project).stdout.strip()
    assert missing == ('onnxruntime is not installed (needed for the onnxruntime backend): '
                       'pip install "ghostnet-hub[export]", or just pip install onnxruntime')
    # The hint works for this install as it stands: pip finds the package installed and its
    # [export] requirements satisfied (here by the test environment, hence --no-index).
    hint = shlex.split(missing.split(": ", 1)[1].split(",")[0])
    assert hint[:2] == ["pip", "install"]
    pip = run_checked([str(python), "-m", *hint, "--no-index"], cwd=project)
    assert "Requirement already satisfied: ghostnet-hub[export]" in pip.stdout, pip.stdout


def test_readme_weights_commands_run_as_written_where_installed(installed, published, tmp_path):
    """docs/weights.md's weights commands, as a pip user runs them from their own project (``manifest
    pin`` on a copy of the manifest, which it rewrites)."""
    block = re.search(r"```bash\n(ghostnet-hub prefetch --all .*?)```", doc("weights"), re.S)[1]
    manifest = tmp_path / "manifest.json"
    shutil.copy(os.environ["GHOSTNET_HUB_MANIFEST"], manifest)
    env = {"TORCH_HOME": str(tmp_path / "torch"), "GHOSTNET_HUB_MANIFEST": str(manifest)}
    for line in block.splitlines():
        run_checked(readme_argv(line, installed), cwd=installed.project, env=env)
    listing = run_checked(readme_argv("ghostnet-hub cache list", installed), cwd=installed.project, env=env).stdout
    cached = {line.split()[0] for line in listing.splitlines()[1:] if line.split()[1:2] == ["weights"]}
    assert cached == set(PRETRAINED) - {"tinynet_e"}  # the served models (cache clear tinynet_e)
