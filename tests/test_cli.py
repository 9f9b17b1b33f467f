"""The command line, run for real in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from minigemma.generate import Sampling, chat_prompt, generate

pytestmark = pytest.mark.slow


def run(*args, stdin=None, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "minigemma", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_with_the_builtin_model_streams_what_the_library_generates(real_model):
    prompt = "The capital of France is Paris. The capital of Germany is"
    result = run("generate", prompt, "--max-new-tokens", "12", "--stats")
    assert result.returncode == 0, result.stderr
    expected = "".join(generate(real_model, real_model.tokenizer.encode(prompt), Sampling(max_new_tokens=12)))
    assert result.stdout == expected + "\n"
    assert "Berlin" in result.stdout

    stats = json.loads(result.stderr.strip().splitlines()[-1])  # the last line of stderr
    assert stats["prompt_tokens"] == len(real_model.tokenizer.encode(prompt))
    assert stats["generated_tokens"] == 12
    assert stats["backend"] == "numba"  # the command line's default (the library's is numpy)
    assert {"load_s", "time_to_first_token_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"} <= stats.keys()


def test_the_capital_of_france_with_default_settings(real_model):
    """The issue's own example: the default command prints a sensible continuation, the library's exactly."""
    prompt = "The capital of France is"
    result = run("generate", prompt)
    assert result.returncode == 0, result.stderr
    expected = "".join(generate(real_model, real_model.tokenizer.encode(prompt), Sampling()))
    assert result.stdout == expected + "\n"
    assert "France" in result.stdout and len(result.stdout.split()) > 20


def test_prompt_from_stdin_chat_and_stop(real_model, gguf_path):
    prompt = "Name a color."
    result = run("generate", "-", "--model", str(gguf_path), "--chat", "--system", "Answer in one word.",
                 "--max-new-tokens", "0", "--stats", stdin=prompt)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    chat_ids = real_model.tokenizer.encode(chat_prompt(prompt, system="Answer in one word."))
    assert stats["prompt_tokens"] == len(chat_ids) and stats["generated_tokens"] == 0

    # a stop string cuts the text exactly before it
    full = run("generate", "Monday, Tuesday,", "--max-new-tokens", "10")
    assert full.returncode == 0 and "Thursday" in full.stdout
    cut = run("generate", "Monday, Tuesday,", "--max-new-tokens", "10", "--stop", "Thursday")
    assert cut.stdout == full.stdout[:full.stdout.index("Thursday")] + "\n"


def test_seeded_sampling_is_what_the_library_samples(real_model):
    """--seed with every sampling control: the command prints what the library samples with the same settings
    (both on the NumPy reference, so the same logits), and another seed gives another text."""
    prompt = "Once upon a time"
    settings = dict(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, max_new_tokens=8)
    ids = real_model.tokenizer.encode(prompt)
    texts = {}
    for seed in (11, 12):
        args = ["generate", prompt, "--backend", "numpy", "--seed", str(seed), "--stats"]
        for key, value in settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        result = run(*args)
        assert result.returncode == 0, result.stderr
        expected = "".join(generate(real_model, ids, Sampling(seed=seed, **settings)))
        assert result.stdout == expected + "\n"
        assert json.loads(result.stderr.strip().splitlines()[-1])["backend"] == "numpy"
        texts[seed] = result.stdout
    assert texts[11] != texts[12]


@pytest.mark.parametrize("args, code, message", [
    (("generate", "hi", "--top-p", "1.5"), 2, "top_p must be in (0, 1], got 1.5"),
    (("generate", "hi", "--temperature", "-1"), 2, "temperature must be >= 0"),
    (("generate", "hi", "--max-new-tokens", "-3"), 2, "--max-new-tokens"),
    (("generate", "hi", "--quantize", "int3"), 2, "--quantize"),
    (("generate", "hi", "--system", "x"), 2, "--system needs --chat"),
    (("generate",), 2, "prompt"),
    (("generate", "hi", "--model", "/no/such/model.gguf"), 1, "/no/such/model.gguf: no such file or directory"),
])
def test_errors_are_one_clear_line(args, code, message):
    result = run(*args)
    assert result.returncode == code
    assert result.stdout == ""  # no half-written output
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]


def test_not_a_gguf_file_and_prompt_too_long(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    result = run("generate", "hi", "--model", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr

    long_prompt = "hello " * 33_000  # over the 32768-token context window
    result = run("generate", "-", stdin=long_prompt)
    assert result.returncode == 1 and result.stdout == ""
    assert "the context window is 32768 tokens" in result.stderr.strip().splitlines()[-1]


def test_installed_console_script():
    exe = shutil.which("minigemma")
    assert exe, "the `minigemma` command is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout


def test_stats_report_weight_bytes_and_backend(real_model):
    """--stats says how the weights are stored and what they occupy: float32 with --quantize none (the library's
    default load), about 3.5x less as int8, less again as int4; and the backend that ran (numba by default)."""
    reports = {}
    for quantize in ("none", "int8", "int4"):
        result = run("generate", "Hello", "--max-new-tokens", "2", "--quantize", quantize, "--stats")
        assert result.returncode == 0, result.stderr
        reports[quantize] = json.loads(result.stderr.strip().splitlines()[-1])
    assert reports["none"]["weight_bytes"] == real_model.nbytes
    assert reports["none"]["quantize"] is None and reports["int8"]["quantize"] == "int8"
    assert 3 < reports["none"]["weight_bytes"] / reports["int8"]["weight_bytes"] < 4
    assert reports["int4"]["weight_bytes"] < reports["int8"]["weight_bytes"]
    assert {r["backend"] for r in reports.values()} == {"numba"}


SPY_ON_NUMPY = """
import importlib.abc, json, os, sys

seen = {}  # the two variables as they were when NumPy began to load


class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.update({k: os.environ.get(k) for k in ("OPENBLAS_THREAD_TIMEOUT", "NUMPY_MADVISE_HUGEPAGE")})
        return None  # the normal finders load it


sys.meta_path.insert(0, Spy())
import minigemma  # as `python -m minigemma` does, before its __main__
import numpy as np

print(json.dumps(dict(seen, huge_pages=bool(np._core.multiarray._get_madvise_hugepage()))))
"""


@pytest.mark.parametrize("user", [{}, {"OPENBLAS_THREAD_TIMEOUT": "10", "NUMPY_MADVISE_HUGEPAGE": "1"}],
                         ids=["defaults", "user's own values"])
def test_process_defaults_are_set_before_numpy_loads(user):
    """NumPy reads OPENBLAS_THREAD_TIMEOUT (OpenBLAS) and NUMPY_MADVISE_HUGEPAGE once, when it is imported, so
    minigemma/__init__.py sets them before importing it; a user's own values are kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "NUMPY_MADVISE_HUGEPAGE")}
    result = subprocess.run([sys.executable, "-c", SPY_ON_NUMPY], capture_output=True, text=True,
                            env={**env, **user}, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    expected = user or {"OPENBLAS_THREAD_TIMEOUT": "24", "NUMPY_MADVISE_HUGEPAGE": "0"}
    assert {k: seen[k] for k in expected} == expected
    assert seen["huge_pages"] is (expected["NUMPY_MADVISE_HUGEPAGE"] == "1")  # NumPy took the setting
