"""LoRA adapters that travel: PEFT's format both ways, merging, and the errors (lora.py).

The oracle is peft on transformers: an adapter written here must give, under `peft.PeftModel.from_pretrained`,
the logits minigemma computes with it, and one written by peft must give peft's logits here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import minigemma
from conftest import hf_logits, load_hf_float32, make_hf_model, rel_err, save
from minigemma.errors import InvalidArgument, ModelFileError
from minigemma.lora import (MODULES, add_adapters, adapters, load_adapter, parse_targets, save_adapter,
                            save_merged)
from minigemma.weights import LoRA
from test_gemma4 import CASES as GEMMA4_CASES  # dense K=V, E-series, MoE, VaultGemma: (model_type, overrides)

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IDS = np.array([2, 17, 99, 5, 140, 63, 8, 31, 120, 7, 44, 1])
KINDS = ["gemma", "gemma2", "gemma3_text"]


@pytest.fixture(scope="module", params=KINDS)
def base(request, tmp_path_factory):
    """A tiny random transformers model of each Gemma generation, saved; (model_type, directory)."""
    d = tmp_path_factory.mktemp(f"base-{request.param}")
    save(make_hf_model(request.param, seed=3), d)
    return request.param, d


def _randomize_peft_(peft_model, seed):
    """peft starts B at zero (the adapter does nothing); random A and B make every product matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_peft_adapter_gives_peft_logits_in_minigemma(base, tmp_path):
    kind, directory = base
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                                                  "down_proj"], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(load_hf_float32(directory), config)
    _randomize_peft_(theirs, seed=1)
    theirs.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(theirs.eval(), IDS)

    ours = minigemma.load(directory, adapter=tmp_path / "adapter")
    found = adapters(ours.params)
    assert len(found) == 5 * len(ours.params.layers)
    assert all(w.scale == 3.0 and w.A.shape[0] == 4 for w in found.values())
    assert rel_err(ours.forward(IDS), expected) < 1e-4
    assert rel_err(ours.forward(IDS), hf_logits(load_hf_float32(directory), IDS)) > 1e-2  # it does something


def test_minigemma_adapter_gives_minigemma_logits_in_peft(base, tmp_path):
    kind, directory = base
    ours = minigemma.load(directory)
    n = add_adapters(ours, rank=3, alpha=6, targets=parse_targets("q,k,gate,down"), seed=0)
    rng = np.random.default_rng(5)
    for w in adapters(ours.params).values():  # B starts at zero; make it count
        w.B[...] = rng.standard_normal(w.B.shape).astype(np.float32) * 0.2
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "q_proj"]

    theirs = peft.PeftModel.from_pretrained(load_hf_float32(directory), tmp_path / "adapter").eval()
    trainable = sum(p.numel() for name, p in theirs.named_parameters() if "lora_" in name)
    assert trainable == n
    assert rel_err(hf_logits(theirs, IDS), ours.forward(IDS)) < 1e-4


def test_peft_initialisation(base):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5)), B = 0, as peft's
    reset_lora_parameters; compared as distributions with peft's own init of the same shapes."""
    kind, directory = base
    ours = minigemma.load(directory)
    add_adapters(ours, rank=8, alpha=16, seed=0)
    theirs = peft.get_peft_model(load_hf_float32(directory), peft.LoraConfig(r=8, lora_alpha=16,
                                                                            target_modules=list(MODULES)))
    for (i, field), w in adapters(ours.params).items():
        assert not w.B.any() and w.scale == 2.0
        module = theirs.base_model.model.model.layers[i].get_submodule(MODULES[field])
        peft_A = module.lora_A["default"].weight.detach().numpy()
        assert w.A.shape == peft_A.shape
        bound = 1 / np.sqrt(w.A.shape[1])
        assert np.abs(w.A).max() <= bound and np.abs(peft_A).max() <= bound
        # a uniform distribution over (-b, b): std b / sqrt(3), for both
        assert abs(w.A.std() - peft_A.std()) < 0.25 * bound / np.sqrt(3)
    # the adapted model starts as the base model
    assert np.array_equal(ours.forward(IDS), minigemma.load(directory).forward(IDS))


@pytest.fixture(scope="module", params=KINDS + list(GEMMA4_CASES))
def checkpoint(request, tmp_path_factory):
    """Gemma 1-3 (as `base`) and the Gemma 4 / VaultGemma cases of test_gemma4.py; (name, directory)."""
    d = tmp_path_factory.mktemp(f"checkpoint-{request.param}")
    if request.param in KINDS:
        save(make_hf_model(request.param, seed=3), d)
    else:
        model_type, overrides = GEMMA4_CASES[request.param]
        save(make_hf_model(model_type, seed=3, head_dim=16, **overrides), d)
    return request.param, d


