"""Every notebook executes headlessly without error (nbclient + ipykernel, kernel "python3").

The committed notebooks carry their outputs; here they run from a fresh copy in memory (the files are not
rewritten) with the notebooks folder as working directory, so relative paths (learned_pair/) resolve.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300  # generous: a loaded shared machine; each notebook takes ~15 s of CPU
EXPECTED = ("01_toy_1d.ipynb", "02_toy_2d.ipynb", "03_theory.ipynb", "04_learned_pair.ipynb")


def test_all_expected_notebooks_exist():
    present = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    assert set(EXPECTED) <= present, sorted(set(EXPECTED) - present)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_executes(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert any(c.cell_type == "code" and c.get("outputs") for c in nb.cells), f"{name} is committed without outputs"
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert images, f"{name} draws no figure"
