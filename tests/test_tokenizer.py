"""minigemma.tokenizer against the oracle: transformers' tokenizers built from the same vocabulary, once from
the packaged GGUF (`Tokenizer.from_gguf`) and once from a `tokenizer.model` file (`Tokenizer.from_file`, the HF
directory path). The pure-Python BPE encoder (`PythonBPE`, `encoder="python"`) against the `sentencepiece`
library on every one of those vocabularies, on the unadjusted SentencePiece model and on tiny hand-made ones;
and `python -m minigemma tokenize` against transformers.

Fixture cost (module scope, paid once; measured on a busy 2-core machine): `gguf.GGUFReader` on the 270M
file 10-19 s (it makes a numpy view per element of the 262k-entry vocabulary arrays), transformers' GGUF
tokenizer conversion 17-21 s, its tokenizer.model conversion ~6 s, our `Tokenizer.from_gguf` 1.2-2.3 s.
"""

import json

import gguf
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from minigemma import cli
from minigemma.errors import InvalidArgument
from minigemma.tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, PythonBPE, Tokenizer,
                                  model_proto_from_gguf)

pytestmark = pytest.mark.slow


# `gguf_path` is the session fixture in conftest.py (a pathlib.Path to the packaged model).
@pytest.fixture(scope="module")
def reader(gguf_reader):
    return gguf_reader


@pytest.fixture(scope="module")
def tok(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def hf(gguf_path):
    """transformers' tokenizer built from the GGUF's tokenizer.ggml.* arrays."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def model_file(reader, tmp_path_factory):
    """The SentencePiece model `from_gguf` builds, saved as an HF-style `tokenizer.model`."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(model_proto_from_gguf(reader).SerializeToString())
    return path


@pytest.fixture(scope="module")
def hf_model_file(model_file):
    """transformers' own reading of that `tokenizer.model`, as for an HF directory without tokenizer.json.

    A bare tokenizer.model is converted only through `from_pretrained` (`TokenizersBackend.
    convert_to_native_format` -> `SentencePieceExtractor`: vocabulary and merges by piece position, control
    pieces as special added tokens, user-defined pieces as plain ones); `GemmaTokenizer(vocab_file=...)`
    ignores the file in 5.24 and gives a 5-token placeholder vocabulary. The config names the class and turns
    on <bos> as Gemma's own tokenizer_config.json does (without it no <bos> is added)."""
    transformers = pytest.importorskip("transformers")
    config = model_file.parent / "tokenizer_config.json"
    config.write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", "add_bos_token": True}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_file.parent))
    assert type(hf_tok).__name__ == "GemmaTokenizer" and len(hf_tok) == 262144  # really read the file
    return hf_tok


@pytest.fixture(scope="module")
def from_file(model_file):
    return Tokenizer.from_file(model_file)


CORPUS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; \"quotes\", (parens) & ampersands!",
    "python": "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn -x\n\n\nclass A:\n\tpass\n",
    "tabs": "a\tb\t\tc\t\t\t\td\t \t e",
    **{f"{n} spaces": f"x{' ' * n}y{' ' * n}" for n in (*range(2, 21), 31, 32, 33, 47, 64)},
    "newlines": "a\nb\n\nc\n\n\nd" + "\n" * 40 + "e\n",
    "mixed whitespace": "x\n\n\t  y\t\n \n  \t\tz \r\n",
    "cjk": "中文分词测试。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "arabic": "مرحبا بالعالم، هذه جملة عربية.",
    "hindi": "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "emoji": "I ❤️ 🐍! 👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag",
    "byte fallback": "rare: 𠀀 𪛟 𐍈 𓀀 \U000e0001",
    "digits": "3141592653589793238462643383279 and 1,000,000.00",
    "chat": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "pad": "a <pad> b<pad><pad>",
    "unused": "<unused5><unused55> <unused5",
    "bos in text": "<bos>hello <bos>",
    "eos, unk, mask": "<eos> <unk><mask>",
    "lone angles": "a < b > c <> < >",
    "almost special": "<start_of_turn <end_of_turn> <START_OF_TURN> < pad> <<start_of_turn>>",
    "user-defined html": "<table><tr><td>1</td></tr></table>[multimodal]<h1>x</h1>",
    "empty": "",
    "one space": " ",
    "leading/trailing spaces": "   leading and trailing   ",
    "literal ▁": "a▁b ▁▁c",
    "control chars": "\x00\x01\x7f\u200b\ufeff\u00a0\u3000",
}


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf.encode(text)  # both put <bos> first by default
    assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_decode_matches_transformers(tok, hf, text):
    ids = hf.encode(text)
    assert ids[0] == hf.bos_token_id
    # transformers renders the leading <bos> as "<bos>"; we drop that one (see the module docstring).
    assert hf.decode(ids) == "<bos>" + tok.decode(ids)
    without_bos = ids[1:]  # starts with a second <bos> for "<bos>hello <bos>"
    expected = hf.decode(without_bos)
    if text.startswith("<bos>"):
        expected = expected.removeprefix("<bos>")
    assert tok.decode(without_bos) == expected


