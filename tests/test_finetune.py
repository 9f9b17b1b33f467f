"""The finetune and merge commands end to end on a tiny checkpoint, against peft + torch doing the same steps.

The oracle for training is peft's LoRA on the transformers model with torch.optim.AdamW, fed the same batches
(taken from minigemma's data pipeline: what is under test here is the optimization, data.py has its own tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minigemma
from conftest import default_sigint, hf_logits, load_hf_float32, rel_err
from finetune_helpers import VOCAB, tiny_checkpoint
from minigemma import finetune as ft
from minigemma.cli import main
from minigemma.data import collate, load_examples, micro_batch
from minigemma.lora import adapters, add_adapters, save_adapter
from test_gemma4 import CASES as GEMMA4_CASES  # dense K=V, E-series, MoE, VaultGemma: (model_type, overrides)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": "what is the cat", "completion": " a cat is an animal"},
        {"text": "the rain in spain stays mainly in the plain"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"prompt": "name a colour", "completion": " green"},
        {"text": "one two three"}]
IDS = np.array([2, 290, 300, 12, 5, 4, 301, 280, 1, 295])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    tiny_checkpoint(d / "base", "gemma3_text", seed=1)
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    # a starting adapter made by peft, with B random (peft starts it at zero, where A's gradient is zero too)
    theirs = peft.get_peft_model(load_hf_float32(d / "base"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    theirs.save_pretrained(d / "init")
    return d


def _run(*argv) -> int:
    return main([str(a) for a in argv])


def _adapter(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _peft_steps(work, steps, batch_size, lr, weight_decay, max_grad_norm, optimizer="adamw"):
    """peft + torch: the same batches, the mean loss over scored tokens, clip_grad_norm_, the optimizer."""
    tok = minigemma.load(work / "base").tokenizer
    examples, _ = load_examples(work / "train.jsonl", tok, 512)
    model = peft.PeftModel.from_pretrained(load_hf_float32(work / "base"), work / "init", is_trainable=True)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr))
    grads = None
    for k in range(steps):
        tokens, labels = collate(micro_batch(examples, k, batch_size, seed=0), tok.pad_id)
        logits = model(torch.as_tensor(tokens)).logits.float()  # (B, T, V)
        targets = torch.as_tensor(labels)[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    state = {n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
    return model.eval(), state, grads


def test_five_adamw_steps_match_peft_and_torch(work, tmp_path, capsys):
    """AdamW divides each gradient by its own running magnitude, so where a gradient is as small as float32's
    summation noise, that noise decides the coordinate's step (up to lr), and which coordinates those are
    depends on the CPU's BLAS: one CI machine had one coordinate 0.014 lr apart, 1.1e-4 of its tensor's largest
    entry. So the bulk of each tensor is held tight and every coordinate to less than one step (lr) apart.
    A wrong rule moves them all: no bias correction makes the first step 3.2 lr, no weight decay leaves every
    coordinate lr * 0.1 * 5 * |w| (~5e-5 at w ~ 0.1) apart: then 1-6% of a tensor's coordinates agreed (measured)."""
    lr = 1e-3
    code = _run("finetune", work / "train.jsonl", "--out", tmp_path / "out", "--model", work / "base",
                "--init-adapter", work / "init", "--steps", 5, "--batch-size", 2, "--lr", lr, "--schedule",
                "constant", "--weight-decay", 0.1, "--max-grad-norm", 0.5, "--backend", "numpy", "--stats")
    assert code == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])  # --stats: the last line of stderr
    assert stats["steps"] == 5 and stats["train_tokens"] > stats["scored_tokens"] > 0 and stats["tokens_per_s"] > 0
    ours = _adapter(tmp_path / "out")
    theirs_model, theirs, _ = _peft_steps(work, 5, 2, lr, 0.1, 0.5)
    assert sorted(ours) == sorted(theirs)
    init = _adapter(work / "init")
    for name in ours:
        assert not np.array_equal(ours[name], init[name])  # every tensor moved
        diff, scale = np.abs(ours[name] - theirs[name]), np.max(np.abs(theirs[name]))
        assert np.mean(diff < 1e-5 * scale) >= 0.98, name  # all but 2% of the coordinates (the noise-led ones)
        assert np.max(diff) < lr, name  # and those less than one step apart

    # the adapter trained here, loaded by peft on transformers, gives minigemma's logits
    theirs_loaded = peft.PeftModel.from_pretrained(load_hf_float32(work / "base"), tmp_path / "out").eval()
    mine = minigemma.load(work / "base", adapter=tmp_path / "out")
    assert rel_err(hf_logits(theirs_loaded, IDS), mine.forward(IDS)) < 1e-4

    # and the run left its curve, state and optimizer beside the adapter
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["step"] == 5 and len(state["history"]) == 5
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    assert len((tmp_path / "out" / "loss.csv").read_text().splitlines()) == 6


