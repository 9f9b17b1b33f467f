"""The loss and the gradients of train.py against transformers + torch autograd, and peft for LoRA.

Oracles:
  * full fine-tuning: transformers' own model (tiny, random, Gemma 1, 2 and 3) given the same batch with
    `labels`, `(loss * count).backward()`: every parameter's .grad against ours;
  * LoRA: peft.get_peft_model on that model (every projection targeted, lora_dropout 0, B random so that A's
    gradients are not zero), its lora_A / lora_B copied into weights.LoRA: their .grad against ours;
  * QLoRA: the same with our int8 / int4 base weights, torch running on those weights dequantized;
  * a float64 finite-difference check of every gradient tensor on a tiny model (no torch at all);
  * the definition: a dense cross-entropy over logits of the inference forward, and minigemma's perplexity.

Tolerance: relative error (max |ours - torch| / max |torch|, per tensor) <= 1e-4 in float32. Both sides sum
over a few hundred terms per value in different orders; full fine-tuning comes within ~1e-5. peft's random B
(init_lora_weights=False) is large, and with it the LoRA cases come within 2e-5 at the median but not always:
over 1000 draws on gemma4-dense-keqv the worst tensor passed 1e-4 three times (1.5e-4 at most), and there
torch's own float32 is as far from torch float64 as from ours (1.2e-4; ours is 2.5e-5 from float64). So
with_peft seeds its draw. A wrong derivative anywhere is off by far more than 1e-2.
"""

from __future__ import annotations

import copy
import tracemalloc

import numpy as np
import pytest
import torch

import minigemma
from conftest import load_hf_float32, make_hf_model, random_params, rel_err, save
from minigemma import train, weights
from minigemma.config import GemmaConfig
from minigemma.errors import InvalidArgument
from minigemma.model import Gemma
from minigemma.params import LAYER_TENSORS, MODEL_TENSORS
from minigemma.perplexity import log_softmax, perplexity

RTOL = 1e-4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
MODELS = {  # every path: MQA, GQA, MHA; caps that bend; sliding windows shorter than the batch; QK-norm
    "gemma-mqa": ("gemma", dict(num_key_value_heads=1)),
    "gemma2-gqa-caps": ("gemma2", dict(sliding_window=5, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                                       layer_types=LAYERS)),
    "gemma3-mha": ("gemma3_text", dict(num_key_value_heads=4, sliding_window=4, layer_types=LAYERS)),
}


@pytest.fixture(scope="module", params=MODELS)
def checkpoint_dir(request, tmp_path_factory):
    model_type, overrides = MODELS[request.param]
    return save(make_hf_model(model_type, seed=5, **overrides), tmp_path_factory.mktemp(request.param))


def batch(seed=0, B=3, T=11, V=160):
    """Random tokens (some are <pad> = 0, whose embedding row transformers never trains as an input) and
    labels with the prompt part of one row and one lone position masked."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T))
    tokens[0, 2] = tokens[-1, 5] = 0
    labels = tokens.copy()
    labels[0, :5] = -100
    labels[-1, 4] = -100
    return tokens, labels


def hf_name(config: GemmaConfig, name: str) -> str:
    """Our parameter name -> transformers' (without peft's prefix), by the tensor tables of params.py. A Gemma 4
    expert's "layers.{i}.experts_down.{e}" is expert e of transformers' stacked tensor (hf_grads)."""
    if not name.startswith("layers."):
        return next(s.hf for s in MODEL_TENSORS if s.field == name)
    _, i, field = name.split(".")[:3]
    spec = next(s for s in LAYER_TENSORS if s.field == field and s.when(config, int(i)))
    return f"model.layers.{i}.{spec.hf}"


def hf_grads(hf, config: GemmaConfig, names) -> dict:
    """transformers' .grad of each of our parameters (one expert's slice of a stacked expert tensor)."""
    hf_params = dict(hf.named_parameters())
    out = {}
    for name in names:
        grad = hf_params[hf_name(config, name)].grad.numpy()
        parts = name.split(".")
        out[name] = grad[int(parts[3])] if len(parts) == 4 and parts[2].startswith("experts_") else grad
    return out


def torch_loss_backward(hf, tokens, labels) -> tuple[float, int]:
    """transformers' mean loss times the count: the gradient of the sum, as loss_and_grads returns."""
    out = hf(torch.as_tensor(tokens), labels=torch.as_tensor(labels))
    count = int((labels[:, 1:] != -100).sum())
    (out.loss * count).backward()
    return out.loss.item() * count, count


