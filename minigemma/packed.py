"""The Numba backend's weight layouts: Int8 and Int4 (weights.py) with 64 output rows interleaved.

Only the Numba backend uses these (kernels_numba.prepare packs a matrix as it loads); the NumPy reference reads
the plain types of weights.py. Each packed type still has `shape`, `nbytes` and `rows(start, stop)`, so the
reference `layers.linear` can read it too (slowly), and `take(ids)` for the embedding lookup.

Also here: `release_pages`, which hands the pages of a memory-mapped file back to the OS once a tensor has been
converted (the loaders and the packing use it).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .weights import GROUP, Int4, Int8

# A matrix-vector product over Int8 walks one row at a time: per group, 32 products summed into one number.
# That horizontal sum is what a CPU does worst; the obvious Numba loop reads int8 weights at ~4 GB/s. The
# packed layouts below store 64 output rows side by side ("interleaved"): for group g, the weights of rows
# 64b..64b+63 for one element (or a few) are consecutive bytes. The kernels' innermost loops then run across
# rows with the inputs broadcast: independent sums per row, no horizontal sum, whole cache lines per step.
# Same bytes per weight as the unpacked form: the scales stay fp16, only reordered.
# Rows are padded with zeros up to a multiple of 64 (never needed for Gemma's shapes); `shape` is the
# logical one.
# Within the rows, a few of each row's bytes stay side by side, as many as a multiply-add of neighbours takes:
# Int8x64 keeps element 2p and 2p + 1 of a row as adjacent bytes, so one 16-byte load holds 8 rows x 2 inputs,
# what x86's vpmaddwd takes (16-bit pairs; kernels_numba.pair_sums); Int4x64 keeps 4 bytes of a row (8
# weights) together, so one 32-byte load holds 8 rows x 4 bytes, what vpmaddubsw takes (byte pairs;
# kernels_numba.digit_sums).

ROWS = 64  # output rows interleaved in one block of the packed layouts


def _interleave(a: np.ndarray, blocks: int, side: int = 1) -> np.ndarray:
    """(out, G, ...) -> (blocks, G, ..., 64): row 64b + r goes to [b, ..., r]. Rows past `out` are zeros.
    With `side` n > 1, (out, G, E) -> (blocks, G, E/n, 64, n): element n i + k of a row goes to [b, g, i, r, k]
    (Int8x64: n = 2 over 32 elements; Int4x64: n = 4 over 16 bytes).

    Copies a few blocks at a time into the preallocated result, so packing a Q8_0 view of a memory-mapped
    file never makes a second full-size temporary."""
    rest = a.shape[1:]
    layout = rest[:-1] + (rest[-1] // side, ROWS, side) if side > 1 else rest + (ROWS,)
    packed = np.zeros((blocks,) + layout, a.dtype)
    step = 256  # blocks per copy: 16k rows
    for b0 in range(0, blocks, step):
        b1 = min(b0 + step, blocks)
        part = a[b0 * ROWS:b1 * ROWS]  # (R, G, ...), R <= (b1 - b0) * 64 at the end of the matrix
        full = (b1 - b0) * ROWS
        if len(part) < full:
            part = np.concatenate([part, np.zeros((full - len(part),) + rest, a.dtype)])
        part = part.reshape((b1 - b0, ROWS) + rest)  # (nb, 64, G, ...)
        part = np.moveaxis(part, 1, -1)  # (nb, 64, G, ...) -> (nb, G, ..., 64)
        packed[b0:b1] = _side_by_side(part, side) if side > 1 else part
        release_pages(a[b0 * ROWS:b1 * ROWS])  # read once: a view of a mapped file need not stay in memory
    return packed


def release_pages(view: np.ndarray) -> None:
    """If `view` looks into a memory-mapped file, tell the OS this process is done with those pages.

    Reading a view of a mapped file (a GGUF Q8_0 tensor) makes its pages part of the process's resident
    memory until the file is unmapped. After repacking, the view is not read again, so madvise(DONTNEED)
    hands the pages back: they stay in the OS page cache (reading the view again would simply fault them
    back in), but no longer count twice in peak memory. Anything not backed by an mmap is left alone."""
    root = view
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, mmap.mmap) or not hasattr(root.base, "madvise") or view.size == 0:
        return
    mapped = np.frombuffer(root.base, np.uint8)  # the whole mapping, to learn its address
    offset = view.__array_interface__["data"][0] - mapped.__array_interface__["data"][0]
    span = sum((n - 1) * abs(st) for n, st in zip(view.shape, view.strides)) + view.itemsize
    if any(st < 0 for st in view.strides):
        return
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the view only
    last = (offset + span) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        root.base.madvise(mmap.MADV_DONTNEED, first, last - first)


def _side_by_side(a: np.ndarray, n: int) -> np.ndarray:
    """(..., E, 64) -> (..., E/n, 64, n): [..., n i + k, r] goes to [..., i, r, k] (a view)."""
    return np.swapaxes(a.reshape(a.shape[:-2] + (a.shape[-2] // n, n, ROWS)), -1, -2)


def _apart(a: np.ndarray) -> np.ndarray:
    """The inverse of _side_by_side (a copy): (..., E/n, 64, n) -> (..., E, 64)."""
    return np.swapaxes(a, -1, -2).reshape(a.shape[:-3] + (a.shape[-3] * a.shape[-1], ROWS))


def _deinterleave(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The inverse of _interleave for rows start..stop-1: (blocks, G, ..., 64) -> (stop - start, G, ...)."""
    b0, b1 = start // ROWS, -(-stop // ROWS)
    rows = np.moveaxis(a[b0:b1], -1, 1)  # (nb, G, ..., 64) -> (nb, 64, G, ...)
    rows = rows.reshape((-1,) + rows.shape[2:])  # (nb * 64, G, ...)
    return rows[start - b0 * ROWS:stop - b0 * ROWS]


