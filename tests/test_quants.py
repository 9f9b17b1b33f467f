"""minigemma.quants against the gguf package's own dequantizer, on GGUF files written here, and on the real model.

Each block format is tested two ways: on bytes the gguf quantizer made from random floats (where it can
quantize that type), and on random block bytes with only the fp16 scale fields tamed, which reach every bit
pattern of the packed integers and scales (the quantizer never writes some, e.g. a Q4_K scale of 63 next to 0).
Both go through a real GGUFWriter -> GGUFReader round trip, so `t.data` is exactly what a loader sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFReader, GGUFWriter
from gguf import quants as gguf_quants
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minigemma.quants import SUPPORTED_TYPES, bf16_to_f32, dequantize

ROWS = 3  # a few rows, each of...
BLOCKS_PER_ROW = 2  # ...a couple of blocks, so a row-order or block-order mix-up changes the answer

BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = [T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # what gguf.quants.quantize can make

# Byte offsets of the fp16 scale fields (d, and m/dmin where present) inside one block.
FP16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
               T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def _write_and_read(tmp_path, tensor: np.ndarray, raw_dtype=None):
    """Write one tensor to a GGUF file, read it back with GGUFReader: (reader tensor, numpy shape)."""
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(path, arch="test")
    writer.add_tensor("w", tensor, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    t = GGUFReader(path).tensors[0]
    return t, tuple(reversed(t.shape.tolist()))  # GGUF lists dims fastest first


def _check_against_gguf(t, shape):
    ours = dequantize(t.data, t.tensor_type, shape)
    oracle = gguf_quants.dequantize(t.data, t.tensor_type)
    assert ours.dtype == np.float32
    assert ours.shape == shape == oracle.shape
    assert np.isfinite(ours).all()  # the scales were kept finite, so a NaN means a misread field
    np.testing.assert_array_equal(ours, oracle)  # same float32 ops in the same order: bit-exact
    return ours


def test_table_sizes_match_gguf():
    from minigemma.quants import _TABLE
    for type_id, (name, block, nbytes, _) in _TABLE.items():
        assert T(type_id).name == name == SUPPORTED_TYPES[type_id]
        assert GGML_QUANT_SIZES[T(type_id)] == (block, nbytes)


@pytest.mark.parametrize("qtype", [T.F32, T.F16], ids=lambda q: q.name)
def test_plain_floats(tmp_path, qtype):
    x = np.random.default_rng(0).standard_normal((ROWS, 5)).astype(np.float32)
    t, shape = _write_and_read(tmp_path, x.astype(np.float16 if qtype == T.F16 else np.float32))
    assert t.tensor_type == qtype and shape == (ROWS, 5)
    ours = _check_against_gguf(t, shape)
    assert ours.flags.writeable  # a copy, not a view of the read-only memmap
    np.testing.assert_allclose(ours, x, rtol=1e-3 if qtype == T.F16 else 0)


def worst_error(x: np.ndarray, qtype) -> np.ndarray:
    """The largest |x - dequantize(quantize(x))| the format allows, per element, from how gguf's quantizers
    (gguf/quants.py, as llama.cpp's quantize_row_*_ref) pick their scales, for blocks of 32:
      BF16  round to 8 significant bits:                         |x| * 2^-8
      Q8_0  d = amax/127, q = round(x/d):                        d/2 = amax/254
      Q4_0  d = -max/8, q = trunc(x/d + 8.5) clipped to 15:      a half step, but a whole step |d| = amax/8
            for a value near -max (x/d near +8 rounds to 16, clipped to 15)
      Q5_0  the same with 16 and 31:                             amax/16
      Q4_1  d = (max - min)/15, q = round((x - min)/d):          d/2 = (max - min)/30
      Q5_1  d = (max - min)/31:                                  (max - min)/62
    plus storing d (and m) as fp16 (half an fp16 ulp, 2^-11 relative, times up to amax/|d| steps: ~amax 2^-11
    for each) and a few float32 roundings."""
    if qtype == T.BF16:
        return np.abs(x) * 2.0**-8
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    spread = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    step = {T.Q8_0: amax / 254, T.Q4_0: amax / 8, T.Q5_0: amax / 16, T.Q4_1: spread / 30,
            T.Q5_1: spread / 62}[qtype]
    slack = 2 * amax * 2.0**-11 + 8 * np.finfo(np.float32).eps * amax
    return np.broadcast_to(step + slack, blocks.shape).reshape(x.shape)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_quantized_floats(tmp_path, qtype):
    block, _ = GGML_QUANT_SIZES[qtype]
    cols = max(block, 32) * BLOCKS_PER_ROW
    x = np.random.default_rng(1).standard_normal((ROWS, cols)).astype(np.float32)
    x[1] *= 10  # rows of different scale: swapped rows would not go unnoticed
    t, shape = _write_and_read(tmp_path, gguf_quants.quantize(x, qtype), raw_dtype=qtype)
    assert t.tensor_type == qtype and shape == (ROWS, cols)
    ours = _check_against_gguf(t, shape)
    # and it is as close to what went in as the format promises, element by element (measured: the largest
    # error is 49% (Q5_0) to 99% (Q4_1) of its bound here, so each bound is about as tight as it can be)
    err = np.abs(ours - x)
    assert (err <= worst_error(x, qtype)).all()
    assert err.max() > 0  # it really was quantized


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_random_block_bytes(tmp_path, qtype):
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(ROWS * BLOCKS_PER_ROW, nbytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:  # finite, normal fp16 scales of either sign
        scales = rng.uniform(1e-3, 1e-1, len(raw)) * rng.choice([-1, 1], len(raw))
        raw[:, offset:offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(-1, 2)
    t, shape = _write_and_read(tmp_path, raw.reshape(ROWS, BLOCKS_PER_ROW * nbytes), raw_dtype=qtype)
    assert t.tensor_type == qtype and shape == (ROWS, BLOCKS_PER_ROW * block)
    ours = _check_against_gguf(t, shape)
    assert len(np.unique(ours)) > block // 8  # random bytes should give many distinct values


def test_bf16_to_f32_matches_torch_on_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    ours = bf16_to_f32(bits)
    assert ours.dtype == np.float32 and ours.shape == bits.shape
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))  # NaN payloads too


def test_bf16_to_f32_roundtrips_torch_rounding():
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32) * 100
    x_bf16 = torch.tensor(x, dtype=torch.bfloat16)
    bits = x_bf16.view(torch.int16).numpy().view(np.uint16).reshape(10, 100)
    np.testing.assert_array_equal(bf16_to_f32(bits), x_bf16.float().numpy().reshape(10, 100))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ4_NL, 12345], ids=["Q2_K", "IQ4_NL", "unknown"])
def test_unsupported_type_raises_naming_it(qtype):
    name = qtype.name if isinstance(qtype, T) else "12345"
    with pytest.raises(ValueError, match=name):
        dequantize(np.zeros(84, np.uint8), qtype, (1, 256))


def test_wrong_byte_count_raises():
    with pytest.raises(ValueError, match="Q8_0"):
        dequantize(np.zeros(33, np.uint8), T.Q8_0, (1, 32))
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(np.zeros(144, np.uint8), T.Q4_K, (2, 128))  # right bytes, but rows split a block


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3).map(lambda b: 32 * b)),
              elements=st.floats(-1000, 1000, width=32)))
def test_q8_0_error_bound(x):
    """Q8_0 stores d = max|x|/127 and q = round(x/d), so |x - d*q| <= d/2. The file keeps d as fp16, which
    moves d by at most half an fp16 ulp (2^-11 relative, or 2^-25 absolute once subnormal) and so each of up
    to 127 steps by that much; float32 rounding of x/d and d*q adds a few ulps of max|x| on top."""
    xq = dequantize(gguf_quants.quantize(x, T.Q8_0), T.Q8_0, x.shape)
    blocks, err = x.reshape(-1, 32), np.abs(xq - x).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / 127
    fp16_slack = 127 * np.maximum(d * 2.0**-11, 2.0**-25)
    bound = d / 2 + fp16_slack + 4 * np.finfo(np.float32).eps * amax
    assert (err.max(axis=1) <= bound).all()


@pytest.mark.slow
def test_real_model_tensors_match_gguf(gguf_reader):
    """Two tensors of every type in the packaged Gemma 3 270M Q4_K_M file (the two smallest, to stay fast)."""
    reader = gguf_reader
    by_type: dict[T, list] = {}
    for t in reader.tensors:
        by_type.setdefault(t.tensor_type, []).append(t)
    assert set(by_type) == {T.F32, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K}
    for qtype, tensors in by_type.items():
        for t in sorted(tensors, key=lambda t: t.n_bytes)[:2]:
            _check_against_gguf(t, tuple(reversed(t.shape.tolist())))
