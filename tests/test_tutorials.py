"""The tutorial notebooks: stored with their outputs, and still running clean from a fresh kernel.

The notebooks are lessons, but each one also asserts what it claims: minigemma's function against the
transformers module it mirrors, or against a computation by hand. So running them is a test twice over: the
code they show still runs, and what they say still holds.

They are committed *with* their outputs, so that a reader browsing the repository sees every picture;
`python tutorials/run_all.py` regenerates them all. Two checks here:

  * the stored copy ran top to bottom in one kernel (execution counts 1, 2, 3, ... on every code cell), holds
    no error output, and shows at least one plot; and stays small enough for a code host to render;
  * each notebook runs again from a fresh Jupyter kernel (nbclient, kernel "python3", started in tutorials/,
    this checkout first on the import path, matplotlib's off-screen Agg backend). A cell that raises fails the
    test with nbclient's CellExecutionError, which shows the cell and its traceback. The run is not saved.

Most notebooks load the built-in model once; all of them together take about 3 minutes on 2 cores.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
MAX_STORED_BYTES = 400_000  # measured 56-176 KB per notebook with its PNGs; a code host renders up to ~1 MB


def test_there_are_tutorials():
    """Guards the parametrized tests below, which would silently run nothing if the glob found no notebook."""
    assert len(NOTEBOOKS) >= 8, f"expected at least 8 notebooks in {TUTORIALS}, found {len(NOTEBOOKS)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_its_outputs(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name}: execution counts {counts}: not run top to bottom in one kernel; "
        "regenerate with `python tutorials/run_all.py`")
    errors = [i for i, c in enumerate(cells) if any(o["output_type"] == "error" for o in c.get("outputs", []))]
    assert not errors, f"{path.name}: cells {errors} hold an error output"
    plots = [i for i, c in enumerate(cells) for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert plots, f"{path.name}: no plot in the stored outputs"
    assert path.stat().st_size < MAX_STORED_BYTES, f"{path.name}: {path.stat().st_size:,} bytes stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    pytest.importorskip("nbformat", reason="running the tutorials needs nbformat (pip install nbformat)")
    pytest.importorskip("nbclient", reason="running the tutorials needs nbclient (pip install nbclient)")
    pytest.importorskip("ipykernel", reason="running the tutorials needs a Jupyter kernel (pip install ipykernel)")
    pytest.importorskip("matplotlib", reason="the tutorials draw with matplotlib (pip install matplotlib)")
    pytest.importorskip("transformers", reason="the tutorials check against transformers (the dev extra)")

    # the kernel is a child process: it inherits this environment
    monkeypatch.setenv("MPLBACKEND", "Agg")  # draw off-screen, never open a window
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TUTORIALS.parent),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    notebook = run_all().run(path)  # raises CellExecutionError naming the failing cell

    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: some code cells did not run"
    assert any(has_assert(c.source) for c in code), f"{path.name}: no code cell has an assert statement"


def run_all():
    """tutorials/run_all.py, the script that regenerates the stored notebooks: the test runs them the same way."""
    spec = importlib.util.spec_from_file_location("run_all", TUTORIALS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
