"""The commands a user is told, for a clone and for a pip install alike: the README and docs/ spell them
``ghostnet-hub COMMAND`` (in a clone, ``python -m models COMMAND``); ``--help`` and every hint the
package prints name the spelling that works for how the package was obtained; every "install X"
hint names the extra that provides X, and ``[export]`` alone exports and checks an ONNX file.
The installed side runs in a real pip venv: tests/test_package.py."""
import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import textwrap

import pytest

from helpers import DOCS, MODELS, ROOT, doc, readme_argv

README = doc("README")
OPTIONAL = ("onnx", "onnxscript", "onnxruntime", "executorch")  # the modules backends.require names


def _requirements(extra):
    """The distribution names an extra requires (requirements-EXTRA.txt)."""
    lines = (ROOT / f"requirements-{extra}.txt").read_text().splitlines()
    return [re.match(r"[A-Za-z0-9_.-]+", line)[0] for line in lines if line[:1].isalpha()]


def _command_lines(text):
    """Every command of every shell code block (bash, console, dockerfile RUN), each ``&&`` part
    on its own, continuation lines joined."""
    for fence, body in re.findall(r"```(bash|console|dockerfile)\n(.*?)```", text, re.S):
        for line in body.replace("\\\n", " ").splitlines():
            if fence == "console":
                line = line.removeprefix("$ ")
            if fence == "dockerfile":
                if not line.startswith("RUN "):
                    continue
                line = line.removeprefix("RUN ")
            for part in line.split(" && "):
                if part.split("#")[0].strip():
                    yield part.split(" > ")[0]


def test_readme_spells_commands_as_the_installed_package_does():
    install = README.split("### Install\n", 1)[1].split("\n## ", 1)[0]
    setup = README.split("<!-- ci:setup -->", 1)[1].split("```", 2)[1]  # the clone's quick start, as CI runs it
    assert "`python -m models COMMAND`" in install and "`ghostnet-hub COMMAND`" in install
    elsewhere = DOCS.replace(install, "").replace(setup, "")  # the README and every docs/ page
    assert re.findall(r".{0,40}-m models.{0,40}", elsewhere) == []
    commands = list(_command_lines(DOCS))
    ours = [c for c in commands if "ghostnet-hub" in c.split()]
    assert len(ours) >= 15, commands
    for command in commands:  # every line the README asks a user to type is one the tests know how to run
        if command.split()[0] not in ("pip", ".venv/bin/pip"):
            readme_argv(command)


def test_readme_argv_maps_the_readme_spelling_and_refuses_the_unknown():
    assert readme_argv("ghostnet-hub cache list  # every file") == [*MODELS, "cache", "list"]
    assert readme_argv("torchrun --nproc_per_node 2 --no-python ghostnet-hub finetune --sync-bn") == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", *MODELS, "finetune",
        "--sync-bn"]
    for unknown in ("models predict", "ghostnet_hub predict", "torchrun --no-python models finetune"):
        with pytest.raises(AssertionError, match="cannot run"):
            readme_argv(unknown)


