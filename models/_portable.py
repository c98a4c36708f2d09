"""Pickling models whose package torch.hub imported under a private name.

hubconf.py imports this package as ``_ghostnet_hub_<hash of its path>``, never as ``models``:
another repository's (or the user's) ``models`` may own that name. Pickle refers to a class by
its module's name, and a new process (``torch.load`` of a saved model, ``mp.spawn`` arguments,
DataLoader workers started with spawn) has no module of the private name, hence
``ModuleNotFoundError: No module named '_ghostnet_hub_...'``.

So ``pickle_by_path`` registers every class of such a package with ``copyreg``: an object then
pickles as "run the repository's hubconf.py, and rebuild the object from the package it loads".
The unpickler imports the repository again from the directory it was loaded from (the hub
cache, or a clone), with the standard library alone (``runpy.run_path``), so the new process
needs nothing of ours in advance. If that directory is gone when the model is pickled, pickling
fails with a message that says to save the ``state_dict`` instead. A package imported by its
own name (``models`` in a clone, ``ghostnet_hub`` installed) pickles as any package does.
``copy.deepcopy`` goes through the same reductions, in this process, without running anything.
"""
from __future__ import annotations

import copyreg
import enum
import importlib
import operator
import pathlib
import pickle
import pkgutil
import runpy
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["pickle_by_path"]


class _Call:
    """``func(*args)``, made by the unpickler; in this process (``copy``) it is ``target``."""

    def __init__(self, func: Callable, args: tuple, target: Callable | None = None,
                 check: Callable[[], None] | None = None):
        self.func, self.args, self.target, self.check = func, args, target, check

    def __reduce__(self):
        if self.check is not None:
            self.check()
        return self.func, self.args

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)


def _package():
    return sys.modules[__package__]


def _class(module: str, qualname: str) -> type:
    return operator.attrgetter(qualname)(importlib.import_module(f"{__package__}.{module}"))


def _new(module: str, qualname: str, *args: Any) -> Any:
    cls = _class(module, qualname)
    return cls.__new__(cls, *args)


def _construct(module: str, qualname: str, *args: Any) -> Any:
    return _class(module, qualname)(*args)


def _member(module: str, qualname: str, name: str) -> enum.Enum:
    return _class(module, qualname)[name]


_HERE = {"_new": _new, "_construct": _construct, "_member": _member}
_locators: dict[str, _Call] = {}  # one object each, so that a pickle runs hubconf.py once


def _gone(hubconf: pathlib.Path) -> Callable[[], None]:
    def check() -> None:
        if not hubconf.is_file():
            raise pickle.PicklingError(
                f"this model's code was loaded by torch.hub from {hubconf.parent}, which is gone, so a pickle "
                "could not import it again; save model.state_dict() instead (torch.save(model.state_dict(), "
                "path)) and load it into a new model with checkpoint=path"
            )
    return check


def _locator(name: str) -> _Call:
    return _locators[name]


def _reduce(obj: Any) -> tuple:
    cls = type(obj)
    module = cls.__module__.removeprefix(__package__ + ".")
    if isinstance(obj, enum.Enum):
        return _locator("_member"), (module, cls.__qualname__, obj.name)
    func, args, *rest = obj.__reduce_ex__(4)
    if func is copyreg.__newobj__ and args[0] is cls:
        return (_locator("_new"), (module, cls.__qualname__, *args[1:]), *rest)
    if func is cls:  # e.g. exceptions: cls(*args)
        return (_locator("_construct"), (module, cls.__qualname__, *args), *rest)
    raise pickle.PicklingError(f"{cls.__qualname__} cannot be pickled; save model.state_dict() instead")


def pickle_by_path(hubconf: pathlib.Path) -> None:
    """Make the objects of this package, imported by ``hubconf`` under a private name,
    picklable by that file's path (see the module's docstring)."""
    load = _Call(runpy.run_path, (str(hubconf),), check=_gone(hubconf))
    package = _Call(operator.itemgetter("_models"), (load,))
    for name, function in _HERE.items():
        _locators[name] = _Call(operator.attrgetter(f"{__name__.rpartition('.')[2]}.{name}"), (package,),
                                target=function)
    root = _package()
    for info in pkgutil.iter_modules(root.__path__):
        if info.name != "tools" and not info.name.startswith("__"):
            importlib.import_module(f"{__package__}.{info.name}")
    for name, module in list(sys.modules.items()):
        if name != __package__ and not name.startswith(__package__ + "."):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and value.__module__ == name and value is not _Call:
                copyreg.pickle(value, _reduce)
