"""The notebooks run top to bottom against the bundled testbed model and draw their figures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def execute(name: str, **params) -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "scripts" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit notebooks output-free"
    )
    for key, value in params.items():  # override a line of the parameters cell
        cell = nb.cells[1]
        lines = [f"{key} = {value!r}" if ln.startswith(f"{key} =") else ln for ln in cell.source.splitlines()]
        cell.source = "\n".join(lines)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    return nb


def images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


@pytest.mark.parametrize("name,figures", [("run_segmentation.ipynb", 3), ("run_generation.ipynb", 1)])
def test_notebook_runs_on_bundled_model(name, figures):
    nb = execute(name, DEVICE="cpu", **({"STEPS": 10} if "generation" in name else {}))
    assert images(nb) == figures
