"""What a checkpoint's pickle may hold beside tensors (training scripts' ``argparse.Namespace``,
numpy scalars: nothing that can run code), and the one-paragraph refusal of anything else."""
from __future__ import annotations

import contextlib
import importlib
import pathlib
import re
import sys
from functools import lru_cache

import torch
from torch import nn


@lru_cache(maxsize=1)
def _harmless_globals() -> list:
    """What training scripts put beside the weights and may be read: timm's and torchvision's
    ``args`` (argparse.Namespace) and numpy scalars in metrics (scalar, dtype, numeric
    dtype classes). Nothing here can run code when unpickled."""
    import argparse

    allowed: list = [argparse.Namespace]
    with contextlib.suppress(ImportError, AttributeError):
        # numpy is optional (not one of our requirements): without it no such checkpoint can exist.
        np = importlib.import_module("numpy")
        core = getattr(np, "_core", None) or np.core
        allowed += [core.multiarray.scalar, np.dtype]
        allowed += [(core.multiarray.scalar, "numpy.core.multiarray.scalar")]
        allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType") and not
                    name.startswith(("Object", "Void", "Str", "Bytes", "StringD"))]
    return allowed


def safe_globals():
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if allow is None:
        return contextlib.nullcontext()
    try:
        return allow(_harmless_globals())
    except TypeError:  # a torch that takes no (object, name) pairs
        return allow([g for g in _harmless_globals() if not isinstance(g, tuple)])


def _is_module_class(name: str) -> bool:
    """Whether ``name`` is an nn.Module class, judged without importing anything."""
    module, _, attr = name.rpartition(".")
    cls = getattr(sys.modules.get(module), attr, None)
    return name.startswith("torch.nn.modules.") or (isinstance(cls, type) and issubclass(cls, nn.Module))


def refusal(path: pathlib.Path, exc: Exception) -> str:
    """One plain paragraph: what was found, why it is refused, how to convert the file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"GLOBAL ([\w.]+)", text)
    found = match[1] if match else (text.strip().splitlines() or [type(exc).__name__])[0][:200]
    if match and _is_module_class(found):
        what, how = f"a whole pickled model ({found})", "`model = torch.load(path, weights_only=False)`, then " \
            "`torch.save(model.state_dict(), \"weights.pth\")`"
    else:
        what, how = f"a pickled Python object ({found})", "`ckpt = torch.load(path, weights_only=False)`, then " \
            "`torch.save(ckpt[\"state_dict\"], \"weights.pth\")` (with the key that holds the weights)"
    return (f"refused to load {path}: it holds {what}, where only tensors, plain containers, argparse.Namespace "
            "and numpy scalars are read; unpickling anything else can run arbitrary code, so nothing from it was "
            f"executed. If you trust the file, convert it once with {how}, and load that file.")
