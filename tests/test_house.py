"""The shape of the code: each model defined once, one object per public name, imports that
run one way (tools -> library), modules of a readable size."""
import ast
import importlib.util
import re
import sys

import pytest

import models
from models import api, ghostnet, ghostnetv2, ghostnetv3, tinynet

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
    families = (ghostnet, ghostnetv2, ghostnetv3, tinynet)
    assert list(api.VARIANTS) == [name for family in families for name in family.VARIANTS] == models.list_models()
    # No architecture-level builders beside the public ones: one object per public name.
    for family in families:
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
    # The models, then torchvision's two weights lookups (its hubconf offers them too).
    assert hub_names == [*models.list_models(), "get_weight", "get_model_weights"]
    assert hubconf.get_weight is private_package.get_weight


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


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function (a lazy
    import hides a circle from Python, not from the design)."""
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        tree = ast.parse(path.read_text())
        # Imports under "if TYPE_CHECKING:" are for type checkers; Python never runs them.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                       for statement in block.body for n in ast.walk(statement)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in names]
                graph[name].update(targets or [base])
    return graph


def test_no_import_circles():
    """The tools are floors: images and runtimes below, export above them, the commands on top;
    nothing imports back up (issue #22 found predict -> backends -> export -> _samples -> predict)."""
    graph = _package_imports()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1 or module in graph.get(module, ()):
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert graph["models.tools.predict"] and not circles, f"modules that import each other: {circles}"


def test_imports_inside_the_package_are_relative():
    for path in LIBRARY + TOOLS:
        for module, level in _imports(path):
            assert level > 0 or module.split(".")[0] != "models", f"{path.relative_to(ROOT)}: import {module}"


@pytest.mark.parametrize("path", LIBRARY + TOOLS + sorted((ROOT / "tests").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path):  # the tests' modules too
    assert len(path.read_text().splitlines()) <= 400


# Other projects' hub repositories, named in comparisons (docs/using.md's "Coming from torchvision").
OTHER_HUB_REPOS = {"pytorch/vision", "huggingface/pytorch-image-models", "huawei-noah/ghostnet"}


def test_the_github_name_is_the_same_everywhere():
    # CONTRIBUTING.md lists these places; a published fork changes them together.
    owner, repo = api.GITHUB_REPO.split("/")
    listings = list((ROOT / "hub").glob("*_ghostnet_tinynet.md"))
    assert [p.name for p in listings] == [f"{owner}_{repo}_ghostnet_tinynet.md"]
    # (a GitHub name has one slash; "path/to/clone", a local checkout, is not one)
    literal_call = re.compile(r"""torch\.hub\.(?:load|list|help)\(\s*\\?["']([\w.-]+/[\w.-]+)\\?["']""")
    pages = [p for p in sorted((ROOT / "docs").glob("*.md")) if api.GITHUB_REPO in p.read_text()]
    assert pages, "no docs/ page names the repository: the torch.hub examples are in docs/using.md"
    for path in [ROOT / "README.md", ROOT / "examples" / "quickstart.ipynb", *listings, *pages]:
        text = path.read_text()
        assert api.GITHUB_REPO in text, path
        others = set(literal_call.findall(text)) - {api.GITHUB_REPO}
        assert others <= OTHER_HUB_REPOS, (path, others)
    assert api.GITHUB_REPO in (ROOT / "CONTRIBUTING.md").read_text()


# Functions of a readable size (#22: finetune._run was 116 lines, evaluate() took 21 parameters,
# train_epoch 12 positional ones): at most 8 parameters (positional and keyword-only; not self, cls,
# *args, **kwargs), and in models/tools/ at most 60 lines of body (its docstring not counted).
MOST_PARAMETERS, MOST_TOOL_LINES = 8, 60
# The functions over a limit, each pinned at its size now (it may shrink, not grow), and why.
PUBLIC = "a public function whose keywords are its documented options (timm's and torchvision's names)"
MORE_PARAMETERS = {
    "models/_builder.py::Builder.__call__": (16, PUBLIC + ": get_model's, for type checkers"),
    "models/api.py::get_model": (17, PUBLIC),
    "models/tinynet.py::TinyNet.__init__": (9, PUBLIC + ": timm's TinyNet arguments"),
    "models/tools/backends.py::wrap": (10, PUBLIC),
    "models/tools/benchmark.py::run": (10, PUBLIC),
    "models/tools/export.py::export": (11, PUBLIC),
    "models/tools/label.py::label": (10, PUBLIC),
    "models/api.py::_build": (10, "get_model's loading step, keyword-only: to fold into a dataclass next"),
    "models/download.py::_fetch": (9, "the download chain's state, keyword-only: to fold next"),
    "models/_http.py::_append_body": (9, "one HTTP response's state: to fold next"),
}
LONGER = {"models/tools/export.py::export": (80, "one step per format: to split next")}


def _functions(node, prefix=""):
    """(``Class.function``, its parameters, its body's lines) of every function under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = child.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            names = names[1:] if names[:1] in (["self"], ["cls"]) else names
            body = child.body[1:] if ast.get_docstring(child) is not None and len(child.body) > 1 else child.body
            yield prefix + child.name, len(names), child.end_lineno - body[0].lineno + 1
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")


def test_no_function_takes_more_than_8_parameters_or_runs_over_60_lines():
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        for function, parameters, lines in _functions(ast.parse(path.read_text())):
            name = f"{module}::{function}"
            if parameters > MORE_PARAMETERS.get(name, (MOST_PARAMETERS,))[0]:
                over.append(f"{name}: {parameters} parameters")
            if module.startswith("models/tools/") and lines > LONGER.get(name, (MOST_TOOL_LINES,))[0]:
                over.append(f"{name}: {lines} lines")
    assert not over, "over the limits (a recipe dataclass, or smaller functions):\n" + "\n".join(over)
