"""Sampling: each filter against the transformers logits processor it copies, plus properties and statistics.

The oracles are transformers' own processors, run here on the same logits as torch tensors of shape (1, V).
The properties compute the allowed set straight from each method's definition, in float64, independently
of the code under test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minigemma.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_token,
    softmax,
    top_k_filter,
    top_p_filter,
)

# --------------------------------------------------------------------------------------------------
# Against transformers
# --------------------------------------------------------------------------------------------------

# (kind, V, seed). "ties" draws small integers, so many logits are equal, including at the cut.
CASES = [
    ("normal", 2, 0), ("normal", 10, 1), ("normal", 257, 2),
    ("wide", 64, 3), ("wide", 300, 4),
    ("ties", 5, 5), ("ties", 40, 6), ("ties", 200, 7),
]


def make_logits(kind: str, V: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(V).astype(np.float32)
    if kind == "wide":  # a peaked distribution, like a confident LM
        return (rng.standard_normal(V) * 4.0).astype(np.float32)
    return rng.integers(-3, 4, V).astype(np.float32)


def hf(processor, logits: np.ndarray, input_ids=None) -> np.ndarray:
    """Run a transformers logits processor on (1, V) scores; return (V,) as NumPy."""
    if input_ids is None:
        input_ids = torch.zeros((1, 1), dtype=torch.long)  # the warpers ignore it
    scores = torch.from_numpy(logits.copy())[None]
    return processor(input_ids, scores)[0].numpy()


def assert_same_filter(ours: np.ndarray, theirs: np.ndarray, logits: np.ndarray):
    """Same kept (finite) tokens, kept values untouched, dropped ones -inf."""
    kept = np.isfinite(ours)
    np.testing.assert_array_equal(kept, np.isfinite(theirs), err_msg="kept token sets differ")
    np.testing.assert_array_equal(ours[kept], logits[kept])
    np.testing.assert_array_equal(ours[kept], theirs[kept])
    assert np.all(ours[~kept] == -np.inf)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.3, 2.0])
def test_temperature_matches_hf(case, temperature):
    x = make_logits(*case)
    ours = apply_temperature(x, temperature)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf(TemperatureLogitsWarper(float(temperature)), x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.2, 2.0])
def test_repetition_penalty_matches_hf(case, penalty):
    x = make_logits(*case)
    V = x.shape[0]
    rng = np.random.default_rng(case[2] + 100)
    previous = rng.integers(0, V, size=max(1, V // 2))  # with repeats: each id is penalised once
    ours = apply_repetition_penalty(x, previous, penalty)
    theirs = hf(RepetitionPenaltyLogitsProcessor(float(penalty)), x, torch.from_numpy(previous)[None])
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    untouched = np.setdiff1d(np.arange(V), previous)
    np.testing.assert_array_equal(ours[untouched], x[untouched])


def test_repetition_penalty_by_hand():
    x = np.array([2.0, -2.0, 0.5, 3.0], dtype=np.float32)
    # id 1 occurs twice but is penalised once; positive logits are divided, negative ones multiplied.
    out = apply_repetition_penalty(x, [0, 1, 1], 2.0)
    np.testing.assert_array_equal(out, [1.0, -4.0, 0.5, 3.0])
    np.testing.assert_array_equal(apply_repetition_penalty(x, [], 2.0), x)
    # Ids the output head cannot produce (>= V) are ignored, as transformers does; negative ids are an error.
    out = apply_repetition_penalty(x, [3, 4, 99], 2.0)
    np.testing.assert_array_equal(out, [2.0, -2.0, 0.5, 1.5])
    hf_out = hf(RepetitionPenaltyLogitsProcessor(2.0), x, torch.tensor([[3, 4, 99]]))
    np.testing.assert_array_equal(out, hf_out)
    with pytest.raises(ValueError, match="previous_ids"):
        apply_repetition_penalty(x, [1, -1], 2.0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize("k", [1, 2, 3, 17, "V-1", "V", "V+5"])
def test_top_k_matches_hf(case, k):
    x = make_logits(*case)
    V = x.shape[0]
    k = {"V-1": V - 1, "V": V, "V+5": V + 5}.get(k, k)
    if k < 1:
        pytest.skip("V too small")
    # On "ties" cases the k-th value is usually tied: both keep every token >= it, so more than k.
    assert_same_filter(top_k_filter(x, k), hf(TopKLogitsWarper(k), x), x)


def test_top_k_ties_and_no_op_by_hand():
    x = np.array([1.0, 2.0, 2.0, 3.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(np.isfinite(top_k_filter(x, 2)), [False, True, True, True, False])
    for k in (0, -3, 5, 9):  # <= 0 or >= V: nothing is filtered (transformers rejects k <= 0 outright)
        np.testing.assert_array_equal(top_k_filter(x, k), x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize("p", [1e-6, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_hf(case, p):
    x = make_logits(*case)
    ours, theirs = top_p_filter(x, p), hf(TopPLogitsWarper(p), x)
    if case[0] != "ties":
        assert_same_filter(ours, theirs, x)
    else:
        # When tied tokens straddle the cut, which of them survive depends on sort order, and torch.sort
        # is not stable. So compare what can be compared: the same number of tokens with the same values.
        kept_ours, kept_theirs = np.isfinite(ours), np.isfinite(theirs)
        np.testing.assert_array_equal(np.sort(x[kept_ours]), np.sort(x[kept_theirs]))
        np.testing.assert_array_equal(ours[kept_ours], x[kept_ours])
        assert np.all(ours[~kept_ours] == -np.inf)


def test_top_p_edges_by_hand():
    x = np.zeros(4, dtype=np.float32)  # four tokens at exactly 0.25
    # "smallest set adding up to p or more": a set that reaches exactly p is enough...
    assert np.isfinite(top_p_filter(x, 0.5)).sum() == 2
    assert np.isfinite(top_p_filter(x, 0.75)).sum() == 3
    # ...and one just short of it is not.
    assert np.isfinite(top_p_filter(x, 0.76)).sum() == 4
    for p in (0.5, 0.75, 0.76):
        assert np.isfinite(top_p_filter(x, p)).sum() == np.isfinite(hf(TopPLogitsWarper(p), x)).sum()
    # Of tied tokens at the cut, the lowest ids survive, as with np.argmax.
    np.testing.assert_array_equal(np.isfinite(top_p_filter(x, 0.5)), [True, True, False, False])
    # A tiny p still keeps the top token, even if it alone holds almost nothing.
    y = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(np.isfinite(top_p_filter(y, 1e-9)), np.arange(10) == 9)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9, 0.99])
def test_top_p_rounding_matches_hf_on_flat_distribution(p):
    # 1000 tokens at 0.001 each put the cut exactly on a running total, so the rounding of the cumulative
    # sum decides it (at p = 0.1 transformers keeps 101 tokens, not 100). torch accumulates in float64.
    x = np.zeros(1000, dtype=np.float32)
    assert np.isfinite(top_p_filter(x, p)).sum() == np.isfinite(hf(TopPLogitsWarper(p), x)).sum()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 1.0])
def test_min_p_matches_hf(case, min_p):
    x = make_logits(*case)
    assert_same_filter(min_p_filter(x, min_p), hf(MinPLogitsWarper(min_p), x), x)


class RecordingRng:
    """Stands in for np.random.Generator: records the distribution sample_token draws from."""

    def choice(self, n, p):
        self.n, self.p = n, p
        return int(np.argmax(p))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "ties"], ids=lambda c: f"{c[0]}-V{c[1]}")
@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.5, 8, 0.9, 0.0), (0.8, 0, 0.8, 0.05), (1.3, 20, 0.95, 0.1),
     (2.0, 5, 1.0, 0.3), (0.5, 0, 0.5, 0.0)],
)
def test_sample_token_draws_from_hf_warper_chain(case, temperature, top_k, top_p, min_p):
    # transformers' generate() builds temperature -> top-k -> top-p -> min-p (skipping the ones switched
    # off) and samples from the softmax of the result; sample_token must hand rng exactly that distribution.
    x = make_logits(*case)
    chain = [TemperatureLogitsWarper(float(temperature))]
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(TopPLogitsWarper(top_p))
    chain.append(MinPLogitsWarper(min_p))
    scores = x
    for warper in chain:
        scores = hf(warper, scores)
    expected = torch.softmax(torch.from_numpy(scores), -1).numpy()
    rng = RecordingRng()
    sample_token(x, rng, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    assert rng.n == x.shape[0]
    np.testing.assert_array_equal(rng.p > 0, expected > 0)
    np.testing.assert_allclose(rng.p, expected, rtol=1e-5, atol=1e-7)
    assert rng.p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}")
def test_softmax_matches_torch_and_float64(case):
    x = make_logits(*case)
    p = softmax(x)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, torch.softmax(torch.from_numpy(x), -1).numpy(), rtol=1e-5, atol=1e-7)
    x64 = x.astype(np.float64)
    ref = np.exp(x64 - x64.max()) / np.exp(x64 - x64.max()).sum()
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)


def test_softmax_handles_inf_and_large_logits():
    p = softmax(np.array([-np.inf, 0.0, 0.0, -np.inf], dtype=np.float32))
    np.testing.assert_array_equal(p, [0.0, 0.5, 0.5, 0.0])
    p = softmax(np.array([1000.0, 1000.0, -1000.0], dtype=np.float32))  # exp(1000) would overflow
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="finite"):
        softmax(np.full(3, -np.inf, dtype=np.float32))


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@st.composite
def logits_vectors(draw):
    """Random (V,) float32 logits; half the time small integers, so ties are everywhere."""
    V = draw(st.integers(2, 40))
    if draw(st.booleans()):
        elements = st.integers(-4, 4).map(float)
    else:
        elements = st.floats(-10, 10, width=32)
    return draw(hnp.arrays(np.float32, V, elements=elements))


def probs64(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def allowed_top_k(logits, k):
    """Tokens not strictly below the k-th largest logit."""
    if k <= 0 or k >= logits.size:
        return np.ones(logits.size, bool)
    return logits >= np.sort(logits)[::-1][k - 1]


def allowed_top_p(logits, p, temperature, tol=1e-5):
    """Tokens whose strictly more likely rivals hold less than p of the mass (tol absorbs float32 rounding)."""
    pr = probs64(logits, temperature)
    mass_above = np.array([pr[pr > pr_i].sum() for pr_i in pr])
    return mass_above < p + tol


def allowed_min_p(logits, min_p, temperature, tol=1e-5):
    """Tokens with p_i >= min_p * p_max, i.e. z_i >= z_max + log(min_p) (tol absorbs rounding)."""
    if min_p == 0:
        return np.ones(logits.size, bool)
    z = logits.astype(np.float64) / temperature
    return z >= z.max() + np.log(min_p) - tol


temperatures = st.sampled_from([0.5, 1.0, 1.7])
seeds = st.integers(0, 2**32 - 1)
N_DRAWS = 200


def draws(logits, seed, **kw):
    rng = np.random.default_rng(seed)
    return np.array([sample_token(logits, rng, **kw) for _ in range(N_DRAWS)])


@settings(max_examples=60, deadline=None)
@given(x=logits_vectors(), k=st.integers(-2, 45), t=temperatures, seed=seeds)
def test_top_k_only_picks_allowed(x, k, t, seed):
    allowed = allowed_top_k(x, k)
    assert np.array_equal(np.isfinite(top_k_filter(x, k)), allowed)  # the filter itself is exact
    assert allowed[draws(x, seed, temperature=t, top_k=k)].all()


@settings(max_examples=60, deadline=None)
@given(x=logits_vectors(), p=st.floats(0.01, 1.0), t=temperatures, seed=seeds)
def test_top_p_only_picks_allowed(x, p, t, seed):
    allowed = allowed_top_p(x, p, t)
    kept = np.isfinite(top_p_filter(apply_temperature(x, t), p))
    assert not (kept & ~allowed).any()
    # Not too greedy either: what is kept holds at least p of the mass.
    assert probs64(x, t)[kept].sum() >= p - 1e-5
    assert allowed[draws(x, seed, temperature=t, top_p=p)].all()


@settings(max_examples=60, deadline=None)
@given(x=logits_vectors(), min_p=st.floats(0.0, 1.0), t=temperatures, seed=seeds)
def test_min_p_only_picks_allowed(x, min_p, t, seed):
    allowed = allowed_min_p(x, min_p, t)
    kept = np.isfinite(min_p_filter(apply_temperature(x, t), min_p))
    assert not (kept & ~allowed).any()
    # Every token clearly above the threshold is kept.
    assert kept[allowed_min_p(x, min_p, t, tol=-1e-5)].all()
    assert allowed[draws(x, seed, temperature=t, min_p=min_p)].all()


@settings(max_examples=60, deadline=None)
@given(
    x=logits_vectors(), k=st.integers(0, 45), p=st.floats(1e-9, 1.0), min_p=st.floats(0.0, 1.0),
    t=temperatures, seed=seeds,
)
def test_combined_filters_only_pick_allowed_and_keep_top(x, k, p, min_p, t, seed):
    top = int(np.argmax(x))
    for out in (top_k_filter(x, k), top_p_filter(x, p), min_p_filter(x, min_p)):
        assert np.isfinite(out[top])  # the most likely token always survives
    # A draw must pass every filter. top-p and min-p see the *already filtered* logits in the chain,
    # so each set below is a superset of what the chain allows, and their intersection is too.
    xk = np.where(allowed_top_k(x, k), x, -np.inf).astype(np.float32)
    allowed = allowed_top_k(x, k) & allowed_top_p(xk, p, t)
    picked = draws(x, seed, temperature=t, top_k=k, top_p=p, min_p=min_p)
    assert allowed[picked].all()
    assert allowed_min_p(x, min_p, t)[picked].all()  # min_p relative to the max holds regardless


@settings(max_examples=50, deadline=None)
@given(x=logits_vectors(), ids=st.lists(st.integers(0, 39), max_size=20))
def test_repetition_penalty_one_is_identity(x, ids):
    ids = [i for i in ids if i < x.size]
    np.testing.assert_array_equal(apply_repetition_penalty(x, ids, 1.0), x)


@settings(max_examples=50, deadline=None)
@given(x=logits_vectors(), k=st.integers(0, 45), p=st.floats(0.01, 1.0), min_p=st.floats(0.0, 1.0))
def test_filters_never_mutate_input(x, k, p, min_p):
    before = x.copy()
    outs = [f(x) for f in (
        lambda v: top_k_filter(v, k), lambda v: top_p_filter(v, p), lambda v: min_p_filter(v, min_p),
        lambda v: apply_temperature(v, 0.5), lambda v: apply_repetition_penalty(v, [0, 1], 1.5),
    )]
    np.testing.assert_array_equal(x, before)
    assert all(o is not x for o in outs)


@settings(max_examples=50, deadline=None)
@given(x=logits_vectors())
def test_temperature_zero_is_argmax_and_uses_no_randomness(x):
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample_token(x, rng, temperature=0) == int(np.argmax(x))
    assert sample_token(x, rng, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2) == int(np.argmax(x))
    assert rng.bit_generator.state == state


def test_seed_reproduces_draws():
    x = np.random.default_rng(1).standard_normal(50).astype(np.float32) * 0.1  # nearly flat
    kw = dict(temperature=0.9, top_k=40, top_p=0.95)
    a = [sample_token(x, np.random.default_rng(123), **kw) for _ in range(3)]
    assert len(set(a)) == 1  # a fresh generator with the same seed gives the same first draw

    np.random.seed(0)
    global_state = np.random.get_state()[1].copy()
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    seq1 = [sample_token(x, rng1, **kw) for _ in range(100)]
    seq2 = [sample_token(x, rng2, **kw) for _ in range(100)]
    assert seq1 == seq2
    # ...and the sequence really is random: another seed differs, and many tokens appear.
    rng3 = np.random.default_rng(8)
    seq3 = [sample_token(x, rng3, **kw) for _ in range(100)]
    assert seq3 != seq1
    assert len(set(seq1)) > 10
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)  # global RNG untouched


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, top_k",
    [(1.0, 0), (2.0, 0), (1.0, 3)],
)
def test_draws_follow_softmax(temperature, top_k):
    """20000 draws over V=5; every frequency within 5 binomial sigmas of its probability.

    A frequency f of a token with probability q over N draws has standard deviation sqrt(q(1-q)/N),
    <= 0.0036 here; a 5-sigma miss has probability ~6e-7 per token, and the seed is fixed anyway.
    """
    x = np.array([1.0, 0.5, -0.3, 2.0, 0.0], dtype=np.float32)
    q = probs64(x, temperature)
    if top_k:  # renormalised over the k most likely
        q = np.where(allowed_top_k(x, top_k), q, 0.0)
        q /= q.sum()
    N = 20_000
    rng = np.random.default_rng(2024)
    counts = np.bincount([sample_token(x, rng, temperature=temperature, top_k=top_k) for _ in range(N)],
                         minlength=5)
    freq = counts / N
    sigma = np.sqrt(q * (1 - q) / N)
    assert np.all(np.abs(freq - q) <= 5 * sigma + 1e-12), (freq, q)


# --------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------

X = np.array([0.1, 0.2, 0.3], dtype=np.float32)
RNG = np.random.default_rng(0)


BAD_ARGUMENTS = {
    "apply_temperature(0)": (lambda: apply_temperature(X, 0.0), "temperature", 0.0),
    "apply_temperature(-1)": (lambda: apply_temperature(X, -1.0), "temperature", -1.0),
    "sample_token(temperature=-0.5)": (lambda: sample_token(X, RNG, temperature=-0.5), "temperature", -0.5),
    "top_p_filter(0)": (lambda: top_p_filter(X, 0.0), "top_p", 0.0),
    "top_p_filter(1.5)": (lambda: top_p_filter(X, 1.5), "top_p", 1.5),
    "top_p_filter(-0.1)": (lambda: top_p_filter(X, -0.1), "top_p", -0.1),
    "top_p_filter(nan)": (lambda: top_p_filter(X, float("nan")), "top_p", float("nan")),
    "sample_token(top_p=0)": (lambda: sample_token(X, RNG, top_p=0.0), "top_p", 0.0),
    "min_p_filter(-0.1)": (lambda: min_p_filter(X, -0.1), "min_p", -0.1),
    "min_p_filter(1.1)": (lambda: min_p_filter(X, 1.1), "min_p", 1.1),
    "sample_token(min_p=2)": (lambda: sample_token(X, RNG, min_p=2.0), "min_p", 2.0),
    "apply_repetition_penalty(0)": (lambda: apply_repetition_penalty(X, [0], 0.0), "penalty", 0.0),
    "apply_repetition_penalty(-1.2)": (lambda: apply_repetition_penalty(X, [0], -1.2), "penalty", -1.2),
}


@pytest.mark.parametrize("call, name, value", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_raise(call, name, value):
    # The message names the parameter and the offending value.
    with pytest.raises(ValueError, match=rf"\b{name}\b.*{re.escape(str(value))}"):
        call()


def test_logits_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"1-D.*\(1, 3\)"):
        top_k_filter(X[None], 2)
