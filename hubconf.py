"""PyTorch Hub entry points: GhostNet 1.0x, GhostNetV2 1.0x/1.3x/1.6x, GhostNetV3 1.0x and TinyNet
A-E with ImageNet weights (``weights="DEFAULT"``, as in torchvision; ``pretrained=True`` too), and
GhostNet 0.5x / 1.3x and GhostNetV3 0.5x / 1.3x / 1.6x without. ``torch.hub.help(repo, name)``
documents each."""
import hashlib as _hashlib
import importlib as _importlib
import importlib.util as _importlib_util
import pathlib as _pathlib
import sys as _sys

# The third-party modules that loading a model and using it import (torch.hub checks that each
# can be imported; "PIL" is pillow). tests/test_hub.py derives this list from real imports.
dependencies = ["torch", "torchvision", "PIL", "requests", "filelock", "tqdm", "safetensors"]


def _load_package():
    """Import ./models under a private name, never as the bare ``models``.

    Another hub repository (or the user's project) may own ``sys.modules["models"]``; torch.hub
    documents that clash as a limitation. A name derived from this checkout's path keeps two
    checkouts apart too. The package's own imports are relative, so it works under any name.
    """
    root = _pathlib.Path(__file__).resolve().parent / "models"
    name = "_ghostnet_hub_" + _hashlib.sha1(str(root).encode()).hexdigest()[:12]
    if name in _sys.modules:
        return _sys.modules[name]
    spec = _importlib_util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del _sys.modules[name]
        raise
    # Pickle cannot import a private name in a new process: the package's objects pickle as
    # "run this file again, then rebuild" instead (torch.save(model), mp.spawn, DataLoader workers).
    _importlib.import_module(f"{name}._portable").pickle_by_path(_pathlib.Path(__file__).resolve())
    return module


_models = _load_package()

ghostnet_0_5x = _models.ghostnet_0_5x
ghostnet_1x = _models.ghostnet_1x
ghostnet_1_3x = _models.ghostnet_1_3x
ghostnetv2_1x = _models.ghostnetv2_1x
ghostnetv2_1_3x = _models.ghostnetv2_1_3x
ghostnetv2_1_6x = _models.ghostnetv2_1_6x
ghostnetv3_0_5x = _models.ghostnetv3_0_5x
ghostnetv3_1x = _models.ghostnetv3_1x
ghostnetv3_1_3x = _models.ghostnetv3_1_3x
ghostnetv3_1_6x = _models.ghostnetv3_1_6x
tinynet_a = _models.tinynet_a
tinynet_b = _models.tinynet_b
tinynet_c = _models.tinynet_c
tinynet_d = _models.tinynet_d
tinynet_e = _models.tinynet_e
# torchvision's hubconf offers these too: torch.hub.load(repo, "get_weight", "TinyNet_A_Weights.DEFAULT").
get_weight = _models.get_weight
get_model_weights = _models.get_model_weights
