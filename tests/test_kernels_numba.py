"""The Numba backend equals the NumPy reference: kernel by kernel on odd shapes, then whole models.

Equal means within float32 summation order: the compiled kernels add the same products in another order
(and with fused multiply-adds), so each bound below is a small multiple of float32 epsilon times the sum of
the magnitudes of the terms, not a fixed number. NumPy-vs-Numba equality cannot catch a mistake both share;
the oracle tests (test_model.py, test_layers.py) do that for the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import random_params, rel_err
from minigemma import kernels, kernels_numba, layers
from minigemma.config import GemmaConfig
from minigemma.generate import Sampling, generate_ids
from minigemma.model import Gemma
from minigemma.params import LayerParams, Params
from minigemma.packed import Int4x64, Int8x64
from minigemma.weights import Float16Bits, Int4, Int8

numpy_linear = layers.linear  # the reference twins
numpy_attention = layers.causal_attention
EPS = np.finfo(np.float32).eps


def make_weight(kind: str, x: np.ndarray):
    return {"float32": lambda: x, "bfloat16": lambda: Float16Bits.from_float(x, "bfloat16"),
            "float16": lambda: Float16Bits.from_float(x, "float16"), "int8": lambda: Int8.from_float(x),
            "int4": lambda: Int4.from_float(x), "int8x64": lambda: Int8x64.pack(Int8.from_float(x)),
            "int4x64": lambda: Int4x64.pack(Int4.from_float(x))}[kind]()


# ---- linear ---------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["float32", "bfloat16", "float16", "int8", "int4", "int8x64", "int4x64"]),
       out=st.integers(1, 200), groups=st.integers(1, 5),
       tokens=st.sampled_from([1, 2, kernels_numba.MATVEC_MAX_T, kernels_numba.MATVEC_MAX_T + 1,
                               kernels_numba.PACKED_MATVEC_MAX_T, kernels_numba.PACKED_MATVEC_MAX_T + 1, 23]),
       seed=st.integers(0, 2**16), small_tiles=st.booleans())
def test_linear_equals_numpy(kind, out, groups, tokens, seed, small_tiles):
    """Odd row counts (a packed matrix's last block is padding), both paths (matrix-vector up to
    MATVEC_MAX_T tokens, PACKED_MATVEC_MAX_T for int8x64/int4x64; dequantized tiles and BLAS above); with
    small_tiles, tiles of 2 blocks (128 rows), so a prefill product takes several tiles, the last one maybe
    narrower."""
    rng = np.random.default_rng(seed)
    width = 32 * groups
    w = make_weight(kind, rng.standard_normal((out, width)).astype(np.float32))
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    saved = kernels_numba.TILE_BYTES
    kernels_numba.TILE_BYTES = 2 * 64 * 4 * width if small_tiles else saved  # (hypothesis: no monkeypatch)
    try:
        ours = kernels_numba.linear(x, w)
    finally:
        kernels_numba.TILE_BYTES = saved
    ref = numpy_linear(x, w)
    assert ours.shape == ref.shape == (tokens, out) and ours.dtype == np.float32
    # the same products summed in another order: either order is within (terms) * eps * sum |x_i w_i| of the
    # exact sum (Higham, Accuracy and Stability, 3.1); measured: at most 1.4 * eps * sum |x_i w_i|
    magnitude = np.abs(x) @ np.abs(numpy_linear(np.eye(width, dtype=np.float32), w))  # (T, out)
    assert np.all(np.abs(ours - ref) <= width * EPS * magnitude + 1e-30)


def test_matvec_calls_are_made_once_and_follow_their_matrices():
    """A tuple of packed matrices gets its kernel call made once (kept with its first matrix); a later tuple
    whose matrices differ, even one made after another was freed (it may reuse the freed one's id), gets its own,
    and the right products."""
    rng = np.random.default_rng(4)
    q, v = (make_weight(kind, rng.standard_normal((128, 64)).astype(np.float32)) for kind in ("int4x64", "int8x64"))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for _ in range(3):
        k = make_weight("int4x64", rng.standard_normal((64, 64)).astype(np.float32))
        call = kernels_numba._matvec_call((q, k, v))
        assert kernels_numba._matvec_call((q, k, v)) is call
        for w, product in zip((q, k, v), kernels_numba.linears(x, q, k, v)):
            assert np.array_equal(product, kernels_numba.linear(x, w))
            assert np.allclose(product, numpy_linear(x, w), rtol=1e-4, atol=1e-4)
        del k, call  # the next k may be made at the same address


@settings(max_examples=30, deadline=None)
@given(kinds=st.lists(st.sampled_from(["int8x64", "int4x64", "float32", None]), min_size=1, max_size=4),
       outs=st.lists(st.integers(1, 200), min_size=4, max_size=4), groups=st.integers(1, 4),
       tokens=st.sampled_from([1, 3, kernels_numba.PACKED_MATVEC_MAX_T, kernels_numba.PACKED_MATVEC_MAX_T + 1]),
       seed=st.integers(0, 2**16))
def test_linears_equal_numpy(kinds, outs, groups, tokens, seed):
    """Several matrices read by one input (q, k, v; gate, up): int8 and int4 ones go through one kernel call
    whose parallel loop walks the blocks of every matrix in turn (odd row counts: each one's last block is
    padding); with a float32 one, a None (a projection the layer lacks) or a prefill, one product each. Each
    product as layers.linears gives it, within the bound of test_linear_equals_numpy."""
    rng = np.random.default_rng(seed)
    width = 32 * groups
    ws = [None if kind is None else make_weight(kind, rng.standard_normal((n, width)).astype(np.float32))
          for kind, n in zip(kinds, outs)]
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    ours, ref = kernels_numba.linears(x, *ws), layers.linears(x, *ws)
    assert len(ours) == len(ref) == len(ws)
    for w, a, b in zip(ws, ours, ref):
        if w is None:
            assert a is None and b is None
            continue
        assert a.shape == b.shape == (tokens, w.shape[0]) and a.dtype == np.float32
        magnitude = np.abs(x) @ np.abs(numpy_linear(np.eye(width, dtype=np.float32), w))
        assert np.all(np.abs(a - b) <= width * EPS * magnitude + 1e-30)


def test_linears_makes_one_kernel_call_for_packed_matrices(monkeypatch):
    """q, k and v of a decode step, all int8, all int4, or a mix (int4 weights keep v_proj in int8): one call of
    a matrix-vector kernel with all three matrices (the mix: mixed_matvec, with each kind's); with a prefill's
    tokens, one product each through the tiles. The mix gives the same bits as each kind's own kernel: the
    same block code (int8_block, int4_block) in one parallel loop."""
    rng = np.random.default_rng(0)
    calls = []
    run = kernels_numba._run
    monkeypatch.setattr(kernels_numba, "_run", lambda kernel, *a: (calls.append((kernel, a)), run(kernel, *a)))
    for kinds, kernel in ((("int8x64",) * 3, kernels_numba.int8x64_matvec),
                          (("int4x64",) * 3, kernels_numba.int4x64_matvec),
                          (("int4x64", "int4x64", "int8x64"), kernels_numba.mixed_matvec),
                          (("int8x64", "int4x64", "int8x64"), kernels_numba.mixed_matvec)):
        ws = [make_weight(kind, rng.standard_normal((n, 64)).astype(np.float32))
              for kind, n in zip(kinds, (256, 64, 64))]
        x = rng.standard_normal((2, 64)).astype(np.float32)
        calls.clear()
        products = kernels_numba.linears(x, *ws)
        assert [c[0] for c in calls] == [kernel]
        given = [a for arg in calls[0][1] if isinstance(arg, tuple) for a in arg]
        assert all(any((w.q if isinstance(w, Int8x64) else w.nibbles) is a for a in given) for w in ws)
        for w, product in zip(ws, products):
            assert np.array_equal(product, kernels_numba.linear(x, w))  # each kind's kernel on its own
        calls.clear()
        kernels_numba.linears(rng.standard_normal((kernels_numba.PACKED_MATVEC_MAX_T + 1, 64)).astype(np.float32),
                              *ws)
        assert kernel not in [c[0] for c in calls] and len(calls) == 3  # a tile kernel per matrix


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["int8x64", "int4x64", "int8", "float32"]), out=st.integers(1, 200),
       groups=st.integers(1, 4), tokens=st.sampled_from([1, 5, 40]), lora=st.booleans(), small_tiles=st.booleans(),
       seed=st.integers(0, 2**16))
def test_linear_backward_equals_numpy(kind, out, groups, tokens, lora, small_tiles, seed):
    """Training's dx = dy W through the Numba backend: a frozen int8x64/int4x64 weight (QLoRA's base, alone or
    under a LoRA) by the tile kernels, several tiles with small_tiles, the last maybe holding padding rows past
    the matrix (odd row counts); other weights by the reference's own code. dx and LoRA's dA, dB as
    layers.linear_backward gives them, dx within the bound of test_linear_equals_numpy (the same sums in
    another order), dA and dB exactly (the same NumPy code on the same dx-independent inputs)."""
    from minigemma.weights import LoRA

    rng = np.random.default_rng(seed)
    width = 32 * groups
    w = make_weight(kind, rng.standard_normal((out, width)).astype(np.float32))
    if lora:
        w = LoRA(w, rng.standard_normal((3, width)).astype(np.float32), rng.standard_normal((out, 3)).astype(
            np.float32), 0.7)
    dy = rng.standard_normal((tokens, out)).astype(np.float32)
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    grads = {side: (np.zeros((3, width), np.float32), np.zeros((out, 3), np.float32)) if lora else None
             for side in ("ours", "ref")}
    saved = kernels_numba.TILE_BYTES
    kernels_numba.TILE_BYTES = 2 * 64 * 4 * width if small_tiles else saved  # (hypothesis: no monkeypatch)
    try:
        ours = kernels_numba.linear_backward(dy, x, w, grads["ours"])
    finally:
        kernels_numba.TILE_BYTES = saved
    ref = layers.linear_backward(dy, x, w, grads["ref"])
    assert ours.shape == ref.shape == (tokens, width) and ours.dtype == np.float32
    base = w.base if lora else w
    magnitude = np.abs(dy) @ np.abs(numpy_linear(np.eye(width, dtype=np.float32), base)).T  # sum |dy_o W_oi|
    if lora:
        magnitude += np.abs(ref - layers.linear_backward(dy, x, base))  # the low-rank branch, summed the same way
    assert np.all(np.abs(ours - ref) <= out * EPS * magnitude + 1e-30)
    if lora:
        for a, b in zip(grads["ours"], grads["ref"]):
            assert np.array_equal(a, b) and np.abs(b).max() > 0


def test_linear_backward_widens_packed_weights_with_the_tile_kernels(monkeypatch):
    """A frozen int8x64 weight's dx goes through int8x64_tile (the reference widens rows in NumPy); a float
    weight's through the reference (no kernel at all)."""
    rng = np.random.default_rng(0)
    calls = []
    monkeypatch.setattr(kernels_numba, "_run", lambda kernel, *a: calls.append(kernel))
    monkeypatch.setattr(layers, "linear_backward", lambda *a: calls.append("reference"))
    kernels_numba.linear_backward(np.ones((4, 130), np.float32), None, make_weight(
        "int8x64", rng.standard_normal((130, 64)).astype(np.float32)))
    assert calls and set(calls) == {kernels_numba.int8x64_tile}
    calls.clear()
    kernels_numba.linear_backward(np.ones((4, 130), np.float32), None, np.ones((130, 64), np.float32))
    assert calls == ["reference"]


def test_packed_layouts_hold_the_same_matrix():
    """Packing only reorders: the same rows, the same bytes (plus zero rows up to a multiple of 64)."""
    x = np.random.default_rng(1).standard_normal((130, 96)).astype(np.float32)
    for plain, packed in ((Int8.from_float(x), Int8x64.pack(Int8.from_float(x))),
                          (Int4.from_float(x), Int4x64.pack(Int4.from_float(x)))):
        assert packed.shape == plain.shape
        assert np.array_equal(packed.rows(0, 130), plain.rows(0, 130))
        assert np.array_equal(packed.rows(63, 65), plain.rows(63, 65))
        ids = np.array([129, 0, 64, 64])
        assert np.array_equal(packed.take(ids), plain.rows(0, 130)[ids])
        assert packed.nbytes == plain.nbytes * 192 // 130  # 130 rows padded to 192


@numba.njit(cache=False)
def pair_sums_compiled(q, at, halves, x_at, m, d, d_at, acc, c):
    kernels_numba.prefetch(q, q.size + 4096)
    kernels_numba.pair_sums(q, at, halves, x_at, m, d, d_at, acc, c)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), row=st.sampled_from([0, 8, 56]), extreme=st.booleans(),
       m=st.sampled_from([1.0, 1e-35, 3e30]))