def assert_grads_close(ours: dict, ref: dict, rtol=RTOL):
    errors = {name: rel_err(ours[name], ref[name]) for name in ref}
    worst = max(errors, key=errors.get)
    assert set(ours) == set(ref)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e}"
    assert all(np.abs(g).max() > 0 for g in ref.values())  # every tensor is actually exercised


def with_peft(hf, r=4, alpha=8.0, seed=0):
    """peft draws A and B from torch's global generator: seeded here, so the adapters (and how close float32
    comes on them) do not depend on which tests ran before. An unseeded draw put gate_proj.B of
    gemma4-dense-keqv at 1.95e-4 in one CI run (see the module docstring)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0,
                             init_lora_weights=False)  # B random, not zero: A's gradient is not zero
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(hf, config)


def copy_adapters(model, peft_model, alpha=8.0):
    """Wrap each targeted weight of our model in a weights.LoRA holding peft's A and B."""
    modules = dict(peft_model.named_modules())
    for name in (f"layers.{i}.{f}" for i, p in enumerate(model.params.layers) for f in TARGETS
                 if getattr(p, f) is not None):  # Gemma 4: KV-shared layers have no k/v_proj, K=V ones no v_proj
        _, i, field = name.split(".")
        prefix = "base_model.model." + hf_name(model.config, name).removesuffix(".weight")
        A = modules[prefix + ".lora_A.default"].weight.detach().numpy().copy()
        B = modules[prefix + ".lora_B.default"].weight.detach().numpy().copy()
        p = model.params.layers[int(i)]
        setattr(p, field, weights.LoRA(getattr(p, field), A, B, alpha / A.shape[0]))


def peft_grads(model, peft_model) -> dict:
    modules = dict(peft_model.named_modules())
    out = {}
    for name in train.parameters(model, "lora"):
        layer_name, which = name.rsplit(".", 1)
        prefix = "base_model.model." + hf_name(model.config, layer_name).removesuffix(".weight")
        out[name] = modules[f"{prefix}.lora_{which}.default"].weight.grad.numpy()
    return out


# ---- against torch -----------------------------------------------------------------------------------------

def test_full_fine_tuning_gradients_match_torch(checkpoint_dir):
    model = minigemma.load(checkpoint_dir)
    hf = load_hf_float32(checkpoint_dir)
    tokens, labels = batch()
    total, count, grads = train.loss_and_grads(model, tokens, labels, train="full")
    ref_total, ref_count = torch_loss_backward(hf, tokens, labels)
    assert count == ref_count == 3 * 10 - 4 - 1  # row 0's first 4 targets, one of the last row's
    assert total == pytest.approx(ref_total, rel=1e-5)
    hf_params = dict(hf.named_parameters())
    assert len(grads) == len(hf_params)  # every parameter of transformers' model (the head is the embedding)
    assert_grads_close(grads, hf_grads(hf, model.config, grads))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_lora_gradients_match_peft(checkpoint_dir, quantize):
    """LoRA on float32, and QLoRA on int8 / int4 base weights, against peft on transformers running on the
    very weights ours hold (dequantized)."""
    model = minigemma.load(checkpoint_dir, quantize=quantize)
    hf = load_hf_float32(checkpoint_dir)
    if quantize:  # torch computes with our quantized weights, widened
        hf_params = dict(hf.named_parameters())
        with torch.no_grad():
            hf_params["model.embed_tokens.weight"].copy_(torch.as_tensor(weights.dequantize(model.params.embed)))
            for i, p in enumerate(model.params.layers):
                for field in TARGETS:
                    w = getattr(p, field)
                    assert not isinstance(w, np.ndarray)  # really quantized
                    hf_params[hf_name(model.config, f"layers.{i}.{field}")].copy_(
                        torch.as_tensor(weights.dequantize(w)))
    peft_model = with_peft(hf)
    copy_adapters(model, peft_model)
    tokens, labels = batch(seed=1)
    total, count, grads = train.loss_and_grads(model, tokens, labels, train="lora")
    ref_total, _ = torch_loss_backward(peft_model, tokens, labels)
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert len(grads) == 2 * len(TARGETS) * model.config.num_hidden_layers
    assert_grads_close(grads, peft_grads(model, peft_model))


