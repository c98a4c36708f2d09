import os
import pathlib

# One thread per process, set once here, before torch is imported: the suite runs in one worker
# process per core (pytest-xdist, pyproject.toml), and on a 2-core machine two threads that wait
# for each other made numeric tests 25-145x slower; one thread also sums floats in the same order
# everywhere. OMP_NUM_THREADS reaches the subprocesses the tests start (the CLI, torchrun, pip's
# Python); tests that measure threads set their own (benchmark --threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The modules that hold the longest tests (ExecuTorch lowering, INT8 calibration, the journeys,
# training), run first. xdist cannot split a test: when one of several minutes came last, one
# worker ran it alone while the other sat idle (CI: the ExecuTorch INT8 test, 236 s, at the end).
# Started first, they run while the other worker works through the short tests, and the tail is
# short tests that the idle worker can take over.
# test_disk_faults.py: its export tests are minutes; in the fast loop, its 6 s test, the longest there.
_LONG_FIRST = ("test_export.py", "test_disk_faults.py", "test_identity.py", "test_finetune_runs.py",
               "test_multinode.py", "test_backends.py", "test_label.py", "test_fuse.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return _LONG_FIRST.index(name) if name in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: each module keeps its order, so module fixtures are built once


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch):
    """No test reads the user's settings or writes into the user's real cache."""
    for name in ("GHOSTNET_HUB_OFFLINE", "GHOSTNET_HUB_MIRROR", "GHOSTNET_HUB_MANIFEST", "GHOSTNET_HUB_DEADLINE",
                 "GHOSTNET_HUB_MAX_BYTES", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))


@pytest.fixture
def server():
    """A fresh loopback weights server (tests/weights_server.py) for one test."""
    from weights_server import WeightsServer

    with WeightsServer() as s:
        yield s


@pytest.fixture(scope="session")
def _weights_server(tmp_path_factory):
    """One loopback server for the session, serving a checkpoint-shaped file (random values)
    for each of the six models, and a manifest pointing at it."""
    from reference import PRETRAINED, checkpoint_bytes
    from weights_server import WeightsServer, weight_entry, write_manifest

    files = {name: checkpoint_bytes(name, "safetensors" if name == "tinynet_a" else "torch") for name in PRETRAINED}
    with WeightsServer() as server:
        entries = {
            name: [weight_entry(server.add(f"/{name}", data), data,
                                fmt="safetensors" if name == "tinynet_a" else "torch")]
            for name, data in files.items()
        }
        manifest = write_manifest(tmp_path_factory.mktemp("manifest") / "weights_manifest.json", entries)
        yield server, manifest, files


@pytest.fixture
def published(_weights_server, monkeypatch):
    """The loopback server and its manifest in use ($GHOSTNET_HUB_MANIFEST); a fresh cache."""
    server, manifest, files = _weights_server
    monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
    return server, files


@pytest.fixture
def github_checkout(tmp_path, monkeypatch):
    """This repository as torch.hub leaves it in its cache after downloading it from GitHub
    (``<hub_dir>/<owner>_<repo>_main``), with GitHub unreachable, as here and on an air-gapped
    cluster. Returns the ``owner/repo`` to pass to torch.hub."""
    import urllib.error

    from models.api import GITHUB_REPO

    from helpers import copy_working_tree

    hub_dir = tmp_path / "hub"
    checkout = hub_dir / (GITHUB_REPO.replace("/", "_") + "_main")
    copy_working_tree(checkout)  # files not committed yet count too: the test sees the working tree

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("GitHub cannot be reached from this test")

    monkeypatch.setattr(torch.hub, "urlopen", unreachable)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    return GITHUB_REPO


