"""tutorial.ipynb: the committed copy carries its outputs (its figures show on GitHub without running it), and it
still runs top to bottom. The run executes an in-memory copy with nbclient; the committed file is never rewritten.

To refresh the committed outputs after editing the notebook, execute it in place from the repository root:
    python -c "import nbclient, nbformat; nb = nbformat.read('tutorial.ipynb', 4); \
nbclient.NotebookClient(nb, timeout=900, kernel_name='python3').execute(); nbformat.write(nb, 'tutorial.ipynb')"
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "tutorial.ipynb"
FIGURE_CELLS = 7  # code cells tagged "figure": each must draw at least one PNG (the "optional-figure" cell may not)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def tagged(notebook, tag):
    return [cell for cell in code_cells(notebook) if tag in cell.metadata.get("tags", [])]


def png_count(cell):
    return sum("image/png" in output.get("data", {}) for output in cell.outputs)


def error_outputs(notebook):
    return [(index, output.get("ename"), output.get("evalue")) for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" for output in cell.outputs if output.output_type == "error"]


def check_figures(notebook):
    figures = tagged(notebook, "figure")
    assert len(figures) == FIGURE_CELLS, f"expected {FIGURE_CELLS} cells tagged 'figure', found {len(figures)}"
    missing = [cell.source.splitlines()[0] for cell in figures if png_count(cell) == 0]
    assert not missing, f"figure cells without a PNG output (first lines): {missing}"


def test_committed_notebook_has_outputs_from_one_top_to_bottom_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    counts = [cell.execution_count for cell in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), (
        "the committed notebook must be saved right after one clean top-to-bottom run "
        f"(execution counts 1..{len(counts)}), got {counts}")
    assert not error_outputs(notebook), error_outputs(notebook)
    check_figures(notebook)
    assert NOTEBOOK.stat().st_size < 3_000_000, "keep the committed notebook small (PNG figures at modest dpi)"


def test_notebook_runs_top_to_bottom_and_draws_its_figures():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in code_cells(notebook):  # start from a blank slate: what is checked below comes from this run
        cell.outputs, cell.execution_count = [], None
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    assert not error_outputs(notebook), error_outputs(notebook)
    check_figures(notebook)
    optional = tagged(notebook, "optional-figure")
    assert len(optional) == 1 and optional[0].outputs, "the benchmark-results cell must say what it found"
