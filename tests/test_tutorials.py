"""Every notebook in tutorials/ runs top to bottom without an error.

The notebooks are lessons, but each one also asserts: minigemma's function against the transformers module or
mask function it mirrors. So running them is a test twice over: the code they show still runs, and what they
claim still holds. They use tiny random inputs only (no checkpoint, no network), a few seconds each.

Each notebook runs in a fresh Jupyter kernel (nbclient, kernel "python3"), started from the tutorials directory,
with matplotlib's non-interactive Agg backend and this checkout first on the import path. A cell that raises
fails the test with nbclient's CellExecutionError, which shows the cell and its traceback.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 120


def test_there_are_tutorials():
    """Guards the parametrized test below, which would silently run nothing if the glob found no notebook."""
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(path):
    """Notebooks are committed with outputs cleared, to keep the repository small and diffs readable
    (Jupyter: Edit > Clear Outputs of All Cells before saving)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    with_outputs = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count")]
    assert not with_outputs, f"{path.name}: cells {with_outputs} have saved outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="running the tutorials needs nbformat (pip install nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="running the tutorials needs nbclient (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="running the tutorials needs a Jupyter kernel (pip install ipykernel)")
    pytest.importorskip("matplotlib", reason="the tutorials draw with matplotlib (pip install matplotlib)")
    pytest.importorskip("transformers", reason="the tutorials check against transformers (the dev extra)")

    # the kernel is a child process: it inherits this environment
    monkeypatch.setenv("MPLBACKEND", "Agg")  # draw off-screen, never open a window
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TUTORIALS.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: some code cells did not run"
    assert any(has_assert(c.source) for c in code), f"{path.name}: no code cell has an assert statement"


def has_assert(source: str) -> bool:
    """Whether a cell's code holds a real `assert` statement (a comment or a string saying "assert" does not
    count). IPython magics (%time, !pip) are blanked out first: they are not Python."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return False
    return any(isinstance(node, ast.Assert) for node in ast.walk(tree))


def test_has_assert_reads_code_not_text():
    assert has_assert("x = 1\nassert x == 1, 'one'")
    assert has_assert("for i in range(3):\n    assert i < 3")
    assert not has_assert("# assert that it works\nx = 1")
    assert not has_assert("print('we assert nothing')")
