"""The documentation: README.md, short, and the pages under docs/, built as a site by MkDocs
(mkdocs.yml) with no warning; every code block in them is run or checked by a test; the command
line page is what its generator makes from the argparse definitions now."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, copy_working_tree, doc, doc_pages


def _build(root, site):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # mkdocs builds the whole site
def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav or a nav
    entry without its page, a snippet of the README that is gone, or a docstring mkdocstrings
    cannot render fails it."""
    result = _build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("using", "weights", "finetune", "deploy", "speed", "cli", "api", "contributing"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    index = (tmp_path / "site" / "index.html").read_text()
    assert "pip install" in index and "tinynet_e" in index  # the README's install and models table, included
    assert 'id="models.api.get_model"' in (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="evaluate"' in (tmp_path / "site" / "cli" / "index.html").read_text()


@pytest.mark.slow  # a copy of the repository and a second build
def test_a_broken_link_fails_the_build(tmp_path):
    copy = copy_working_tree(tmp_path / "repo")
    with open(copy / "docs" / "using.md", "a") as page:
        page.write("\nSee [the missing page](missing.md).\n")
    result = _build(copy, tmp_path / "site")
    assert result.returncode != 0 and "missing.md" in result.stdout + result.stderr


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_is_generated_from_the_parser():
    reference = _cli_reference()
    assert doc("cli") == reference.page(), (
        "docs/cli.md is stale: run python docs/cli_reference.py")
    from models.tools.cli import build_parser

    commands = next(a for a in build_parser(prog="ghostnet-hub")._actions if a.dest == "command").choices
    for name in commands:  # every command has its section
        assert re.search(rf"^### {name}$", reference.reference(), re.M), name


def test_readme_is_read_in_five_minutes():
    assert len(doc("README").splitlines()) <= 250
    for job in ("Use from Python", "Fine-tune", "Deploy", "Evaluate", "Speed", "Develop"):
        assert f"\n## {job}\n" in doc("README"), job
    assert doc("README").rstrip().endswith(doc("README").split("\n## Develop\n", 1)[1].rstrip())  # Develop: last


def _blocks(text):
    """(marker, fence, body) of every fenced block; marker: the ``<!-- ... -->`` line just above."""
    return re.findall(r"(?:(<!-- [^>]*-->)\n)?```(\w*)\n(.*?)```", text, re.S)


def _lines(body):
    return [line.strip() for line in body.replace("\\\n", " ").splitlines() if line.strip()]


# Every fenced block of the README and docs/, and the test that runs (or checks) it: (page, what
# the block starts with or its marker, test). A new block needs its test and a row here.
RUN_BY = [
    ("README", 'import torch\nmodel = torch.hub.load("OWNER/REPO"', "test_readme.py::test_hub_examples_run"),
    ("README", "<!-- install -->", "conftest.py::installed"),
    ("README", "<!-- ci:setup -->", "test_predict.py::test_readme_main_job_classifies_the_sample"),
    ("README", "<!-- ci:test -->", ".ci/run"),
    ("README", "@inproceedings{han2020ghostnet", "(a citation, not code)"),
    ("cli", "$ ghostnet-hub predict cat.jpg",  # (checked as commands the tests can run; not run)
     "test_commands.py::test_readme_spells_commands_as_the_installed_package_does"),
    ("deploy", "<!-- deploy:commands -->", "test_export.py::test_readme_deploy_commands_run_as_written"),
    ("deploy", "from PIL import Image\n\nimport models\nfrom models.tools import backends",
     "test_export.py::test_readme_deploy_python_example_runs"),
    ("finetune", "<!-- finetune:one -->", "test_finetune_runs.py::test_readme_commands_and_two_processes_equal_one"),
    ("finetune", "<!-- finetune:resume -->", "test_finetune_runs.py::test_readme_commands_and_two_processes_equal_one"),
    ("finetune", "<!-- finetune:use -->", "test_finetune_runs.py::test_readme_commands_and_two_processes_equal_one"),
    ("finetune", "<!-- finetune:torchrun -->",
     "test_finetune_runs.py::test_readme_commands_and_two_processes_equal_one"),
    ("finetune", "import models\nfrom models.tools.finetune import finetune",
     "test_finetune_runs.py::test_readme_commands_and_two_processes_equal_one"),
    ("finetune", "<!-- finetune:figure -->",
     "test_finetune_runs.py::test_tinynet_e_learns_from_scratch_and_predict_agrees"),
    ("finetune", "<!-- finetune:nodes -->", "test_multinode.py::test_two_nodes_finetune_equals_one_process"),
    ("finetune", "<!-- finetune:nodes-evaluate -->",
     "test_multinode.py::test_two_nodes_evaluate_counts_equal_one_process"),
    ("label", "<!-- label:one -->", "test_label.py::test_docs_one_process_commands"),
    ("label", "<!-- label:torchrun -->",
     "test_label.py::test_killed_two_rank_run_resumes_to_the_uninterrupted_output_line_for_line"),
    ("label", "<!-- label:nodes -->",
     "test_label.py::test_killed_run_is_finished_by_the_several_node_command_on_other_processes"),
    ("speed", "<!-- deploy:benchmark -->", "test_export.py::test_readme_benchmark_command_is_the_committed_run"),
    ("using", 'import torch\n\nrepo = "OWNER/REPO"', "test_readme.py::test_hub_examples_run"),
    ("using", "import torch\nimport models\n", "test_readme.py::test_python_example_runs"),
    ("using", 'model = torch.hub.load("OWNER/REPO", "tinynet_b"', "test_readme.py::test_hub_examples_run"),
    ("using", 'backbone = torch.hub.load("OWNER/REPO"', "test_readme.py::test_hub_examples_run"),
    ("using", 'fast = torch.hub.load("OWNER/REPO"', "test_readme.py::test_hub_examples_run"),
    ("weights", "from models import tinynet_a\n", "test_readme.py::test_pretrained_weights_example_runs"),
    ("weights", "ghostnet-hub prefetch --all  ", "test_cache.py::test_readme_weight_commands_run"),
    ("weights", "ENV TORCH_HOME=", "test_fault_processes.py::test_readme_docker_recipe_on_a_read_only_cache"),
]


def test_every_code_block_is_run_by_a_test():
    docs_lines = {line for name in doc_pages() if name != "README" for _, fence, body in _blocks(doc(name))
                  if fence == "bash" for line in _lines(body)}
    unclaimed = []
    for name in doc_pages():
        for marker, fence, body in _blocks(doc(name)):
            claims = [test for page, start, test in RUN_BY if page == name and (marker == start or body.startswith(
                start))]
            if not claims and name == "README" and fence == "bash" and set(_lines(body)) <= docs_lines:
                continue  # a job's command, copied from the docs page whose test runs it
            if len(claims) != 1:
                unclaimed.append((name, marker, body[:60], claims))
    assert unclaimed == [], "blocks no test (or more than one row of RUN_BY) claims"
    for _, _, test in RUN_BY:  # the tests named exist
        path, _, function = test.partition("::")
        if path.endswith(".py") and (ROOT / "tests" / path).exists() and function:
            assert f"def {function}(" in (ROOT / "tests" / path).read_text(), test
