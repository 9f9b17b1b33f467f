"""A tiny Gemma checkpoint with a tokenizer, for the training tests: transformers writes the weights, the
SentencePiece model is built here, piece by piece, with Gemma's special pieces and settings."""

from __future__ import annotations

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb

from conftest import make_hf_model, save

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
SPACE = "\u2581"
VOCAB = 320


def tiny_tokenizer_proto(n: int = VOCAB) -> sp_pb.ModelProto:
    """n pieces: Gemma's <pad> <eos> <bos> <unk> at 0-3, <start_of_turn> <end_of_turn> as control pieces and
    "\\n" user-defined (as in Gemma's vocabulary, so they are cut out before BPE), the 256 byte pieces, then
    "▁", the lowercase letters, "▁" + letter, and letter pairs, most common first."""
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    normal = [SPACE] + letters + [SPACE + a for a in letters] + ["th", "he", "in", "er", "an", "re", "on", "at"]
    pieces = specials + [(f"<0x{b:02X}>", BYTE) for b in range(256)] + [(p, NORMAL) for p in normal]
    assert len(pieces) >= n, len(pieces)
    proto = sp_pb.ModelProto()
    for i, (piece, kind) in enumerate(pieces[:n]):
        proto.pieces.add(piece=piece, score=-float(i), type=kind)
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 3, 2, 1, 0
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def tiny_checkpoint(directory: Path, model_type: str = "gemma3_text", seed: int = 0, **overrides) -> Path:
    """A tiny random transformers model (vocabulary of VOCAB) saved with a tokenizer.model."""
    save(make_hf_model(model_type, seed=seed, vocab_size=VOCAB, **overrides), directory)
    (directory / "tokenizer.model").write_bytes(tiny_tokenizer_proto().SerializeToString())
    return directory