# ---- Gemma 4 (and VaultGemma): the cases of test_gemma4.py -------------------------------------------------

@pytest.fixture(scope="module")
def gemma4_dir(tmp_path_factory):
    """name -> a saved tiny checkpoint of test_gemma4.CASES (dense K=V, E-series with KV sharing, per-layer
    inputs and a double-wide MLP, MoE, VaultGemma), each written once per module, when first asked for."""
    from test_gemma4 import CASES

    saved = {}

    def get(name):
        if name not in saved:
            model_type, overrides = CASES[name]
            saved[name] = save(make_hf_model(model_type, seed=len(name), head_dim=16, **overrides),
                               tmp_path_factory.mktemp(name))
        return saved[name]

    return get


@pytest.mark.parametrize("name", ["gemma4-dense-keqv", "gemma4-eseries", "gemma4-moe", "vaultgemma"])
def test_full_fine_tuning_gradients_match_torch_gemma4(gemma4_dir, name):
    """Every parameter of transformers' model, Gemma 4's new ones included (per-layer table, projection and
    norm, the per-layer branch, router, experts, the MoE norms); layer_scalar is a buffer there and frozen here."""
    directory = gemma4_dir(name)
    model = minigemma.load(directory)
    hf = load_hf_float32(directory)
    tokens, labels = batch()
    total, count, grads = train.loss_and_grads(model, tokens, labels, train="full")
    ref_total, ref_count = torch_loss_backward(hf, tokens, labels)
    assert count == ref_count
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert {hf_name(model.config, n) for n in grads} == set(dict(hf.named_parameters()))  # each one, no more
    assert not any("layer_scalar" in n for n in grads)
    assert_grads_close(grads, hf_grads(hf, model.config, grads))


@pytest.mark.parametrize("name", ["gemma4-dense-keqv", "gemma4-eseries"])
def test_lora_gradients_match_peft_gemma4(gemma4_dir, name):
    """LoRA on the seven projections of a Gemma 4: peft wraps no k/v_proj on a KV-shared layer and no v_proj on a
    K=V layer (transformers has none there), and neither does minigemma (lora.add_adapters, copy_adapters)."""
    directory = gemma4_dir(name)
    model = minigemma.load(directory)
    peft_model = with_peft(load_hf_float32(directory))
    copy_adapters(model, peft_model)
    tokens, labels = batch(seed=1)
    total, count, grads = train.loss_and_grads(model, tokens, labels, train="lora")
    ref_total, _ = torch_loss_backward(peft_model, tokens, labels)
    assert total == pytest.approx(ref_total, rel=1e-5)
    wrapped = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default")}
    assert len(grads) == 2 * len(wrapped) < 2 * len(TARGETS) * model.config.num_hidden_layers
    assert_grads_close(grads, peft_grads(model, peft_model))


def test_qlora_gradients_match_peft_gemma4(gemma4_dir):
    """QLoRA on the MoE case: int4 storage (which keeps some matrices int8: weights.storage_for), the experts and
    the router quantized too, against peft on transformers running our quantized weights dequantized."""
    from test_gemma4 import dequantized_hf_model

    directory = gemma4_dir("gemma4-moe")
    model = minigemma.load(directory, quantize="int4")
    assert not isinstance(model.params.layers[0].experts_down[0], np.ndarray)  # really quantized
    peft_model = with_peft(dequantized_hf_model(load_hf_float32(directory), model))
    copy_adapters(model, peft_model)
    tokens, labels = batch(seed=1)
    total, count, grads = train.loss_and_grads(model, tokens, labels, train="lora")
    ref_total, _ = torch_loss_backward(peft_model, tokens, labels)
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert_grads_close(grads, peft_grads(model, peft_model))


@pytest.mark.parametrize("mode", ["full", "lora-dropout"])
def test_checkpointing_gives_identical_gradients_with_kv_sharing(gemma4_dir, mode):
    """The KV-sharing trap: recomputing a shared layer in the backward needs its source's K and V, which the
    source's own recomputation comes after. The very same numbers with and without checkpointing."""
    assert_checkpointing_changes_nothing(gemma4_dir("gemma4-eseries"), mode)


