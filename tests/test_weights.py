"""Weight types (minigemma/weights.py) and the NumPy reference that reads them (layers.linear, layers.embedding_rows).

Oracles: the gguf package's own Q8_0 / Q4_1 quantizers and dequantizers (our int8 and int4 are those formats,
byte for byte), torch's bfloat16 rounding, and float64 products computed here on the dequantized weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from hypothesis import HealthCheck, given, settings, strategies as st

import minigemma
from minigemma import layers, weights
from minigemma.weights import Float16Bits, Int4, Int8, dequantize, to_weight

EPS32 = float(np.finfo(np.float32).eps)

MAKE = {
    "bfloat16": lambda x: Float16Bits.from_float(x, "bfloat16"),
    "float16": lambda x: Float16Bits.from_float(x, "float16"),
    "int8": Int8.from_float,
    "int4": Int4.from_float,
}
GROUPED = ("int8", "int4")  # widths must be whole groups of 32


def matrix(rng, rows, cols, scale=1.0):
    x = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    x[rows // 2] *= 30  # one row far larger: a mixed-up row or scale would show
    return x


# ---- formats, bit for bit -------------------------------------------------------------------------------

def odd_matrix():
    x = matrix(np.random.default_rng(0), 7, 96)
    x[0, :32] = 0  # an all-zero group: scale 0, no division by zero
    x[1, 32:64] = 5.0  # a constant group: max == min for int4
    return x


def test_int8_is_llama_cpps_q8_0():
    """int8 is Q8_0: our quantizer writes the very bytes gguf's (= llama.cpp's reference) quantizer writes, and
    rows() dequantizes them as gguf does, bit for bit."""
    x = odd_matrix()
    ours, raw = Int8.from_float(x), gguf_quants.quantize(x, T.Q8_0)
    theirs = Int8.from_q8_0(raw, x.shape)
    for f in vars(ours):  # compared as bits (fp16 scales too: -0.0 and NaN would not slip through)
        a, b = np.ascontiguousarray(getattr(ours, f)), np.ascontiguousarray(getattr(theirs, f))
        assert a.dtype == b.dtype, f
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), f)
    np.testing.assert_array_equal(ours.rows(0, 7), gguf_quants.dequantize(raw, T.Q8_0))
    np.testing.assert_array_equal(ours.rows(2, 5), gguf_quants.dequantize(raw, T.Q8_0)[2:5])


def as_q4_1_bytes(w: Int4) -> np.ndarray:
    """Our int4 laid out as GGUF Q4_1 blocks: d, m (fp16), 16 bytes of nibbles."""
    out, groups, _ = w.nibbles.shape
    return np.concatenate([w.d[..., None].view(np.uint8), w.m[..., None].view(np.uint8), w.nibbles],
                          axis=-1).reshape(out, groups * 20)


@pytest.mark.parametrize("seed", range(3))
def test_int4_is_q4_1_with_least_squares_scales(seed):
    """int4 is Q4_1's layout, read as gguf reads Q4_1, bit for bit; its quantizer picks d and m by least
    squares, so no group has a larger squared error than under llama.cpp's reference Q4_1 quantizer."""
    x = odd_matrix() * (seed + 1) if seed else odd_matrix()
    if seed == 2:
        x = np.abs(x) ** 2  # skewed groups, all >= 0
    ours = Int4.from_float(x)
    np.testing.assert_array_equal(ours.rows(0, 7), gguf_quants.dequantize(as_q4_1_bytes(ours), T.Q4_1))
    np.testing.assert_array_equal(Int4.from_q4_1(as_q4_1_bytes(ours), x.shape).rows(0, 7), ours.rows(0, 7))
    naive = gguf_quants.dequantize(gguf_quants.quantize(x, T.Q4_1), T.Q4_1)
    group_sse = lambda y: ((y - x) ** 2).reshape(7, -1, 32).sum(-1)  # noqa: E731
    assert (group_sse(ours.rows(0, 7)) <= group_sse(naive) * (1 + 1e-6) + 1e-12).all()
    assert group_sse(ours.rows(0, 7)).sum() < group_sse(naive).sum()  # and better overall