def test_decode_renders_specials_and_later_bos(tok, hf):
    ids = tok.encode("<start_of_turn>model\nok<end_of_turn>") + [tok.bos_id, tok.pad_id, tok.eos_id]
    assert tok.decode(ids) == "<start_of_turn>model\nok<end_of_turn><bos><pad><eos>"
    assert "<bos>" + tok.decode(ids) == hf.decode(ids)


def test_decode_byte_fallback(tok, hf):
    ids = tok.encode("𠀀x", add_bos=False)
    assert [tok.id_to_piece(i) for i in ids] == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>", "x"]
    assert tok.decode(ids) == "𠀀x"
    # A character cut short (as while streaming) is one U+FFFD per byte, as in transformers.
    assert tok.decode(ids[:3] + ids[4:]) == "\ufffd" * 3 + "x" == hf.decode(ids[:3] + ids[4:])
    # Bytes of a valid character followed by a stray byte: the whole run is invalid.
    run = tok.encode("𠀀", add_bos=False) + ids[:1]
    assert tok.decode(run) == "\ufffd" * 5 == hf.decode(run)


def test_pieces_match_transformers(tok, hf):
    """Every id has the same piece as in transformers (checks the "  " -> "▁▁" respelling)."""
    assert tok.vocab_size == len(hf) == 262144
    ids = list(range(tok.vocab_size))
    assert [tok.id_to_piece(i) for i in ids] == hf.convert_ids_to_tokens(ids)
    assert tok.id_to_piece(138) == "▁▁"
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def test_special_token_ids(tok, hf, reader):
    ours = (tok.bos_id, tok.eos_id, tok.pad_id)
    assert ours == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (2, 1, 0)
    names = ("bos_token_id", "eos_token_id", "padding_token_id")
    assert ours == tuple(reader.fields[f"tokenizer.ggml.{name}"].contents() for name in names)
    for piece, expected in {"<start_of_turn>": 105, "<end_of_turn>": 106, "<bos>": 2, "<eos>": 1, "<pad>": 0}.items():
        assert tok.token_id(piece) == hf.convert_tokens_to_ids(piece) == expected
        assert tok.encode(piece, add_bos=False) == [expected]  # a single id when written in the text
    with pytest.raises(KeyError, match="not a piece"):
        tok.token_id("<no_such_token>")


def test_whitespace_runs_follow_transformers_not_raw_sentencepiece(tok, hf, model_file):
    """Why `_as_transformers_sees_it` exists: plain SentencePiece matches the user-defined "▁"*31 piece
    greedily, transformers' BPE builds long space runs by merging (32 spaces -> ▁*16 + ▁*16)."""
    raw = spm.SentencePieceProcessor(model_file=str(model_file))
    run31, run16, one = hf.convert_tokens_to_ids(["▁" * 31, "▁" * 16, "▁"])
    assert raw.encode(" " * 32) == [run31, one]
    assert tok.encode(" " * 32, add_bos=False) == hf.encode(" " * 32, add_special_tokens=False) == [run16, run16]
    assert raw.encode("hi  there") == tok.encode("hi  there", add_bos=False)  # short runs agree