def test_backends_give_the_same_gradients_gemma4(gemma4_dir):
    """The Numba backend and the NumPy reference on the MoE case (full fine-tuning) and the E-series (QLoRA)."""
    pytest.importorskip("numba")
    tokens, labels = batch(seed=10)
    directory = gemma4_dir("gemma4-moe")
    full = [train.loss_and_grads(minigemma.load(directory, backend=b), tokens, labels, train="full")
            for b in ("numpy", "numba")]
    assert full[0][0] == pytest.approx(full[1][0], rel=1e-5)
    assert_grads_close(full[1][2], full[0][2], rtol=5e-5)
    directory = gemma4_dir("gemma4-eseries")
    lora = [train.loss_and_grads(lora_model(directory, quantize="int8", backend=b), tokens, labels)
            for b in ("numpy", "numba")]
    assert_grads_close(lora[1][2], lora[0][2], rtol=5e-5)


def test_saved_gemma4_adapter_gives_our_logits_in_peft(gemma4_dir, tmp_path):
    """lora.add_adapters on every projection a Gemma 4 has (none on the KV-shared layers' missing k/v_proj),
    lora.save_adapter, then peft.PeftModel.from_pretrained on transformers' model: peft finds every key
    and computes minigemma's logits."""
    import peft

    from conftest import hf_logits
    from minigemma.lora import adapters, add_adapters, save_adapter

    directory = gemma4_dir("gemma4-eseries")
    ours = minigemma.load(directory)
    n = add_adapters(ours, rank=3, alpha=6, seed=0)
    rng = np.random.default_rng(5)
    for w in adapters(ours.params).values():  # B starts at zero; make it count
        w.B[...] = rng.standard_normal(w.B.shape).astype(np.float32) * 0.2
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_hf_float32(directory), tmp_path / "adapter").eval()
    assert sum(p.numel() for name, p in theirs.named_parameters() if "lora_" in name) == n
    ids = np.random.default_rng(3).integers(0, 160, 12)
    expected = hf_logits(theirs, ids)
    assert rel_err(ours.forward(ids), expected) < 1e-4
    assert rel_err(expected, hf_logits(load_hf_float32(directory), ids)) > 1e-2  # the adapter does something


# ---- against finite differences, in float64 ----------------------------------------------------------------

S, F = "sliding_attention", "full_attention"
# every new part of Gemma 4 at once, tiny: global layers with their own head dim (8) and one kv head, K=V,
# proportional RoPE, per-layer inputs (P = 4), the last two layers sharing K/V (a sliding and a global one) with
# a double-wide MLP, 3 experts (2 per token) in every block, a final soft-cap
GEMMA4 = dict(num_hidden_layers=5, layer_types=[S, F, S, S, F], global_head_dim=8, num_global_key_value_heads=1,
              attention_k_eq_v=True, hidden_size_per_layer_input=4, vocab_size_per_layer_input=40,
              num_kv_shared_layers=2, use_double_wide_mlp=True, enable_moe_block=True, num_experts=3,
              top_k_experts=2, moe_intermediate_size=5, final_logit_softcapping=3.0,
              rope_parameters={S: {"rope_type": "default", "rope_theta": 1000.0},
                               F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4}})


