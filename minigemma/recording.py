"""Recording what happens inside a forward pass, for looking inside and for `compare`.

The model code calls `record(layer, name=value, ...)` right where each value is computed. Outside a
`record_forward()` block that call only checks one module-level variable and returns: no copies, nothing
kept, so recording off costs nothing measurable (benchmarks/bench_recording.py). Inside the block every value
is copied into a `Recording`, one dict per forward call, so a prefill and the decode steps that follow it are
kept apart:

    with record_forward() as rec:
        logits = model.forward(ids)
    rec[3, "attn_out"]             # (T, D): layer 3's attention output, of the last call
    rec.attention_probs(5)         # (H, T, S): layer 5's attention pattern, computed on demand
    logit_lens(model, rec.residual_stream())   # (L + 1, T, V): what each layer's residual stream would predict

What is recorded (steps in the order they happen; `layer` is None for the steps outside the blocks):

    layer None  embed           (T, D)   token embeddings times sqrt(D): the residual stream entering layer 0
    per layer   attn_norm       (T, D)   input norm
                q               (H, T, Dh)  queries after QK-norm (Gemma 3) and RoPE
                k, v            (K, S, Dh)  keys (after QK-norm and RoPE) and values of every attended position,
                                         the cached ones included
                q_positions     (T,)     absolute positions of the queries
                k_positions     (S,)     and of the keys
                window, scale, softcap   this layer's sliding window (or None), score scale and soft-cap
                attn_out        (T, D)   attention output, after the output projection
                post_attn_norm  (T, D)   Gemma 2/3 only: the norm on the attention output
                resid_mid       (T, D)   residual stream after adding attention
                mlp_norm        (T, D)   the norm in front of the MLP
                mlp_out         (T, D)   MLP output
                post_mlp_norm   (T, D)   Gemma 2/3 only
                resid           (T, D)   residual stream leaving the block
    layer None  final_norm      (T, D)   (one row with last_only)
                logits          (T, V)

While recording, every layer computes every row, last_only or not: without a recording, a pass with last_only
carries only the last position past the last layer's keys and values (model.forward).

Attention probabilities are not recorded: a fast attention kernel never builds them (online softmax), so
`attention_probs` recomputes them from q, k and the mask inputs with the same function the NumPy attention
uses (layers.attention_probs). Values are copied when recorded because a fast backend may reuse its buffers.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import layers

_recording: "Recording | None" = None  # the active recording, or None when recording is off


def recording() -> bool:
    """Whether a record_forward() block is active."""
    return _recording is not None


def record(layer: int | None, **values) -> None:
    """Keep `values` under (layer, name) in the active recording; do nothing when none is active."""
    if _recording is None:
        return
    _recording._add(layer, values)


class Recording:
    """The values recorded during one or more forward calls. `calls[i]` maps (layer, name) -> value."""

    def __init__(self):
        self.calls: list[dict] = []

    def _add(self, layer, values):
        if layer is None and "embed" in values:  # the embedding starts a new forward call
            self.calls.append({})
        step = self.calls[-1]
        for name, value in values.items():
            step[layer, name] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value

    def __getitem__(self, key):
        """rec[layer, name] is that value in the last call; rec[layer, name, i] in call i."""
        layer, name, *call = key
        return self.calls[call[0] if call else -1][layer, name]

    def attention_probs(self, layer: int, call: int = -1) -> np.ndarray:
        """The attention probabilities of every query head, recomputed from what was recorded.

        Shapes: -> (H, T, S)
        """
        step = self.calls[call]
        get = lambda name: step[layer, name]  # noqa: E731
        mask = layers.attention_mask(get("q_positions"), get("k_positions"), get("window"))
        return layers.attention_probs(get("q"), get("k"), mask, get("scale"), get("softcap"))

    def residual_stream(self, call: int = -1) -> np.ndarray:
        """The residual stream entering the first block and leaving each block.

        Shapes: -> (L + 1, T, D)
        """
        step = self.calls[call]
        num_layers = sum(1 for layer, name in step if name == "resid")
        return np.stack([step[None, "embed"]] + [step[i, "resid"] for i in range(num_layers)])


@contextlib.contextmanager
def record_forward():
    """Record every forward call made inside the block. Not thread-safe: one recording at a time."""
    global _recording
    if _recording is not None:
        raise RuntimeError("record_forward() blocks cannot be nested")
    _recording = Recording()
    try:
        yield _recording
    finally:
        _recording = None


def logit_lens(model, hidden: np.ndarray) -> np.ndarray:
    """What the model would predict if the residual stream stopped here: the final norm and the tied head
    (and Gemma 2's final soft-cap), as at the end of model.forward, applied to any hidden state.

    nostalgebraist's "logit lens" (2020): in a residual network every layer writes into the same stream, so
    reading it out early shows when the next token is decided.

    Shapes: (..., D) -> (..., V)
    """
    c, p, ops = model.config, model.params, model.backend
    x = ops.rms_norm(hidden, p.final_norm, c.rms_norm_eps)
    shape = x.shape
    logits = ops.linear(x.reshape(-1, shape[-1]), p.embed)  # tied head: (N, D) -> (N, V)
    return layers.softcap(logits, c.final_logit_softcapping).reshape(*shape[:-1], -1)
