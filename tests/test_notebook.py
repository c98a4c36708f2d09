"""examples/quickstart.ipynb, executed cell by cell by a real Jupyter kernel, outside the clone
(as in Colab: the notebook alone, the code from torch.hub)."""
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs_outside_the_clone(published, monkeypatch, tmp_path):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    monkeypatch.setenv("GHOSTNET_HUB_REPO", str(ROOT))  # a local clone instead of GitHub
    alone = tmp_path / "quickstart.ipynb"  # nothing beside it: no photo, no models package
    shutil.copy(NOTEBOOK, alone)
    notebook = nbformat.read(alone, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on any error.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    # First the install cell, as Colab users expect; here everything is installed already.
    assert "pip" in code[0].source and _text(code[0]).strip() == "installed: nothing, all there"
    outputs = "\n".join(_text(c) for c in code)
    assert f"loading from {ROOT} (local)" in outputs
    top5 = _text(code[3]).strip().splitlines()
    assert len(top5) == 5 and all(line.endswith("%") for line in top5)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in code[4].outputs), "the image with its top-5 is shown"
    assert "stride  4: (1, 24, 80, 120)" in outputs and "stride 32: (1, 320, 10, 15)" in outputs
    assert "train mode: True" in outputs and "step 0: loss" in outputs and "step 1: loss" in outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart.ipynb"]  # it wrote nothing beside itself