def test_one_sgd_step_moves_each_weight_by_minus_lr_times_gradient(work, tmp_path):
    lr = 0.05
    code = _run("finetune", work / "train.jsonl", "--out", tmp_path / "out", "--model", work / "base",
                "--init-adapter", work / "init", "--steps", 1, "--batch-size", 3, "--lr", lr, "--optimizer", "sgd",
                "--max-grad-norm", 0, "--backend", "numpy")
    assert code == 0
    ours, init = _adapter(tmp_path / "out"), _adapter(work / "init")
    _, _, grads = _peft_steps(work, 1, 3, lr, 0.0, 0.0, optimizer="sgd")
    grads = {n.replace(".default", ""): g for n, g in grads.items()}
    for name in ours:
        step = ours[name] - init[name]
        assert rel_err(step, -lr * grads[name]) < 1e-4, name

    # -lr * minigemma's own gradient of the mean loss, up to float32 summation order (BLAS may split a product
    # differently between two calls) and the rounding of one subtraction
    from minigemma import train

    model = minigemma.load(work / "base", adapter=work / "init")
    examples, _ = load_examples(work / "train.jsonl", model.tokenizer, 512)
    tokens, labels = collate(micro_batch(examples, 0, 3, seed=0), model.tokenizer.pad_id)
    _, count, g = train.loss_and_grads(model, tokens, labels)
    for (i, field), w in minigemma.lora.adapters(model.params).items():
        for which in "AB":
            key = f"base_model.model.model.layers.{i}.{minigemma.lora.MODULES[field]}.lora_{which}.weight"
            step = -np.float32(lr) * (g[f"layers.{i}.{field}.{which}"] * np.float32(1 / count))
            np.testing.assert_allclose(ours[key] - getattr(w, which), step, rtol=0,
                                       atol=1e-5 * np.abs(step).max() + 2 * np.spacing(np.abs(ours[key]).max()))


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(work, tmp_path):
    common = ["--model", work / "base", "--steps", 30, "--batch-size", 1, "--lora-rank", 2, "--lora-dropout", 0.1,
              "--warmup", 3, "--backend", "numpy", "--seed", 7]
    assert _run("finetune", work / "train.jsonl", "--out", tmp_path / "whole", *common) == 0

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-m", "minigemma", "finetune", str(work / "train.jsonl"), "--out",
                              str(tmp_path / "cut"), *map(str, common)], stderr=subprocess.PIPE, text=True,
                             env=env, preexec_fn=default_sigint)
    for line in child.stderr:
        if line.startswith("step "):  # training has begun: interrupt it
            child.send_signal(signal.SIGINT)
            break
    rest = child.stderr.read()
    assert child.wait(timeout=120) == 130, rest
    assert "checkpoint saved" in rest and "--resume" in rest
    stopped_at = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["step"]
    assert 0 < stopped_at < 30

    assert _run("finetune", work / "train.jsonl", "--resume", tmp_path / "cut", "--backend", "numpy") == 0
    whole, resumed = _adapter(tmp_path / "whole"), _adapter(tmp_path / "cut")
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name])
    history = json.loads((tmp_path / "cut" / "trainer_state.json").read_text())["history"]
    assert [r["step"] for r in history] == list(range(1, 31))


@pytest.fixture(scope="module", params=["gemma3_text"] + list(GEMMA4_CASES))
def trainable(request, work, tmp_path_factory):
    """(name, checkpoint): `work`'s Gemma 3, and each Gemma 4 / VaultGemma case of test_gemma4.py with the tiny
    tokenizer (the E-series' per-layer table then has a row for each of its tokens)."""
    if request.param == "gemma3_text":
        return request.param, work / "base"
    model_type, overrides = GEMMA4_CASES[request.param]
    if "vocab_size_per_layer_input" in overrides:
        overrides = {**overrides, "vocab_size_per_layer_input": VOCAB}
    return request.param, tiny_checkpoint(tmp_path_factory.mktemp(request.param), model_type, seed=1, **overrides)


