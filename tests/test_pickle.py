"""A model loaded through torch.hub behaves like an ordinary module: ``torch.save(model)``
loads in a new process, it deep-copies, it goes through ``mp.spawn`` arguments and into
spawned DataLoader workers. The package runs under a private module name there (see
hubconf.py), which a new process cannot import by name; pickles import the repository again
from where it was loaded (models/_portable.py). Everything below runs in real new processes."""
import copy
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import ROOT, copy_working_tree

SAVE = textwrap.dedent("""
    import copy, sys, torch
    import torch.multiprocessing as mp
    from torch.utils.data import DataLoader, Dataset

    repo, source, out = sys.argv[1], sys.argv[2], sys.argv[3]
    load = lambda name, **kw: torch.hub.load(repo, name, source=source, trust_repo=True, **kw)

    class Classify(Dataset):  # a dataset that carries a model and its weights enum member
        def __init__(self, model, weights):
            self.model, self.weights = model, weights
        def __len__(self):
            return 2
        def __getitem__(self, i):
            torch.manual_seed(i)
            with torch.no_grad():
                return self.model(torch.randn(1, 3, 64, 64))[0], repr(self.weights)

    def child(rank, model, x, path):
        with torch.no_grad():
            torch.save({"logits": model(x), "module": type(model).__module__}, path)

    if __name__ == "__main__":
        torch.manual_seed(0)
        x = torch.randn(2, 3, 64, 64)
        models = {
            "pretrained": load("tinynet_e", weights="DEFAULT", progress=False),
            "fused": load("ghostnet_1x", weights="DEFAULT", fuse=True, channels_last=True, progress=False),
            "features": load("tinynet_a", features_only=True, out_indices=(1, 3)).eval(),
        }
        assert type(models["pretrained"]).__module__.startswith("_ghostnet_hub_")
        with torch.no_grad():
            expected = {k: m(x) for k, m in models.items()}
        torch.save({"models": models, "x": x, "expected": expected}, out + "/saved.pt")
        # mp.spawn: a deep copy of the model as an argument of the child
        mp.spawn(child, args=(copy.deepcopy(models["pretrained"]), x, out + "/spawned.pt"), nprocs=1)
        # DataLoader workers started with spawn, as on macOS and Windows
        package = sys.modules[type(models["pretrained"]).__module__.rpartition(".")[0]]
        dataset = Classify(models["pretrained"], package.TinyNet_E_Weights.DEFAULT)
        rows = list(DataLoader(dataset, num_workers=1, multiprocessing_context="spawn"))
        local = [dataset[i] for i in range(2)]
        torch.save({"workers": rows, "local": local}, out + "/workers.pt")
        print("ok")
""")

LOAD = textwrap.dedent("""
    import sys, torch
    saved = torch.load(sys.argv[1] + "/saved.pt", weights_only=False)
    with torch.no_grad():
        for key, model in saved["models"].items():
            got, expected = model(saved["x"]), saved["expected"][key]
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # (a list for the features_only one)
    model = saved["models"]["pretrained"]
    assert type(model).__module__.startswith("_ghostnet_hub_"), type(model).__module__
    assert "models" not in sys.modules  # the repository was imported again, not a "models" package
    # and it pickles again from here
    again = __import__("pickle").loads(__import__("pickle").dumps(model))
    torch.testing.assert_close(again(saved["x"]), model(saved["x"]))
    print(type(model).__module__, model.pretrained_weights)
""")


def _checkout(tmp_path, where):
    """This repository's files (the working tree), copied to ``where`` under ``tmp_path``."""
    return copy_working_tree(tmp_path / where)


def _python(code, *args, cwd, env=None):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {})
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # new Python processes
@pytest.mark.parametrize("where", ["hub-cache", "clone"])
def test_hub_model_pickles_into_new_processes(published, tmp_path, where):
    """torch.save -> torch.load in a new process; mp.spawn arguments; spawned DataLoader workers."""
    out = tmp_path / "out"
    out.mkdir()
    env = {"TORCH_HOME": str(tmp_path / "torch"), "OMP_NUM_THREADS": "1"}
    if where == "hub-cache":  # what torch.hub leaves in its cache after downloading OWNER/REPO from GitHub
        _checkout(tmp_path, "torch/hub/OWNER_REPO_main")
        repo, source = "OWNER/REPO:main", "github"
    else:
        repo, source = _checkout(tmp_path, "clone"), "local"
    script = tmp_path / "save.py"
    script.write_text(SAVE)
    saved = subprocess.run([sys.executable, str(script), str(repo), source, str(out)], cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env,
                           capture_output=True, text=True, timeout=300)
    assert saved.returncode == 0 and saved.stdout.strip().endswith("ok"), saved.stderr[-3000:]

    loaded = _python(LOAD, out, cwd=tmp_path, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "Weights('tinynet_e', manifest=" in loaded.stdout

    reference = torch.load(out / "saved.pt", weights_only=False)  # (in this process too)
    spawned = torch.load(out / "spawned.pt", weights_only=False)
    torch.testing.assert_close(spawned["logits"], reference["expected"]["pretrained"], rtol=0, atol=0)
    assert spawned["module"].startswith("_ghostnet_hub_")
    workers = torch.load(out / "workers.pt", weights_only=False)
    for (logits, name), (expected, expected_name) in zip(workers["workers"], workers["local"], strict=True):
        torch.testing.assert_close(logits[0], expected, rtol=0, atol=0)
        assert list(name) == [expected_name] == ["TinyNet_E_Weights.IMAGENET1K_V1"]


def test_pickling_after_the_repository_is_gone_says_to_save_the_state_dict(tmp_path):
    clone = _checkout(tmp_path, "clone")
    model = torch.hub.load(str(clone), "tinynet_e", source="local", num_classes=3)
    assert b"run_path" in pickle.dumps(model)
    shutil.rmtree(clone)
    twin = copy.deepcopy(model).eval()  # in this process: nothing to import, works regardless
    assert type(twin) is type(model) and twin.classifier is not model.classifier
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(pickle.PicklingError, match=r"save model.state_dict\(\) instead .*checkpoint="):
        torch.save(model, tmp_path / "model.pt")


@pytest.mark.slow  # new Python processes
def test_a_package_imported_by_its_own_name_pickles_as_usual(tmp_path):
    """``import models`` from a clone: plain pickling by module name, nothing run on load."""
    import models

    model = models.tinynet_e(num_classes=3).eval()
    data = pickle.dumps(model)
    assert b"run_path" not in data and b"models.tinynet" in data
    path = tmp_path / "m.pt"
    torch.save(model, path)
    code = "import sys, torch; m = torch.load(sys.argv[1], weights_only=False); print(type(m).__module__)"
    result = _python(code, path, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "models.tinynet", result.stderr
