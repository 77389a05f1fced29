"""Every notebook in colabs/ runs headless (small-size switch on), and is committed without outputs."""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXPEFT_COLAB_SMALL", "1")
  monkeypatch.setenv("JAXPEFT_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel: faster than the suite's 8
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv(
      "PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
  )  # kernel = this venv
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
      notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()  # raises CellExecutionError when a cell raises


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_cells_are_markdown(path):
  for cell in nbformat.read(path, as_version=4).cells:
    if cell.cell_type == "markdown":
      assert not cell.source.startswith("md"), f"{path.name}: a markdown cell starts with {cell.source[:8]!r}"