def test_int4_recovers_a_4_bit_grid():
    """A group that already is d q + m (a Q4_K sub-block, say) using only levels 1..14 comes back exactly: the
    least-squares fit finds the grid (13 steps across the span is one of its candidates), where spanning
    max - min with 15 steps would not."""
    rng = np.random.default_rng(5)
    q = rng.integers(1, 15, size=(4, 64)).astype(np.float32)
    q[:, ::32], q[:, 1::32] = 1, 14  # each group of 32 spans exactly 1..14
    x = (q * np.float32(0.125) - np.float32(1.0)).astype(np.float32)  # d and m exact in fp16
    np.testing.assert_array_equal(Int4.from_float(x).rows(0, 4), x)
    naive = gguf_quants.dequantize(gguf_quants.quantize(x, T.Q4_1), T.Q4_1)
    assert not np.array_equal(naive, x)


def q4_k_bytes(rng, rows: int, width: int) -> np.ndarray:
    """Random GGUF Q4_K data (rows, width/256 * 144): any bytes make a valid block once d and dmin are
    ordinary fp16 numbers (the 6-bit scales and mins and the nibbles take every value)."""
    b = rng.integers(0, 256, size=(rows * width // 256, 144), dtype=np.uint8)
    b[:, 0:2] = rng.uniform(1e-4, 1e-2, (len(b), 1)).astype(np.float16).view(np.uint8)  # d
    b[:, 2:4] = rng.uniform(1e-4, 1e-2, (len(b), 1)).astype(np.float16).view(np.uint8)  # dmin
    return b.reshape(rows, -1)


def q4_k_as_int4_bound(w: Int4) -> np.ndarray:
    """Per element, the most Int4.from_q4_k may move a Q4_K weight: each sub-block's scale and offset are
    rounded to fp16, half an ulp: at most 2^-11 of the rounded value, or 2^-25 once subnormal; q <= 15; plus
    float32 rounding in the two dequantizers."""
    d, m = np.abs(w.d.astype(np.float64)), np.abs(w.m.astype(np.float64))
    bound = (2.0**-11 + 4 * EPS32) * (15 * d + m) + 16 * 2.0**-25
    return np.repeat(bound, 32, axis=-1)


def test_q4_k_becomes_int4_without_requantizing():
    """A Q4_K sub-block of 32 weights is (d sc) q - dmin m: int4 keeps its levels and rounds only the two
    products to fp16. That is within the fp16 bound of gguf's own dequantizer, and much closer to the file
    than requantizing it to int8 (half an int8 step, amax/254) would be."""
    rng = np.random.default_rng(7)
    rows, width = 5, 768
    raw = q4_k_bytes(rng, rows, width)
    exact = gguf_quants.dequantize(raw, T.Q4_K)
    w = Int4.from_q4_k(raw, (rows, width))
    assert w.shape == (rows, width) and w.nbytes == rows * width * 20 // 32
    got = w.rows(0, rows)
    assert (np.abs(got - exact) <= q4_k_as_int4_bound(w)).all()
    int8_error = np.abs(dequantize(Int8.from_float(exact)) - exact).max()
    assert np.abs(got - exact).max() < int8_error / 4
    np.testing.assert_array_equal(w.rows(2, 4), got[2:4])


def test_q4_k_scales_beyond_float16():
    """d = 2000 times a 6-bit scale of 63 is 126,000, past fp16's 65504: int4 cannot hold that sub-block. Asked
    for int8, the tensor is requantized instead (its scales, amax/127, fit); asked for int4, it is an error."""
    from types import SimpleNamespace

    from minigemma.gguf_file import GGUFTensor

    raw = q4_k_bytes(np.random.default_rng(3), 1, 256)
    raw[0, 0:2] = np.array([2000], np.float16).view(np.uint8)  # d
    raw[0, 4] = 63  # the 6-bit scale of sub-block 0
    with pytest.raises(ValueError, match="65504"):
        Int4.from_q4_k(raw, (1, 256))
    t = GGUFTensor(SimpleNamespace(name="blk.0.ffn_down.weight", tensor_type=T.Q4_K, shape=np.array([256, 1]),
                                   data=raw))
    assert t.stored("int8") is None  # to_weight then requantizes it
    w = to_weight(t, "int8")
    exact = gguf_quants.dequantize(raw, T.Q4_K)
    assert isinstance(w, Int8) and (np.abs(dequantize(w) - exact) <= worst_error(exact, "int8")).all()
    with pytest.raises(ValueError, match="65504"):
        t.stored("int4")


def test_bfloat16_rounds_as_torch():
    x = np.random.default_rng(1).standard_normal((9, 40)).astype(np.float32) * 1e3
    x[0, :4] = [np.inf, -np.inf, 0.0, -0.0]
    w = Float16Bits.from_float(x, "bfloat16")
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(w.rows(0, 9), expected)


def worst_error(x: np.ndarray, kind: str) -> np.ndarray:
    """The largest |x - dequantize(quantize(x))| each format allows, per element (from its definition):
      bfloat16  8 significant bits, round to nearest:  |x| 2^-8      float16  11 bits: |x| 2^-11 (normal range)
      int8      d = amax/127, q = round(x/d):          d/2
    plus the fp16 rounding of the stored d: half an ulp, 2^-11 relative (2^-25 absolute once subnormal), times up
    to 127 steps; and a few float32 roundings. (int4 picks d and m by least squares: its bound is a group's
    squared error, in test_int4_is_q4_1_with_least_squares_scales and below.)"""
    if kind == "bfloat16":
        return np.abs(x) * 2.0**-8
    if kind == "float16":
        return np.abs(x) * 2.0**-11 + 2.0**-25  # plus half the smallest subnormal step
    g = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(g).max(-1, keepdims=True)
    d = amax / 127
    bound = d / 2 + 127 * np.maximum(d * 2.0**-11, 2.0**-25) + 8 * EPS32 * amax
    return np.broadcast_to(bound, g.shape).reshape(x.shape)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(list(MAKE)), rows=st.integers(1, 9), groups=st.integers(1, 4),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_round_trip_error_is_within_the_format(kind, rows, groups, scale, seed):
    x = matrix(np.random.default_rng(seed), rows, 32 * groups, scale)
    back = dequantize(MAKE[kind](x))
    assert back.shape == x.shape and back.dtype == np.float32
    if kind == "int4":  # no worse, group by group, than llama.cpp's reference Q4_1 (the span of the group)
        naive = gguf_quants.dequantize(gguf_quants.quantize(x, T.Q4_1), T.Q4_1)
        sse = lambda y: ((y - x) ** 2).reshape(rows, groups, 32).sum(-1)  # noqa: E731
        assert (sse(back) <= sse(naive) * (1 + 1e-6) + 1e-30).all()
    else:
        assert (np.abs(back - x) <= worst_error(x, kind)).all()


@pytest.mark.parametrize("kind", list(MAKE))
def test_nbytes_is_what_the_format_stores(kind):
    out, width = 6, 64
    w = MAKE[kind](matrix(np.random.default_rng(2), out, width))
    per_weight = {"bfloat16": 2, "float16": 2, "int8": 1 + 2 / 32, "int4": 0.5 + 4 / 32}[kind]
    assert w.shape == (out, width)
    assert weights.nbytes(w) == out * width * per_weight


# ---- the kernels -----------------------------------------------------------------------------------------

@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so that every product crosses block boundaries (and the last block is short).
    The same for every example of a hypothesis test: it is a constant, not state."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 4 * 32 * 3)  # 3 rows of 32 floats


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["float32"] + list(MAKE)), tokens=st.integers(1, 5), out=st.integers(1, 23),
       groups=st.integers(1, 3), odd=st.integers(0, 31), seed=st.integers(0, 2**16))
