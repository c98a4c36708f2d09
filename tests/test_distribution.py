"""The distributions as a packager and a typed user meet them: the source distribution builds
the wheel and carries no half of the tests; the wheel is typed (py.typed), and `mypy --strict`
on a user's script sees every builder keyword and the family's class.

Offline, as tests/test_package.py: the sdist is built with setuptools from a copy of this
working tree, the wheel from that sdist with pip --no-index --no-build-isolation, and installed
into a bare venv that sees the test environment's site-packages (torch) through a .pth file.
"""
import os
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from helpers import copy_working_tree

pytestmark = pytest.mark.slow  # setuptools, pip and mypy in new processes: about a minute


def _run(command, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(sdist path, wheel path, venv python with the wheel installed, a user's project dir)."""
    tmp = tmp_path_factory.mktemp("dist")
    tree = tmp / "tree"
    copy_working_tree(tree)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "sdist")], cwd=tree)
    (sdist,) = (tmp / "sdist").glob("*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
          "-w", str(tmp / "wheel"), str(sdist)], cwd=tmp)
    (wheel,) = (tmp / "wheel").glob("*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (venv / purelib / "_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp)
    project = tmp / "project"
    project.mkdir()
    return sdist, wheel, python, project


def test_sdist_carries_no_tests_and_builds_the_wheel(dist):
    sdist, wheel, _, _ = dist
    with tarfile.open(sdist) as tar:
        names = [name.split("/", 1)[1] for name in tar.getnames() if "/" in name]
    assert not [n for n in names if n.startswith("tests")], "tests without their helpers (or any)"
    for needed in ("setup.py", "pyproject.toml", "weights_manifest.json", "examples/chelsea.jpg",
                   "requirements.txt", "models/py.typed", "models/api.py"):
        assert needed in names, needed
    assert wheel.name.startswith("ghostnet_hub-")  # (the fixture built it from the sdist alone)


def test_wheel_is_typed(dist):
    _, wheel, _, _ = dist
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "ghostnet_hub/py.typed" in names and "ghostnet_hub/_builder.py" in names


USER_SCRIPT = """
import torch
import ghostnet_hub as models
from ghostnet_hub import TinyNet_A_Weights


def build() -> models.TinyNet:
    model = models.tinynet_a(pretrained=True, drop_path_rate=0.1)
    reveal_type(models.tinynet_a.__call__)
    return model


def backbone() -> torch.Tensor:
    any_model = models.get_model("ghostnet_1x", num_classes=10, dtype=torch.bfloat16, checkpoint="best.pth")
    ghost: models.GhostNet = models.ghostnet_1x(features_only=True, out_indices=(1, 2), device="meta")
    preprocess: torch.nn.Module = TinyNet_A_Weights.DEFAULT.transforms(antialias=False)
    names: list[str] = models.list_models("tinynet*", pretrained=True)
    any_model.reset_classifier(4)
    assert ghost.feature_info.channels() and preprocess and names
    return any_model.forward_features(torch.zeros(1, 3, 64, 64))
"""
# The same calls with a misspelt keyword and a wrong type: mypy must see the signatures to flag them.
BAD_SCRIPT = """
import ghostnet_hub as models

models.tinynet_a(drop_path_rat=0.1)
models.get_model("tinynet_a", fuse="yes")
"""


def _mypy(dist, script, name):
    _, _, python, project = dist
    (project / name).write_text(textwrap.dedent(script))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python),
                           "--cache-dir", str(project / ".mypy_cache"), name],
                          cwd=project, capture_output=True, text=True, timeout=600)


def test_mypy_strict_sees_the_typed_api(dist):
    result = _mypy(dist, USER_SCRIPT, "user.py")
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert errors == [], output  # nothing from the package, nothing about the script
    (revealed,) = [line for line in output.splitlines() if "Revealed type" in line]
    for fragment in ("(pretrained: bool =, *, weights:", "checkpoint: str | os.PathLike[str] | None =",
                     "checkpoint_sha256:", "in_chans: int =", "drop_rate: float =", "drop_path_rate: float =",
                     "features_only: bool =", "out_indices: typing.Sequence[int] =", "fuse: bool =",
                     "channels_last: bool =", "dtype: torch._C.dtype | None =", "num_classes: int | None =",
                     "-> ghostnet_hub.tinynet.TinyNet"):
        assert fragment in revealed, (fragment, revealed)


def test_mypy_strict_flags_a_misspelt_keyword_and_a_wrong_type(dist):
    result = _mypy(dist, BAD_SCRIPT, "bad.py")
    errors = [line for line in (result.stdout + result.stderr).splitlines() if ": error:" in line]
    assert result.returncode == 1 and len(errors) == 2, errors
    assert errors[0].startswith("bad.py:4:") and "drop_path_rat" in errors[0]
    assert errors[1].startswith("bad.py:5:") and "fuse" in errors[1]
