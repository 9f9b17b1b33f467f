"""The key/value cache for incremental decoding: preallocated buffers, written in place, all-or-nothing.

Each layer keeps the rotated keys and the values of the positions it has seen, in buffers laid out
(slot, K, Dh) with position = start + slot. New keys are written into free slots past the committed length,
so a decode step copies one row, not the whole cache (concatenating per token would make a long generation
quadratic). When the buffer is full it is replaced by one twice the size.

Global layers keep everything; a sliding-window layer keeps only the W-1 positions that the next query can
still see (a query at i sees i-W < j <= i), so its memory stays bounded however long the text: when its
buffer fills up, the W-1 newest positions move to the front of a fresh buffer and the older ones are gone.

Each layer's buffers have its own shape: Gemma 4's global layers have another head dim and kv-head count than
its sliding ones. Gemma 4's KV-shared layers hold nothing of their own: their entry in `KVCache.layers` is
their source layer's LayerCache (GemmaConfig.kv_source), and they read what it wrote in this pass
(LayerCache.read): their keys and values are never computed, and never stored.

All-or-nothing: a forward pass writes only past `length` (or into a new buffer), and `KVCache.length` is
advanced once, when every layer is done (model.forward). An exception or Ctrl-C in the middle of a pass
therefore leaves the cache as it was: what it holds up to `length` has not changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_SLOTS = 64  # the smallest buffer allocated


@dataclass(frozen=True)
class _Buffers:
    """One layer's storage: swapped as a whole (one attribute assignment), never half-updated."""

    k: np.ndarray  # (capacity, K, Dh)
    v: np.ndarray  # (capacity, K, Dh)
    start: int  # absolute position of slot 0


def _capacity(needed: int) -> int:
    """The next power of two >= needed (at least MIN_SLOTS): doubling keeps copies amortised O(1) per token."""
    return max(MIN_SLOTS, 1 << (needed - 1).bit_length())


class _Committed:
    """The committed length, shared by a cache and its layers, so committing is one assignment."""

    value = 0