def test_linear_equals_a_float64_product_on_the_dequantized_weights(small_blocks, kind, tokens, out, groups, odd,
                                                                    seed):
    """Odd shapes: any number of tokens and output rows; widths any number for 16-bit types, whole groups
    for int8/int4. The bound is the classic one for a float32 dot product of length n: n eps sum|x||w|."""
    width = 32 * groups + (0 if kind in GROUPED else odd)
    rng = np.random.default_rng(seed)
    w = matrix(rng, out, width) if kind == "float32" else MAKE[kind](matrix(rng, out, width))
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    W = dequantize(w).astype(np.float64)
    expected = x.astype(np.float64) @ W.T
    ours = layers.linear(x, w)
    assert ours.shape == (tokens, out) and ours.dtype == np.float32
    bound = width * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(W).T) + 1e-30
    assert (np.abs(ours - expected) <= bound).all()


@pytest.mark.parametrize("kind", ["float32"] + list(MAKE))
def test_embedding_rows_are_the_dequantized_rows(kind):
    rng = np.random.default_rng(3)
    table = matrix(rng, 50, 64)
    w = table if kind == "float32" else MAKE[kind](table)
    ids = np.array([0, 49, 7, 7, 25])
    np.testing.assert_array_equal(layers.embedding_rows(w, ids), dequantize(w)[ids])


# ---- converting while loading -----------------------------------------------------------------------------

class CountingTensor(weights.StoredTensor):
    """A stored float32 matrix that records the largest block of rows ever asked for."""

    def __init__(self, x):
        self.x, self.shape, self.largest = x, x.shape, 0

    def read(self):
        self.largest = max(self.largest, self.shape[0])
        return self.x.copy()

    def rows(self, start, stop):
        self.largest = max(self.largest, stop - start)
        return self.x[start:stop].copy()


