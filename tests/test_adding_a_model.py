"""CONTRIBUTING.md's "Adding a model", done as a contributor does it, on a copy of the repository:
exactly the edits its lists name (a model without released weights; one with them), then the
suite's model-wide checks, run on the new model in the copy, and the commands that read the row."""
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.tinynet import TinyNet

from helpers import ROOT, copy_working_tree

pytestmark = pytest.mark.slow  # a copy of the repository, pytest and the command line in new processes

# The throw-away TinyNets (the family whose rows were once generated, not written): (letter, r, w, d).
WITHOUT_WEIGHTS = ("f", 0.4, 0.5, 0.45)
WITH_WEIGHTS = ("g", 0.3, 0.5, 0.4)
METRICS = (50.5, 75.5)  # made up: a throw-away model's "published" accuracy

# The suite's model-wide checks; the plugin below keeps, of each test parametrized by model, the
# new model's case (the other models' cases ran in the suite itself).
CHECKS = [
    "tests/test_house.py::test_every_model_is_one_row_of_a_family_table",
    "tests/test_house.py::test_every_public_builder_name_is_one_object",
    "tests/test_builder_options.py::test_type_checkers_see_every_builder",
    "tests/test_api.py::test_list_models",
    "tests/test_api.py::test_list_models_filters_as_timm_and_torchvision",
    "tests/test_api.py::test_unknown_model_name_lists_the_valid_ones",
    "tests/test_api.py::test_each_table_row_records_the_size_of_its_code",
    "tests/test_api.py::test_pretrained_cfg_on_every_model",
    "tests/test_api.py::test_pretrained_loads_published_weights_in_eval_mode",
    "tests/test_api.py::test_transforms_are_torchvision_presets_with_the_published_recipe",
    "tests/test_architecture.py",
    "tests/test_readme.py::test_table_lists_every_model_once",
    "tests/test_readme.py::test_table_row_matches_the_code_and_the_manifest",
    "tests/test_manifest.py::test_manifest_is_valid_and_lists_the_released_models",
    "tests/test_manifest.py::test_metadata_agrees_with_the_code_and_the_papers",
    "tests/test_manifest.py::test_checksums_are_exactly_the_published_ones",
    "tests/test_manifest.py::test_every_url_is_https_and_every_file_has_a_checksum_or_says_it_has_none",
    "tests/test_weights_enums.py::test_every_released_model_has_its_enum",
    "tests/test_weights_enums.py::test_one_weights_enum_per_released_model_named_as_torchvision_names_them",
    "tests/test_hub_listing.py::test_listing_table_matches_the_manifest",
    "tests/test_interface.py",
    "tests/test_training_interface.py",
    "tests/test_docs.py::test_cli_page_is_generated_from_the_parser",
]
PLUGIN = '''
import os

NEW = set(os.environ["NEW_MODELS"].split(","))


def pytest_collection_modifyitems(config, items):
    import models

    known = set(models.list_models())
    keep, drop = [], []
    for item in items:
        values = set(map(str, item.callspec.params.values())) if hasattr(item, "callspec") else set()
        (drop if values & known and not values & NEW else keep).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
'''

# The help text torch.hub shows, the model from torch.hub at its input size, and the commands that
# read the row (list, info, benchmark: their own main, in this one new Python in the copy).
PROBE = """
import json, sys
import torch
import models
sys.path.insert(0, "tests")
from helpers import cli  # (the copy's own)
doc = models.{name}.__doc__
said = [line for line in doc.splitlines() if line.startswith("Size:")] + doc.splitlines()[-2:]  # size, example
assert "MACs at {size}x{size}." in said[0] and {example!r} in doc, said
model = torch.hub.load(".", "{name}", source="local", num_classes=3, trust_repo=True).eval()
assert model.default_input_size == ({size}, {size}) and type(model).__name__ == "TinyNet"
assert model(torch.randn(2, 3, {size}, {size})).shape == (2, 3)
results = [cli(*argv) for argv in {commands!r}]
assert all(r.returncode == 0 for r in results), [(r.args, r.returncode, r.stderr[-2000:]) for r in results]
print(json.dumps([r.stdout for r in results]))
"""


def _recipe():
    """The numbered steps of CONTRIBUTING.md's two lists: (without weights, with weights also)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("\n## Adding a model", 1)[1].split("\n## ", 1)[0]
    without, with_weights = section.split("\n### ")[1:3]
    return [re.findall(r"^\d+\. (.*(?:\n {3}.*)*)", part, re.M) for part in (without, with_weights)]


def _facts(r, w, d):
    """What the contributor writes into the row: the code's size, counted as tests/reference.py counts it."""
    model = TinyNet(r, w, d).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *model.default_input_size))
    return dict(num_params=sum(p.numel() for p in model.parameters()), macs=counter.get_total_flops() // 2,
                input_size=model.default_input_size[0])


def _edit(path, anchor, text, after=True):
    source = path.read_text()
    assert source.count(anchor) == 1, f"{path.name}: the recipe's place ({anchor.strip()!r}) is not there once"
    path.write_text(source.replace(anchor, anchor + text if after else text + anchor))