def test_pair_sums_compiled_equals_its_numpy_twin(seed, row, extreme, m):
    """The int8 kernel's vector code (_pair_sums_ir, what `pair_sums` compiles to; here without fastmath, which
    inside the kernel may fuse a multiply and an add) gives the same float32 bits as its NumPy twin: the integer
    sums are exact, then the same float operations in the same order. With `extreme`, the largest magnitudes the
    kernel can meet (q = -128 and 127, h = +-2^14, l = 2^15 - 1). A group maximum m of 1e-35 or 3e30 must not
    lose precision (2^-29 is applied before m). The prefetch beside it, asked for bytes past the end of q, must
    not fault."""
    rng = np.random.default_rng(seed)
    G = 3
    q = rng.integers(-128, 128, (2, G, 16, 64, 2)).astype(np.int8)
    halves = np.concatenate([rng.integers(-2**14, 2**14 + 1, (G, 32)), rng.integers(0, 2**15, (G, 32))], axis=1)
    if extreme:
        q[...] = rng.choice(np.array([-128, 127], np.int8), q.shape)
        halves[:, :32], halves[:, 32:] = 2**14 * rng.choice([-1, 1], (G, 32)), 2**15 - 1
    halves = halves.astype(np.int16)
    d = rng.standard_normal((2, G, 64)).astype(np.float16).view(np.uint16)
    m = np.float32(m * rng.uniform(0.5, 2))
    for b, g in ((0, 0), (1, G - 1)):
        args = (q, (b * G + g) * 2048 + 2 * row, halves, g * 64, m, d, (b * G + g) * 64 + row)
        exact = (q[b, g, :, row:row + 8, :].astype(np.int64) * halves[g].astype(np.int64).reshape(2, 16, 1, 2)).sum(
            axis=(1, 3))  # (2, 8): tops, bottoms
        expected = (32768.0 * exact[0] + exact[1]) * 2.0**-29 * d[b, g, row:row + 8].view(np.float16) * float(m)
        before = (rng.standard_normal(64) * float(m) / 4096).astype(np.float32)  # small against what is added
        ours, twin = before.copy(), before.copy()
        pair_sums_compiled(*args, ours, row)
        kernels_numba.pair_sums(*args, twin, row)
        assert np.array_equal(ours, twin)
        assert np.allclose(twin[row:row + 8] - before[row:row + 8], expected, rtol=1e-5)  # float32 rounding
        assert np.array_equal(np.delete(twin, np.s_[row:row + 8]), np.delete(before, np.s_[row:row + 8]))


