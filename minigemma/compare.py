"""Layer-by-layer comparison with transformers: where do two Gemma implementations part?

Both models run the same tokens. minigemma's values come from its recording (recording.py); transformers'
come from forward hooks on its modules (input_layernorm, self_attn, mlp, ... : the same steps) and from an
attention function registered with its AttentionInterface, which runs transformers' own eager attention and
keeps q, k, v after RoPE and the attention probabilities. For each step of each layer the report gives the
largest difference relative to the size of the value, max|ours - theirs| / max|theirs|, and names the first
step where that exceeds float32 noise (noise_threshold). The first departure is where a bug starts: every later step
inherits it.

transformers is needed only here, and imported only when a comparison runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .recording import logit_lens, record_forward

# Float32 noise, as a relative difference, for a prompt of T tokens:  8 * eps32 * max(T, 32).
# Two correct float32 implementations differ by rounding in a different order. Measured on the built-in model
# (Gemma 3 270M, 18 layers; largest difference over every step of every layer, English prose and a counting
# prompt): ~3e-6 up to 32 tokens, then growing with the prompt: 7.5e-6 at 64 tokens, 1.5e-5 at 128,
# 3.1e-5 at 256, 7.9e-5 at 512 (prose), i.e. about eps32 * T, largest in layer 0's q from 64 tokens on. The
# growth is RoPE's: each side's angle pos * theta_i carries a float32 rounding error of up to ~pos * eps32
# radians, and q and k inherit it. The floor of 32 covers the
# rounding accumulated over the layers on short prompts. The factor 8 leaves room on both sides: on the
# default 13-token prompt the threshold is 3e-5 against 3e-6 measured, while the subtlest bug in
# tests/test_compare.py, exact instead of tanh GELU, shows as 8.5e-5 in layer 0's MLP output of the built-in
# model (1.3e-4 on the tiny test model); the other bugs are 1e-2 or more.
# Long repetitive prompts are ill-conditioned: on a 512-token counting prompt plain rounding reaches 1.2e-3
# (layer 8's MLP output); on a similar prompt transformers' float32 logits are 5e-4 off a float64 run and
# ours 9e-4 (tests/test_real_model.py). Compare on short prompts, where a bug stands out.
EPS32 = float(np.finfo(np.float32).eps)


def noise_threshold(num_tokens: int) -> float:
    """The largest relative difference still counted as float32 rounding, for a prompt of `num_tokens`."""
    return 8 * EPS32 * max(num_tokens, 32)


# The steps in the order they happen (recording.py describes each). `probs` is recomputed from q and k.
# Gemma 4 adds per_layer_inputs (E-series), router (the routing weights of each token's top-k experts) and
# moe_out (dense MLP + experts, MoE models), per_layer_out (the per-layer input's residual branch).
MODEL_STEPS_BEFORE = ("embed", "per_layer_inputs")
LAYER_STEPS = ("attn_norm", "q", "k", "v", "probs", "attn_out", "post_attn_norm", "resid_mid", "mlp_norm",
               "mlp_out", "router", "moe_out", "post_mlp_norm", "per_layer_out", "resid")
MODEL_STEPS_AFTER = ("final_norm", "logits")

# the name of the attention function registered with transformers' AttentionInterface
HF_ATTENTION = "minigemma_recording"


@dataclass
class Difference:
    """One step of one layer (layer None: outside the blocks)."""

    layer: int | None
    step: str
    rel_diff: float  # max|ours - theirs| / max|theirs|; inf if the shapes differ
    magnitude: float  # max|theirs|, so a reader sees the scale the difference is relative to

    def where(self) -> str:
        return self.step if self.layer is None else f"layer {self.layer} {self.step}"


@dataclass
class Report:
    differences: list[Difference]  # every step compared, in the order the model runs them
    threshold: float
    num_layers: int
    # the logit lens at the last position, per residual stream (embedding, then each layer's output):
    # (our top-1 token, transformers' top-1 token), both read with our final norm and head
    lens: list[tuple[int, int]] = field(default_factory=list)

    def departs(self, d: Difference) -> bool:
        return not d.rel_diff <= self.threshold  # written so that NaN departs too

    @property
    def first_departure(self) -> Difference | None:
        """The first step (in running order) whose difference exceeds the threshold, or None."""
        return next((d for d in self.differences if self.departs(d)), None)

    def difference(self, layer: int | None, step: str) -> Difference:
        return next(d for d in self.differences if d.layer == layer and d.step == step)

    def format(self, decode=None) -> str:
        """The report as a table: one row per layer, one column per step, and the logit lens's top-1 guess for
        the next token at the last position (`decode` turns a token id into text)."""
        decode = decode or str
        steps = [s for s in LAYER_STEPS if any(d.step == s for d in self.differences)]

        def cell(d):
            return f"{d.rel_diff:8.1e}" + ("!" if self.departs(d) else " ")

        def lens(i):
            if i >= len(self.lens):
                return ""
            ours, theirs = self.lens[i]
            return repr(decode(ours)) + ("" if ours == theirs else f" (transformers: {decode(theirs)!r})")

        lines = ["max |minigemma - transformers| / max |transformers|, per step ('!' = above float32 noise, "
                 f"{self.threshold:.1e})", ""]
        width = {s: max(len(s), 9) + 2 for s in steps}
        lines.append(f"{'layer':>5}  " + "".join(f"{s:>{width[s]}}" for s in steps) + "  logit lens")
        embed = self.difference(None, "embed")
        lines.append(f"{'embed':>5}  {cell(embed):>{width[steps[0]]}}"
                     + " " * sum(width[s] for s in steps[1:]) + f"  {lens(0)}")
        for layer in range(self.num_layers):
            row = {d.step: d for d in self.differences if d.layer == layer}
            cells = "".join(f"{cell(row[s]) if s in row else '':>{width[s]}}" for s in steps)
            lines.append(f"{layer:>5}  {cells}  {lens(layer + 1)}")
        for step in MODEL_STEPS_BEFORE[1:] + MODEL_STEPS_AFTER:
            if any(d.layer is None and d.step == step for d in self.differences):
                lines.append(f"{step:>10}: {cell(self.difference(None, step))}")
        lines.append("")
        first = self.first_departure
        if first is None:
            worst = max(self.differences, key=lambda d: d.rel_diff)
            lines.append(f"every step is within float32 noise (largest: {worst.rel_diff:.1e} at {worst.where()})")
        else:
            lines.append(f"first departure from float32 noise: {first.where()} "
                         f"(relative difference {first.rel_diff:.1e}, value size {first.magnitude:.3g})")
        return "\n".join(lines)


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """max|ours - theirs| / max|theirs| and max|theirs|; inf when the shapes differ."""
    theirs = np.asarray(theirs, dtype=np.float64)
    magnitude = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    if np.shape(ours) != theirs.shape:
        return float("inf"), magnitude
    diff = float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs))) if theirs.size else 0.0
    return (diff / magnitude if magnitude > 0 else diff), magnitude


def compare(model, hf_model, token_ids, threshold: float | None = None) -> Report:
    """Run minigemma's `model` and transformers' `hf_model` (a *ForCausalLM in float32) on the same tokens and
    compare every recorded step. `threshold` defaults to noise_threshold(len(token_ids))."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    if threshold is None:
        threshold = noise_threshold(len(token_ids))
    with record_forward() as rec:
        model.forward(token_ids)
    ours = rec.calls[-1]
    theirs = transformers_intermediates(hf_model, token_ids)

    num_layers = model.config.num_hidden_layers
    keys = [(None, s) for s in MODEL_STEPS_BEFORE]
    keys += [(i, s) for i in range(num_layers) for s in LAYER_STEPS]
    keys += [(None, s) for s in MODEL_STEPS_AFTER]
    differences = []
    for layer, step in keys:
        if (layer, step) not in theirs:  # e.g. post_attn_norm on Gemma 1
            continue
        mine = (rec.attention_probs(layer) if step == "probs" else
                ours[layer, "router_weights"] if step == "router" else ours[layer, step])
        differences.append(Difference(layer, step, *relative_difference(mine, theirs[layer, step])))

    # the logit lens on both residual streams, read the same way (our final norm and head) at the last position
    our_stream = rec.residual_stream()[:, -1]  # (L + 1, D)
    their_stream = np.stack([theirs[None, "embed"][-1]] + [theirs[i, "resid"][-1] for i in range(num_layers)])
    lens = list(zip(logit_lens(model, our_stream).argmax(-1).tolist(),
                    logit_lens(model, their_stream).argmax(-1).tolist()))
    return Report(differences, threshold, num_layers, lens)