def test_from_file_matches_from_gguf(tok, from_file):
    """Consistency only (the file is the proto `from_gguf` builds); the oracle for `from_file` is below."""
    assert from_file.vocab_size == tok.vocab_size
    assert (from_file.bos_id, from_file.eos_id, from_file.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in CORPUS.values():
        ids = tok.encode(text)
        assert from_file.encode(text) == ids
        assert from_file.decode(ids) == tok.decode(ids)


# ------------------------------------------------ an HF directory: transformers reading the tokenizer.model

# transformers reads the same vocabulary two ways, and they agree except on a literal "▁" run in the text
# (test_literal_spacer_runs_split_transformers_readings). minigemma follows the GGUF reading there, so the
# corpus entry with one is an expected failure against the tokenizer.model reading.
SPACER_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "literal '▁▁' in the text: transformers' tokenizer.model reading cuts it out whole as a user-defined added "
    "token; minigemma, like transformers' GGUF reading and SentencePiece, treats '▁' as a space "
    "(see test_literal_spacer_runs_split_transformers_readings)"))


@pytest.mark.parametrize("text", [pytest.param(text, id=name, marks=[SPACER_XFAIL] if "▁▁" in text else [])
                                  for name, text in CORPUS.items()])
def test_from_file_matches_transformers_reading_of_the_file(from_file, hf_model_file, text):
    hf_tok = hf_model_file
    assert from_file.encode(text) == hf_tok.encode(text)
    assert from_file.encode(text, add_bos=False) == hf_tok.encode(text, add_special_tokens=False)
    ids = hf_tok.encode(text)
    assert "<bos>" + from_file.decode(ids) == hf_tok.decode(ids)


def test_from_file_pieces_and_specials_match_transformers_reading_of_the_file(from_file, hf_model_file, model_file):
    hf_tok = hf_model_file
    assert from_file.vocab_size == len(hf_tok)
    ids = list(range(len(hf_tok)))
    assert [from_file.id_to_piece(i) for i in ids] == hf_tok.convert_ids_to_tokens(ids)
    assert (from_file.bos_id, from_file.eos_id, from_file.pad_id, from_file.unk_id) == (
        hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id)
    # every control and user-defined piece (<start_of_turn>, <unusedN>, "\n\n", <table>, "▁▁"...) written alone
    # in the text is that one id on both sides
    proto = sp_pb.ModelProto.FromString(model_file.read_bytes())
    added = hf_tok.added_tokens_decoder
    assert set(added) == {i for i, p in enumerate(proto.pieces) if p.type in (UNKNOWN, CONTROL, USER_DEFINED)}
    assert {i for i, t in added.items() if not t.special} == {i for i, p in enumerate(proto.pieces)
                                                             if p.type == USER_DEFINED}
    for i, token in added.items():
        assert from_file.token_id(token.content) == i
        assert from_file.encode(token.content, add_bos=False) == [i] == hf_tok.encode(
            token.content, add_special_tokens=False), token.content


def test_literal_spacer_runs_split_transformers_readings(tok, from_file, hf, hf_model_file, model_file):
    """A literal "▁" (U+2581) run in the text is the one input on which transformers' two readings of the
    vocabulary disagree (checked on the corpus, the properties below and, while writing this, tens of
    thousands of random strings).

    Reading the tokenizer.model, transformers registers every user-defined piece, the whitespace runs
    "▁▁".."▁"*31 included, as an `AddedToken(normalized=False)` (`SentencePieceExtractor.extract`), so it cuts
    a literal "▁▁" out of the raw text before " " -> "▁". Reading the GGUF it can't: there those pieces are
    spelled with real spaces and renamed to "▁▁" afterwards, so `add_gguf_special_tokens` doesn't find them.

    Which is right for a real Gemma tokenizer.model? Gemma was trained with SentencePiece, which rewrites every
    space as "▁" before it looks at pieces, so to the model a literal "▁" is a space: "a▁b ▁▁c" and "a▁b   c"
    are the same ids. minigemma and the GGUF reading keep that; the tokenizer.model reading gives ids
    SentencePiece never produces for that text (▁, ▁▁ instead of ▁▁▁). For runs of 32 or more all readings
    part anyway: SentencePiece matches ▁*31 greedily, transformers merges spaces by BPE and minigemma follows
    transformers (`_as_transformers_sees_it`); on a literal "▁"*32 the tokenizer.model reading happens to
    agree with SentencePiece. A real checkpoint's tokenizer.json (which transformers prefers to the
    tokenizer.model) can't be checked offline; if it lists "▁▁" as an added token too, transformers on real
    checkpoints behaves like the tokenizer.model reading here.
    """
    raw = spm.SentencePieceProcessor(model_file=str(model_file))
    theirs = lambda text: hf_model_file.encode(text, add_special_tokens=False)  # noqa: E731

    text = "a▁b ▁▁c"
    ours = from_file.encode(text, add_bos=False)
    assert ours == tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert ours == raw.encode(text) == raw.encode("a▁b   c")  # SentencePiece: "▁" is a space
    assert theirs(text) == theirs("a▁b ") + [hf_model_file.convert_tokens_to_ids("▁▁")] + theirs("c")
    assert theirs(text) != ours

    run = "▁" * 32
    assert theirs(run) == raw.encode(run) == raw.encode(" " * 32)  # ▁*31 + ▁, greedily
    ours = from_file.encode(run, add_bos=False)
    assert ours == hf.encode(run, add_special_tokens=False) == theirs(" " * 32)  # BPE: ▁*16 + ▁*16
    assert ours == from_file.encode(" " * 32, add_bos=False)
    assert theirs(run) != ours