@dataclass
class Int8x64:
    """Int8 with 64 rows interleaved and inputs in pairs: q[b, g, p, r, k] is element 32g + 2p + k of row 64b + r,
    scaled by d[b, g, r]."""

    q: np.ndarray  # (out/64, in/32, 16, 64, 2) int8
    d: np.ndarray  # (out/64, in/32, 64) float16
    out_rows: int  # logical number of rows (the last block may be zero padding)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_rows, self.q.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return self.q.size + 2 * self.d.size

    @cached_property
    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(q, d as uint16 bit patterns): what the Numba kernels take, made on first use and kept (a decode step
        passes each matrix to a kernel once per token; remaking the view each time was part of the ~15 us of
        Python around every product on an AMD EPYC Zen 3: docs/kernels.md). A packed matrix's arrays are never
        replaced, so what is kept stays right."""
        return self.q, self.d.view(np.uint16)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32"""
        b0, b1 = start // ROWS, -(-stop // ROWS)  # only the blocks asked for are taken apart (copied)
        start, stop = start - b0 * ROWS, stop - b0 * ROWS
        q, d = _apart(self.q[b0:b1]), self.d[b0:b1]
        return Int8(_deinterleave(q, start, stop), _deinterleave(d, start, stop)).rows(0, stop - start)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (any order) as float32, for the embedding lookup. Shapes: (T,) -> (T, in)"""
        ids = np.asarray(ids)
        q = self.q[ids // ROWS, :, :, ids % ROWS, :].reshape(len(ids), -1, GROUP).astype(np.float32)  # (T, G, 32)
        q *= self.d[ids // ROWS, :, ids % ROWS][..., None].astype(np.float32)
        return q.reshape(len(ids), -1)

    @classmethod
    def pack(cls, w: Int8) -> "Int8x64":
        blocks = -(-w.shape[0] // ROWS)
        return cls(_interleave(w.q, blocks, side=2), _interleave(w.d, blocks), w.shape[0])


@dataclass
class Int4x64:
    """Int4 with 64 rows interleaved and 4 bytes of a row side by side: byte nibbles[b, g, c, r, k] holds elements
    32g + 4c + k (low nibble) and 32g + 16 + 4c + k (high nibble) of row 64b + r (Int4's byte 4c + k of the
    group); that row's group g has scale d[b, g, r] and minimum m[b, g, r]."""

    nibbles: np.ndarray  # (out/64, in/32, 4, 64, 4) uint8
    d: np.ndarray  # (out/64, in/32, 64) float16
    m: np.ndarray  # (out/64, in/32, 64) float16
    out_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_rows, self.nibbles.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return self.nibbles.size + 2 * self.d.size + 2 * self.m.size

    @cached_property
    def kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(nibbles, d and m as uint16 bit patterns), as Int8x64.kernel_arrays."""
        return self.nibbles, self.d.view(np.uint16), self.m.view(np.uint16)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Shapes: -> (stop - start, in) float32"""
        b0, b1 = start // ROWS, -(-stop // ROWS)  # only the blocks asked for are taken apart (copied)
        start, stop = start - b0 * ROWS, stop - b0 * ROWS
        nibbles, d, m = _apart(self.nibbles[b0:b1]), self.d[b0:b1], self.m[b0:b1]
        return Int4(*(_deinterleave(a, start, stop) for a in (nibbles, d, m))).rows(0, stop - start)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32. Shapes: (T,) -> (T, in)"""
        ids = np.asarray(ids)
        b, r = ids // ROWS, ids % ROWS
        nibbles = self.nibbles[b, :, :, r, :].reshape(len(ids), -1, GROUP // 2)  # (T, G, 4, 4) -> (T, G, 16)
        return Int4(nibbles, self.d[b, :, r], self.m[b, :, r]).rows(0, len(ids))

    @classmethod
    def pack(cls, w: Int4) -> "Int4x64":
        blocks = -(-w.shape[0] // ROWS)
        return cls(_interleave(w.nibbles, blocks, side=4), _interleave(w.d, blocks), _interleave(w.m, blocks),
                   w.shape[0])