def float64_model(model_type: str, seed: int, lora: bool) -> Gemma:
    c = GemmaConfig.from_hf_dict({**dict(
        model_type=model_type, vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=6, sliding_window=3,
        layer_types=[S, F], max_position_embeddings=64,
        **({"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0} if model_type == "gemma2" else {})),
        **(GEMMA4 if model_type == "gemma4_text" else {})})
    rng = np.random.default_rng(seed)
    params = random_params(c, rng, std=0.4)
    for name in train.model_fields(params):
        setattr(params, name, getattr(params, name).astype(np.float64))
    for p in params.layers:
        for field in train.layer_fields(p):
            w = getattr(p, field)
            if isinstance(w, list):  # Gemma 4's experts
                setattr(p, field, [m.astype(np.float64) for m in w])
                continue
            w = w.astype(np.float64)
            if lora and field in TARGETS:
                w = weights.LoRA(w, rng.standard_normal((3, w.shape[1])) * 0.3,
                                 rng.standard_normal((w.shape[0], 3)) * 0.3, 0.7)
            setattr(p, field, w)
    return Gemma(c, params)


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text", "gemma4_text"])
@pytest.mark.parametrize("mode", ["full", "lora", "lora-dropout"])
def test_gradients_are_finite_differences(model_type, mode):
    """For each trainable tensor, along a random direction d: (L(p + h d) - L(p - h d)) / 2h = <grad, d>,
    with L the loss sum in float64. h = 1e-6: the truncation error shrinks as h^2 (measured: 3e-4 relative
    at h = 1e-4 on Gemma 1's embedding, 3e-8 at 1e-6) and rounding grows as 1e-16 |L| / h ~ 1e-8.
    Gemma 4 (every new part at once, GEMMA4) bends more (router softmax, gelu gates stacked on gelu gates): at
    h = 1e-6 its embedding's difference is still 6e-6 off, all within 1e-6 at h = 1e-7, so there the
    fourth-order difference (8 (L(h) - L(-h)) - (L(2h) - L(-2h))) / 12h takes away the h^2 term instead."""
    train_kind = "full" if mode == "full" else "lora"
    model = float64_model(model_type, seed=3, lora=train_kind == "lora")
    tokens, labels = batch(seed=2, B=2, T=7, V=40)
    tokens[tokens == 0] = 1  # no <pad>: as transformers, its row gets no gradient as an input (a convention,
    labels[labels == 0] = 1  # not the derivative, which this test checks)
    dropout = 0.3 if mode == "lora-dropout" else 0.0
    _, _, grads = train.loss_and_grads(model, tokens, labels, train=train_kind, dropout=dropout,
                                       rng=np.random.default_rng(9))
    drop = None
    if dropout:  # the same masks as loss_and_grads drew from the same generator
        drop = train.LoRADropout(dropout, int(np.random.default_rng(9).integers(2**63)), model)
    params = train.parameters(model, train_kind)
    rng = np.random.default_rng(4)
    h = 1e-6

    def loss_along(p, d, step):  # L(p + step d), p restored
        p += step * d
        value = train._run(model, tokens, labels, dropout=drop)[0]
        p -= step * d
        return value

    for name, p in params.items():
        d = rng.standard_normal(p.shape)
        numeric = (loss_along(p, d, h) - loss_along(p, d, -h)) / (2 * h)
        if model_type == "gemma4_text":
            numeric = (4 * numeric - (loss_along(p, d, 2 * h) - loss_along(p, d, -2 * h)) / (4 * h)) / 3
        analytic = float(np.sum(grads[name] * d))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8), name


# ---- the loss ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return minigemma.load(save(make_hf_model("gemma2", seed=3, sliding_window=6, final_logit_softcapping=4.0),
                               tmp_path_factory.mktemp("tiny")))


def test_chunked_loss_is_dense_cross_entropy(tiny):
    """A few positions of logits at a time give the loss of all the logits at once (inference forward, one
    sequence at a time, log-softmax over the whole vocabulary), and the same gradients."""
    tokens, labels = batch(seed=4, B=2, T=13)
    total, count = train.loss(tiny, tokens, labels, chunk=3)
    dense = 0.0
    for seq, lab in zip(tokens, labels):
        logp = log_softmax(tiny.forward(seq))  # (T, V)
        dense -= sum(logp[t, lab[t + 1]] for t in range(len(seq) - 1) if lab[t + 1] != -100)
    assert count == int((labels[:, 1:] != -100).sum())
    assert total == pytest.approx(dense, rel=1e-5)
    _, _, by_3 = train.loss_and_grads(tiny, tokens, labels, train="full", chunk=3)
    _, _, whole = train.loss_and_grads(tiny, tokens, labels, train="full")
    assert_grads_close(by_3, whole, rtol=1e-6)


def test_loss_is_loss_and_grads_loss(tiny):
    tokens, labels = batch(seed=5)
    assert train.loss(tiny, tokens, labels) == train.loss_and_grads(tiny, tokens, labels, train="full")[:2]