def test_round_trip_exceptions(tok):
    """The two inputs `decode(encode(text, add_bos=False)) == text` does not hold for (see the properties)."""
    # "▁" is SentencePiece's (and transformers') spelling of a space, so a literal one comes back as a space.
    assert tok.decode(tok.encode("a▁b", add_bos=False)) == "a b"
    # A leading "<bos>" written in the text encodes to the BOS id, which decode drops...
    assert tok.decode(tok.encode("<bos>x", add_bos=False)) == "x"
    # ...but with the default add_bos=True that is the second id, and it survives.
    assert tok.decode(tok.encode("<bos>x")) == "<bos>x"


# ---------------------------------------------------------------------------------------------- properties

# Text made from the pieces most likely to trip the special-token split and the whitespace merges.
PIECES = [" ", "  ", "\n", "\t", "\r", "a", "b", "é", "中", "😀", "0", "<", ">", "/", "=",
          "<start_of_turn>", "<end_of_turn>", "<pad>", "<bos>", "<eos>", "<unk>", "<unused5>", "<unused55>",
          "[multimodal]", "<table>", "</table>", "<s>", "start_of_turn"]  # fmt: skip
SPECIALISH = st.lists(st.sampled_from([*PIECES, "▁"]), max_size=40).map("".join)

FEW = settings(max_examples=250, deadline=None)


@FEW
@given(text=st.text())
def test_property_encode_matches_transformers_unicode(tok, hf, text):
    assert tok.encode(text) == hf.encode(text)


@FEW
@given(text=SPECIALISH)
def test_property_encode_matches_transformers_specialish(tok, hf, text):
    assert tok.encode(text) == hf.encode(text)


@FEW
@given(text=st.text().filter(lambda text: "▁▁" not in text))
def test_property_from_file_matches_transformers_reading_unicode(from_file, hf_model_file, text):
    assert from_file.encode(text) == hf_model_file.encode(text)


@FEW
@given(text=SPECIALISH.filter(lambda text: "▁▁" not in text))
def test_property_from_file_matches_transformers_reading_specialish(from_file, hf_model_file, text):
    assert from_file.encode(text) == hf_model_file.encode(text)


# Round trip holds exactly for every text without a literal "▁" and not starting with "<bos>": the
# SentencePiece model has the identity normalizer and no dummy prefix, byte fallback covers every character
# (so <unk> only comes from "<unk>" written in the text, which decodes back to "<unk>"), and special pieces
# decode to their own text. The two exceptions are pinned down in test_round_trip_exceptions.
def _round_trips(text):
    return "▁" not in text and not text.startswith("<bos>")


