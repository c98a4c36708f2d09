"""The package as users install it: `pip install "ghostnet-hub @ git+<repo>"` (the README's
command, pointed at a git repository made from this working tree) into a fresh virtual
environment, then used from outside the checkout, next to a `models` package of the user's own.

The fresh venv is made without pip (`python -m venv --without-pip`); a .pth file lets it see the
test environment's site-packages, so torch and friends are not installed again (that would take
minutes and the network), and pip runs with --no-deps --no-index --no-build-isolation: offline,
building with the setuptools of requirements-dev.txt. The package itself is installed for real
into the venv's own site-packages, with its console script.
"""
import json
import os
import re
import shutil
import site
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, run_models

pytestmark = pytest.mark.slow  # git, pip and new Python processes: about 20 s

TABBY = 281


def _run(command, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | kwargs.pop("env", {})
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, the user's project directory) after the README's pip install."""
    tmp = tmp_path_factory.mktemp("package")
    # This working tree as a git repository, what `pip install git+https://...` clones.
    repo = tmp / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        _run([*git, *command], cwd=repo)

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (venv / purelib / "_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- install -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines()[0] == 'pip install "ghostnet-hub @ git+https://github.com/OWNER/REPO"'
    # The same install from a git URL; "name @ git+file:///..." is not a valid requirement, the bare URL is.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          f"git+file://{repo}"], cwd=tmp)
    project = tmp / "project"  # the user's own project, with a package named models
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("MINE = True\n")
    return python, project


def test_installed_under_its_own_name_beside_the_users_models(installed):
    python, project = installed
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
    report = json.loads(_run([str(python), "-c", code], cwd=project).stdout)
    assert report["mine"] is True  # the user's models is untouched
    assert "site-packages" in report["file"] and report["version"] == report["metadata"]
    assert report["manifest"].endswith("site-packages/ghostnet_hub/weights_manifest.json")
    assert report["released"] == report["listed"] == ["ghostnet_1x", *(f"tinynet_{c}" for c in "abcde")]
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
    init = (ROOT / "models" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "(.*)"$', init, re.M)[1] == report["version"]


def test_console_script_is_python_m_models(installed, tmp_path):
    python, project = installed
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    script = python.parent / "ghostnet-hub"
    version = _run([str(script), "--version"], cwd=project).stdout.strip()
    assert version == _run([str(python), "-m", "ghostnet_hub", "--version"], cwd=project).stdout.strip()
    assert version == run_models("--version").stdout.strip()  # python -m models from the clone still works
    assert re.fullmatch(r"ghostnet-hub \d+\.\d+\.\d+", version)
    listing = _run([str(script), "list"], cwd=project, env=env).stdout
    assert listing == run_models("list", env=env).stdout


def test_installed_predict_uses_the_bundled_photo_and_manifest(installed, serve_fixed_logits, monkeypatch):
    python, project = installed
    serve_fixed_logits("ghostnet_1x", {TABBY: 10.0})  # sets $GHOSTNET_HUB_MANIFEST for the processes below
    result = _run([str(python.parent / "ghostnet-hub"), "predict", "--quiet"], cwd=project,
                  env={"GHOSTNET_HUB_MANIFEST": os.environ["GHOSTNET_HUB_MANIFEST"]})
    lines = result.stdout.splitlines()
    assert lines[0].endswith("site-packages/ghostnet_hub/data/chelsea.jpg")
    assert lines[1].split()[:2] == ["1.", "tabby"]


def test_installed_models_pickle_by_name(installed, tmp_path):
    python, project = installed
    save = "import sys, torch, ghostnet_hub; torch.save(ghostnet_hub.tinynet_e(num_classes=3).eval(), sys.argv[1])"
    load = ("import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m).__module__, m(torch.randn(1, 3, 64, 64)).shape)")
    _run([str(python), "-c", save, str(tmp_path / "m.pt")], cwd=project)
    assert _run([str(python), "-c", load, str(tmp_path / "m.pt")], cwd=project).stdout.split() == [
        "ghostnet_hub.tinynet", "torch.Size([1,", "3])"]
