"""examples/quickstart.ipynb, executed cell by cell by a real Jupyter kernel."""
import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _text(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_quickstart_notebook_runs(published, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    monkeypatch.setenv("GHOSTNET_HUB_REPO", str(ROOT))  # a local clone instead of GitHub
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, on any error.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    outputs = "\n".join(_text(c) for c in code)
    assert f"loading from {ROOT} (local)" in outputs
    top5 = _text(code[2]).strip().splitlines()
    assert len(top5) == 5 and all(line.endswith("%") for line in top5)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for o in code[3].outputs), "the image with its top-5 is shown"
    assert "stride  4: (1, 24, 80, 120)" in outputs and "stride 32: (1, 320, 10, 15)" in outputs
    assert "step 0: loss" in outputs and "step 1: loss" in outputs
