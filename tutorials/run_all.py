"""Run every tutorial notebook from a fresh kernel and save it in place, with its outputs.

    python tutorials/run_all.py                  # all of them, in order
    python tutorials/run_all.py 04_attention     # only the notebooks whose name contains one of the words

The notebooks are stored with their outputs so that a reader browsing the repository sees every picture.
This is the one command that regenerates them. Each runs in its own kernel, started in tutorials/, with this
checkout first on the import path; plots are drawn by the inline backend as PNGs at a modest resolution.
A cell that raises stops the run with nbclient's CellExecutionError (naming the cell); that notebook is not saved.

The code cell tagged `readme-picture` (in Jupyter: View > Cell Toolbar > Tags) also has its PNG written to
docs/images/, for the README.
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import nbclient
import nbformat

TUTORIALS = Path(__file__).resolve().parent
ROOT = TUTORIALS.parent
PICTURE_TAG = "readme-picture"
PICTURES = ROOT / "docs" / "images"
CELL_TIMEOUT_S = 600


def run(path: Path) -> nbformat.NotebookNode:
    """Execute one notebook in a fresh kernel and return it with its outputs (the file is not touched)."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}},
                                     record_timing=False)  # no timestamps: re-running changes only what changed
    client.execute()
    return notebook


def save_picture(notebook: nbformat.NotebookNode, name: str) -> Path | None:
    """Write the PNG of the cell tagged `readme-picture`, if the notebook has one, to docs/images/{name}.png."""
    for cell in notebook.cells:
        if PICTURE_TAG in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    PICTURES.mkdir(parents=True, exist_ok=True)
                    target = PICTURES / f"{name}.png"
                    target.write_bytes(base64.b64decode(png))
                    return target
            raise SystemExit(f"{name}: the cell tagged {PICTURE_TAG!r} drew no PNG")
    return None


def main(words: list[str]) -> int:
    # the kernels are child processes: they inherit this environment
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # PNGs into the outputs
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # (minigemma.load() gives the NumPy reference, so the functions the notebooks print with inspect.getsource
    # are the ones that run; a notebook that wants speed asks for backend="numba" itself.)
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"  # tqdm's warning on importing transformers
    paths = [p for p in sorted(TUTORIALS.glob("*.ipynb")) if not words or any(w in p.stem for w in words)]
    if not paths:
        print(f"no notebook in {TUTORIALS} matches {words}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        notebook = run(path)
        nbformat.write(notebook, path)
        picture = save_picture(notebook, path.stem)
        print(f"  saved {path.name}" + (f" and {picture.relative_to(ROOT)}" if picture else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