@pytest.mark.parametrize("kind", list(MAKE))
def test_conversion_goes_a_block_of_rows_at_a_time(monkeypatch, kind):
    """No float32 copy of a whole matrix is made while converting it, and the result is the same as
    converting it whole."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 4 * 64 * 5)  # 5 rows of 64
    x = matrix(np.random.default_rng(4), 23, 64)
    t = CountingTensor(x)
    w = to_weight(t, kind)
    assert t.largest == 5
    np.testing.assert_array_equal(dequantize(w), dequantize(MAKE[kind](x)))
    assert to_weight(CountingTensor(x[0]), kind).dtype == np.float32  # 1-D (a norm): always float32


# ---- whole models ------------------------------------------------------------------------------------------
# Loaded with the NumPy backend (load()'s default): these tests are about the reference weight types (the Numba
# backend repacks int8/int4 into its own layouts, tested in test_kernels_numba.py).

@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory):
    from conftest import make_hf_model, save

    return save(make_hf_model("gemma3_text", seed=5), tmp_path_factory.mktemp("bf16"), "bfloat16")


def test_bfloat16_checkpoint_is_used_in_place(tiny_bf16_dir):
    """dtype="bfloat16" on a bfloat16 checkpoint: the matrices are views of the file (nothing widened or
    copied), and the logits are those of the float32 load (the same numbers, multiplied a block at a time)."""
    from conftest import rel_err

    ids = np.arange(1, 30) % 150
    ref = minigemma.load(tiny_bf16_dir)
    m = minigemma.load(tiny_bf16_dir, dtype="bfloat16")
    q = m.params.layers[0].q_proj
    assert isinstance(q, Float16Bits) and q.dtype == "bfloat16" and not q.data.flags.owndata
    assert m.params.layers[0].input_norm.dtype == np.float32  # norms stay float32
    assert m.nbytes < ref.nbytes * 0.6
    assert rel_err(m.forward(ids), ref.forward(ids)) < 1e-6


def widen(params):
    """The same params with every stored (non-float32) matrix dequantized to float32."""
    import dataclasses

    def each(obj):
        return dataclasses.replace(obj, **{k: dequantize(v) for k, v in vars(obj).items() if hasattr(v, "rows")})
    return dataclasses.replace(each(params), layers=[each(layer) for layer in params.layers])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_model_is_the_model_on_dequantized_weights(tiny_bf16_dir, quantize):
    """A quantized load computes exactly what the float32 model computes on the dequantized weights (to
    float32 rounding), so all its error is the weights' error; and it is not the float32 model."""
    from conftest import rel_err

    ids = np.arange(1, 30) % 150
    m = minigemma.load(tiny_bf16_dir, quantize=quantize)
    assert isinstance(m.params.embed, Int8)  # int4 keeps the tied embedding / head at int8
    assert isinstance(m.params.layers[0].q_proj, Int8 if quantize == "int8" else Int4)
    widened = widen(m.params)
    reference = minigemma.Gemma(m.config, widened)
    assert rel_err(m.forward(ids), reference.forward(ids)) < 1e-6
    assert rel_err(m.forward(ids), minigemma.load(tiny_bf16_dir).forward(ids)) > 1e-6