class LayerCache:
    def __init__(self, num_kv_heads: int, head_dim: int, window: int | None, committed: _Committed | None = None):
        self.window = window
        self._committed = committed or _Committed()
        self._buf = _Buffers(np.zeros((0, num_kv_heads, head_dim), np.float32),
                             np.zeros((0, num_kv_heads, head_dim), np.float32), 0)

    @property
    def length(self) -> int:
        """Committed: positions < length are held (the last W-1 of them on a sliding layer)."""
        return self._committed.value

    def _first_kept(self, position: int) -> int:
        """The oldest position held that a query at `position` or later can see."""
        return max(self._buf.start, 0 if self.window is None else position - (self.window - 1))

    @property
    def k(self) -> np.ndarray:
        """The committed keys. Shapes: (K, S, Dh), a view"""
        b, lo = self._buf, self._first_kept(self.length)
        return b.k[lo - b.start:self.length - b.start].transpose(1, 0, 2)  # (S, K, Dh) -> (K, S, Dh)

    @property
    def v(self) -> np.ndarray:
        """The committed values. Shapes: (K, S, Dh), a view"""
        b, lo = self._buf, self._first_kept(self.length)
        return b.v[lo - b.start:self.length - b.start].transpose(1, 0, 2)

    @property
    def positions(self) -> np.ndarray:
        """Shapes: (S,)"""
        return np.arange(self._first_kept(self.length), self.length)

    def update(self, k_new: np.ndarray, v_new: np.ndarray, positions: np.ndarray):
        """Write this step's keys and values past the committed length; return everything this step's
        queries may need (views of the buffers, oldest first). Nothing is committed here.

        Shapes: (K, T, Dh), (K, T, Dh), (T,) -> k (K, S, Dh), v (K, S, Dh), positions (S,)
        """
        first, T = int(positions[0]), k_new.shape[1]
        b = self._buf
        if len(b.k) == 0:  # nothing held yet: the buffer may start at any position
            b = _Buffers(b.k, b.v, first)
        elif first != self.length:
            raise ValueError(f"the cache holds positions up to {self.length}, cannot add position {first}")
        lo = max(b.start, 0 if self.window is None else first - (self.window - 1))  # what the first query sees
        if first + T - b.start > len(b.k):  # full: a new buffer, the kept positions at its front
            keep = slice(lo - b.start, first - b.start)
            capacity = _capacity(first + T - lo if self.window is None else max(first + T - lo, 2 * self.window))
            k, v = np.empty((capacity,) + b.k.shape[1:], np.float32), np.empty((capacity,) + b.v.shape[1:], np.float32)
            k[:first - lo], v[:first - lo] = b.k[keep], b.v[keep]
            self._buf = b = _Buffers(k, v, lo)  # same committed content, so an exception after this is harmless
        slots = slice(first - b.start, first + T - b.start)
        b.k[slots] = k_new.transpose(1, 0, 2)  # (K, T, Dh) -> (T, K, Dh): past `length`, invisible until commit
        b.v[slots] = v_new.transpose(1, 0, 2)
        seen = slice(lo - b.start, first + T - b.start)
        return b.k[seen].transpose(1, 0, 2), b.v[seen].transpose(1, 0, 2), np.arange(lo, first + T)

    def read(self, positions: np.ndarray):
        """What `update` returned for these positions' queries, for a layer that shares this cache (Gemma 4's
        KV sharing): the committed keys and values plus those written past `length` earlier in this pass.

        Shapes: (T,) -> k (K, S, Dh), v (K, S, Dh), positions (S,)
        """
        first, T = int(positions[0]), len(positions)
        b = self._buf
        lo = max(b.start, 0 if self.window is None else first - (self.window - 1))
        seen = slice(lo - b.start, first + T - b.start)
        return b.k[seen].transpose(1, 0, 2), b.v[seen].transpose(1, 0, 2), np.arange(lo, first + T)

    def nbytes(self) -> int:
        """Bytes of the allocated buffers: on a global layer a power of two at least what is held (the buffer
        doubles when full); on a sliding layer at least 2W slots from its first token (it keeps its window and
        reallocates every W + 1 tokens)."""
        return self._buf.k.nbytes + self._buf.v.nbytes


class KVCache:
    """One LayerCache per layer, and the number of positions processed so far (`length`).

    Setting `length` commits a forward pass (model.forward does it once, at the end) or rewinds: a smaller
    length forgets the positions past it (on a sliding layer, only as far back as it holds)."""

    def __init__(self, config):
        self._committed = _Committed()
        self.layers = []
        for i in range(config.num_hidden_layers):
            if config.kv_source(i) != i:  # Gemma 4 KV sharing: the source layer's cache itself, nothing new
                self.layers.append(self.layers[config.kv_source(i)])
            else:
                self.layers.append(LayerCache(config.layer_kv_heads(i), config.layer_head_dim(i),
                                              config.layer_window(i), self._committed))

    @property
    def length(self) -> int:
        """Position of the next token."""
        return self._committed.value

    @length.setter
    def length(self, value: int) -> None:
        self._committed.value = int(value)  # one assignment: every layer sees the new length at once

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in {id(c): c for c in self.layers}.values())  # a shared cache counts once


def kv_cache_bytes(config, length: int) -> int:
    """Bytes of float32 keys and values a cache holds after `length` positions (not counting the doubling's
    spare room): per layer with a cache of its own 2 * K * Dh * 4 bytes per position held, all `length` on a
    global layer, at most W - 1 on a sliding one; nothing for Gemma 4's KV-shared layers. The cache arithmetic
    of docs/gemma-versions.md, and `kv_cache_bytes` in --stats."""
    total = 0
    for i in range(config.num_hidden_layers):
        if config.kv_source(i) != i:
            continue  # shares its source layer's cache
        window = config.layer_window(i)
        held = length if window is None else min(length, window - 1)
        total += 2 * config.layer_kv_heads(i) * config.layer_head_dim(i) * 4 * held
    return total
