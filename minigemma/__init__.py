"""minigemma: a readable pure-NumPy reference implementation of Gemma 1, 2 and 3 text models."""

from .config import GemmaConfig
from .loading import load
from .model import Gemma

__all__ = ["load", "Gemma", "GemmaConfig"]
__version__ = "0.1.0"