digit_sums_generic_ir = kernels_numba._make_digit_sums_ir(native=False)  # what a CPU without AVX2 gets


@numba.njit(cache=False)
def digit_sums_compiled(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c):
    kernels_numba.digit_sums(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c)


@numba.njit(cache=False)
def digit_sums_generic(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c):
    digit_sums_generic_ir(nibbles, at, digits, x_at, step, d, mins, d_at, xsum, acc, c)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), row=st.sampled_from([0, 8, 56]), extreme=st.booleans(),
       step=st.sampled_from([1e-7, 1e-42, 3e23]))
def test_digit_sums_compiled_equals_its_numpy_twin(seed, row, extreme, step):
    """The int4 kernel's vector code (_digit_sums_ir, what `digit_sums` compiles to: vpmaddubsw on a CPU with AVX2;
    and the plain IR a CPU without it gets; here without fastmath, which inside the kernel may fuse a multiply and
    an add) gives the same float32 bits as its NumPy twin: the integer sums are exact, then the same float
    operations in the same order. With `extreme`, the largest magnitudes the kernel can meet (nibbles 15, digits
    -128), where its 16-bit sums come closest to overflowing. Against float64, the group's
    d * s * sum_j q X + m * sum_j x within float32 rounding, for any step s."""
    rng = np.random.default_rng(seed)
    G = 3
    nibbles = rng.integers(0, 256, (2, G, 4, 64, 4)).astype(np.uint8)
    digits = rng.integers(-128, 128, (G, 3, 32)).astype(np.int8)
    if extreme:
        nibbles[...], digits[...] = 255, -128
    d = (rng.random((2, G, 64)) * 0.01).astype(np.float16).view(np.uint16)
    mins = (-rng.random((2, G, 64)) * 0.08).astype(np.float16).view(np.uint16)
    step = np.float32(step * rng.uniform(0.5, 2))
    for b, g in ((0, 0), (1, G - 1)):
        xsum = np.float32(rng.standard_normal())
        args = (nibbles, (b * G + g) * 1024 + 4 * row, digits, g * 96, step, d, mins, (b * G + g) * 64 + row, xsum)
        rows = slice(row, row + 8)
        block = nibbles[b, g, :, rows, :].transpose(1, 0, 2).reshape(8, 16)  # (row, byte 4i + k)
        q = np.concatenate([block & 15, block >> 4], axis=1).astype(np.float64)  # (row, input)
        whole = digits[g].astype(np.float64).T @ np.array([65536.0, 256.0, 1.0])  # (input,): X
        scale, low = (a[b, g, rows].view(np.float16).astype(np.float64) for a in (d, mins))
        expected = scale * float(step) * (q @ whole) + low * float(xsum)
        before = (rng.standard_normal(64) * np.abs(expected).max() / 4096).astype(np.float32)
        ours, generic, twin = before.copy(), before.copy(), before.copy()
        digit_sums_compiled(*args, ours, row)
        digit_sums_generic(*args, generic, row)
        kernels_numba.digit_sums(*args, twin, row)
        assert np.array_equal(ours, twin) and np.array_equal(generic, twin)
        magnitude = scale * float(step) * (q @ np.abs(whole)) + np.abs(low * float(xsum))
        assert np.all(np.abs((twin[rows] - before[rows]).astype(np.float64) - expected)
                      <= 8 * 2.0**-24 * magnitude + np.abs(before[rows]) * 2.0**-23)
        assert np.array_equal(np.delete(twin, np.s_[row:row + 8]), np.delete(before, np.s_[row:row + 8]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([0.0, 1.0, 8.0]), zeros=st.booleans())
def test_split_digits_hold_each_input_to_half_a_step(seed, spread, zeros):
    """x ~ s (65536 D2 + 256 D1 + D0) per group of 32, each digit in [-128, 127], s = m / DIGITS: the error is at
    most s / 2 (m = the group's largest |x|), and the group's largest input is exactly DIGITS steps; the sums are
    the groups' sums (float32, in any order); an all-zero group, and a group holding inf or NaN (s NaN, digits 0)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 96)) * np.exp(spread * rng.standard_normal((3, 96)))).astype(np.float32)
    if zeros:
        x[1, 32:64] = 0
    x[2, 70] = rng.choice([np.inf, -np.inf, np.nan])
    digits, steps, sums = np.empty((3, 3, 3, 32), np.int8), np.empty((3, 3), np.float32), np.empty((3, 3), np.float32)
    kernels_numba.split_digits(x, digits, steps, sums)
    groups = x.reshape(3, 3, 32)
    assert np.isnan(steps[2, 2]) and np.all(digits[2, 2] == 0)
    m = np.abs(groups.astype(np.float64)).max(-1)
    m[2, 2], steps[2, 2] = 0, 0
    assert np.array_equal(steps, (m / kernels_numba.DIGITS).astype(np.float32))
    whole = digits.astype(np.float64).transpose(0, 1, 3, 2) @ np.array([65536.0, 256.0, 1.0])  # (3, 3, 32)
    exact = groups.astype(np.float64) * (kernels_numba.DIGITS / np.where(m > 0, m, 1))[..., None]
    exact[2, 2] = 0
    assert np.all(np.abs(whole - exact) <= 0.5 + 1e-6)  # rint, after a float64 product
    assert np.all(np.abs(whole).max(-1)[m > 0] == kernels_numba.DIGITS)
    finite = np.isfinite(sums)
    assert not finite[2, 2] and finite.sum() == 8
    exact_sums = groups.astype(np.float64).sum(-1)[finite]  # float32 in any order: within 32 eps sum |x|
    assert np.all(np.abs(sums[finite] - exact_sums) <= 32 * EPS * np.abs(groups).astype(np.float64).sum(-1)[finite])


@numba.njit(cache=False)
def widen_pair_compiled(q, at, scale, out, at0, at1):
    kernels_numba.widen_pair(q, at, scale, out, at0, at1)


def test_widen_pair_compiled_equals_its_numpy_twin():
    """The prefill tiles' vector code for the paired int8 layout (_widen_pair_ir) writes the same float32 bits
    as its NumPy twin, into the two rows asked for and nowhere else; and both are the byte times the scale."""
    rng = np.random.default_rng(7)
    q = rng.integers(-128, 128, (2, 3, 16, 64, 2)).astype(np.int8)
    q.reshape(-1)[:4] = [-128, 127, 0, -1]
    scale = rng.standard_normal(64).astype(np.float32)
    for b, g, p in ((0, 0, 0), (1, 2, 15), (1, 0, 7)):
        at = ((b * 3 + g) * 16 + p) * 128
        ours, twin = (np.full((40, 70), np.nan, np.float32) for _ in range(2))
        widen_pair_compiled(q, at, scale, ours, 5 * 70 + 3, 9 * 70 + 6)
        kernels_numba.widen_pair(q, at, scale, twin, 5 * 70 + 3, 9 * 70 + 6)
        assert np.array_equal(ours, twin, equal_nan=True)
        assert np.array_equal(twin[5, 3:67], scale * q[b, g, p, :, 0])
        assert np.array_equal(twin[9, 6:70], scale * q[b, g, p, :, 1])
        assert np.isnan(np.delete(twin, [5, 9], axis=0)).all() and np.isnan(twin[5, :3]).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), spread=st.sampled_from([0.0, 1.0, 8.0]), zeros=st.booleans())
def test_split_activations_hold_each_input_to_2_to_the_minus_30(seed, spread, zeros):
    """x ~ m 2^-29 (32768 h + l) per group of 32, h in [-2^14, 2^14], l in [0, 2^15): the error is at most
    m 2^-30 (m = the group's largest |x|); inputs spread over many magnitudes, an all-zero group, and a group
    holding inf or NaN (its m is NaN, so its products are NaN, as a float product would be)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 96)) * np.exp(spread * rng.standard_normal((3, 96)))).astype(np.float32)
    if zeros:
        x[1, 32:64] = 0
    x[2, 70] = rng.choice([np.inf, -np.inf, np.nan])
    halves, tops = np.empty((3, 3, 64), np.int16), np.empty((3, 3), np.float32)
    kernels_numba.split_activations(x, halves, tops)
    h, l = halves[..., :32].astype(np.float64), halves[..., 32:].astype(np.float64)
    assert np.all(np.abs(h) <= 2**14) and np.all((l >= 0) & (l < 2**15))
    m = np.abs(x.reshape(3, 3, 32).astype(np.float64)).max(-1)
    assert np.isnan(tops[2, 2]) and np.all(halves[2, 2] == 0)
    m[2, 2], tops[2, 2] = 0, 0
    assert np.array_equal(tops, m.astype(np.float32))
    back = tops[..., None].astype(np.float64) * 2.0**-29 * (32768 * h + l)
    error = np.abs(back - x.reshape(3, 3, 32))
    error[2, 2] = 0
    assert np.all(error <= m[..., None] * 2.0**-30 * (1 + 1e-6))  # + two float64 roundings