def test_readme_says_what_each_extra_gives():
    block = README.split("<!-- install -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    extras = {}
    for line in block.splitlines():
        match = re.match(r'pip install "ghostnet-hub\[(\w+)\] @ [^"]+" +# (.*)', line)
        if match:
            extras[match[1]] = match[2]
    assert sorted(extras) == ["deploy", "export"]
    for extra, comment in extras.items():
        named = re.search(r"\(([\w, ]+)\)", comment)[1].split(", ")
        assert sorted(named) == sorted(_requirements(extra)), (extra, comment)


def test_export_extra_is_enough_for_the_readme_onnx_command():
    from models.tools import export

    onnx = {"onnx", "onnxscript", *export._RUNTIMES["onnx"]}  # what an ONNX export imports, then checks in
    assert onnx <= set(_requirements("export"))
    assert set(OPTIONAL) <= set(_requirements("deploy"))


def _python_m_models(*args):
    """``python -m models ARGS``'s stdout: models/__main__.py run as ``-m`` runs it, in this process."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit:
        patch.setattr(sys, "argv", ["models", *args])
        runpy.run_module("models", run_name="__main__", alter_sys=True)
    assert exit.value.code == 0
    return out.getvalue()


def test_help_in_a_clone_names_python_m_models():
    assert _python_m_models("--help").startswith("usage: python -m models ")
    assert _python_m_models("cache", "list", "--help").startswith("usage: python -m models cache list ")


# The package loaded the three ways there are: installed (the name ghostnet_hub; here without
# installing, tests/test_package.py does it for real), `python -m models` in a clone, and torch.hub
# (hubconf.py's private name for its checkout).
PROBE = textwrap.dedent("""
    import importlib, importlib.util, json, pathlib, sys
    name, root = sys.argv[1], pathlib.Path(sys.argv[2])
    if name == "hubconf":
        sys.path.insert(0, str(root))
        import hubconf
        package = hubconf._models
    else:
        spec = importlib.util.spec_from_file_location(name, root / "models" / "__init__.py",
                                                      submodule_search_locations=[str(root / "models")])
        package = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
    cli = importlib.import_module(package.__name__ + ".tools.cli")
    backends = importlib.import_module(package.__name__ + ".tools.backends")
    try:
        package.tinynet_e(pretrained=True)
    except Exception as exc:
        offline = str(exc)
    missing = {}
    for module in sys.argv[3:]:
        sys.modules[module] = None
        try:
            backends.require(module, "for a test")
        except ImportError as exc:
            missing[module] = str(exc)
    print(json.dumps({"package": package.__name__, "usage": cli.build_parser().format_usage(), "offline": offline,
                      "missing": missing}))
""")


@pytest.fixture(scope="module")
def told():
    """What the package tells its user under each name it is loaded as."""
    import tempfile

    with tempfile.TemporaryDirectory() as torch_home:
        env = {**os.environ, "GHOSTNET_HUB_OFFLINE": "1", "TORCH_HOME": torch_home}
        env.pop("PYTHONPATH", None)
        results = {}
        for name in ("ghostnet_hub", "models", "hubconf"):
            result = subprocess.run([sys.executable, "-c", PROBE, name, str(ROOT), *OPTIONAL], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            results[name] = json.loads(result.stdout)
    return results


@pytest.mark.slow  # `told`: three new processes
def test_installed_package_names_ghostnet_hub_commands_and_extras(told):
    installed = told["ghostnet_hub"]
    assert installed["usage"].startswith("usage: ghostnet-hub ")
    assert "`ghostnet-hub prefetch tinynet_e`" in installed["offline"]
    for module, message in installed["missing"].items():
        extra = "export" if module in _requirements("export") else "deploy"
        assert message == (f'{module} is not installed (needed for a test): pip install "ghostnet-hub[{extra}]", '
                           f"or just pip install {module}")
        assert module in _requirements(extra)


@pytest.mark.slow  # `told`: three new processes
@pytest.mark.parametrize("name", ["models", "hubconf"])
def test_a_clone_names_python_m_models_and_its_requirements_files(told, name):
    clone = told[name]
    assert re.fullmatch("models" if name == "models" else r"_ghostnet_hub_\w+", clone["package"])
    assert clone["usage"].startswith("usage: python -m models ")
    assert "`python -m models prefetch tinynet_e`" in clone["offline"]
    for module, message in clone["missing"].items():
        extra = "export" if module in _requirements("export") else "deploy"
        assert message == (f'{module} is not installed (needed for a test): pip install "ghostnet-hub[{extra}]" '
                           f"(in this clone: pip install -r requirements-{extra}.txt), or just pip install {module}")


@pytest.mark.slow
def test_readme_onnx_export_runs_with_the_export_extra_alone(published, tmp_path):
    """docs/deploy.md's ONNX export command in a process where only [export]'s packages (and the
    base requirements) can be imported among the optional ones: a sitecustomize blocks the rest."""
    blocked = sorted(set(_requirements("deploy")) - set(_requirements("export")) | {"torchao"})
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n")
    block = doc("deploy").split("<!-- deploy:commands -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (line,) = [line for line in block.splitlines() if " export " in line and ".onnx" in line]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(readme_argv(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / line.split("--out ")[1].split()[0]
    assert out.stat().st_size > 1_000_000