@FEW
@given(text=st.text().filter(_round_trips))
def test_property_round_trip_unicode(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text


@FEW
@given(text=st.lists(st.sampled_from(PIECES), max_size=40).map("".join).filter(_round_trips))
def test_property_round_trip_specialish(tok, text):
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------- the pure-Python encoder against sentencepiece

@pytest.fixture(scope="module")
def py_tok(reader):
    """The GGUF-rebuilt tokenizer with the pure-Python encoder."""
    return Tokenizer.from_gguf(reader, encoder="python")


@pytest.fixture(scope="module")
def py_from_file(model_file):
    return Tokenizer.from_file(model_file, encoder="python")


@pytest.fixture(scope="module")
def raw_pair(model_file):
    """The SentencePiece model as `from_gguf` builds it, *before* `_as_transformers_sees_it`: real scores
    (with ties) and the whitespace runs ▁▁..▁*31 as user-defined pieces, matched greedily and never merged.
    A harder target than the tokenizers: it takes the frozen-symbol and tie-breaking paths."""
    proto = sp_pb.ModelProto.FromString(model_file.read_bytes())
    return PythonBPE(proto), spm.SentencePieceProcessor(model_file=str(model_file))


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_python_encoder_matches_sentencepiece_and_transformers(tok, py_tok, hf, text):
    assert py_tok.encoder == "python" and tok.encoder == "sentencepiece"
    assert py_tok.encode(text) == tok.encode(text) == hf.encode(text)
    assert py_tok.encode(text, add_bos=False) == tok.encode(text, add_bos=False)


@pytest.mark.parametrize("text", CORPUS.values(), ids=CORPUS.keys())
def test_python_encoder_matches_sentencepiece_from_file(from_file, py_from_file, text):
    assert py_from_file.encode(text) == from_file.encode(text)


@pytest.mark.parametrize("text", [*CORPUS.values(), " " * 31, " " * 62, "x" + " " * 100 + "y"],
                         ids=[*CORPUS.keys(), "31 spaces", "62 spaces", "100 spaces"])
def test_python_encoder_matches_raw_sentencepiece(raw_pair, text):
    python, library = raw_pair
    assert python.encode(text) == library.encode(text)


def test_python_encoder_needs_real_scores_and_frozen_symbols(raw_pair, tok, py_tok):
    """The two vocabularies above really differ where they should, so each test reaches its own path."""
    python, library = raw_pair
    assert python.encode(" " * 32) == library.encode(" " * 32) != py_tok.encode(" " * 32, add_bos=False)
    assert py_tok.encode(" " * 32, add_bos=False) == tok.encode(" " * 32, add_bos=False)


FEWER = settings(max_examples=120, deadline=None)


@FEWER
@given(text=st.text())
def test_property_python_encoder_matches_sentencepiece_unicode(tok, py_tok, raw_pair, text):
    assert py_tok.encode(text) == tok.encode(text)
    python, library = raw_pair
    assert python.encode(text) == library.encode(text)


@FEWER
@given(text=SPECIALISH)
def test_property_python_encoder_matches_sentencepiece_specialish(tok, py_tok, raw_pair, text):
    assert py_tok.encode(text) == tok.encode(text)
    python, library = raw_pair
    assert python.encode(text) == library.encode(text)


@FEWER
@given(text=st.text().filter(_round_trips))
def test_property_python_encoder_round_trip(py_tok, text):
    assert py_tok.decode(py_tok.encode(text, add_bos=False)) == text


def test_switching_the_encoder(reader):
    switched = Tokenizer.from_gguf(reader)
    text = "Switch me: 🦙 2026  ok"
    before = switched.encode(text)
    switched.encoder = "python"
    assert switched.encode(text) == before
    with pytest.raises(InvalidArgument, match="encoder must be one of sentencepiece, python, got 'rust'"):
        switched.encoder = "rust"
    assert switched.encoder == "python"  # a refused value changes nothing


def test_merge_trace_ends_in_the_pieces(py_tok):
    """`trace` shows each merge: one symbol fewer per step, from characters to the final pieces."""
    steps = []
    ids = py_tok.python_bpe.encode("tokenization", trace=steps.append)
    assert steps[0] == list("tokenization")
    assert [len(a) - len(b) for a, b in zip(steps, steps[1:])] == [1] * (len(steps) - 1)
    assert steps[-1] == [py_tok.id_to_piece(i) for i in ids]
    assert ids == py_tok.encode("tokenization", add_bos=False)


# Tiny vocabularies that take the paths Gemma's doesn't: an unused piece (merged through, then split back),
# <unk> without byte fallback (a run of them is one <unk>), a dummy prefix, equal scores (leftmost first).
TINY_PIECES = [("<unk>", 0, UNKNOWN), ("<s>", 0, CONTROL), ("</s>", 0, CONTROL),
               ("a", 0, NORMAL), ("b", 0, NORMAL), ("c", 0, NORMAL), ("\u2581", 0, NORMAL),
               ("ab", -1, UNUSED), ("abc", -2, NORMAL), ("bc", -3, NORMAL), ("aa", -1, NORMAL), ("ba", -1, NORMAL),
               ("\u2581a", -1, NORMAL), ("<u>", 0, USER_DEFINED), ("\u2581\u2581", 0, USER_DEFINED)]


def tiny_proto(byte_fallback: bool, dummy_prefix: bool) -> sp_pb.ModelProto:
    proto = sp_pb.ModelProto()
    for piece, score, kind in TINY_PIECES:
        proto.pieces.add(piece=piece, score=score, type=kind)
    if byte_fallback:
        for b in range(256):
            proto.pieces.add(piece=f"<0x{b:02X}>", score=0, type=BYTE)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = sp_pb.TrainerSpec.BPE, len(proto.pieces), byte_fallback
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
        "identity", dummy_prefix, False, True)
    return proto