def test_fp16_bit_trick_is_exact():
    """Every finite float16 (normals, subnormals, both zeros) widens exactly as NumPy widens it."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    halves = bits.view(np.float16)
    bits = bits[np.isfinite(halves)]
    out = np.empty(len(bits), np.float32)
    kernels_numba.fp16_to_f32(bits, out)
    assert np.array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


# ---- attention ------------------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), head_dim=st.sampled_from([8, 20]),
       new=st.integers(1, 40), held=st.integers(0, 150), first=st.integers(0, 50),
       window=st.sampled_from([None, 1, 7, 70]), cap=st.sampled_from([None, 2.0]), seed=st.integers(0, 2**16),
       tile=st.sampled_from([None, 5, 16]), key_tile=st.sampled_from([3, 5, 16, 64]))
def test_attention_equals_numpy(kv_heads, group, head_dim, new, held, first, window, cap, seed, tile, key_tile):
    """Queries are the last `new` of `held + new` keys, as with a KV cache; more than one tile of queries
    and of keys so the running softmax is rescaled across tiles. tile None: the Numba kernel
    (flash_attention, tiles Q_TILE x K_TILE); else attention_tiles (sgemm per tile) with tiles of `tile`
    queries and `key_tile` keys (fewer keys than queries too: a query may see no key of a tile)."""
    rng = np.random.default_rng(seed)
    H, S = kv_heads * group, held + new
    q = rng.standard_normal((H, new, head_dim)).astype(np.float32) * 2
    k = rng.standard_normal((kv_heads, S, head_dim)).astype(np.float32) * 2
    v = rng.standard_normal((kv_heads, S, head_dim)).astype(np.float32)
    k_pos = np.arange(first, first + S)
    q_pos = k_pos[held:]
    if tile is None:
        ours = kernels_numba.attention_flash(q, k, v, q_pos, k_pos, window, 0.3, cap)
    else:
        ours = kernels_numba.attention_tiles(q, k, v, q_pos, k_pos, window, 0.3, cap, tile=tile,
                                              key_tile=key_tile)
    ref = numpy_attention(q, k, v, q_pos, k_pos, window, 0.3, cap)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # an average of values (|v| < ~5) with weights summing to 1, over up to 190 keys; measured <= 4.3e-6
    assert np.max(np.abs(ours - ref)) < 1e-4


@settings(max_examples=60, deadline=None)
@given(kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4]), head_dim=st.sampled_from([8, 20, 256]),
       held=st.integers(0, 300), first=st.integers(0, 50), window=st.sampled_from([None, 1, 7, 70]),
       cap=st.sampled_from([None, 2.0]), ranges=st.sampled_from([None, 1, 2, 3, 7]), seed=st.integers(0, 2**16))
def test_decode_attention_equals_numpy(kv_heads, group, head_dim, held, first, window, cap, ranges, seed):
    """One query per head (a decode step) through decode_attention + merge_parts: the keys split into
    `ranges` (more ranges than keys leaves some empty), tiles of K_TILE keys and a remainder of fewer than
    four (the four-keys-per-pass loops), against the reference."""
    rng = np.random.default_rng(seed)
    H, S = kv_heads * group, held + 1
    q = rng.standard_normal((H, 1, head_dim)).astype(np.float32) * 2
    k = rng.standard_normal((kv_heads, S, head_dim)).astype(np.float32) * 2
    v = rng.standard_normal((kv_heads, S, head_dim)).astype(np.float32)
    k_pos = np.arange(first, first + S)
    ours = kernels_numba.attention_decode(q, k, v, k_pos[-1:], k_pos, window, 0.3, cap, ranges=ranges)
    ref = numpy_attention(q, k, v, k_pos[-1:], k_pos, window, 0.3, cap)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) < 1e-4  # as above; measured <= 8.5e-6 with head_dim 256


def test_decode_takes_decode_attention(monkeypatch):
    """kernels_numba.attention sends one query per head to attention_decode, a few to attention_flash and
    many to attention_tiles (each path is then held equal to the reference by the tests above)."""
    taken = []
    for name in ("attention_decode", "attention_flash", "attention_tiles"):
        monkeypatch.setattr(kernels_numba, name, lambda *a, name=name, **k: taken.append(name))
    kv = np.zeros((1, 40, 8), np.float32)
    pos = np.arange(40)
    for T in (1, 2, kernels_numba.BLAS_ATTENTION_MIN_T):
        kernels_numba.attention(np.zeros((2, T, 8), np.float32), kv, kv, pos[-T:], pos, None, 1.0, None)
    assert taken == ["attention_decode", "attention_flash", "attention_tiles"]


# ---- RMSNorm ---------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lead=st.sampled_from([(1,), (7,), (3, 5)]), width=st.integers(1, 300), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_equals_numpy(lead, width, scale, transposed, seed):
    """Rows of any width, from a (..., N) array that may be a non-contiguous view (self_attention normalises
    q transposed to (H, T, Dh))."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(lead + (width,)) * scale).astype(np.float32)
    if transposed and len(lead) == 2:
        x = x.transpose(1, 0, 2)
    w = rng.standard_normal(width).astype(np.float32)
    ours = kernels_numba.rms_norm(x, w, 1e-6)
    ref = layers.rms_norm(x, w, 1e-6)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    # each output is x_i / rms * (1 + w_i), |x_i / rms| <= sqrt(N): a relative error of a few eps in rms (the
    # sum of squares in another order) and one rounding each for the divide and the multiply
    bound = 8 * EPS * np.sqrt(width) * (1 + np.abs(w))
    assert np.all(np.abs(ours - ref) <= bound)