def test_exp_loss_is_perplexity(tiny):
    """exp(mean loss) of <bos> + a text is the perplexity of the text, scored in one window."""
    ids = np.random.default_rng(6).integers(3, 160, 40).tolist()
    tokens = np.array([[tiny.config.bos_token_id] + ids])
    total, count = train.loss(tiny, tokens, tokens)
    assert count == len(ids)
    assert np.exp(total / count) == pytest.approx(perplexity(tiny, ids, context=len(ids) + 1).perplexity, rel=1e-5)


@pytest.mark.slow
def test_exp_loss_is_perplexity_on_the_built_in_model(real_model):
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = real_model.tokenizer.encode(text, add_bos=False)
    tokens = np.array([[real_model.config.bos_token_id] + ids])
    total, count = train.loss(real_model, tokens, tokens)
    expected = perplexity(real_model, ids, context=len(ids) + 1).perplexity
    assert count == len(ids)
    assert np.exp(total / count) == pytest.approx(expected, rel=1e-5)


def test_logits_are_never_made_whole(tmp_path):
    """With a vocabulary big enough to see: the peak of memory allocated during a LoRA step stays well under
    the (B*T, V) float32 logits, and each block of logits has the `chunk` positions asked for. The same step
    with the whole batch in one chunk does reach it (so the measurement can see logits)."""
    V = 65536
    model = lora_model(save(make_hf_model("gemma3_text", seed=1, vocab_size=V), tmp_path))
    tokens, labels = batch(seed=7, B=2, T=64, V=V)
    whole = tokens.size * V * 4  # 32 MiB
    made = []
    linear = model.backend.linear
    model.backend = type(model.backend)(**{**vars(model.backend), "linear": lambda x, w: (
        made.append(x.shape[0]) if w is model.params.embed else None) or linear(x, w)})

    def peak(chunk):
        tracemalloc.start()
        train.loss_and_grads(model, tokens, labels, chunk=chunk)
        bytes_ = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return bytes_

    in_blocks = peak(16)
    assert max(made) == 16 and sum(made) == int((labels[:, 1:] != -100).sum())
    assert in_blocks < whole / 2, f"peak {in_blocks / 2**20:.1f} MiB against {whole / 2**20:.0f} MiB of logits"
    assert peak(None) > whole * 0.9  # the default chunk (LOGITS_BYTES) holds this whole small batch


# ---- options: checkpointing, dropout, backends ---------------------------------------------------------------

def lora_model(directory, seed=0, **load):
    model = minigemma.load(directory, **load)
    rng = np.random.default_rng(seed)
    for p in model.params.layers:
        for field in TARGETS:
            w = getattr(p, field)
            if w is None:  # Gemma 4: no k/v_proj on KV-shared layers, no v_proj on K=V ones
                continue
            setattr(p, field, weights.LoRA(w, (rng.standard_normal((4, w.shape[1])) * 0.2).astype(np.float32),
                                           (rng.standard_normal((w.shape[0], 4)) * 0.2).astype(np.float32), 2.0))
    return model


@pytest.mark.parametrize("mode", ["full", "lora-dropout"])
def test_checkpointing_gives_identical_gradients(checkpoint_dir, mode):
    """Recomputing each block in the backward gives the very same numbers (dropout masks included)."""
    assert_checkpointing_changes_nothing(checkpoint_dir, mode)


def assert_checkpointing_changes_nothing(directory, mode: str):
    """The loss, the count and every gradient, bit for bit, with and without checkpointing (full fine-tuning,
    or LoRA with dropout)."""
    model = minigemma.load(directory) if mode == "full" else lora_model(directory)
    kind, dropout = ("full", 0.0) if mode == "full" else ("lora", 0.25)
    tokens, labels = batch(seed=8)
    runs = [train.loss_and_grads(model, tokens, labels, train=kind, checkpoint=ck, dropout=dropout,
                                 rng=np.random.default_rng(1)) for ck in (False, True)]
    assert runs[0][:2] == runs[1][:2]
    for name in runs[0][2]:
        np.testing.assert_array_equal(runs[0][2][name], runs[1][2][name], err_msg=name)