def test_full_fine_tuning_writes_an_hf_directory(work, trainable, tmp_path):
    """The folder --full writes holds the trained model: minigemma and transformers both load it to the logits
    of the same run kept in memory (finetune.start and fit, as the command runs them)."""
    kind, base_dir = trainable
    code = _run("finetune", work / "train.jsonl", "--out", tmp_path / "full", "--model", base_dir, "--full",
                "--steps", 2, "--lr", 1e-3, "--eval", work / "eval.jsonl", "--backend", "numpy")
    assert code == 0
    trained = minigemma.load(tmp_path / "full")
    base = minigemma.load(base_dir)
    assert rel_err(trained.forward(IDS), base.forward(IDS)) > 1e-4  # it moved
    assert trained.tokenizer.encode("the cat") == base.tokenizer.encode("the cat")

    model = minigemma.load(base_dir)
    examples, _ = load_examples(work / "train.jsonl", model.tokenizer, 512)
    run = ft.start(model, ft.Settings(full=True, steps=2, lr=1e-3), len(examples))
    assert ft.fit(run, examples, model.tokenizer.pad_id)
    expected = model.forward(IDS)
    assert rel_err(trained.forward(IDS), expected) < 1e-5
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "full"), IDS), expected) < 1e-5


def test_merge_command_gives_the_adapted_model(trainable, tmp_path):
    """merge writes a folder that minigemma and transformers load to the logits of the base with the adapter
    applied (--adapter), on Gemma 3 and the Gemma 4 / VaultGemma cases (with peft as oracle: test_lora.py)."""
    kind, base_dir = trainable
    model = minigemma.load(base_dir)
    add_adapters(model, rank=2, alpha=4, seed=0)  # every q/k/v/o/gate/up/down the model has
    rng = np.random.default_rng(0)
    for w in adapters(model.params).values():  # B starts at zero; make it count
        w.B[...] = rng.standard_normal(w.B.shape).astype(np.float32) * 0.1
    save_adapter(model, tmp_path / "adapter")
    assert _run("merge", "--model", base_dir, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged",
                "--backend", "numpy") == 0
    expected = minigemma.load(base_dir, adapter=tmp_path / "adapter").forward(IDS)
    assert rel_err(expected, minigemma.load(base_dir).forward(IDS)) > 1e-2  # the adapter does something
    assert rel_err(minigemma.load(tmp_path / "merged").forward(IDS), expected) < 1e-5
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "merged"), IDS), expected) < 1e-5


def test_merge_command_and_adapter_flag(work, tmp_path, capsys):
    assert _run("merge", "--model", work / "base", "--adapter", work / "init", "--out", tmp_path / "merged",
                "--backend", "numpy") == 0
    theirs = peft.PeftModel.from_pretrained(load_hf_float32(work / "base"), work / "init").eval()
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "merged"), IDS), hf_logits(theirs, IDS)) < 1e-4
    capsys.readouterr()
    assert _run("generate", "the", "--model", work / "base", "--adapter", work / "init", "--max-new-tokens", 4,
                "--backend", "numpy") == 0
    with_adapter = capsys.readouterr().out
    assert _run("generate", "the", "--model", tmp_path / "merged", "--max-new-tokens", 4, "--backend", "numpy") == 0
    assert capsys.readouterr().out == with_adapter  # greedy text of the adapter = of the merged model
    # perplexity --adapter scores as the merged model does, and --compare-to none measures the adapter's change
    assert _run("perplexity", work / "train.jsonl", "--model", work / "base", "--adapter", work / "init",
                "--compare-to", "none", "--backend", "numpy") == 0
    adapted = capsys.readouterr().out
    assert _run("perplexity", work / "train.jsonl", "--model", tmp_path / "merged", "--backend", "numpy") == 0
    merged = capsys.readouterr().out
    assert float(adapted.split(";")[0].split("perplexity ")[1]) == pytest.approx(
        float(merged.split("perplexity ")[1]), rel=1e-5)  # W + s B A formed, or the branch added: float32 apart
    assert "mean KL" in adapted and "mean KL 0.000000" not in adapted


