"""Whole models through GGUF: tiny random transformers checkpoints converted here the way llama.cpp converts
Gemma (tests/gguf_convert.py), then loaded by minigemma from both files.

Oracles, all computed in the test:
  * minigemma's own safetensors path on the same HF checkpoint (itself checked against transformers in
    test_model.py): the F32 GGUF must give the same logits and the same config;
  * transformers loading the same GGUF (Gemma 2 and 3 only: transformers has no `gemma` GGUF architecture),
    an independent reading of the names, the dims order and the norm +1;
  * gguf's own dequantizer: Q8_0/F16/BF16 files must give exactly the logits of the safetensors path run on
    the weights `gguf.quants.dequantize` returns.

The tiny models keep to what llama.cpp hard-codes rather than stores (layer pattern, Gemma 3's local RoPE base
10000, query_pre_attn_scalar = head_dim, or D/H at the 27B layer counts); `convert` refuses anything else.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

import minigemma
from conftest import hf_logits, make_hf_model, on_backend, rel_err, save
from gguf_convert import convert, dequantized, gguf_names, vocabulary

# V = 288, not TINY's 160: Gemma's SentencePiece vocabulary has byte fallback, and a vocabulary with byte
# fallback must hold all 256 "<0xNN>" pieces (plus <pad> <eos> <bos> <unk>) or SentencePiece won't load it.
V = 288
SEQ = 30  # several times every sliding window below

# name -> (model_type, overrides). Each says what it is there to cover.
CASES = {
    # Gemma 1, multi-query attention as gemma-2b (K = 1)
    "gemma1-mqa": ("gemma", dict(num_key_value_heads=1)),
    # Gemma 1, multi-head as gemma-7b, H * Dh (4 * 32) != D (64); a non-default eps the metadata must carry
    "gemma1-mha": ("gemma", dict(num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5)),
    # Gemma 2, grouped-query (4 heads, 2 kv), window 5 < SEQ, soft-caps small enough to bite; llama.cpp scales
    # queries by 1/sqrt(head_dim) (16), and alternates sliding/global from a sliding layer 0
    "gemma2-gqa": ("gemma2", dict(num_key_value_heads=2, sliding_window=5, attn_logit_softcapping=3.0,
                                  final_logit_softcapping=2.0, query_pre_attn_scalar=16)),
    # Gemma 3: 7 layers, so pattern 6 (layer 5 global) doesn't divide the layer count; window 5; QK-norm;
    # a non-default global RoPE base with linear scaling, and the local base 10000 llama.cpp assumes
    "gemma3": ("gemma3_text", dict(
        num_hidden_layers=7, num_key_value_heads=1, sliding_window=5, query_pre_attn_scalar=16,
        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 100_000.0, "factor": 4.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # Gemma 2 27B's shape as far as llama.cpp can tell: 46 layers, so it scales queries by 1/sqrt(D/H) = 1/4,
    # not 1/sqrt(head_dim) = 1/sqrt(32); D/H is what the 27B's query_pre_attn_scalar (144 = 4608/32) is
    "gemma2-27b-layers": ("gemma2", dict(num_hidden_layers=46, head_dim=32, query_pre_attn_scalar=16,
                                         sliding_window=5, intermediate_size=64)),
}
BASE_CASES = [name for name in CASES if name != "gemma2-27b-layers"]  # for the many-variant tests


@dataclasses.dataclass
class Case:
    hf: torch.nn.Module  # the transformers model
    hf_dir: Path  # saved by transformers: config.json + model.safetensors
    gguf: Path  # F32 GGUF written by gguf_convert.convert, alone in its directory
    ids: np.ndarray  # (SEQ,) token ids
    hf_load: minigemma.Gemma  # minigemma.load(hf_dir)
    gguf_load: minigemma.Gemma  # minigemma.load(gguf)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """name -> Case, built on first use and shared by every test of the module."""
    built = {}

    def get(name: str) -> Case:
        if name not in built:
            model_type, overrides = CASES[name]
            model = make_hf_model(model_type, seed=len(name), vocab_size=V, **overrides)
            tmp = tmp_path_factory.mktemp(name)
            hf_dir = save(model, tmp / "hf")
            (tmp / "gguf").mkdir()  # alone in its directory, as transformers' gguf_file= wants it
            path = convert(model, tmp / "gguf" / f"{name}.gguf")
            ids = np.random.default_rng(1).integers(0, V, SEQ)
            built[name] = Case(model, hf_dir, path, ids, minigemma.load(hf_dir, progress=False),
                               minigemma.load(path, progress=False))
        return built[name]

    return get


# ---- 1. F32 GGUF == safetensors -------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_f32_gguf_logits_equal_safetensors(cases, name):
    c = cases(name)
    expected = c.hf_load.forward(c.ids)
    ours = c.gguf_load.forward(c.ids)
    assert ours.dtype == np.float32 and ours.shape == (SEQ, V)
    assert rel_err(ours, expected) < 1e-6
    assert np.array_equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", CASES)
def test_config_from_gguf_metadata(cases, name):
    """What GGUF stores is read, and what it omits is filled in as llama.cpp does: the config equals the HF
    one on every field the forward pass uses."""
    c = cases(name)
    ours, expected = c.gguf_load.config, c.hf_load.config
    for f in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types", "rope", "sliding_window",
              "attn_logit_softcapping", "final_logit_softcapping", "max_position_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, f) == getattr(expected, f), f
    assert ours.attn_scale == expected.attn_scale
    assert np.float32(ours.rms_norm_eps) == np.float32(expected.rms_norm_eps)  # GGUF stores it as float32


# ---- 2. transformers reading the same GGUF --------------------------------------------------------------

# Not Gemma 1: transformers' GGUF loader has no "gemma" architecture (integrations/ggml.py GGUF_CONFIG_MAPPING).
@pytest.mark.parametrize("name", ["gemma2-gqa", "gemma3"])
def test_transformers_reads_the_same_gguf(cases, name, backend):
    from transformers import AutoModelForCausalLM

    c = cases(name)
    config = c.hf.config
    # transformers maps the sizes, heads, eps, rope.freq_base and sliding_window keys itself, but not what
    # llama.cpp hard-codes (query_pre_attn_scalar) nor the soft-cap and rope.scaling keys; it would take its
    # defaults (256; 50 and 30; no scaling). Give it those: the weights, the oracle's real job, all come from
    # the file.
    overrides = dict(query_pre_attn_scalar=config.query_pre_attn_scalar)
    if config.model_type == "gemma2":
        overrides.update(attn_logit_softcapping=config.attn_logit_softcapping,
                         final_logit_softcapping=config.final_logit_softcapping)
    else:
        overrides.update(rope_parameters=config.rope_parameters)
    theirs = AutoModelForCausalLM.from_pretrained(c.gguf.parent, gguf_file=c.gguf.name, dtype=torch.float32,
                                                  attn_implementation="eager", **overrides).eval()
    assert theirs.config.vocab_size == V and theirs.config.num_hidden_layers == config.num_hidden_layers
    assert list(theirs.config.layer_types) == list(config.layer_types)

    expected = hf_logits(theirs, c.ids)
    ours = on_backend(c.gguf_load, backend).forward(c.ids)  # float32: both backends read the same params
    assert rel_err(ours, expected) < 1e-5
    assert np.array_equal(ours.argmax(-1), expected.argmax(-1))


# ---- 3. quantized files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("name", BASE_CASES)
def test_quantized_gguf(cases, name, qtype, tmp_path):
    c = cases(name)
    path = convert(c.hf, tmp_path / f"{name}-{qtype.name}.gguf", qtype)
    types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == qtype and types["blk.0.ffn_down.weight"] == qtype
    assert types["output_norm.weight"] == Q.F32  # llama.cpp keeps 1-D tensors in F32

    # exact oracle: gguf's dequantizer, then minigemma's safetensors path on those weights
    names = gguf_names(c.hf)
    weights = dequantized(path, names)
    oracle_dir = tmp_path / "dequantized"
    oracle_dir.mkdir()
    shutil.copy(c.hf_dir / "config.json", oracle_dir / "config.json")
    save_file(weights, str(oracle_dir / "model.safetensors"))
    expected = minigemma.load(oracle_dir).forward(c.ids)

    ours = minigemma.load(path, progress=False).forward(c.ids)
    assert np.array_equal(ours, expected)

    # The exact comparison above is the test of the loader. What quantization does to the logits is a
    # property of the format (tests/test_quants.py bounds it element by element), so here only: the file's
    # quantized data was really used, not a float32 copy.
    assert not np.array_equal(ours, c.gguf_load.forward(c.ids))


# ---- 4. errors ------------------------------------------------------------------------------------------

def test_other_architecture_is_named(cases, tmp_path):
    path = convert(cases("gemma3").hf, tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: architecture 'llama' is not a Gemma"):
        minigemma.load(path, progress=False)


def test_missing_tensor_is_named(cases, tmp_path):
    path = convert(cases("gemma3").hf, tmp_path / "missing.gguf", drop=("blk.0.ffn_up.weight",))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor blk.0.ffn_up.weight is missing"):
        minigemma.load(path, progress=False)


@pytest.mark.parametrize("extra", [
    ("output.weight", (V, 64)),  # an untied head: every Gemma ties it, and llama.cpp's converter skips it
    ("blk.0.unexpected.weight", (3,)),
])
def test_unexpected_tensor_is_named(cases, tmp_path, extra):
    name, shape = extra
    path = convert(cases("gemma3").hf, tmp_path / "extra.gguf", extra={name: np.zeros(shape, np.float32)})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: unexpected tensor {re.escape(name)}"):
        minigemma.load(path, progress=False)


def test_misshaped_tensor_is_named(cases, tmp_path):
    """attn_k written with the kv-head count of another model: the shape error names the tensor."""
    model = cases("gemma3").hf
    path = convert(model, tmp_path / "shape.gguf", drop=("blk.1.attn_k.weight",),
                   extra={"blk.1.attn_k.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(ValueError, match=r"blk\.1\.attn_k\.weight has shape \(32, 64\), expected \(16, 64\)"):
        minigemma.load(path, progress=False)


@pytest.mark.parametrize("size", [4096, 0])
def test_not_a_gguf_file_is_named(tmp_path, size):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=re.escape(str(path))):
        minigemma.load(path, progress=False)


def test_truncated_gguf_file_is_named(cases, tmp_path):
    data = cases("gemma3").gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        minigemma.load(path, progress=False).forward([1, 2])


def test_without_tokenizer_loads_and_runs(cases, tmp_path):
    c = cases("gemma2-gqa")
    path = convert(c.hf, tmp_path / "no-vocab.gguf", tokenizer=False)
    model = minigemma.load(path, progress=False)
    assert rel_err(model.forward(c.ids), c.gguf_load.forward(c.ids)) < 1e-6
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has no tokenizer"):
        model.tokenizer


def test_with_tokenizer_it_is_read(cases):
    tok = cases("gemma2-gqa").gguf_load.tokenizer
    assert tok.vocab_size == V and tok.bos_id == 2 and tok.eos_id == 1
    ids = tok.encode("hello world")
    assert ids[0] == 2 and tok.decode(ids) == "hello world"


def _vocabulary_without_byte_pieces(n):
    pieces, scores, types = vocabulary(n + 256)
    keep = [i for i, t in enumerate(types) if t != gguf.TokenType.BYTE]
    return [pieces[i] for i in keep], [scores[i] for i in keep], [types[i] for i in keep]


@pytest.mark.parametrize("spoil", [
    pytest.param(dict(vocab=_vocabulary_without_byte_pieces(V)), id="no-byte-pieces"),
    pytest.param(dict(unk_id=None), id="no-unknown-token-id"),
])
def test_unusable_tokenizer_metadata_is_named(cases, tmp_path, spoil):
    """Tokenizer metadata a SentencePiece model can't be built from fails like every other bad GGUF: a
    ValueError naming the file (the weights are fine; only the vocabulary is unusable)."""
    path = convert(cases("gemma1-mqa").hf, tmp_path / "bad-vocab.gguf", **spoil)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        minigemma.load(path, progress=False)


# ---- 5. the norm +1 is undone ---------------------------------------------------------------------------

def test_norm_shift_is_undone(cases):
    """Every norm in the file is 1 + w; the loaded params hold w again, as HF does (to float32 rounding of
    (w + 1) - 1, at most half an ulp of numbers below 4)."""
    c = cases("gemma3")
    state = {n: t.numpy() for n, t in c.hf.state_dict().items()}
    p = c.gguf_load.params
    np.testing.assert_allclose(p.layers[0].q_norm, state["model.layers.0.self_attn.q_norm.weight"], rtol=0, atol=3e-7)
    fields = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
              "pre_mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm",
              "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    for i, layer in enumerate(p.layers):
        for field, hf in fields.items():
            np.testing.assert_allclose(getattr(layer, field), state[f"model.layers.{i}.{hf}.weight"],
                                       rtol=0, atol=3e-7, err_msg=f"layer {i} {field}")
    np.testing.assert_allclose(p.final_norm, state["model.norm.weight"], rtol=0, atol=3e-7)
    # and the file really holds 1 + w (the converter did shift them)
    stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(c.gguf).tensors}
    np.testing.assert_allclose(stored["blk.0.attn_q_norm.weight"],
                               state["model.layers.0.self_attn.q_norm.weight"] + 1, rtol=0, atol=3e-7)


# ---- 6. defaults for what a file leaves out --------------------------------------------------------------

@pytest.mark.parametrize("arch, model_type", [("gemma", "gemma"), ("gemma2", "gemma2"), ("gemma3", "gemma3_text")])
def test_metadata_left_out_takes_the_hf_default(tmp_path, arch, model_type):
    """A GGUF file with only the required metadata: every value it leaves out (context length, RoPE base, eps,
    soft-caps, window) must be what a config.json leaving out the same fields gets, i.e. transformers' default
    for that model type (Gemma 3: a 131072-token context, not 8192)."""
    from minigemma.config import GemmaConfig
    from minigemma.gguf_file import config_from_gguf

    D, H, n, F, vocab = 32, 2, 6, 48, 40
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_embedding_length(D)
    writer.add_block_count(n)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    if arch == "gemma3":
        writer.add_sliding_window(8)  # Gemma 3 files always carry it; the loader requires it
    writer.add_tensor("token_embd.weight", np.zeros((vocab, D), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = config_from_gguf(gguf.GGUFReader(path), path)
    hf = {"model_type": model_type, "vocab_size": vocab, "hidden_size": D, "intermediate_size": F,
          "num_hidden_layers": n, "num_attention_heads": H,
          # what llama.cpp assumes when these are absent: as many kv heads as heads, head_dim = D / H
          "num_key_value_heads": H, "head_dim": D // H}
    if arch != "gemma":
        hf["query_pre_attn_scalar"] = D // H  # llama.cpp: 1/sqrt(head_dim) below 27B
    if arch == "gemma3":
        hf["sliding_window"] = 8
    expected = GemmaConfig.from_hf_dict(hf)
    assert dataclasses.replace(ours, extra={}) == dataclasses.replace(expected, extra={})
    assert ours.max_position_embeddings == {"gemma": 8192, "gemma2": 8192, "gemma3": 131072}[arch]
