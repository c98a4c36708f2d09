"""torch.hub as a user drives it: local checkouts, a GitHub repo served from the hub cache,
help and list, and another hub repository that also ships a top-level ``models`` package."""
import ast
import builtins
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import models

from helpers import ROOT, doc
from reference import MODELS, PRETRAINED

REPO = str(ROOT)


@pytest.fixture
def no_prompt(monkeypatch):
    def refuse(*args):
        raise AssertionError(f"torch.hub asked interactively: {args}")
    monkeypatch.setattr(builtins, "input", refuse)


@pytest.mark.parametrize("name", PRETRAINED)
def test_hub_local_pretrained_matches_package_api(published, no_prompt, name):
    hub_model = torch.hub.load(REPO, name, source="local", pretrained=True, progress=False, trust_repo=False)
    package_model = models.get_model(name, pretrained=True, progress=False)
    size = MODELS[name].input_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(hub_model(x), package_model(x), rtol=0, atol=0)
    assert not hub_model.training
    assert "models" not in type(hub_model).__module__.split(".")[0]  # loaded under the private name


def test_hub_entry_passes_model_options_and_rejects_unknown_ones(no_prompt):
    model = torch.hub.load(REPO, "ghostnet_0_5x", source="local", num_classes=10, in_chans=1)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    with pytest.raises(TypeError, match=r"ghostnet_1x\(\) got unexpected keyword argument\(s\) 'num_clases'"):
        torch.hub.load(REPO, "ghostnet_1x", source="local", num_clases=10)
    with pytest.raises(RuntimeError, match="Cannot find callable"):
        torch.hub.load(REPO, "tinynet_f", source="local")


def test_hub_user_gets_preprocessing_and_categories(published):
    model = torch.hub.load(REPO, "tinynet_d", source="local", pretrained=True, progress=False)
    preprocess = model.pretrained_weights.transforms()
    assert preprocess(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)).shape == (3, 152, 152)
    categories = model.pretrained_weights.meta["categories"]
    assert len(categories) == 1000 and categories[0] == "tench"


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "TinyNet_E_Weights.IMAGENET1K_V1", "member"])
def test_hub_entry_takes_torchvision_weights(published, weights):
    if weights == "member":  # of the package imported from the clone: another copy of the code than torch.hub's
        weights = models.TinyNet_E_Weights.DEFAULT
    model = torch.hub.load(REPO, "tinynet_e", source="local", weights=weights, progress=False)
    reference = models.tinynet_e(pretrained=True, progress=False)
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="pass checkpoint='mine.pth' instead"):
        torch.hub.load(REPO, "tinynet_e", source="local", weights="mine.pth")


def test_new_head_warning_points_at_the_users_hub_load_line(published):
    with pytest.warns(UserWarning, match="new and untrained") as record:
        model = torch.hub.load(REPO, "tinynet_e", source="local", pretrained=True, num_classes=4, progress=False); line = sys._getframe().f_lineno  # noqa: E702,E501
    assert (record[0].filename, record[0].lineno) == (__file__, line)
    assert model.training


# -- hubconf itself ----------------------------------------------------------------------------

USE = """
import importlib.metadata, importlib.util, json, pathlib, sys, torch
spec = importlib.util.spec_from_file_location("hubconf", sys.argv[1])
hubconf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hubconf)
at_import = sorted({n.split(".")[0] for n in sys.modules})
# Loading and normal use: published weights in both formats (tinynet_a's served file is
# safetensors, ghostnet_1x's a torch pickle), your own checkpoint, preprocessing, class names.
model = hubconf.tinynet_a(weights="DEFAULT", progress=False)
model = hubconf.ghostnet_1x(pretrained=True, progress=False)
torch.save(model.state_dict(), pathlib.Path(sys.argv[2]) / "mine.pth")
model = hubconf.ghostnet_1x(checkpoint=pathlib.Path(sys.argv[2]) / "mine.pth", fuse=True)
weights = hubconf.ghostnet_1x(pretrained=True, progress=False).pretrained_weights
image = weights.transforms()(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))
label = weights.meta["categories"][model(image[None]).argmax().item()]
used = sorted({n.split(".")[0] for n in sys.modules})
ours = [m.__file__ for n, m in sys.modules.items() if n.startswith("_ghostnet_hub_") and getattr(m, "__file__", None)]
print(json.dumps({"dependencies": hubconf.dependencies, "at_import": at_import, "used": used,
                  "files": ours + [sys.argv[1]], "distributions": importlib.metadata.packages_distributions()}))
"""