def test_errors_are_one_line_with_exit_codes(work, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    err = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "full", "--model", work / "base")
    assert err[0] == 2 and "the folder is not empty (pass --overwrite" in err[1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "a", "completion": ""}\n')
    code, message = _err(capsys, "finetune", bad, "--out", tmp_path / "o1", "--model", work / "base",
                         "--backend", "numpy")
    assert code == 1 and f"{bad}:2: the completion is empty" in message
    assert not (tmp_path / "o1").exists()  # nothing written

    other = tiny_checkpoint(tmp_path / "other", "gemma3_text", hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1)
    code, message = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "o2", "--model", other,
                         "--init-adapter", work / "init", "--backend", "numpy")
    import re

    assert code == 1 and re.search(r"tensor base_model\.model\.model\.layers\.0\.(self_attn|mlp)\.\w+\.lora_[AB]\.weight "
                                   r"has shape \((4, 64|64, 4)\), but this model's \w+ in layer 0 needs "
                                   r"\((4, 32|32, 4)\)", message), message

    code, message = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "o3", "--full",
                         "--quantize", "int8")
    assert code == 2 and "--full trains float32 weights" in message
    code, message = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "o3", "--target-modules", "qq")
    assert code == 2 and "target module 'qq'" in message
    code, message = _err(capsys, "finetune", work / "train.jsonl")
    assert code == 2 and "--out DIR" in message
    for flag, value in (("--lr", "-1"), ("--epochs", "0"), ("--max-grad-norm", "-2"), ("--lora-alpha", "0")):
        code, message = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "o4", flag, value)
        assert code == 2 and f"{flag} {value}: expected" in message
    code, message = _err(capsys, "finetune", work / "train.jsonl", "--out", tmp_path / "o4", "--resume", tmp_path)
    assert code == 1 and "not a minigemma fine-tuning checkpoint (no trainer_state.json)" in message


def _err(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = _run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_full_run_resumed_and_extended_equals_the_whole_run(work, trainable, tmp_path, capsys):
    """--full checkpoints are HF folders; --resume loads the trained weights from there, with AdamW's moments,
    and --steps extends the run (constant schedule, so the learning rates of the two runs agree). Gemma 4's
    norm gains come back from norms.safetensors: its HF file holds w, rounded from the w - 1 trained here."""
    kind, base_dir = trainable
    common = ["--model", base_dir, "--full", "--lr", 1e-3, "--schedule", "constant", "--backend", "numpy"]
    assert _run("finetune", work / "train.jsonl", "--out", tmp_path / "whole", "--steps", 4, *common) == 0
    assert _run("finetune", work / "train.jsonl", "--out", tmp_path / "part", "--steps", 2, *common) == 0
    assert _run("finetune", work / "train.jsonl", "--resume", tmp_path / "part", "--steps", 4,
                "--backend", "numpy") == 0
    from safetensors.numpy import load_file

    whole, part = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "part"))
    assert sorted(whole) == sorted(part)
    for name in whole:
        np.testing.assert_array_equal(part[name], whole[name], err_msg=name)
    assert (tmp_path / "part" / "norms.safetensors").exists() == kind.startswith("gemma4")
    if kind.startswith("gemma4"):  # a norms file that does not fit the model is named, nothing is trained
        from safetensors.numpy import save_file

        save_file({"layers.0.input_norm": np.zeros(3, np.float32)}, str(tmp_path / "part" / "norms.safetensors"))
        code, message = _err(capsys, "finetune", work / "train.jsonl", "--resume", tmp_path / "part", "--steps", 5,
                             "--backend", "numpy")
        assert code == 1 and "norms.safetensors: tensor layers.0.input_norm (3,) is not a norm gain" in message


def test_gradient_accumulation_equals_one_big_batch(work, tmp_path):
    """Two micro-batches of 2 accumulated make the step one batch of 4 makes: the same four examples (the
    order depends on the seed and epoch only), the loss divided by all their scored tokens, and padding (which
    differs between the two) never counted."""
    common = ["--model", work / "base", "--init-adapter", work / "init", "--steps", 1, "--optimizer", "sgd",
              "--lr", 0.05, "--max-grad-norm", 0, "--backend", "numpy"]
    assert _run("finetune", work / "train.jsonl", "--out", tmp_path / "big", "--batch-size", 4, *common) == 0
    assert _run("finetune", work / "train.jsonl", "--out", tmp_path / "acc", "--batch-size", 2, "--grad-accum", 2,
                *common) == 0
    big, acc, init = _adapter(tmp_path / "big"), _adapter(tmp_path / "acc"), _adapter(work / "init")
    for name in big:
        # the steps (~3e-4) are read back as differences of weights (~0.1): float32 rounding alone is ~2e-5 of them
        assert rel_err(acc[name] - init[name], big[name] - init[name]) < 1e-4, name
    rows = [json.loads((tmp_path / d / "trainer_state.json").read_text())["history"][0] for d in ("big", "acc")]
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