def test_int4_keeps_the_sensitive_matrices_at_int8(tiny_bf16_dir):
    """Under "int4" the tied embedding, every v_proj, and down_proj in llama.cpp's "more bits" blocks stay
    int8 (weights.storage_for); everything else is int4. With 4 blocks, use_more_bits picks the last eighth
    (block 3) and every third from the first eighth on (block 2)."""
    m = minigemma.load(tiny_bf16_dir, quantize="int4")
    assert m.config.num_hidden_layers == 4 and [i for i in range(4) if weights.more_bits(i, 4)] == [2, 3]
    assert isinstance(m.params.embed, Int8)
    for i, layer in enumerate(m.params.layers):
        assert isinstance(layer.v_proj, Int8) and isinstance(layer.up_proj, Int4), i
        assert isinstance(layer.q_proj, Int4) and isinstance(layer.o_proj, Int4), i
        assert isinstance(layer.down_proj, Int8 if i >= 2 else Int4), i


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantize="int3"), "quantize='int3'"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(quantize="int8", dtype="bfloat16"), "choose one"),
])
def test_bad_storage_arguments_are_named(tiny_bf16_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        minigemma.load(tiny_bf16_dir, **kwargs)


@pytest.mark.slow
def test_gguf_q8_0_tensors_are_used_as_stored(gguf_path, gguf_reader):
    """The built-in file's Q8_0 tensors (the embedding and some attn_v) become int8 weights that are views of
    the memory-mapped file, no copy and no requantizing: bit-identical to gguf's own dequantizer. Its Q5_0
    tensors are re-encoded exactly, its Q4_K tensors kept on their grid as int4; only Q6_K is requantized."""
    from minigemma.params import LAYER_TENSORS

    m = minigemma.load(gguf_path, quantize="int8", progress=False)
    field = {s.gguf: s.field for s in LAYER_TENSORS}

    def param(name):  # the loaded weight of a GGUF tensor name
        if name == "token_embd.weight":
            return m.params.embed
        _, layer, rest = name.split(".", 2)
        return getattr(m.params.layers[int(layer)], field[rest])

    q8 = [t for t in gguf_reader.tensors if t.tensor_type == T.Q8_0]
    assert "token_embd.weight" in [t.name for t in q8] and len(q8) > 1
    for t in q8:
        w = param(t.name)
        assert isinstance(w, Int8) and not w.q.flags.writeable and not w.q.flags.owndata, t.name  # a file view
        assert np.array_equal(dequantize(w), gguf_quants.dequantize(t.data, T.Q8_0)), t.name  # (np.testing's
        # assert_array_equal took 11 s more over the 168M-entry embedding)
    # Q5_0 tensors are d * k with |k| <= 16: re-encoded as int8 with the same scales, exactly
    q5 = [t for t in gguf_reader.tensors if t.tensor_type == T.Q5_0]
    assert q5
    for t in q5:
        w = param(t.name)
        assert isinstance(w, Int8), t.name
        assert np.array_equal(dequantize(w), gguf_quants.dequantize(t.data, T.Q5_0)), t.name
    # Q4_K tensors keep their 4-bit levels as int4, only the scales rounded to fp16
    q4k = [t for t in gguf_reader.tensors if t.tensor_type == T.Q4_K]
    assert q4k
    for t in q4k:
        w = param(t.name)
        assert isinstance(w, Int4), t.name
        error = np.abs(dequantize(w) - gguf_quants.dequantize(t.data, T.Q4_K))
        assert (error <= q4_k_as_int4_bound(w)).all(), t.name
    # and only Q6_K tensors are requantized to int8, into arrays of their own
    q6k = [t for t in gguf_reader.tensors if t.tensor_type == T.Q6_K]
    assert q6k
    for t in q6k:
        w = param(t.name)
        assert isinstance(w, Int8) and w.q.flags.writeable, t.name
        assert not np.array_equal(dequantize(w), gguf_quants.dequantize(t.data, T.Q6_K)), t.name


@pytest.mark.slow
def test_open_gguf_reads_what_gguf_reads(gguf_path, gguf_reader):
    """minigemma's own GGUF reader (gguf_file.open_gguf: the loader's, and notebook 10's) against the gguf
    package's on the packaged file: the same tensors, in order, with the same types, shapes and bytes, and the
    same metadata keys and values (the 262k-entry vocabulary arrays included)."""
    from minigemma.gguf_file import open_gguf

    ours = open_gguf(gguf_path)
    assert [t.name for t in ours.tensors] == [t.name for t in gguf_reader.tensors]
    for a, b in zip(ours.tensors, gguf_reader.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    theirs = {k: f for k, f in gguf_reader.fields.items() if not k.startswith("GGUF.")}  # the header's own
    assert sorted(ours.fields) == sorted(theirs)
    for key, f in theirs.items():
        assert ours.fields[key].contents() == f.contents(), key


@pytest.mark.slow
def test_more_bits_are_the_blocks_llama_cpp_chose(gguf_reader):
    """weights.more_bits is llama.cpp's use_more_bits: the built-in Q4_K_M file, which llama.cpp's quantizer
    wrote, holds ffn_down and attn_v at more than 5 bits (Q6_K, Q8_0) in exactly those blocks."""
    wide = {T.Q6_K, T.Q8_0}
    n = 1 + max(int(t.name.split(".")[1]) for t in gguf_reader.tensors if t.name.startswith("blk."))
    for kind in ("ffn_down", "attn_v"):
        chosen = sorted(int(t.name.split(".")[1]) for t in gguf_reader.tensors
                        if t.name.endswith(f"{kind}.weight") and t.tensor_type in wide)
        assert chosen == [i for i in range(n) if weights.more_bits(i, n)], kind
