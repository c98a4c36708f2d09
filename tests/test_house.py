"""The shape of the code: each model defined once, one object per public name, imports that
run one way (tools -> library), modules of a readable size."""
import ast
import importlib.util
import sys

import pytest

import models
from models import api, ghostnet, tinynet

from helpers import ROOT

PACKAGE = ROOT / "models"
# __main__.py is the command line's entry (python -m models), not part of the library.
LIBRARY = [p for p in PACKAGE.glob("*.py") if p.name != "__main__.py"]
TOOLS = list((PACKAGE / "tools").glob("*.py"))


def _imports(path):
    """(module, level) of every import statement in ``path``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level
            if node.module is None:  # "from . import x"
                yield from ((alias.name, node.level) for alias in node.names)


def test_every_model_is_one_row_of_a_family_table():
    assert list(api._VARIANTS) == [*ghostnet.VARIANTS, *tinynet.VARIANTS] == models.list_models()
    # No architecture-level builders beside the public ones: one object per public name.
    for family in (ghostnet, tinynet):
        assert not [name for name in family.VARIANTS if hasattr(family, name)]


def test_every_public_builder_name_is_one_object():
    spec = importlib.util.spec_from_file_location("_hubconf_under_test", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    private_package = sys.modules[hubconf._models.__name__]
    for name in models.list_models():
        builder = getattr(models, name)
        assert builder is getattr(api, name), name
        assert builder.__name__ == name and builder.__doc__.startswith(api.get_variant(name).title)
        # hubconf loads the package under a private name: the same object of that copy.
        assert getattr(hubconf, name) is getattr(private_package.api, name), name
    hub_names = [n for n in vars(hubconf) if not n.startswith("_") and callable(getattr(hubconf, n))]
    assert hub_names == models.list_models()


def test_keyword_arguments_are_checked_against_one_list():
    # The options are read from the class signature; a typo names the close match.
    assert api.get_variant("tinynet_a").options == ("num_classes", "in_chans", "drop_rate", "drop_path_rate",
                                                     "features_only", "out_indices")
    with pytest.raises(TypeError, match="'in_chan' \\(did you mean 'in_chans'\\?\\)"):
        models.tinynet_a(in_chan=1)


def test_the_library_never_imports_the_tools():
    for path in LIBRARY:
        for module, _level in _imports(path):
            assert "tools" not in module.split("."), f"{path.name} imports {module}"


def test_imports_inside_the_package_are_relative():
    for path in LIBRARY + TOOLS:
        for module, level in _imports(path):
            assert level > 0 or module.split(".")[0] != "models", f"{path.relative_to(ROOT)}: import {module}"


@pytest.mark.parametrize("path", LIBRARY + TOOLS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