def _third_party_imports(path):
    """Top-level third-party names imported anywhere in a file (module level or in functions)."""
    names = set()
    for node in ast.walk(ast.parse(pathlib.Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)


@pytest.mark.slow  # a new Python process
def test_dependencies_are_what_loading_and_using_a_model_imports(published, tmp_path):
    """torch.hub checks ``dependencies`` (module names) and reports the missing ones before a
    user hits an ImportError. The list must name every module of our requirements that loading
    and using a model really imports, and nothing else."""
    import json
    import re

    result = subprocess.run([sys.executable, "-c", USE, str(ROOT / "hubconf.py"), str(tmp_path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    required = {re.split(r"[<>=!~ ;\[]", line.strip())[0].lower()
                for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()[:1].isalpha()}
    dists_of = {module: {d.lower() for d in dists} for module, dists in report["distributions"].items()}
    used = set().union(*(dists_of.get(m, set()) for m in report["used"])) & required
    # One entry per requirement that was used, each a module of it that was imported (what torch.hub checks).
    listed = [dists_of.get(m, set()) & required for m in report["dependencies"]]
    assert all(len(d) == 1 for d in listed) and set(report["dependencies"]) <= set(report["used"])
    assert sorted(d for (d,) in listed) == sorted(used), (report["dependencies"], used)
    assert {"torchvision", "pillow", "safetensors"} <= used  # the three the list used to miss
    # Every third-party module the package's own code imports is in it (the tools are not loaded by torch.hub).
    direct = set().union(*map(_third_party_imports, report["files"]))
    assert direct <= set(report["dependencies"]), direct - set(report["dependencies"])
    # torch.hub's own check passes, and the heavy optional imports stay lazy: importing hubconf is fast.
    hubconf = _import_hubconf()
    torch.hub._check_dependencies(hubconf)
    assert {"torchvision", "safetensors"}.isdisjoint(report["at_import"])
    assert _third_party_imports(ROOT / "hubconf.py") == set()


def _import_hubconf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_hubconf_for_dependencies", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trust_repo_behaves_as_the_readme_says(github_checkout, monkeypatch):
    """torch 2.x: the default trust_repo="check" asks (y/N) before running a GitHub repository
    that is neither in $TORCH_HOME/hub/trusted_list nor in the hub cache; True trusts and
    remembers it without asking; False asks every time; a local directory is never questioned."""
    import urllib.error

    readme = " ".join(doc("using").split())
    assert 'with the default `trust_repo="check"` it asks on stdin (y/N)' in readme
    assert "`trust_repo=True` runs it without asking and adds it to that list" in readme

    asked = []
    answers = iter(["n", "y"])
    monkeypatch.setattr(builtins, "input", lambda prompt: asked.append(prompt) or next(answers))
    trusted_list = pathlib.Path(torch.hub.get_dir()) / "trusted_list"
    # A repository seen for the first time: the default asks ("n": refused, nothing downloaded).
    with pytest.raises(Exception, match="Untrusted repository"):
        torch.hub.load("someone/else:main", "model")
    assert len(asked) == 1
    # trust_repo=True: no question, and remembered (the download then fails: no network here) ...
    with pytest.raises(urllib.error.URLError):
        torch.hub.load("someone/else:main", "model", trust_repo=True)
    assert len(asked) == 1 and "someone_else" in trusted_list.read_text().split()
    # ... so the default asks no more.
    with pytest.raises(urllib.error.URLError):
        torch.hub.load("someone/else:main", "model")
    assert len(asked) == 1
    # A repository already in the hub cache counts as trusted; False asks every time ("y").
    torch.hub.load(github_checkout, "tinynet_e")
    assert len(asked) == 1
    torch.hub.load(github_checkout, "tinynet_e", trust_repo=False)
    assert len(asked) == 2
    torch.hub.load(REPO, "tinynet_e", source="local", trust_repo=False)
    assert len(asked) == 2


def test_hub_list_shows_only_the_models(github_checkout):
    hub = github_checkout
    # (and torchvision's get_weight / get_model_weights, as its hubconf offers them)
    assert torch.hub.list(hub, trust_repo=True) == sorted([*MODELS, "get_weight", "get_model_weights"])


def test_hub_help_documents_each_entry(github_checkout):
    hub = github_checkout
    text = torch.hub.help(hub, "tinynet_a", trust_repo=True)
    for fragment in ("TinyNet-A", "top-1 77.7 %, top-5 93.5 %", "6,187,972 parameters", "336.87 M MACs",
                     "resize the shorter side to 219 (bicubic), center-crop 192", "pretrained_weights.transforms()",
                     "meta['categories']", "Args:", "device:", "num_classes (int)", "weights (str | WeightsEnum)",
                     "checkpoint (str | path)", "drop_path_rate (float)", "TinyNet_A_Weights.IMAGENET1K_V1",
                     "train mode", "Example:", "torch.hub.load("):
        assert fragment in text, fragment
    for name in MODELS:
        doc = torch.hub.help(hub, name, trust_repo=True)
        assert "Args:" in doc and "Example:" in doc and "MACs" in doc
    assert "No released weights" in torch.hub.help(hub, "ghostnet_1_3x", trust_repo=True)


def test_hub_load_github_repo_from_the_hub_cache(github_checkout, published):
    hub = github_checkout
    model = torch.hub.load(hub, "tinynet_e", pretrained=True, progress=False, trust_repo=True)
    reference = models.tinynet_e(pretrained=True, progress=False)
    x = torch.randn(1, 3, 106, 106)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


# -- the clash with another repository's top-level "models" ------------------------------------

OTHER_HUBCONF = """
dependencies = ["torch"]
from models.net import tiny_linear  # a bare, top-level "models" package, as many repos ship
"""
OTHER_NET = """
import torch
def tiny_linear():
    return torch.nn.Linear(2, 3)
"""
CLASH = """
import sys, torch
ours, other, order = sys.argv[1], sys.argv[2], sys.argv[3]
def load_ours():
    m = torch.hub.load(ours, "tinynet_e", source="local", num_classes=4)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 4)
def load_other():
    m = torch.hub.load(other, "tiny_linear", source="local")
    assert isinstance(m, torch.nn.Linear)
    assert sys.modules["models"].__file__.startswith(other)
steps = [load_ours, load_other] if order == "ours-first" else [load_other, load_ours]
for step in steps + steps:  # and each again after the other
    step()
assert "models" not in sys.modules or sys.modules["models"].__file__.startswith(other), sys.modules.get("models")
print("ok")
"""


@pytest.mark.slow  # a new Python process
@pytest.mark.parametrize("order", ["ours-first", "other-first"])
def test_other_hub_repo_with_a_models_package_in_the_same_process(tmp_path, order):
    other = tmp_path / "other_repo"
    (other / "models").mkdir(parents=True)
    (other / "hubconf.py").write_text(OTHER_HUBCONF)
    (other / "models" / "__init__.py").write_text("")
    (other / "models" / "net.py").write_text(OTHER_NET)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", CLASH, REPO, str(other), order], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow  # a new Python process
def test_loading_ours_never_registers_a_bare_models_module(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        torch.hub.load(sys.argv[1], "ghostnet_1x", source="local")
        torch.hub.load(sys.argv[1], "tinynet_a", source="local", features_only=True)
        print(sorted(m for m in sys.modules if m == "models" or m.startswith("models.")))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, REPO], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow  # a new Python process
def test_local_source_never_prompts_for_trust(tmp_path):
    # trust_repo=False makes torch.hub ask on stdin for GitHub repos; a local checkout is
    # yours, and must load with no question even when stdin is closed.
    code = "import sys, torch; torch.hub.load(sys.argv[1], 'tinynet_e', source='local', trust_repo=False); print('ok')"
    result = subprocess.run([sys.executable, "-c", code, REPO], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
