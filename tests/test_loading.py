"""Loading fails loudly and precisely; sources resolve as documented."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import minigemma
from conftest import hf_logits, make_hf_model, rel_err, save
from minigemma.hf import SafetensorsFile


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_hf_model("gemma3_text", num_hidden_layers=2, sliding_window=4)
    return model, save(model, tmp_path_factory.mktemp("ckpt"))


def rewrite(directory, tmp_path, edit):
    """Copy a checkpoint with its tensors edited by `edit(dict) -> dict`."""
    f = SafetensorsFile(directory / "model.safetensors")
    tensors = edit({n: np.array(f.get(n)) for n in f.names()})
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    bad = rewrite(checkpoint[1], tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=f"{name} is missing"):
        minigemma.load(bad)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    bad = rewrite(checkpoint[1], tmp_path, lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.extra.weight"):
        minigemma.load(bad)


def test_misshaped_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    bad = rewrite(checkpoint[1], tmp_path, lambda t: {**t, name: t[name][:-1]})
    with pytest.raises(ValueError, match=rf"{name} has shape \(95, 64\), expected \(96, 64\)"):
        minigemma.load(bad)


def test_unsupported_dtype_is_named(checkpoint, tmp_path):
    name = "model.norm.weight"
    bad = rewrite(checkpoint[1], tmp_path, lambda t: {**t, name: t[name].astype(np.float64)})
    with pytest.raises(ValueError, match=f"{name} has dtype F64"):
        minigemma.load(bad).forward([1, 2])


def test_float32_weights_are_memory_mapped_not_copied(checkpoint):
    model = minigemma.load(checkpoint[1])
    assert isinstance(model.params.layers[0].q_proj.base, np.memmap) or isinstance(
        model.params.layers[0].q_proj, np.memmap)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        minigemma.load(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="no config.json"):
        minigemma.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        minigemma.load(tmp_path)
    with pytest.raises(ValueError, match="quantize='int3'"):
        minigemma.load(tmp_path, quantize="int3")


def test_repo_id_from_local_hf_cache(checkpoint, tmp_path, monkeypatch):
    """A repo id resolves through the huggingface_hub cache layout: refs/main -> snapshots/<commit>/."""
    model, directory = checkpoint
    repo = tmp_path / "hub" / "models--google--tiny-gemma"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in directory.iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ids = np.arange(12)
    assert rel_err(minigemma.load("google/tiny-gemma").forward(ids), hf_logits(model, ids)) < 1e-5


def test_repo_id_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"google/gemma-2b: no such file or directory, not in the local Hugging Face cache .*huggingface-cli download"):
        minigemma.load("google/gemma-2b")