# ---- RoPE ------------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), T=st.integers(1, 9), half=st.integers(1, 70), transposed=st.booleans(),
       tables=st.sampled_from(["rope", "proportional", "random"]), seed=st.integers(0, 2**16))
def test_apply_rope_equals_numpy(n, T, half, transposed, tables, seed):
    """Any head count, length and (even) head dim; x may be the strided view self_attention passes on Gemma 1/2
    (the projection reshaped and transposed to (N, T, Dh)); Gemma 4's proportional tables leave some pairs
    unrotated (cos 1, sin 0); random tables differ between the halves (a kernel reading sin[:half] for both
    halves, or cos of the wrong position, fails there)."""
    rng = np.random.default_rng(seed)
    Dh = 2 * half
    x = rng.standard_normal((T, n, Dh)).astype(np.float32).transpose(1, 0, 2)
    if not transposed:
        x = np.ascontiguousarray(x)
    positions = rng.integers(0, 5000, T)
    if tables == "random":
        cos, sin = rng.uniform(-1, 1, (2, T, Dh)).astype(np.float32)
    else:
        cos, sin = (layers.proportional_rope_angles(positions, Dh, 1e6, 1.0, 0.5) if tables == "proportional"
                    else layers.rope_angles(positions, Dh, 1e4))
    ours = kernels_numba.apply_rope(x, cos, sin)
    ref = layers.apply_rope(x, cos, sin)
    assert ours.shape == ref.shape == (n, T, Dh) and ours.dtype == np.float32
    # each output is a x cos +- b sin: one rounding per product and one for the sum, which a fused multiply-add
    # may skip; a few eps of |a| + |b|
    pair = np.abs(x) + np.abs(np.concatenate([x[..., half:], x[..., :half]], axis=-1))
    assert np.all(np.abs(ours - ref) <= 4 * EPS * pair)
    # the case is not trivial: the reference moved x by more than that bound somewhere (unless every pair stays)
    assert np.any(np.abs(ref - x) > 4 * EPS * pair) or (np.all(sin == 0) and np.all(cos == 1))
    # other dtypes (float64 gradient checks) and shapes (training's (B, N, T, Dh)) go to the reference unchanged
    x64 = x.astype(np.float64)
    assert kernels_numba.apply_rope(x64, cos, sin).dtype == layers.apply_rope(x64, cos, sin).dtype
    np.testing.assert_array_equal(kernels_numba.apply_rope(x[None], cos, sin), layers.apply_rope(x[None], cos, sin))