def transformers_intermediates(hf_model, token_ids) -> dict:
    """transformers' values for the same (layer, step) keys as minigemma's recording, batch axis dropped.

    Norms, the attention block, the MLP and whole decoder layers are modules: a forward hook sees their
    inputs and outputs. q, k, v after RoPE and the attention probabilities live inside the attention module,
    so we register an attention function that calls transformers' own eager attention and keeps them
    (transformers' AttentionInterface, the documented way to plug in attention).
    """
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    values: dict = {}

    def keep(layer, step, tensor):
        values[layer, step] = tensor[0].detach().float().numpy().copy()  # drop the batch axis

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward  # this model's own eager attention
        out, probs = eager(module, query, key, value, attention_mask, **kwargs)
        for step, t in (("q", query), ("k", key), ("v", value), ("probs", probs)):
            keep(module.layer_idx, step, t)
        return out, probs

    AttentionInterface.register(HF_ATTENTION, recording_attention)
    AttentionMaskInterface.register(HF_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])

    def hook(layer, output_step=None, input_step=None):
        def fn(module, args, output):
            if input_step:
                keep(layer, input_step, args[0])
            if output_step:
                keep(layer, output_step, output[0] if isinstance(output, tuple) else output)
        return fn

    def router_hook(layer):  # Gemma4TextRouter returns (probabilities, top-k weights, top-k experts)
        def fn(module, args, output):
            keep(layer, "router", output[1][None])
        return fn

    decoder = hf_model.get_decoder()  # the Gemma*TextModel: embed_tokens, layers, norm
    handles = [decoder.embed_tokens.register_forward_hook(hook(None, "embed")),
               decoder.norm.register_forward_hook(hook(None, "final_norm"))]
    if getattr(decoder, "hidden_size_per_layer_input", 0):  # Gemma 4 E-series: a method, not a module
        project = decoder.project_per_layer_inputs

        def recording_project(*args, **kwargs):
            out = project(*args, **kwargs)
            keep(None, "per_layer_inputs", out)
            return out

        decoder.project_per_layer_inputs = recording_project
    for i, layer in enumerate(decoder.layers):
        pre_ffw = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2/3/4, VaultGemma
        post_norms = hasattr(layer, "post_feedforward_layernorm")  # not VaultGemma
        mlp_norm = layer.pre_feedforward_layernorm if pre_ffw else layer.post_attention_layernorm
        handles += [layer.input_layernorm.register_forward_hook(hook(i, "attn_norm")),
                    layer.self_attn.register_forward_hook(hook(i, "attn_out")),
                    mlp_norm.register_forward_hook(hook(i, "mlp_norm", input_step="resid_mid")),
                    layer.mlp.register_forward_hook(hook(i, "mlp_out")),
                    layer.register_forward_hook(hook(i, "resid"))]
        if post_norms:
            moe = getattr(layer, "enable_moe_block", False)  # the norm's input is the dense + experts sum
            handles += [layer.post_attention_layernorm.register_forward_hook(hook(i, "post_attn_norm")),
                        layer.post_feedforward_layernorm.register_forward_hook(
                            hook(i, "post_mlp_norm", input_step="moe_out" if moe else None))]
        if getattr(layer, "enable_moe_block", False):
            handles.append(layer.router.register_forward_hook(router_hook(i)))
        if getattr(layer, "hidden_size_per_layer_input", 0):
            handles.append(layer.post_per_layer_input_norm.register_forward_hook(hook(i, "per_layer_out")))

    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(HF_ATTENTION)
    try:
        with torch.no_grad():
            logits = hf_model(torch.as_tensor(token_ids)[None], use_cache=False).logits
        keep(None, "logits", logits)
    finally:
        hf_model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
        decoder.__dict__.pop("project_per_layer_inputs", None)  # the class's method again
    return values


def require_transformers() -> None:
    """A one-line error, before any slow loading, where transformers or torch is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("compare needs transformers and torch, which minigemma itself does not "
                         "(pip install transformers torch)") from None


def load_transformers_model(model):
    """transformers' float32 model for the same checkpoint as a loaded minigemma `model`."""
    from pathlib import Path

    require_transformers()
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model.source)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if model.config.model_type == "gemma":  # integrations/ggml.py GGUF_CONFIG_MAPPING has gemma2/gemma3 only
        raise ValueError(f"{path}: transformers cannot load Gemma 1 GGUF files; compare the Hugging Face "
                         "directory of the same model instead")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