def test_dropout_is_seeded_and_drops(tmp_path):
    model = lora_model(save(make_hf_model("gemma3_text", seed=2), tmp_path))
    tokens, labels = batch(seed=9)
    run = lambda seed, p=0.5: train.loss_and_grads(model, tokens, labels, dropout=p,  # noqa: E731
                                                   rng=np.random.default_rng(seed))
    a, b, c = run(1), run(1), run(2)
    none, zero = run(1, p=0.0), train.loss_and_grads(model, tokens, labels)
    assert a[0] == b[0] and all(np.array_equal(a[2][n], b[2][n]) for n in a[2])
    assert a[0] != c[0] and a[0] != none[0]
    assert none[0] == zero[0]
    # PEFT's dropout is on the LoRA branch only: with B = 0 the branch adds nothing, so dropout changes
    # nothing but A's gradient (which is then zero) and B's
    for p in model.params.layers:
        for field in TARGETS:
            getattr(p, field).B[:] = 0
    assert run(1)[0] == pytest.approx(run(2)[0], rel=1e-12)


@pytest.mark.parametrize("quantize, dropout", [("int8", 0.0), ("int4", 0.0), ("int8", 0.3)])
def test_backends_give_the_same_gradients(checkpoint_dir, quantize, dropout):
    """The Numba backend (packed int8/int4 layouts, its own linear, linear_backward and RMSNorm) and the NumPy
    reference, LoRA over int8 or int4 weights (QLoRA), with dropout on the LoRA inputs too (the same masks: the
    same seeded generator). They differ in float32 summation order only; backpropagated through 4 blocks that is
    ~1e-5 of the largest value."""
    pytest.importorskip("numba")
    tokens, labels = batch(seed=10)
    results = [train.loss_and_grads(lora_model(checkpoint_dir, quantize=quantize, backend=b), tokens, labels,
                                    dropout=dropout, rng=np.random.default_rng(3))
               for b in ("numpy", "numba")]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert_grads_close(results[1][2], results[0][2], rtol=5e-5)
    if quantize != "int8" or dropout:
        return  # full fine-tuning has no quantized weights and no dropout: checked once
    full = [train.loss_and_grads(minigemma.load(checkpoint_dir, backend=b), tokens, labels, train="full")
            for b in ("numpy", "numba")]
    assert_grads_close(full[1][2], full[0][2], rtol=5e-5)


def test_parameters_are_views_into_the_model(tmp_path):
    """An optimizer updates parameters() in place, and the model computes with the update."""
    model = lora_model(save(make_hf_model("gemma3_text"), tmp_path))
    tokens, labels = batch(seed=11)
    before = train.loss(model, tokens, labels)[0]
    lora = train.parameters(model, "lora")
    assert set(lora) == {f"layers.{i}.{f}.{m}" for i in range(4) for f in TARGETS for m in "AB"}
    lora["layers.2.up_proj.B"] += 0.5
    assert model.params.layers[2].up_proj.B is lora["layers.2.up_proj.B"]
    assert train.loss(model, tokens, labels)[0] != before
    full = train.parameters(minigemma.load(tmp_path), "full")
    assert len(full) == 2 + 4 * 13  # embed, final_norm; per Gemma 3 block 7 matrices and 6 norms


# ---- what is refused -------------------------------------------------------------------------------------------

def test_bad_input_is_named(tiny, tmp_path):
    tokens, labels = batch()
    with pytest.raises(InvalidArgument, match="no LoRA adapters"):
        train.loss_and_grads(tiny, tokens, labels, train="lora")
    with pytest.raises(InvalidArgument, match="train='sgd'"):
        train.parameters(tiny, "sgd")
    with pytest.raises(InvalidArgument, match=r"labels must have the shape of tokens \(3, 11\)"):
        train.loss(tiny, tokens, labels[:, :5])
    with pytest.raises(InvalidArgument, match="got 160"):
        train.loss(tiny, tokens, np.full_like(labels, 160))
    with pytest.raises(InvalidArgument, match="token ids must be in"):
        train.loss(tiny, tokens - 1, labels)
    with pytest.raises(InvalidArgument, match="dropout > 0 needs rng"):
        train.loss_and_grads(lora_model(save(make_hf_model("gemma"), tmp_path)), tokens, labels, dropout=0.1)
    quantized = minigemma.load(save(make_hf_model("gemma"), tmp_path / "q"), quantize="int8")
    with pytest.raises(InvalidArgument, match="train='full' needs float32 weights, but embed is Int8"):
        train.loss_and_grads(quantized, tokens, labels, train="full")