# ---- the MLP's activation -------------------------------------------------------------------------------------

def exact_geglu(g, u):
    """gelu_tanh(g) * u in float64."""
    g, u = g.astype(np.float64), u.astype(np.float64)
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u


@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 3, 40]), F=st.integers(1, 300), scale=st.sampled_from([0.01, 1.0, 4.0, 30.0]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_geglu_equals_numpy(T, F, scale, transposed, seed):
    """geglu_rows computes the reference's 0.5 x (1 + tanh s) with its own tanh, from a vectorisable exp
    (exp_f32), not NumPy's: not the same bits, but each within a few float32 roundings of the exact value
    (float64), relative to |g u|, from saturated negative inputs (1 + tanh s = 0) to saturated positive ones;
    a non-contiguous g goes through it too."""
    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((F, T)) * scale).astype(np.float32).T
    if not transposed:
        g = np.ascontiguousarray(g)
    u = rng.standard_normal((T, F)).astype(np.float32)
    ours, ref = kernels_numba.geglu(g, u), layers.geglu(g, u)
    assert ours.shape == ref.shape == (T, F) and ours.dtype == np.float32
    bound = 4 * 2.0**-24 * np.abs(g.astype(np.float64) * u) + 1e-38  # measured: 2.73 ours and the reference's
    exact = exact_geglu(g, u)
    assert np.all(np.abs(ref - exact) <= bound)
    assert np.all(np.abs(ours - exact) <= bound)


