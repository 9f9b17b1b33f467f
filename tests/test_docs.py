"""The docs name only things that exist: files, functions, command-line flags.

Read: README.md, the READMEs of tutorials/ and minigemma/configs/, docs/*.md, and the markdown cells of every
notebook in tutorials/ (their code cells are run by test_tutorials.py, which catches a stale name there). The
rules are narrow on purpose, so prose is never mistaken for a name:

  * paths that start with one of this repository's folders (`minigemma/layers.py`, `tests/test_model.py`,
    `tutorials/04_attention.ipynb`), anywhere in the text, must exist;
  * relative markdown links and images, `[text](../minigemma/model.py)`, must point at an existing file;
  * in `backticks`: a dotted name rooted in the package (`minigemma.layers.rms_norm`, `minigemma.model:forward`,
    `minigemma.load(source)`) must import and resolve attribute by attribute; `Class.attr` where Class is a
    class of the package (`GemmaConfig.qk_norm`, `LayerCache.update`) must be an attribute or dataclass field;
    `module.name` where module is one of the package's modules (`model.forward`, `layers.mlp(x, ...)`) must
    exist in it, unless it reads as a file name (`config.json`, `tokenizer.model`) or has more dots (tensor
    names such as `model.norm.weight`); a bare `name()` must be a function or method somewhere in the package.
    Names of other projects (`RMSNorm(add_unit_offset=True)`, `np.memmap(...)`) are left alone;
  * flags: a backticked `--flag ...`, and every `--flag` in a fenced code block that runs `minigemma generate`,
    must be an option of the command line (`minigemma.cli.build_parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest

import minigemma
from minigemma.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
REPO_DIRS = ("minigemma", "tests", "tutorials", "docs", "benchmarks")


def documents() -> list[tuple[str, str, Path]]:
    """(label, markdown text, folder its relative links start from) for every doc and notebook."""
    docs = [ROOT / "README.md", ROOT / "tutorials" / "README.md", ROOT / "minigemma" / "configs" / "README.md",
            *sorted((ROOT / "docs").glob("*.md"))]
    out = [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8"), p.parent) for p in docs if p.exists()]
    for nb in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "markdown":
                out.append((f"{nb.relative_to(ROOT)} cell {i}", "".join(cell["source"]), nb.parent))
    return out


# ---- the package's namespace ----------------------------------------------------------------------------

@functools.cache
def package_modules() -> tuple:
    return (minigemma,) + tuple(importlib.import_module(f"minigemma.{m.name}")
                                for m in pkgutil.iter_modules(minigemma.__path__)
                                if m.name != "__main__")  # importing __main__ would run the command line


def module_names() -> set[str]:
    return {m.__name__.split(".")[-1] for m in package_modules()[1:]}


@functools.cache
def package_classes() -> dict[str, type]:
    return {name: obj for module in package_modules() for name, obj in vars(module).items()
            if inspect.isclass(obj) and getattr(obj, "__module__", "").startswith("minigemma")}


def has_attribute(obj, name: str) -> bool:
    if hasattr(obj, name):
        return True
    return dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}


def resolves(dotted: str) -> bool:
    """`minigemma.a.b` or `minigemma.a:b.c`: import the longest module prefix, then getattr the rest."""
    parts = dotted.replace(":", ".").split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not has_attribute(obj, name):
                return False
            obj = getattr(obj, name, None)
        return True
    return False


@functools.cache
def function_names() -> set[str]:
    names = set()
    for module in package_modules():
        names |= {n for n, obj in vars(module).items() if callable(obj)}
    for cls in package_classes().values():
        names |= {n for n, obj in vars(cls).items() if callable(obj) or isinstance(obj, (property, classmethod))}
    return names


@functools.cache
def cli_flags() -> set[str]:
    flags = {"--help"}
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:  # argparse keeps no public list of options
            flags |= {s for s in action.option_strings if s.startswith("--")}
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return flags


# ---- the rules ---------------------------------------------------------------------------------------------

PATH = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*\w)" % "|".join(REPO_DIRS))
LINK = re.compile(r"\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
PACKAGE_NAME = re.compile(r"(minigemma(?:\.\w+)*(?::\w+(?:\.\w+)*)?)(?:\(.*\))?")
CLASS_ATTR = re.compile(r"([A-Z]\w*)\.(\w+)(?:\(.*\))?")
MODULE_ATTR = re.compile(r"([a-z_]+)\.(\w+)(?:\(.*\))?")
FILE_SUFFIXES = {"json", "model", "safetensors", "gguf", "py", "md", "ipynb", "txt", "bin", "cpp", "h", "toml"}
BARE_CALL = re.compile(r"(\w+)\(\)")


def missing_names(text: str, base: Path) -> list[str]:
    """Every name in `text` that the rules above check and that does not exist."""
    missing = []
    for path in PATH.findall(text):
        if not (ROOT / path).exists():
            missing.append(path)
    for target in LINK.findall(text):
        target = target.split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not (base / target).exists():
            missing.append(target)
    classes, functions = package_classes(), function_names()
    for span in SPAN.findall(text):
        if m := PACKAGE_NAME.fullmatch(span):
            if not resolves(m.group(1)):
                missing.append(span)
        elif (m := CLASS_ATTR.fullmatch(span)) and m.group(1) in classes:
            if not has_attribute(classes[m.group(1)], m.group(2)):
                missing.append(span)
        elif (m := MODULE_ATTR.fullmatch(span)) and m.group(1) in module_names() and m.group(2) not in FILE_SUFFIXES:
            if not resolves(f"minigemma.{m.group(1)}.{m.group(2)}"):
                missing.append(span)
        elif (m := BARE_CALL.fullmatch(span)) and m.group(1) not in functions:
            missing.append(span)
    flags = cli_flags()
    commands = [block for block in FENCE.findall(text) if "minigemma generate" in block]
    backticked = [span for span in SPAN.findall(text) if span.startswith("--")]
    for source in commands + backticked:
        missing += [flag for flag in FLAG.findall(source) if flag not in flags]
    return missing


DOCUMENTS = documents()


def test_docs_are_found():
    labels = [label for label, _, _ in DOCUMENTS]
    assert "README.md" in labels and "docs/architecture.md" in labels
    assert any(label.startswith("tutorials/") and "cell" in label for label in labels)


@pytest.mark.parametrize("label, text, base", DOCUMENTS, ids=[d[0] for d in DOCUMENTS])
def test_every_name_in_the_docs_exists(label, text, base):
    missing = missing_names(text, base)
    assert not missing, f"{label} names what does not exist: {', '.join(sorted(set(missing)))}"


def test_the_rules_catch_stale_names_and_leave_prose_alone():
    base = ROOT / "docs"
    stale = {
        "see minigemma/no_such_module.py": "minigemma/no_such_module.py",
        "[the code](../minigemma/gone.py)": "../minigemma/gone.py",
        "`minigemma.layers.no_such_function`": "minigemma.layers.no_such_function",
        "`minigemma.model:no_such`": "minigemma.model:no_such",
        "`GemmaConfig.no_such_field`": "GemmaConfig.no_such_field",
        "`model.no_such(ids)`": "model.no_such(ids)",
        "`no_such_function()`": "no_such_function()",
        "`--no-such-flag`": "--no-such-flag",
        "```\npython -m minigemma generate hi --no-such-flag 3\n```": "--no-such-flag",
    }
    for text, name in stale.items():
        assert missing_names(text, base) == [name], text
    fine = ("`minigemma.layers.rms_norm`, `minigemma.model:forward`, `minigemma.load(source)`, "
            "`GemmaConfig.qk_norm`, `LayerParams.q_norm`, `LayerCache.update`, `rms_norm()`, `--top-k 40`, "
            "`model.forward(ids)`, `layers.mlp`, `config.json`, `tokenizer.model`, `model.norm.weight`, "
            "[architecture](architecture.md#shapes), minigemma/layers.py, tests/test_model.py, "
            "`RMSNorm(add_unit_offset=True)`, `np.memmap(path)`, `pip install -e .`, models/gemma/x.py, "
            "https://example.org/tests/none.py, the minigemma. package, --flags in prose")
    assert missing_names(fine, base) == []