def test_merge_writes_an_hf_directory_transformers_loads(checkpoint, tmp_path):
    kind, directory = checkpoint
    theirs = peft.get_peft_model(load_hf_float32(directory), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["k_proj", "gate_proj", "up_proj"]))
    _randomize_peft_(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(theirs.eval(), IDS)

    model = minigemma.load(directory, adapter=tmp_path / "adapter")
    save_merged(model, tmp_path / "merged")
    merged_hf = load_hf_float32(tmp_path / "merged")
    assert rel_err(hf_logits(merged_hf, IDS), expected) < 1e-4
    # and minigemma reads its own output back, with no adapter left, as the base with the adapter (float32
    # apart: W + s B A formed once, or the branch added at every product)
    again = minigemma.load(tmp_path / "merged")
    assert not adapters(again.params)
    assert rel_err(again.forward(IDS), model.forward(IDS)) < 1e-5
    assert rel_err(again.forward(IDS), expected) < 1e-4

    # QLoRA: merging over an int8 base writes the int8 matrices dequantized (the experts too, one by one) plus
    # the adapters, and gives the int8 model's logits
    qlora = minigemma.load(directory, quantize="int8", adapter=tmp_path / "adapter")
    save_merged(qlora, tmp_path / "merged-int8")
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "merged-int8"), IDS), qlora.forward(IDS)) < 1e-5


def test_adapter_over_int8_base_is_qlora(base, tmp_path):
    """Over an int8 base the adapter adds its branch to the int8 product: the logits are those of the float32
    matrices dequantize(W_int8) + scale B A (formed here, the oracle), on both backends."""
    from minigemma.lora import merged_params
    from minigemma.model import Gemma

    kind, directory = base
    f32 = minigemma.load(directory)
    add_adapters(f32, rank=2, alpha=4, targets=("q_proj", "up_proj"))
    for w in adapters(f32.params).values():
        w.B[...] = 0.1
    save_adapter(f32, tmp_path / "adapter")
    q = minigemma.load(directory, quantize="int8", adapter=tmp_path / "adapter")
    assert all(type(w.base).__name__ == "Int8" for w in adapters(q.params).values())
    logits = q.forward(IDS)
    oracle = Gemma(q.config, merged_params(q.params)).forward(IDS)
    assert rel_err(logits, oracle) < 1e-5
    assert rel_err(logits, minigemma.load(directory, quantize="int8").forward(IDS)) > 1e-2  # it does something
    numba = minigemma.load(directory, quantize="int8", adapter=tmp_path / "adapter", backend="numba")
    assert rel_err(numba.forward(IDS), logits) < 1e-4


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("g3")
    save(make_hf_model("gemma3_text", seed=4), d)
    return d


