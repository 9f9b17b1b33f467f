"""The dispatch (minigemma/kernels.py): a backend is a value the model holds, and imports go one way.

The kernels themselves are tested elsewhere: the NumPy reference against transformers (test_layers.py,
test_model.py, test_real_model.py, each on both backends) and the Numba twins against the reference
(test_kernels_numba.py). Here: which functions a model really runs, and that nothing switches them behind its
back.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigemma
from conftest import hf_logits, make_hf_model, rel_err, save
from minigemma import kernels, kernels_numba, layers

PACKAGE = Path(minigemma.__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Gemma 3 checkpoint written by transformers, with transformers' logits for a prompt."""
    hf = make_hf_model("gemma3_text", seed=11, sliding_window=5)
    directory = save(hf, tmp_path_factory.mktemp("tiny"))
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, 40)
    return directory, ids, hf_logits(hf, ids)


# ---- backends are values ---------------------------------------------------------------------------------------

def test_the_two_backends_and_their_functions():
    numpy_ops, numba_ops = kernels.get("numpy"), kernels.get("numba")
    assert numpy_ops is kernels.NUMPY and numpy_ops.name == "numpy"
    assert (numpy_ops.linear, numpy_ops.linears, numpy_ops.linear_backward, numpy_ops.embedding_rows,
            numpy_ops.attention, numpy_ops.rms_norm, numpy_ops.apply_rope, numpy_ops.geglu) == (
        layers.linear, layers.linears, layers.linear_backward, layers.embedding_rows, layers.causal_attention,
        layers.rms_norm, layers.apply_rope, layers.geglu)
    assert numba_ops.name == "numba" and kernels.get("numba") is numba_ops
    assert (numba_ops.linear, numba_ops.linears, numba_ops.linear_backward, numba_ops.attention, numba_ops.rms_norm,
            numba_ops.apply_rope, numba_ops.geglu, numba_ops.prepare) == (
        kernels_numba.linear, kernels_numba.linears, kernels_numba.linear_backward, kernels_numba.attention,
        kernels_numba.rms_norm, kernels_numba.apply_rope, kernels_numba.geglu, kernels_numba.prepare)
    assert kernels.get(numba_ops) is numba_ops
    with pytest.raises(dataclasses.FrozenInstanceError):
        numpy_ops.linear = kernels_numba.linear  # nobody rebinds a backend's functions
    with pytest.raises(ValueError, match="backend='cuda'"):
        kernels.get("cuda")


def test_load_gives_the_reference_unless_asked(tiny):
    directory, _, _ = tiny
    assert minigemma.load(directory).backend is kernels.NUMPY
    assert minigemma.load(directory, backend="numba").backend.name == "numba"
    with pytest.raises(ValueError, match="backend='fortran'"):
        minigemma.load(directory, backend="fortran")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_two_models_with_different_backends_in_one_process(tiny, quantize):
    """Loading the second model changes nothing for the first: each computes with its own backend, and both
    match transformers (float32) or each other (int8, the same quantized weights)."""
    directory, ids, expected = tiny
    reference = minigemma.load(directory, quantize=quantize)
    fast = minigemma.load(directory, quantize=quantize, backend="numba")
    assert (reference.backend.name, fast.backend.name) == ("numpy", "numba")
    with probe() as called:
        ours, theirs = reference.forward(ids), fast.forward(ids)
    assert rel_err(ours, theirs) < 1e-5
    if quantize is None:
        assert rel_err(ours, expected) < 1e-5 and rel_err(theirs, expected) < 1e-5
    assert "kernels_numba.py" in called  # the fast model ran compiled kernels in the same process ...
    with probe() as called:
        again = reference.forward(ids)
    assert "kernels_numba.py" not in called  # ... and the reference model still runs only the reference
    np.testing.assert_array_equal(again, ours)


class probe:
    """Record the file of every Python function called inside the block (sys.setprofile). A Numba kernel is
    called from kernels_numba.py's Python wrappers, so a run that reaches compiled code passes through them."""

    def __enter__(self):
        self.files: set[str] = set()

        def seen(frame, event, arg):
            if event == "call":
                self.files.add(Path(frame.f_code.co_filename).name)
        sys.setprofile(seen)
        return self.files

    def __exit__(self, *exc):
        sys.setprofile(None)


def test_a_reference_test_cannot_run_compiled_code(tiny):
    """With the Numba backend already used in this process (as in the suite), a model loaded with the reference
    runs layers.py's functions and nothing of kernels_numba.py, for every weight type it can hold."""
    directory, ids, _ = tiny
    minigemma.load(directory, quantize="int8", backend="numba").forward(ids[:3])
    for storage in (dict(), dict(quantize="int8"), dict(quantize="int4"), dict(dtype="bfloat16")):
        model = minigemma.load(directory, **storage)
        with probe() as called:
            model.forward(ids)
        assert "layers.py" in called and "kernels_numba.py" not in called, storage


# ---- imports go one way ------------------------------------------------------------------------------------------

def runtime_nodes(tree: ast.AST):
    """Every node of a module but those under `if TYPE_CHECKING:` (imports for annotations, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)  # the body is skipped
        else:
            todo.extend(ast.iter_child_nodes(node))


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at the top or inside a function (a lazy import is still an
    edge: it runs sooner or later; an import under `if TYPE_CHECKING:` never does)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        graph[name] = set()
        for node in runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    graph[name].add(node.module.split(".")[0])
                else:  # from . import a, b
                    graph[name].update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minigemma."):
                graph[name].add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                graph[name].update(a.name.split(".")[1] for a in node.names if a.name.startswith("minigemma."))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first = last), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_circle_in_the_package():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    graph = package_imports()
    assert "layers" in graph and "kernels_numba" in graph["kernels"]
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_reference_is_a_leaf_and_the_fast_side_never_imports_the_dispatcher():
    graph = package_imports()
    assert graph["layers"] <= {"weights"}  # the formulas need only the weight types
    assert "kernels" not in graph["kernels_numba"] and "layers" in graph["kernels_numba"]
    core = ("config", "params", "weights", "layers", "model", "kvcache", "sampling", "generate")
    for name in core:  # the reference core reads alone: nothing of the fast side, no ctypes, no tuning
        assert not graph[name] & {"kernels_numba", "packed"}, name
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"ctypes", "numba", "kernels_numba", "packed"}, (name, imported)
        assert not any(isinstance(n, ast.Attribute) and n.attr == "environ" for n in ast.walk(tree)), name


def test_importing_minigemma_changes_no_setting_and_loads_no_numba(tiny):
    directory, ids, _ = tiny
    script = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import minigemma\n"
        f"minigemma.load({str(directory)!r}).forward([1, 2, 3])\n"
        "print(before == dict(os.environ), 'numba' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


@pytest.mark.slow
def test_the_readme_script_runs_both_backends_on_the_builtin_model():
    """README.md's "Two backends, one model" script, run as it is: the built-in model loaded twice in one
    process, each with its backend, and their logits within float32 noise of each other (transformers on the
    same file is test_real_model.py's, for both backends)."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("\n", 1)[1] for b in readme.split("```python")[1:]]
    script = next(b.split("```")[0] for b in blocks if 'backend="numba"' in b)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    first, second, ratio = done.stdout.split()
    assert (first, second) == ("numpy", "numba")
    assert float(ratio) < 1e-4  # the two backends' logits: float32 summation order only (measured ~1e-6)
