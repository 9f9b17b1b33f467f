"""The optimizers, schedules and clipping of optim.py against torch's (torch.optim.AdamW, clip_grad_norm_)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minigemma.optim import SGD, AdamW, clip_grad_norm, learning_rate

torch = pytest.importorskip("torch")


def _named(rng, shapes):
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


SHAPES = {"layers.0.q_proj.A": (4, 16), "layers.0.q_proj.B": (24, 4), "final_norm": (16,)}


@pytest.mark.parametrize("weight_decay, max_norm", [(0.0, 0.0), (0.1, 1.0)])
def test_adamw_matches_torch_over_five_steps(weight_decay, max_norm):
    """Five steps with fresh random gradients each time, a changing learning rate, decoupled weight decay and
    (second case) clipping that bites: the same parameters as torch.optim.AdamW + clip_grad_norm_."""
    rng = np.random.default_rng(0)
    params = _named(rng, SHAPES)
    theirs = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours = AdamW(params, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt = torch.optim.AdamW(list(theirs.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=weight_decay)
    for step in range(5):
        lr = learning_rate(step, 1e-2, total=5, warmup=2, schedule="cosine")
        grads = {k: (rng.standard_normal(v.shape) * 3).astype(np.float32) for k, v in params.items()}
        for k, t in theirs.items():
            t.grad = torch.tensor(grads[k].copy())
        if max_norm:
            torch_norm = float(torch.nn.utils.clip_grad_norm_(list(theirs.values()), max_norm))
            assert clip_grad_norm(grads, max_norm) == pytest.approx(torch_norm, rel=1e-5)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ours.step(grads, lr)
    for k, t in theirs.items():
        expected = t.detach().numpy()
        assert np.max(np.abs(params[k] - expected)) <= 1e-6 * np.max(np.abs(expected)) + 1e-7, k
    # the moments too: a resumed run restarts from them
    for k, t in theirs.items():
        state = opt.state[t]
        np.testing.assert_allclose(ours.m[k], state["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours.v[k], state["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)
    assert ours.t == 5


def test_adamw_state_round_trip_continues_identically():
    rng = np.random.default_rng(1)
    grads = [_named(rng, SHAPES) for _ in range(4)]
    a_params, b_params = _named(np.random.default_rng(2), SHAPES), _named(np.random.default_rng(2), SHAPES)
    a = AdamW(a_params, weight_decay=0.01)
    for g in grads:
        a.step({k: v.copy() for k, v in g.items()}, 1e-3)
    b = AdamW(b_params, weight_decay=0.01)
    for g in grads[:2]:
        b.step({k: v.copy() for k, v in g.items()}, 1e-3)
    saved = {k: v.copy() for k, v in b.state().items()}
    c = AdamW(b_params, weight_decay=0.01)  # a fresh optimizer, as after --resume
    c.load_state(saved)
    for g in grads[2:]:
        c.step({k: v.copy() for k, v in g.items()}, 1e-3)
    for k in a_params:
        np.testing.assert_array_equal(a_params[k], b_params[k])


def test_sgd_step_is_minus_lr_times_gradient():
    rng = np.random.default_rng(3)
    params = _named(rng, SHAPES)
    before = {k: v.copy() for k, v in params.items()}
    grads = _named(rng, SHAPES)
    SGD(params).step(grads, 0.05)
    for k in params:
        np.testing.assert_allclose(params[k], before[k] - np.float32(0.05) * grads[k], rtol=0, atol=1e-7)


def test_clip_grad_norm_global_norm_and_disable():
    grads = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert clip_grad_norm({k: v.copy() for k, v in grads.items()}, 0) == pytest.approx(5.0)
    unclipped = {k: v.copy() for k, v in grads.items()}
    clip_grad_norm(unclipped, 0)  # 0 disables: nothing changes
    assert all(np.array_equal(unclipped[k], grads[k]) for k in grads)
    clip_grad_norm(grads, 1.0)
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert total == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-5)


def test_schedules():
    lr, total, warmup = 1.0, 10, 2
    assert [learning_rate(s, lr, total, warmup) for s in range(3)] == [0.5, 1.0, 1.0]
    assert all(learning_rate(s, lr, total, warmup, "constant") == 1.0 for s in range(warmup, total))
    linear = [learning_rate(s, lr, total, warmup, "linear") for s in range(warmup, total)]
    assert linear == pytest.approx([1 - i / 8 for i in range(8)])
    cosine = [learning_rate(s, lr, total, warmup, "cosine") for s in range(warmup, total)]
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])
    assert cosine[4] == pytest.approx(0.5) and all(a > b for a, b in zip(cosine, cosine[1:]))
    # the same shape as transformers' cosine schedule after warmup (which is one step behind during warmup)
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert cosine == pytest.approx(theirs[warmup:])
    with pytest.raises(ValueError, match="schedule 'step'"):
        learning_rate(0, 1.0, 10, 0, "step")
