"""The errors minigemma raises on purpose: one base class, a few kinds.

Every message names the thing at fault (a file, a tensor, a metadata field, a flag, a value) and what was
expected, so that one line is enough to fix the problem. The command line prints that line and exits with
code 2 for a `UsageError`, 1 for any other `MinigemmaError`; `--debug` shows the traceback too.

The base class derives from ValueError, so `except ValueError` catches them all, as it does NumPy's and the
standard library's complaints about a bad value.
"""

from __future__ import annotations


class MinigemmaError(ValueError):
    """Base class: anything minigemma refuses, with a message that says what and why."""


class ModelFileError(MinigemmaError):
    """A model file or directory that is missing, truncated, inconsistent, unsupported or untrusted
    (a safetensors or GGUF header that doesn't fit its file, a tensor of the wrong shape, a pickle)."""


class InvalidArgument(MinigemmaError):
    """An argument of the Python API out of its range or of the wrong kind (sampling values, token ids,
    chat messages)."""


class UnknownToken(InvalidArgument, KeyError):
    """A piece that is not in the vocabulary. Also a KeyError, as a dict lookup would be."""

    __str__ = BaseException.__str__  # KeyError would print the message in quotes


class TokenIdOutOfRange(InvalidArgument, IndexError):
    """A token id outside [0, vocab_size). Also an IndexError, as a list lookup would be."""


class ContextOverflow(MinigemmaError):
    """A prompt or a conversation longer than the model's context window."""


class UsageError(MinigemmaError):
    """A bad command-line flag or combination of flags (exit code 2, like argparse's own errors)."""