def test_adapter_for_another_model_names_tensor_and_shapes(gemma3_dir, tmp_path):
    other = tmp_path / "other"
    save(make_hf_model("gemma3_text", seed=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1), other)
    wrong = minigemma.load(other)
    add_adapters(wrong, rank=4, targets=("q_proj",))
    save_adapter(wrong, tmp_path / "adapter")
    model = minigemma.load(gemma3_dir)
    with pytest.raises(ModelFileError) as e:
        load_adapter(model, tmp_path / "adapter")
    message = str(e.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(4, 32)" in message and "(4, 64)" in message
    assert not adapters(model.params)  # nothing was changed


def test_bad_adapter_folders(gemma3_dir, tmp_path):
    model = minigemma.load(gemma3_dir)
    with pytest.raises(ModelFileError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    add_adapters(model, rank=2, targets=("v_proj",))
    save_adapter(model, tmp_path / "a")
    fresh = minigemma.load(gemma3_dir)
    cfg = tmp_path / "a" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**data, "use_dora": True}))
    with pytest.raises(ModelFileError, match="use_dora = True: DoRA is not supported"):
        load_adapter(fresh, tmp_path / "a")
    cfg.write_text("{not json")
    with pytest.raises(ModelFileError, match="adapter_config.json: cannot read it as JSON"):
        load_adapter(fresh, tmp_path / "a")
    # a tensor name that is not a LoRA matrix of a block
    from safetensors.numpy import save_file

    cfg.write_text(json.dumps(data))
    save_file({"base_model.model.lm_head.lora_A.weight": np.zeros((2, 64), np.float32)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ModelFileError, match="tensor base_model.model.lm_head.lora_A.weight is not a LoRA"):
        load_adapter(fresh, tmp_path / "a")
    # an A without its B
    save_file({"base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": np.zeros((2, 64), np.float32)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(ModelFileError, match="v_proj.lora_A.weight has no lora_B partner"):
        load_adapter(fresh, tmp_path / "a")
    with pytest.raises(InvalidArgument, match="target module 'x'"):
        parse_targets("q,x")


def test_out_folder_must_be_empty(gemma3_dir, tmp_path):
    model = minigemma.load(gemma3_dir)
    add_adapters(model, rank=2, targets=("q_proj",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidArgument, match="not empty .*--overwrite"):
        save_adapter(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_adapter(model, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_merge_of_a_gguf_model_writes_a_config_transformers_reads(tmp_path):
    """A GGUF-loaded model has no config.json: merge writes one from what minigemma knows, and the norms
    (+1 in the GGUF, undone on load) go out zero-centred as transformers expects."""
    from gguf_convert import convert

    hf = make_hf_model("gemma3_text", seed=6, vocab_size=300, num_hidden_layers=7, num_key_value_heads=1,
                       sliding_window=5, query_pre_attn_scalar=16)
    path = convert(hf, tmp_path / "tiny.gguf")
    model = minigemma.load(path)
    add_adapters(model, rank=2, targets=("o_proj",))
    for w in adapters(model.params).values():
        w.B[...] = 0.05
    expected = model.forward(IDS)
    save_merged(model, tmp_path / "merged")
    merged = load_hf_float32(tmp_path / "merged")
    assert rel_err(hf_logits(merged, IDS), expected) < 1e-4
    assert minigemma.load(tmp_path / "merged").tokenizer.encode("ab") == model.tokenizer.encode("ab")


def test_lora_weight_type_reads_merged_rows():
    rng = np.random.default_rng(0)
    W, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((6, 5), (2, 5), (6, 2)))
    w = LoRA(W, A, B, 1.5)
    np.testing.assert_allclose(w.rows(0, 6), W + 1.5 * B @ A, rtol=1e-6)


def _fields(params) -> dict[str, np.ndarray]:
    """Every weight of a Params by name ("embed", "layers.3.experts_down.1", ...), None fields left out."""
    out = {}
    for prefix, obj in [("", params)] + [(f"layers.{i}.", layer) for i, layer in enumerate(params.layers)]:
        for name, w in vars(obj).items():
            if isinstance(w, list) and name != "layers":
                out.update({f"{prefix}{name}.{e}": m for e, m in enumerate(w)})
            elif isinstance(w, np.ndarray):
                out[prefix + name] = w
    return out


@pytest.mark.parametrize("config_from", ["config.json", "minigemma"])
def test_load_write_load_is_the_identity(checkpoint, config_from, tmp_path):
    """write_hf_directory writes back whatever the loader reads: the same tensor names, the experts stacked as
    transformers stores them, Gemma 4's norms as the full gain w (the loader holds w - 1), a config that reads
    as the same config. With config_from="minigemma" the config.json is built by hf_config_dict (what a GGUF
    source gets). Loading the written folder gives every weight back bit for bit, and transformers loads it
    to the logits of the original file."""
    from safetensors.numpy import load_file

    from minigemma.config import GemmaConfig
    from minigemma.lora import hf_config_dict, new_directory, write_hf_directory

    kind, directory = checkpoint
    model = minigemma.load(directory)
    with new_directory(tmp_path / "out") as tmp:
        write_hf_directory(tmp, model.config, model.params, source=str(directory) if config_from == "config.json"
                           else None)
    again = minigemma.load(tmp_path / "out")
    assert again.config == model.config
    if config_from == "minigemma":
        assert GemmaConfig.from_hf_dict(hf_config_dict(model.config)) == model.config
    else:  # the checkpoint's own config, every field kept
        assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
            (directory / "config.json").read_text())
    ours, theirs = _fields(model.params), _fields(again.params)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(theirs[name], ours[name], err_msg=name)

    original, written = (load_file(str(d / "model.safetensors")) for d in (directory, tmp_path / "out"))
    assert sorted(written) == sorted(original)
    for name in original:  # a gain below 0.5 may come back an ulp away (s - 1 rounded); the rest is exact
        np.testing.assert_allclose(written[name], original[name], rtol=0,
                                   atol=np.spacing(np.float32(2)) if name.endswith("norm.weight") else 0,
                                   err_msg=name)
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "out"), IDS),
                   hf_logits(load_hf_float32(directory), IDS)) < 1e-6


@pytest.mark.parametrize("checkpoint", [k for k in GEMMA4_CASES if k.startswith("gemma4")], indirect=True)
def test_merge_of_a_gemma4_gguf_model(checkpoint, tmp_path):
    """From a Gemma 4 GGUF (no config.json, norms stored as the full gain, experts stacked under llama.cpp's
    names) merge writes a folder transformers loads to the logits minigemma computes with the adapters."""
    from gguf_convert import convert

    kind, directory = checkpoint
    model = minigemma.load(convert(load_hf_float32(directory), tmp_path / "model.gguf"))
    add_adapters(model, rank=2, targets=("q_proj", "down_proj"))
    for w in adapters(model.params).values():
        w.B[...] = 0.05
    expected = model.forward(IDS)
    save_merged(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["Gemma4ForCausalLM"]
    assert rel_err(hf_logits(load_hf_float32(tmp_path / "merged"), IDS), expected) < 1e-5
    assert rel_err(minigemma.load(tmp_path / "merged").forward(IDS), expected) < 1e-5
