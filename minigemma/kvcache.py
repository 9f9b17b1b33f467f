"""The key/value cache for incremental decoding.

Each layer keeps the rotated keys and the values of the positions it has seen, with their absolute
positions. Global layers keep everything; a sliding-window layer keeps only the W-1 positions that the next
query can still see (a query at i sees i-W < j <= i), so its memory stays bounded however long the text.
Attention masks are built from the stored positions, so what is kept never changes the result.
"""

from __future__ import annotations

import numpy as np


class LayerCache:
    def __init__(self, num_kv_heads: int, head_dim: int, window: int | None):
        self.window = window
        self.k = np.zeros((num_kv_heads, 0, head_dim), np.float32)  # (K, S, Dh)
        self.v = np.zeros((num_kv_heads, 0, head_dim), np.float32)  # (K, S, Dh)
        self.positions = np.zeros(0, np.int64)  # (S,)

    def update(self, k_new: np.ndarray, v_new: np.ndarray, positions: np.ndarray):
        """Add this step's keys and values; return everything this step's queries may need.

        Shapes: (K, T, Dh), (K, T, Dh), (T,) -> k (K, S, Dh), v (K, S, Dh), positions (S,)
        """
        k = np.concatenate([self.k, k_new], axis=1)  # (K, S_old + T, Dh)
        v = np.concatenate([self.v, v_new], axis=1)
        pos = np.concatenate([self.positions, positions])
        if self.window is None:
            self.k, self.v, self.positions = k, v, pos
        else:  # keep only the W-1 newest: the next query (at max(pos)+1) sees no further back
            keep = max(0, k.shape[1] - (self.window - 1))
            self.k, self.v, self.positions = k[:, keep:].copy(), v[:, keep:].copy(), pos[keep:].copy()
        return k, v, pos


class KVCache:
    """One LayerCache per layer, and the number of positions processed so far."""

    def __init__(self, config):
        self.layers = [LayerCache(config.num_key_value_heads, config.head_dim, config.layer_window(i))
                       for i in range(config.num_hidden_layers)]
        self.length = 0  # position of the next token

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
