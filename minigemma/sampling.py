"""Choosing the next token: a few pure functions over the last position's logits.

Each filter takes a 1-D float32 logits vector, returns a *new* vector (the input is never changed) with
the disallowed tokens set to -inf, and matches one of transformers' logits processors
(generation/logits_process.py); the tests run those processors on the same logits. `sample_token`
chains them in transformers' order and draws with a `np.random.Generator` the caller passes in, so a
seed reproduces a generation exactly and no global random state is touched.

Shapes: V is the vocabulary size; every function here takes logits of shape (V,).

The repetition penalty needs the token history, so it is not part of `sample_token`; the generation loop
applies it first, the way transformers runs its logits processors before its warpers.
"""

from __future__ import annotations

import numpy as np

from . import layers
from .errors import InvalidArgument

f32 = np.float32


def _as_logits(logits) -> np.ndarray:
    """The logits as a 1-D float32 array (no copy if they already are one)."""
    logits = np.asarray(logits, dtype=f32)
    if logits.ndim != 1:
        raise InvalidArgument(f"logits must be 1-D (V,), got shape {logits.shape}")
    return logits


def softmax(logits) -> np.ndarray:
    """Probabilities from logits, in float32. -inf logits (filtered tokens) get probability exactly 0.

    The model's softmax (layers.softmax), with a check: it needs at least one finite logit.

    Shapes: (V,) -> (V,)
    """
    logits = _as_logits(logits)
    if not np.isfinite(logits.max()):
        raise InvalidArgument(f"softmax needs a finite largest logit, got {logits.max()}")
    return layers.softmax(logits)


def apply_repetition_penalty(logits, previous_ids, penalty: float) -> np.ndarray:
    """Make every token that already occurred less likely (penalty > 1) or more likely (penalty < 1).

    From CTRL (Keskar et al. 2019). Dividing a logit by the penalty only shrinks it if it is positive,
    so negative logits are multiplied instead. Each distinct id is penalised once, however often it
    occurred. penalty 1.0 is a no-op.

    Matches transformers' RepetitionPenaltyLogitsProcessor, including that it drops ids >= V (ids the
    embedding knows but the output head cannot produce). llama.cpp's penalties sampler uses the same rule
    (`logit <= 0 ? logit * p : logit / p`), but only over the last `penalty_last_n` tokens: pass
    a window as `previous_ids` to get that.

    Shapes: (V,), (N,) int -> (V,)
    """
    if not penalty > 0:
        raise InvalidArgument(f"penalty must be > 0, got {penalty}")
    logits = _as_logits(logits)
    ids = np.unique(np.asarray(previous_ids, dtype=np.int64))
    if ids.size and ids[0] < 0:
        raise InvalidArgument(f"previous_ids must be non-negative token ids, got {ids[0]}")
    ids = ids[ids < logits.shape[0]]
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * f32(penalty), seen / f32(penalty))
    return out


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Divide the logits by the temperature: < 1 sharpens the distribution, > 1 flattens it.

    Temperature 0 (greedy) is a limit, not a division; `sample_token` handles it with an argmax.
    Matches transformers' TemperatureLogitsWarper (which also divides in float32).

    Shapes: (V,) -> (V,)
    """
    if not temperature > 0:
        raise InvalidArgument(f"temperature must be > 0 here (use sample_token for greedy), got {temperature}")
    return _as_logits(logits) / f32(temperature)


def top_k_filter(logits, k: int) -> np.ndarray:
    """Keep the k highest logits; k <= 0 or k >= V keeps everything.

    Matches transformers' TopKLogitsWarper: everything below the k-th largest value goes, so ties with the
    k-th value all stay and more than k tokens can survive. (llama.cpp's top-k sorts and cuts at exactly k.)

    Shapes: (V,) -> (V,)
    """
    logits = _as_logits(logits)
    V = logits.shape[0]
    if k <= 0 or k >= V:
        return logits.copy()
    kth = np.partition(logits, V - k)[V - k]  # the k-th largest value
    return np.where(logits < kth, f32(-np.inf), logits)


def top_p_filter(logits, p: float) -> np.ndarray:
    """Nucleus sampling (Holtzman et al. 2019): keep the most likely tokens whose probabilities add up to p.

    Put another way: a token stays if the tokens ranked above it hold less than p of the mass, so the
    smallest set reaching p survives, and always at least the top token. p = 1 keeps everything.

    Matches transformers' TopPLogitsWarper, which works from the other end: sort ascending, cumulative
    sum, drop every token whose running total is <= 1 - p, then un-drop the last (top) one. We copy that
    exactly, numerics included: softmax over the sorted logits, the cumulative sum accumulated in float64
    and rounded to float32 (torch's CPU cumsum does this), compared with 1 - p rounded to float32. The
    one thing we cannot copy is which of several *tied* tokens straddling the cut survives, since
    torch.sort is not stable. We sort stably and keep the lowest ids, as np.argmax does, so the greedy
    token always survives.

    Shapes: (V,) -> (V,)
    """
    if not 0 < p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1], got {p}")
    logits = _as_logits(logits)
    if p >= 1:
        return logits.copy()  # transformers does not even add the warper for top_p = 1
    # Ascending (least likely first); among equal logits the higher ids come first, so are dropped first.
    order = np.argsort(-logits, kind="stable")[::-1]
    cum = np.cumsum(softmax(logits[order]), dtype=np.float64).astype(f32)
    drop_sorted = cum <= f32(1 - p)
    drop_sorted[-1] = False  # always keep the most likely token
    drop = np.empty_like(drop_sorted)
    drop[order] = drop_sorted  # back from sorted to vocabulary order
    return np.where(drop, f32(-np.inf), logits)


def min_p_filter(logits, min_p: float) -> np.ndarray:
    """Keep tokens at least min_p times as likely as the most likely one; min_p = 0 keeps everything.

    The cut scales with the model's confidence: a peaked distribution keeps few tokens, a flat one many.
    Matches transformers' MinPLogitsWarper, which compares probabilities (float32 softmax against
    float32(min_p) * max prob), so a token whose probability underflows to 0 is dropped. llama.cpp compares
    logits instead (logit >= max + log(min_p)), the same test up to rounding.

    Shapes: (V,) -> (V,)
    """
    if not 0 <= min_p <= 1:
        raise InvalidArgument(f"min_p must be in [0, 1], got {min_p}")
    logits = _as_logits(logits)
    if min_p == 0:
        return logits.copy()
    probs = softmax(logits)
    return np.where(probs < f32(min_p) * probs.max(), f32(-np.inf), logits)


def sample_token(logits, rng: np.random.Generator, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> int:
    """Pick the next token id from the last position's logits.

    temperature 0 is greedy: the argmax, the filters are irrelevant and rng is not used. Otherwise the
    logits go through temperature -> top-k -> top-p -> min-p, the order transformers' generate() builds its
    warpers in, and one token is drawn from the softmax of what is left. The defaults switch every filter
    off. (llama.cpp's default chain applies temperature *last*, after top-k/top-p/min-p, so the same
    settings keep somewhat different sets there.)

    Shapes: (V,) -> scalar int
    """
    if not temperature >= 0:
        raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
    logits = _as_logits(logits)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    logits = min_p_filter(logits, min_p)
    probs = softmax(logits).astype(np.float64)
    # Generator.choice draws one uniform number and inverts the normalised CDF, so a token with
    # probability 0 (filtered out) can never be picked.
    return int(rng.choice(probs.shape[0], p=probs / probs.sum()))