def test_exp_f32_within_an_ulp_compiled_and_as_python():
    """exp_f32 over its whole range [-87, 88], compiled (inside a loop, as geglu_rows calls it) and as plain
    Python on NumPy float32 scalars (what NUMBA_DISABLE_JIT runs; as_f32's NumPy version): within 1.5 ulp of the
    float64 exp (measured: 1.01). Below the range 0 (a masked score, -inf, gives 0), above it e^88 (finite)."""
    z = np.concatenate([np.linspace(-87, 88, 400001, dtype=np.float32), np.float32([0, -1e-30, 1e-30])])
    ours = np.empty_like(z)
    exp_loop(z, ours)
    exact = np.exp(z.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(ours - exact) <= 1.5 * ulp)
    sample = z[::997]
    as_python = np.array([kernels_numba.exp_f32.py_func(v) for v in sample], np.float32)
    assert np.all(np.abs(as_python - exact[::997]) <= 1.5 * ulp[::997])
    clamped = np.empty(4, np.float32)
    exp_loop(np.float32([-np.inf, -87.01, 1000, np.inf]), clamped)
    assert np.array_equal(clamped, [0, 0, exp_loop_one(88.0), exp_loop_one(88.0)]) and np.isfinite(clamped[2])
    assert exp_loop_one(-87.0) >= np.finfo(np.float32).tiny


@numba.njit(cache=False)
def exp_loop(z, out):
    for i in range(z.shape[0]):
        out[i] = kernels_numba.exp_f32(z[i])


def exp_loop_one(z):
    out = np.empty(1, np.float32)
    exp_loop(np.float32([z]), out)
    return out[0]


def test_as_f32_is_a_bitcast():
    """as_f32 compiled (LLVM's bitcast) and as NumPy (a view): the float with those bits, any int32 pattern,
    and given an int64 (Numba's arithmetic on int32 gives int64), its low 32 bits."""
    bits = np.array([0, 1, 127 << 23, (127 + 88) << 23, -1 << 31, 0x7F7FFFFF, 0x00800000, 12345678], np.int32)
    assert np.array_equal(as_f32_loop(bits).view(np.int32), bits)
    assert np.array_equal(np.array([kernels_numba.as_f32(b) for b in bits], np.float32).view(np.int32), bits)
    assert as_f32_loop(np.int32([127 << 23]))[0] == 1.0 and kernels_numba.as_f32(np.int32(128 << 23)) == 2.0