@pytest.fixture
def serve_fixed_logits(server, tmp_path, monkeypatch):
    """serve_fixed_logits(name, {class: logit}) -> server: weights for ``name`` whose logits
    are always those (every other class -10), served on loopback and in the manifest in use."""
    import io

    from reference import build
    from weights_server import weight_entry, write_manifest

    def serve(name, logits):
        state = build(name).state_dict()
        state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
        state["classifier.bias"] = torch.full((1000,), -10.0)
        for index, value in logits.items():
            state["classifier.bias"][index] = value
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        manifest = write_manifest(tmp_path / f"{name}-manifest.json",
                                  {name: [weight_entry(server.add(f"/{name}.pth", data), data)]})
        monkeypatch.setenv("GHOSTNET_HUB_MANIFEST", manifest)
        return server

    return serve


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """The package as a user installs it: the README's `pip install "ghostnet-hub @ git+..."`,
    pointed at a git repository made from this working tree, into a fresh venv. Returns
    ``Installed(python, bin, project)``: the venv's python, its bin directory (the console
    script ``ghostnet-hub``), and a user's project directory outside the clone, holding a
    ``models`` package of the user's own. ``helpers.readme_argv(line, installed)`` runs a
    README command there.

    The venv is made without pip; a .pth file lets it see this environment's site-packages, so
    torch and friends are not installed again (minutes, and the network), and pip runs offline
    (--no-deps --no-index --no-build-isolation, with the setuptools of requirements-dev.txt).
    The package itself is installed for real into the venv's own site-packages."""
    import site
    import sys
    from typing import NamedTuple

    from helpers import copy_working_tree, doc, run_checked

    class Installed(NamedTuple):
        python: pathlib.Path
        bin: pathlib.Path
        project: pathlib.Path

    tmp = tmp_path_factory.mktemp("package")
    repo = tmp / "repo"  # this working tree as a git repository, what `pip install git+https://...` clones
    copy_working_tree(repo)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        run_checked([*git, *command], cwd=repo)

    venv = tmp / "venv"
    run_checked([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = run_checked([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    (venv / purelib.stdout.strip() / "_test_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    block = doc("README").split("<!-- install -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines()[0] == 'pip install "ghostnet-hub @ git+https://github.com/OWNER/REPO"'
    # The same install from a git URL; "name @ git+file:///..." is not a valid requirement, the bare URL is.
    run_checked([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                 f"git+file://{repo}"], cwd=tmp)
    project = tmp / "project"  # the user's own project, with a package named models
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("MINE = True\n")
    return Installed(python, python.parent, project)


# -- fine-tuning: shared by test_finetune*.py and test_multinode.py -------------------------------
@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    from stripes import write_dataset

    return write_dataset(tmp_path_factory.mktemp("stripes-small"), train=8, val=3, size=40)


@pytest.fixture(scope="session")
def tiny_run(small_data, tmp_path_factory):
    """Two epochs of tinynet_e from scratch: (result, stdout)."""
    from finetuning import TINY, quiet

    from models.tools.finetune import finetune

    out = tmp_path_factory.mktemp("tiny-run")
    return quiet(finetune, model="tinynet_e", data=small_data, out=out, pretrained=False, epochs=2, **TINY)


# -- evaluate: shared by test_evaluate.py and test_multinode.py ------------------------------------
@pytest.fixture
def imagefolder(tmp_path):
    """An ImageNet-style validation folder: the first three classes by WordNet id, PER_CLASS
    readable images each, and one truncated JPEG."""
    from PIL import Image

    from helpers import PER_CLASS

    root = tmp_path / "val"
    for wnid, count in PER_CLASS.items():
        (root / wnid).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (80 + 9 * i, 64), (40 * i, 90, 200)).save(root / wnid / f"img_{i}.JPEG")
    (root / "n01443537" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root


@pytest.fixture
def class_one_always_wins(serve_fixed_logits):
    """tinynet_e weights whose logits are the classifier bias: class 1, then 0, then 2."""
    return serve_fixed_logits("tinynet_e", {1: 10.0, 0: 5.0, 2: 4.0})