def _add_row(path, row):
    """A row at the end of the module's VARIANTS table, which must be a table of rows."""
    source = path.read_text()
    (table,) = [node.value for node in ast.parse(source).body if isinstance(node, ast.Assign)
                and [ast.unparse(t) for t in node.targets] == ["VARIANTS"]]
    assert isinstance(table, ast.Dict), f"{path.name}: VARIANTS is not a table of rows, a row cannot be added to it"
    lines = source.splitlines(keepends=True)
    at = table.end_lineno - 1  # the closing brace's line
    assert lines[at].strip() == "}", f"{path.name}: VARIANTS does not end with a line of its own"
    path.write_text("".join(lines[:at] + [row] + lines[at:]))


def _readme_row(name, facts, released=None):
    top = ("–", "–", "no") if released is None else (*map(str, released), "yes")
    return (f"| `{name}` | {facts['input_size']} | {facts['num_params']:,} | {facts['macs'] / 1e6:.2f} M | "
            + " | ".join(top) + " |\n")


def _without_weights(copy, name, letter, r, w, d, facts, previous="tinynet_e"):
    """The first list's steps, in order: (file the step names, the edit)."""
    title = f"TinyNet-{letter.upper()} (a throw-away): EfficientNet-B0 scaled by r={r}, w={w}, d={d}"
    row = (f'    "{name}": Variant(TinyNet, {{"resolution": {r}, "width": {w}, "depth": {d}}}, "{title}", None,\n'
           f'                         num_params={facts["num_params"]}, macs={facts["macs"]}, '
           f'input_size={facts["input_size"]}),\n')
    api = copy / "models" / "api.py"

    def entry_points():
        _edit(api, f'{previous} = _entry_point("{previous}", TinyNet)\n', f'{name} = _entry_point("{name}", TinyNet)\n')
        typed = api.read_text().split("if TYPE_CHECKING:", 1)
        assert typed[1].count(f'"{previous}"]') == 1
        api.write_text(typed[0] + "if TYPE_CHECKING:" + typed[1].replace(f'"{previous}"]', f'"{previous}", "{name}"]'))

    return [
        ("models/tinynet.py", lambda: _add_row(copy / "models" / "tinynet.py", row)),
        ("models/api.py", entry_points),
        ("hubconf.py", lambda: _edit(copy / "hubconf.py", f"{previous} = _models.{previous}\n",
                                     f"{name} = _models.{name}\n")),
        ("README.md", lambda: _edit(copy / "README.md", next(
            line + "\n" for line in (copy / "README.md").read_text().splitlines()
            if line.startswith(f"| `{previous}` |")), _readme_row(name, facts))),
        ("docs/cli.md", lambda: _run(copy, [sys.executable, "docs/cli_reference.py"])),
    ]


def _with_weights(copy, name, letter, facts):
    """The second list's steps, in order, for a model whose (made-up) file the served manifest fakes."""
    model = TinyNet(*WITH_WEIGHTS[1:])
    state = model.state_dict()
    digest = hashlib.sha256(repr(sorted(state)).encode()).hexdigest()  # stands for the publisher's checksum
    enum = f"TinyNet_{letter.upper()}_Weights"

    def manifest():
        path = copy / "weights_manifest.json"
        data = json.loads(path.read_text())
        entry = json.loads(json.dumps(data["models"]["tinynet_e"]))
        entry.update(facts, resize_size=int(facts["input_size"] / 0.875),
                     metrics=dict(entry["metrics"], top1=METRICS[0], top5=METRICS[1]))
        entry["files"] = [dict(entry["files"][0], urls=[f"https://example.com/{name}.pth"],
                               checksums={"sha256": digest}, size=1234)]
        data["models"][name] = entry
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def enum_class():
        path = copy / "models" / "pretrained.py"
        _edit(path, '    "TinyNet_E_Weights",\n', f'    "{enum}",\n')
        _edit(path, '    IMAGENET1K_V1 = _Release("tinynet_e")\n    DEFAULT = IMAGENET1K_V1\n',
              f'\n\nclass {enum}(WeightsEnum):\n    IMAGENET1K_V1 = _Release("{name}")\n    DEFAULT = IMAGENET1K_V1\n')

    def published_facts():
        path = copy / "tests" / "reference.py"
        _edit(path, '    "tinynet_e": (59.9, 81.8),\n', f'    "{name}": {METRICS},\n')
        _edit(path, '    ("tinynet_d", "sha256", ', f'    ("{name}", "sha256", "{digest}", 1234),\n', after=False)

    def keys():
        rows = [f"{key}\t{tuple(value.shape)}" for key, value in state.items()]
        (copy / "tests" / "data" / f"{name}.keys.tsv").write_text(f"# {name}: a throw-away\n" + "\n".join(rows) + "\n")

    def listing():
        (path,) = (copy / "hub").glob("*_ghostnet_tinynet.md")
        _edit(path, "| TinyNet-E | 106 | 2.04M | 24M | 59.9 | 81.8 |\n",
              f"| TinyNet-{letter.upper()} | {facts['input_size']} | {facts['num_params'] / 1e6:.2f}M | "
              f"{facts['macs'] / 1e6:.0f}M | {METRICS[0]} | {METRICS[1]} |\n")

    return [
        ("weights_manifest.json", manifest),
        ("models/pretrained.py", enum_class),
        ("tests/reference.py", published_facts),
        ("tests/data/", keys),
        ("hub/", listing),
    ]