@numba.njit(cache=False)
def as_f32_loop(bits):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = kernels_numba.as_f32(np.int64(bits[i]))
    return out


# ---- whole models ---------------------------------------------------------------------------------------------

def tiny_config(model_type: str) -> GemmaConfig:
    """Widths that are whole groups of 32 (for int8/int4), a vocabulary that is not whole blocks of 64."""
    d = dict(model_type=model_type, vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=5,
             sliding_window_pattern=2, max_position_embeddings=256)
    if model_type == "gemma2":
        d.update(attn_logit_softcapping=3.0, final_logit_softcapping=5.0)
    return GemmaConfig.from_hf_dict(d)


def stored_as(params: Params, kind: str) -> Params:
    """The same random params with every matrix in storage `kind` (norms stay float32). "int4x64, v int8x64": as
    the int4 load of a Q4_K_M file, v_proj int8 and the other matrices int4 (decode's q, k and v: mixed_matvec)."""
    def convert(w, field=""):
        if w is None or w.ndim == 1:
            return w
        if kind == "int4x64, v int8x64":
            return make_weight("int8x64" if field == "v_proj" else "int4x64", w)
        return make_weight(kind, w)
    layers = [LayerParams(**{f: convert(w, f) for f, w in vars(p).items()}) for p in params.layers]
    return Params(embed=convert(params.embed), final_norm=params.final_norm, layers=layers)


def run(model: Gemma, ids, steps: int = 6):
    """Prefill logits of every prompt position, then greedy decoding through the cache."""
    logits = model.forward(ids)
    text = list(generate_ids(model, ids, Sampling(max_new_tokens=steps, ignore_eos=True)))
    return logits, text


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8x64", "int4x64", "int4x64, v int8x64"])
@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_tiny_models_same_on_both_backends(model_type, kind):
    config = tiny_config(model_type)
    params = stored_as(random_params(config, np.random.default_rng(3)), kind)
    # past the window of 5, and more than BLAS_ATTENTION_MIN_T queries: prefill takes attention_tiles
    ids = np.random.default_rng(4).integers(0, config.vocab_size, 40)
    ref_logits, ref_text = run(Gemma(config, params, backend=kernels.NUMPY), ids)
    logits, text = run(Gemma(config, params, backend=kernels.get("numba")), ids)
    assert rel_err(logits, ref_logits) < 1e-5  # float32 summation order; measured <= 1.1e-6
    assert text == ref_text


@pytest.mark.parametrize("kind", ["int8x64", "int4x64", "int4x64, v int8x64"])
def test_numba_kernels_run_as_plain_python(kind):
    """NUMBA_DISABLE_JIT=1 (to step through a kernel in a debugger) runs the same code as Python: the int8
    kernel with the NumPy versions of pair_sums and prefetch in place of their LLVM code, the int4 kernel with
    digit_sums', and both in mixed_matvec."""
    script = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_kernels_numba import tiny_config, stored_as, random_params
from minigemma import kernels
from minigemma.model import Gemma
config = tiny_config("gemma2")
model = Gemma(config, stored_as(random_params(config, np.random.default_rng(5)), sys.argv[2]),
              backend=kernels.get("numba"))
cache = model.new_cache()
out = [model.step([1, 2, 3], cache, last_only=False), model.step([4], cache)]
print(json.dumps(np.concatenate(out).tolist()))
"""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), kind], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    python_logits = np.array(json.loads(done.stdout))

    config = tiny_config("gemma2")
    model = Gemma(config, stored_as(random_params(config, np.random.default_rng(5)), kind))  # NumPy
    cache = model.new_cache()
    ref = np.concatenate([model.step([1, 2, 3], cache, last_only=False), model.step([4], cache)])
    assert rel_err(python_logits, ref) < 1e-5  # measured ~2e-7


# ---- the built-in model ---------------------------------------------------------------------------------------

PROMPT = "The three primary colours are"


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_real_model_same_on_both_backends(real_model, quantize, request):
    """Same logits and the same greedy text, float32 (the shared fixture) and int8 (packed for Numba)."""
    import minigemma
    from conftest import on_backend

    if quantize is None:
        reference, model = real_model, on_backend(real_model, "numba")
    else:
        model = minigemma.load(real_model.source, quantize=quantize, progress=False, backend="numba")
        reference = Gemma(model.config, model.params, model.tokenizer, backend=kernels.NUMPY)  # packed: read by rows()
    assert quantize is None or isinstance(model.params.embed, Int8x64)
    ids = model.tokenizer.encode(PROMPT, add_bos=True)
    ref_logits, ref_text = run(reference, ids, steps=12)
    logits, text = run(model, ids, steps=12)
    assert rel_err(logits, ref_logits) < 1e-4  # 18 layers of float32 reordering; measured ~1e-6
    assert text == ref_text