@pytest.mark.parametrize("byte_fallback", [False, True])
@pytest.mark.parametrize("dummy_prefix", [False, True])
@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "b", "c", " ", "<u>", "é", "x", "€"]), max_size=30).map("".join))
def test_property_python_encoder_matches_sentencepiece_tiny(byte_fallback, dummy_prefix, text):
    proto = tiny_proto(byte_fallback, dummy_prefix)
    library = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    assert PythonBPE(proto).encode(text) == library.encode(text)


def test_tiny_vocabulary_takes_every_path():
    """The property above reaches each rule at least once (checked here on fixed texts)."""
    python = PythonBPE(tiny_proto(byte_fallback=False, dummy_prefix=False))
    assert python.encode("ab") == [3, 4]  # "ab" is unused: merged, then split back
    assert python.encode("abc") == [8]  # ...but "abc" was reached through it
    assert python.encode("xé€a") == [0, 3]  # three unknown characters, one <unk>
    assert python.encode("baa") == [11, 3]  # "ba" and "aa" tie at -1: the leftmost merges
    assert python.encode("  a") == [14, 3]  # "▁▁" user-defined: matched whole, never merged into "▁a"
    with_bytes = PythonBPE(tiny_proto(byte_fallback=True, dummy_prefix=True))
    assert with_bytes.encode("é") == [6, 15 + 0xC3, 15 + 0xA9]  # "▁" (dummy prefix), then the two UTF-8 bytes


# ------------------------------------------------------------------------ python -m minigemma tokenize

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tokenize_gives_transformers_ids(capsys, gguf_path, hf):
    text = "<start_of_turn>user\nWrite  3 haiku, naïve 🦙<end_of_turn>\n"
    code, out, err = run_cli(capsys, "tokenize", text, "--encoder", "python", "--model", str(gguf_path))
    assert code == 0 and err == ""
    assert json.loads(out) == hf.encode(text)
    code, out, _ = run_cli(capsys, "tokenize", text, "--pieces", "--no-bos", "--model", str(gguf_path))
    assert json.loads(out) == hf.convert_ids_to_tokens(hf.encode(text, add_special_tokens=False))


def test_cli_tokenize_reads_stdin(capsys, monkeypatch, gguf_path, hf, tmp_path):
    text = "from stdin,\n  kept as is\n"
    (tmp_path / "in.txt").write_bytes(text.encode())
    with open(tmp_path / "in.txt", "rb") as f:
        monkeypatch.setattr("sys.stdin", type("Stdin", (), {"buffer": f})())
        code, out, _ = run_cli(capsys, "tokenize", "-", "--encoder", "python", "--model", str(gguf_path))
    assert code == 0 and json.loads(out) == hf.encode(text)


def test_cli_tokenize_errors_are_one_line(capsys, tmp_path):
    missing = tmp_path / "missing.gguf"
    code, out, err = run_cli(capsys, "tokenize", "x", "--model", str(missing))
    assert (code, out) == (1, "") and err == f"minigemma: error: {missing}: no such file or directory\n"
    code, _, err = run_cli(capsys, "tokenize", "x", "--model", str(tmp_path))
    assert code == 1 and err == f"minigemma: error: {tmp_path}: no tokenizer.model in this directory\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tokenize", "x", "--encoder", "rust"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --encoder: invalid choice: 'rust'" in err