def _run(copy, argv, env=None):
    result = subprocess.run(argv, cwd=copy, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(copy), **(env or {})})
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return result


def _apply(steps, listed):
    """Each listed step, applied by the edit that names its file: as many edits as steps."""
    assert len(steps) == len(listed), f"CONTRIBUTING.md lists {len(listed)} steps, the recipe takes {len(steps)}"
    for (file, edit), text in zip(steps, listed, strict=True):
        assert f"`{file}" in text, f"CONTRIBUTING.md's step {text[:60]!r}... does not name {file}"
        edit()


def _check(copy, tmp_path, new, released=False):
    """The model-wide checks, in the copy, on the new models; then the commands that read the row."""
    (tmp_path / "plugin").mkdir(exist_ok=True)
    (tmp_path / "plugin" / "only_new_models.py").write_text(PLUGIN)
    env = {"NEW_MODELS": ",".join(new), "PYTHONPATH": f"{copy}{os.pathsep}{tmp_path / 'plugin'}"}
    report = tmp_path / "checks.xml"
    _run(copy, [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", "-p", "only_new_models",
                "--basetemp", str(tmp_path / "pt"), "--junitxml", str(report), *CHECKS], env)
    cases = ElementTree.parse(report).getroot().iter("testcase")
    ran = {case.get("name") for case in cases if not list(case)}  # (no failure, error or skip inside)
    expected = {"test_every_public_builder_name_is_one_object", "test_table_lists_every_model_once",
                "test_cli_page_is_generated_from_the_parser", "test_every_released_model_has_its_enum"}
    expected |= {f"{test}[{name}]" for name in new for test in (
        "test_each_table_row_records_the_size_of_its_code", "test_parameter_count", "test_macs_at_default_input",
        "test_table_row_matches_the_code_and_the_manifest", "test_num_classes_zero_returns_pooled_features")}
    if released:
        expected |= {f"{test}[{name}]" for name in new for test in (
            "test_pretrained_loads_published_weights_in_eval_mode", "test_metadata_agrees_with_the_code_and_the_papers",
            "test_state_dict_matches_released_checkpoint",
            "test_transforms_are_torchvision_presets_with_the_published_recipe")}
    assert expected <= ran, sorted(expected - ran)
    for name in new:  # (pytest's -q output lists no names: the help text and commands, here)
        facts = _facts(*(WITHOUT_WEIGHTS if name.endswith(WITHOUT_WEIGHTS[0]) else WITH_WEIGHTS)[1:])
        size = facts["input_size"]
        example = "weights='DEFAULT'" if released else f"randn(8, 3, {size}, {size})"
        commands = [["list"], ["info", name],
                    ["benchmark", "--models", name, "--modes", "eager", "--batch-sizes", "1", "--warmup", "0",
                     "--repeats", "1", "--references", "timm", "--quiet", "--json", str(tmp_path / "bench.json")]]
        probe = PROBE.format(name=name, size=size, example=example, commands=commands)
        listed, info, bench = json.loads(_run(copy, [sys.executable, "-c", probe]).stdout.splitlines()[-1])
        assert name in listed
        assert f"default input {size}x{size}" in info
        rows = json.loads((tmp_path / "bench.json").read_text())["results"]
        # timm has no such model: ours alone, at the row's input size
        assert [(r["model"], r["implementation"], r["input_size"]) for r in rows] == [(name, "ours", size)], bench


def test_a_model_without_weights_takes_the_edits_contributing_lists(tmp_path):
    copy = copy_working_tree(tmp_path / "repo")
    letter, r, w, d = WITHOUT_WEIGHTS
    name = f"tinynet_{letter}"
    listed, _ = _recipe()
    _apply(_without_weights(copy, name, letter, r, w, d, _facts(r, w, d)), listed)
    _check(copy, tmp_path, [name])


def test_a_model_with_weights_takes_the_edits_contributing_lists(tmp_path):
    copy = copy_working_tree(tmp_path / "repo")
    letter, r, w, d = WITH_WEIGHTS
    name = f"tinynet_{letter}"
    facts = _facts(r, w, d)
    without, also = _recipe()
    steps = _without_weights(copy, name, letter, r, w, d, facts)
    # (its README row says what its manifest entry does)
    readme = copy / "README.md"
    steps[3] = ("README.md", lambda: _edit(readme, "| `tinynet_e` | 106 | 2,042,972 | 24.36 M | 59.9 | 81.8 | yes |\n",
                                           _readme_row(name, facts, METRICS)))
    _apply(steps[:4] + _with_weights(copy, name, letter, facts) + steps[4:], without[:4] + also + without[4:])
    _check(copy, tmp_path, [name], released=True)
