"""Optimizers, learning-rate schedules and gradient clipping: what turns gradients into new weights.

Parameters and gradients are dicts of float32 arrays keyed by name (train.parameters, train.loss_and_grads).
The parameters are views into the model's weights, so an optimizer step updates the model in place.

    AdamW   torch.optim.AdamW's update, in the same order (torch/optim/adam.py, _single_tensor_adam with
            decoupled_weight_decay=True), so a run reproduces torch's to float32 rounding:
                p <- p * (1 - lr * wd)                         decoupled weight decay (Loshchilov & Hutter)
                m <- b1 m + (1 - b1) g                         first moment
                v <- b2 v + (1 - b2) g^2                       second moment
                p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
            eps is added *after* the bias correction of sqrt(v), as torch does (the original Adam paper writes
            the same; some ports add it before, which changes the first steps noticeably when v is small).
    SGD     p <- p - lr * g. No momentum: the plainest update, and the one a test can check by hand.

A schedule gives the learning rate of each step: a linear warmup, then constant, cosine or linear decay.
Clipping scales all gradients together when their global norm exceeds a bound (torch.nn.utils.clip_grad_norm_).
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "sgd")


class AdamW:
    """AdamW over named float32 arrays, updated in place; its state (t, m, v) can be saved and restored."""

    def __init__(self, params: dict[str, np.ndarray], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.t = 0  # steps taken (torch's state["step"]): the bias corrections depend on it
        self.m = {name: np.zeros_like(p) for name, p in params.items()}  # first moment, per parameter
        self.v = {name: np.zeros_like(p) for name, p in params.items()}  # second moment

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        b1, b2, f32 = self.beta1, self.beta2, np.float32
        step_size = lr / (1 - b1**self.t)  # the bias corrections, as torch computes them (Python floats)
        bias_correction2_sqrt = math.sqrt(1 - b2**self.t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if self.weight_decay:
                p *= f32(1 - lr * self.weight_decay)  # decoupled: not through the moments
            m += (g - m) * f32(1 - b1)  # torch's exp_avg.lerp_(grad, 1 - b1): m + (1 - b1)(g - m)
            v *= f32(b2)
            v += f32(1 - b2) * g * g
            denom = np.sqrt(v) / f32(bias_correction2_sqrt) + f32(self.eps)
            p -= f32(step_size) * (m / denom)

    def state(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs, as arrays (saved with safetensors by finetune.py)."""
        out = {"t": np.array([self.t], np.int64)}
        out.update({f"m.{k}": a for k, a in self.m.items()})
        out.update({f"v.{k}": a for k, a in self.v.items()})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"][0])
        for name in self.params:
            self.m[name][...] = state[f"m.{name}"]
            self.v[name][...] = state[f"v.{name}"]


class SGD:
    """Plain stochastic gradient descent: p <- p - lr * g, in place. It has no state."""

    def __init__(self, params: dict[str, np.ndarray], weight_decay: float = 0.0):
        self.params, self.weight_decay, self.t = params, weight_decay, 0

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        self.t += 1
        for name, p in self.params.items():
            if self.weight_decay:
                p *= np.float32(1 - lr * self.weight_decay)  # decoupled, as in AdamW (0 by default)
            p -= np.float32(lr) * grads[name]

    def state(self) -> dict[str, np.ndarray]:
        return {"t": np.array([self.t], np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"][0])


def make_optimizer(name: str, params: dict[str, np.ndarray], weight_decay: float = 0.0):
    if name == "adamw":
        return AdamW(params, weight_decay=weight_decay)
    if name == "sgd":
        return SGD(params, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def learning_rate(step: int, lr: float, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`.

    Warmup ramps linearly over the first `warmup` steps, reaching `lr` at step warmup - 1 (transformers'
    schedules start at 0 and waste the first step; here step 0 already moves by lr / warmup). After it:
      constant  lr
      linear    lr * (1 - p)                  p = the fraction of the post-warmup steps already done
      cosine    lr * (1 + cos(pi p)) / 2      (transformers get_cosine_schedule_with_warmup, one half-wave)
    so the last step's rate is small but not zero.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return lr * (1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) in place, where norm is the 2-norm of all of
    them together (torch.nn.utils.clip_grad_norm_, same epsilon). max_norm 0 disables clipping. Returns the
    norm before clipping (worth logging: spikes show a learning rate too high)."""
    norm = math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64), g.ravel().astype(np.float64)))
                         for g in grads.values()))
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads.values():
                g *= np.float32(coef)
    return norm
